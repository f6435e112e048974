"""Test helpers: start hyperd-sim as a real process and drive it as a host would.

:func:`start_sim` spawns ``python -m hyperd.sim`` and waits for ``ready`` on a pipe.
:class:`HostClient` is a small blocking host built on :mod:`protocol.hyperstart`: it connects to
both sockets, keeps every ctl and tty event it reads, and waits for the ones a test asks for.
"""

from __future__ import annotations

import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from protocol import NEED_DATA
from protocol.hyperstart import (
    CC,
    AsyncEvent,
    Code,
    Container,
    Dialect,
    EnvironmentVar,
    HostCtlConnection,
    HostTtyConnection,
    NextAck,
    Pod,
    Process,
    Ready,
    Reply,
    TtyData,
    TtyEof,
    TtyExitStatus,
    UnexpectedReply,
    encode_message,
)
from tests.procs import spawn_ready, stop

READY_TIMEOUT = 10.0  # seconds for the simulator to start listening
WAIT_TIMEOUT = 10.0  # seconds any single wait may take
EXIT_TIMEOUT = 10.0  # seconds for the simulator to exit after SIGTERM
RECV_SIZE = 65536


@dataclass
class Sim:
    """A running simulator process and its paths."""

    proc: subprocess.Popen[bytes]
    ctl: Path
    tty: Path
    share: Path
    record: Path
    dialect: Dialect

    def stop(self) -> int:
        """SIGTERM the simulator and return its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(EXIT_TIMEOUT)

    def recorded(self) -> list[dict[str, Any]]:
        """The commands the simulator recorded so far."""
        if not self.record.exists():
            return []
        return [msgspec.json.decode(line) for line in self.record.read_bytes().splitlines()]

    def client(self) -> HostClient:
        return HostClient(self.ctl, self.tty, self.dialect)


@contextmanager
def start_sim(base: Path, *extra: str, dialect: Dialect = CC) -> Iterator[Sim]:
    """Run ``python -m hyperd.sim`` with sockets in ``base`` and ``base/share`` as share."""
    share = base / "share"
    share.mkdir(exist_ok=True)
    ctl, tty, record = base / "ctl.sock", base / "tty.sock", base / "record.jsonl"
    argv = [
        sys.executable, "-m", "hyperd.sim", "--ctl", str(ctl), "--tty", str(tty),
        "--share", str(share), "--dialect", dialect.name, "--record", str(record),
        "--log-level", "DEBUG", *extra,
    ]  # fmt: skip
    proc = spawn_ready(argv, deadline=READY_TIMEOUT)
    sim = Sim(proc, ctl, tty, share, record, dialect)
    try:
        yield sim
    finally:
        stop(proc, EXIT_TIMEOUT)


@dataclass
class Output:
    """What arrived on the tty channel for one seq."""

    data: bytearray = field(default_factory=bytearray)
    eof: bool = False
    status: int | None = None


class HostClient:
    """A blocking host on both channels. Every wait has a deadline (AssertionError on expiry)."""

    def __init__(self, ctl: Path, tty: Path, dialect: Dialect = CC) -> None:
        self.dialect = dialect
        self.ctl_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.ctl_sock.connect(str(ctl))
        self.tty_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.tty_sock.connect(str(tty))
        self.ctl = HostCtlConnection(dialect)
        self.tty = HostTtyConnection(exit_status_frames=dialect.name == "cc")
        self.ready = False
        self.replies: list[Reply] = []
        self.nexts: list[int] = []
        self.events: list[Any] = []
        self.unexpected: list[UnexpectedReply] = []
        self.ctl_log: list[object] = []  # every ctl event in arrival order
        self.outputs: dict[int, Output] = {}
        self.tty_eofs: list[int] = []
        self.ctl_closed = False
        self.tty_closed = False
        self.ctl_raw = bytearray()  # every byte read on ctl, for byte-exact checks

    def close(self) -> None:
        self.ctl_sock.close()
        self.tty_sock.close()

    def __enter__(self) -> HostClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -------------------------------------------------------------------------------

    def _read(self, timeout: float) -> None:
        socks = [
            s
            for s, closed in ((self.ctl_sock, self.ctl_closed), (self.tty_sock, self.tty_closed))
            if not closed
        ]
        if not socks:
            time.sleep(timeout)
            return
        readable, _, _ = select.select(socks, [], [], timeout)
        for sock in readable:
            try:
                data = sock.recv(RECV_SIZE)
            except ConnectionResetError:
                data = b""
            if sock is self.ctl_sock:
                self.ctl_closed = not data
                if data:
                    self.ctl_raw += data
                    self.ctl.receive_data(data)
                self._drain_ctl()
            else:
                self.tty_closed = not data
                self.tty.receive_data(data)
                self._drain_tty()

    def _drain_ctl(self) -> None:
        while (ev := self.ctl.next_event()) is not NEED_DATA:
            self.ctl_log.append(ev)
            if isinstance(ev, Ready):
                self.ready = True
            elif isinstance(ev, Reply):
                self.replies.append(ev)
            elif isinstance(ev, NextAck):
                self.nexts.append(ev.count)
            elif isinstance(ev, AsyncEvent):
                self.events.append(ev.event)
            elif isinstance(ev, UnexpectedReply):
                self.unexpected.append(ev)

    def _drain_tty(self) -> None:
        while (ev := self.tty.next_event()) is not NEED_DATA:
            if isinstance(ev, TtyData):
                self.output(ev.seq).data += ev.data
            elif isinstance(ev, TtyEof):
                self.output(ev.seq).eof = True
                self.tty_eofs.append(ev.seq)
            elif isinstance(ev, TtyExitStatus):
                self.output(ev.seq).status = ev.status

    def wait_for(
        self, cond: Callable[[], bool], timeout: float = WAIT_TIMEOUT, what: str = ""
    ) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            left = deadline - time.monotonic()
            assert left > 0, f"timed out waiting for {what or cond}"
            self._read(min(left, 0.05))

    def settle(self, seconds: float = 0.2) -> None:
        """Read whatever arrives during ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self._read(left)

    def output(self, seq: int) -> Output:
        return self.outputs.setdefault(seq, Output())

    # -- commands ------------------------------------------------------------------------------

    def wait_ready(self) -> None:
        self.wait_for(lambda: self.ready, what="READY")

    def send(self, code: int, payload: bytes | msgspec.Struct = b"") -> None:
        """Send one command (a Struct is encoded in the client's dialect)."""
        body = payload if isinstance(payload, bytes) else encode_message(payload, self.dialect)
        self.ctl_sock.sendall(self.ctl.send_command(code, body))

    def reply(self, timeout: float = WAIT_TIMEOUT) -> Reply:
        """The next reply not yet taken."""
        self.wait_for(lambda: bool(self.replies), timeout, "a reply")
        return self.replies.pop(0)

    def command(self, code: int, payload: bytes | msgspec.Struct = b"") -> Reply:
        self.send(code, payload)
        return self.reply()

    def ok(self, code: int, payload: bytes | msgspec.Struct = b"") -> bytes:
        """Send a command that must be ACKed; return the ACK payload."""
        r = self.command(code, payload)
        assert r.ok, f"command {code} failed: {r.payload!r}"
        return r.payload

    def stdin(self, seq: int, data: bytes) -> None:
        self.tty_sock.sendall(self.tty.send_stdin(seq, data))

    def wait_exit(self, seq: int, timeout: float = WAIT_TIMEOUT) -> Output:
        """Wait for EOF and exit status (CC) of ``seq``."""
        out = self.output(seq)
        self.wait_for(lambda: out.eof and out.status is not None, timeout, f"exit of seq {seq}")
        return out

    def wait_event(self, process: str, timeout: float = WAIT_TIMEOUT) -> Any:
        """Wait for the hyperhq PROCESSASYNCEVENT of ``process``."""

        def found() -> bool:
            return any(e.process == process for e in self.events)

        self.wait_for(found, timeout, f"exit event of {process}")
        return next(e for e in self.events if e.process == process)


def process(
    args: list[str],
    stdio: int,
    stderr: int = 0,
    *,
    pid: str = "",
    terminal: bool = False,
    **kw: object,
) -> Process:
    """A process spec with PATH=/bin and workdir /."""
    return Process(
        id=pid,
        terminal=terminal,
        stdio=stdio,
        stderr=stderr,
        args=args,
        envs=[EnvironmentVar(env="PATH", value="/bin")],
        workdir="/",
        **kw,  # type: ignore[arg-type]
    )


def container(cid: str, proc: Process) -> Container:
    return Container(id=cid, rootfs="rootfs", image=cid, process=proc)


def start_pod(c: HostClient, hostname: str = "pod1") -> None:
    c.wait_ready()
    c.ok(Code.STARTPOD, Pod(hostname=hostname, share_dir="hyperShared"))
