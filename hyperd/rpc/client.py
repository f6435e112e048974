"""A small JSON-RPC client for the daemon's socket (used by hyperctl, shims and tests)."""

from __future__ import annotations

import itertools
import logging
import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import anyio
from anyio.abc import ByteStream, SocketAttribute
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from msgspec import UNSET

from protocol.jsonrpc import (
    MAX_MESSAGE,
    ErrorObject,
    InvalidMessage,
    LineFramer,
    MessageTooLarge,
    Notification,
    Parsed,
    Request,
    Response,
    encode_message,
    parse_message,
)

log = logging.getLogger(__name__)

CLIENT_NOTIFICATION_BUFFER: Final = 256  # server notifications held for receive_notification()
_READ_SIZE: Final = 65536


class RemoteError(Exception):
    """The server answered a call with an error object."""

    def __init__(self, error: ErrorObject) -> None:
        super().__init__(f"{error.message} (code {error.code})")
        self.code = error.code
        self.message = error.message
        self.data: Any = None if error.data is UNSET else error.data

    @property
    def kind(self) -> str | None:
        """``error.data.kind`` when the server sent one (hyperd always does)."""
        if isinstance(self.data, dict):
            kind = self.data.get("kind")
            return kind if isinstance(kind, str) else None
        return None


class RPCConnectionClosed(ConnectionError):
    """The connection to the server ended before the answer arrived."""


class RPCClient:
    """Calls over one connection; many calls may be outstanding at once.

    One reader task matches responses to calls by id and queues server notifications
    (``receive_notification()``; when the queue is full the reader waits, which also delays
    responses: consume them). An error response with id null that matches no call (e.g. the
    server refused us) fails every outstanding call with :class:`RemoteError` and is kept as
    ``unsolicited_error``.
    """

    def __init__(self, stream: ByteStream, *, max_message: int = MAX_MESSAGE) -> None:
        self._stream = stream
        self._framer = LineFramer(max_message)
        self._ids = itertools.count(1)
        self._pending: dict[int, MemoryObjectSendStream[Response]] = {}
        self._write_lock = anyio.Lock()
        self._notes_send: MemoryObjectSendStream[Notification]
        self._notes_receive: MemoryObjectReceiveStream[Notification]
        self._notes_send, self._notes_receive = anyio.create_memory_object_stream[Notification](
            CLIENT_NOTIFICATION_BUFFER
        )
        self._closed = False
        self.unsolicited_error: RemoteError | None = None

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, path: str | os.PathLike[str], *, max_message: int = MAX_MESSAGE
    ) -> AsyncIterator[RPCClient]:
        """Connect to the unix socket at ``path``; the client lives as long as the block."""
        stream = await anyio.connect_unix(os.fspath(path))
        async with stream, anyio.create_task_group() as tg:
            client = cls(stream, max_message=max_message)
            tg.start_soon(client._read_loop)
            try:
                yield client
            finally:
                # End the reader without cancelling its receive() (see hyperd.rpc.connection):
                # shutdown(2) gives it EOF; closing the queue unblocks a full notification queue.
                client._notes_receive.close()
                try:
                    stream.extra(SocketAttribute.raw_socket).shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    async def call(self, method: str, params: Any = UNSET) -> Any:
        """Call ``method`` and return its result; raises :class:`RemoteError` or
        :class:`RPCConnectionClosed`."""
        request_id = next(self._ids)
        send, receive = anyio.create_memory_object_stream[Response](1)
        self._pending[request_id] = send
        try:
            with send, receive:
                await self._write(
                    encode_message(Request(method=method, params=params, id=request_id))
                )
                try:
                    response = await receive.receive()
                except anyio.EndOfStream:
                    raise RPCConnectionClosed(f"connection closed during {method}") from None
        finally:
            self._pending.pop(request_id, None)
        if isinstance(response.error, ErrorObject):
            raise RemoteError(response.error)
        return response.result

    async def notify(self, method: str, params: Any = UNSET) -> None:
        """Send a notification (no answer)."""
        await self._write(encode_message(Notification(method=method, params=params)))

    async def send_raw(self, data: bytes) -> None:
        """Write raw bytes (tests and tools that craft their own messages)."""
        await self._write(data)

    async def receive_notification(self) -> Notification:
        """The next notification the server pushed; raises ``anyio.EndOfStream`` once closed."""
        return await self._notes_receive.receive()

    async def _write(self, data: bytes) -> None:
        if self._closed:
            raise RPCConnectionClosed("connection closed")
        async with self._write_lock:
            try:
                await self._stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as err:
                raise RPCConnectionClosed(f"cannot send: {err}") from err

    async def _read_loop(self) -> None:
        try:
            while True:
                try:
                    data = await self._stream.receive(_READ_SIZE)
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError):
                    return
                self._framer.feed(data)
                while True:
                    try:
                        line = self._framer.next_line()
                    except MessageTooLarge as err:
                        log.warning("dropped a message from the server: %s", err)
                        continue
                    if line is None:
                        break
                    parsed = parse_message(line)
                    for item in parsed if isinstance(parsed, list) else [parsed]:
                        await self._dispatch(item)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return  # the notification queue was closed: the client is going away
        finally:
            self._closed = True
            self._notes_send.close()
            for send in self._pending.values():
                send.close()

    async def _dispatch(self, item: Parsed) -> None:
        if isinstance(item, Notification):
            await self._notes_send.send(item)
        elif isinstance(item, Response):
            send = self._pending.get(item.id) if isinstance(item.id, int) else None
            if send is not None:
                _deliver(send, item)
            elif isinstance(item.error, ErrorObject):
                self.unsolicited_error = RemoteError(item.error)
                log.warning("error from the server: %s", self.unsolicited_error)
                for pending in self._pending.values():
                    _deliver(pending, item)
        elif isinstance(item, InvalidMessage):
            log.warning("invalid message from the server: %s", item.error.message)
        else:
            log.warning("ignoring a call from the server: %s", item.method)


def _deliver(send: MemoryObjectSendStream[Response], response: Response) -> None:
    try:
        send.send_nowait(response)
    except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass  # the call already has its answer, or its caller gave up
