"""The helper processes a benchmark run starts, and making sure they all die with it.

:class:`Processes` starts programs the way the daemon does (``--ready-fd`` pipe, one ``ready``
line, a deadline), each in its own process group, with ``PR_SET_PDEATHSIG`` set to SIGTERM so
that they are told to go even if the runner itself is killed with SIGKILL.
:meth:`Processes.stop_all` (called from ``finally`` blocks and on SIGTERM) stops each of them and
every process below it: the daemon starts its pods' proxies and simulated VMs in sessions of
their own, so the whole tree is snapshotted from ``/proc`` before anything is signalled, and what
survives SIGTERM gets SIGKILL. Only pids that still carry the start time seen in the snapshot
are signalled (a reused pid is never touched).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Final

from hyperd.procs import ProcessIdentity, identify, is_same_process

READY_LINE: Final = b"ready\n"
READY_TIMEOUT: Final = 30.0
"""Seconds a helper gets to report ready (a loaded 2-core machine starts Python slowly)."""
STOP_GRACE: Final = 5.0
"""Seconds between SIGTERM and SIGKILL when stopping a helper and its descendants."""
POLL_INTERVAL: Final = 0.02
PR_SET_PDEATHSIG: Final = 1


class HelperError(RuntimeError):
    """A helper process did not start (the message carries the tail of its stderr)."""


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def python_argv(module: str) -> list[str]:
    """``[python, -m, module]``: our own programs, runnable without an install."""
    return [sys.executable, "-m", module]


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        end = data.rfind(b")")
        fields = data[end + 2 :].split()
        if len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(int(name))
    return children


def descendants(pid: int) -> list[ProcessIdentity]:
    """Every process below ``pid`` (children first, then theirs), with its start time."""
    children = _children_map()
    out: list[ProcessIdentity] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        ident = identify(child)
        if ident is not None:
            out.append(ident)
        todo.extend(children.get(child, []))
    return out


def _signal(ident: ProcessIdentity, signum: int) -> None:
    if is_same_process(ident):
        with contextlib.suppress(OSError):
            os.kill(ident.pid, signum)


def _wait_gone(idents: Sequence[ProcessIdentity], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(is_same_process(i) for i in idents):
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_INTERVAL)
    return True


class Processes:
    """The helpers of one run; :meth:`stop_all` is idempotent and safe to call from anywhere."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def spawn(
        self,
        argv: Sequence[str],
        *,
        what: str,
        ready: bool = True,
        ready_timeout: float = READY_TIMEOUT,
        env: dict[str, str] | None = None,
        stdout: int | None = subprocess.DEVNULL,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` (+ ``--ready-fd N`` when ``ready``) and wait for its ready line.

        stderr is kept in a pipe only until the program is ready (for the error message), then
        sent to /dev/null by the program's own logging level choice: pass ``--log-level error``
        or similar in ``argv`` to keep helpers quiet.
        """
        read_fd, write_fd = os.pipe() if ready else (-1, -1)
        full = [*argv, "--ready-fd", str(write_fd)] if ready else list(argv)
        try:
            proc = subprocess.Popen(
                full,
                pass_fds=(write_fd,) if ready else (),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,
                preexec_fn=_set_pdeathsig,  # the main thread spawns: the death signal follows it
            )
        finally:
            if ready:
                os.close(write_fd)
        self._procs.append(proc)
        if not ready:
            return proc
        try:
            line = b""
            deadline = time.monotonic() + ready_timeout
            while not line.endswith(b"\n"):
                left = deadline - time.monotonic()
                readable, _, _ = select.select([read_fd], [], [], max(left, 0))
                if not readable:
                    break
                chunk = os.read(read_fd, 64)
                if not chunk:
                    break
                line += chunk
        finally:
            os.close(read_fd)
        if line != READY_LINE:
            self.stop(proc)
            raise HelperError(
                f"{what} did not get ready within {ready_timeout:g} s "
                f"(exit status {proc.returncode}, wrote {line!r}): {' '.join(full)}"
            )
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = STOP_GRACE) -> None:
        """SIGTERM ``proc``; SIGKILL it and whatever it started that outlives ``grace``."""
        if proc.poll() is None:
            tree = descendants(proc.pid)
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.kill()
                proc.wait()
            if not _wait_gone(tree, grace):
                for ident in tree:
                    _signal(ident, signal.SIGKILL)
                _wait_gone(tree, grace)
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        """Stop every helper still running, newest first."""
        while self._procs:
            self.stop(self._procs[-1])

    def __len__(self) -> int:
        return len(self._procs)
