"""Process exits: how hyperd learns them, records them, and lets callers wait for them.

Two sources, chosen per pod by what its proxy offers (``PodRecord.exit_notifications``):

- **the proxy** (hyperd-proxy's exit-notification extension): every exit of a process started
  with a token arrives on the pod's VM link with its status, also the exits that happened while
  hyperd was down (the proxy keeps them and sends them after the AttachVM of the re-adoption);
- **the shim's pid** (a proxy that sends none, such as the reference cc-proxy): a container
  created with ``shim_pid`` is pinned with a pidfd at ``container.create``; once it started, a
  watcher marks it exited when the pidfd turns readable (the shim is gone), with the status
  unknown (``exit_status: null`` and ``exit_reason`` saying why). A pidfd names one process, so
  a recycled pid is never taken for the shim.

Without either, exits are not observable: ``container.inspect`` says so (``exit_watch:
"none"``) and ``container.wait`` refuses rather than hang.

A ``shim_pid`` is accepted only if the caller could signal that process itself: the RPC
caller's uid (``SO_PEERCRED``) must be the process's real or saved uid (root callers excepted),
and ``container.kill`` before start signals through the pidfd (``pidfd_send_signal``), never
with ``kill()`` on a bare pid.

Recording an exit: the status is set once (a status, once known, never changes), ``exited_at``
when hyperd learned of it, the state goes ``running → exited``, one event ``{kind, state:
"exited", status}`` is published and the pod saved; waiters are woken once it is saved.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import anyio

from hyperd import procs
from hyperd.daemon.model import (
    ContainerRecord,
    ContainerState,
    ExecRecord,
    ExecState,
    PodRecord,
    exit_watch,
)
from hyperd.daemon.vmlink import LinkEvent
from hyperd.errors import InvalidParams, InvalidState, ShuttingDown, Timeout

if TYPE_CHECKING:
    from hyperd.daemon.service import Daemon

log = logging.getLogger(__name__)

ROOT_UID: Final = 0
SHIM_GONE: Final = (
    "the shim (pid {pid}) exited; the exit status is unknown: the pod's proxy sends no exit"
    " notifications"
)
STOPPED_UNKNOWN: Final = "stopped before its exit status was known"
NOT_OBSERVABLE: Final = (
    "exits of pod {pod!r} are not observable: its proxy sends no exit notifications and {what}"
)

Key = tuple[str, str]  # ("container" | "exec", id)


@dataclass
class ShimPin:
    """A shim process held by a pidfd (``fd``), which always names that one process."""

    pid: int
    fd: int
    start_time: int | None

    def send_signal(self, signum: int) -> None:
        """``pidfd_send_signal``; raises ``ProcessLookupError`` once the shim has exited."""
        signal.pidfd_send_signal(self.fd, signum)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _process_uids(pid: int) -> tuple[int, int, int]:
    """(real, effective, saved) uid of ``pid`` from ``/proc/<pid>/status``; ``OSError``."""
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
        for line in status:
            if line.startswith("Uid:"):
                real, effective, saved = (int(x) for x in line.split()[1:4])
                return real, effective, saved
    raise OSError(f"no Uid line in /proc/{pid}/status")


def pin_shim(pid: int, caller_uid: int) -> ShimPin:
    """Pin ``pid`` with a pidfd, if the caller owns it (as ``kill(2)`` would check).

    Raises :class:`InvalidParams` (``field: "shim_pid"``) when the process does not exist,
    or when ``caller_uid`` (not root) is neither its real nor its saved uid.
    """
    if pid <= 0:
        raise InvalidParams(f"invalid shim_pid {pid!r}: must be a positive pid", field="shim_pid")
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise InvalidParams(f"invalid shim_pid {pid}: no such process", field="shim_pid") from None
    except OSError as exc:
        raise InvalidParams(f"invalid shim_pid {pid}: {exc.strerror}", field="shim_pid") from None
    try:
        real, _, saved = _process_uids(pid)
        start = procs.start_time(pid)
        # still alive after the reads: they were about the process the pidfd holds
        signal.pidfd_send_signal(fd, 0)
    except OSError:
        os.close(fd)
        raise InvalidParams(
            f"invalid shim_pid {pid}: the process exited", field="shim_pid"
        ) from None
    if caller_uid != ROOT_UID and caller_uid not in (real, saved):
        os.close(fd)
        raise InvalidParams(
            f"invalid shim_pid {pid}: not a process of the caller (uid {caller_uid}); a shim_pid"
            " must name the caller's own shim",
            field="shim_pid",
        )
    return ShimPin(pid, fd, start)


def repin_shim(c: ContainerRecord) -> ShimPin | None:
    """Pin ``c``'s recorded shim again (after a restart), if it is still that process."""
    if c.shim_pid is None:
        return None
    try:
        fd = os.pidfd_open(c.shim_pid)
    except OSError:
        return None
    if c.shim_start_time is not None and procs.start_time(c.shim_pid) != c.shim_start_time:
        os.close(fd)  # the pid was recycled: that is not the shim
        return None
    return ShimPin(c.shim_pid, fd, c.shim_start_time)


@dataclass
class PodExits:
    """What one pod holds for exits beyond its record: waiters, pins, watchers."""

    events: dict[Key, anyio.Event] = field(default_factory=dict)
    early: dict[str, tuple[int, float]] = field(default_factory=dict)  # token -> status, time
    starting: set[str] = field(default_factory=set)  # tokens of execs being started
    pins: dict[str, ShimPin] = field(default_factory=dict)
    watchers: dict[str, anyio.CancelScope] = field(default_factory=dict)
    waiting: int = 0

    def waiter(self, key: Key) -> anyio.Event:
        event = self.events.get(key)
        if event is None:
            event = self.events[key] = anyio.Event()
        return event

    def wake(self, key: Key) -> None:
        event = self.events.pop(key, None)
        if event is not None:
            event.set()

    def wake_all(self) -> None:
        events, self.events = self.events, {}
        for event in events.values():
            event.set()

    def unpin(self, cid: str) -> None:
        scope = self.watchers.pop(cid, None)
        if scope is not None:
            scope.cancel()
        pin = self.pins.pop(cid, None)
        if pin is not None:
            pin.close()

    def close(self) -> None:
        """Forget every pin and watcher; wake every waiter (they look again and see why)."""
        for cid in list(self.pins):
            self.unpin(cid)
        for scope in self.watchers.values():
            scope.cancel()
        self.watchers.clear()
        self.early.clear()
        self.wake_all()


def _publish(d: Daemon, pod: PodRecord, kind: str, obj: ContainerRecord | ExecRecord) -> None:
    if isinstance(obj, ContainerRecord):
        d.publish(
            "container", pod, "exited", container=obj.id, status=obj.exit_status,
            reason=obj.exit_reason or None,
        )  # fmt: skip
    else:
        d.publish(
            "exec", pod, "exited", container=obj.container, exec_id=obj.id,
            status=obj.exit_status, reason=obj.exit_reason or None,
        )  # fmt: skip


def record_exit(
    d: Daemon,
    pod: PodRecord,
    obj: ContainerRecord | ExecRecord,
    status: int | None,
    reason: str = "",
    at: float | None = None,
) -> bool:
    """Record that ``obj``'s process ended (``status`` None: unknown, ``reason`` says why).

    Returns False when nothing was new (its status was known already, or it was already
    marked ended without one and no status came now). Publishes one event, saves the record (a
    failure is logged) and wakes the waiters.
    """
    if obj.exit_status is not None:
        return False
    if status is None and obj.exited_at is not None:
        return False
    obj.exit_status = status
    if obj.exited_at is None:
        obj.exited_at = at if at is not None else time.time()
    obj.exit_reason = "" if status is not None else reason
    kind = "container" if isinstance(obj, ContainerRecord) else "exec"
    if isinstance(obj, ContainerRecord):
        if obj.state == ContainerState.RUNNING:
            obj.state = ContainerState.EXITED
            d.rt(pod).exits.unpin(obj.id)  # its shim is of no more use to hyperd
    elif obj.state == ExecState.RUNNING:
        obj.state = ExecState.EXITED
    _publish(d, pod, kind, obj)
    d.save_logged(pod, obj)  # (a failure is logged; a restart asks the VM again)
    d.rt(pod).exits.wake((kind, obj.id))
    return True


def _find(pod: PodRecord, event: LinkEvent) -> ContainerRecord | ExecRecord | None:
    """The container or exec started with the exit's token (hyperd gives every process one;
    the proxy notifies only exits of processes started with a token)."""
    if not event.token:
        return None
    for c in pod.containers.values():
        if c.token == event.token:
            return c
    for e in pod.execs.values():
        if e.token == event.token:
            return e
    return None


def on_process_exited(d: Daemon, pod: PodRecord, event: LinkEvent) -> None:
    """An exit notification from the pod's proxy (also one kept while hyperd was down)."""
    obj = _find(pod, event)
    if obj is None:
        log.debug(
            "exit of an unknown process (token %s…, %s/%s)",
            event.token[:8], event.container, event.process, extra={"pod": pod.id},
        )  # fmt: skip
        return
    pod_exits = d.rt(pod).exits
    if obj.token in pod_exits.starting or (
        isinstance(obj, ContainerRecord) and obj.state == ContainerState.CREATED
    ):
        # its start still waits for newcontainer's/execcmd's reply, which came in the same
        # read: the start applies the exit once it has recorded the process as running
        pod_exits.early[obj.token] = (event.status, time.time())
        return
    record_exit(d, pod, obj, event.status)


def apply_early_exit(d: Daemon, pod: PodRecord, obj: ContainerRecord | ExecRecord) -> None:
    """Record an exit that arrived while ``obj``'s start was still waiting for its reply."""
    early = d.rt(pod).exits.early.pop(obj.token, None)
    if early is not None:
        record_exit(d, pod, obj, early[0], at=early[1])


# ---- the shim-pid fallback ------------------------------------------------------------------


def watch_shim(d: Daemon, pod: PodRecord, c: ContainerRecord) -> None:
    """Watch ``c``'s pinned shim when the proxy sends no exits (no-op otherwise)."""
    if pod.exit_notifications or c.state != ContainerState.RUNNING:
        return
    pod_exits = d.rt(pod).exits
    pin = pod_exits.pins.get(c.id)
    if pin is None:
        pin = repin_shim(c)
        if pin is None:
            if c.shim_pid is not None:
                record_exit(d, pod, c, None, SHIM_GONE.format(pid=c.shim_pid))
            return
        pod_exits.pins[c.id] = pin
    if c.id in pod_exits.watchers:
        return
    scope = anyio.CancelScope()
    pod_exits.watchers[c.id] = scope
    d.tg.start_soon(_watch, d, pod, c, os.dup(pin.fd), scope)


async def _watch(
    d: Daemon, pod: PodRecord, c: ContainerRecord, fd: int, scope: anyio.CancelScope
) -> None:
    # the watcher owns its own copy of the pidfd: unpinning closes the original at once
    try:
        with scope:
            await anyio.wait_readable(fd)  # a pidfd turns readable when its process exits
            log.info("shim pid %s exited", c.shim_pid, extra={"pod": pod.id, "container": c.id})
            if c.state == ContainerState.RUNNING:
                record_exit(d, pod, c, None, SHIM_GONE.format(pid=c.shim_pid))
    finally:
        os.close(fd)
        pod_exits = d.rt(pod).exits
        if pod_exits.watchers.get(c.id) is scope:
            del pod_exits.watchers[c.id]


# ---- waiting ------------------------------------------------------------------------------


def _ended(obj: ContainerRecord | ExecRecord) -> bool:
    if obj.exited_at is not None:
        return True
    if isinstance(obj, ContainerRecord):
        return obj.state in (ContainerState.EXITED, ContainerState.STOPPED)
    return obj.state == ExecState.EXITED


def _result(obj: ContainerRecord | ExecRecord) -> dict[str, Any]:
    reason = obj.exit_reason
    if obj.exit_status is None and not reason:
        reason = STOPPED_UNKNOWN
    return {"exit_status": obj.exit_status, "exited_at": obj.exited_at, "reason": reason}


def _lookup(d: Daemon, pod_id: str, kind: str, oid: str) -> tuple[PodRecord, Any]:
    from hyperd.daemon import containers

    pod: PodRecord = d.get_pod(pod_id)
    if kind == "container":
        return pod, containers.get_container(pod, oid)
    return pod, containers.get_exec(pod, oid)


def _check_observable(pod: PodRecord, obj: ContainerRecord | ExecRecord) -> None:
    if isinstance(obj, ContainerRecord):
        watch = exit_watch(pod, obj)
        what = "the container has no shim_pid"
    else:
        watch = exit_watch(pod)
        what = "exec processes have no shim_pid"
    if watch == "none":
        raise InvalidState(
            NOT_OBSERVABLE.format(pod=pod.id, what=what), pod=pod.id, exit_watch="none"
        )


async def wait(
    d: Daemon,
    pod_id: str,
    kind: str,
    oid: str,
    timeout: float | None,  # noqa: ASYNC109 - the API's parameter, turned into Timeout here
) -> dict[str, Any]:
    """``container.wait`` / ``exec.wait``: ``{exit_status, exited_at, reason}`` once the
    process has ended (at once if it has).

    Raises ``NotFound`` (also when the object is deleted while waiting), ``InvalidParams`` (bad
    timeout), ``Timeout`` (still running after ``timeout`` seconds; it keeps running),
    ``InvalidState`` when the pod's exits are not observable, ``ShuttingDown`` when hyperd
    stops meanwhile.
    """
    if timeout is not None and not (math.isfinite(timeout) and timeout >= 0):
        raise InvalidParams(f"invalid timeout {timeout!r}: seconds >= 0", field="timeout")
    pod, obj = _lookup(d, pod_id, kind, oid)
    try:
        with anyio.fail_after(timeout):
            while not _ended(obj):
                if d.stopping:
                    raise ShuttingDown(
                        f"hyperd is shutting down; wait for {kind} {obj.id!r} again after it"
                        " restarts (the process keeps running)",
                        pod=pod.id,
                    )
                _check_observable(pod, obj)
                pod_exits = d.rt(pod).exits
                event = pod_exits.waiter((kind, obj.id))
                pod_exits.waiting += 1
                try:
                    await event.wait()
                finally:
                    pod_exits.waiting -= 1
                pod, obj = _lookup(d, pod.id, kind, obj.id)
    except TimeoutError:
        raise Timeout(
            f"{kind} {obj.id!r} of pod {pod.id!r} still running after {timeout:g}s",
            pod=pod.id,
            **{"container" if kind == "container" else "exec_id": obj.id},
        ) from None
    return _result(obj)


def waiting(d: Daemon) -> int:
    """Calls of ``container.wait``/``exec.wait`` waiting now, over every pod."""
    return sum(rt.exits.waiting for rt in d.runtime.values())


__all__ = [
    "PodExits",
    "ShimPin",
    "apply_early_exit",
    "on_process_exited",
    "pin_shim",
    "record_exit",
    "repin_shim",
    "wait",
    "watch_shim",
]
