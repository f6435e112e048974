"""Shims: tokens, ConnectShim/DisconnectShim, stdin, stdout/stderr, exit status, Signal, and
what happens to all of them when the VM dies."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from protocol.ccproxy import Command, Frame, FrameType, Stream
from protocol.hyperstart import Code
from tests.proxy.harness import Agent, Proxied, RawClient, agent_running, hyper, proxied, register

pytestmark = pytest.mark.anyio

CC = ("--agent-dialect", "cc")
CONTAINER = {"id": "c1", "rootfs": "rootfs", "image": "c1", "process": {"args": ["cat"]}}


@dataclass
class Pod:
    proxy: Proxied
    agent: Agent
    runtime: RawClient
    tokens: list[str]

    async def shim(self, token: str) -> RawClient:
        shim = await self.proxy.connect()
        assert await shim.call(Command.CONNECT_SHIM, {"token": token}) == (True, b"")
        return shim

    async def start(self, token: str, data: Any = None, name: str = "newcontainer") -> None:
        ok, body = await self.runtime.call(Command.HYPER, hyper(name, data or CONTAINER, [token]))
        assert ok, body


@contextlib.asynccontextmanager
async def pod(directory: Path, streams: int = 2, *extra: str) -> AsyncIterator[Pod]:
    async with proxied(directory, *CC, *extra) as proxy, agent_running(directory) as agent:
        runtime = await proxy.connect()
        tokens = await register(runtime, "pod", agent, streams)
        yield Pod(proxy, agent, runtime, tokens)


def stream(kind: Stream, data: bytes) -> Frame:
    return Frame(FrameType.STREAM, kind, data)


def exited(status: int) -> Frame:
    return Frame(FrameType.NOTIFICATION, 0, bytes([status]))


def response(command: Command) -> Frame:
    return Frame(FrameType.RESPONSE, command, b"")


async def test_tokens_and_seqs(anyio_backend: object, short_tmp: Path) -> None:
    """Tokens are 44-character base64url with padding; seqs go 3/4, 5/6... per VM, stderr is
    left out for a terminal process, and a second VM starts again at 3."""
    async with pod(short_tmp, 2) as p:
        for token in p.tokens:
            assert len(token) == 44 and token.endswith("=")
            assert set(token) <= set(
                "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_="
            )
        ok, body = await p.runtime.call(
            Command.ATTACH_VM, {"containerId": "pod", "numIOStreams": 1}
        )
        third = body["io"]["tokens"][0]
        await p.shim(p.tokens[1])
        await p.shim(third)
        await p.start(p.tokens[1])
        terminal = {"container": "c1", "process": {"terminal": True, "args": ["sh"]}}
        await p.start(third, terminal, "execcmd")
        first = msgspec.json.decode(p.agent.commands[-2].payload)["process"]
        second = msgspec.json.decode(p.agent.commands[-1].payload)["process"]
        assert (first["stdio"], first["stderr"]) == (5, 6)
        assert second["stdio"] == 7 and "stderr" not in second
        async with agent_running(short_tmp, "vm2") as agent2:
            other = await p.proxy.connect()
            tokens = await register(other, "pod2", agent2, 1)
            await p.shim(tokens[0])
            ok, _ = await other.call(Command.HYPER, hyper("newcontainer", CONTAINER, tokens))
            assert ok
            assert b'"stdio":3,"stderr":4' in agent2.commands[-1].payload


async def test_output_routing_and_exit(anyio_backend: object, short_tmp: Path) -> None:
    """stdout and stderr go to the shim owning the seqs; EOF is not forwarded; the 1-byte frame
    after EOF becomes ProcessExited; output of unknown seqs and of the null session (a
    newcontainer without token) is dropped."""
    async with pod(short_tmp) as p:
        shim = await p.shim(p.tokens[0])
        bystander = await p.shim(p.tokens[1])
        ok, _ = await p.runtime.call(
            Command.HYPER, hyper("newcontainer", {**CONTAINER, "id": "pause"})
        )
        assert ok
        assert b'"stdio":1,"stderr":2' in p.agent.commands[-1].payload
        await p.start(p.tokens[0])
        await p.agent.output(1, b"null session")
        await p.agent.output(99, b"nobody")
        await p.agent.output(3, b"out")
        await p.agent.output(4, b"err")
        await p.agent.output(3, b"x")  # a 1-byte frame before EOF is output
        await p.agent.output(3, b"")
        await p.agent.output(3, bytes([143]))
        assert await shim.frame() == stream(Stream.STDOUT, b"out")
        assert await shim.frame() == stream(Stream.STDERR, b"err")
        assert await shim.frame() == stream(Stream.STDOUT, b"x")
        assert await shim.frame() == exited(143)
        await bystander.no_frame()
        await shim.command(Command.DISCONNECT_SHIM)
        await shim.expect_eof()


async def test_stdin_waits_for_the_process(anyio_backend: object, short_tmp: Path) -> None:
    """stdin sent before the process started is held until the newcontainer is ACKed; an
    empty stdin frame is EOF; a Signal behind it on the same connection waits its turn."""
    async with pod(short_tmp) as p:
        shim = await p.shim(p.tokens[0])
        await shim.stream_frame(Stream.STDIN, b"early")
        await shim.stream_frame(Stream.STDIN, b"")
        await anyio.sleep(0.1)
        assert p.agent.stdin == []
        await p.start(p.tokens[0])
        frames = await p.agent.wait_stdin(2)
        assert [(f.seq, f.data) for f in frames] == [(3, b"early"), (3, b"")]


async def test_stdin_timeout_closes_the_shim(anyio_backend: object, short_tmp: Path) -> None:
    """stdin for a process that never starts: the connection is closed after the wait (1 s
    here, 30 s by default) and the token can be claimed again."""
    async with pod(short_tmp) as p:
        shim = await p.shim(p.tokens[0])
        await shim.stream_frame(Stream.STDIN, b"early")
        await shim.expect_eof(deadline=3)
        again = await p.shim(p.tokens[0])
        await again.no_frame()


async def test_shim_wait_timeout(anyio_backend: object, short_tmp: Path) -> None:
    """newcontainer whose shim never connects: the reference's text after the wait."""
    async with pod(short_tmp) as p:
        with anyio.fail_after(3):
            ok, msg = await p.runtime.call(
                Command.HYPER, hyper("newcontainer", CONTAINER, p.tokens[:1])
            )
        assert (ok, msg) == (False, f"timeout waiting for shim with token {p.tokens[0]}")
        assert [c.code for c in p.agent.commands] == []


async def test_newcontainer_waits_for_the_shim(anyio_backend: object, short_tmp: Path) -> None:
    """The runtime may send newcontainer before the shim connects; it goes to the agent once
    the shim has claimed the token."""
    async with pod(short_tmp) as p:
        await p.runtime.command(Command.HYPER, hyper("newcontainer", CONTAINER, p.tokens[:1]))
        await anyio.sleep(0.2)
        assert p.agent.commands == []
        await p.shim(p.tokens[0])
        assert await p.runtime.frame() == response(Command.HYPER)
        assert p.agent.commands[-1].code == Code.NEWCONTAINER


async def test_signals(anyio_backend: object, short_tmp: Path) -> None:
    """SIGKILL before start: ProcessExited 0, then the response. SIGTERM after start ->
    killcontainer; SIGWINCH -> winsize in the CC form; signals to an exec'd process: the
    reference's refusal."""
    async with pod(short_tmp) as p:
        shim_a = await p.shim(p.tokens[0])
        shim_b = await p.shim(p.tokens[1])
        await shim_b.command(Command.SIGNAL, {"signalNumber": 9})
        assert await shim_b.frame() == exited(0)
        assert await shim_b.frame() == response(Command.SIGNAL)
        await p.start(p.tokens[0])
        assert await shim_a.call(Command.SIGNAL, {"signalNumber": 15}) == (True, b"")
        assert (
            p.agent.commands[-1].payload == b'{"container":"c1","signal":15,"allProcesses":false}'
        )
        winch = {"signalNumber": 28, "columns": 80, "rows": 24}
        assert await shim_a.call(Command.SIGNAL, winch) == (True, b"")
        assert p.agent.commands[-1].code == Code.WINSIZE
        assert p.agent.commands[-1].payload == b'{"seq":3,"row":24,"column":80}'
        _ok, body = await p.runtime.call(
            Command.ATTACH_VM, {"containerId": "pod", "numIOStreams": 1}
        )
        exec_token = body["io"]["tokens"][0]
        shim_c = await p.shim(exec_token)
        await p.start(exec_token, {"container": "c1", "process": {"args": ["ls"]}}, "execcmd")
        assert await shim_c.call(Command.SIGNAL, {"signalNumber": 10}) == (
            False,
            "Could not send the signal user defined signal 1: Sending a signal to a process"
            " different from the initial container process is not supported",
        )


async def test_signal_waits_for_the_process(anyio_backend: object, short_tmp: Path) -> None:
    """A signal other than KILL/TERM before the start waits for it (1 s here, 30 s by
    default), then fails with the reference's text; the connection stays usable."""
    async with pod(short_tmp) as p:
        shim = await p.shim(p.tokens[0])
        with anyio.fail_after(3):
            ok, msg = await shim.call(Command.SIGNAL, {"signalNumber": 2})
        assert (ok, msg) == (False, f"timeout waiting for process with token {p.tokens[0]}")
        await shim.command(Command.SIGNAL, {"signalNumber": 1})
        await p.start(p.tokens[0])
        assert await shim.frame() == response(Command.SIGNAL)
        assert p.agent.commands[-1].payload == b'{"container":"c1","signal":1,"allProcesses":false}'


async def test_disconnect_shim(anyio_backend: object, short_tmp: Path) -> None:
    """DisconnectShim: no response, the connection is closed, the token stays claimed."""
    async with pod(short_tmp) as p:
        shim = await p.shim(p.tokens[0])
        await shim.command(Command.DISCONNECT_SHIM)
        await shim.expect_eof()
        again = await p.proxy.connect()
        assert await again.call(Command.CONNECT_SHIM, {"token": p.tokens[0]}) == (
            False,
            f"token already claimed: {p.tokens[0]}",
        )
        assert await p.runtime.call(
            Command.HYPER, hyper("newcontainer", CONTAINER, p.tokens[:1])
        ) == (
            False,
            f"unknown token {p.tokens[0]}",
        )


async def test_shim_reconnects_after_plain_close(anyio_backend: object, short_tmp: Path) -> None:
    """A shim that closes without DisconnectShim frees its claim: the reference re-closes a
    closed latch on reconnect and panics. Here the new connection gets the output, and an exit
    status that arrived while no shim was connected."""
    async with pod(short_tmp) as p:
        shim = await p.shim(p.tokens[0])
        await p.start(p.tokens[0])
        await shim.aclose()
        p.proxy.clients.remove(shim)
        await anyio.sleep(0.1)
        again = await p.shim(p.tokens[0])
        await p.agent.output(3, b"hi")
        assert await again.frame() == stream(Stream.STDOUT, b"hi")
        await again.aclose()
        p.proxy.clients.remove(again)
        await anyio.sleep(0.2)  # the proxy notices the close before the process exits
        await p.agent.output(3, b"")
        await p.agent.output(3, bytes([7]))
        await anyio.sleep(0.1)
        third = await p.shim(p.tokens[0])
        assert await third.frame() == exited(7)


async def test_token_reuse_is_refused(anyio_backend: object, short_tmp: Path) -> None:
    """A second newcontainer/execcmd on one token panics the reference (latch closed twice).
    We refuse it; the null session (no token) may be used again."""
    async with pod(short_tmp) as p:
        await p.shim(p.tokens[0])
        await p.start(p.tokens[0])
        again = hyper("execcmd", {"container": "c1", "process": {}}, p.tokens[:1])
        assert await p.runtime.call(Command.HYPER, again) == (
            False,
            f"token {p.tokens[0]} already bound to a process",
        )
        for _ in range(2):
            ok, _ = await p.runtime.call(
                Command.HYPER, hyper("execcmd", {"container": "c1", "process": {}})
            )
            assert ok


async def test_newcontainer_without_process(anyio_backend: object, short_tmp: Path) -> None:
    """The reference dereferences the missing process and panics; we answer an error."""
    async with pod(short_tmp) as p:
        await p.shim(p.tokens[0])
        data = {"id": "c1", "rootfs": "rootfs"}
        assert await p.runtime.call(Command.HYPER, hyper("newcontainer", data, p.tokens[:1])) == (
            False,
            "newcontainer data has no process",
        )


async def test_vm_death(anyio_backend: object, short_tmp: Path) -> None:
    """The VM dies with a command in flight: the reference never answers it. We answer it
    (and later Hyper) with the reference's text for a lost VM, close every shim, and keep the
    VM registered until UnregisterVM: AttachVM still works; an old token gives ``vm: unknown
    token`` then ``token already claimed``, as with the reference."""
    hold: list[Agent] = []

    async def silent(agent: Agent, frame: object) -> None:
        hold.append(agent)

    async with pod(short_tmp) as p:
        shim = await p.shim(p.tokens[0])
        await p.start(p.tokens[0])
        p.agent.answers[Code.PING] = silent
        await p.runtime.command(Command.HYPER, hyper("ping"))
        await p.agent.wait_commands(2)
        await p.agent.die()
        frame = await p.runtime.frame()
        assert frame.error and frame.payload == b'{"msg":"No multicast available for CTL channel"}'
        await shim.expect_eof()
        assert await p.runtime.call(Command.HYPER, hyper("ping")) == (
            False,
            "No multicast available for CTL channel",
        )
        ok, body = await p.runtime.call(
            Command.ATTACH_VM, {"containerId": "pod", "numIOStreams": 1}
        )
        assert ok and len(body["io"]["tokens"]) == 1
        late = await p.proxy.connect()
        token = p.tokens[1]
        assert await late.call(Command.CONNECT_SHIM, {"token": token}) == (
            False,
            f"vm: unknown token {token}",
        )
        assert await late.call(Command.CONNECT_SHIM, {"token": token}) == (
            False,
            f"token already claimed: {token}",
        )
        assert await p.runtime.call(Command.UNREGISTER_VM, {"containerId": "pod"}) == (True, b"")
        assert await late.call(Command.CONNECT_SHIM, {"token": token}) == (
            False,
            f"unknown token: {token}",
        )


async def test_waiters_are_answered_when_the_vm_dies(
    anyio_backend: object, short_tmp: Path
) -> None:
    """A newcontainer waiting for its shim and queued commands of other connections are all
    answered when the VM goes away."""
    async with pod(short_tmp, 2, "--shim-timeout", "20") as p:
        await p.runtime.command(Command.HYPER, hyper("newcontainer", CONTAINER, p.tokens[:1]))
        await anyio.sleep(0.1)
        await p.agent.die()
        with anyio.fail_after(3):
            frame = await p.runtime.frame()
        assert frame.error and frame.payload == b'{"msg":"No multicast available for CTL channel"}'


async def test_stdin_backpressure(anyio_backend: object, short_tmp: Path) -> None:
    """An agent that does not read its tty holds the shim back (the proxy stops reading it)
    instead of buffering without bound; everything arrives, in order, once the agent reads."""
    async with (
        proxied(short_tmp, *CC) as proxy,
        agent_running(short_tmp, hold_tty=True) as agent,
    ):
        runtime = await proxy.connect()
        tokens = await register(runtime, "pod", agent, 1)
        p = Pod(proxy, agent, runtime, tokens)
        shim = await p.shim(tokens[0])
        await p.start(tokens[0])
        chunk = bytes(range(256)) * 256  # 64 KiB
        total = 256  # 16 MiB
        sent = 0

        async def feed() -> None:
            nonlocal sent
            for _ in range(total):
                await shim.stream_frame(Stream.STDIN, chunk)
                sent += 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(feed)
            await anyio.sleep(1.0)
            assert sent < total // 2, "the proxy kept reading stdin nobody consumed"
            agent.tty_gate.set()
            with anyio.fail_after(20):
                while sum(len(f.data) for f in agent.stdin) < total * len(chunk):
                    await agent.got_stdin.wait()
        data = b"".join(f.data for f in agent.stdin)
        assert data == chunk * total
