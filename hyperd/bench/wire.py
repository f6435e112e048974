"""Lean protocol clients for the baselines: no hyperd code on the path, only ``protocol``.

The async ones run on the event loop's low-level socket calls (``sock_sendall`` /
``sock_recv`` on a non-blocking socket), so that the baselines measure the proxy and the agent,
not a heavy client:

- :class:`ProxyWire` — a cc-proxy runtime connection, one command at a time (the seed-pattern
  lifecycle driver and the direct-to-proxy reference of the latency scenario);
- :func:`raw_pipelined` — the raw limit: N frames written back to back in one write, the N
  responses counted as they come;
- :class:`BlockingProxy` / :class:`BlockingAgent` — one-at-a-time clients on blocking sockets
  for the throughput baselines and the agent alone (the host side of a simulated VM's ctl
  channel, no proxy): no event loop between the client and the wire, as with a Go client;
- :class:`PipelineProtocol` — a minimal pipelined client on an ``asyncio.Protocol`` (one future
  per command, replies matched FIFO): what an event-loop client with concurrent callers costs
  at the least, a reference for :class:`hyperd.vm.VMConnection`;
- :class:`ShimWire` — what a shim does: ConnectShim with a token, then wait for the exit status;
- :class:`RpcWire` — a JSON-RPC connection to hyperd, one call at a time (newline framing).
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from time import perf_counter
from typing import Any, Final, cast

import msgspec

from protocol import NEED_DATA
from protocol.ccproxy import (
    AttachVM,
    ClientConnection,
    Command,
    ConnectShim,
    ErrorReply,
    Frame,
    FrameDecoder,
    FrameType,
    Hyper,
    ProcessExited,
    RegisterVM,
    Response,
    encode_frame,
    encode_payload,
)
from protocol.hyperstart import CC, Code, HostCtlConnection, Ready, Reply

RECEIVE_SIZE: Final = 256 * 1024
PING_NAME: Final = "ping"
PING_PAYLOAD: Final = encode_payload(Hyper(hyperName=PING_NAME))
READY_TIMEOUT: Final = 10.0


def unix_path(url: str) -> str:
    """The socket path of a ``unix://`` URL (or of a bare path)."""
    return url.removeprefix("unix://")


class WireError(RuntimeError):
    """The peer answered with an error or hung up."""


async def _connect_unix(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, path)
    except BaseException:
        sock.close()
        raise
    return sock


class ProxyWire:
    """One runtime connection to a cc-proxy; :meth:`call` sends one command and waits for it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._conn = ClientConnection("runtime")

    @classmethod
    async def open(cls, path: str) -> ProxyWire:
        return cls(await _connect_unix(path))

    def close(self) -> None:
        self.sock.close()

    async def call(self, command: Command, payload: bytes | msgspec.Struct = b"") -> bytes:
        """Send ``command`` and return its response payload; :class:`WireError` on an error."""
        await self._loop.sock_sendall(self.sock, self._conn.send_command(command, payload))
        while True:
            event = self._conn.next_event()
            if event is NEED_DATA:
                data = await self._loop.sock_recv(self.sock, RECEIVE_SIZE)
                if not data:
                    raise WireError(f"proxy closed the connection during {command.name}")
                self._conn.receive_data(data)
            elif isinstance(event, Response):
                return event.payload
            elif isinstance(event, ErrorReply):
                raise WireError(f"{command.name}: {event.message}")

    async def register(self, vm: str, ctl: str, tty: str) -> bytes:
        return await self.call(
            Command.REGISTER_VM, RegisterVM(containerId=vm, ctlSerial=ctl, ioSerial=tty)
        )

    async def attach(self, vm: str, streams: int = 0) -> bytes:
        return await self.call(Command.ATTACH_VM, AttachVM(containerId=vm, numIOStreams=streams))

    async def hyper(
        self, name: str, data: bytes | None = None, tokens: list[str] | None = None
    ) -> bytes:
        if data is None and tokens is None:
            return await self.call(
                Command.HYPER,
                PING_PAYLOAD if name == PING_NAME else encode_payload(Hyper(hyperName=name)),
            )
        hyper = Hyper(hyperName=name, tokens=tokens)
        if data is not None:
            hyper = Hyper(hyperName=name, tokens=tokens, data=msgspec.Raw(data))
        return await self.call(Command.HYPER, hyper)


async def seed_command(
    path: str, vm: str, name: str, data: bytes | None = None, tokens: list[str] | None = None
) -> bytes:
    """The seed's ``sendCmd``: connect, AttachVM, the Hyper command, disconnect."""
    wire = await ProxyWire.open(path)
    try:
        await wire.attach(vm)
        return await wire.hyper(name, data, tokens)
    finally:
        wire.close()


async def seed_tokens(path: str, vm: str, count: int = 1) -> list[str]:
    """The seed's ``attach()``: connect, AttachVM(numIOStreams), disconnect."""
    wire = await ProxyWire.open(path)
    try:
        reply = msgspec.json.decode(await wire.attach(vm, count))
    finally:
        wire.close()
    tokens = reply.get("io", {}).get("tokens") or []
    if len(tokens) != count:
        raise WireError(f"{len(tokens)} tokens retrieved out of {count} expected")
    return [str(t) for t in tokens]


async def raw_pipelined(path: str, vm: str, count: int) -> float:
    """The raw limit: ``count`` pings in one write on an attached connection; seconds taken."""
    wire = await ProxyWire.open(path)
    loop = asyncio.get_running_loop()
    try:
        await wire.attach(vm)
        blob = encode_frame(Frame(FrameType.COMMAND, Command.HYPER, PING_PAYLOAD)) * count
        decoder = FrameDecoder()
        start = perf_counter()
        writer = loop.create_task(loop.sock_sendall(wire.sock, blob))
        got = 0
        try:
            while got < count:
                data = await loop.sock_recv(wire.sock, RECEIVE_SIZE)
                if not data:
                    raise WireError(f"proxy closed the connection after {got} responses")
                decoder.feed(data)
                while (frame := decoder.next_frame()) is not None:
                    if frame.error:
                        raise WireError(f"ping failed: {frame.payload[:200]!r}")
                    got += 1
            elapsed = perf_counter() - start
        finally:
            writer.cancel()
        return elapsed
    finally:
        wire.close()


class PipelineProtocol(asyncio.Protocol):
    """The least an asyncio client with concurrent callers can do: write each command frame as
    it comes, resolve the oldest future per response frame. No deadlines, no reconnection."""

    def __init__(self) -> None:
        self._decoder = FrameDecoder()
        self._waiting: deque[asyncio.Future[bytes]] = deque()
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()

    @classmethod
    async def open(cls, path: str, vm: str) -> PipelineProtocol:
        """Connect and AttachVM."""
        _, proto = await asyncio.get_running_loop().create_unix_connection(cls, path)
        await proto.command(Command.ATTACH_VM, encode_payload(AttachVM(containerId=vm)))
        return proto

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(WireError("proxy closed the connection"))

    def data_received(self, data: bytes) -> None:
        self._decoder.feed(data)
        while (frame := self._decoder.next_frame()) is not None:
            future = self._waiting.popleft()
            if frame.error:
                future.set_exception(WireError(frame.payload[:200].decode(errors="replace")))
            else:
                future.set_result(frame.payload)

    def command(self, opcode: Command, payload: bytes) -> asyncio.Future[bytes]:
        assert self._transport is not None
        self._transport.write(encode_frame(Frame(FrameType.COMMAND, opcode, payload)))
        future = self._loop.create_future()
        self._waiting.append(future)
        return future

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class ShimWire:
    """A shim's connection: ConnectShim(token) at once, then the process's exit status."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._conn = ClientConnection("shim")

    @classmethod
    async def connect(cls, path: str, token: str) -> ShimWire:
        """Connect and claim ``token``; returns once the proxy accepted it."""
        shim = cls(await _connect_unix(path))
        try:
            await shim._loop.sock_sendall(
                shim.sock, shim._conn.send_command(Command.CONNECT_SHIM, ConnectShim(token=token))
            )
            while True:
                event = await shim._next()
                if isinstance(event, Response):
                    return shim
                if isinstance(event, ErrorReply):
                    raise WireError(f"ConnectShim: {event.message}")
        except BaseException:
            shim.close()
            raise

    async def _next(self) -> object:
        while True:
            event = self._conn.next_event()
            if event is not NEED_DATA:
                return event
            data = await self._loop.sock_recv(self.sock, RECEIVE_SIZE)
            if not data:
                raise WireError("proxy closed the shim connection")
            self._conn.receive_data(data)

    async def wait_exit(self) -> int:
        """Output is dropped; returns the exit status."""
        while True:
            event = await self._next()
            if isinstance(event, ProcessExited):
                return event.status

    def close(self) -> None:
        self.sock.close()


class RpcError(RuntimeError):
    """hyperd answered an error object."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('message')} (code {error.get('code')})")
        self.error = error


_RPC_ENCODER: Final = msgspec.json.Encoder()


class RpcWire:
    """A JSON-RPC 2.0 connection to hyperd; one call at a time, notifications ignored."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._buffer = bytearray()
        self._next_id = 0

    @classmethod
    async def open(cls, path: str) -> RpcWire:
        return cls(await _connect_unix(path))

    def close(self) -> None:
        self.sock.close()

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        self._next_id += 1
        request: dict[str, Any] = {"jsonrpc": "2.0", "id": self._next_id, "method": method}
        if params is not None:
            request["params"] = params
        await self._loop.sock_sendall(self.sock, _RPC_ENCODER.encode(request) + b"\n")
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                data = await self._loop.sock_recv(self.sock, RECEIVE_SIZE)
                if not data:
                    raise WireError(f"hyperd closed the connection during {method}")
                self._buffer += data
                continue
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            message = msgspec.json.decode(line)
            if not isinstance(message, dict) or message.get("id") != self._next_id:
                continue  # a notification, or a stale answer
            if "error" in message:
                raise RpcError(message["error"])
            return message.get("result")


class BlockingProxy:
    """A cc-proxy runtime connection on a blocking socket: the lean one-at-a-time client.

    Used for baselines A and B (the seed is a Go client blocking in ``read``): no event loop
    between the client and the wire. Call only while nothing else needs the event loop.
    """

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
        except BaseException:
            self.sock.close()
            raise
        self._conn = ClientConnection("runtime")

    def close(self) -> None:
        self.sock.close()

    def call(self, command: Command, payload: bytes | msgspec.Struct = b"") -> bytes:
        self.sock.sendall(self._conn.send_command(command, payload))
        while True:
            event = self._conn.next_event()
            if event is NEED_DATA:
                data = self.sock.recv(RECEIVE_SIZE)
                if not data:
                    raise WireError(f"proxy closed the connection during {command.name}")
                self._conn.receive_data(data)
            elif isinstance(event, Response):
                return event.payload
            elif isinstance(event, ErrorReply):
                raise WireError(f"{command.name}: {event.message}")

    def attach(self, vm: str) -> bytes:
        return self.call(Command.ATTACH_VM, AttachVM(containerId=vm))

    def ping(self) -> bytes:
        return self.call(Command.HYPER, PING_PAYLOAD)


def blocking_seed_ping(path: str, vm: str) -> bytes:
    """The seed's ``sendCmd`` for a ping on blocking sockets: connect, attach, ping, close."""
    conn = BlockingProxy(path)
    try:
        conn.attach(vm)
        return conn.ping()
    finally:
        conn.close()


class BlockingAgent:
    """The host side of a simulated VM's ctl channel on blocking sockets (the agent alone)."""

    def __init__(self, ctl: str, tty: str) -> None:
        self._ctl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._tty = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._conn = HostCtlConnection(CC)
        try:
            self._ctl.connect(ctl)
            self._tty.connect(tty)
            self._ctl.settimeout(READY_TIMEOUT)
            while not isinstance(self._next(), Ready):
                pass
            self._ctl.settimeout(None)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._ctl.close()
        self._tty.close()

    def _next(self) -> object:
        while True:
            event = self._conn.next_event()
            if event is not NEED_DATA:
                return event
            data = self._ctl.recv(RECEIVE_SIZE)
            if not data:
                raise WireError("the agent closed its ctl channel")
            self._conn.receive_data(data)

    def ping(self) -> bytes:
        self._ctl.sendall(self._conn.send_command(Code.PING))
        while True:
            event = self._next()
            if isinstance(event, Reply):
                if not event.ok:
                    raise WireError(f"agent ERROR for PING: {event.payload[:200]!r}")
                return event.payload
