"""Agent dialects: auto-detection with GETVERSION, and what changes toward a hyperhq agent
(hyperhq encoding, exit status from PROCESSASYNCEVENT, ^D as terminal EOF, tty frames within
4096 bytes, ctl writes paced by NEXT in chunks of at most 512 bytes)."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from protocol.ccproxy import Command, Frame, FrameType, Stream
from protocol.hyperstart import CC, HYPER, Code, CtlFrame, Dialect
from tests.proxy.harness import Agent, Proxied, RawClient, agent_running, hyper, proxied, register

pytestmark = pytest.mark.anyio

CONTAINER: dict[str, Any] = {
    "id": "c1",
    "rootfs": "rootfs",
    "image": "c1",
    "process": {"args": ["cat"], "envs": [{"env": "A", "value": "1"}], "workdir": "/"},
    "systemMountsInfo": {"bindMountDev": False, "devShmSize": 65536},
}


def version_answer(version: int | None) -> Any:
    async def answer(agent: Agent, frame: CtlFrame) -> None:
        if version is None:
            await agent.reply(Code.ERROR, b'No callback found for command "version"')
        else:
            await agent.reply(Code.ACK, struct.pack(">I", version))

    return answer


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

    async def start(self, token: str, data: Any, name: str = "newcontainer") -> dict[str, Any]:
        ok, body = await self.runtime.call(Command.HYPER, hyper(name, data, [token]))
        assert ok, body
        decoded: dict[str, Any] = msgspec.json.decode(self.agent.commands[-1].payload)
        return decoded


@contextlib.asynccontextmanager
async def pod(
    directory: Path, version: int | None, dialect: Dialect = HYPER, *extra: str
) -> AsyncIterator[Pod]:
    async with (
        proxied(directory, *extra) as proxy,
        agent_running(directory, dialect=dialect) as agent,
    ):
        agent.answers[Code.VERSION] = version_answer(version)
        runtime = await proxy.connect()
        tokens = await register(runtime, "pod", agent, 3)
        yield Pod(proxy, agent, runtime, tokens)


def exited(status: int) -> Frame:
    return Frame(FrameType.NOTIFICATION, 0, bytes([status]))


@pytest.mark.parametrize(
    ("version", "dialect"), [(4244, HYPER), (4243, HYPER), (4242, CC), (None, CC)]
)
async def test_auto_detection(
    anyio_backend: object, short_tmp: Path, version: int | None, dialect: Dialect
) -> None:
    """After READY the proxy sends GETVERSION: an ACK with a u32 >= 4243 means hyperhq;
    ERROR (cc-agent) or an older version means CC. The encoding of newcontainer shows it."""
    async with pod(short_tmp, version, dialect) as p:
        assert p.agent.commands[0].code == Code.VERSION
        await p.shim(p.tokens[0])
        body = await p.start(p.tokens[0], CONTAINER)
        if dialect is HYPER:
            assert "systemMountsInfo" not in body and "constraints" not in body
            assert body["process"]["id"] == "3"
            assert "capabilities" not in body["process"]
        else:
            assert body["systemMountsInfo"] == {"bindMountDev": False, "devShmSize": 65536}
            assert "id" not in body["process"]


async def test_forced_dialect_skips_detection(anyio_backend: object, short_tmp: Path) -> None:
    async with pod(short_tmp, 4244, HYPER, "--agent-dialect", "hyper") as p:
        assert p.agent.commands == []
        assert await p.runtime.call(Command.HYPER, hyper("pscontainer", {"container": "c1"})) == (
            False,
            "unknown command 'pscontainer'",
        )


async def test_kata_names(anyio_backend: object, short_tmp: Path) -> None:
    """Kata's startsandbox/destroysandbox are accepted (the reference does not know them)."""
    async with pod(short_tmp, None, CC) as p:
        ok, _ = await p.runtime.call(Command.HYPER, hyper("startsandbox", {"hostname": "x"}))
        assert ok and p.agent.commands[-1].code == Code.STARTPOD
        ok, _ = await p.runtime.call(Command.HYPER, hyper("destroysandbox"))
        assert ok and p.agent.commands[-1].code == Code.DESTROYPOD


@pytest.mark.parametrize("event_first", [False, True])
async def test_hyper_exit_status_from_event(
    anyio_backend: object, short_tmp: Path, event_first: bool
) -> None:
    """hyperhq reports the exit status as a ctl event, the output end as a tty EOF; the two
    channels are not ordered. ProcessExited goes out once both are in, after the output."""
    async with pod(short_tmp, 4244) as p:
        shim = await p.shim(p.tokens[0])
        process = {**CONTAINER["process"], "id": "init"}
        await p.start(p.tokens[0], {**CONTAINER, "process": process})
        await p.agent.output(3, b"out")
        if event_first:
            await p.agent.event("c1", "init", 3)
            await anyio.sleep(0.1)
            await p.agent.output(3, b"tail")
        await p.agent.output(3, b"")
        if not event_first:
            await p.agent.event("c1", "init", 3)
        assert await shim.frame() == Frame(FrameType.STREAM, Stream.STDOUT, b"out")
        if event_first:
            assert await shim.frame() == Frame(FrameType.STREAM, Stream.STDOUT, b"tail")
        assert await shim.frame() == exited(3)
        await shim.no_frame()


async def test_hyper_exit_event_without_eof(anyio_backend: object, short_tmp: Path) -> None:
    """If the EOF never comes, the status is delivered after a short grace period."""
    async with pod(short_tmp, 4244) as p:
        shim = await p.shim(p.tokens[0])
        body = await p.start(p.tokens[0], CONTAINER, "newcontainer")
        await p.agent.event("c1", body["process"]["id"], 0)
        assert await shim.frame(deadline=3) == exited(0)


async def test_hyper_stdin(anyio_backend: object, short_tmp: Path) -> None:
    """Toward hyperhq: EOF of a terminal process is ^D (hyperhq ignores empty frames there),
    of a pipe an empty frame; no tty frame exceeds 4096 bytes."""
    async with pod(short_tmp, 4244) as p:
        pipe = await p.shim(p.tokens[0])
        term = await p.shim(p.tokens[1])
        await p.start(p.tokens[0], CONTAINER)
        exec_data = {"container": "c1", "process": {"terminal": True, "args": ["sh"], "id": "t"}}
        body = await p.start(p.tokens[1], exec_data, "execcmd")
        assert body["process"]["id"] == "t" and "stderr" not in body["process"]
        big = bytes(range(256)) * 40
        await pipe.stream_frame(Stream.STDIN, big)
        await pipe.stream_frame(Stream.STDIN, b"")
        await term.stream_frame(Stream.STDIN, b"")
        frames = await p.agent.wait_stdin(5)
        assert all(12 + len(f.data) <= 4096 for f in frames)
        assert b"".join(f.data for f in frames if f.seq == 3) == big
        assert [(f.seq, f.data) for f in frames[-2:]] == [(3, b""), (5, b"\x04")]


async def test_hyper_ctl_pacing(anyio_backend: object, short_tmp: Path) -> None:
    """A long command goes out as header+body in one write of at most 512 bytes, then further
    pieces of at most 512 bytes, each after the agent acknowledged the previous with NEXT."""
    async with pod(short_tmp, 4244) as p:
        envs = [{"env": f"V{i}", "value": "x" * 40} for i in range(60)]
        data = {**CONTAINER, "process": {**CONTAINER["process"], "envs": envs}}
        await p.shim(p.tokens[0])
        reads_before = len(p.agent.reads)
        await p.start(p.tokens[0], data)
        frame = p.agent.commands[-1]
        reads = p.agent.reads[reads_before:]
        assert len(frame.payload) > 3000
        assert sum(reads) == 8 + len(frame.payload)
        assert max(reads) <= 512 and reads[0] > 8


async def test_hyper_signals(anyio_backend: object, short_tmp: Path) -> None:
    """hyperhq forms: WINSIZE names container and process; a signal to an exec'd process is
    SIGNALPROCESS (the reference, CC only, refuses it); the init gets KILLCONTAINER."""
    async with pod(short_tmp, 4244) as p:
        init = await p.shim(p.tokens[0])
        ex = await p.shim(p.tokens[1])
        await p.start(p.tokens[0], {**CONTAINER, "process": {"args": ["sh"], "id": "init"}})
        await p.start(p.tokens[1], {"container": "c1", "process": {"args": ["sh"]}}, "execcmd")
        winch = {"signalNumber": 28, "columns": 100, "rows": 30}
        assert await init.call(Command.SIGNAL, winch) == (True, b"")
        assert p.agent.commands[-1].payload == (
            b'{"container":"c1","process":"init","row":30,"column":100}'
        )
        assert await ex.call(Command.SIGNAL, {"signalNumber": 15}) == (True, b"")
        assert (p.agent.commands[-1].code, p.agent.commands[-1].payload) == (
            24,
            b'{"container":"c1","process":"5","signal":15}',
        )
        assert await init.call(Command.SIGNAL, {"signalNumber": 9}) == (True, b"")
        assert p.agent.commands[-1].code == Code.KILLCONTAINER
        assert msgspec.json.decode(p.agent.commands[-1].payload) == {"container": "c1", "signal": 9}
