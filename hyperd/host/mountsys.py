"""mount(2), umount2(2), the new mount API (open_tree, mount_setattr, move_mount), openat2(2)
and statx(2) through ctypes, and /proc/self/mountinfo parsing.

No shelling out to mount(8): errors keep their errno, and nothing depends on util-linux. The
system calls added after glibc 2.28 are made with ``syscall(2)``: their numbers are the same on
every architecture (the unified table from 424 on).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
from dataclasses import dataclass

from hyperd.errors import HyperdError

__all__ = [
    "MNT_DETACH",
    "MS_BIND",
    "MS_NODEV",
    "MS_RDONLY",
    "MS_REC",
    "MS_REMOUNT",
    "RESOLVE_BENEATH",
    "RESOLVE_IN_ROOT",
    "RESOLVE_NO_MAGICLINKS",
    "RESOLVE_NO_SYMLINKS",
    "RESOLVE_NO_XDEV",
    "UMOUNT_NOFOLLOW",
    "MountError",
    "MountInfo",
    "bind_fd",
    "escape_path",
    "is_mount_root",
    "mount",
    "openat2",
    "read_mountinfo",
    "read_mountinfo_prefix",
    "umount",
    "unescape_path",
]

# from <sys/mount.h>
MS_RDONLY = 0x1
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MNT_DETACH = 0x2  # lazy unmount: detach now, release when no longer busy
UMOUNT_NOFOLLOW = 0x8  # do not follow a symlink in the last component of the target

MOUNTINFO = "/proc/self/mountinfo"

# <linux/openat2.h>: how openat2 resolves a path
RESOLVE_NO_XDEV = 0x01  # never cross a mount point
RESOLVE_NO_MAGICLINKS = 0x02  # no /proc/<pid>/fd-style links
RESOLVE_NO_SYMLINKS = 0x04  # no symlinks at all
RESOLVE_BENEATH = 0x08  # refuse any path that leaves the starting directory
RESOLVE_IN_ROOT = 0x10  # treat the starting directory as "/" (as chroot does, race-free)

# unified syscall numbers (asm-generic, identical on x86_64, aarch64, riscv64...)
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_OPENAT2 = 437
_SYS_MOUNT_SETATTR = 442
_OPEN_TREE_CLONE = 1  # a detached copy of the tree (a bind mount not yet attached anywhere)
_AT_EMPTY_PATH = 0x1000  # operate on the fd itself
_AT_SYMLINK_NOFOLLOW = 0x100
_MOVE_MOUNT_F_EMPTY_PATH = 0x04
_MOVE_MOUNT_T_EMPTY_PATH = 0x40
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NODEV = 0x4
_STATX_ATTR_MOUNT_ROOT = 0x2000  # stx_attributes bit: the file is the root of a mount
_STATX_BASIC_STATS = 0x7FF
_STATX_SIZE = 256  # sizeof(struct statx)
_STATX_ATTRIBUTES = 8  # offset of stx_attributes (u64)
_STATX_ATTRIBUTES_MASK = 56  # offset of stx_attributes_mask (u64)


class MountError(HyperdError):
    """A mount or unmount system call failed; ``errno`` holds the cause."""

    def __init__(self, message: str, err: int) -> None:
        super().__init__(message, errno=errno.errorcode.get(err, str(err)))
        self.errno = err


def _libc() -> ctypes.CDLL:
    lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    lib.mount.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_void_p,
    ]
    lib.mount.restype = ctypes.c_int
    lib.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    lib.umount2.restype = ctypes.c_int
    lib.syscall.restype = ctypes.c_long
    lib.statx.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_void_p,
    ]
    lib.statx.restype = ctypes.c_int
    return lib


_LIBC = _libc()


def mount(source: str, target: str, flags: int, fstype: str | None = None) -> None:
    """``mount(source, target, fstype, flags, NULL)``; raises :class:`MountError` on failure."""
    fs = os.fsencode(fstype) if fstype else None
    rc = _LIBC.mount(os.fsencode(source), os.fsencode(target), fs, flags, None)
    if rc != 0:
        err = ctypes.get_errno()
        raise MountError(
            f"mount {source!r} on {target!r} (flags {flags:#x}) failed: {os.strerror(err)}", err
        )


def umount(target: str, flags: int = UMOUNT_NOFOLLOW) -> None:
    """``umount2(target, flags)``; raises :class:`MountError` on failure."""
    if _LIBC.umount2(os.fsencode(target), flags) != 0:
        err = ctypes.get_errno()
        raise MountError(f"unmount {target!r} failed: {os.strerror(err)}", err)


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """``openat2(dirfd, path, {flags, mode, resolve})``: an fd, or OSError with its errno.

    ``resolve`` is a mask of the ``RESOLVE_*`` flags; the kernel enforces them during the lookup
    itself, so no rename or symlink swap can move the result outside what they allow.
    """
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    fd = _LIBC.syscall(
        _SYS_OPENAT2,
        ctypes.c_int(dirfd),
        ctypes.c_char_p(os.fsencode(path)),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"openat2 {path!r}: {os.strerror(err)}", path)
    return int(fd)


def is_mount_root(fd: int) -> bool:
    """Whether the file open at ``fd`` is the root of a mount (statx ``STATX_ATTR_MOUNT_ROOT``).

    Unlike :func:`os.path.ismount` it also sees a bind mount of a directory of the same
    filesystem, and it reads one inode, not the mount table.
    """
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    flags = _AT_EMPTY_PATH | _AT_SYMLINK_NOFOLLOW
    if _LIBC.statx(fd, b"", flags, _STATX_BASIC_STATS, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"statx: {os.strerror(err)}")
    attrs = int.from_bytes(buf.raw[_STATX_ATTRIBUTES : _STATX_ATTRIBUTES + 8], "little")
    mask = int.from_bytes(buf.raw[_STATX_ATTRIBUTES_MASK : _STATX_ATTRIBUTES_MASK + 8], "little")
    if not mask & _STATX_ATTR_MOUNT_ROOT:  # kernel < 5.8: ask the mount table instead
        return os.path.ismount(f"/proc/self/fd/{fd}") or _in_mountinfo(fd)
    return bool(attrs & _STATX_ATTR_MOUNT_ROOT)


def _in_mountinfo(fd: int) -> bool:
    point = os.readlink(f"/proc/self/fd/{fd}")
    return any(m.mount_point == point for m in read_mountinfo(point))


def _sys(number: int, *args: object) -> int:
    rc = _LIBC.syscall(number, *args)
    if rc < 0:
        return -ctypes.get_errno()
    return int(rc)


def bind_fd(source_fd: int, target_fd: int, *, readonly: bool, nodev: bool = False) -> None:
    """Bind-mount the object open at ``source_fd`` on the one open at ``target_fd``.

    Both ends are file descriptors, so nothing is looked up by name again: what was checked is
    what gets mounted, where it was checked. With the new mount API (Linux 5.12+) the copy is
    made read-only (and ``nodev``: device nodes on it cannot be opened) before it is attached,
    so it is never visible without those; on older kernels (``ENOSYS``) it falls back to
    ``mount(2)`` on the ``/proc/self/fd`` links and a remount.
    Raises :class:`MountError`.
    """
    tree = _sys(
        _SYS_OPEN_TREE,
        ctypes.c_int(source_fd),
        ctypes.c_char_p(b""),
        ctypes.c_uint(_OPEN_TREE_CLONE | os.O_CLOEXEC | _AT_EMPTY_PATH),
    )
    if tree == -errno.ENOSYS:
        _bind_fd_legacy(source_fd, target_fd, readonly, nodev)
        return
    if tree < 0:
        raise MountError(f"open_tree of the mount source failed: {os.strerror(-tree)}", -tree)
    try:
        attrs = (_MOUNT_ATTR_RDONLY if readonly else 0) | (_MOUNT_ATTR_NODEV if nodev else 0)
        if attrs:
            attr = _MountAttr(attrs, 0, 0, 0)
            rc = _sys(
                _SYS_MOUNT_SETATTR,
                ctypes.c_int(tree),
                ctypes.c_char_p(b""),
                ctypes.c_uint(_AT_EMPTY_PATH),
                ctypes.byref(attr),
                ctypes.c_size_t(ctypes.sizeof(attr)),
            )
            if rc < 0:
                raise MountError(f"setting the bind mount's flags failed: {os.strerror(-rc)}", -rc)
        rc = _sys(
            _SYS_MOVE_MOUNT,
            ctypes.c_int(tree),
            ctypes.c_char_p(b""),
            ctypes.c_int(target_fd),
            ctypes.c_char_p(b""),
            ctypes.c_uint(_MOVE_MOUNT_F_EMPTY_PATH | _MOVE_MOUNT_T_EMPTY_PATH),
        )
        if rc < 0:
            raise MountError(f"attaching the bind mount failed: {os.strerror(-rc)}", -rc)
    finally:
        os.close(tree)


def _bind_fd_legacy(source_fd: int, target_fd: int, readonly: bool, nodev: bool) -> None:
    target = f"/proc/self/fd/{target_fd}"
    mount(f"/proc/self/fd/{source_fd}", target, MS_BIND)
    if not readonly and not nodev:
        return
    # the fd still names the directory below the new mount; its root is reached by path
    point = os.readlink(target)
    try:
        flags = (MS_RDONLY if readonly else 0) | (MS_NODEV if nodev else 0)
        mount("none", point, MS_BIND | MS_REMOUNT | flags)
    except BaseException:
        umount(point, UMOUNT_NOFOLLOW | MNT_DETACH)
        raise


@dataclass(frozen=True, slots=True)
class MountInfo:
    """One line of /proc/self/mountinfo: the mount's id, its parent's id and its mount point."""

    mount_id: int
    parent_id: int
    mount_point: str


# the kernel writes space, tab, newline and backslash in paths as \ooo octal (seq_path's escapes)
_ESCAPES = str.maketrans({" ": "\\040", "\t": "\\011", "\n": "\\012", "\\": "\\134"})
_OCTAL = re.compile(r"\\([0-7]{3})")
_MOUNT_POINT_FIELD = 4  # mount id, parent id, major:minor, root, mount point, ...


def escape_path(path: str) -> str:
    """``path`` as /proc/self/mountinfo writes it (the inverse of :func:`unescape_path`)."""
    return path.translate(_ESCAPES)


def unescape_path(field: str) -> str:
    """A mountinfo path field with its ``\\ooo`` octal escapes decoded."""
    if "\\" not in field:
        return field
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def _parse(line: str) -> MountInfo | None:
    fields = line.split(" ", _MOUNT_POINT_FIELD + 1)
    if len(fields) <= _MOUNT_POINT_FIELD:
        return None
    return MountInfo(int(fields[0]), int(fields[1]), unescape_path(fields[_MOUNT_POINT_FIELD]))


def read_mountinfo(under: str | os.PathLike[str] | None = None) -> list[MountInfo]:
    """Every mount of this process's mount namespace, in the kernel's order (parents first,
    later mounts on the same point after earlier ones).

    With ``under`` (an absolute, normalized path), only the mounts at or below it. The file is
    read once and searched for the escaped form of ``under``; only the lines that contain it are
    parsed, so the cost per call stays close to the kernel's for any number of mounts.
    """
    top = os.fspath(under) if under is not None else "/"
    if top == "/":
        return [m for line in _read().split("\n") if (m := _parse(line)) is not None]
    return [
        m
        for m in read_mountinfo_prefix(top)
        if m.mount_point == top or m.mount_point.startswith(top + "/")
    ]


def read_mountinfo_prefix(prefix: str) -> list[MountInfo]:
    """The mounts whose mount point starts with the string ``prefix`` (not only at a ``/``:
    ``/a/b`` matches ``/a/b``, ``/a/b/c`` and ``/a/bc``), in the kernel's order."""
    text = _read()
    escaped = escape_path(prefix)
    mounts = []
    pos = text.find(escaped)
    while pos >= 0:
        start = text.rfind("\n", 0, pos) + 1
        end = text.find("\n", pos)
        if end < 0:
            end = len(text)
        fields = text[start:end].split(" ", _MOUNT_POINT_FIELD + 1)
        if len(fields) > _MOUNT_POINT_FIELD and fields[_MOUNT_POINT_FIELD].startswith(escaped):
            point = unescape_path(fields[_MOUNT_POINT_FIELD])
            mounts.append(MountInfo(int(fields[0]), int(fields[1]), point))
        pos = text.find(escaped, end)
    return mounts


def _read() -> str:
    with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
        return f.read()
