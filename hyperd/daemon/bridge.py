"""Glue between the daemon's records and the layers below it.

- agent messages: records → :mod:`protocol.hyperstart` Structs, encoded in the pod's dialect;
- :func:`call`: one agent command over the pod's :class:`~hyperd.daemon.vmlink.AgentLink`, with
  errors re-raised naming the pod and the command;
- host side: network discovery (:mod:`hyperd.host.netns`) and bind mounts into the shared dir
  (:class:`hyperd.host.mounts.SharedDir`), run in worker threads.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import anyio
import msgspec

from hyperd.daemon.model import ContainerRecord, ExecRecord, MountRecord, PodRecord
from hyperd.daemon.vmlink import AgentLink
from hyperd.errors import HyperdError, InvalidParams, InvalidState
from hyperd.host.model import HostNetwork
from hyperd.host.mounts import SharedDir
from hyperd.host.netns import discover_network as _discover
from protocol import LocalProtocolError
from protocol.hyperstart import (
    DIALECTS,
    Capabilities,
    Constraints,
    Container,
    EnvironmentVar,
    ExecCommand,
    FsmapDescriptor,
    IPAddress,
    KillCommand,
    NetworkIface,
    Pod,
    Process,
    PsCommand,
    RemoveCommand,
    Route,
    SystemMountsInfo,
    encode_message,
)

log = logging.getLogger(__name__)

INIT_PROCESS_ID = "init"  # process id of a container's init (what exit events name)
ROOTFS_DIR = "rootfs"  # NEWCONTAINER rootfs, relative to image=<cid> in the share (the seed's)
DEFAULT_ROUTE_DEST = "0.0.0.0/0"
DEFAULT_ROUTE_LABEL = "default"  # how hyperstart wants the default route written


# ---- agent messages -----------------------------------------------------------------------


def process_id_of_init(c: ContainerRecord) -> str:
    return INIT_PROCESS_ID


def process_id_of_exec(e: ExecRecord) -> str:
    return e.id


def _process(spec: object, process_id: str) -> Process:
    from hyperd.spec import ProcessSpec

    assert isinstance(spec, ProcessSpec)
    caps = spec.capabilities
    return Process(
        user=spec.user,
        group=spec.group,
        additional_groups=list(spec.additional_groups),
        terminal=spec.terminal,
        args=list(spec.args),
        envs=[EnvironmentVar(env=k, value=v) for k, v in spec.environment()],
        workdir=spec.cwd,
        no_new_privileges=spec.no_new_privileges,
        capabilities=Capabilities(
            bounding=caps.bounding,
            effective=caps.effective,
            inheritable=caps.inheritable,
            permitted=caps.permitted,
            ambient=caps.ambient,
        )
        if caps is not None
        else Capabilities(),
        id=process_id,
    )


def interfaces_and_routes(network: HostNetwork) -> tuple[list[NetworkIface], list[Route]]:
    """The seed's buildNetworkInterfacesAndRoutes: IPv4 only, loopback and IPv6 skipped."""
    ifaces: list[NetworkIface] = []
    routes: list[Route] = []
    for link in network.links:
        if link.loopback:
            continue
        addrs = [
            IPAddress(ip_address=a.address, net_mask=str(a.prefix_len))
            for a in link.addresses
            if a.is_ipv4
        ]
        skipped = [a.address for a in link.addresses if not a.is_ipv4]
        if skipped:
            log.warning("skipping IPv6 addresses %s of %s (unsupported by hyperstart)",
                        skipped, link.name)
        ifaces.append(
            NetworkIface(new_device_name=link.name, ip_addresses=addrs or None, mtu=link.mtu,
                         mac_addr=link.mac)
        )
        for r in link.routes:
            if not r.is_ipv4:
                log.warning("skipping IPv6 route %s via %s", r.destination, r.gateway)
                continue
            dest = r.destination or ""
            if dest == DEFAULT_ROUTE_DEST:
                dest = DEFAULT_ROUTE_LABEL
            routes.append(Route(dest=dest, gateway=r.gateway or "", device=link.name))
    return ifaces, routes


def pod_message(pod: PodRecord, network: HostNetwork | None) -> Pod:
    ifaces, routes = interfaces_and_routes(network) if network is not None else ([], [])
    return Pod(
        hostname=pod.hostname,
        containers=[],
        interfaces=ifaces,
        routes=routes,
        share_dir=pod.share_tag,
    )


def drive_name(index: int) -> str:
    """virtio-blk drive name of drive ``index``: 0 → vda, 25 → vdz, 26 → vdaa (bijective)."""
    if index < 0:
        raise InvalidParams(f"invalid drive index {index}", field="rootfs.block.index")
    letters = ""
    n = index + 1
    while n > 0:
        n, rem = divmod(n - 1, 26)
        letters = chr(ord("a") + rem) + letters
    return "vd" + letters


def scsi_address(index: int) -> str:
    if not 0 <= index <= 0xFFFF:
        raise InvalidParams(f"invalid SCSI drive index {index}", field="rootfs.block.index")
    return f"{index // 256}:{index % 256}"


def container_message(pod: PodRecord, c: ContainerRecord, layout: list[MountRecord]) -> Container:
    msg = Container(id=c.id, image=c.id, rootfs=ROOTFS_DIR, process=_process(c.process, "init"))
    block = c.rootfs.block
    if block is not None:
        msg.fstype = block.fstype
        if block.driver == "virtio-blk":
            msg.image = drive_name(block.index)
        else:
            msg.scsi_addr = scsi_address(block.index)
    fsmap = [
        FsmapDescriptor(source=m.source, path=m.destination, read_only=m.read_only)
        for m in layout
        if m.purpose == "volume"
    ]
    for d in c.devices:
        fsmap.append(
            FsmapDescriptor(source=d.guest_path, path=d.container_path, absolute_path=True,
                            scsi_addr=d.scsi_addr or "")
        )
    msg.fsmap = fsmap
    r = c.resources
    if r is not None:
        constraints = Constraints()
        if r.cpu_quota and r.cpu_period:
            constraints.cpu_quota, constraints.cpu_period = r.cpu_quota, r.cpu_period
        if r.cpu_shares:
            constraints.cpu_shares = r.cpu_shares
        msg.constraints = constraints
    msg.system_mounts_info = SystemMountsInfo(bind_mount_dev=c.bind_mount_dev)
    return msg


def exec_message(pod: PodRecord, c: ContainerRecord, e: ExecRecord) -> ExecCommand:
    return ExecCommand(container=c.id, process=_process(e.process, process_id_of_exec(e)))


def kill_message(c: ContainerRecord, signum: int, all_processes: bool) -> KillCommand:
    return KillCommand(container=c.id, signal=signum, all_processes=all_processes)


def remove_message(c: ContainerRecord) -> RemoveCommand:
    return RemoveCommand(container=c.id)


def ps_message(pod: PodRecord, c: ContainerRecord, fmt: str, args: list[str]) -> PsCommand:
    if pod.dialect == "hyper":
        raise InvalidState(
            f"pod {pod.id!r}: the hyperhq agent has no ps command (pscontainer is CC only)",
            pod=pod.id,
        )
    return PsCommand(container=c.id, format=fmt, psargs=list(args) or None)


def decode_ps(reply: bytes) -> str:
    """The ps text of a PSCONTAINER reply (raw bytes, or a JSON string)."""
    if reply[:1] == b'"':
        try:
            text = msgspec.json.decode(reply)
            if isinstance(text, str):
                return text
        except msgspec.DecodeError:
            pass
    return reply.decode("utf-8", "replace")


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
    dialect = DIALECTS[pod.dialect or "cc"]
    if name not in dialect.names:
        raise InvalidState(f"pod {pod.id!r}: the {dialect.name} agent has no {name!r} command")
    try:
        data = encode_message(message, dialect) if message is not None else None
    except LocalProtocolError as exc:
        raise InvalidParams(f"pod {pod.id!r}: cannot build {name}: {exc}") from None
    try:
        return await link.hyper(name, data, tokens=tokens)
    except HyperdError as exc:
        raise type(exc)(f"pod {pod.id!r}: {name}: {exc.message}", **exc.data) from None


async def tokens(pod: PodRecord, link: AgentLink, count: int) -> list[str]:
    try:
        return await link.new_tokens(count)
    except HyperdError as exc:
        raise type(exc)(f"pod {pod.id!r}: getting I/O tokens: {exc.message}", **exc.data) from None


# ---- host side ----------------------------------------------------------------------------


async def discover_network(netns: str) -> HostNetwork:
    return await _discover(netns)


def shared_dir(pod: PodRecord) -> tuple[SharedDir, str]:
    """The :class:`SharedDir` holding the pod's share, and the pod's name in it."""
    return SharedDir(os.path.dirname(pod.share_dir)), os.path.basename(pod.share_dir)


def _mount_container(pod: PodRecord, c: ContainerRecord) -> list[MountRecord]:
    shared, name = shared_dir(pod)
    rootfs = c.rootfs.resolve()
    from hyperd.spec import DirRootfs

    made = shared.mount_container(
        name, c.id, rootfs if isinstance(rootfs, DirRootfs) else None, c.mounts
    )
    records = []
    if made.rootfs is not None and c.rootfs.path is not None:
        records.append(MountRecord(target=made.rootfs, source=c.rootfs.path, purpose="rootfs",
                                   read_only=c.rootfs.readonly))
    for v in made.volumes:
        records.append(MountRecord(target=v.host_path, source=v.source, purpose="volume",
                                   destination=v.destination, read_only=v.read_only))
    return records


async def mount_container(
    pod: PodRecord, c: ContainerRecord
) -> tuple[list[MountRecord], list[MountRecord]]:
    """Bind-mount the container's rootfs and volumes; returns (records, layout for fsmap)."""
    records = await anyio.to_thread.run_sync(_mount_container, pod, c)
    return records, records


async def unmount_container(pod: PodRecord, c: ContainerRecord) -> None:
    """Undo every mount of the container (found from mountinfo, so also after a crash)."""
    shared, name = shared_dir(pod)
    await anyio.to_thread.run_sync(shared.unmount_container, name, c.id)


async def cleanup_pod(pod: PodRecord) -> None:
    """Unmount everything under the pod's share and remove it."""
    shared, name = shared_dir(pod)
    await anyio.to_thread.run_sync(shared.cleanup_pod, name)
