"""mount(2) and umount2(2) through ctypes, and /proc/self/mountinfo parsing.

No shelling out to mount(8): errors keep their errno, and nothing depends on util-linux.
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
    "MS_RDONLY",
    "MS_REC",
    "MS_REMOUNT",
    "UMOUNT_NOFOLLOW",
    "MountError",
    "MountInfo",
    "escape_path",
    "mount",
    "read_mountinfo",
    "read_mountinfo_prefix",
    "umount",
    "unescape_path",
]

# from <sys/mount.h>
MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MNT_DETACH = 0x2  # lazy unmount: detach now, release when no longer busy
UMOUNT_NOFOLLOW = 0x8  # do not follow a symlink in the last component of the target

MOUNTINFO = "/proc/self/mountinfo"


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
