"""One VM's agent: its ctl and tty channels, the agent command queue, and output routing.

- Agent commands go through a :class:`~hyperd.proxy.ctlqueue.CtlQueue`: one outstanding at a
  time, replies matched FIFO, deadlines, NEXT pacing toward hyperhq.
- Either channel closing (or sending bytes that cannot be framed) means the VM is lost: every
  queued or in-flight command is answered with ``No multicast available for CTL channel``,
  every session is freed and its shim connection closed. (The reference only watches the tty
  channel, and leaves in-flight commands unanswered.) A channel's end is acted on after the
  event loop's current round of reads: what the agent wrote on the other channel before the VM
  went (e.g. the ACK of DESTROYPOD, then power-off) is read and delivered first, whichever
  socket the loop happened to read first.
- tty output is routed by seq to the shim owning the session; the exit status comes from the
  1-byte frame after the EOF (CC) or from the ctl PROCESSASYNCEVENT (hyperhq). stdin frames
  toward hyperhq stay within 4096 bytes; a backed-up tty channel holds the shim back.
- Exit notifications (hyperd's extension): every exit of a process started with a token is
  also sent to the runtime connections that asked for it (:meth:`AgentVM.listen_exits`); with
  none listening, the exit is kept (at most ``keep_exits`` per VM, the oldest dropped first)
  and delivered to the next one. A session freed by DisconnectShim before its process ended
  stays indexed (its output discarded) until the exit arrives, so no exit is missed.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque
from collections.abc import Callable
from typing import Final, Protocol, cast

import msgspec

from hyperd.proxy import texts
from hyperd.proxy.ctlqueue import CtlQueue, ReplyCallback
from hyperd.proxy.sessions import FIRST_IO_BASE, IO_STEP, NULL_IO_BASE, IOSession
from protocol import NEED_DATA, ProtocolError, _NeedData
from protocol.ccproxy import MAX_PAYLOAD, ProcessExitNotice, Stream
from protocol.hyperstart import (
    CC,
    HYPER,
    HYPER_API_VERSION_MIN,
    MAX_CTL_FRAME,
    MAX_TTY_FRAME_HYPER,
    AsyncEvent,
    Code,
    Dialect,
    HostCtlConnection,
    HostTtyConnection,
    MessageError,
    NextAck,
    Ready,
    Reply,
    TtyData,
    TtyEof,
    TtyExitStatus,
    UnexpectedReply,
)

log = logging.getLogger("hyperd.proxy.vm")

MAX_AGENT_FRAME: Final = MAX_PAYLOAD + 8  # an ACK payload must fit in one response frame
EXIT_GRACE: Final = 1.0  # hyperhq: seconds to wait for the stdio EOF after the exit event
_U32: Final = struct.Struct(">I")
_VERSION_SIZE: Final = 4  # GETVERSION's ACK payload: u32 APIVERSION


class ExitListener(Protocol):
    """A runtime connection that asked for exit notifications."""

    def send_exit_notice(self, notice: ProcessExitNotice) -> None: ...


class _Channel(asyncio.Protocol):
    """One agent socket; hands bytes and the end of the stream to its VM."""

    def __init__(self, on_data: Callable[[bytes], None], on_lost: Callable[[str], None]) -> None:
        self._on_data = on_data
        self._on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.blocked = False  # the agent is not reading fast enough (write buffer full)
        self.writable: list[Callable[[], None]] = []  # called once it drains

    def pause_writing(self) -> None:
        self.blocked = True

    def resume_writing(self) -> None:
        self.blocked = False
        waiting, self.writable = self.writable, []
        for callback in waiting:
            callback()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its interface
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._on_data(data)

    def eof_received(self) -> bool:
        self._on_lost("EOF")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost("closed" if exc is None else str(exc))


class AgentVM:
    """A registered VM: agent channels, sessions by seq, the ctl command queue."""

    def __init__(
        self,
        vm_id: str,
        *,
        dialect: Dialect | None,
        agent_timeout: float | None,
        on_lost: Callable[[AgentVM], None],
        keep_exits: int = 0,
    ) -> None:
        self.id = vm_id
        self.dialect: Dialect = dialect or CC
        self._detect = dialect is None
        self._on_lost_cb = on_lost
        self._ctl = HostCtlConnection(self.dialect, max_frame=MAX_AGENT_FRAME)
        self._tty = HostTtyConnection(exit_status_frames=self.dialect is not HYPER)
        self._ctl_channel: _Channel | None = None
        self._tty_channel: _Channel | None = None
        self._console: _Channel | None = None
        self.commands = CtlQueue(self._ctl, vm_id, agent_timeout)
        self.commands.paced = self.dialect is HYPER
        self._ready: asyncio.Future[None] | None = None
        self.lost = False
        self.unregistered = False
        self.sessions: dict[int, IOSession] = {}
        self.by_process: dict[tuple[str, str], IOSession] = {}
        self._next_io_base = FIRST_IO_BASE
        self.null_session = IOSession("", self, NULL_IO_BASE)
        self.sessions[NULL_IO_BASE] = self.null_session
        self.sessions[NULL_IO_BASE + 1] = self.null_session
        self.exit_listeners: dict[ExitListener, None] = {}  # an ordered set
        self.undelivered: deque[ProcessExitNotice] = deque()
        self.keep_exits = keep_exits
        self.dropped_exits = 0

    # -- connection ------------------------------------------------------------------------------

    async def connect(
        self, ctl_path: str, tty_path: str, ready_timeout: float, console: str = ""
    ) -> None:
        """Dial ctl then tty, wait for READY (and detect the dialect in auto mode).

        Raises :class:`texts.CommandError` with the reference's text (Go's dial error, the
        agent's unexpected first reply) or ours (READY timeout). On failure everything opened
        is closed again. As the reference, the VM console (if given) is read and logged only
        at debug level; unlike it, a console that cannot be dialled is not an error.
        """
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        try:
            async with asyncio.timeout(ready_timeout):
                if console and log.isEnabledFor(logging.DEBUG):
                    await self._open_console(loop, console)
                self._ctl_channel = await self._dial(loop, ctl_path, self._ctl_data)
                self.commands.transport = self._ctl_channel.transport
                self._tty_channel = await self._dial(loop, tty_path, self._tty_data)
                await self._ready
                if self._detect:
                    await self._detect_dialect()
        except TimeoutError:
            self._ready.cancel()
            self.close()
            raise texts.CommandError(texts.READY_TIMEOUT) from None
        except BaseException:
            self._ready.cancel()  # nobody will look at it again
            self.close()
            raise

    async def _dial(
        self, loop: asyncio.AbstractEventLoop, path: str, on_data: Callable[[bytes], None]
    ) -> _Channel:
        try:
            _, channel = await loop.create_unix_connection(
                lambda: _Channel(on_data, self._channel_ended), path
            )
        except OSError as exc:
            reason = (exc.strerror or str(exc)) if exc.errno else str(exc)
            raise texts.CommandError(
                texts.dial_error(path, reason[:1].lower() + reason[1:])
            ) from None
        if self.lost:  # closed while we were dialling
            raise texts.CommandError(texts.AGENT_CLOSED)
        return channel

    async def _open_console(self, loop: asyncio.AbstractEventLoop, path: str) -> None:
        vm_id = self.id
        pending = bytearray()

        def lines(data: bytes) -> None:
            pending.extend(data)
            *complete, rest = pending.split(b"\n")
            pending[:] = rest
            for line in complete:
                log.debug("VM %s console: %s", vm_id, line.decode(errors="replace").rstrip())

        try:
            _, self._console = await loop.create_unix_connection(
                lambda: _Channel(lines, lambda reason: None), path
            )
        except OSError as exc:
            log.debug("VM %s: no console at %s: %s", vm_id, path, exc)

    async def _detect_dialect(self) -> None:
        """GETVERSION: an ACK with a u32 >= 4243 means hyperhq; anything else (cc-agent answers
        ERROR, H07 4242) means the CC dialect."""
        reply = await self.commands.call("version", Code.VERSION, b"")
        if (
            reply.ok
            and len(reply.payload) >= _VERSION_SIZE
            and _U32.unpack_from(reply.payload)[0] >= HYPER_API_VERSION_MIN
        ):
            self.dialect = HYPER
            self._ctl.dialect = HYPER
            self._tty.exit_status_frames = False
            self.commands.paced = True
        log.info("VM %s: agent dialect %s", self.id, self.dialect.name)

    def close(self) -> None:
        """Close the agent channels (the VM is then lost)."""
        self.lose("closed by the proxy")

    # -- ctl -------------------------------------------------------------------------------------

    def frame_too_long(self, payload: bytes) -> int | None:
        """The frame length if the CC host writer would refuse it (``message too long``)."""
        total = 8 + len(payload)
        if self.dialect is not HYPER and total > MAX_CTL_FRAME:
            return total
        return None

    def request(self, name: str, code: int, payload: bytes, callback: ReplyCallback) -> None:
        """Queue an agent command; ``callback`` gets its reply or an error text, exactly once."""
        self.commands.request(name, code, payload, callback)

    async def call(self, name: str, code: int, payload: bytes) -> Reply:
        """Send an agent command and wait for its reply; raises :class:`texts.CommandError`."""
        return await self.commands.call(name, code, payload)

    def _ctl_data(self, data: bytes) -> None:
        ctl = self._ctl
        ctl.receive_data(data)
        while True:
            try:
                event = ctl.next_event()
            except MessageError as exc:  # a process event with bad JSON: the frame is consumed
                log.warning("VM %s: bad process event: %s", self.id, exc)
                continue
            except ProtocolError as exc:
                log.warning("VM %s: bad ctl data: %s", self.id, exc)
                self.lose(f"bad ctl data: {exc}")
                return
            if event is NEED_DATA:
                return
            if isinstance(event, Reply):
                self.commands.on_reply(event)
            elif isinstance(event, NextAck):
                self.commands.on_next(event.count)
            elif isinstance(event, AsyncEvent):
                self._on_process_event(event)
            elif isinstance(event, Ready):
                if self._ready is not None and not self._ready.done():
                    self._ready.set_result(None)
                self.commands.start()
            elif isinstance(event, UnexpectedReply):
                self._on_unexpected(event)

    def _on_unexpected(self, event: UnexpectedReply) -> None:
        ready = self._ready
        if ready is not None and not ready.done():
            if event.code == Code.ERROR:
                text = texts.agent_error(event.payload)
            else:
                text = texts.unexpected_reply(event.code, int(Code.READY), event.payload)
            ready.set_exception(texts.CommandError(text))
            return
        log.warning("VM %s: dropped unsolicited agent message %d", self.id, event.code)

    # -- tty -------------------------------------------------------------------------------------

    def _tty_data(self, data: bytes) -> None:
        tty = self._tty
        tty.receive_data(data)
        sessions = self.sessions
        while True:
            try:
                event = tty.next_event()
            except ProtocolError as exc:
                log.warning("VM %s: bad tty data: %s", self.id, exc)
                self.lose(f"bad tty data: {exc}")
                return
            if isinstance(event, _NeedData):
                return
            session = sessions.get(event.seq)
            if session is None or session.is_null:
                continue
            if type(event) is TtyData:
                shim = session.shim
                if shim is not None:
                    shim.send_output(
                        Stream.STDOUT if event.seq == session.io_base else Stream.STDERR,
                        event.data,
                    )
            elif type(event) is TtyEof:
                session.terminated = True
                if session.pending_status is not None:
                    # hyperhq: the exit event came first; deliver it now that output is drained
                    session.exited(session.pending_status)
            elif type(event) is TtyExitStatus and session.terminated:
                session.exited(event.status)

    def _on_process_event(self, event: AsyncEvent) -> None:
        info = event.event
        session = self.by_process.get((info.container, info.process))
        if session is None:
            log.debug(
                "VM %s: exit event for unknown process %s/%s", self.id, info.container, info.process
            )
            return
        status = info.status & 0xFF
        if session.terminated:
            session.exited(status)
            return
        # the tty EOF has not arrived yet (channels are not ordered): wait a little for it
        session.pending_status = status
        session.grace = asyncio.get_running_loop().call_later(EXIT_GRACE, self._grace_over, session)

    def _grace_over(self, session: IOSession) -> None:
        session.grace = None
        session.exited(session.pending_status or 0)

    def write_stdin(self, session: IOSession, data: bytes, on_drained: Callable[[], None]) -> bool:
        """Forward stdin of ``session``; ``b""`` is EOF (``^D`` for a hyperhq terminal).

        Returns False when the agent's tty channel is backed up: ``on_drained`` is then called
        once it has drained (or the VM is lost), and the caller should hold further input.
        """
        channel = self._tty_channel
        if channel is None or channel.transport is None or self.lost:
            return True
        if self.dialect is HYPER:
            if not data and session.terminal:
                data = b"\x04"
            frames = self._tty.send_stdin(session.io_base, data, max_frame=MAX_TTY_FRAME_HYPER)
        else:
            frames = self._tty.send_stdin(session.io_base, data, max_frame=MAX_CTL_FRAME)
        channel.transport.write(frames)
        if channel.blocked:
            channel.writable.append(on_drained)
            return False
        return True

    # -- sessions --------------------------------------------------------------------------------

    def new_session(self, token: str) -> IOSession:
        """Allocate the next pair of seqs for ``token``."""
        session = IOSession(token, self, self._next_io_base)
        self._next_io_base += IO_STEP
        if not self.lost:
            self.sessions[session.io_base] = session
            self.sessions[session.io_base + 1] = session
        else:
            session.free()
        return session

    def bind_process(self, session: IOSession) -> None:
        """Index ``session`` by (container, process id) for hyperhq exit events."""
        if not session.is_null:
            self.by_process[(session.container_id, session.process_id)] = session

    def unbind_process(self, session: IOSession) -> None:
        """Undo :meth:`bind_process` (the process did not start)."""
        key = (session.container_id, session.process_id)
        if self.by_process.get(key) is session:
            del self.by_process[key]

    def free_session(self, session: IOSession) -> None:
        """Close ``session``'s shim (DisconnectShim) and forget its seqs, except while its
        process still runs: then they stay (output discarded) until its exit is seen."""
        if not (session.used and session.exit_status is None and not self.lost):
            self._forget(session)
        session.free()

    def _forget(self, session: IOSession) -> None:
        for seq in (session.io_base, session.io_base + 1):
            if self.sessions.get(seq) is session:
                del self.sessions[seq]
        self.unbind_process(session)

    # -- exit notifications (hyperd's extension) ---------------------------------------------------

    def listen_exits(self, listener: ExitListener) -> None:
        """Send ``listener`` every exit from now on, after the exits nobody received yet."""
        self.exit_listeners[listener] = None
        backlog, self.undelivered = self.undelivered, deque()
        if self.dropped_exits:
            log.warning(
                "VM %s: %d exits were dropped while no runtime listened (limit %d)",
                self.id, self.dropped_exits, self.keep_exits,
            )  # fmt: skip
            self.dropped_exits = 0
        for notice in backlog:
            listener.send_exit_notice(msgspec.structs.replace(notice, backlog=True))

    def unlisten_exits(self, listener: ExitListener) -> None:
        self.exit_listeners.pop(listener, None)

    def process_exited(self, session: IOSession, status: int) -> None:
        """``session``'s process exited: tell the listeners, or keep it for the next one."""
        if session.freed:
            self._forget(session)  # kept only to see this exit
        notice = ProcessExitNotice(
            containerId=self.id,
            token=session.token,
            container=session.container_id,
            process=session.process_id,
            status=status,
        )
        if self.exit_listeners:
            for listener in list(self.exit_listeners):
                listener.send_exit_notice(notice)
            return
        if self.keep_exits <= 0:
            return
        if len(self.undelivered) >= self.keep_exits:
            self.undelivered.popleft()
            self.dropped_exits += 1
        self.undelivered.append(notice)

    # -- loss ------------------------------------------------------------------------------------

    def _channel_ended(self, reason: str) -> None:
        # after this round of reads: the other channel may hold the agent's last answers
        if not self.lost:
            asyncio.get_running_loop().call_soon(self.lose, reason)

    def lose(self, reason: str) -> None:
        """The VM is gone: answer every command, free every session, close the channels."""
        if self.lost:
            return
        self.lost = True
        log.info("VM %s lost: %s", self.id, reason)
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(texts.CommandError(texts.AGENT_CLOSED))
        for channel in (self._ctl_channel, self._tty_channel, self._console):
            if channel is not None and channel.transport is not None:
                channel.transport.close()
            if channel is not None:
                channel.resume_writing()
        self.commands.close()
        sessions = {id(s): s for s in self.sessions.values()}
        self.sessions.clear()
        self.by_process.clear()
        for session in sessions.values():
            session.free()
        self._on_lost_cb(self)


__all__ = ["EXIT_GRACE", "AgentVM", "ExitListener", "ReplyCallback"]
