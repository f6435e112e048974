"""One client connection: an asyncio protocol on the event loop's own transport.

Cost model (the hot path): the transport calls :meth:`RPCConnection.data_received` with the
bytes of one read; the lines are framed, parsed and dispatched right there. A call whose handler
never suspends (:attr:`hyperd.rpc.Method.synchronous`, e.g. ``async def version(...): return
...``) is answered inside that callback: no task, no lock, one ``transport.write``. A plain
handler that returns a :class:`~hyperd.rpc.pending.Pending` is started there too and answered
from its future's done callback (counted in flight until then; its future is cancelled if the
connection closes). Other calls (and batches) run in one plain asyncio task each, created with
``loop.create_task`` (no task group); their response is written by the task itself when it
completes, so responses go out in completion order. The transport buffers writes and
serializes them (no write lock).

Flow control (what bounds the memory one connection can make hyperd hold):

- a batch of more than ``max_batch`` calls is refused whole with one error (id null), so the
  answer to one line is at most ``max_batch`` responses;
- at most ``max_in_flight`` calls (each element of a batch counts) are running or waiting to be
  written; then the transport stops reading (``pause_reading``) until one completes. A batch is
  admitted while fewer than ``max_in_flight`` calls run, so at most ``max_in_flight + max_batch
  - 1`` are in flight. Lines of a read already framed wait in the framer (one read's worth);
- the transport buffers up to ``max_output`` bytes for a client that does not read
  (``pause_writing`` past it); then reading stops too, until the client has read enough for
  the transport to resume writing. What is to be written meanwhile queues here in order: a
  response keeps its calls' slots until it is handed to the transport; an error answer to a
  bad line stops reading until it is written; notifications are bounded by ``notify_queue``:
  one more closes the connection (the subscriber is dropped).

So a client that sends and never reads makes hyperd hold at most about ``max_output`` bytes
plus the responses of ``max_in_flight + max_batch`` calls, plus ``max_message`` of input.

Why not anyio streams: a read through anyio's unix socket stream adds and removes the reader
(two ``epoll_ctl``) each time and a task switch per message, and cancelling a task blocked in
such a read just as the socket turns readable raises ``InvalidStateError`` in a loop callback.
A protocol has no blocked reader to cancel: :meth:`close` aborts the transport.

Synchronous handlers run with a *host task* entered as the loop's current task (the server
passes a placeholder task that only waits), because anyio looks up ``asyncio.current_task()``
even in code that does not await (cancel scopes, locks' ``*_nowait``). Such a handler must not
rely on the identity of its task; it shares the callback's context (contextvars) with the other
synchronous calls of its connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, cast

import anyio
from msgspec import UNSET

from hyperd.rpc.access import PeerCredentials
from hyperd.rpc.methods import NEEDS_TASK, CallContext, MethodTable
from hyperd.rpc.pending import Pending
from protocol.jsonrpc import (
    INVALID_REQUEST,
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
    parse_incoming,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_IN_FLIGHT: Final = 64  # calls (each element of a batch counts) running per connection
DEFAULT_MAX_BATCH: Final = 256  # calls per batch: bounds the answer to one line
DEFAULT_MAX_OUTPUT: Final = 256 * 1024  # bytes buffered for a client before reading it pauses
DEFAULT_NOTIFY_QUEUE: Final = 1024  # notifications queued per connection before it is dropped
BATCH_CONCURRENCY: Final = 16  # calls of one batch running at once

# kinds of queued output: a response is queued with the number of slots it holds (>= 1)
_RESPONSE: Final = 1  # answers one call: holds its in-flight slot until written
_NOTIFICATION: Final = 0  # counted against notify_queue
_ERROR: Final = -1  # answers a bad line: reading waits until it is written

_current_task = asyncio.current_task
# asyncio internals (CPython 3.11-3.13): they make the host task current without a task switch.
# Measured worth it (python -m hyperd.rpc.bench, one CPU): a synchronous call answers in 19 us
# this way, 32 us in a task of its own. Where they are missing, every call runs in a task.
_enter_task: Callable[[asyncio.AbstractEventLoop, asyncio.Task[Any]], None] | None = getattr(
    asyncio.tasks, "_enter_task", None
)
_leave_task: Callable[[asyncio.AbstractEventLoop, asyncio.Task[Any]], None] | None = getattr(
    asyncio.tasks, "_leave_task", None
)


@dataclass(frozen=True, slots=True)
class ConnectionStatistics:
    """A snapshot of one connection."""

    in_flight: int
    notifications_queued: int
    calls_started: int
    batches_refused: int = 0
    output_buffered: int = 0  # bytes the transport holds for the client, or queued here
    reading_paused: bool = False  # backpressure: requests are not being read


class RPCConnection(asyncio.Protocol):
    """Serves one accepted client until EOF, an I/O error, :meth:`close` or overflow.

    Created by :class:`hyperd.rpc.RPCServer` as the protocol of an accepted socket. Each
    request, notification or batch is answered as soon as it completes (so out of order); at
    most ``max_in_flight`` run at once, after which reading pauses (backpressure on the client);
    reading also pauses while more than ``max_output`` bytes wait for the client to read them.
    Invalid messages and oversized lines are answered with an error (id null when unknown) and
    reading continues. At EOF the calls still running finish and are answered before the
    connection closes (a client may half-close). ``on_finished(connection)`` is called once
    the connection is closed and none of its calls is running.
    """

    def __init__(
        self,
        methods: MethodTable,
        peer: PeerCredentials,
        *,
        connection_id: int,
        max_message: int = MAX_MESSAGE,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_output: int = DEFAULT_MAX_OUTPUT,
        notify_queue: int = DEFAULT_NOTIFY_QUEUE,
        host_task: asyncio.Task[Any] | None = None,
        on_finished: Callable[[RPCConnection], object] | None = None,
    ) -> None:
        """``host_task``: the current task of synchronous handlers (``None``: every call runs
        in a task of its own)."""
        self.connection_id = connection_id
        self.peer = peer
        self._methods = methods
        self._framer = LineFramer(max_message)
        self._max_in_flight = max_in_flight
        self._max_batch = max_batch
        self._max_output = max_output
        self._notify_queue = notify_queue
        # (no host task without asyncio's _enter_task/_leave_task: every call runs in a task)
        self._host = host_task if _enter_task is not None and _leave_task is not None else None
        self._on_finished = on_finished
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._in_flight = 0  # calls running or whose response is queued in _pending
        self._tasks: set[asyncio.Task[None]] = set()
        self._waits: set[Pending[Response | None]] = set()  # calls waiting on a Pending, no task
        self._unstarted = 0  # tasks whose first step has not run yet
        self._pending: deque[tuple[bytes, int]] = deque()  # (data, kind) while writing is paused
        self._queued_notes = 0  # _NOTIFICATION items in _pending
        self._queued_errors = 0  # _ERROR items in _pending
        self._write_paused = False
        self._read_paused = False  # we paused the transport's reading
        self._processing = False  # inside _process (no re-entry)
        self._eof = False  # the client half-closed (or closed)
        self._stopping = False  # no more requests are read
        self._closing = False  # nothing more is written (closing gracefully, or aborted)
        self._aborted = False  # close() was called: transport aborted, calls cancelled
        self._lost = False  # the transport is gone
        self._closed = False  # lost, and no call running: on_close callbacks have run
        self._closed_event = asyncio.Event()
        self._close_callbacks: list[Callable[[], object]] = []
        self._calls_started = 0
        self._batches_refused = 0

    def __repr__(self) -> str:
        return f"<RPCConnection {self.connection_id} pid={self.peer.pid} uid={self.peer.uid}>"

    # --- lifecycle -------------------------------------------------------------------------

    def stop_reading(self) -> None:
        """Take no more requests; close once the calls running have been answered."""
        if not self._stopping:
            self._stopping = True
            self._pause_reading()
            self._maybe_finish()

    def close(self) -> None:
        """Close now: stop reading and writing, cancel the calls running."""
        if self._aborted:
            return
        self._stopping = self._closing = self._aborted = True
        for _data, kind in self._pending:
            if kind > 0:
                self._in_flight -= kind
        self._pending.clear()
        self._queued_notes = self._queued_errors = 0
        for task in self._tasks:
            task.cancel()
        for pending in self._waits:
            pending.future.cancel()  # its done callback frees the call's slot
        if self._transport is not None and not self._lost:
            self._transport.abort()  # connection_lost follows in a later loop iteration
        self._maybe_closed()

    def _maybe_finish(self) -> None:
        """Once stopping (EOF, shutdown) and every call has been answered: close gracefully."""
        if (
            self._stopping
            and not self._closing
            and self._in_flight == 0
            and not self._tasks
            and not self._waits
            and not self._queued_errors
            and self._transport is not None
        ):
            self._closing = True
            self._pending.clear()  # only notifications can be left: nobody waits for them
            self._queued_notes = self._queued_errors = 0
            if not self._lost:
                self._transport.close()  # flushes what the transport holds, then closes
            self._maybe_closed()

    def _maybe_closed(self) -> None:
        if self._closed or not self._lost or self._tasks or self._waits:
            return
        self._closed = True
        self._closed_event.set()
        callbacks, self._close_callbacks = self._close_callbacks, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                log.exception("on_close callback of %r failed", self)
        if self._on_finished is not None:
            self._on_finished(self)

    # --- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self._transport = cast(asyncio.Transport, transport)
        self._transport.set_write_buffer_limits(high=self._max_output)
        if self._stopping:
            self._pause_reading()
            self._maybe_finish()

    def data_received(self, data: bytes) -> None:
        if self._stopping:
            return
        self._framer.feed(data)
        self._process()

    def eof_received(self) -> bool:
        self._eof = True
        self._process()
        return True  # keep writing: the calls running are still answered

    def pause_writing(self) -> None:
        # the client does not read what it asked for: take no more requests from it
        self._write_paused = True
        self._pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        transport = self._transport
        pending = self._pending
        if transport is None or self._lost:
            return
        while pending and not self._write_paused:
            data, kind = pending.popleft()
            transport.write(data)  # may call pause_writing() again
            if kind > 0:
                self._in_flight -= kind
            elif kind == _NOTIFICATION:
                self._queued_notes -= 1
            else:
                self._queued_errors -= 1
        self._unblock()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if exc is not None:
            log.debug("%r: connection lost: %r", self, exc)
        self.close()  # a write failed, or the client reset: nobody reads the answers
        self._maybe_closed()

    # --- Channel (what handlers see through CallContext) --------------------------------------

    def notify(self, method: str, params: Any = UNSET) -> bool:
        """See :meth:`CallContext.notify`."""
        if self._closing or self._transport is None:
            return False
        data = encode_message(Notification(method=method, params=params))
        if self._write_paused or self._pending:
            if self._queued_notes >= self._notify_queue:
                log.warning(
                    "%r: notification queue full (%d queued): dropping the subscriber",
                    self,
                    self._queued_notes,
                )
                self.close()
                return False
            self._pending.append((data, _NOTIFICATION))
            self._queued_notes += 1
        else:
            self._transport.write(data)
        return True

    def on_close(self, callback: Callable[[], object]) -> None:
        """See :meth:`CallContext.on_close`."""
        if self._closed:
            callback()
        else:
            self._close_callbacks.append(callback)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def connected(self) -> bool:
        """Whether the transport has been attached (``connection_made``)."""
        return self._transport is not None

    async def wait_closed(self) -> None:
        await self._closed_event.wait()

    def socket_fd(self) -> int | None:
        """The client socket's fd while the connection is open (see
        :meth:`CallContext.wait_hangup`); ``None`` once it is closing."""
        if self._transport is None or self._lost or self._aborted:
            return None
        sock = self._transport.get_extra_info("socket")
        return None if sock is None else int(sock.fileno())

    def statistics(self) -> ConnectionStatistics:
        """In-flight calls, queued notifications, calls started so far."""
        transport = self._transport
        buffered = transport.get_write_buffer_size() if transport and not self._lost else 0
        return ConnectionStatistics(
            in_flight=self._in_flight,
            notifications_queued=self._queued_notes,
            calls_started=self._calls_started,
            batches_refused=self._batches_refused,
            output_buffered=buffered + sum(len(data) for data, _kind in self._pending),
            reading_paused=self._read_paused and not self._stopping,
        )

    # --- reading -----------------------------------------------------------------------------

    def _pause_reading(self) -> None:
        """Stop dispatching framed lines, and the transport's reading (unless it has ended)."""
        if not self._read_paused:
            self._read_paused = True
            if not self._eof and not self._lost and self._transport is not None:
                self._transport.pause_reading()

    def _unblock(self) -> None:
        """A slot was freed or an error answer written: go on with framed lines, then reading."""
        if self._processing:
            return  # the loop running in _process sees the room itself
        if not self._read_paused or self._stopping:
            self._maybe_finish()
            return
        self._process()
        if (
            self._read_paused
            and not self._stopping
            and self._in_flight < self._max_in_flight
            and not self._queued_errors
            and not self._write_paused
        ):
            self._read_paused = False
            if not self._eof and not self._lost and self._transport is not None:
                self._transport.resume_reading()
        self._maybe_finish()

    def _process(self) -> None:
        """Dispatch the framed lines while there is room; at EOF, the unterminated last one."""
        if self._processing:
            return
        self._processing = True
        try:
            framer = self._framer
            while not self._stopping:
                if (
                    self._in_flight >= self._max_in_flight
                    or self._queued_errors
                    or self._write_paused
                ):
                    self._pause_reading()
                    return
                try:
                    line = framer.next_line()
                except MessageTooLarge as err:
                    log.warning("%r: %s", self, err)
                    self._write(encode_message(Response(id=None, error=err.error_object())), _ERROR)
                    continue
                if line is None:
                    if not self._eof:
                        return
                    self._stopping = True  # nothing more will come
                    line = framer.end_of_input()
                    if line is None:
                        break
                self._handle_line(line)
        except Exception:
            # a bug here must not leave the connection half-working
            log.exception("%r failed", self)
            self.close()
        finally:
            self._processing = False
        self._maybe_finish()

    def _handle_line(self, line: bytes) -> None:
        parsed = parse_incoming(line)
        if isinstance(parsed, (Request, Notification)):
            self._in_flight += 1
            self._calls_started += 1
            ctx = CallContext(self, parsed.method, parsed.id if type(parsed) is Request else UNSET)
            if (
                self._host is not None
                and not self._unstarted
                and not self._methods.runs_in_task(parsed.method)
            ):
                # (calls start in the order they were read: none may overtake a task's start)
                response = self._dispatch_now(parsed, ctx)
                if type(response) is Pending:
                    self._waits.add(response)
                    response.future.add_done_callback(partial(self._pending_done, response))
                    return
                if response is not NEEDS_TASK:
                    self._complete(encode_message(response) if response is not None else None)
                    return
            self._start(self._run_call(parsed, ctx))
        elif isinstance(parsed, list):
            calls = len(parsed)
            if calls > self._max_batch:
                self._refuse_batch(calls)
                return
            self._in_flight += calls
            self._calls_started += calls
            self._start(self._run_batch(parsed))
        elif isinstance(parsed, InvalidMessage):
            log.info("%r: %s", self, parsed.error.message)
            self._write(encode_message(parsed.response()), _ERROR)
        else:
            log.debug("%r: ignoring a response from the client (id %r)", self, parsed.id)

    def _refuse_batch(self, calls: int) -> None:
        self._batches_refused += 1
        log.warning("%r: refused a batch of %d calls (max_batch %d)", self, calls, self._max_batch)
        error = ErrorObject(
            code=INVALID_REQUEST,
            message=(
                f"Invalid Request: batch of {calls} calls, more than the "
                f"{self._max_batch} allowed; split it"
            ),
            data={"kind": "batch_too_large", "calls": calls, "max_batch": self._max_batch},
        )
        self._write(encode_message(Response(id=None, error=error)), _ERROR)

    def _dispatch_now(self, msg: Request | Notification, ctx: CallContext) -> Any:
        """``dispatch_now`` with the host task as the current task (when there is none)."""
        loop, host = self._loop, self._host
        enter, leave = _enter_task, _leave_task
        if host is None or enter is None or leave is None or _current_task(loop) is not None:
            return self._methods.dispatch_now(msg, ctx)
        enter(loop, host)
        try:
            return self._methods.dispatch_now(msg, ctx)
        finally:
            leave(loop, host)

    def _pending_done(self, pending: Pending[Response | None], future: asyncio.Future[Any]) -> None:
        """The future of a call answered by a :class:`Pending` is done: write its answer."""
        self._waits.discard(pending)
        if future.cancelled():  # the connection closed (or the call was cancelled otherwise)
            self._in_flight -= 1
            if self._closing:
                self._maybe_closed()
            else:
                self._unblock()
            return
        try:
            response = pending.then(future)  # (plain code: no task is current)
            data = encode_message(response) if response is not None else None
        except Exception:
            self._broken()  # then() never raises by contract
            return
        self._complete(data)

    def _broken(self, calls: int = _RESPONSE) -> None:
        """``calls`` calls ended in an exception where the method table promises none: a bug,
        which ends this connection only."""
        log.exception("%r failed", self)
        self._in_flight -= calls
        self.close()

    # --- calls ---------------------------------------------------------------------------------

    def _start(self, coro: Any) -> None:
        self._unstarted += 1
        task: asyncio.Task[None] = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._closing:
            self._maybe_closed()
        else:
            self._maybe_finish()

    def _complete(self, data: bytes | None, calls: int = _RESPONSE) -> None:
        """``calls`` calls are done: write their answer (``None``: nothing to answer), free
        their slots."""
        if data is not None and self._write(data, calls):
            return  # queued: the slots are freed when it is written
        self._in_flight -= calls
        self._unblock()

    async def _run_call(self, msg: Request | Notification, ctx: CallContext) -> None:
        self._unstarted -= 1
        try:
            response = await self._methods.dispatch(msg, ctx)
            data = encode_message(response) if response is not None else None
        except Exception:
            self._broken()  # dispatch never raises by contract
            return
        except BaseException:
            self._in_flight -= 1
            raise
        self._complete(data)

    async def _run_batch(self, items: list[Parsed]) -> None:
        """Answer a batch as one array once every element is done; elements run concurrently
        (at most ``BATCH_CONCURRENCY`` in tasks). Elements start in order: those that cannot
        suspend are answered at once until the first that needs a task."""
        self._unstarted -= 1
        calls = len(items)
        try:
            answers: list[Response | None] = [None] * len(items)
            deferred: list[tuple[int, Request | Notification, CallContext]] = []
            waits: list[tuple[int, Pending[Response | None]]] = []
            for index, item in enumerate(items):
                if isinstance(item, InvalidMessage):
                    answers[index] = item.response()
                elif isinstance(item, (Request, Notification)):
                    request_id = item.id if isinstance(item, Request) else UNSET
                    ctx = CallContext(self, item.method, request_id)
                    answer = NEEDS_TASK if deferred else self._methods.dispatch_now(item, ctx)
                    if answer is None or isinstance(answer, Response):
                        answers[index] = answer
                    elif isinstance(answer, Pending):
                        waits.append((index, answer))
                    else:
                        deferred.append((index, item, ctx))
            if deferred:
                await self._run_deferred(deferred, answers)
            for index, pending in waits:
                answers[index] = await pending
            responses = [r for r in answers if r is not None]
            # a batch of notifications only is not answered at all
            data = encode_message(responses) if responses else None
        except Exception:
            self._broken(calls)
            return
        except BaseException:
            self._in_flight -= calls
            raise
        self._complete(data, calls)

    async def _run_deferred(
        self,
        calls: list[tuple[int, Request | Notification, CallContext]],
        answers: list[Response | None],
    ) -> None:
        limiter = anyio.CapacityLimiter(BATCH_CONCURRENCY)

        async def answer(index: int, msg: Request | Notification, ctx: CallContext) -> None:
            async with limiter:
                answers[index] = await self._methods.dispatch(msg, ctx)

        async with anyio.create_task_group() as tg:
            for call in calls:
                tg.start_soon(answer, *call)

    # --- writing -------------------------------------------------------------------------------

    def _write(self, data: bytes, kind: int) -> bool:
        """Hand ``data`` to the transport, or queue it (in order) while writing is paused.

        Returns True when it was queued: a queued response keeps its slot until written. Once
        the connection is closing, ``data`` is dropped.
        """
        if self._closing or self._transport is None:
            return False
        if self._write_paused or self._pending:
            self._pending.append((data, kind))
            if kind == _ERROR:
                self._queued_errors += 1
            return True
        self._transport.write(data)
        return False
