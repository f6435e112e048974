"""The seed's hyperstart logic as pure builders: specs and host data in, message Structs out.

No I/O here: mounting is :mod:`hyperd.host.mounts`, discovery :mod:`hyperd.host.netns`, sending
:mod:`hyperd.vm`. Every seed function (``virtcontainers/hyperstart_agent.go``) has a counterpart:

=================================  ===========================================================
seed                               hyperd
=================================  ===========================================================
buildHyperContainerProcess         :func:`build_process`
processHyperRoute                  :func:`build_route`
buildNetworkInterfacesAndRoutes    :func:`build_interfaces_and_routes`
startPod (Pod, hostname cut)       :func:`build_pod`
fsMapFromMounts                    :func:`fsmap_from_mounts`
getVirtDriveName / getSCSIAddress  :func:`drive_name` / :func:`scsi_address`
startOneContainer                  :func:`build_container` (mounts: ``SharedDir.mount_container``)
exec                               :func:`build_exec`
stopOneContainer                   :func:`build_remove`
killOneContainer                   :func:`build_kill` (hyperhq per-process: :func:`build_signal`)
processListOneContainer            :func:`build_ps`
winsize (cc-proxy's SIGWINCH)      :func:`build_winsize`
stopPod                            DESTROYPOD has no payload
capabilities                       :data:`SUPPORTS_BLOCK_DEVICES`
onlineCPUMem                       nothing to send (the guest onlines CPUs itself)
=================================  ===========================================================

Dialects: CC messages are what the seed sends. For the hyperhq agent (``HYPER``) the encoder
(``encode_message(msg, HYPER)``) drops the keys its strict parser rejects; the builders add what
it needs (a ``process.id`` always, the interface's ``device``) and refuse what it cannot honour
instead of silently dropping it: capabilities, no-new-privileges, CPU constraints, devices
passed to the container and a SCSI rootfs all raise ``InvalidParams`` for HYPER.

Errors: every builder raises ``hyperd.errors.InvalidParams`` naming the field.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Mapping, Sequence

from hyperd.errors import InvalidParams
from hyperd.host.model import HostLink, HostNetwork, HostRoute, SharedMount
from hyperd.spec import BlockRootfs, DeviceSpec, DirRootfs, ProcessSpec, ResourcesSpec
from protocol.hyperstart import (
    CC,
    HYPER,
    Capabilities,
    Constraints,
    Container,
    Dialect,
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
    SignalCommand,
    SystemMountsInfo,
    WindowSize,
    WindowSizeMessage,
)

__all__ = [
    "DEFAULT_ROUTE_LABEL",
    "INIT_PROCESS_ID",
    "MAX_HOSTNAME_LEN",
    "ROOTFS_DIR",
    "SHARE_TAG",
    "SUPPORTS_BLOCK_DEVICES",
    "build_container",
    "build_exec",
    "build_interfaces_and_routes",
    "build_kill",
    "build_pod",
    "build_process",
    "build_ps",
    "build_remove",
    "build_route",
    "build_signal",
    "build_winsize",
    "drive_name",
    "fsmap_from_mounts",
    "scsi_address",
]

log = logging.getLogger(__name__)

SHARE_TAG = "hyperShared"  # 9p mount tag of the pod's shared directory (the seed's mountTag)
ROOTFS_DIR = "rootfs"  # rootfs dir inside <share>/<cid>: NEWCONTAINER rootfs="rootfs", image=cid
MAX_HOSTNAME_LEN = 64  # the seed's maxHostnameLen (HOST_NAME_MAX)
DEFAULT_ROUTE_DEST = "0.0.0.0/0"
DEFAULT_ROUTE_LABEL = "default"  # how hyperstart wants the IPv4 default route's destination
INIT_PROCESS_ID = "init"  # hyperhq: the container's init process id (as runv names it)
DRIVE_PREFIX = "vd"  # virtio-blk disks in the guest: vda, vdb, ...
DISK_NAME_LEN = 32  # Linux DISK_NAME_LEN: "vd" + at most 30 letters
DRIVE_LETTERS = 26
SCSI_TARGETS = 256  # an index maps to "<index // 256>:<index % 256>" (SCSI id : LUN)
MAX_SCSI_INDEX = 65535  # the seed's limit for getSCSIAddress
MAX_SIGNAL = 64  # Linux _NSIG - 1
MAX_WINSIZE = 0xFFFF  # rows/columns are u16 in struct winsize
PS_FORMATS = ("table", "json")
SUPPORTS_BLOCK_DEVICES = True  # the seed's capabilities(): block device rootfs and devices


# ---------------------------------------------------------------------------------------------
# processes


def build_process(spec: ProcessSpec, dialect: Dialect = CC, *, process_id: str = "") -> Process:
    """The hyperstart ``Process`` for ``spec`` (seed: buildHyperContainerProcess).

    Environment entries ``KEY=VALUE`` become ``EnvironmentVar``s (split at the first ``=``);
    ``cwd`` becomes ``workdir``; capabilities are copied set by set (``None`` stays ``null``).
    ``stdio``/``stderr`` are left 0: the proxy assigns sequence numbers. ``process_id`` is sent as
    ``id`` when given; for HYPER a process always has one (``"init"`` by default).
    """
    if _is_hyper(dialect):
        if spec.no_new_privileges:
            raise _unsupported("process.no_new_privileges")
        if spec.capabilities is not None:
            raise _unsupported("process.capabilities")
        process_id = process_id or INIT_PROCESS_ID
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
        capabilities=Capabilities()
        if caps is None
        else Capabilities(
            bounding=_copy(caps.bounding),
            effective=_copy(caps.effective),
            inheritable=_copy(caps.inheritable),
            permitted=_copy(caps.permitted),
            ambient=_copy(caps.ambient),
        ),
        id=process_id,
    )


def _is_hyper(dialect: Dialect) -> bool:
    return dialect.name == HYPER.name


def _copy(values: list[str] | None) -> list[str] | None:
    return None if values is None else list(values)


def _unsupported(field: str) -> InvalidParams:
    return InvalidParams(f"{field} is not supported by the hyperhq agent", field=field)


# ---------------------------------------------------------------------------------------------
# network


def build_route(route: HostRoute, device: str) -> Route | None:
    """The hyperstart ``Route`` for a host route through ``device``, or ``None`` (with a
    warning) for an IPv6 route, which hyperstart does not support (seed: processHyperRoute).

    No gateway gives ``""``; the IPv4 default route's destination is ``"default"``; an unknown
    destination (``None``) gives ``""``.
    """
    gateway = ""
    if route.gateway:
        if _ip_version(route.gateway) != 4:
            log.warning("unsupported route skipped: ipv6 gateway %s", route.gateway)
            return None
        gateway = route.gateway
    destination = ""
    if route.destination is not None:
        if _ip_version(route.destination) != 4:
            log.warning("unsupported route skipped: ipv6 destination %s", route.destination)
            return None
        destination = route.destination
        if destination == DEFAULT_ROUTE_DEST:
            destination = DEFAULT_ROUTE_LABEL
    return Route(dest=destination, gateway=gateway, device=device)


def build_interfaces_and_routes(
    network: HostNetwork | Iterable[HostLink], dialect: Dialect = CC
) -> tuple[list[NetworkIface], list[Route]]:
    """Interfaces and routes for STARTPOD from discovered links (seed:
    buildNetworkInterfacesAndRoutes).

    Each non-loopback link gives an interface named after it (``newDeviceName``; HYPER also
    ``device``, which hyperhq looks the interface up by) with its IPv4 addresses (prefix length as
    a decimal string; ``null`` when it has none, as the seed's nil slice), MTU and MAC. IPv6 and
    loopback addresses, loopback links and IPv6 routes are skipped with a warning.
    """
    links = network.links if isinstance(network, HostNetwork) else tuple(network)
    ifaces: list[NetworkIface] = []
    routes: list[Route] = []
    for link in links:
        if link.loopback:
            log.warning("loopback interface %s skipped: hyperstart sets up lo itself", link.name)
            continue
        addresses: list[IPAddress] = []
        for addr in link.addresses:
            ip = ipaddress.ip_address(addr.address)
            if ip.version != 4 or ip.is_loopback:
                log.warning(
                    "unsupported address skipped on %s: %s/%d (%s)",
                    link.name,
                    addr.address,
                    addr.prefix_len,
                    "loopback" if ip.is_loopback else "ipv6",
                )
                continue
            addresses.append(IPAddress(ip_address=str(ip), net_mask=str(addr.prefix_len)))
        ifaces.append(
            NetworkIface(
                device=link.name if _is_hyper(dialect) else "",
                new_device_name=link.name,
                ip_addresses=addresses or None,
                mtu=link.mtu,
                mac_addr=link.mac,
            )
        )
        for host_route in link.routes:
            route = build_route(host_route, link.name)
            if route is not None:
                routes.append(route)
    return ifaces, routes


def _ip_version(text: str) -> int:
    try:
        return ipaddress.ip_network(text, strict=False).version
    except ValueError:
        raise InvalidParams(f"invalid IP address or network {text!r}", field="route") from None


def build_pod(
    hostname: str,
    interfaces: Sequence[NetworkIface] = (),
    routes: Sequence[Route] = (),
    *,
    dns: Sequence[str] = (),
    share_tag: str = SHARE_TAG,
) -> Pod:
    """The STARTPOD payload. The hostname is cut to 64 bytes (as the seed's ``hostname[:64]``,
    but never inside a UTF-8 character); no containers (they come with NEWCONTAINER)."""
    return Pod(
        hostname=_cut_utf8(hostname, MAX_HOSTNAME_LEN),
        interfaces=list(interfaces),
        dns=list(dns),
        routes=list(routes),
        share_dir=share_tag,
    )


def _cut_utf8(text: str, limit: int) -> str:
    return text.encode()[:limit].decode(errors="ignore")


# ---------------------------------------------------------------------------------------------
# containers


def drive_name(index: int) -> str:
    """The virtio-blk disk name for drive ``index``: ``"vd"`` + bijective base-26 letters
    (0 → ``vda``, 25 → ``vdz``, 26 → ``vdaa``, 701 → ``vdzz``, 702 → ``vdaaa``).

    Raises ``InvalidParams`` for a negative index or one needing more than 30 letters.
    """
    if index < 0:
        raise InvalidParams(f"drive index {index} cannot be negative", field="block.index")
    letters: list[str] = []
    n = index
    while n >= 0 and len(letters) < DISK_NAME_LEN - len(DRIVE_PREFIX):
        letters.append(chr(ord("a") + n % DRIVE_LETTERS))
        n = n // DRIVE_LETTERS - 1
    if n >= 0:
        raise InvalidParams(
            f"drive index {index} is not supported (name too long)", field="block.index"
        )
    return DRIVE_PREFIX + "".join(reversed(letters))


def scsi_address(index: int) -> str:
    """The SCSI address ``"<id>:<lun>"`` of drive ``index`` (``index // 256``, ``index % 256``).

    Raises ``InvalidParams`` for a negative index or one above 65535.
    """
    if index < 0:
        raise InvalidParams(f"SCSI index {index} cannot be negative", field="block.index")
    if index > MAX_SCSI_INDEX:
        raise InvalidParams(
            f"SCSI index {index} cannot be greater than {MAX_SCSI_INDEX}", field="block.index"
        )
    return f"{index // SCSI_TARGETS}:{index % SCSI_TARGETS}"


def fsmap_from_mounts(mounts: Iterable[SharedMount]) -> list[FsmapDescriptor]:
    """Fsmap entries for volumes mounted into the share (seed: fsMapFromMounts): ``source`` is
    the volume's name relative to the share, ``path`` its destination in the container."""
    return [
        FsmapDescriptor(source=m.source, path=m.destination, read_only=m.read_only) for m in mounts
    ]


def build_container(
    container_id: str,
    rootfs: DirRootfs | BlockRootfs,
    process: Process,
    *,
    fsmap: Sequence[FsmapDescriptor] = (),
    devices: Sequence[DeviceSpec] = (),
    resources: ResourcesSpec | None = None,
    bind_mount_dev: bool = False,
    sysctl: Mapping[str, str] | None = None,
    dev_shm_size: int = 0,
    dialect: Dialect = CC,
) -> Container:
    """The NEWCONTAINER payload (seed: startOneContainer, without the mounting).

    - Directory rootfs: ``image`` = container id, ``rootfs`` = ``"rootfs"`` (the rootfs is
      mounted on ``<share>/<cid>/rootfs``).
    - Block rootfs: ``fstype`` set; virtio-blk: ``image`` = :func:`drive_name`; virtio-scsi:
      ``scsiAddr`` = :func:`scsi_address` (``image`` stays the container id).
    - ``fsmap``: the volumes (see :func:`fsmap_from_mounts`), then one entry per device with
      ``source`` = its path in the VM, ``absolutePath``, and ``scsiAddr`` when on SCSI.
    - Constraints: CPU quota and period only when both are non-zero; shares when non-zero.
    """
    hyper = _is_hyper(dialect)
    container = Container(
        id=container_id,
        rootfs=ROOTFS_DIR,
        image=container_id,
        fsmap=list(fsmap),
        sysctl=dict(sysctl or {}),
        process=process,
        system_mounts_info=SystemMountsInfo(
            bind_mount_dev=bind_mount_dev, dev_shm_size=dev_shm_size
        ),
        constraints=_constraints(resources),
    )
    if hyper and container.constraints != Constraints():
        raise _unsupported("resources")
    if isinstance(rootfs, BlockRootfs):
        block = rootfs.block
        container.fstype = block.fstype
        if block.driver == "virtio-blk":
            container.image = drive_name(block.index)
        elif hyper:
            raise _unsupported("rootfs.block.driver virtio-scsi")
        else:
            container.scsi_addr = scsi_address(block.index)
    if devices and hyper:
        raise _unsupported("devices")
    for device in devices:
        container.fsmap.append(
            FsmapDescriptor(
                source=device.guest_path,
                path=device.container_path,
                absolute_path=True,
                docker_volume=False,
                scsi_addr=device.scsi_addr or "",
            )
        )
    return container


def _constraints(resources: ResourcesSpec | None) -> Constraints:
    c = Constraints()
    if resources is None:
        return c
    if resources.cpu_quota != 0 and resources.cpu_period != 0:
        c.cpu_quota = resources.cpu_quota
        c.cpu_period = resources.cpu_period
    if resources.cpu_shares != 0:
        c.cpu_shares = resources.cpu_shares
    return c


# ---------------------------------------------------------------------------------------------
# commands on running containers


def build_exec(container_id: str, process: Process) -> ExecCommand:
    """The EXECCMD payload (seed: exec). Build ``process`` with the exec id as ``process_id``."""
    return ExecCommand(container=container_id, process=process)


def build_kill(container_id: str, signal: int, all_processes: bool = False) -> KillCommand:
    """The KILLCONTAINER payload (seed: killOneContainer). HYPER sends only container+signal."""
    return KillCommand(container=container_id, signal=_signal(signal), all_processes=all_processes)


def build_signal(container_id: str, process_id: str, signal: int) -> SignalCommand:
    """The hyperhq SIGNALPROCESS payload: signal one process of a container."""
    return SignalCommand(container=container_id, process=process_id, signal=_signal(signal))


def _signal(signal: int) -> int:
    if not 0 <= signal <= MAX_SIGNAL:
        raise InvalidParams(f"invalid signal {signal}: must be 0..{MAX_SIGNAL}", field="signal")
    return signal


def build_remove(container_id: str) -> RemoveCommand:
    """The REMOVECONTAINER payload (seed: stopOneContainer)."""
    return RemoveCommand(container=container_id)


def build_ps(
    container_id: str, format: str = "table", args: Sequence[str] | None = None
) -> PsCommand:
    """The CC PSCONTAINER payload (seed: processListOneContainer); ``args=None`` → ``null``."""
    if format not in PS_FORMATS:
        raise InvalidParams(f"invalid ps format {format!r}: must be table or json", field="format")
    return PsCommand(
        container=container_id, format=format, psargs=None if args is None else list(args)
    )


def build_winsize(
    dialect: Dialect,
    *,
    row: int,
    column: int,
    seq: int = 0,
    container_id: str = "",
    process_id: str = "",
) -> WindowSize | WindowSizeMessage:
    """The WINSIZE payload: CC addresses the process by its stdio ``seq``, hyperhq by
    ``container_id`` + ``process_id``."""
    for name, value in (("row", row), ("column", column)):
        if not 0 <= value <= MAX_WINSIZE:
            raise InvalidParams(f"invalid {name} {value}: must be 0..{MAX_WINSIZE}", field=name)
    if _is_hyper(dialect):
        if not container_id or not process_id:
            raise InvalidParams("hyperhq WINSIZE needs container and process ids", field="process")
        return WindowSizeMessage(container=container_id, process=process_id, row=row, column=column)
    if seq <= 0:
        raise InvalidParams(f"invalid seq {seq}: the process's stdio sequence number", field="seq")
    return WindowSize(seq=seq, row=row, column=column)
