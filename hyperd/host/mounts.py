"""Bind mounts of container rootfs and volumes into a pod's shared directory, and their undoing.

Layout (the seed's): the pod's 9p share is ``<root>/<pod>``; a container's rootfs is bind-mounted
on ``<root>/<pod>/<cid>/rootfs`` (the agent sees ``<cid>/rootfs``); a bind volume is mounted on
``<root>/<pod>/<cid>-<16 hex>-<basename of its destination>``.

Safety:

- pod and container ids are checked with :func:`hyperd.spec.validate_id`, so every path stays
  inside the root;
- a source is resolved once: it is opened (``O_PATH``), the opened object is checked (it must not
  be inside the shared root) and that very object is mounted, through its file descriptor
  (``open_tree``/``move_mount``). Swapping a path component for a symlink after the check changes
  nothing: nothing is looked up by name again;
- mount targets are reached one component at a time with ``O_NOFOLLOW`` (the guest can write into
  the share, so a component could be a planted symlink), and the mount is attached to the opened
  directory;
- a read-only bind is made read-only before it is attached (never visible writable);
- the pod's directory is mode 0700: a volume whose source sits behind a directory that only its
  owner may traverse must not become readable by everyone through the share.

Unmounting: :meth:`SharedDir.unmount_recorded` undoes the mount points that
:meth:`SharedDir.mount_container` reported (what the daemon records), one ``umount2`` each, with
no read of the mount table; :meth:`SharedDir.unmount_container` asks /proc/self/mountinfo what is
mounted under the container (crash recovery: nothing was recorded, or the record may be short).
Both remove directories only once nothing is mounted below them.

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
    RESOLVE_NO_MAGICLINKS,
    RESOLVE_NO_SYMLINKS,
    UMOUNT_NOFOLLOW,
    MountError,
    MountInfo,
    bind_fd,
    is_mount_root,
    openat2,
    read_mountinfo,
    read_mountinfo_prefix,
    umount,
)
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
DIR_MODE = 0o750  # the seed's dirMode for the container directories below a pod's
POD_DIR_MODE = 0o700  # the pod's share: only hyperd (and the VM it runs) may look inside
FILE_MODE = 0o640  # an empty file to bind-mount a file source on
VOLUME_TOKEN_BYTES = 8  # 16 random hex characters in a volume's directory name
MAX_VOLUME_BASENAME = 64  # keeps "<cid>-<hex>-<base>" well under NAME_MAX (255)
MAX_UNMOUNT_ROUNDS = 1000  # bound on unmount passes: stacked mounts are each one pass
SYSTEM_MOUNT_PREFIXES = ("/proc", "/sys", "/dev")  # never carried into the VM (dev/shm included)

_O_PATH_DIR = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
_O_PATH_ANY = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_O_PATH_RESOLVE = os.O_PATH | os.O_CLOEXEC  # a mount source: its symlinks are resolved, once
_AT_FDCWD = -100  # openat2 relative to the working directory (absolute paths anyway)
_NO_LINKS = RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
MAX_UNMOUNT_STACK = 64  # umount2 calls per recorded mount point (stacked or propagated mounts)


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

    def __init__(
        self, root: str | os.PathLike[str] = DEFAULT_SHARED_ROOT, *, source_symlinks: bool = True
    ) -> None:
        """``source_symlinks=False``: a mount source whose path holds any symlink is refused
        (``openat2`` ``RESOLVE_NO_SYMLINKS``), for sources that were resolved and checked
        against an allowlist earlier: nothing swapped in since can lead elsewhere."""
        check_absolute_path("shared_root", os.fspath(root))
        self.root = Path(os.path.realpath(root))
        self.source_symlinks = source_symlinks

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
        with self._open_dir([pod], create=True, restrict_pod=True):
            pass
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
        with self._open_source("rootfs.path", source) as src:
            self._bind(src, [pod, cid, ROOTFS_DIR], readonly, exclusive=True)
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
                token = secrets.token_hex(VOLUME_TOKEN_BYTES)
                name = f"{cid}-{token}-{_volume_base(m.destination)}"
                with self._open_source("source", m.source) as src:
                    self._bind(src, [pod, name], m.read_only)
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
        # one read finds both: every mount point of the container starts with <pod>/<cid>
        pod_prefix = str(self.pod_dir(pod)) + "/"
        found = read_mountinfo_prefix(str(container_dir))
        names = [m.mount_point[len(pod_prefix) :] for m in found]
        volumes = {n for n in names if _is_volume_name(n, cid)}
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

    def container_mount_points(self, pod: str, cid: str) -> list[str]:
        """The mount points :meth:`mount_container` makes that are mounted now for ``cid``
        (its rootfs and volumes, each once, in the kernel's order), found from mountinfo: what
        to record for a container whose mounts were made but not saved before a crash."""
        pod_prefix = str(self.pod_dir(pod)) + "/"
        rootfs = str(self.rootfs_path(pod, cid))
        points: list[str] = []
        for m in read_mountinfo_prefix(str(self.container_dir(pod, cid))):
            point = m.mount_point
            if point in points:
                continue  # stacked on the same point
            if point == rootfs or _is_volume_name(point[len(pod_prefix) :], cid):
                points.append(point)
        return points

    def mounted(self, pod: str) -> list[str]:
        """Mount points under the pod's directory, per /proc/self/mountinfo (for checks)."""
        return [m.mount_point for m in read_mountinfo(self.pod_dir(pod))]

    # internals ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _open_source(self, field: str, source: str) -> Iterator[int]:
        """An ``O_PATH`` fd of the mount source, its symlinks resolved by this one open; the
        opened object must not be inside the shared root (one pod's share must not reach into
        another's). The check is made on what was opened, and that is what gets mounted."""
        check_absolute_path(field, source)
        try:
            if self.source_symlinks:
                fd = os.open(source, _O_PATH_RESOLVE)
            else:
                fd = openat2(_AT_FDCWD, source, os.O_PATH, _NO_LINKS)
        except FileNotFoundError:
            raise InvalidParams(
                f"invalid {field} {source!r}: does not exist", field=field
            ) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP and not self.source_symlinks:
                raise InvalidParams(
                    f"invalid {field} {source!r}: a component is a symlink", field=field
                ) from None
            raise InvalidParams(
                f"invalid {field} {source!r}: cannot open it: {exc.strerror}", field=field
            ) from None
        try:
            real = os.readlink(f"/proc/self/fd/{fd}")
            if not real.startswith("/") or os.fstat(fd).st_nlink == 0:
                raise InvalidParams(f"invalid {field} {source!r}: it was deleted", field=field)
            if _under(real, str(self.root)):
                raise InvalidParams(
                    f"invalid {field} {source!r}: must not be inside the shared root", field=field
                )
            yield fd
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _open_dir(
        self,
        parts: Sequence[str],
        create: bool,
        *,
        restrict_pod: bool = False,
        new_last: bool = False,
    ) -> Iterator[int]:
        """An ``O_PATH`` fd of ``<root>/<parts...>``, walking with ``O_NOFOLLOW`` from the root
        and creating missing directories (the root included) if asked. ``restrict_pod``: the
        first part is a pod's directory, made mode 0700 on the way; ``new_last``: the last part
        is likely missing (a container's directory)."""
        try:
            fd = os.open(self.root, _O_PATH_DIR)
        except FileNotFoundError:
            if not create:
                raise
            self.root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
            fd = os.open(self.root, _O_PATH_DIR)
        try:
            last = len(parts) - 1
            for index, part in enumerate(parts):
                parent, fd = fd, -1
                try:
                    fd = _step(parent, part, create, new_last and index == last)
                finally:
                    os.close(parent)
                if restrict_pod and index == 0:
                    _restrict_pod_dir(fd)
            yield fd
        finally:
            if fd >= 0:
                os.close(fd)

    def _bind(
        self, source: int, parts: Sequence[str], readonly: bool, *, exclusive: bool = False
    ) -> None:
        """Bind-mount the object open at ``source`` on ``<root>/<parts...>`` (created: a
        directory for a directory source, an empty file otherwise), read-only if asked.

        ``exclusive``: raise ``AlreadyExists`` if something is mounted there already.
        """
        is_dir = stat.S_ISDIR(os.fstat(source).st_mode)
        # one walk from the root: it creates what is missing and restricts the pod's directory
        with self._open_dir(
            parts[:-1], create=True, restrict_pod=True, new_last=len(parts) > 2
        ) as parent:
            leaf, created = _make_leaf(parent, parts[-1], is_dir)
            try:
                # (only hyperd mounts in the share, and one mount per container at a time: what
                # this call created holds no mount yet)
                if exclusive and not created and is_mount_root(leaf):
                    where = "/".join(parts)
                    raise AlreadyExists(f"{where} is mounted already")
                bind_fd(source, leaf, readonly=readonly)
            finally:
                os.close(leaf)

    def unmount_recorded(
        self, pod: str, cid: str, targets: Sequence[str], *, remove_dir: bool = True
    ) -> None:
        """Unmount the mount points ``targets`` (what :meth:`mount_container` reported for the
        container, as recorded) and remove what was created for them, without reading the
        mount table: one ``umount2`` per mount plus one that says nothing is left there.

        Each target must be the container's rootfs or one of its volume mount points. If
        anything unexpected is found mounted below the container's directory, it falls back to
        :meth:`unmount_container` (the mountinfo scan). Idempotent. Raises
        :class:`MountError` if something stays mounted.

        ``remove_dir=False``: the container's directory (and the empty rootfs mount point in
        it) stays, unchecked, for :meth:`unmount_container` or :meth:`cleanup_pod` to remove
        (``container.stop`` leaves it to ``container.delete``).
        """
        container_dir = self.container_dir(pod, cid)
        pod_prefix = str(self.pod_dir(pod)) + "/"
        rootfs = str(container_dir / ROOTFS_DIR)
        for target in targets:
            name = target[len(pod_prefix) :] if target.startswith(pod_prefix) else ""
            if target != rootfs and not _is_volume_name(name, cid):
                raise InvalidParams(
                    f"{target!r} is not a mount point of container {cid!r} in pod {pod!r}",
                    field="path",
                )
        for target in reversed(targets):
            _detach_all(target)
            if target != rootfs:
                _remove_path(Path(target))
        if not remove_dir:
            return
        if not _remove_tree_unless_mounted(container_dir):
            log.warning("%s: more than was recorded is mounted; scanning", container_dir)
            self.unmount_container(pod, cid)

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


def _step(parent: int, name: str, create: bool, expect_new: bool = False) -> int:
    """Open directory ``name`` under ``parent`` without following symlinks (created first if
    asked and missing; ``expect_new``: it is likely missing, so it is made before the open)."""
    try:
        if expect_new and create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, DIR_MODE, dir_fd=parent)
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


def _make_leaf(parent: int, name: str, is_dir: bool) -> tuple[int, bool]:
    """Create (if missing) and open the mount target ``name`` under ``parent``; its fd, and
    whether this call created it (a directory made just now cannot be a mount point)."""
    created = False
    if is_dir:
        try:
            os.mkdir(name, DIR_MODE, dir_fd=parent)
            created = True
        except FileExistsError:
            pass
        flags = _O_PATH_DIR
    else:
        fd = os.open(
            name, os.O_CREAT | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE, dir_fd=parent
        )
        os.close(fd)
        flags = _O_PATH_ANY
    try:
        return os.open(name, flags, dir_fd=parent), created
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise InvalidParams(f"mount target {name!r} exists and is of the wrong type") from None
        raise


def _restrict_pod_dir(fd: int) -> None:
    """Make the pod's directory (open at ``fd``) mode 0700, whatever it was created with."""
    if stat.S_IMODE(os.fstat(fd).st_mode) != POD_DIR_MODE:
        os.chmod(f"/proc/self/fd/{fd}", POD_DIR_MODE)


def _detach_all(point: str) -> None:
    """Unmount ``point`` until nothing is mounted there (stacked mounts come off one a call)."""
    for _ in range(MAX_UNMOUNT_STACK):
        try:
            umount(point, UMOUNT_NOFOLLOW)
        except MountError as exc:
            if exc.errno == errno.EINVAL:  # not a mount point (any more): done
                return
            if exc.errno == errno.ENOENT:
                return
            if exc.errno != errno.EBUSY:
                raise
            log.warning("%s is busy; detaching it lazily", point)
            umount(point, UMOUNT_NOFOLLOW | MNT_DETACH)
    raise MountError(f"mounts on {point!r} do not go away", errno.EBUSY)


def _remove_tree_unless_mounted(top: Path) -> bool:
    """Remove ``top`` and what is below it (mount points and what the guest wrote next to
    them), never descending into a mount (statx says which directory is a mount root).

    False if a mount was found (nothing below it is touched); True once ``top`` is gone.
    """
    try:
        fd = os.open(top, _O_PATH_DIR)
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            _remove_path(top)
            return True
        raise
    try:
        if is_mount_root(fd):
            return False
    finally:
        os.close(fd)
    with os.scandir(top) as it:
        entries = list(it)
    for entry in entries:
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            if not _remove_tree_unless_mounted(path):
                return False
        else:
            _remove_path(path)
    _remove_path(top)
    return True


def _detach(point: str) -> None:
    try:
        umount(point, UMOUNT_NOFOLLOW)
    except MountError as exc:
        if exc.errno == errno.EBUSY:
            log.warning("%s is busy; detaching it lazily", point)
            umount(point, UMOUNT_NOFOLLOW | MNT_DETACH)
        elif exc.errno != errno.EINVAL:  # EINVAL: not a mount point (any more)
            raise


_VOLUME_SUFFIX = re.compile(r"[0-9a-f]{16}-[^/]+")


def _is_volume_name(name: str, cid: str) -> bool:
    """``name`` is ``<cid>-<16 hex>-<base>``: one of the container's volume mount points (no
    pattern compiled per container)."""
    prefix = cid + "-"
    return name.startswith(prefix) and _VOLUME_SUFFIX.fullmatch(name, len(prefix)) is not None


def _volume_base(destination: str) -> str:
    base = os.path.basename(os.path.normpath(destination))
    if base in ("", ".", "..", "/"):
        base = "mount"
    return base[:MAX_VOLUME_BASENAME]


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
