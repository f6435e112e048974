"""A reproducible initramfs: the ``newc`` cpio format written from a directory tree.

The kernel unpacks ``newc`` archives (magic ``070701``). Entries are written in sorted path order
with fixed owner (root), fixed mtime and sequential inode numbers, so the same tree gives the same
bytes. Hard links are stored as separate files (the kernel does not need them).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

__all__ = ["Device", "write_archive"]

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
ALIGN = 4  # newc pads names and data to 4-byte boundaries


@dataclass(frozen=True)
class Device:
    """A device node to put into the archive (no ``mknod`` needed on the build host)."""

    path: str  # relative to the archive root, e.g. "dev/console"
    mode: int  # S_IFCHR | permission bits
    major: int
    minor: int


def _header(
    ino: int, mode: int, nlink: int, mtime: int, size: int, rmaj: int, rmin: int, namesize: int
) -> bytes:
    fields = (ino, mode, 0, 0, nlink, mtime, size, 0, 0, rmaj, rmin, namesize, 0)
    return MAGIC + b"".join(b"%08X" % f for f in fields)


def _pad(n: int) -> bytes:
    return b"\0" * (-n % ALIGN)


def _entry(
    out: BinaryIO,
    ino: int,
    name: str,
    mode: int,
    data: bytes,
    mtime: int,
    rdev: tuple[int, int] = (0, 0),
) -> None:
    raw = name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(mode) else 1
    head = _header(ino, mode, nlink, mtime, len(data), rdev[0], rdev[1], len(raw))
    out.write(head + raw + _pad(len(head) + len(raw)))
    out.write(data + _pad(len(data)))


def _walk(root: Path) -> Iterator[Path]:
    """Every path under ``root`` (not ``root`` itself), parents before children, sorted."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        base = Path(dirpath)
        for name in sorted(dirnames + filenames):
            yield base / name


def write_archive(
    root: Path, out: BinaryIO, *, mtime: int = 0, devices: tuple[Device, ...] = ()
) -> int:
    """Write the tree at ``root`` (plus ``devices``) as a newc archive; returns the entry count.

    Regular files keep their permission bits; owners become root; symlinks are stored as links.
    Raises ``ValueError`` for a file type the archive cannot hold (sockets, fifos, devices).
    """
    ino = 1
    paths = sorted(_walk(root), key=lambda p: p.relative_to(root).parts)
    for path in paths:
        name = path.relative_to(root).as_posix()
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            data = os.readlink(path).encode()
            mode = stat.S_IFLNK | 0o777
        elif stat.S_ISDIR(st.st_mode):
            data = b""
            mode = stat.S_IFDIR | stat.S_IMODE(st.st_mode)
        elif stat.S_ISREG(st.st_mode):
            data = path.read_bytes()
            mode = stat.S_IFREG | stat.S_IMODE(st.st_mode)
        else:
            raise ValueError(f"{name}: cannot put this file type into an initramfs")
        _entry(out, ino, name, mode, data, mtime)
        ino += 1
    for dev in sorted(devices, key=lambda d: d.path):
        _entry(out, ino, dev.path, dev.mode, b"", mtime, (dev.major, dev.minor))
        ino += 1
    _entry(out, 0, TRAILER, 0, b"", 0)
    return ino - 1
