"""One persistent connection to a cc-proxy: a pipelined FIFO command queue.

The proxy answers the commands of one connection strictly in order and its responses carry no
request id (ccproxy spec §4). :class:`VMConnection` therefore keeps one FIFO of *slots*, one per
command written, and hands each response to the oldest slot. A caller that gives up (deadline or
cancellation) leaves its slot in place; the reply that eventually arrives for it is discarded, so
no reply ever reaches the wrong caller.

Cost model (the hot path): a command costs one payload encode (none for a data-less Hyper
command: :class:`~hyperd.vm.session.VMSession` caches those), one future and one heap push
(deadlines are served by one timer per connection, not a cancel scope per command); no task is
created per command, and a success reply builds no event object (``ClientConnection.next_payload``).
A command sent while no other reply is owed (one caller at a time) is written at once. Otherwise
frames are appended to an output buffer and flushed by a loop callback scheduled once per
event-loop iteration, so the frames of every caller that enqueued in the same iteration go out in
one transport write, whole frames only (the reference proxy reads a header with a single
``read()``). When replies arrive, that callback is scheduled right after the woken callers, so
the commands they send next are written in the same loop iteration instead of the next one (on a
loaded pipeline each reply wakes the client: this saves a poll and an iteration per command).
Statistics cost integer increments only (``last_rtt`` is subtracted when read).

The byte driver is an asyncio protocol on the event loop's own transport (C in uvloop): its
``data_received`` is the one reader -- it feeds the sans-IO ``ClientConnection`` and resolves the
callers' futures directly, without a task switch -- and the transport serializes and buffers
writes. This replaced a reader task over anyio's raw-socket stream: cancelling a task blocked in
that stream's ``receive()`` while the socket turns readable makes asyncio log (and anyio's test
runner raise) ``InvalidStateError``, and the callback path is faster. :meth:`VMConnection.run`
still owns the connection's lifetime in the caller's task group.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
from collections import deque
from collections.abc import Callable
from time import monotonic
from typing import Final, cast

import anyio
import msgspec

from hyperd.errors import (
    AgentError,
    ConnectionLost,
    InvalidParams,
    ProxyError,
    Timeout,
    VMUnavailable,
)
from hyperd.vm.types import ConnectionStatistics
from protocol import NEED_DATA, LocalProtocolError, RemoteProtocolError
from protocol.ccproxy import (
    ClientConnection,
    Command,
    ErrorReply,
    ProcessExitNotice,
    Response,
    VMProcessExited,
)

log = logging.getLogger(__name__)

COMPACT_FACTOR: Final = 2
COMPACT_SLACK: Final = 64
"""The deadline heap is compacted when it holds more than FACTOR x live slots + SLACK entries."""

AGENT_ERROR_PREFIX: Final = "ERROR received from VM agent"
"""How the proxy words an agent's ERROR reply (ccproxy spec §9); anything else is the proxy's."""

VM_GONE: Final = "No multicast available for CTL channel"
"""The proxy's answer when the VM's agent channel is gone (ccproxy spec §9): the VM is lost."""

COMMAND_LABELS: Final[dict[Command, str]] = {
    Command.REGISTER_VM: "RegisterVM",
    Command.UNREGISTER_VM: "UnregisterVM",
    Command.ATTACH_VM: "AttachVM",
    Command.HYPER: "Hyper",
    Command.CONNECT_SHIM: "ConnectShim",
    Command.DISCONNECT_SHIM: "DisconnectShim",
    Command.SIGNAL: "Signal",
}


_DISCONNECT_SHIM: Final = Command.DISCONNECT_SHIM
"""As a module constant: reading an enum member through its class costs ~60 ns on Python 3.11."""


class Counters:
    """Mutable counters; a session shares one object across its successive connections.

    The round trip of the last answered command is kept as its two times (taken anyway) and
    only subtracted when :attr:`last_rtt` is read: the hot path does no statistics arithmetic.
    """

    __slots__ = ("answered_at", "answered_start", "discarded", "failed", "sent", "timed_out")

    def __init__(self) -> None:
        self.sent = 0
        self.failed = 0
        self.timed_out = 0
        self.discarded = 0
        self.answered_start: float | None = None
        self.answered_at = 0.0

    @property
    def last_rtt(self) -> float | None:
        """Seconds from enqueue to reply of the last answered command (``None`` before)."""
        start = self.answered_start
        return None if start is None else self.answered_at - start


class _Slot:
    """One command whose reply is owed by the proxy."""

    __slots__ = ("deadline", "future", "label", "start")

    def __init__(self, future: asyncio.Future[bytes], label: str, start: float, deadline: float):
        self.future = future
        self.label = label
        self.start = start
        self.deadline = deadline


class VMConnection:
    """A runtime-role connection to a proxy with a pipelined, FIFO-matched command queue.

    Create it inside a running event loop, run :meth:`run` in a task group for as long as the
    connection is used, and call :meth:`command` from any number of tasks. :meth:`close` (sync)
    fails every caller still waiting and makes :meth:`run` return.
    """

    def __init__(
        self,
        *,
        vm_id: str,
        counters: Counters | None = None,
        on_exit: Callable[[ProcessExitNotice], None] | None = None,
    ) -> None:
        """Use :meth:`connect`; the transport is attached when the connection is made.

        ``on_exit``: accept hyperd's exit notifications (ask for them with
        ``exitNotifications`` in RegisterVM/AttachVM) and call this, synchronously, with each.
        """
        self.vm_id = vm_id
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._on_exit = on_exit
        self._protocol = ClientConnection("runtime", exit_notifications=on_exit is not None)
        self._counters = counters if counters is not None else Counters()
        self._slots: deque[_Slot] = deque()
        self._outbuf: list[bytes] = []  # frames of the last len(_outbuf) slots, not yet written
        self._flush_scheduled = False
        self._deadlines: list[tuple[float, int, _Slot]] = []
        self._sequence = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._closed = False
        self._closed_event = anyio.Event()
        self._transport_lost = anyio.Event()
        self.close_reason: str | None = None
        self.last_receive = monotonic()
        """``time.monotonic()`` of the last bytes received (or of creation)."""

    @classmethod
    async def connect(
        cls,
        path: str,
        *,
        vm_id: str,
        counters: Counters | None = None,
        on_exit: Callable[[ProcessExitNotice], None] | None = None,
    ) -> VMConnection:
        """Connect to the proxy socket at ``path``; raises ``OSError`` as the connect does."""
        conn = cls(vm_id=vm_id, counters=counters, on_exit=on_exit)
        await conn._loop.create_unix_connection(lambda: _Driver(conn), path)
        return conn

    # -- state -------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def owed(self) -> int:
        """Replies the proxy still owes on this connection (including abandoned slots)."""
        return len(self._slots)

    def oldest_deadline(self) -> float | None:
        """Deadline (``time.monotonic()``) of the oldest owed reply, ``None`` when none is owed."""
        return self._slots[0].deadline if self._slots else None

    async def wait_closed(self) -> None:
        """Return once the connection is closed (by either side)."""
        await self._closed_event.wait()

    def statistics(self) -> ConnectionStatistics:
        c = self._counters
        queued = len(self._outbuf)
        return ConnectionStatistics(
            queued=queued,
            in_flight=len(self._slots) - queued,
            sent=c.sent,
            failed=c.failed,
            timed_out=c.timed_out,
            discarded=c.discarded,
            last_rtt=c.last_rtt,
            open=not self._closed,
        )

    # -- commands ----------------------------------------------------------------------------

    async def command(
        self,
        command: Command,
        payload: bytes | msgspec.Struct = b"",
        *,
        timeout: float,  # noqa: ASYNC109 - the slot outlives the caller's deadline
        label: str | None = None,
    ) -> bytes:
        """Send ``command`` and return the payload of its success response.

        Raises :class:`AgentError` (the agent answered ERROR); :class:`VMUnavailable` with
        ``data["proxy_message"]`` (the proxy says the VM's agent is gone); :class:`ProxyError`
        (any other error response); :class:`Timeout` (no reply within ``timeout`` seconds; the
        reply is discarded when it comes); :class:`ConnectionLost` (the connection closed after
        the command was written: its outcome is unknown); :class:`VMUnavailable` (closed before
        it was written); :class:`InvalidParams` (the payload cannot be encoded). ``label`` names
        the command in error messages (default: the opcode name). Proxy and agent errors carry
        the proxy's text as ``data["proxy_message"]``.
        """
        future = self.submit(command, payload, timeout=timeout, label=label)
        try:
            return await future
        except BaseException:
            # Timeout (set by the deadline timer) or cancelled from outside: either way the slot
            # stays in the FIFO and its reply will be discarded.
            if not future.done():
                future.cancel()
            raise

    def submit(
        self,
        command: Command,
        payload: bytes | msgspec.Struct = b"",
        *,
        timeout: float,
        label: str | None = None,
    ) -> asyncio.Future[bytes]:
        """The synchronous half of :meth:`command`: enqueue the command, return its future.

        The future gets the reply payload or the exception :meth:`command` would raise. Raises
        what :meth:`command` raises before anything is sent (:class:`VMUnavailable`,
        :class:`InvalidParams`). A caller that stops waiting cancels the future (awaiting it in
        a task does that on cancellation); its reply is then discarded.
        """
        if self._closed:
            name = label if label is not None else COMMAND_LABELS[command]
            raise VMUnavailable(f"VM {self.vm_id}: {self.close_reason}; {name} not sent")
        if command is _DISCONNECT_SHIM:
            raise InvalidParams("DisconnectShim has no response; it is not a runtime command")
        try:
            frame = self._protocol.send_command(command, payload)
        except LocalProtocolError as exc:
            name = label if label is not None else COMMAND_LABELS[command]
            raise InvalidParams(f"VM {self.vm_id}: {name}: {exc}") from None
        future: asyncio.Future[bytes] = self._loop.create_future()
        start = monotonic()
        slot = _Slot(
            future, label if label is not None else COMMAND_LABELS[command], start, start + timeout
        )
        self._slots.append(slot)
        if len(self._slots) == 1 and not self._flush_scheduled and self._transport is not None:
            # nothing else owed and no flush coming (callers woken by a read write together):
            # written now rather than one loop iteration later (a one-at-a-time caller's case)
            self._counters.sent += 1
            self._transport.write(frame)
        else:
            self._outbuf.append(frame)
            if not self._flush_scheduled:
                self._flush_scheduled = True
                self._loop.call_soon(self._flush)
        self._arm(slot)
        return future

    # -- deadlines ---------------------------------------------------------------------------
    # One timer per connection instead of a cancel scope per command: a heap of deadlines, the
    # timer armed for the earliest. Answered slots are dropped lazily (at the top, or by
    # compaction when they outnumber the live ones).

    def _arm(self, slot: _Slot) -> None:
        deadlines = self._deadlines
        self._sequence += 1
        heapq.heappush(deadlines, (slot.deadline, self._sequence, slot))
        if len(deadlines) > COMPACT_FACTOR * len(self._slots) + COMPACT_SLACK:
            self._deadlines = deadlines = [d for d in deadlines if not d[2].future.done()]
            heapq.heapify(deadlines)
        timer = self._timer
        if timer is None or slot.deadline < self._timer_at:
            if timer is not None:
                timer.cancel()
            self._schedule(slot.deadline)

    def _schedule(self, deadline: float) -> None:
        if math.isinf(deadline):
            self._timer = None
            return
        self._timer_at = deadline
        self._timer = self._loop.call_later(max(deadline - monotonic(), 0.0), self._expire)

    def _expire(self) -> None:
        """Timer callback: fail every caller whose deadline has passed with :class:`Timeout`."""
        self._timer = None
        now = monotonic()
        deadlines = self._deadlines
        while deadlines:
            deadline, _, slot = deadlines[0]
            future = slot.future
            if future.done():
                heapq.heappop(deadlines)
                continue
            if deadline > now:
                self._schedule(deadline)
                return
            heapq.heappop(deadlines)
            self._counters.timed_out += 1
            limit = f"{slot.deadline - slot.start:g}s"
            future.set_exception(
                Timeout(f"VM {self.vm_id}: {slot.label}: no reply from the proxy within {limit}")
            )

    # -- writing -----------------------------------------------------------------------------

    def _flush(self) -> None:
        """Loop callback: write everything queued in this iteration with one write."""
        self._flush_scheduled = False
        buf = self._outbuf
        if self._closed or self._transport is None or not buf:
            return
        count = len(buf)
        data = buf[0] if count == 1 else b"".join(buf)
        self._counters.sent += count
        buf.clear()
        self._transport.write(data)

    # -- reading (called by the driver) -----------------------------------------------------

    def _received(self, data: bytes) -> None:
        if self._closed:
            return  # closed locally: whatever was still buffered has no caller left
        self.last_receive = now = monotonic()
        protocol = self._protocol
        protocol.receive_data(data)
        next_payload = protocol.next_payload
        slots = self._slots
        answered: _Slot | None = None
        woken = 0  # callers answered by this read
        discarded = 0
        try:
            while True:
                # the common event, a success response, without an event object
                payload = next_payload()
                if type(payload) is not bytes:
                    if payload is NEED_DATA:
                        return
                    event = protocol.next_event()
                    if event is NEED_DATA:
                        return
                    if type(event) is VMProcessExited:
                        self._exited(event.notice)
                        continue
                    if isinstance(event, ErrorReply):
                        slot = slots.popleft()
                        if slot.future.done():
                            discarded += 1
                        else:
                            answered = slot
                            woken += 1
                            self._fail(slot, event.message)
                        continue
                    if not isinstance(event, Response):
                        # the runtime role refuses these already; never trust that silently
                        raise RemoteProtocolError(f"unexpected {type(event).__name__} frame")
                    payload = event.payload
                slot = slots.popleft()
                future = slot.future
                if future.done():
                    discarded += 1  # its caller gave up: drop the late reply
                else:
                    answered = slot
                    woken += 1
                    future.set_result(payload)
        except RemoteProtocolError as exc:
            self.close(f"connection to proxy lost (protocol error: {exc})")
        finally:
            counters = self._counters
            if discarded:
                counters.discarded += discarded
            if answered is not None:
                counters.answered_start = answered.start
                counters.answered_at = now
                # queued behind the callers just woken: what they send next goes out in this
                # loop iteration, in one write (one caller's next command is written at once)
                if woken > 1 and not self._flush_scheduled:
                    self._flush_scheduled = True
                    self._loop.call_soon(self._flush)

    def _exited(self, notice: ProcessExitNotice) -> None:
        if self._on_exit is None:  # pragma: no cover - the protocol object refuses it then
            return
        try:
            self._on_exit(notice)
        except Exception:
            log.exception("VM %s: exit notification callback failed", self.vm_id)

    def _fail(self, slot: _Slot, error: str) -> None:
        """Fail ``slot``'s caller with the exception for the proxy's error response."""
        self._counters.failed += 1
        future = slot.future
        if error.startswith(AGENT_ERROR_PREFIX):
            future.set_exception(
                AgentError(f"VM {self.vm_id}: {slot.label}: {error}", proxy_message=error)
            )
        elif error.startswith(VM_GONE):
            future.set_exception(
                VMUnavailable(
                    f"VM {self.vm_id}: {slot.label}: the VM is gone (proxy: {error})",
                    proxy_message=error,
                )
            )
        else:
            future.set_exception(
                ProxyError(f"VM {self.vm_id}: {slot.label}: proxy: {error}", proxy_message=error)
            )

    # -- lifetime ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Own the connection until it closes (by either side); cancellation closes it.

        Never raises for I/O or protocol errors: they close the connection, and
        :attr:`close_reason` says why.
        """
        try:
            await self._closed_event.wait()
        finally:
            self.close("connection closed")
            if self._transport is not None:
                # The transport finishes closing in a later loop iteration; wait for it so that
                # nothing is left half-closed (uvloop refuses to close a loop with it).
                with anyio.CancelScope(shield=True):
                    await self._transport_lost.wait()

    def close(self, reason: str) -> None:
        """Close the connection (idempotent, sync) and fail every caller still waiting.

        Callers whose command was written get :class:`ConnectionLost` (outcome unknown); callers
        whose command was still queued get :class:`VMUnavailable`. ``reason`` completes the
        sentence "VM <id>: <reason>; ...".
        """
        if self._closed:
            return
        self._closed = True
        self.close_reason = reason
        written = len(self._slots) - len(self._outbuf)
        for index, slot in enumerate(self._slots):
            future = slot.future
            if future.done():
                continue
            self._counters.failed += 1
            if index < written:
                future.set_exception(
                    ConnectionLost(f"VM {self.vm_id}: {reason}; outcome of {slot.label} unknown")
                )
            else:
                future.set_exception(
                    VMUnavailable(f"VM {self.vm_id}: {reason}; {slot.label} not sent")
                )
        self._slots.clear()
        self._deadlines.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._outbuf.clear()
        if self._transport is not None:
            self._transport.abort()  # nothing queued matters any more: every caller has failed
        self._closed_event.set()
        log.debug("VM %s: proxy connection closed: %s", self.vm_id, reason)


class _Driver(asyncio.Protocol):
    """Moves bytes between the event loop's transport and a :class:`VMConnection`."""

    def __init__(self, conn: VMConnection) -> None:
        self._conn = conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self._conn._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._conn._received(data)

    def eof_received(self) -> bool:
        self._conn.close("connection to proxy lost (closed by the proxy)")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        cause = f"{exc}" if exc is not None else "closed by the proxy"
        self._conn.close(f"connection to proxy lost ({cause})")
        self._conn._transport_lost.set()
