"""Test harness: a real hyperd-proxy process, raw protocol clients, and a small agent.

The agent is a legitimate peer written on ``protocol.hyperstart``: it listens on a ctl and a
tty unix socket as QEMU's chardevs do, sends READY, answers every command in order (NEXT(8),
NEXT(rest) then ACK, like the virtcontainers mock, unless a test installs its own answers) and
records what it received.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.abc import SocketStream

from protocol.ccproxy import Command, Frame, FrameDecoder, FrameType, Stream, encode_frame
from protocol.hyperstart import (
    CC,
    AgentCtlConnection,
    CtlFrame,
    Dialect,
    ProcessAsyncEvent,
    TtyDecoder,
    TtyFrame,
    encode_ctl,
    encode_tty,
)
from tests.procs import spawn_ready, stop

READY_DEADLINE = 20.0
IO_DEADLINE = 5.0


@dataclass
class ProxyProcess:
    """A running ``python -m hyperd.proxy``."""

    proc: subprocess.Popen[bytes]
    socket: str
    url: str

    def stop(self) -> int:
        return stop(self.proc)


def spawn_proxy(
    sock: Path | str,
    *extra: str,
    pod: bool = False,
    env: dict[str, str] | None = None,
    quick: bool = True,
) -> ProxyProcess:
    """Start a proxy on ``sock`` and wait for its ``ready`` line.

    ``quick`` shortens the three 30 s waits to 1 s so that tests stay fast.
    """
    where = ["--uri", f"unix://{sock}"] if pod else ["--socket", str(sock)]
    timeouts = (
        ["--ready-timeout", "2", "--shim-timeout", "1", "--process-timeout", "1"] if quick else []
    )
    argv = [sys.executable, "-m", "hyperd.proxy", *where, *timeouts, *extra]
    proc = spawn_ready(argv, stderr=subprocess.PIPE, env=env or {}, deadline=READY_DEADLINE)
    return ProxyProcess(proc, str(sock), f"unix://{sock}")


@contextlib.contextmanager
def running_proxy(sock: Path | str, *extra: str, **kw: Any) -> Any:
    proxy = spawn_proxy(sock, *extra, **kw)
    try:
        yield proxy
    finally:
        proxy.stop()
        if proxy.proc.stderr is not None:
            proxy.proc.stderr.close()


class Proxied:
    """A running proxy plus the clients a test opened on it (closed at the end)."""

    def __init__(self, process: ProxyProcess) -> None:
        self.process = process
        self.proc = process.proc
        self.socket = process.socket
        self.url = process.url
        self.clients: list[RawClient] = []

    async def connect(self) -> RawClient:
        client = await RawClient.connect(self.socket)
        self.clients.append(client)
        return client


@contextlib.asynccontextmanager
async def proxied(directory: Path, *extra: str, **kw: Any) -> AsyncIterator[Proxied]:
    """A proxy on ``<directory>/p.sock``; clients from ``connect()`` are closed afterwards."""
    with running_proxy(directory / "p.sock", *extra, **kw) as process:
        proxy = Proxied(process)
        try:
            yield proxy
        finally:
            with anyio.CancelScope(shield=True):
                for client in proxy.clients:
                    await client.aclose()


class RawClient:
    """A cc-proxy client over a real unix socket, reading whole frames."""

    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder()
        self.eof = False

    @classmethod
    async def connect(cls, path: str) -> RawClient:
        return cls(await anyio.connect_unix(path))

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def command(self, command: Command, payload: bytes | dict[str, Any] = b"") -> None:
        if isinstance(payload, dict):
            payload = msgspec.json.encode(payload)
        await self.send(encode_frame(Frame(FrameType.COMMAND, command, payload)))

    async def stream_frame(self, stream: Stream, data: bytes) -> None:
        await self.send(encode_frame(Frame(FrameType.STREAM, stream, data)))

    async def frame(self, deadline: float = IO_DEADLINE) -> Frame:
        """The next frame; fails if none arrives in time or the proxy closed the connection."""
        with anyio.fail_after(deadline):
            while True:
                frame = self.decoder.next_frame()
                if frame is not None:
                    return frame
                data = await self._receive()
                if not data:
                    raise EOFError("proxy closed the connection")
                self.decoder.feed(data)

    async def _receive(self) -> bytes:
        try:
            return await self.stream.receive()
        except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
            self.eof = True
            return b""

    async def call(
        self, command: Command, payload: bytes | dict[str, Any] = b""
    ) -> tuple[bool, Any]:
        """Send a command and return its response: (False, msg) for an error, (True, decoded
        JSON) for RegisterVM/AttachVM, (True, raw payload) for the others."""
        await self.command(command, payload)
        frame = await self.frame()
        assert frame.type is FrameType.RESPONSE, frame
        assert frame.opcode == command, frame
        if frame.error:
            return False, msgspec.json.decode(frame.payload)["msg"]
        if command in (Command.REGISTER_VM, Command.ATTACH_VM):
            return True, msgspec.json.decode(frame.payload)
        return True, frame.payload

    async def expect_eof(self, deadline: float = IO_DEADLINE) -> None:
        """The proxy closes the connection without sending another frame."""
        with anyio.fail_after(deadline):
            while True:
                assert self.decoder.next_frame() is None
                data = await self._receive()
                if not data:
                    return
                self.decoder.feed(data)

    async def no_frame(self, wait: float = 0.2) -> None:
        """Nothing arrives within ``wait`` seconds."""
        with anyio.move_on_after(wait):
            frame = await self.frame(deadline=wait + 1)
            raise AssertionError(f"unexpected frame {frame}")

    async def aclose(self) -> None:
        await self.stream.aclose()


Answer = Callable[["Agent", CtlFrame], Awaitable[None]]


class Pipe:
    """An accepted agent socket on asyncio streams.

    (anyio's accepted unix sockets can raise InvalidStateError from the loop when a pending
    receive is cancelled just as data arrives; asyncio's streams cancel cleanly.)
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def receive(self) -> bytes:
        """The next bytes; raises anyio.EndOfStream at EOF."""
        try:
            data = await self.reader.read(65536)
        except ConnectionError:
            data = b""
        if not data:
            raise anyio.EndOfStream
        return data

    async def send_eof(self) -> None:
        if self.writer.can_write_eof():
            self.writer.write_eof()

    async def aclose(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


class PipeListener:
    """A unix socket listener handing out :class:`Pipe`s."""

    def __init__(self) -> None:
        self.accepted: asyncio.Queue[Pipe] = asyncio.Queue()
        self.server: asyncio.AbstractServer | None = None

    @classmethod
    async def create(cls, path: str) -> PipeListener:
        listener = cls()

        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await listener.accepted.put(Pipe(reader, writer))

        listener.server = await asyncio.start_unix_server(accepted, path)
        return listener

    async def accept(self) -> Pipe:
        return await self.accepted.get()

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@dataclass
class Agent:
    """A small hyperstart agent: READY, NEXTs and an ACK per command, recorded commands."""

    ctl_path: str
    tty_path: str
    dialect: Dialect = CC
    send_ready: bool = True
    send_next: bool = True
    commands: list[CtlFrame] = field(default_factory=list)
    reads: list[int] = field(default_factory=list)  # sizes of the ctl reads
    batches: list[int] = field(default_factory=list)  # commands completed by each ctl read
    stdin: list[TtyFrame] = field(default_factory=list)
    answers: dict[int, Answer] = field(default_factory=dict)
    ctl: Pipe | None = None
    tty: Pipe | None = None
    connected: anyio.Event = field(default_factory=anyio.Event)
    got_command: anyio.Event = field(default_factory=anyio.Event)
    got_stdin: anyio.Event = field(default_factory=anyio.Event)
    tty_gate: anyio.Event = field(default_factory=anyio.Event)  # set: the tty is read
    hold_tty: bool = False  # do not read the tty until tty_gate is set

    async def run(self, ctl_listener: PipeListener, tty_listener: PipeListener) -> None:
        self.ctl = await ctl_listener.accept()
        self.tty = await tty_listener.accept()
        self.connected.set()
        if not self.hold_tty:
            self.tty_gate.set()
        if self.send_ready:
            await self.ctl.send(AgentCtlConnection(self.dialect).send_ready())
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._serve_tty)
            await self._serve_ctl()
            tg.cancel_scope.cancel()

    async def _serve_ctl(self) -> None:
        assert self.ctl is not None
        conn = AgentCtlConnection(self.dialect)
        while True:
            try:
                data = await self.ctl.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return
            self.reads.append(len(data))
            if self.send_next:
                # hyperstart: one NEXT per read
                await self.ctl.send(conn.send_next(len(data)))
            conn.receive_data(data)
            self.batches.append(0)
            while isinstance(frame := conn.next_event(), CtlFrame):
                self.batches[-1] += 1
                self.commands.append(frame)
                self.got_command.set()
                self.got_command = anyio.Event()
                answer = self.answers.get(frame.code)
                if answer is not None:
                    await answer(self, frame)
                else:
                    await self.ctl.send(conn.send_ack())

    async def _serve_tty(self) -> None:
        assert self.tty is not None
        decoder = TtyDecoder()
        while True:
            await self.tty_gate.wait()
            try:
                data = await self.tty.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                return
            decoder.feed(data)
            while (frame := decoder.next_frame()) is not None:
                self.stdin.append(frame)
                self.got_stdin.set()
                self.got_stdin = anyio.Event()

    async def reply(self, code: int, payload: bytes = b"") -> None:
        assert self.ctl is not None
        await self.ctl.send(encode_ctl(code, payload))

    async def event(self, container: str, process: str, status: int) -> None:
        """The dialect's PROCESSASYNCEVENT: ``process`` of ``container`` finished."""
        assert self.ctl is not None
        finished = ProcessAsyncEvent(container, process, "finished", status=status)
        await self.ctl.send(AgentCtlConnection(self.dialect).send_event(finished))

    async def output(self, seq: int, data: bytes) -> None:
        assert self.tty is not None
        await self.tty.send(encode_tty(seq, data))

    async def wait_commands(self, count: int, deadline: float = IO_DEADLINE) -> list[CtlFrame]:
        with anyio.fail_after(deadline):
            while len(self.commands) < count:
                await self.got_command.wait()
        return self.commands

    async def wait_stdin(self, count: int, deadline: float = IO_DEADLINE) -> list[TtyFrame]:
        with anyio.fail_after(deadline):
            while len(self.stdin) < count:
                await self.got_stdin.wait()
        return self.stdin

    async def die(self) -> None:
        """The VM goes away: both channels close."""
        for stream in (self.ctl, self.tty):
            if stream is not None:
                await stream.aclose()


@contextlib.asynccontextmanager
async def agent_running(directory: Path, name: str = "vm", **kw: Any) -> AsyncIterator[Agent]:
    """An :class:`Agent` listening on ``<directory>/<name>.ctl`` and ``.tty``."""
    ctl_path = str(directory / f"{name}.ctl")
    tty_path = str(directory / f"{name}.tty")
    ctl_listener = await PipeListener.create(ctl_path)
    tty_listener = await PipeListener.create(tty_path)
    agent = Agent(ctl_path, tty_path, **kw)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(agent.run, ctl_listener, tty_listener)
            try:
                yield agent
            finally:
                tg.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await ctl_listener.aclose()
            await tty_listener.aclose()
            for stream in (agent.ctl, agent.tty):
                if stream is not None:
                    await stream.aclose()


async def register(client: RawClient, vm_id: str, agent: Agent, streams: int = 0) -> list[str]:
    """RegisterVM on ``client``; returns the tokens."""
    payload: dict[str, Any] = {
        "containerId": vm_id,
        "ctlSerial": agent.ctl_path,
        "ioSerial": agent.tty_path,
    }
    if streams:
        payload["numIOStreams"] = streams
    ok, body = await client.call(Command.REGISTER_VM, payload)
    assert ok, body
    return list(body["io"]["tokens"] or [])


def hyper(name: str, data: Any = None, tokens: Sequence[str] | None = None) -> dict[str, Any]:
    """A Hyper payload as the Go client builds it (tokens null when none)."""
    payload: dict[str, Any] = {"hyperName": name, "tokens": list(tokens) if tokens else None}
    if data is not None:
        payload["data"] = data
    return payload
