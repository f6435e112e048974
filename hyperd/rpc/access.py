"""Who is on the other end of an accepted unix socket, and whether they may use the API."""

from __future__ import annotations

import logging
import os
import socket
import struct
from dataclasses import dataclass, field
from typing import Final

from hyperd.errors import Unauthorized

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
