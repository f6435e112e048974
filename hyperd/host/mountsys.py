"""mount(2) and umount2(2) through ctypes, and /proc/self/mountinfo parsing.

No shelling out to mount(8): errors keep their errno, and nothing depends on util-linux.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
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
    "mount",
    "read_mountinfo",
    "umount",
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


def _unescape(field: str) -> str:
    # the kernel escapes space, tab, newline and backslash in paths as \ooo octal
    out = []
    i = 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def read_mountinfo() -> list[MountInfo]:
    """Every mount of this process's mount namespace, in the kernel's order (parents first,
    later mounts on the same point after earlier ones)."""
    mounts = []
    with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split(" ")
            if len(fields) < 5:
                continue
            mounts.append(MountInfo(int(fields[0]), int(fields[1]), _unescape(fields[4])))
    return mounts
