"""I/O tokens and sessions (ccproxy spec §8).

A token names one I/O session of a VM: two agent sequence numbers, ``io_base`` (stdin and
stdout) and ``io_base + 1`` (stderr), handed out per VM from 3 in steps of 2 and never reused
(1 and 2 are the VM's null session). A token is allocated by RegisterVM/AttachVM, claimed by a
shim's ConnectShim, bound to a process by a Hyper newcontainer/execcmd, and freed by
DisconnectShim or when its VM is lost. The token record outlives the session (a freed token
answers ``vm: unknown token``/``token already claimed`` as the reference does) until its VM is
both unregistered and lost; then :meth:`TokenTable.purge` forgets it.
"""

from __future__ import annotations

import asyncio
import base64
import os
from typing import TYPE_CHECKING, Final, Protocol

from protocol.ccproxy import Stream

if TYPE_CHECKING:
    from hyperd.proxy.vm import AgentVM

TOKEN_BYTES: Final = 32  # crypto/rand bytes per token: 44 base64url characters with padding
FIRST_IO_BASE: Final = 3  # seqs 1 and 2 are the null session
IO_STEP: Final = 2  # stdio seq and stderr seq per session
NULL_IO_BASE: Final = 1


class ShimPeer(Protocol):
    """What a session needs from the shim connection that claimed it."""

    def send_output(self, stream: Stream, data: bytes) -> None: ...
    def send_exited(self, status: int) -> None: ...
    def close(self) -> None: ...


def new_token() -> str:
    """A fresh random token, in the reference's format (base64url with padding, 44 chars)."""
    return base64.urlsafe_b64encode(os.urandom(TOKEN_BYTES)).decode("ascii")


class IOSession:
    """One token's I/O session: its seqs, its shim, and the lifecycle of its process."""

    __slots__ = (
        "claimed",
        "container_id",
        "exit_delivered",
        "exit_status",
        "freed",
        "grace",
        "io_base",
        "is_exec",
        "pending_status",
        "process_id",
        "process_started",
        "shim",
        "shim_connected",
        "terminal",
        "terminated",
        "token",
        "used",
        "vm",
    )

    def __init__(self, token: str, vm: AgentVM, io_base: int) -> None:
        self.token = token
        self.vm = vm
        self.io_base = io_base
        self.claimed = False
        self.freed = False
        self.shim: ShimPeer | None = None
        self.shim_connected = asyncio.Event()
        self.process_started = asyncio.Event()
        self.used = False  # a newcontainer/execcmd is in flight or succeeded
        self.container_id = ""
        self.process_id = ""
        self.is_exec = False
        self.terminal = False
        self.terminated = False  # the agent sent EOF on one of our seqs
        self.exit_status: int | None = None
        self.exit_delivered = False
        self.pending_status: int | None = None  # hyperhq: exit event seen before the EOF
        self.grace: asyncio.TimerHandle | None = None

    @property
    def is_null(self) -> bool:
        """The VM's null session (no token): its output is discarded."""
        return self.io_base == NULL_IO_BASE

    def attach_shim(self, shim: ShimPeer) -> None:
        """A shim claimed this session (ConnectShim)."""
        self.claimed = True
        self.shim = shim
        self.shim_connected.set()

    def deliver_exit(self) -> None:
        """Give a newly connected shim the exit status that no shim received yet."""
        if self.shim is not None and self.exit_status is not None and not self.exit_delivered:
            self.exit_delivered = True
            self.shim.send_exited(self.exit_status)

    def detach_shim(self, shim: ShimPeer) -> None:
        """The shim's connection closed without DisconnectShim: the token may be claimed again."""
        if self.shim is shim:
            self.shim = None
            self.claimed = False
            self.shim_connected.clear()

    def exited(self, status: int) -> None:
        """The process exited: tell the shim once (or keep the status for a later shim)."""
        if self.grace is not None:
            self.grace.cancel()
            self.grace = None
        if self.exit_status is not None:
            return
        self.exit_status = status
        if self.shim is not None and not self.is_null:
            self.exit_delivered = True
            self.shim.send_exited(status)
        if self.used and not self.is_null:
            self.vm.process_exited(self, status)

    def free(self) -> None:
        """Forget the session's seqs and close its shim (DisconnectShim or VM lost).

        Waiters on the session are woken; they find ``freed`` set.
        """
        if self.freed:
            return
        self.freed = True
        if self.grace is not None:
            self.grace.cancel()
            self.grace = None
        shim, self.shim = self.shim, None
        self.shim_connected.set()
        self.process_started.set()
        if shim is not None:
            shim.close()


class TokenTable:
    """Every token the proxy handed out, across VMs."""

    __slots__ = ("_sessions",)

    def __init__(self) -> None:
        self._sessions: dict[str, IOSession] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, token: str) -> IOSession | None:
        """The session of ``token``, or None if the proxy never issued it (or purged it)."""
        return self._sessions.get(token)

    def add(self, session: IOSession) -> None:
        """Record a newly allocated session."""
        self._sessions[session.token] = session

    def purge(self, vm: AgentVM) -> None:
        """Forget every token of ``vm`` (unregistered and lost: nobody can use them)."""
        dead = [t for t, s in self._sessions.items() if s.vm is vm]
        for token in dead:
            del self._sessions[token]


__all__ = [
    "FIRST_IO_BASE",
    "IO_STEP",
    "NULL_IO_BASE",
    "TOKEN_BYTES",
    "IOSession",
    "ShimPeer",
    "TokenTable",
    "new_token",
]
