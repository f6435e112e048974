"""Bind mounts of container rootfs and volumes into a pod's shared directory, and their undoing.

Layout (the seed's): the pod's 9p share is ``<root>/<pod>``; a container's rootfs is bind-mounted
on ``<root>/<pod>/<cid>/rootfs`` (the agent sees ``<cid>/rootfs``); a bind volume is mounted on
``<root>/<pod>/<cid>-<16 hex>-<basename of its destination>``.

Safety:

- pod and container ids are checked with :func:`hyperd.spec.validate_id`, so every path stays
  inside the root;
- mount targets are reached one component at a time with ``O_NOFOLLOW`` (the guest can write into
  the share, so a component could be a planted symlink), and the mount is made on the opened
  directory through ``/proc/self/fd``;
- unmounting never trusts records: it asks /proc/self/mountinfo what is mounted under the pod or
  container directory, unmounts the deepest first (lazy detach if busy), and removes directories
  only once nothing is mounted below them.

All functions are synchronous; the daemon calls them with ``anyio.to_thread.run_sync``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from hyperd.errors import AlreadyExists, InvalidParams
from hyperd.host.model import SharedMount
from hyperd.host.mountsys import (
    MNT_DETACH,
    MS_BIND,
    MS_RDONLY,
    MS_REMOUNT,
    UMOUNT_NOFOLLOW,
    MountError,
    MountInfo,
    read_mountinfo,
    read_mountinfo_prefix,
    umount,
)
from hyperd.host.mountsys import mount as sys_mount
from hyperd.spec import DirRootfs, MountSpec, check_absolute_path, validate_id

__all__ = [
    "DEFAULT_SHARED_ROOT",
    "ROOTFS_DIR",
    "ContainerMounts",
    "MountError",
    "SharedDir",
    "SharedMount",
    "is_system_mount",
]

log = logging.getLogger(__name__)

DEFAULT_SHARED_ROOT = "/run/hyper/shared/pods"  # the seed's defaultSharedDir
ROOTFS_DIR = "rootfs"  # the seed's rootfsDir: NEWCONTAINER carries rootfs="rootfs", image=<cid>
DIR_MODE = 0o750  # the seed's dirMode for the pod and container directories
FILE_MODE = 0o640  # an empty file to bind-mount a file source on
VOLUME_TOKEN_BYTES = 8  # 16 random hex characters in a volume's directory name
MAX_VOLUME_BASENAME = 64  # keeps "<cid>-<hex>-<base>" well under NAME_MAX (255)
MAX_UNMOUNT_ROUNDS = 1000  # bound on unmount passes: stacked mounts are each one pass
SYSTEM_MOUNT_PREFIXES = ("/proc", "/sys", "/dev")  # never carried into the VM (dev/shm included)

_O_PATH_DIR = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
_O_PATH_ANY = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


def is_system_mount(destination: str) -> bool:
    """Whether a mount destination is under /proc, /sys or /dev (which the agent provides)."""
    return any(destination == p or destination.startswith(p + "/") for p in SYSTEM_MOUNT_PREFIXES)


@dataclass(frozen=True, slots=True)
class ContainerMounts:
    """What :meth:`SharedDir.mount_container` made: the rootfs mount point (``None`` for a block
    device rootfs) and the volumes."""

    rootfs: str | None
    volumes: tuple[SharedMount, ...]


class SharedDir:
    """The shared root holding one 9p-exported directory per pod."""

    def __init__(self, root: str | os.PathLike[str] = DEFAULT_SHARED_ROOT) -> None:
        check_absolute_path("shared_root", os.fspath(root))
        self.root = Path(os.path.realpath(root))

    # paths -------------------------------------------------------------------------------

    def pod_dir(self, pod: str) -> Path:
        """``<root>/<pod>``: the directory exported to the pod's VM."""
        return self.root / validate_id("pod_id", pod)

    def container_dir(self, pod: str, cid: str) -> Path:
        """``<root>/<pod>/<cid>``."""
        return self.pod_dir(pod) / validate_id("container_id", cid)

    def rootfs_path(self, pod: str, cid: str) -> Path:
        """``<root>/<pod>/<cid>/rootfs``: where the container's rootfs is bind-mounted."""
        return self.container_dir(pod, cid) / ROOTFS_DIR

    def create_pod(self, pod: str) -> Path:
        """Create the pod's directory (and the root) if missing; return it."""
        path = self.pod_dir(pod)
        self.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        with self._open_dir([pod], create=True) as fd:
            os.fstat(fd)
        return path

    # mounting ----------------------------------------------------------------------------

    def mount_rootfs(self, pod: str, cid: str, source: str, readonly: bool = False) -> str:
        """Bind-mount ``source`` (symlinks resolved; must exist) on ``<root>/<pod>/<cid>/rootfs``,
        read-only if asked. Returns the mount point.

        Raises ``InvalidParams`` (bad id or path, missing source), ``AlreadyExists`` (that rootfs
        is mounted already) and :class:`MountError`.
        """
        validate_id("pod_id", pod)
        validate_id("container_id", cid)
        target = self.rootfs_path(pod, cid)
        if self._mounts_at(target):
            raise AlreadyExists(f"rootfs of container {cid!r} in pod {pod!r} is mounted already")
        real = self._resolve_source("rootfs.path", source)
        self._bind(real, [pod, cid, ROOTFS_DIR], readonly)
        return str(target)

    def mount_volumes(self, pod: str, cid: str, mounts: Sequence[MountSpec]) -> list[SharedMount]:
        """Bind-mount the container's bind volumes into the share (the seed's
        mountSharedDirMounts). Mounts of another type and system mounts (/proc, /sys, /dev…)
        are skipped. On failure every volume mounted by this call is undone before raising.
        """
        validate_id("pod_id", pod)
        validate_id("container_id", cid)
        made: list[SharedMount] = []
        try:
            for m in mounts:
                if m.type != "bind" or is_system_mount(m.destination):
                    continue
                real = self._resolve_source("source", m.source)
                token = secrets.token_hex(VOLUME_TOKEN_BYTES)
                name = f"{cid}-{token}-{_volume_base(m.destination)}"
                self._bind(real, [pod, name], m.read_only)
                made.append(
                    SharedMount(
                        source=name,
                        destination=m.destination,
                        read_only=m.read_only,
                        host_path=str(self.pod_dir(pod) / name),
                    )
                )
        except BaseException:
            for volume in reversed(made):
                self._unmount_tree(Path(volume.host_path))
                _remove_path(Path(volume.host_path))
            raise
        return made

    def mount_container(
        self, pod: str, cid: str, rootfs: DirRootfs | None, mounts: Sequence[MountSpec]
    ) -> ContainerMounts:
        """Mount a container's rootfs (unless it is on a block device: ``None``) and volumes.
        All or nothing: on failure whatever was mounted for the container is undone."""
        rootfs_path = None
        try:
            if rootfs is not None:
                rootfs_path = self.mount_rootfs(pod, cid, rootfs.path, rootfs.readonly)
            volumes = self.mount_volumes(pod, cid, mounts)
        except BaseException:
            if rootfs_path is not None:
                self.unmount_container(pod, cid)
            raise
        return ContainerMounts(rootfs=rootfs_path, volumes=tuple(volumes))

    # unmounting --------------------------------------------------------------------------

    def unmount_container(self, pod: str, cid: str) -> None:
        """Unmount the container's rootfs and volumes and remove what was created for them.

        Found from /proc/self/mountinfo, not from records, so it also cleans up after a crash:
        everything below ``<pod>/<cid>`` and the mount points ``<pod>/<cid>-<16 hex>-<name>``.
        (The seed's volume naming is ambiguous for a container whose id itself looks like
        ``<cid>-<16 hex>-…``; avoid such ids.) Idempotent. Raises :class:`MountError` if
        something stays mounted.
        """
        container_dir = self.container_dir(pod, cid)
        volume_name = re.compile(re.escape(cid) + r"-[0-9a-f]{16}-[^/]+")
        # one read finds both: every mount point of the container starts with <pod>/<cid>
        pod_prefix = str(self.pod_dir(pod)) + "/"
        found = read_mountinfo_prefix(str(container_dir))
        names = [m.mount_point[len(pod_prefix) :] for m in found]
        volumes = {n for n in names if volume_name.fullmatch(n)}
        tops = [cid, *volumes]
        mine = [m for m, n in zip(found, names, strict=True) if _top_name(n) in tops]
        self._unmount_trees([pod_prefix + name for name in tops], mine)
        for name in volumes:
            _remove_path(Path(pod_prefix + name))
        if container_dir.is_dir() and not container_dir.is_symlink():
            shutil.rmtree(container_dir)
        else:
            _remove_path(container_dir)

    def cleanup_pod(self, pod: str) -> None:
        """Unmount everything under the pod's directory and remove it. Idempotent, crash-safe."""
        pod_dir = self.pod_dir(pod)
        self._unmount_trees([str(pod_dir)])
        if pod_dir.is_dir() and not pod_dir.is_symlink():
            shutil.rmtree(pod_dir)
        else:
            _remove_path(pod_dir)

    def mounted(self, pod: str) -> list[str]:
        """Mount points under the pod's directory, per /proc/self/mountinfo (for checks)."""
        return [m.mount_point for m in read_mountinfo(self.pod_dir(pod))]

    # internals ---------------------------------------------------------------------------

    def _resolve_source(self, field: str, source: str) -> str:
        """The real path of a mount source: it must exist and must not be inside the shared
        root (one pod's share must not reach into another's)."""
        check_absolute_path(field, source)
        real = os.path.realpath(source)
        if not os.path.exists(real):
            raise InvalidParams(f"invalid {field} {source!r}: does not exist", field=field)
        if _is_within(Path(real), self.root):
            raise InvalidParams(
                f"invalid {field} {source!r}: must not be inside the shared root", field=field
            )
        return real

    def _mounts_at(self, path: Path) -> bool:
        point = str(path)
        return any(m.mount_point == point for m in read_mountinfo(point))

    @contextlib.contextmanager
    def _open_dir(self, parts: Sequence[str], create: bool) -> Iterator[int]:
        """An ``O_PATH`` fd of ``<root>/<parts...>``, walking with ``O_NOFOLLOW`` from the root
        and creating missing directories if asked."""
        fd = os.open(self.root, _O_PATH_DIR)
        try:
            for part in parts:
                parent, fd = fd, -1
                try:
                    fd = _step(parent, part, create)
                finally:
                    os.close(parent)
            yield fd
        finally:
            if fd >= 0:
                os.close(fd)

    def _bind(self, source: str, parts: Sequence[str], readonly: bool) -> None:
        """Bind-mount ``source`` on ``<root>/<parts...>`` (created: a directory for a directory
        source, an empty file otherwise), then remount read-only if asked."""
        is_dir = stat.S_ISDIR(os.stat(source).st_mode)
        target = self.root.joinpath(*parts)
        self.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        with self._open_dir(parts[:-1], create=True) as parent:
            leaf = _make_leaf(parent, parts[-1], is_dir)
            try:
                sys_mount(source, f"/proc/self/fd/{leaf}", MS_BIND)
            finally:
                os.close(leaf)
            if not readonly:
                return
            try:
                # reopen by name: the lookup now crosses into the new mount, whose root we remount
                top = os.open(parts[-1], _O_PATH_ANY, dir_fd=parent)
                try:
                    sys_mount("none", f"/proc/self/fd/{top}", MS_BIND | MS_REMOUNT | MS_RDONLY)
                finally:
                    os.close(top)
            except BaseException:
                _detach(str(target))
                raise

    def _unmount_tree(self, top: Path) -> None:
        """Unmount every mount at or below ``top``, deepest and most recent first."""
        self._unmount_trees([str(top)])

    def _unmount_trees(self, tops: Sequence[str], found: list[MountInfo] | None = None) -> None:
        """Unmount every mount at or below any of ``tops``, deepest and most recent first.

        ``found``: those mounts as just read from mountinfo (saves the first read). Each round
        detaches everything one read showed, then reads again to check (a mount may have been
        stacked or propagated meanwhile).
        """
        root = str(self.root)
        for top in tops:
            if not _under(top, root) or top == root:
                raise InvalidParams(f"{top!r} is not inside the shared root", field="path")
        for _ in range(MAX_UNMOUNT_ROUNDS):
            below = found if found is not None else self._mounts_below(tops)
            found = None
            if not below:
                return
            # deepest path first; on one path the last mounted (highest id) is on top
            below.sort(key=lambda m: (m.mount_point.count("/"), m.mount_id), reverse=True)
            for victim in below:
                _detach(victim.mount_point)
        names = ", ".join(repr(top) for top in tops)
        raise MountError(f"mounts under {names} do not go away", errno.EBUSY)

    @staticmethod
    def _mounts_below(tops: Sequence[str]) -> list[MountInfo]:
        if len(tops) == 1:
            return read_mountinfo(tops[0])
        # a string prefix of all the tops (not a path): the reader matches strings anyway
        found = read_mountinfo_prefix(os.path.commonprefix(list(tops)))  # noqa: RUF071
        return [m for m in found if any(_under(m.mount_point, top) for top in tops)]


def _step(parent: int, name: str, create: bool) -> int:
    """Open directory ``name`` under ``parent`` without following symlinks."""
    try:
        try:
            return os.open(name, _O_PATH_DIR, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, DIR_MODE, dir_fd=parent)
            return os.open(name, _O_PATH_DIR, dir_fd=parent)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise InvalidParams(
                f"{name!r} in the shared dir is not a directory (symlink?)", field="path"
            ) from None
        raise


def _make_leaf(parent: int, name: str, is_dir: bool) -> int:
    """Create (if missing) and open the mount target ``name`` under ``parent``."""
    if is_dir:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, DIR_MODE, dir_fd=parent)
        flags = _O_PATH_DIR
    else:
        fd = os.open(
            name, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE, dir_fd=parent
        )
        os.close(fd)
        flags = _O_PATH_ANY
    try:
        return os.open(name, flags, dir_fd=parent)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise InvalidParams(f"mount target {name!r} exists and is of the wrong type") from None
        raise


def _detach(point: str) -> None:
    try:
        umount(point, UMOUNT_NOFOLLOW)
    except MountError as exc:
        if exc.errno == errno.EBUSY:
            log.warning("%s is busy; detaching it lazily", point)
            umount(point, UMOUNT_NOFOLLOW | MNT_DETACH)
        elif exc.errno != errno.EINVAL:  # EINVAL: not a mount point (any more)
            raise


def _volume_base(destination: str) -> str:
    base = os.path.basename(os.path.normpath(destination))
    if base in ("", ".", "..", "/"):
        base = "mount"
    return base[:MAX_VOLUME_BASENAME]


def _is_within(path: Path, top: Path) -> bool:
    return path == top or top in path.parents


def _under(path: str, top: str) -> bool:
    """``path`` is ``top`` or below it (both absolute and normalized)."""
    return path == top or path.startswith(top + "/")


def _top_name(relative: str) -> str:
    return relative.split("/", 1)[0]


def _remove_path(path: Path) -> None:
    """Remove an (unmounted) empty directory or file made as a mount target; ignore absence."""
    try:
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink()
    except FileNotFoundError:
        pass
