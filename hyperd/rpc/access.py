"""Who is on the other end of an accepted unix socket, and whether they may use the API."""

from __future__ import annotations

import grp
import logging
import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from hyperd.errors import InvalidParams, Unauthorized

log = logging.getLogger(__name__)

_UCRED: Final = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}
ROOT_UID: Final = 0


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """The peer process as the kernel saw it when it connected (``SO_PEERCRED``).

    ``groups`` are its supplementary groups read from ``/proc/<pid>/status`` at accept time;
    empty when that could not be read (the process already exited, or lives in another pid
    namespace).
    """

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()


def read_supplementary_groups(pid: int) -> frozenset[int]:
    """The ``Groups:`` line of ``/proc/<pid>/status``; empty if unreadable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """Credentials of the peer of a connected AF_UNIX socket (blocking: reads ``/proc``).

    Raises ``OSError`` if the socket has no peer credentials.
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    groups = read_supplementary_groups(pid) if pid > 0 else frozenset()
    return PeerCredentials(pid=pid, uid=uid, gid=gid, groups=groups)


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """Who may talk to the server.

    Allowed: root; the uid the server runs as; and, when ``group_gid`` is set, any peer whose
    uid's primary gid or supplementary groups include it. Everybody else is refused.
    """

    group_gid: int | None = None
    server_uid: int = field(default_factory=os.geteuid)

    def allows(self, peer: PeerCredentials) -> bool:
        """Whether ``peer`` may use the API."""
        if peer.uid in (ROOT_UID, self.server_uid):
            return True
        if self.group_gid is None:
            return False
        return peer.gid == self.group_gid or self.group_gid in peer.groups

    def refusal(self, peer: PeerCredentials) -> Unauthorized:
        """The error a refused peer is sent; names its uid and what was required."""
        if self.group_gid is None:
            required = "root"
            message = f"uid {peer.uid} may not use this socket: root required"
        else:
            required = f"gid {self.group_gid}"
            message = (
                f"uid {peer.uid} may not use this socket: "
                f"root or membership of group {self.group_gid} required"
            )
        return Unauthorized(message, uid=peer.uid, pid=peer.pid, required=required)


def group_id(group: str | int | None) -> int | None:
    """The gid of a configured group (a name or a number); ``None`` for none.

    Raises ``ValueError`` naming the group when no such group exists.
    """
    if group is None or group == "":
        return None
    if isinstance(group, int):
        return group
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"rpc.group: no group named {group!r}") from None


class HostPathPolicy:
    """Which host paths a caller may have hyperd bind-mount (rootfs and volume sources).

    Root and the server's own uid may use any path. Others may use only a path that, once its
    symlinks are resolved, is one of ``allowed`` or below one; ``allowed=None`` allows any path
    (the API group is then root-equivalent). The check resolves the path when the call is made;
    the mount then takes the resolved path and follows no link (see :meth:`check`).
    """

    def __init__(self, allowed: Iterable[str] | None, server_uid: int | None = None) -> None:
        self.allowed = None if allowed is None else tuple(os.path.realpath(p) for p in allowed)
        self._server_uid = os.geteuid() if server_uid is None else server_uid

    def restricts(self, peer: PeerCredentials) -> bool:
        """Whether ``peer``'s paths are checked at all."""
        return self.allowed is not None and peer.uid not in (ROOT_UID, self._server_uid)

    def check(self, peer: PeerCredentials, field: str, path: str) -> str:
        """``path`` with its symlinks resolved, if ``peer`` may use it; else raise
        :class:`InvalidParams` naming ``field`` and ``path``. Mount what this returns without
        following links (``SharedDir(source_symlinks=False)``): then nothing swapped in after
        the check can lead elsewhere."""
        real = os.path.realpath(path)
        if self.allowed is None or not self.restricts(peer):
            return real
        for top in self.allowed:
            if real == top or real.startswith(top.rstrip("/") + "/"):
                return real
        where = ", ".join(self.allowed) if self.allowed else "none"
        resolved = "" if real == path else f" (resolves to {real})"
        raise InvalidParams(
            f"{field} {path!r}{resolved} is not under a host path that uid {peer.uid} may use "
            f"(rpc.allowed_host_paths: {where})",
            field=field,
            path=path,
        )


@dataclass(frozen=True, slots=True)
class SocketAccess:
    """Who may connect to a socket hyperd makes for its callers (the RPC socket, the per-pod
    proxy sockets): its permission bits and group, and those of the directory holding it."""

    mode: int = 0o660
    gid: int | None = None

    @property
    def dir_mode(self) -> int:
        """Owner rwx; read and search (never write) for each class the socket mode admits."""
        mode = 0o700
        if self.mode & 0o070:
            mode |= 0o050
        if self.mode & 0o007:
            mode |= 0o005
        return mode

    def apply_to_dir(self, path: str) -> None:
        """Give the directory ``path`` :attr:`dir_mode` and the group (blocking)."""
        os.chmod(path, self.dir_mode)
        if self.gid is not None:
            os.chown(path, -1, self.gid)

    def proxy_args(self) -> list[str]:
        """hyperd-proxy's options that make its socket so."""
        args = ["--socket-mode", f"{self.mode:04o}"]
        if self.gid is not None:
            args += ["--socket-group", str(self.gid)]
        return args
