"""The persisted model of pods, containers and exec processes, and their state machines.

A pod's whole record (its VM and proxy processes, its containers, their exec processes, tokens
and every mount made for them) is one :class:`PodRecord`, a ``msgspec.Struct``. It is persisted
in rows (:mod:`hyperd.daemon.persist`): the pod's own fields, and one row per container and per
exec process, so that a change of one container writes that container only. The records are
mutable; the daemon changes them only while holding the owning object's lock and saves them
right after.

Intent first: what hyperd is about to create outside itself is recorded before it exists, so a
restart after a crash at any point finds it. A helper process is announced in
:attr:`PodRecord.launching` (its kind and the marker put in its environment) before it is
started; a container's stop is announced in :attr:`ContainerRecord.intent` before its agent
command. A container's start is not: a ``created`` record is the agent's to confirm after a
crash (:mod:`hyperd.daemon.adoption`), and its mounts are found in the mount table.

State transitions are written as tables (:data:`POD_TRANSITIONS`, :data:`CONTAINER_TRANSITIONS`):
:func:`check_pod_transition` / :func:`check_container_transition` raise
:class:`hyperd.errors.InvalidState` naming the object, its state and what was asked.
"""

from __future__ import annotations

import enum
import time
from typing import Literal

import msgspec

from hyperd.errors import InvalidState, VMUnavailable
from hyperd.spec import DeviceSpec, MountSpec, ProcessSpec, ResourcesSpec, RootfsSpec


class PodState(enum.StrEnum):
    """created → running → stopped; running → unreachable when the VM is lost."""

    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"
    UNREACHABLE = "unreachable"


class ContainerState(enum.StrEnum):
    """created → running → stopped; running → exited when the agent reports the init's end."""

    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"
    STOPPED = "stopped"


class ExecState(enum.StrEnum):
    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"


# operation -> states it may start from
POD_TRANSITIONS: dict[str, frozenset[PodState]] = {
    "start": frozenset({PodState.CREATED, PodState.STOPPED}),
    "stop": frozenset({PodState.RUNNING, PodState.UNREACHABLE}),
    "delete": frozenset({PodState.CREATED, PodState.STOPPED}),
    "use": frozenset({PodState.RUNNING}),  # container and exec operations
}

CONTAINER_TRANSITIONS: dict[str, frozenset[ContainerState]] = {
    "start": frozenset({ContainerState.CREATED}),
    "stop": frozenset({ContainerState.CREATED, ContainerState.RUNNING, ContainerState.EXITED}),
    "kill": frozenset({ContainerState.CREATED, ContainerState.RUNNING}),
    "ps": frozenset({ContainerState.RUNNING}),
    "exec": frozenset({ContainerState.RUNNING}),
    "delete": frozenset({ContainerState.CREATED, ContainerState.STOPPED}),
}


def check_pod_transition(pod: PodRecord, op: str) -> None:
    """Raise ``InvalidState`` unless ``op`` is allowed in the pod's current state.

    Using a pod whose VM was lost raises ``VMUnavailable`` (naming why) instead.
    """
    if op == "use" and pod.state == PodState.UNREACHABLE:
        raise VMUnavailable(
            f"pod {pod.id!r}: VM unreachable: {pod.reason}", pod=pod.id, state=str(pod.state)
        )
    if pod.state not in POD_TRANSITIONS[op]:
        allowed = ", ".join(sorted(POD_TRANSITIONS[op]))
        raise InvalidState(
            f"pod {pod.id!r} is {pod.state}: cannot {op} it (needs {allowed})",
            pod=pod.id,
            state=str(pod.state),
        )


def check_container_transition(pod: PodRecord, c: ContainerRecord, op: str) -> None:
    """Raise ``InvalidState`` unless ``op`` is allowed on the container in its current state."""
    if c.state not in CONTAINER_TRANSITIONS[op]:
        allowed = ", ".join(sorted(CONTAINER_TRANSITIONS[op]))
        raise InvalidState(
            f"container {c.id!r} of pod {pod.id!r} is {c.state}: cannot {op} it (needs {allowed})",
            pod=pod.id,
            container=c.id,
            state=str(c.state),
        )


class ProcessRef(msgspec.Struct, kw_only=True):
    """A host process hyperd started: pid plus its start time (clock ticks since boot, field 22
    of ``/proc/<pid>/stat``) so that a reused pid is never mistaken for it."""

    pid: int
    start_time: int
    argv: list[str] = []


class LaunchIntent(msgspec.Struct, kw_only=True):
    """A helper process (VM, proxy…) about to be started: recorded before it exists.

    ``marker`` is the value of :data:`hyperd.daemon.launcher.MARKER_ENV` in the process's
    environment, by which a restart finds it when the crash came before its pid was recorded.
    ``kind`` says which role it plays ("vm", "proxy", or a backend's own helper).
    """

    kind: str
    marker: str


class MountRecord(msgspec.Struct, kw_only=True):
    """A bind mount hyperd made: its target on the host, and what it is for.

    For a volume, ``source`` is its name relative to the pod's share (what the fsmap carries)
    and ``destination`` its path in the container; for the rootfs, ``source`` is the host dir.
    """

    target: str
    source: str
    purpose: str  # "rootfs" or "volume"
    destination: str = ""
    read_only: bool = False


class VMSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``pod.create`` ``vm``: ``{"backend": "sim"}``, ``{"backend": "qemu", ...}`` or
    ``{"backend": "external", ctl, tty}``.

    ``dialect`` applies to the sim and qemu backends: the agent dialect hyperd's agent speaks.
    ``kernel`` … ``kernel_args`` apply to qemu only; unset ones come from ``[vm.qemu]``.
    """

    backend: Literal["sim", "qemu", "external"] = "sim"
    ctl: str | None = None
    tty: str | None = None
    console: str | None = None
    dialect: Literal["cc", "hyper"] | None = None
    kernel: str | None = None
    initrd: str | None = None
    memory_mib: int | None = None
    cpus: int | None = None
    accel: Literal["auto", "kvm", "tcg"] | None = None
    kernel_args: str | None = None


class ProxySpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``pod.create`` ``proxy``: ``{"mode": "pod"}`` or ``{"mode": "system", "url": ...}``."""

    mode: Literal["pod", "system"] = "pod"
    url: str | None = None


class ExecRecord(msgspec.Struct, kw_only=True):
    id: str
    container: str
    process: ProcessSpec
    token: str
    state: ExecState = ExecState.CREATED
    exit_status: int | None = None
    exited_at: float | None = None  # when hyperd learned of the exit (time.time())
    exit_reason: str = ""  # set when the status is unknown, saying why
    created_at: float = msgspec.field(default_factory=time.time)


class ContainerRecord(msgspec.Struct, kw_only=True):
    id: str
    rootfs: RootfsSpec
    process: ProcessSpec
    token: str
    mounts: list[MountSpec] = []
    devices: list[DeviceSpec] = []
    resources: ResourcesSpec | None = None
    bind_mount_dev: bool = False
    shim_pid: int | None = None
    shim_start_time: int | None = None  # of shim_pid, so a recycled pid is never taken for it
    sources_resolved: bool = False  # allowlisted paths, resolved at create: mounted without links
    state: ContainerState = ContainerState.CREATED
    exit_status: int | None = None
    exited_at: float | None = None  # when hyperd learned of the init's exit (time.time())
    exit_reason: str = ""  # set when the status is unknown, saying why
    mounts_made: list[MountRecord] = []
    created_at: float = msgspec.field(default_factory=time.time)
    intent: str = ""
    """The operation under way whose outcome a crash would leave unknown: "stop" (recorded
    before REMOVECONTAINER). "start" is found in records of earlier versions only (today a
    start records nothing before NEWCONTAINER). A restart settles it
    (:mod:`hyperd.daemon.adoption`)."""


CONTAINER_INTENTS = ("start", "stop")


class PodRecord(msgspec.Struct, kw_only=True):
    """Everything hyperd knows about one pod; persisted after every change."""

    id: str
    hostname: str = ""
    vm: VMSpec = msgspec.field(default_factory=VMSpec)
    proxy: ProxySpec = msgspec.field(default_factory=ProxySpec)
    netns: str | None = None
    share_dir: str = ""  # host dir shared with the VM: <shared root>/<pod>
    share_tag: str = "hyperShared"
    agent_dialect: str | None = None  # asked for in pod.create; None = detect
    dialect: str | None = None  # the dialect in use once started
    run_dir: str = ""  # where the pod's sockets live
    ctl_path: str = ""
    tty_path: str = ""
    proxy_url: str = ""
    vm_process: ProcessRef | None = None
    vm_accel: str = ""  # qemu: the accelerator the VM runs with, and why ("tcg: ...")
    proxy_process: ProcessRef | None = None
    state: PodState = PodState.CREATED
    reason: str = ""  # why the pod is unreachable
    exit_notifications: bool | None = None  # the proxy sends exits (None: not connected yet)
    containers: dict[str, ContainerRecord] = {}
    execs: dict[str, ExecRecord] = {}
    exec_counter: int = 0
    created_at: float = msgspec.field(default_factory=time.time)
    launching: list[LaunchIntent] = []  # helper processes being started (intent first)


def pod_summary(pod: PodRecord) -> dict[str, object]:
    """The row ``pod.list`` returns for ``pod``."""
    return {
        "id": pod.id,
        "state": str(pod.state),
        "backend": pod.vm.backend,
        "proxy_mode": pod.proxy.mode,
        "dialect": pod.dialect,
        "containers": len(pod.containers),
        "created_at": pod.created_at,
    }


def exit_watch(pod: PodRecord, c: ContainerRecord | None = None) -> str:
    """How hyperd learns that a process of ``pod`` (container ``c``'s init) ended: ``"proxy"``
    (the proxy's exit notifications), ``"shim_pid"`` (the shim's pid is watched: the status is
    unknown), ``"none"`` (not observable: a proxy without the extension and no shim pid), or
    ``"unknown"`` (the pod's proxy was not connected yet)."""
    if pod.exit_notifications:
        return "proxy"
    if c is not None and c.shim_pid is not None:
        return "shim_pid"
    if pod.exit_notifications is None:
        return "unknown"
    return "none"


def container_view(pod: PodRecord, c: ContainerRecord) -> dict[str, object]:
    """What ``container.inspect`` returns (and the rows of ``container.list``)."""
    return {
        "pod": pod.id,
        "id": c.id,
        "state": str(c.state),
        "args": list(c.process.args),
        "rootfs": msgspec.to_builtins(c.rootfs),
        "token": c.token,
        "proxy_url": pod.proxy_url,
        "exit_status": c.exit_status,
        "exited_at": c.exited_at,
        "exit_reason": c.exit_reason,
        "exit_watch": exit_watch(pod, c),
        "shim_pid": c.shim_pid,
        "mounts": [m.target for m in c.mounts_made],
        "execs": sorted(e.id for e in pod.execs.values() if e.container == c.id),
        "created_at": c.created_at,
    }


def pod_view(pod: PodRecord) -> dict[str, object]:
    """What ``pod.inspect`` returns."""
    return {
        **pod_summary(pod),
        "hostname": pod.hostname,
        "vm": msgspec.to_builtins(pod.vm),
        "proxy": msgspec.to_builtins(pod.proxy),
        "proxy_url": pod.proxy_url,
        "netns": pod.netns,
        "share_dir": pod.share_dir,
        "share_tag": pod.share_tag,
        "ctl": pod.ctl_path,
        "tty": pod.tty_path,
        "reason": pod.reason,
        "exit_notifications": pod.exit_notifications,
        "vm_pid": pod.vm_process.pid if pod.vm_process else None,
        "vm_accel": pod.vm_accel or None,
        "proxy_pid": pod.proxy_process.pid if pod.proxy_process else None,
        "containers": [container_view(pod, c) for c in pod.containers.values()],
        "execs": [
            {
                "exec_id": e.id,
                "container": e.container,
                "state": str(e.state),
                "exit_status": e.exit_status,
                "exited_at": e.exited_at,
            }
            for e in pod.execs.values()
        ],
    }
