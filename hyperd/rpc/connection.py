"""One client connection: reads lines, dispatches calls concurrently, serializes writes."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import anyio
from anyio.abc import SocketAttribute, SocketStream, TaskGroup, TaskStatus
from msgspec import UNSET

from hyperd.rpc.access import PeerCredentials
from hyperd.rpc.methods import CallContext, MethodTable
from protocol.jsonrpc import (
    MAX_MESSAGE,
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

READ_SIZE: Final = 65536  # one receive; bounds the complete lines the framer holds at once
DEFAULT_MAX_IN_FLIGHT: Final = 64  # calls (a batch counts once) running per connection
DEFAULT_NOTIFY_QUEUE: Final = 1024  # notifications queued per connection before it is dropped
BATCH_CONCURRENCY: Final = 16  # calls of one batch running at once

_SEND_ERRORS: Final = (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


@dataclass(frozen=True, slots=True)
class ConnectionStatistics:
    """A snapshot of one connection."""

    in_flight: int
    notifications_queued: int
    calls_started: int


class RPCConnection:
    """Serves one accepted client until EOF, an I/O error, :meth:`close` or overflow.

    Each request, notification or batch runs in its own task (responses go out as they
    complete, so out of order); at most ``max_in_flight`` run at once, after which the reader
    stops reading (backpressure on the client). Invalid messages and oversized lines are
    answered with an error (id null when unknown) and reading continues. At EOF the calls still
    running finish and are answered before the connection closes (a client may half-close).
    """

    def __init__(
        self,
        stream: SocketStream,
        methods: MethodTable,
        peer: PeerCredentials,
        *,
        connection_id: int,
        max_message: int = MAX_MESSAGE,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        notify_queue: int = DEFAULT_NOTIFY_QUEUE,
    ) -> None:
        self.connection_id = connection_id
        self.peer = peer
        self._stream = stream
        self._methods = methods
        self._framer = LineFramer(max_message)
        self._slots = anyio.Semaphore(max_in_flight)
        self._max_in_flight = max_in_flight
        self._write_lock = anyio.Lock()
        self._notify_send, self._notify_receive = anyio.create_memory_object_stream[bytes](
            notify_queue
        )
        self._calls_scope: anyio.CancelScope | None = None
        self._reading_done = anyio.Event()
        self._calls_done = anyio.Event()
        self._stopping = False  # no more requests are read
        self._closing = False  # close() was called
        self._closed = False
        self._closed_event = anyio.Event()
        self._close_callbacks: list[Callable[[], object]] = []
        self._calls_started = 0

    def __repr__(self) -> str:
        return f"<RPCConnection {self.connection_id} pid={self.peer.pid} uid={self.peer.uid}>"

    # --- lifecycle -------------------------------------------------------------------------
    #
    # A task blocked in receive()/send() on an anyio unix stream is never cancelled here: on
    # asyncio, cancelling one in the loop iteration where the socket turns ready makes the loop
    # call set_result on a cancelled future (InvalidStateError, logged as a loop error). Instead,
    # shutdown(2) on the socket wakes such a task (EOF, or EPIPE on send), and only tasks waiting
    # on memory streams, locks or handler code are cancelled.

    async def run(self) -> None:
        """Serve until the connection ends; then close the stream and run on_close callbacks."""
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._write_notifications)
                calls: TaskGroup = await tg.start(self._host_calls)
                try:
                    await self._read_loop(calls)  # not inside the calls' cancel scope
                finally:
                    self._reading_done.set()
                await self._calls_done.wait()
                self._shutdown_socket(socket.SHUT_RDWR)  # wakes a notification write
                tg.cancel_scope.cancel()
        finally:
            self._closed = True
            self._notify_send.close()
            self._notify_receive.close()
            with anyio.CancelScope(shield=True):
                await self._stream.aclose()
            self._closed_event.set()
            self._run_close_callbacks()

    async def _host_calls(self, *, task_status: TaskStatus[TaskGroup]) -> None:
        """Owns the calls' task group, so close() can cancel the calls but not the reader."""
        try:
            async with anyio.create_task_group() as calls:
                self._calls_scope = calls.cancel_scope
                if self._closing:
                    calls.cancel_scope.cancel()
                task_status.started(calls)
                await self._reading_done.wait()
        finally:
            self._calls_done.set()

    def stop_reading(self) -> None:
        """Take no more requests; close once the calls running have been answered."""
        if not self._stopping:
            self._stopping = True
            self._shutdown_socket(socket.SHUT_RD)

    def close(self) -> None:
        """Close now: stop reading and writing, cancel the calls running."""
        self._stopping = self._closing = True
        self._shutdown_socket(socket.SHUT_RDWR)
        if self._calls_scope is not None:
            self._calls_scope.cancel()

    def _shutdown_socket(self, how: int) -> None:
        try:
            self._stream.extra(SocketAttribute.raw_socket).shutdown(how)
        except OSError:
            pass  # the peer is gone already, or the socket is closed

    def _run_close_callbacks(self) -> None:
        callbacks, self._close_callbacks = self._close_callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("on_close callback of %r failed", self)

    # --- Channel (what handlers see through CallContext) --------------------------------------

    def notify(self, method: str, params: Any = UNSET) -> bool:
        """See :meth:`CallContext.notify`."""
        if self._closed:
            return False
        data = encode_message(Notification(method=method, params=params))
        try:
            self._notify_send.send_nowait(data)
        except anyio.WouldBlock:
            log.warning(
                "%r: notification queue full (%d queued): dropping the subscriber",
                self,
                self._notify_send.statistics().current_buffer_used,
            )
            self.close()
            return False
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return False
        return True

    def on_close(self, callback: Callable[[], object]) -> None:
        """See :meth:`CallContext.on_close`."""
        if self._closed_event.is_set():
            callback()
        else:
            self._close_callbacks.append(callback)

    @property
    def closed(self) -> bool:
        return self._closed

    async def wait_closed(self) -> None:
        await self._closed_event.wait()

    def statistics(self) -> ConnectionStatistics:
        """In-flight calls, queued notifications, calls started so far."""
        return ConnectionStatistics(
            in_flight=self._max_in_flight - self._slots.value,
            notifications_queued=self._notify_send.statistics().current_buffer_used,
            calls_started=self._calls_started,
        )

    # --- reading -----------------------------------------------------------------------------

    async def _read_loop(self, calls: TaskGroup) -> None:
        while not self._stopping:
            try:
                data = await self._stream.receive(READ_SIZE)
            except anyio.EndOfStream:
                last = self._framer.end_of_input()
                if last is not None and not self._stopping:
                    await self._handle_line(last, calls)
                return
            except _SEND_ERRORS as err:
                log.debug("%r: receive failed: %r", self, err)
                self.close()
                return
            self._framer.feed(data)
            while not self._stopping:
                try:
                    line = self._framer.next_line()
                except MessageTooLarge as err:
                    log.warning("%r: %s", self, err)
                    await self._send(encode_message(Response(id=None, error=err.error_object())))
                    continue
                if line is None:
                    break
                await self._handle_line(line, calls)

    async def _handle_line(self, line: bytes, calls: TaskGroup) -> None:
        parsed = parse_message(line)
        if isinstance(parsed, InvalidMessage):
            log.info("%r: %s", self, parsed.error.message)
            await self._send(encode_message(parsed.response()))
        elif isinstance(parsed, Response):
            log.debug("%r: ignoring a response from the client (id %r)", self, parsed.id)
        else:
            await self._slots.acquire()
            if self._stopping:
                self._slots.release()
                return
            self._calls_started += 1
            if isinstance(parsed, list):
                calls.start_soon(self._run_batch, parsed)
            else:
                calls.start_soon(self._run_one, parsed)

    # --- calls ---------------------------------------------------------------------------------

    async def _answer(self, item: Parsed) -> Response | None:
        if isinstance(item, InvalidMessage):
            return item.response()
        if isinstance(item, Response):
            return None
        request_id = item.id if isinstance(item, Request) else UNSET
        return await self._methods.dispatch(item, CallContext(self, item.method, request_id))

    async def _run_one(self, msg: Request | Notification) -> None:
        try:
            response = await self._answer(msg)
            if response is not None:
                await self._send(encode_message(response))
        finally:
            self._slots.release()

    async def _run_batch(self, items: list[Parsed]) -> None:
        try:
            answers: list[Response | None] = [None] * len(items)
            limiter = anyio.CapacityLimiter(BATCH_CONCURRENCY)

            async def answer(index: int) -> None:
                async with limiter:
                    answers[index] = await self._answer(items[index])

            async with anyio.create_task_group() as tg:
                for index in range(len(items)):
                    tg.start_soon(answer, index)
            responses = [r for r in answers if r is not None]
            if responses:  # a batch of notifications only is not answered at all
                await self._send(encode_message(responses))
        finally:
            self._slots.release()

    # --- writing -------------------------------------------------------------------------------

    async def _send(self, data: bytes) -> None:
        """Write one message; writes never interleave. A failed write closes the connection.

        The write itself is shielded (see the lifecycle note): close() wakes it with EPIPE.
        """
        async with self._write_lock:
            with anyio.CancelScope(shield=True):
                try:
                    await self._stream.send(data)
                except _SEND_ERRORS as err:
                    log.debug("%r: send failed: %r", self, err)
                    self.close()

    async def _write_notifications(self) -> None:
        async for data in self._notify_receive:
            await self._send(data)
