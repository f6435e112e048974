"""Pipelining: a client may write several commands before reading. Its commands are handled
in order and answered in order; a slow command holds up only its own connection; the agent
sees one command at a time per VM (as with the reference, which the ping benchmark assumes)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from protocol.ccproxy import Command, Frame, FrameType, encode_frame
from protocol.hyperstart import Code, CtlFrame
from tests.proxy.harness import Agent, agent_running, hyper, proxied, register

pytestmark = pytest.mark.anyio

CC = ("--agent-dialect", "cc")
PING = encode_frame(Frame(FrameType.COMMAND, Command.HYPER, b'{"hyperName":"ping","tokens":null}'))
CONTAINER = {"id": "c1", "process": {"args": ["cat"]}}


def response(command: Command, payload: bytes = b"", error: bool = False) -> Frame:
    return Frame(FrameType.RESPONSE, command, payload, error)


async def test_slow_command_blocks_only_its_connection(
    anyio_backend: object, short_tmp: Path
) -> None:
    """A newcontainer waiting for its shim holds back the AttachVM pipelined behind it (same
    connection, answered in order), not the pings of another connection."""
    async with (
        proxied(short_tmp, *CC, "--shim-timeout", "10") as proxy,
        agent_running(short_tmp) as agent,
    ):
        runtime = await proxy.connect()
        tokens = await register(runtime, "pod", agent, 1)
        newcontainer = hyper("newcontainer", CONTAINER, tokens)
        await runtime.command(Command.HYPER, newcontainer)
        await runtime.command(Command.ATTACH_VM, {"containerId": "nope"})
        other = await proxy.connect()
        assert (await other.call(Command.ATTACH_VM, {"containerId": "pod"}))[0]
        for _ in range(3):
            assert await other.call(Command.HYPER, hyper("ping")) == (True, b"")
        await runtime.no_frame(0.2)
        shim = await proxy.connect()
        assert await shim.call(Command.CONNECT_SHIM, {"token": tokens[0]}) == (True, b"")
        assert await runtime.frame() == response(Command.HYPER)
        assert await runtime.frame() == response(
            Command.ATTACH_VM, b'{"msg":"unknown containerID: nope"}', True
        )


async def test_one_agent_command_at_a_time(anyio_backend: object, short_tmp: Path) -> None:
    """Two connections pipeline 20 pings each at a slow agent: every response arrives, in
    order per connection, and the agent never has more than one command to read at once."""

    async def slow(agent: Agent, frame: CtlFrame) -> None:
        await anyio.sleep(0.005)
        await agent.reply(Code.ACK)

    async with proxied(short_tmp, *CC) as proxy, agent_running(short_tmp) as agent:
        agent.answers[Code.PING] = slow
        first = await proxy.connect()
        await register(first, "pod", agent)
        second = await proxy.connect()
        assert (await second.call(Command.ATTACH_VM, {"containerId": "pod"}))[0]
        batches_before = len(agent.batches)
        await first.send(PING * 20)
        await second.send(PING * 20)
        for client in (first, second):
            for _ in range(20):
                assert await client.frame() == response(Command.HYPER)
        assert len(agent.commands) == 40
        assert set(agent.batches[batches_before:]) <= {0, 1}


async def test_mixed_pipeline_order(anyio_backend: object, short_tmp: Path) -> None:
    """The pipelining transcript's ORDER step: pings alternating with failing AttachVMs in one
    write come back in request order."""
    async with proxied(short_tmp, *CC) as proxy, agent_running(short_tmp) as agent:
        runtime = await proxy.connect()
        await register(runtime, "pod", agent)
        data = b""
        for i in range(25):
            attach = b'{"containerId":"order-%02d"}' % (2 * i + 1)
            data += PING + encode_frame(Frame(FrameType.COMMAND, Command.ATTACH_VM, attach))
        await runtime.send(data)
        for i in range(25):
            assert await runtime.frame() == response(Command.HYPER)
            message = b'{"msg":"unknown containerID: order-%02d"}' % (2 * i + 1)
            assert await runtime.frame() == response(Command.ATTACH_VM, message, True)


async def test_pipelined_then_half_closed(anyio_backend: object, short_tmp: Path) -> None:
    """A client that writes its commands and shuts down its sending side still gets every
    response, then the proxy closes the connection."""
    async with proxied(short_tmp, *CC) as proxy, agent_running(short_tmp) as agent:
        runtime = await proxy.connect()
        await register(runtime, "pod", agent)
        await runtime.send(PING * 10)
        await runtime.stream.send_eof()
        for _ in range(10):
            assert await runtime.frame() == response(Command.HYPER)
        await runtime.expect_eof()


async def test_commands_wait_for_ready(anyio_backend: object, short_tmp: Path) -> None:
    """As with the reference, a VM is registered while its RegisterVM waits for READY, so
    another connection may attach; its commands reach the agent only after READY."""
    async with (
        proxied(short_tmp, *CC, "--ready-timeout", "10") as proxy,
        agent_running(short_tmp, send_ready=False) as agent,
    ):
        first = await proxy.connect()
        payload = {"containerId": "pod", "ctlSerial": agent.ctl_path, "ioSerial": agent.tty_path}
        await first.command(Command.REGISTER_VM, payload)
        with anyio.fail_after(5):
            await agent.connected.wait()
        second = await proxy.connect()
        assert (await second.call(Command.ATTACH_VM, {"containerId": "pod"}))[0]
        await second.command(Command.HYPER, hyper("ping"))
        await second.no_frame(0.2)
        assert agent.commands == []
        await agent.reply(Code.READY)
        assert (await first.frame()).type is FrameType.RESPONSE
        assert await second.frame() == response(Command.HYPER)
        assert [c.code for c in agent.commands] == [Code.PING]
