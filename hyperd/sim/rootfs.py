"""Where a simulated container lives on the host, and who its processes run as.

The simulated VM's shared directory plays the 9p share: a container's root is
``<share>/<image>/<rootfs>``, fsmap sources are relative to the share. Users and groups named in a
process are looked up in the container's own ``/etc/passwd`` and ``/etc/group``, as a real agent
would inside the guest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

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
    """An fsmap entry ready to mount: host ``source`` onto ``target`` (a host path in the root)."""

    source: Path
    target: Path
    read_only: bool


def prepare_bind(
    share: Path, root: Path, source: str, path: str, *, absolute: bool, read_only: bool
) -> BindMount:
    """Check an fsmap entry and create its mount point in the container root; RootfsError.

    The mount point is a directory or an empty file, like the source.
    """
    src = check_fsmap_source(share, source, absolute)
    target = Path(os.path.normpath(root / path.lstrip("/")))
    if target == root or not target.is_relative_to(root):
        raise RootfsError(f"fsmap path {path!r} is not inside the container")
    try:
        if src.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
    except OSError as exc:
        raise RootfsError(f"cannot create mount point {path!r}: {exc.strerror}") from None
    return BindMount(src, target, read_only)


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
