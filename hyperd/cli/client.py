"""Clients of hyperd's two sockets, used by ``hyperctl`` and the end-to-end tests.

- :class:`RPCClient`: JSON-RPC 2.0 over hyperd's unix socket, one call at a time per client
  (open several clients for concurrency); notifications received meanwhile are queued and read
  with :meth:`RPCClient.next_notification`. A JSON-RPC error is raised as :class:`RPCError`.
- :class:`ShimClient`: what a shim does on the proxy socket: ConnectShim with the token, then
  stdout/stderr streams and the ProcessExited status; stdin frames and stdin EOF.
"""

from __future__ import annotations

import itertools
import signal
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc
import msgspec

from protocol import NEED_DATA
from protocol.ccproxy import (
    ClientConnection,
    Command,
    ConnectShim,
    ErrorReply,
    ProcessExited,
    Response,
    Signal,
    Stream,
    StreamData,
)

READ_SIZE = 65536
MAX_LINE = 8 * 1024 * 1024  # a client accepts big replies (long lists) but not unbounded ones


class RPCError(Exception):
    """A JSON-RPC error response: ``code``, ``message``, ``data`` (``data["kind"]`` for
    hyperd's application errors)."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{message} (code {code})")
        self.code = code
        self.message = message
        self.data = data

    @property
    def kind(self) -> str | None:
        if isinstance(self.data, dict):
            kind = self.data.get("kind")
            return kind if isinstance(kind, str) else None
        return None


class ConnectionClosed(Exception):
    """The daemon closed the connection."""


def socket_path(url: str) -> str:
    """The path of a ``unix://`` URL (or a bare path)."""
    return url[len("unix://") :] if url.startswith("unix://") else url


class RPCClient:
    """One connection to hyperd's RPC socket."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self._ids = itertools.count(1)
        self._buffer = bytearray()
        self._notifications: deque[dict[str, Any]] = deque()
        self._lock = anyio.Lock()

    @classmethod
    async def connect(cls, path: str) -> RPCClient:
        return cls(await anyio.connect_unix(path))

    async def aclose(self) -> None:
        await self.stream.aclose()

    async def __aenter__(self) -> RPCClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def send_raw(self, data: bytes) -> None:
        """Write raw bytes (tests use it for malformed input)."""
        await self.stream.send(data)

    async def read_message(self) -> Any:
        """The next JSON text from the daemon (a response, batch or notification)."""
        while True:
            nl = self._buffer.find(b"\n")
            if nl >= 0:
                line = bytes(self._buffer[:nl])
                del self._buffer[: nl + 1]
                if line.strip():
                    return msgspec.json.decode(line)
                continue
            if len(self._buffer) > MAX_LINE:
                raise ConnectionClosed("reply line too long")
            try:
                chunk = await self.stream.receive(READ_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
                raise ConnectionClosed("hyperd closed the connection") from None
            self._buffer += chunk

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Call ``method``; its result, or :class:`RPCError`."""
        async with self._lock:
            rid = next(self._ids)
            request: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
            if params is not None:
                request["params"] = params
            await self.stream.send(msgspec.json.encode(request) + b"\n")
            while True:
                msg = await self.read_message()
                if isinstance(msg, dict) and "id" not in msg and "method" in msg:
                    self._notifications.append(msg)
                    continue
                stale = msg.get("id") if isinstance(msg, dict) else None
                if isinstance(stale, int) and stale < rid:
                    continue  # the reply to an earlier call whose caller was cancelled
                if not isinstance(msg, dict) or msg.get("id") != rid:
                    raise ConnectionClosed(f"unexpected message from hyperd: {msg!r}")
                if "error" in msg:
                    err = msg["error"]
                    raise RPCError(err.get("code", 0), err.get("message", ""), err.get("data"))
                return msg.get("result")

    async def next_notification(self) -> dict[str, Any]:
        """The next server notification (``{"method": ..., "params": ...}``)."""
        if self._notifications:
            return self._notifications.popleft()
        while True:
            msg = await self.read_message()
            if isinstance(msg, dict) and "id" not in msg and "method" in msg:
                return msg


class ShimClient:
    """A shim's connection to the proxy for one process (the token's I/O session)."""

    def __init__(self, stream: anyio.abc.SocketStream) -> None:
        self.stream = stream
        self.conn = ClientConnection("shim")
        self._send_lock = anyio.Lock()

    @classmethod
    async def connect(cls, url: str, token: str) -> ShimClient:
        """Connect to the proxy at ``url`` and claim ``token``; raises ``RPCError``-like
        :class:`ShimError` if the proxy refuses the token."""
        shim = cls(await anyio.connect_unix(socket_path(url)))
        try:
            await shim._send(shim.conn.send_command(Command.CONNECT_SHIM, ConnectShim(token=token)))
        except BaseException:
            await shim.stream.aclose()
            raise
        return shim

    async def _send(self, data: bytes) -> None:
        async with self._send_lock:
            await self.stream.send(data)

    async def send_stdin(self, data: bytes) -> None:
        """Forward stdin bytes; ``b""`` is stdin EOF."""
        await self._send(self.conn.send_stream(Stream.STDIN, data))

    async def send_signal(self, signum: int) -> None:
        """Signal the process (the proxy turns it into killcontainer)."""
        await self._send(self.conn.send_command(Command.SIGNAL, Signal(signalNumber=signum)))

    async def send_winsize(self, columns: int, rows: int) -> None:
        """The terminal's size (SIGWINCH with columns and rows; the proxy sends winsize)."""
        winch = int(signal.SIGWINCH)
        await self._send(
            self.conn.send_command(
                Command.SIGNAL, Signal(signalNumber=winch, columns=columns, rows=rows)
            )
        )

    async def events(self) -> Any:
        """Async iterator over the proxy's events: Response, ErrorReply, StreamData,
        ProcessExited; ends at EOF."""
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                try:
                    data = await self.stream.receive(READ_SIZE)
                except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
                    return
                self.conn.receive_data(data)
                continue
            yield event

    async def wait_connected(self) -> None:
        """Wait for the ConnectShim response; raises :class:`ShimError` on refusal.

        Output that arrives before the response is kept for :meth:`collect`.
        """
        self._early: list[StreamData | ProcessExited] = []
        async for event in self.events():
            if isinstance(event, ErrorReply):
                raise ShimError(f"proxy refused the token: {event.message}")
            if isinstance(event, Response):
                return
            if isinstance(event, StreamData | ProcessExited):
                self._early.append(event)
        raise ShimError("proxy closed the connection before answering ConnectShim")

    async def pump(
        self,
        on_stdout: Callable[[bytes], object],
        on_stderr: Callable[[bytes], object],
    ) -> int | None:
        """Deliver output until the process exits; its status (``None``: the proxy closed the
        connection first). Call after :meth:`wait_connected`."""
        pending = list(getattr(self, "_early", []))
        self._early = []

        async def replay() -> Any:
            for event in pending:
                yield event
            async for event in self.events():
                yield event

        async for event in replay():
            if isinstance(event, StreamData):
                (on_stdout if event.stream == Stream.STDOUT else on_stderr)(event.data)
            elif isinstance(event, ProcessExited):
                return event.status
        return None

    async def disconnect(self) -> None:
        """DisconnectShim (the proxy closes the connection), then close our side."""
        try:
            await self._send(self.conn.send_command(Command.DISCONNECT_SHIM))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
        await self.stream.aclose()

    async def aclose(self) -> None:
        await self.stream.aclose()


class ShimError(Exception):
    """The proxy refused the shim or closed its connection."""
