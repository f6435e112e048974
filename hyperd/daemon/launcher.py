"""Starting, watching and stopping the helper processes of a pod (simulated VM, per-pod proxy).

Processes are started in their own session (so a terminal's ^C or a daemon restart does not
reach them) with the write end of a pipe passed as ``--ready-fd``; :func:`launch` returns once
the program wrote ``ready\\n`` on it, or raises :class:`hyperd.errors.Timeout` /
:class:`hyperd.errors.VMUnavailable` (the program exited first) after killing it.

A started process is known by a :class:`~hyperd.daemon.model.ProcessRef` (pid + start time), so
it can be re-adopted after a daemon restart and a reused pid is never signalled by mistake.
:func:`wait_exit` waits on a pidfd, which works for adopted processes that are not our children.

Intent first: a caller records a :class:`~hyperd.daemon.model.LaunchIntent` (:func:`intent`)
before it starts a helper and passes its marker to :func:`launch` / :func:`spawn`, which put it
in the helper's environment (:data:`MARKER_ENV`). A daemon that crashed between the start and
the record of the pid finds the helper again with :func:`find_marked`, whatever program it is
(simulated VM, proxy, QEMU).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Collection, Sequence

import anyio

from hyperd import procs
from hyperd.daemon.model import LaunchIntent, ProcessRef
from hyperd.errors import Timeout, VMUnavailable

log = logging.getLogger(__name__)

READY_LINE = b"ready\n"
STOP_GRACE = 3.0  # seconds between SIGTERM and SIGKILL when stopping a helper process
MARKER_ENV = "HYPERD_HELPER_ID"  # in a helper's environment: the marker of its LaunchIntent
MARKER_BYTES = 12  # random bytes of a marker (hex in the environment)


def intent(kind: str) -> LaunchIntent:
    """A new :class:`LaunchIntent` of ``kind`` with a fresh random marker."""
    return LaunchIntent(kind=kind, marker=secrets.token_hex(MARKER_BYTES))


def environment(marker: str | None) -> dict[str, str] | None:
    """The environment of a helper carrying ``marker`` (``None``: inherit hyperd's)."""
    if marker is None:
        return None
    return {**os.environ, MARKER_ENV: marker}


def find_marked(markers: Collection[str]) -> dict[str, list[ProcessRef]]:
    """The running processes whose environment carries one of ``markers``, by marker.

    Reads ``/proc/<pid>/environ`` of every process (a restart-time cost, not a hot path); a
    process whose environment cannot be read (another user's, or gone) is skipped.
    """
    wanted = {f"{MARKER_ENV}={m}".encode(): m for m in markers}
    found: dict[str, list[ProcessRef]] = {}
    if not wanted:
        return found
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                variables = f.read().split(b"\0")
        except OSError:
            continue
        for variable in variables:
            marker = wanted.get(variable)
            if marker is not None:
                pid = int(name)
                started = procs.start_time(pid)
                if started is not None:
                    found.setdefault(marker, []).append(ProcessRef(pid=pid, start_time=started))
                break
    return found


def is_alive(ref: ProcessRef) -> bool:
    """Whether the process ``ref`` names still runs (same pid *and* same start time)."""
    return procs.is_same_process(procs.ProcessIdentity(ref.pid, ref.start_time))


# Children started by this process, kept until reaped: a Popen dropped while its child runs
# warns (ResourceWarning) and is reaped behind our back by the subprocess module.
_children: dict[int, subprocess.Popen[bytes]] = {}


def _reap(pid: int) -> None:
    child = _children.get(pid)
    if child is not None:
        if child.poll() is not None:
            del _children[pid]
        return
    with contextlib.suppress(ChildProcessError, OSError):  # adopted: not our child
        os.waitpid(pid, os.WNOHANG)


def python_module_argv(module: str) -> list[str]:
    """``[sys.executable, "-m", module]``: runs our own programs without an install."""
    return [sys.executable, "-m", module]


def track(proc: subprocess.Popen[bytes], what: str) -> ProcessRef:
    """Keep a child started elsewhere (e.g. QEMU) until reaped; returns its reference."""
    _children[proc.pid] = proc
    log.info("started %s pid %d", what, proc.pid)
    argv = proc.args if isinstance(proc.args, list) else [str(proc.args)]
    return ProcessRef(pid=proc.pid, start_time=procs.start_time(proc.pid) or 0, argv=argv)


def spawn(argv: Sequence[str], *, what: str, marker: str | None = None) -> ProcessRef:
    """Start ``argv`` without a readiness handshake (for programs that have no ``--ready-fd``,
    such as the reference cc-proxy: its clients retry connecting, as the seed does).

    ``marker``: put in the process's environment as :data:`MARKER_ENV` (see :func:`intent`).
    """
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=environment(marker),
        )
    except OSError as exc:
        raise VMUnavailable(f"cannot start {what}: {exc}") from None
    _children[proc.pid] = proc
    log.info("started %s pid %d (no readiness handshake)", what, proc.pid)
    return ProcessRef(pid=proc.pid, start_time=procs.start_time(proc.pid) or 0, argv=list(argv))


async def launch(
    argv: Sequence[str], *, what: str, deadline: float, marker: str | None = None
) -> ProcessRef:
    """Start ``argv + ["--ready-fd", N]`` and wait until it reports ready.

    Raises ``Timeout`` if it is not ready within ``deadline`` seconds, ``VMUnavailable`` if it
    exits (or closes the pipe) before that; in both cases the process is killed first.
    ``marker``: put in the process's environment as :data:`MARKER_ENV` (see :func:`intent`).
    """
    read_fd, write_fd = os.pipe()
    full = [*argv, "--ready-fd", str(write_fd)]
    try:
        # a plain Popen, not anyio's process: the helper must outlive this event loop (it is
        # re-adopted by pid after a daemon restart); the fork itself does not block
        proc = subprocess.Popen(  # noqa: ASYNC220
            full,
            pass_fds=(write_fd,),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=environment(marker),
        )
    except OSError as exc:
        os.close(read_fd)
        os.close(write_fd)
        raise VMUnavailable(f"cannot start {what}: {exc}") from None
    os.close(write_fd)
    _children[proc.pid] = proc
    ref = ProcessRef(pid=proc.pid, start_time=procs.start_time(proc.pid) or 0, argv=full)
    try:
        line = b""
        with anyio.fail_after(deadline):
            while not line.endswith(b"\n"):
                await anyio.wait_readable(read_fd)
                chunk = os.read(read_fd, 64)
                if not chunk:
                    break
                line += chunk
    except TimeoutError:
        await terminate(ref)
        raise Timeout(f"{what} was not ready within {deadline:g} s") from None
    except BaseException:
        await terminate(ref)
        raise
    finally:
        os.close(read_fd)
    if line != READY_LINE:
        await terminate(ref)
        status = proc.poll()
        raise VMUnavailable(
            f"{what} exited before it was ready"
            + (f" (status {status})" if status is not None else f" (wrote {line!r})")
        )
    log.info("started %s pid %d", what, proc.pid)
    return ref


async def wait_exit(ref: ProcessRef) -> None:
    """Return when the process ``ref`` names has exited (at once if it is gone already)."""
    if not is_alive(ref):
        _reap(ref.pid)
        return
    try:
        pidfd = os.pidfd_open(ref.pid)
    except OSError:
        _reap(ref.pid)
        return
    try:
        if procs.start_time(ref.pid) == ref.start_time:
            await anyio.wait_readable(pidfd)
    finally:
        os.close(pidfd)
        _reap(ref.pid)


def signal_process(ref: ProcessRef, signum: int) -> bool:
    """Send ``signum`` to ``ref`` if it is still the same process; returns whether it was sent."""
    if not is_alive(ref):
        return False
    try:
        os.kill(ref.pid, signum)
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise
        return False
    return True


async def terminate(ref: ProcessRef, grace: float = STOP_GRACE) -> None:
    """SIGTERM ``ref``, SIGKILL it after ``grace`` seconds, and wait until it is gone."""
    if not signal_process(ref, signal.SIGTERM):
        _reap(ref.pid)
        return
    with anyio.move_on_after(grace, shield=True):
        await wait_exit(ref)
        return
    log.warning("pid %d ignored SIGTERM for %g s; killing it", ref.pid, grace)
    signal_process(ref, signal.SIGKILL)
    with anyio.move_on_after(grace, shield=True):
        await wait_exit(ref)
