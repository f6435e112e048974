"""The default rootfs of ``hyperctl run``: a busybox tree built from the host's static busybox.

It lives in ``<dir of the RPC socket>/rootfs/busybox`` (the daemon's base dir with the embedded
default) and is built once: ``bin/busybox`` plus a symlink per applet, ``/etc/passwd`` and
``/etc/group``, and empty ``proc``, ``dev``, ``tmp`` mount points.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ELF_HEADER_SCAN = 4096  # PT_INTERP ("/lib.../ld-linux...") sits in the first page of an ELF
APPLETS_FALLBACK = ("sh", "cat", "echo", "sleep", "ls", "true", "false", "env", "id", "pwd", "ps")


class RootfsError(Exception):
    """No default rootfs can be built; the message tells the user to pass --rootfs."""


def _is_static(binary: str) -> bool:
    with open(binary, "rb") as f:
        head = f.read(ELF_HEADER_SCAN)
    return b"ld-linux" not in head and b"ld-musl" not in head


def _applets(busybox: str) -> list[str]:
    try:
        out = subprocess.run(
            [busybox, "--list"], capture_output=True, text=True, check=True, timeout=10
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return list(APPLETS_FALLBACK)
    return [a for a in out.split() if a and "/" not in a and a != "busybox"]


def build_busybox_rootfs(root: Path) -> Path:
    """Build (or complete) a busybox rootfs at ``root``; raises :class:`RootfsError`."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise RootfsError(
            "no --rootfs given and busybox is not installed to build the default rootfs; "
            "install busybox-static or pass --rootfs DIR"
        )
    if not _is_static(busybox):
        raise RootfsError(
            f"{busybox} is dynamically linked and cannot run inside a rootfs on its own; "
            "install busybox-static or pass --rootfs DIR"
        )
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for sub in ("bin", "proc", "dev", "tmp", "etc", "root"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, tmp / "bin" / "busybox")
    for applet in _applets(busybox):
        link = tmp / "bin" / applet
        if not link.exists():
            os.symlink("busybox", link)
    (tmp / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n"
    )
    (tmp / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    os.replace(tmp, root)
    return root


def default_rootfs(socket: str) -> Path:
    """``<dir of socket>/rootfs/busybox``, built on first use."""
    root = Path(os.path.dirname(os.path.abspath(socket))) / "rootfs" / "busybox"
    if (root / "bin" / "busybox").exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    try:
        return build_busybox_rootfs(root)
    except OSError as exc:
        raise RootfsError(
            f"cannot build the default rootfs in {root}: {exc}; pass --rootfs DIR"
        ) from None
