"""One persistent connection to a cc-proxy: a pipelined FIFO command queue.

The proxy answers the commands of one connection strictly in order and its responses carry no
request id (ccproxy spec §4). :class:`VMConnection` therefore keeps one FIFO of *slots*, one per
command written, and hands each response to the oldest slot. A caller that gives up (deadline or
cancellation) leaves its slot in place; the reply that eventually arrives for it is discarded, so
no reply ever reaches the wrong caller.

Cost model (the hot path): a command costs one payload encode, one future and one heap push
(deadlines are served by one timer per connection, not a cancel scope per command); no task is
created per command. Frames are appended to an output buffer and flushed by a loop
callback scheduled once per event-loop iteration, so the frames of every caller that enqueued in
the same iteration go out in one ``send()``, whole frames only (the reference proxy reads a
header with a single ``read()``). Only when the socket buffer is full does the writer task take
over. One reader task owns ``receive()`` and resolves the callers' futures directly.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import socket
from collections import deque
from time import monotonic
from typing import Final

import anyio
import msgspec
from anyio.abc import SocketAttribute, SocketStream

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
from protocol.ccproxy import ClientConnection, Command, ErrorReply, Response

log = logging.getLogger(__name__)

RECEIVE_SIZE: Final = 256 * 1024
"""Bytes asked of one ``receive()``: large enough to take many pipelined replies in one call."""

COMPACT_FACTOR: Final = 2
COMPACT_SLACK: Final = 64
"""The deadline heap is compacted when it holds more than FACTOR x live slots + SLACK entries."""

AGENT_ERROR_PREFIX: Final = "ERROR received from VM agent"
"""How the proxy words an agent's ERROR reply (ccproxy spec §9); anything else is the proxy's."""

COMMAND_LABELS: Final[dict[Command, str]] = {
    Command.REGISTER_VM: "RegisterVM",
    Command.UNREGISTER_VM: "UnregisterVM",
    Command.ATTACH_VM: "AttachVM",
    Command.HYPER: "Hyper",
    Command.CONNECT_SHIM: "ConnectShim",
    Command.DISCONNECT_SHIM: "DisconnectShim",
    Command.SIGNAL: "Signal",
}


class Counters:
    """Mutable counters; a session shares one object across its successive connections."""

    __slots__ = ("discarded", "failed", "last_rtt", "sent", "timed_out")

    def __init__(self) -> None:
        self.sent = 0
        self.failed = 0
        self.timed_out = 0
        self.discarded = 0
        self.last_rtt: float | None = None


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
        self, stream: SocketStream, *, vm_id: str, counters: Counters | None = None
    ) -> None:
        self.vm_id = vm_id
        self._stream = stream
        self._sock: socket.socket = stream.extra(SocketAttribute.raw_socket)
        self._loop = asyncio.get_running_loop()
        self._protocol = ClientConnection("runtime")
        self._counters = counters if counters is not None else Counters()
        self._slots: deque[_Slot] = deque()
        self._outbuf: list[bytes] = []
        self._unwritten = 0  # slots at the tail of _slots whose frames are still in _outbuf
        self._flush_scheduled = False
        self._backlog: bytes | None = None  # bytes the writer task is pushing; None = idle
        self._writer_wakeup = anyio.Event()
        self._deadlines: list[tuple[float, int, _Slot]] = []
        self._sequence = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._closed = False
        self._closed_event = anyio.Event()
        self._run_scope: anyio.CancelScope | None = None
        self.close_reason: str | None = None
        self.last_receive = monotonic()
        """``time.monotonic()`` of the last bytes received (or of creation)."""

    @classmethod
    async def connect(
        cls, path: str, *, vm_id: str, counters: Counters | None = None
    ) -> VMConnection:
        """Connect to the proxy socket at ``path``; raises ``OSError`` as the connect does."""
        stream = await anyio.connect_unix(path)
        return cls(stream, vm_id=vm_id, counters=counters)

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
        return ConnectionStatistics(
            queued=self._unwritten,
            in_flight=len(self._slots) - self._unwritten,
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

        Raises :class:`AgentError` (the agent answered ERROR), :class:`ProxyError` (any other
        error response), :class:`Timeout` (no reply within ``timeout`` seconds; the reply is
        discarded when it comes), :class:`ConnectionLost` (the connection closed after the
        command was written: its outcome is unknown), :class:`VMUnavailable` (closed before it
        was written), :class:`InvalidParams` (the payload cannot be encoded). ``label`` names
        the command in error messages (default: the opcode name).
        """
        name = label if label is not None else COMMAND_LABELS[command]
        if self._closed:
            raise VMUnavailable(f"VM {self.vm_id}: {self.close_reason}; {name} not sent")
        if command is Command.DISCONNECT_SHIM:
            raise InvalidParams("DisconnectShim has no response; it is not a runtime command")
        try:
            frame = self._protocol.send_command(command, payload)
        except LocalProtocolError as exc:
            raise InvalidParams(f"VM {self.vm_id}: {name}: {exc}") from None
        future: asyncio.Future[bytes] = self._loop.create_future()
        start = monotonic()
        slot = _Slot(future, name, start, start + timeout)
        self._slots.append(slot)
        self._outbuf.append(frame)
        self._unwritten += 1
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        self._arm(slot)
        try:
            return await future
        except BaseException:
            # Timeout (set by the deadline timer) or cancelled from outside: either way the slot
            # stays in the FIFO and its reply will be discarded.
            if not future.done():
                future.cancel()
            raise

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

    def _take_output(self) -> bytes | None:
        buf = self._outbuf
        if not buf:
            return None
        data = buf[0] if len(buf) == 1 else b"".join(buf)
        self._counters.sent += len(buf)
        self._unwritten -= len(buf)
        buf.clear()
        return data

    def _flush(self) -> None:
        """Loop callback: write everything queued in this iteration with one ``send()``."""
        self._flush_scheduled = False
        if self._closed or self._backlog is not None:
            return  # the writer task picks the buffer up after its current backlog
        data = self._take_output()
        if data is None:
            return
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.close(f"connection to proxy lost (write failed: {exc})")
            return
        if sent < len(data):
            self._backlog = data[sent:]
            self._writer_wakeup.set()

    async def _write_loop(self) -> None:
        """Push backlog the socket could not take at once; owns writes while one is pending."""
        while True:
            await self._writer_wakeup.wait()
            self._writer_wakeup = anyio.Event()
            while self._backlog is not None:
                try:
                    await self._stream.send(self._backlog)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                    self.close(f"connection to proxy lost (write failed: {exc!r})")
                    return
                self._backlog = self._take_output()

    # -- reading -----------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        receive = self._stream.receive
        protocol = self._protocol
        while True:
            try:
                data = await receive(RECEIVE_SIZE)
            except anyio.EndOfStream:
                self.close("connection to proxy lost (closed by the proxy)")
                return
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                self.close(f"connection to proxy lost (read failed: {exc!r})")
                return
            self.last_receive = monotonic()
            protocol.receive_data(data)
            try:
                while True:
                    event = protocol.next_event()
                    if event is NEED_DATA:
                        break
                    if isinstance(event, Response):
                        self._deliver(event.payload, None)
                    elif isinstance(event, ErrorReply):
                        self._deliver(b"", event.message)
                    else:  # the runtime role refuses these already; never trust that silently
                        raise RemoteProtocolError(f"unexpected {type(event).__name__} frame")
            except RemoteProtocolError as exc:
                self.close(f"connection to proxy lost (protocol error: {exc})")
                return

    def _deliver(self, payload: bytes, error: str | None) -> None:
        slot = self._slots.popleft()
        future = slot.future
        if future.done():
            self._counters.discarded += 1  # its caller gave up: drop the late reply
            return
        self._counters.last_rtt = self.last_receive - slot.start
        if error is None:
            future.set_result(payload)
            return
        self._counters.failed += 1
        if error.startswith(AGENT_ERROR_PREFIX):
            future.set_exception(
                AgentError(f"VM {self.vm_id}: {slot.label}: {error}", proxy_message=error)
            )
        else:
            future.set_exception(
                ProxyError(f"VM {self.vm_id}: {slot.label}: proxy: {error}", proxy_message=error)
            )

    # -- lifetime ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Drive the connection (reader and writer) until it closes; then close the socket.

        Never raises for I/O or protocol errors: they close the connection, and
        :attr:`close_reason` says why. Cancellation closes the connection too.
        """
        try:
            async with anyio.create_task_group() as tg:
                self._run_scope = tg.cancel_scope
                if self._closed:
                    tg.cancel_scope.cancel()
                tg.start_soon(self._write_loop)
                await self._read_loop()
                tg.cancel_scope.cancel()
        finally:
            self.close("connection closed")
            with anyio.CancelScope(shield=True):
                await self._stream.aclose()

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
        written = len(self._slots) - self._unwritten
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
        self._unwritten = 0
        self._backlog = None
        if self._run_scope is not None:
            self._run_scope.cancel()
        else:  # run() never started: nobody else will close the socket
            self._sock.close()
        self._closed_event.set()
        log.debug("VM %s: proxy connection closed: %s", self.vm_id, reason)
