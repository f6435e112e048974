"""The host half of the seed's startOneContainer: mount, then build NEWCONTAINER; undo on failure.

Synchronous (it mounts); the daemon runs it with ``anyio.to_thread.run_sync``. Sending the
message is the caller's; if that fails, the caller undoes with ``SharedDir.unmount_container``.
"""

from __future__ import annotations

from collections.abc import Sequence

from hyperd.agent import build_container, fsmap_from_mounts
from hyperd.host.mounts import ContainerMounts, SharedDir
from hyperd.spec import BlockRootfs, DeviceSpec, DirRootfs, MountSpec, ResourcesSpec
from protocol.hyperstart import CC, Container, Dialect, Process

__all__ = ["binds_host_dev", "prepare_container"]

HOST_DEV = "/dev"


def binds_host_dev(mounts: Sequence[MountSpec]) -> bool:
    """Whether the container's spec bind-mounts the host's /dev on /dev (SystemMountsInfo)."""
    return any(
        m.type == "bind" and m.source == HOST_DEV and m.destination == HOST_DEV for m in mounts
    )


def prepare_container(
    shared: SharedDir,
    pod: str,
    container_id: str,
    rootfs: DirRootfs | BlockRootfs,
    process: Process,
    *,
    mounts: Sequence[MountSpec] = (),
    devices: Sequence[DeviceSpec] = (),
    resources: ResourcesSpec | None = None,
    bind_mount_dev: bool | None = None,
    dialect: Dialect = CC,
) -> tuple[Container, ContainerMounts]:
    """Mount the container's rootfs (a directory rootfs only) and bind volumes into the pod's
    share, and build its NEWCONTAINER message with the volumes' fsmap.

    Everything that can be refused without touching the host (bad block index, a feature the
    dialect lacks…) is refused before mounting. On any failure nothing stays mounted for the
    container. ``bind_mount_dev=None`` derives the flag from ``mounts``.
    """
    if bind_mount_dev is None:
        bind_mount_dev = binds_host_dev(mounts)

    def build(volumes: ContainerMounts | None) -> Container:
        return build_container(
            container_id,
            rootfs,
            process,
            fsmap=fsmap_from_mounts(volumes.volumes) if volumes is not None else (),
            devices=devices,
            resources=resources,
            bind_mount_dev=bind_mount_dev,
            dialect=dialect,
        )

    build(None)  # validation only: refuse before mounting anything
    made = shared.mount_container(
        pod, container_id, rootfs if isinstance(rootfs, DirRootfs) else None, mounts
    )
    try:
        return build(made), made
    except BaseException:
        shared.unmount_container(pod, container_id)
        raise
