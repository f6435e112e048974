"""The simulated VM's two virtio-serial ports: unix sockets in server mode, as QEMU exposes them.

:class:`Simulator` listens on the ctl and tty sockets and serves one host connection on each at a
time (a newer connection replaces the older one: the host reconnected). READY goes out once, the
first time both channels are connected; a host that reconnects later gets none, as with the real
agents. Output for a channel with no host is dropped, as QEMU drops chardev writes with nobody
connected.

Both sockets are served by asyncio protocols on the event loop's own transports
(:mod:`hyperd.sim.links`): the commands that need no waiting (PING, READY, GETVERSION, unknown
codes) are answered inside ``data_received``, with one write per received chunk and no task
switch; a command that waits (STARTPOD, DESTROYPOD, ...) runs in a task while the connection
stops reading, so commands are still handled one at a time, in order.

Bad bytes never end the simulator: a framing fault closes that connection (logged), anything
else gets an ERROR reply. The simulator exits on SIGTERM/SIGINT (status 0) and on the
``crash_after`` fault (status :data:`CRASH_EXIT_STATUS`); either way it kills every process group
it started and removes its sockets. A host hang-up is not an exit.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import stat
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.abc import TaskGroup, TaskStatus

from hyperd.sim.agent import Agent, Answer
from hyperd.sim.faults import GARBAGE, Action, FaultPlan, Recorder
from hyperd.sim.links import Link, Port
from protocol import NEED_DATA, ProtocolError
from protocol.hyperstart import (
    CC,
    CTL_HEADER_SIZE,
    DEFAULT_MAX_FRAME,
    MAX_TTY_FRAME_HYPER,
    AgentCtlConnection,
    CtlFrame,
    Dialect,
    ProcessAsyncEvent,
    TtyDecoder,
)

__all__ = ["CRASH_EXIT_STATUS", "SimConfig", "Simulator"]

log = logging.getLogger(__name__)

CRASH_EXIT_STATUS = 3  # exit status of a --crash-after crash (nonzero, distinct from errors)
LISTEN_BACKLOG = 128  # pending host connections per socket
SHUTDOWN_TIMEOUT = 5.0  # seconds to wait for host connections to close on exit
_LENGTH_OFFSET = 4  # the ctl header's u32 total length follows the u32 code


@dataclass
class SimConfig:
    """What one simulated VM is: its sockets, shared directory, dialect and fault knobs."""

    ctl: Path
    tty: Path
    share: Path
    dialect: Dialect = CC
    netns: Path | None = None
    record: Path | None = None
    delay: float = 0.0
    silent_after: int | None = None
    crash_after: int | None = None
    garbage_after: int | None = None


class ReadSplitter:
    """Cuts received ctl bytes where hyperstart's reads end: the 8-byte header, then the body.

    hyperhq/hyperstart sends one NEXT per read; it reads a header, then the rest of the frame,
    each read returning what is there up to the amount asked for. Splitting a received chunk the
    same way gives the NEXT counts it would send (NEXT(8), NEXT(length-8) for a whole frame).
    """

    def __init__(self) -> None:
        self._header = bytearray()
        self._need = CTL_HEADER_SIZE
        self._in_header = True

    def split(self, data: bytes) -> list[bytes]:
        pieces: list[bytes] = []
        pos = 0
        while pos < len(data):
            piece = data[pos : pos + self._need]
            pos += len(piece)
            pieces.append(piece)
            self._need -= len(piece)
            if self._need:
                if self._in_header:
                    self._header += piece
                continue
            if self._in_header:
                self._header += piece
                length = int.from_bytes(self._header[_LENGTH_OFFSET:CTL_HEADER_SIZE], "big")
                self._header.clear()
                if length > CTL_HEADER_SIZE:
                    self._in_header, self._need = False, length - CTL_HEADER_SIZE
                else:
                    self._need = CTL_HEADER_SIZE
            else:
                self._in_header, self._need = True, CTL_HEADER_SIZE
        return pieces


class _CtlLink(Link):
    """A host connection on the ctl port: commands in, NEXT / ACK / ERROR out.

    Commands are handled one at a time in the order received, as the agent reads them. Those
    that need no waiting (PING, READY, GETVERSION, unknown codes, ...) are answered right in
    ``data_received``; the first one that needs to wait runs in a task, reading pauses, and the
    bytes already received queue behind it (hyperhq's NEXT for a read goes out when the agent
    gets to that read, after the replies to the commands before it).
    """

    def __init__(self, sim: Simulator) -> None:
        super().__init__(sim._ctl)
        self._sim = sim
        self.conn = AgentCtlConnection(sim.dialect)
        self._splitter = ReadSplitter() if sim._hyper else None
        self._pieces: deque[bytes] = deque()  # received, not yet fed to the decoder
        self._out: list[bytes] = []  # replies of the current pump, written in one go
        self._busy = False  # a command is running in a task
        self._dead = False  # a framing fault or a crash: ignore further bytes
        self._reading = True
        self._scope: anyio.CancelScope | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._sim._connected()

    def data_received(self, data: bytes) -> None:
        if self._dead:
            return
        if self._splitter is not None:
            self._pieces.extend(self._splitter.split(data))
        else:
            self._pieces.append(data)
        if not self._busy:
            self._run()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._update_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._update_reading()

    def replaced(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
        super().replaced()

    def _update_reading(self) -> None:
        want = not (self._busy or self._write_paused or self.closed)
        if want == self._reading or self.transport is None or self.transport.is_closing():
            return
        self._reading = want
        if want:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()

    def _run(self) -> None:
        """Handle what was received until done or until a command has to wait."""
        try:
            slow = self._pump()
        except ProtocolError as exc:
            self._fail(logging.WARNING, "%s; closing the connection", exc)
            return
        except Exception:  # a simulator bug: drop this connection, keep the VM up
            log.exception("ctl: closing the connection after an internal error")
            self._fail(logging.DEBUG, "%s", "internal error")
            return
        self._flush()
        if slow is not None:
            self._busy = True
            self._update_reading()
            self._sim._task_group().start_soon(self._slow, *slow)

    def _fail(self, level: int, fmt: str, arg: object) -> None:
        log.log(level, "ctl: " + fmt, arg)
        self._dead = True
        self._flush()
        self.close()

    def _flush(self) -> None:
        if self._out:
            data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
            self._out.clear()
            self.write(data)

    def _pump(self) -> tuple[CtlFrame, Action] | None:
        sim = self._sim
        faults = sim._faults
        conn = self.conn
        out = self._out
        pieces = self._pieces
        while True:
            frame = conn.next_event()
            if frame is NEED_DATA:
                if not pieces:
                    return None
                piece = pieces.popleft()
                if self._splitter is not None and not faults.silent:
                    out.append(conn.send_next(len(piece)))
                conn.receive_data(piece)
                continue
            assert isinstance(frame, CtlFrame)
            action = sim._received(frame)
            if action is Action.CRASH:
                self._dead = True
                return None
            if action is Action.SILENT:
                continue
            answer = None if faults.delay else sim._agent().answer_now(frame)
            if answer is None:
                return frame, action
            out.append(self._reply(answer, action))

    def _reply(self, answer: Answer, action: Action) -> bytes:
        if action is Action.GARBAGE:
            return GARBAGE
        if answer.ok:
            return self.conn.send_ack(answer.payload)
        return self.conn.send_error(answer.payload)

    async def _slow(self, frame: CtlFrame, action: Action) -> None:
        """Run one command that waits, answer it, then go on with what was received since."""
        scope = self._scope = anyio.CancelScope()
        try:
            with scope:
                answer = await self._sim._agent().handle(frame)
                if self._sim._faults.delay:
                    await anyio.sleep(self._sim._faults.delay)
        finally:
            self._scope = None
        if scope.cancel_called or self._dead:
            return  # replaced by a newer host connection
        self._out.append(self._reply(answer, action))
        self._busy = False
        self._update_reading()
        self._run()


class _TtyLink(Link):
    """A host connection on the tty port: stdin frames in; output goes out through the port."""

    def __init__(self, sim: Simulator) -> None:
        super().__init__(sim._tty)
        self._sim = sim
        self._decoder = TtyDecoder(MAX_TTY_FRAME_HYPER if sim._hyper else DEFAULT_MAX_FRAME)
        self._dead = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._sim._connected()

    def data_received(self, data: bytes) -> None:
        if self._dead:
            return
        agent = self._sim._agent()
        out: list[bytes] = []
        try:
            self._decoder.feed(data)
            while (frame := self._decoder.next_frame()) is not None:
                if answer := agent.stdin(frame):
                    out.append(answer)
        except ProtocolError as exc:
            log.warning("tty: %s; closing the connection", exc)
            self._dead = True
        except Exception:  # a simulator bug: drop this connection, keep the VM up
            log.exception("tty: closing the connection after an internal error")
            self._dead = True
        if out:
            self.write(b"".join(out))
        if self._dead:
            self.close()


class Simulator:
    """A simulated VM. ``await run()`` serves until a signal or a crash fault; returns the status.

    ``ready`` is called once both sockets listen. ``stop()`` ends it like SIGTERM would.
    """

    agent_class: type[Agent] = Agent  # what runs the commands (the guest agent subclasses it)

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.dialect = config.dialect
        self._hyper = config.dialect.name == "hyper"
        self._faults = FaultPlan(
            delay=config.delay,
            silent_after=config.silent_after,
            crash_after=config.crash_after,
            garbage_after=config.garbage_after,
        )
        self._recorder = Recorder(config.record)
        self._ctl = Port("ctl")
        self._tty = Port("tty")
        self._ready_sent = False
        self._status = 0
        self._root: anyio.CancelScope | None = None
        self._tg: TaskGroup | None = None
        self.agent: Agent | None = None

    def stop(self, status: int = 0) -> None:
        """End ``run()`` with ``status`` (kills the processes, removes the sockets)."""
        self._status = status
        if self._root is not None:
            self._root.cancel()

    async def run(
        self, ready: Callable[[], None] | None = None, *, handle_signals: bool = True
    ) -> int:
        """Serve both sockets until stopped; return the exit status.

        ``handle_signals``: SIGTERM/SIGINT stop the simulator (turn off when embedding it in a
        program that handles its own signals, and call :meth:`stop`).
        """
        cfg = self.config
        loop = asyncio.get_running_loop()
        netns_fd = os.open(cfg.netns, os.O_RDONLY | os.O_CLOEXEC) if cfg.netns else None
        servers: list[asyncio.AbstractServer] = []
        try:
            async with anyio.create_task_group() as tg:
                self._root = tg.cancel_scope
                self._tg = tg
                self.agent = self.agent_class(
                    dialect=self.dialect,
                    share=cfg.share,
                    channels=self,
                    task_group=tg,
                    chroot=os.geteuid() == 0,
                    netns_fd=netns_fd,
                )
                if handle_signals:
                    await tg.start(self._watch_signals)
                await self._open_ports(loop, servers)
                log.info(
                    "listening: ctl %s, tty %s (%s dialect)", cfg.ctl, cfg.tty, self.dialect.name
                )
                if ready is not None:
                    ready()
                await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await self._shut_down(servers)
            if self.agent is not None:
                self.agent.kill_everything()
            for path in (cfg.ctl, cfg.tty):
                _remove_stale_socket(path)
            if netns_fd is not None:
                os.close(netns_fd)
            self._recorder.close()
        return self._status

    async def _open_ports(
        self, loop: asyncio.AbstractEventLoop, servers: list[asyncio.AbstractServer]
    ) -> None:
        """Listen on the ctl and tty sockets (appended to ``servers`` as they open).

        A subclass serves other transports here (the guest agent: virtio-serial ports).
        """
        cfg = self.config
        for path, factory in ((cfg.ctl, self._ctl_link), (cfg.tty, self._tty_link)):
            _remove_stale_socket(path)
            # for the owner only (0600, set between bind and listen, so nobody connects
            # before): the pod's run dir is open to hyperd's RPC group, the agent's channels
            # are for the proxy alone
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(str(path))
                os.chmod(path, 0o600)
            except OSError:
                sock.close()
                raise
            servers.append(
                await loop.create_unix_server(factory, sock=sock, backlog=LISTEN_BACKLOG)
            )

    async def _shut_down(self, servers: list[asyncio.AbstractServer]) -> None:
        """Stop listening and close every host connection (waiting until they are gone)."""
        for server in servers:
            server.close()
        links = self._ctl.abort_all() + self._tty.abort_all()
        with anyio.move_on_after(SHUTDOWN_TIMEOUT):
            for link in links:
                await link.wait_lost()
            for server in servers:
                await server.wait_closed()

    async def _watch_signals(self, *, task_status: TaskStatus[None]) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()  # handlers are installed before anyone hears "ready"
            async for signum in signals:
                log.info("got %s: shutting down", signal.Signals(signum).name)
                self.stop(0)
                return

    # -- links ---------------------------------------------------------------------------------

    def _ctl_link(self) -> _CtlLink:
        return _CtlLink(self)

    def _tty_link(self) -> _TtyLink:
        return _TtyLink(self)

    def _agent(self) -> Agent:
        assert self.agent is not None
        return self.agent

    def _task_group(self) -> TaskGroup:
        assert self._tg is not None
        return self._tg

    def _connected(self) -> None:
        """A host connected to a port: READY goes out the first time both ports have one."""
        ctl = self._ctl.link
        if not self._ready_sent and isinstance(ctl, _CtlLink) and self._tty.link is not None:
            self._ready_sent = True
            ctl.write(ctl.conn.send_ready())

    def _received(self, frame: CtlFrame) -> Action:
        """Count and record one received command; returns what the fault plan says to do."""
        action = self._faults.next_command()
        name = self.dialect.name_of(frame.code)
        self._recorder.record(frame.code, name, frame.payload)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "command #%d %s (%d bytes): %s",
                self._faults.received,
                name,
                len(frame.payload),
                action.value,
            )
        if action is Action.CRASH:
            log.warning("crash fault after %d commands: exiting", self._faults.crash_after)
            self.stop(CRASH_EXIT_STATUS)
        return action

    # -- Channels (what the agent sends unsolicited) --------------------------------------------

    async def send_tty(self, data: bytes) -> None:
        await self._tty.send(data)

    async def send_event(self, event: ProcessAsyncEvent) -> None:
        ctl = self._ctl.link
        if not self._faults.silent and isinstance(ctl, _CtlLink):
            await self._ctl.send(ctl.conn.send_event(event))


def _remove_stale_socket(path: Path) -> None:
    """Remove a leftover socket file at ``path`` (never anything else)."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
