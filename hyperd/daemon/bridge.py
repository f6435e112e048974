"""Glue between the daemon's records and the layers below it.

- agent messages: records → :mod:`protocol.hyperstart` Structs, encoded in the pod's dialect;
- :func:`call`: one agent command over the pod's :class:`~hyperd.daemon.vmlink.AgentLink`, with
  errors re-raised naming the pod and the command;
- host side: network discovery (:mod:`hyperd.host.netns`) and bind mounts into the shared dir
  (:class:`hyperd.host.mounts.SharedDir`), run in worker threads.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import msgspec

from hyperd import agent
from hyperd.daemon import launcher, netprobe
from hyperd.daemon.model import ContainerRecord, ExecRecord, MountRecord, PodRecord, PodState
from hyperd.daemon.vmlink import AgentLink
from hyperd.errors import HyperdError, InvalidParams, InvalidState, ProxyError, VMUnavailable
from hyperd.host.model import HostNetwork, SharedMount
from hyperd.host.mounts import ROOTFS_DIR, SharedDir
from hyperd.rpc.pending import Pending
from protocol import LocalProtocolError, jsonerrors
from protocol.hyperstart import (
    DIALECTS,
    Container,
    Dialect,
    ExecCommand,
    KillCommand,
    Pod,
    PsCommand,
    RemoveCommand,
    encode_message,
)

log = logging.getLogger(__name__)

VM_LOST_TEXT = "No multicast available"  # cc-proxy's answer to Hyper once the VM is gone

# ---- agent messages (built by hyperd.agent, in the pod's dialect) ---------------------------


def dialect_of(pod: PodRecord) -> Dialect:
    return DIALECTS[pod.dialect or "cc"]


def process_id_of_init(c: ContainerRecord) -> str:
    return agent.INIT_PROCESS_ID


def process_id_of_exec(e: ExecRecord) -> str:
    return e.id


def pod_message(pod: PodRecord, network: HostNetwork | None) -> Pod:
    dialect = dialect_of(pod)
    ifaces, routes = (
        agent.build_interfaces_and_routes(network, dialect) if network is not None else ([], [])
    )
    return agent.build_pod(pod.hostname, ifaces, routes, share_tag=pod.share_tag)


def container_message(pod: PodRecord, c: ContainerRecord, layout: list[MountRecord]) -> Container:
    dialect = dialect_of(pod)
    process = agent.build_process(c.process, dialect, process_id=process_id_of_init(c))
    volumes = [
        SharedMount(
            source=m.source, destination=m.destination, read_only=m.read_only, host_path=m.target
        )
        for m in layout
        if m.purpose == "volume"
    ]
    return agent.build_container(
        c.id,
        c.rootfs.resolve(),
        process,
        fsmap=agent.fsmap_from_mounts(volumes),
        devices=c.devices,
        resources=c.resources,
        bind_mount_dev=c.bind_mount_dev,
        dialect=dialect,
    )


def exec_message(pod: PodRecord, c: ContainerRecord, e: ExecRecord) -> ExecCommand:
    process = agent.build_process(e.process, dialect_of(pod), process_id=process_id_of_exec(e))
    return agent.build_exec(c.id, process)


def kill_message(c: ContainerRecord, signum: int, all_processes: bool) -> KillCommand:
    return agent.build_kill(c.id, signum, all_processes)


def remove_message(c: ContainerRecord) -> RemoveCommand:
    return agent.build_remove(c.id)


def ps_message(pod: PodRecord, c: ContainerRecord, fmt: str, args: list[str]) -> PsCommand:
    if pod.dialect == "hyper":
        raise InvalidState(
            f"pod {pod.id!r}: the hyperhq agent has no ps command (pscontainer is CC only)",
            pod=pod.id,
        )
    return agent.build_ps(c.id, fmt or "table", list(args) or None)


def decode_ps(reply: bytes) -> str:
    """The ps text of a PSCONTAINER reply (raw bytes, or a JSON string)."""
    if reply[:1] == b'"':
        try:
            text = msgspec.json.decode(reply)
            if isinstance(text, str):
                return text
        except jsonerrors.DECODE_ERRORS:
            pass
    return reply.decode("utf-8", "replace")


def _encode(pod: PodRecord, name: str, message: msgspec.Struct | None) -> bytes | None:
    dialect = dialect_of(pod)
    if name not in dialect.names:
        raise InvalidState(f"pod {pod.id!r}: the {dialect.name} agent has no {name!r} command")
    try:
        return encode_message(message, dialect) if message is not None else None
    except LocalProtocolError as exc:
        raise InvalidParams(f"pod {pod.id!r}: cannot build {name}: {exc}") from None


def _failed(pod: PodRecord, name: str, exc: HyperdError) -> HyperdError:
    """The error to raise for ``exc`` from ``name``: its kind, with the pod and command named."""
    if isinstance(exc, ProxyError):
        if vm_lost(pod) or VM_LOST_TEXT in str(exc.data.get("proxy_message", "")):
            # the proxy noticed the VM's death before we did: the same error as ours
            return VMUnavailable(
                f"pod {pod.id!r}: {name}: the VM is gone ({exc.message})", **exc.data
            )
        return ProxyError(f"pod {pod.id!r}: {name}: {exc.message}", **exc.data)
    return type(exc)(f"pod {pod.id!r}: {name}: {exc.message}", **exc.data)


async def call(
    pod: PodRecord,
    link: AgentLink,
    name: str,
    message: msgspec.Struct | None,
    *,
    tokens: Sequence[str] = (),
) -> bytes:
    """Send agent command ``name`` with ``message`` in the pod's dialect; the reply payload.

    Errors keep their kind and get the pod and command in their message.
    """
    if not tokens:
        return await send(pod, link, name, message)
    data = _encode(pod, name, message)
    try:
        return await link.hyper(name, data, tokens=tokens)
    except HyperdError as exc:
        raise _failed(pod, name, exc) from None


def send(
    pod: PodRecord, link: AgentLink, name: str, message: msgspec.Struct | None
) -> Pending[bytes]:
    """:func:`call` (without tokens) as a :class:`Pending`: the command is sent now, the reply
    payload (or the error :func:`call` raises) comes with the Pending's future."""
    data = _encode(pod, name, message)
    try:
        pending = link.send(name, data)
    except HyperdError as exc:
        raise _failed(pod, name, exc) from None
    return Pending(pending.future, functools.partial(_reply, pod, name, pending.then))


def _reply(
    pod: PodRecord,
    name: str,
    then: Callable[[asyncio.Future[Any]], bytes],
    future: asyncio.Future[Any],
) -> bytes:
    try:
        return then(future)
    except HyperdError as exc:
        raise _failed(pod, name, exc) from None


def vm_lost(pod: PodRecord) -> bool:
    """Whether the pod's VM is known to be gone (marked unreachable, or its process died)."""
    if pod.state == PodState.UNREACHABLE:
        return True
    return pod.vm_process is not None and not launcher.is_alive(pod.vm_process)


async def tokens(pod: PodRecord, link: AgentLink, count: int) -> list[str]:
    try:
        return await link.new_tokens(count)
    except HyperdError as exc:
        raise type(exc)(f"pod {pod.id!r}: getting I/O tokens: {exc.message}", **exc.data) from None


# ---- host side ----------------------------------------------------------------------------


async def discover_network(netns: str) -> HostNetwork:
    """Read the pod's netns in a child process (see :mod:`hyperd.daemon.netprobe` for why)."""
    return await netprobe.discover_network(netns)


def shared_dir(pod: PodRecord, *, source_symlinks: bool = True) -> tuple[SharedDir, str]:
    """The :class:`SharedDir` holding the pod's share, and the pod's name in it."""
    root = os.path.dirname(pod.share_dir)
    return _shared_root(root, source_symlinks), os.path.basename(pod.share_dir)


@functools.lru_cache(maxsize=64)
def _shared_root(root: str, source_symlinks: bool) -> SharedDir:
    # made once per root: SharedDir resolves the root's path (a realpath) when made
    return SharedDir(root, source_symlinks=source_symlinks)


def _mount_container(pod: PodRecord, c: ContainerRecord) -> list[MountRecord]:
    # sources checked against the allowlist were resolved then: a symlink now was swapped in
    shared, name = shared_dir(pod, source_symlinks=not c.sources_resolved)
    rootfs = c.rootfs.resolve()
    from hyperd.spec import DirRootfs

    made = shared.mount_container(
        name, c.id, rootfs if isinstance(rootfs, DirRootfs) else None, c.mounts
    )
    records = []
    if made.rootfs is not None and c.rootfs.path is not None:
        records.append(
            MountRecord(
                target=made.rootfs,
                source=c.rootfs.path,
                purpose="rootfs",
                read_only=c.rootfs.readonly,
            )
        )
    for v in made.volumes:
        records.append(
            MountRecord(
                target=v.host_path,
                source=v.source,
                purpose="volume",
                destination=v.destination,
                read_only=v.read_only,
            )
        )
    return records


def mount_container_now(pod: PodRecord, c: ContainerRecord) -> list[MountRecord]:
    """Bind-mount the container's rootfs and volumes in this thread; their records. Raises
    :class:`HyperdError` (``InvalidParams`` for a bad source, ``AlreadyExists``…)."""
    try:
        return _mount_container(pod, c)
    except OSError as exc:
        raise HyperdError(
            f"pod {pod.id!r}: container {c.id!r}: mounting its rootfs and volumes failed: {exc}"
        ) from None


async def mount_container(
    pod: PodRecord, c: ContainerRecord
) -> tuple[list[MountRecord], list[MountRecord]]:
    """Bind-mount the container's rootfs and volumes in a worker thread; returns (records,
    layout for fsmap)."""
    records = await anyio.to_thread.run_sync(mount_container_now, pod, c)
    return records, records


async def found_mounts(pod: PodRecord, c: ContainerRecord) -> list[MountRecord]:
    """Records of the container's rootfs and volume mounts found mounted now (from mountinfo):
    for a container whose mounts were made but not saved, e.g. mounted ahead by
    ``container.create`` and started just before a crash. Only the targets are known for
    sure (what unmounting needs); a volume's destination is not."""
    shared, name = shared_dir(pod)
    points = await anyio.to_thread.run_sync(shared.container_mount_points, name, c.id)
    records = []
    for point in points:
        if os.path.basename(point) == ROOTFS_DIR:  # (a volume's is "<cid>-<hex>-<name>")
            records.append(
                MountRecord(
                    target=point,
                    source=c.rootfs.path or "",
                    purpose="rootfs",
                    read_only=c.rootfs.readonly,
                )
            )
        else:
            records.append(
                MountRecord(target=point, source=os.path.basename(point), purpose="volume")
            )
    return records


async def unmount_container(pod: PodRecord, c: ContainerRecord) -> None:
    """Undo every mount of the container (found from mountinfo, so also after a crash)."""
    shared, name = shared_dir(pod)
    await anyio.to_thread.run_sync(shared.unmount_container, name, c.id)


async def unmount_recorded(pod: PodRecord, c: ContainerRecord) -> None:
    """Undo the mounts ``c.mounts_made`` records and remove the container's directory, without
    a scan of the mount table (container.start's undo), in a worker thread. Anything else
    found mounted in the container's directory makes it fall back to
    :func:`unmount_container`'s scan."""
    shared, name = shared_dir(pod)
    targets = [m.target for m in c.mounts_made]
    await anyio.to_thread.run_sync(shared.unmount_recorded, name, c.id, targets)


def unmount_for_stop(pod: PodRecord, c: ContainerRecord) -> None:
    """Undo the mounts ``c.mounts_made`` records (container.stop), on the event loop: a few
    ``umount2`` calls, about 50 µs each here, where the hand-off to a worker thread and back
    cost about 200 µs. ``umount2`` of a bind mount does no I/O, except when hyperd's mount is
    the last one of the source's filesystem (the source was unmounted first): the kernel then
    shuts that filesystem down in this call. The container's directory is left, unchecked,
    for :func:`unmount_container` (container.delete) or :func:`cleanup_pod`."""
    shared, name = shared_dir(pod)
    targets = [m.target for m in c.mounts_made]
    shared.unmount_recorded(name, c.id, targets, remove_dir=False)


async def cleanup_pod(pod: PodRecord) -> None:
    """Unmount everything under the pod's share and remove it."""
    shared, name = shared_dir(pod)
    await anyio.to_thread.run_sync(shared.cleanup_pod, name)
