"""Process identity that survives a daemon restart: a pid plus its kernel start time.

A pid alone can be reused by an unrelated process after the one hyperd started has died;
the start time (field 22 of ``/proc/<pid>/stat``, in clock ticks since boot) tells them apart.
:func:`terminate` signals a process only while it is still the same process.
"""

from __future__ import annotations

import os
import select
import signal

import msgspec

_STAT_STARTTIME = 19  # index of field 22 (starttime) after the ") " that ends comm


class ProcessIdentity(msgspec.Struct, frozen=True):
    """A process as the kernel knows it: pid and start time in clock ticks since boot."""

    pid: int
    start_time: int


def start_time(pid: int) -> int | None:
    """The start time of ``pid``, or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm may contain spaces and parentheses: the fields start after the *last* ")"
    end = data.rfind(b")")
    if end < 0:
        return None
    fields = data[end + 2 :].split()
    try:
        return int(fields[_STAT_STARTTIME])
    except (IndexError, ValueError):
        return None


def identify(pid: int) -> ProcessIdentity | None:
    """The identity of the running process ``pid``, or None when it does not exist."""
    st = start_time(pid)
    return None if st is None else ProcessIdentity(pid, st)


def is_zombie(pid: int) -> bool:
    """True when ``pid`` has exited but was not reaped yet."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    end = data.rfind(b")")
    return data[end + 2 : end + 3] == b"Z"


def is_same_process(identity: ProcessIdentity) -> bool:
    """True while the process ``identity`` names is alive (a reused pid does not count)."""
    return start_time(identity.pid) == identity.start_time and not is_zombie(identity.pid)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _wait_gone(identity: ProcessIdentity, timeout: float) -> bool:
    """Wait (on a pidfd, no polling) until the process exits; True when it is gone."""
    try:
        pidfd = os.pidfd_open(identity.pid)
    except ProcessLookupError:
        return True
    try:
        if not is_same_process(identity):  # the pid was reused between our check and the open
            return True
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        poller.poll(int(timeout * 1000))
    finally:
        os.close(pidfd)
    _reap(identity.pid)
    return not is_same_process(identity)


def terminate(identity: ProcessIdentity, timeout: float = 5.0) -> bool:
    """SIGTERM the process, wait up to ``timeout``, then SIGKILL. True when it is gone.

    Blocking: call it from a worker thread in async code.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not is_same_process(identity):
            _reap(identity.pid)
            return True
        try:
            os.kill(identity.pid, sig)
        except ProcessLookupError:
            return True
        if _wait_gone(identity, timeout):
            return True
    return not is_same_process(identity)
