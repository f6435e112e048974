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
from collections.abc import Callable, Sequence
from typing import IO, Final

from hyperd.procs import ProcessIdentity, identify, is_same_process

READY_LINE: Final = b"ready\n"
READY_TIMEOUT: Final = 30.0
"""Seconds a helper gets to report ready (a loaded 2-core machine starts Python slowly)."""
STOP_GRACE: Final = 5.0
"""Seconds between SIGTERM and SIGKILL when stopping a helper and its descendants."""
POLL_INTERVAL: Final = 0.02
PR_SET_PDEATHSIG: Final = 1
LOG_DIR_ENV: Final = "HYPERD_BENCH_LOG_DIR"
"""When set, each helper's stderr is appended to a file in this directory (debugging)."""


class HelperError(RuntimeError):
    """A helper process did not start (the message carries the tail of its stderr)."""


def _set_pdeathsig() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def python_argv(module: str) -> list[str]:
    """``[python, -m, module]``: our own programs, runnable without an install."""
    return [sys.executable, "-m", module]


def _process_table() -> tuple[dict[int, list[int]], dict[int, str]]:
    """From ``/proc/*/stat``: each pid's children, and each pid's state letter (``Z``: zombie)."""
    children: dict[int, list[int]] = {}
    states: dict[int, str] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2 :].split()
        if len(fields) > 1:
            states[int(name)] = fields[0].decode()
            children.setdefault(int(fields[1]), []).append(int(name))
    return children, states


def child_pids(parent: int) -> list[int]:
    """The pids whose parent is ``parent`` (zombies included)."""
    return _process_table()[0].get(parent, [])


def descendant_pids(root: int, *, live: bool = False) -> list[int]:
    """Every pid below ``root`` (children first, then theirs); ``live``: zombies left out."""
    children, states = _process_table()
    out: list[int] = []
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if not live or states.get(pid) != "Z":
            out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def descendants(pid: int) -> list[ProcessIdentity]:
    """Every process below ``pid`` (children first, then theirs), with its start time."""
    return [ident for child in descendant_pids(pid) if (ident := identify(child)) is not None]


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

    def __init__(
        self, on_start: Callable[[subprocess.Popen[bytes], Sequence[str]], None] | None = None
    ) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []
        self._started = 0
        self._on_start = on_start
        """Called with each process just started (``--profile`` attaches py-spy there)."""

    def spawn(
        self,
        argv: Sequence[str],
        *,
        what: str,
        ready: bool = True,
        ready_timeout: float = READY_TIMEOUT,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` (+ ``--ready-fd N`` when ``ready``) and wait for its ready line.

        stdout and stderr go to /dev/null (stderr to a file in ``$HYPERD_BENCH_LOG_DIR`` when
        set): pass a quiet ``--log-level`` in ``argv``.
        Raises :class:`HelperError` (after stopping it) if it is not ready in time.
        """
        if not ready:
            return self._start(argv, env, None)
        return self.spawn_many([argv], what=what, ready_timeout=ready_timeout, env=env)[0]

    def spawn_many(
        self,
        argvs: Sequence[Sequence[str]],
        *,
        what: str,
        ready_timeout: float = READY_TIMEOUT,
        env: dict[str, str] | None = None,
    ) -> list[subprocess.Popen[bytes]]:
        """Start every ``argv`` at once (each with ``--ready-fd``), then wait for all of them."""
        started: list[tuple[subprocess.Popen[bytes], int, list[str]]] = []
        try:
            for argv in argvs:
                read_fd, write_fd = os.pipe()
                full = [*argv, "--ready-fd", str(write_fd)]
                try:
                    proc = self._start(full, env, write_fd)
                except BaseException:
                    os.close(read_fd)
                    raise
                finally:
                    os.close(write_fd)
                started.append((proc, read_fd, full))
            deadline = time.monotonic() + ready_timeout
            lines = {fd: b"" for _, fd, _ in started}
            waiting = set(lines)
            while waiting:
                left = deadline - time.monotonic()
                readable, _, _ = select.select(list(waiting), [], [], max(left, 0))
                if not readable:
                    break
                for fd in readable:
                    chunk = os.read(fd, 64)
                    lines[fd] += chunk
                    if not chunk or lines[fd].endswith(b"\n"):
                        waiting.discard(fd)
            for proc, fd, full in started:
                if lines[fd] != READY_LINE:
                    self.stop(proc)
                    raise HelperError(
                        f"{what} did not get ready within {ready_timeout:g} s "
                        f"(exit status {proc.returncode}, wrote {lines[fd]!r}): {' '.join(full)}"
                    )
        finally:
            for _, fd, _ in started:
                os.close(fd)
        return [proc for proc, _, _ in started]

    def _start(
        self, argv: Sequence[str], env: dict[str, str] | None, ready_fd: int | None
    ) -> subprocess.Popen[bytes]:
        log_dir = os.environ.get(LOG_DIR_ENV)
        if log_dir:
            self._started += 1
            name = os.path.basename(argv[2] if len(argv) > 2 else argv[0]).replace("/", "_")
            err: int | IO[bytes] = open(  # noqa: SIM115 - the child keeps it
                os.path.join(log_dir, f"{self._started:04d}-{name}.log"), "ab"
            )
        else:
            err = subprocess.DEVNULL
        try:
            proc = self._popen(argv, env, ready_fd, err)
        finally:
            if not isinstance(err, int):
                err.close()
        self._procs.append(proc)
        if self._on_start is not None:
            self._on_start(proc, argv)
        return proc

    @staticmethod
    def _popen(
        argv: Sequence[str], env: dict[str, str] | None, ready_fd: int | None, err: int | IO[bytes]
    ) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            list(argv),
            pass_fds=(ready_fd,) if ready_fd is not None else (),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            preexec_fn=_set_pdeathsig,  # the main thread spawns: the death signal follows it
        )

    def stop(self, proc: subprocess.Popen[bytes], grace: float = STOP_GRACE) -> None:
        """SIGTERM ``proc`` and, once it is gone, whatever it started that is still there;
        SIGKILL for anything that outlives ``grace``."""
        if proc.poll() is None:
            tree = descendants(proc.pid)
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(proc.pid, signal.SIGKILL)  # not reaped yet: still our group
                proc.kill()
                proc.wait()
            left = [ident for ident in tree if is_same_process(ident)]
            for ident in left:
                _signal(ident, signal.SIGTERM)
            if not _wait_gone(left, grace):
                for ident in left:
                    _signal(ident, signal.SIGKILL)
                _wait_gone(left, grace)
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        """Stop every helper still running, newest first."""
        while self._procs:
            self.stop(self._procs[-1])

    def __len__(self) -> int:
        return len(self._procs)
