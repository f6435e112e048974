"""Where a simulated container lives on the host, and who its processes run as.

The simulated VM's shared directory plays the 9p share: a container's root is
``<share>/<image>/<rootfs>``, fsmap sources are relative to the share. Users and groups named in a
process are looked up in the container's own ``/etc/passwd`` and ``/etc/group``, as a real agent
would inside the guest.
"""

from __future__ import annotations

import contextlib
import errno
import os
from dataclasses import dataclass
from pathlib import Path

from hyperd.sim.isolation import resolve_in_root

__all__ = [
    "BindMount",
    "Identity",
    "IdentityError",
    "RootfsError",
    "check_fsmap_source",
    "container_root",
    "prepare_bind",
    "resolve_identity",
]

ROOT_UID = 0
ROOT_GID = 0


class RootfsError(Exception):
    """The container's root or one of its fsmap sources does not exist. ``str()`` says which."""


class IdentityError(Exception):
    """A user or group is neither numeric nor known to the container. ``str()`` says which."""


@dataclass(frozen=True, slots=True)
class Identity:
    """The numeric identity a process runs with."""

    uid: int
    gid: int
    groups: tuple[int, ...]


def container_root(share: Path, image: str, rootfs: str) -> Path:
    """The host directory of a container's root: ``share/image/rootfs``; raises RootfsError."""
    if not image or "/" in image or image in (".", ".."):
        raise RootfsError(f"invalid image name {image!r}")
    root = share / image / rootfs.lstrip("/")
    if not root.resolve().is_relative_to(share.resolve()):
        raise RootfsError(f"rootfs {image}/{rootfs} is outside the shared directory")
    if not root.is_dir():
        raise RootfsError(f"rootfs {image}/{rootfs} does not exist in the shared directory")
    return root


def check_fsmap_source(share: Path, source: str, absolute: bool) -> Path:
    """The host path of an fsmap source (relative to the share unless absolute); must exist."""
    path = Path(source) if absolute else share / source.lstrip("/")
    if not path.exists():
        raise RootfsError(f"fsmap source {source!r} does not exist")
    return path


@dataclass(frozen=True, slots=True)
class BindMount:
    """An fsmap entry ready to mount: host ``source`` onto ``path`` in the container (``target``:
    where that is on the host when no symlink is involved, for logs and the non-root mode)."""

    source: Path
    target: Path
    read_only: bool
    path: str = ""


def prepare_bind(
    share: Path, root: Path, source: str, path: str, *, absolute: bool, read_only: bool
) -> BindMount:
    """Check an fsmap entry and create its mount point in the container root; RootfsError.

    The mount point is a directory or an empty file, like the source. It is made as the
    container would see the path: every component is looked up inside the root
    (``RESOLVE_IN_ROOT``), so a symlink in the rootfs (``mnt -> /host/dir``) leads to
    ``<root>/host/dir``, never out of the root.
    """
    src = check_fsmap_source(share, source, absolute)
    relative = os.path.normpath(path.lstrip("/"))
    inside = "/" + relative
    if relative in (".", "..") or relative.startswith("../"):
        raise RootfsError(f"fsmap path {path!r} is not inside the container")
    try:
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _make_mount_point(root_fd, inside, src.is_dir())
        finally:
            os.close(root_fd)
    except OSError as exc:
        raise RootfsError(f"cannot create mount point {path!r}: {exc.strerror}") from None
    return BindMount(src, root / inside.lstrip("/"), read_only, inside)


def _make_mount_point(root_fd: int, inside: str, is_dir: bool) -> None:
    """``mkdir -p`` (or touch, for a file) of ``inside`` with every lookup confined to the
    root open at ``root_fd``."""
    parts = inside.strip("/").split("/")
    for i, name in enumerate(parts):
        last = i == len(parts) - 1
        here = "/".join(parts[: i + 1])
        with contextlib.suppress(FileNotFoundError):
            os.close(resolve_in_root(root_fd, here))
            continue
        parent = resolve_in_root(root_fd, "/".join(parts[:i]), os.O_PATH | os.O_DIRECTORY)
        try:
            if is_dir or not last:
                os.mkdir(name, 0o755, dir_fd=parent)
            else:
                flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                os.close(os.open(name, flags, 0o644, dir_fd=parent))
        except FileExistsError:  # a dangling symlink: its target would be outside
            raise OSError(errno.ELOOP, f"{here} is a dangling symlink") from None
        finally:
            os.close(parent)


def _table(root: Path, name: str) -> list[list[str]]:
    try:
        text = (root / "etc" / name).read_text(errors="replace")
    except OSError:
        return []
    return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]


def _lookup_user(root: Path, user: str) -> tuple[int, int | None]:
    """uid and primary gid (None when the uid is not listed) of ``user``."""
    rows = _table(root, "passwd")
    if user.isdigit():
        uid = int(user)
        for row in rows:
            if len(row) >= 4 and row[2] == user and row[3].isdigit():
                return uid, int(row[3])
        return uid, None
    for row in rows:
        if len(row) >= 4 and row[0] == user and row[2].isdigit() and row[3].isdigit():
            return int(row[2]), int(row[3])
    raise IdentityError(f"unknown user {user!r}: not in the container's /etc/passwd")


def _lookup_group(root: Path, group: str) -> int:
    if group.isdigit():
        return int(group)
    for row in _table(root, "group"):
        if len(row) >= 3 and row[0] == group and row[2].isdigit():
            return int(row[2])
    raise IdentityError(f"unknown group {group!r}: not in the container's /etc/group")


def resolve_identity(
    root: Path, user: str, group: str, additional_groups: list[str] | None
) -> Identity:
    """Numeric uid/gid/groups for a process spec; empty user means root. Raises IdentityError.

    A ``"user:group"`` user string (what cc-agent hands libcontainer) is split.
    """
    if ":" in user and not group:
        user, group = user.split(":", 1)
    uid, primary = _lookup_user(root, user) if user else (ROOT_UID, ROOT_GID)
    gid = _lookup_group(root, group) if group else (primary if primary is not None else ROOT_GID)
    groups = tuple(_lookup_group(root, g) for g in additional_groups or ())
    return Identity(uid, gid, groups)
