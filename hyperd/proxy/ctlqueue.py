"""The agent command queue of one VM (ctl channel, host side).

Commands from every client of the VM queue here and go to the agent **one at a time**, as with
the reference: the next is written when the previous one's reply arrived or timed out. With
nothing else outstanding, an unsolicited ACK/ERROR is recognised as such (the codec reports it
as :class:`UnexpectedReply`) instead of being handed to the next command, which is how the
reference's reply queue goes out of step for good.

A command that times out keeps its FIFO slot in the codec: its late reply is matched to it and
discarded, so later replies stay in step. Deadlines are checked by one watchdog timer per
queue, not a timer per command (cheap on the ping path).

Toward hyperhq (``paced``), a frame longer than 512 bytes is written as header and body start
together, then in pieces of at most 512 bytes, each once the agent's NEXTs acknowledged all
bytes written so far -- but only after the agent was seen to send NEXT at all.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from hyperd.proxy import texts
from protocol.hyperstart import HYPER_CHUNK, HostCtlConnection, Reply

log = logging.getLogger("hyperd.proxy.vm")

ReplyCallback = Callable[[Reply | None, str | None], None]
"""Called once with (reply, None) or (None, error text)."""

NO_DEADLINE: Final = 0.0


@dataclass(slots=True)
class _Request:
    name: str
    code: int
    payload: bytes
    callback: ReplyCallback | None  # None once answered (timeout, loss): the reply is discarded
    deadline: float = NO_DEADLINE


class CtlQueue:
    """Agent commands of one VM, one outstanding at a time, replies matched FIFO."""

    def __init__(self, conn: HostCtlConnection, vm_id: str, timeout: float | None) -> None:
        self.conn = conn
        self.vm_id = vm_id
        self.timeout = timeout
        self.transport: asyncio.Transport | None = None
        self.paced = False  # hyperhq dialect: pace long frames by NEXT once it is seen
        self.open = False  # READY arrived: commands may go out
        self.closed = False
        self._queue: deque[_Request] = deque()
        self._inflight: deque[_Request] = deque()
        self._live = 0  # in-flight requests that still have a callback
        self._partial: tuple[_Request, bytes, int] | None = None  # frame being paced
        self._written = 0
        self._acked = 0
        self._next_seen = False
        self._watchdog: asyncio.TimerHandle | None = None

    def request(self, name: str, code: int, payload: bytes, callback: ReplyCallback) -> None:
        """Queue a command; ``callback`` gets its reply or an error text, exactly once."""
        if self.closed:
            callback(None, texts.NO_CTL_CHANNEL)
            return
        self._queue.append(_Request(name, code, payload, callback))
        self._send_next()

    async def call(self, name: str, code: int, payload: bytes) -> Reply:
        """Send a command and wait for its reply (ACK or ERROR).

        Raises :class:`texts.CommandError` when the VM is lost or the reply times out.
        """
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()

        def done(reply: Reply | None, error: str | None) -> None:
            if future.done():
                return
            if reply is None:
                future.set_exception(texts.CommandError(error or texts.NO_CTL_CHANNEL))
            else:
                future.set_result(reply)

        self.request(name, code, payload, done)
        return await future

    def start(self) -> None:
        """READY arrived: send what is queued."""
        self.open = True
        self._send_next()

    def on_reply(self, reply: Reply) -> None:
        """The agent's ACK/ERROR for the oldest command sent."""
        if not self._inflight:  # pragma: no cover - the codec reports these as unexpected
            return
        req = self._inflight.popleft()
        if req.callback is not None:
            self._live -= 1
            self._answer(req, reply, None)
        self._send_next()

    def on_next(self, count: int) -> None:
        """The agent's NEXT: it consumed ``count`` more bytes."""
        self._next_seen = True
        self._acked += count
        if self._partial is not None and self._acked >= self._written:
            self._write_chunk()

    def close(self) -> None:
        """The VM is gone: answer every queued and in-flight command."""
        if self.closed:
            return
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        pending = list(self._inflight) + list(self._queue)
        self._inflight.clear()
        self._queue.clear()
        self._partial = None
        self._live = 0
        for req in pending:
            self._answer(req, None, texts.NO_CTL_CHANNEL)

    def _send_next(self) -> None:
        # commands of clients attached while the VM waits for READY wait with it
        if not self.open or self.closed:
            return
        while self._queue and not self._live and self._partial is None:
            req = self._queue.popleft()
            if req.callback is None:
                continue
            transport = self.transport
            if transport is None:
                self._answer(req, None, texts.NO_CTL_CHANNEL)
                continue
            if not self._inflight:
                # every reply is in, so every NEXT before it too: count afresh, so that an
                # agent whose NEXT sums are off cannot stall later frames
                self._written = self._acked = 0
            frame = self.conn.send_command(req.code, req.payload)
            self._inflight.append(req)
            self._live += 1
            if self.timeout:
                loop = asyncio.get_running_loop()
                req.deadline = loop.time() + self.timeout
                if self._watchdog is None:
                    self._watchdog = loop.call_at(req.deadline, self._check_deadlines)
            if self.paced and self._next_seen and len(frame) > HYPER_CHUNK:
                self._partial = (req, frame, 0)
                self._write_chunk()
            else:
                self._written += len(frame)
                transport.write(frame)

    def _write_chunk(self) -> None:
        assert self._partial is not None
        req, frame, offset = self._partial
        chunk = frame[offset : offset + HYPER_CHUNK]
        offset += len(chunk)
        self._partial = (req, frame, offset) if offset < len(frame) else None
        self._written += len(chunk)
        if self.transport is not None:
            self.transport.write(chunk)

    def _answer(self, req: _Request, reply: Reply | None, error: str | None) -> None:
        callback, req.callback = req.callback, None
        if callback is not None:
            try:
                callback(reply, error)
            except Exception:  # a bug in a client must not take the VM's reader down
                log.exception("VM %s: reply callback for %s failed", self.vm_id, req.name)

    def _check_deadlines(self) -> None:
        """The watchdog: time out overdue commands, re-arm for the next deadline."""
        self._watchdog = None
        if self.closed:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for req in list(self._inflight):
            if req.callback is not None and req.deadline <= now:
                self._timed_out(req)
        pending = [r.deadline for r in self._inflight if r.callback is not None]
        if pending:
            self._watchdog = loop.call_at(min(pending), self._check_deadlines)

    def _timed_out(self, req: _Request) -> None:
        assert self.timeout is not None
        self._live -= 1
        self._answer(req, None, texts.agent_timeout(req.name, self.timeout))
        if self._partial is not None and self._partial[0] is req:
            # the agent stopped acknowledging: finish the frame so the stream stays framed
            _, frame, offset = self._partial
            self._partial = None
            self._written += len(frame) - offset
            if self.transport is not None:
                self.transport.write(frame[offset:])
        self._send_next()


__all__ = ["CtlQueue", "ReplyCallback"]
