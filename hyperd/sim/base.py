"""State and shared helpers of the simulated agent (see :mod:`hyperd.sim.agent`).

:class:`AgentBase` holds what every command handler needs: the dialect, the shared directory,
the registry of containers and processes, and :meth:`AgentBase._refuse`, which answers ERROR the
way the dialect's agent does (cc-agent: a UTF-8 message; hyperhq: an empty payload).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol, TypeVar

import msgspec

from hyperd.sim.containers import ContainerRecord, ProcessRecord, Registry
from protocol import ProtocolError
from protocol.hyperstart import Code, Dialect, Pod, ProcessAsyncEvent, decode_message

__all__ = ["AgentBase", "Answer", "Channels", "Handler", "Refused"]

log = logging.getLogger("hyperd.sim.agent")

HYPER_DEPRECATED = frozenset(
    {Code.GETPOD, Code.STOPPOD, Code.RESTARTCONTAINER, Code.CMDFINISHED, Code.PODFINISHED}
)

M = TypeVar("M", bound=msgspec.Struct)


@dataclass(frozen=True, slots=True)
class Answer:
    """The answer to one command: ACK (``ok``) or ERROR, with its payload."""

    ok: bool
    payload: bytes = b""


class Channels(Protocol):
    """Where the agent's unsolicited output goes; a channel with no host drops it."""

    async def send_tty(self, data: bytes) -> None: ...

    async def send_event(self, event: ProcessAsyncEvent) -> None: ...


class Refused(Exception):
    """A command is answered with ERROR and ``payload``; ``message`` is for the log."""

    def __init__(self, message: str, payload: bytes) -> None:
        super().__init__(message)
        self.payload = payload


Handler = Callable[[bytes], Awaitable[bytes]]


class AgentBase:
    """The state of one simulated guest: the pod, its containers and their processes."""

    def __init__(
        self,
        *,
        dialect: Dialect,
        share: Path,
        channels: Channels,
        chroot: bool,
        netns_fd: int | None = None,
    ) -> None:
        self.dialect = dialect
        self.share = share.resolve()  # chroot and mounts happen in a child with another cwd
        self.chroot = chroot
        self.netns_fd = netns_fd
        self.pod: Pod | None = None
        self.registry = Registry()
        self._channels = channels
        self._hyper = dialect.name == "hyper"

    def _refuse(self, message: str, hyper: bytes | None = b"") -> NoReturn:
        """Answer ERROR: CC sends ``message``; HYPER sends ``hyper`` (None: the message too)."""
        if self._hyper and hyper is not None:
            raise Refused(message, hyper)
        raise Refused(message, message.encode())

    def _unknown(self, code: int) -> NoReturn:
        if self._hyper and code in HYPER_DEPRECATED:
            self._refuse(f"get abandoned command {code}")
        if code == Code.VERSION:
            self._refuse('No callback found for command "version": cc-agent has no GETVERSION')
        self._refuse(f"unknown command code {code}")

    def _decode(self, cls: type[M], payload: bytes) -> M:
        try:
            return decode_message(cls, payload, self.dialect)
        except ProtocolError as exc:
            self._refuse(str(exc))

    def _container(self, cid: str) -> ContainerRecord:
        c = self.registry.containers.get(cid)
        if c is None:
            self._refuse(f"container {cid!r} not found")
        return c

    async def _ack(self, payload: bytes) -> bytes:
        return b""

    @staticmethod
    def _signal_quietly(rec: ProcessRecord, signum: int) -> None:
        if rec.proc is not None and rec.running:
            try:
                rec.proc.signal(signum)
            except OSError:
                pass
