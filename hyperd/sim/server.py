"""The simulated VM's two virtio-serial ports: unix sockets in server mode, as QEMU exposes them.

:class:`Simulator` listens on the ctl and tty sockets and serves one host connection on each at a
time (a newer connection replaces the older one: the host reconnected). READY goes out once, the
first time both channels are connected; a host that reconnects later gets none, as with the real
agents. Output for a channel with no host is dropped, as QEMU drops chardev writes with nobody
connected.

Bad bytes never end the simulator: a framing fault closes that connection (logged), anything
else gets an ERROR reply. The simulator exits on SIGTERM/SIGINT (status 0) and on the
``crash_after`` fault (status :data:`CRASH_EXIT_STATUS`); either way it kills every process group
it started and removes its sockets. A host hang-up is not an exit.
"""

from __future__ import annotations

import logging
import os
import signal
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
from anyio.abc import SocketListener, SocketStream, TaskGroup, TaskStatus

from hyperd.sim.agent import Agent
from hyperd.sim.faults import GARBAGE, Action, FaultPlan, Recorder
from protocol import ProtocolError
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
RECEIVE_SIZE = 65536  # bytes per socket read
ACCEPT_RETRY_DELAY = 0.1  # seconds to back off after a failed accept()
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


class _Port:
    """One virtio-serial port: the current host connection (if any) and its write lock."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stream: SocketStream | None = None
        self.scope: anyio.CancelScope | None = None
        self.lock = anyio.Lock()

    async def send(self, data: bytes, to: SocketStream | None = None) -> None:
        """Write ``data`` whole to the connected host; dropped when nobody is connected.

        With ``to``, only while that connection is still the current one (a reply never goes to
        a host other than the one that sent the command).
        """
        async with self.lock:
            stream = self.stream
            if stream is None or (to is not None and stream is not to):
                return
            try:
                await stream.send(data)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
                log.info("%s: write failed (%s); dropping output", self.name, exc)

    def replace(self, stream: SocketStream) -> anyio.CancelScope:
        """Make ``stream`` the current connection, cancelling the previous one's handler."""
        if self.scope is not None:
            self.scope.cancel()
        self.stream = stream
        self.scope = anyio.CancelScope()
        return self.scope

    def release(self, stream: SocketStream) -> None:
        if self.stream is stream:
            self.stream = None
            self.scope = None


class Simulator:
    """A simulated VM. ``await run()`` serves until a signal or a crash fault; returns the status.

    ``ready`` is called once both sockets listen. ``stop()`` ends it like SIGTERM would.
    """

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
        self._ctl = _Port("ctl")
        self._tty = _Port("tty")
        self._ctl_conn = AgentCtlConnection(config.dialect)
        self._ready_sent = False
        self._status = 0
        self._root: anyio.CancelScope | None = None
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
        netns_fd = os.open(cfg.netns, os.O_RDONLY | os.O_CLOEXEC) if cfg.netns else None
        try:
            _remove_stale_socket(cfg.ctl)
            _remove_stale_socket(cfg.tty)
            ctl_listener = await anyio.create_unix_listener(cfg.ctl)
            tty_listener = await anyio.create_unix_listener(cfg.tty)
            async with ctl_listener, tty_listener, anyio.create_task_group() as tg:
                self._root = tg.cancel_scope
                self.agent = Agent(
                    dialect=self.dialect,
                    share=cfg.share,
                    channels=self,
                    task_group=tg,
                    chroot=os.geteuid() == 0,
                    netns_fd=netns_fd,
                )
                if handle_signals:
                    await tg.start(self._watch_signals)
                tg.start_soon(self._accept, ctl_listener, self._ctl, self._serve_ctl, tg)
                tg.start_soon(self._accept, tty_listener, self._tty, self._serve_tty, tg)
                log.info(
                    "listening: ctl %s, tty %s (%s dialect)", cfg.ctl, cfg.tty, self.dialect.name
                )
                if ready is not None:
                    ready()
        finally:
            if self.agent is not None:
                self.agent.kill_everything()
            for path in (cfg.ctl, cfg.tty):
                _remove_stale_socket(path)
            if netns_fd is not None:
                os.close(netns_fd)
            self._recorder.close()
        return self._status

    async def _watch_signals(self, *, task_status: TaskStatus[None]) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            task_status.started()  # handlers are installed before anyone hears "ready"
            async for signum in signals:
                log.info("got %s: shutting down", signal.Signals(signum).name)
                self.stop(0)
                return

    async def _accept(
        self,
        listener: SocketListener,
        port: _Port,
        serve: Callable[[SocketStream], Awaitable[None]],
        tg: TaskGroup,
    ) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # e.g. EMFILE: back off instead of spinning
                log.warning("%s: accept failed: %s", port.name, exc)
                await anyio.sleep(ACCEPT_RETRY_DELAY)
                continue
            log.info("%s: host connected", port.name)
            scope = port.replace(stream)
            if port is self._ctl:
                self._ctl_conn = AgentCtlConnection(self.dialect)
            tg.start_soon(self._serve, port, stream, scope, serve)
            both = self._ctl.stream is not None and self._tty.stream is not None
            if both and not self._ready_sent:
                self._ready_sent = True
                await self._ctl.send(self._ctl_conn.send_ready())

    async def _serve(
        self,
        port: _Port,
        stream: SocketStream,
        scope: anyio.CancelScope,
        serve: Callable[[SocketStream], Awaitable[None]],
    ) -> None:
        try:
            with scope:
                await serve(stream)
        except ProtocolError as exc:
            log.warning("%s: %s; closing the connection", port.name, exc)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            log.info("%s: connection lost (%s)", port.name, exc)
        except Exception:  # a simulator bug: drop this connection, keep the VM up
            log.exception("%s: closing the connection after an internal error", port.name)
        finally:
            port.release(stream)
            with anyio.CancelScope(shield=True):
                await stream.aclose()
            log.info("%s: host disconnected", port.name)

    # -- ctl -----------------------------------------------------------------------------------

    async def _serve_ctl(self, stream: SocketStream) -> None:
        conn = self._ctl_conn
        splitter = ReadSplitter()
        while True:
            try:
                chunk = await stream.receive(RECEIVE_SIZE)
            except anyio.EndOfStream:
                return
            for piece in splitter.split(chunk) if self._hyper else [chunk]:
                if self._hyper and not self._faults.silent:
                    await self._ctl.send(conn.send_next(len(piece)), stream)
                conn.receive_data(piece)
                while isinstance(frame := conn.next_event(), CtlFrame):
                    await self._command(stream, conn, frame)

    async def _command(
        self, stream: SocketStream, conn: AgentCtlConnection, frame: CtlFrame
    ) -> None:
        assert self.agent is not None
        action = self._faults.next_command()
        name = self.dialect.name_of(frame.code)
        self._recorder.record(frame.code, name, frame.payload)
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
            await anyio.sleep_forever()
        if action is Action.SILENT:
            return
        answer = await self.agent.handle(frame)
        if self._faults.delay:
            await anyio.sleep(self._faults.delay)
        if action is Action.GARBAGE:
            await self._ctl.send(GARBAGE, stream)
            return
        await self._ctl.send(
            conn.send_ack(answer.payload) if answer.ok else conn.send_error(answer.payload), stream
        )

    # -- tty -----------------------------------------------------------------------------------

    async def _serve_tty(self, stream: SocketStream) -> None:
        assert self.agent is not None
        decoder = TtyDecoder(MAX_TTY_FRAME_HYPER if self._hyper else DEFAULT_MAX_FRAME)
        while True:
            try:
                chunk = await stream.receive(RECEIVE_SIZE)
            except anyio.EndOfStream:
                return
            decoder.feed(chunk)
            while (frame := decoder.next_frame()) is not None:
                await self.agent.stdin(frame)

    # -- Channels (what the agent sends unsolicited) --------------------------------------------

    async def send_tty(self, data: bytes) -> None:
        await self._tty.send(data)

    async def send_event(self, event: ProcessAsyncEvent) -> None:
        if not self._faults.silent:
            await self._ctl.send(self._ctl_conn.send_event(event))


def _remove_stale_socket(path: Path) -> None:
    """Remove a leftover socket file at ``path`` (never anything else)."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
