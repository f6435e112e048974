"""The daemon's view of one VM: what the pod and container operations need from ``hyperd.vm``.

:class:`AgentLink` is the narrow interface the daemon codes against; :func:`open_link` opens one
for a pod (RegisterVM, or AttachVM when re-adopting the pod after a restart) and keeps it open for
the life of the ``async with`` block, calling ``on_event`` for what the VM reports on its own
(the VM became unreachable, a process exited). Leaving the block with ``unregister=True`` in
:class:`LinkControl` sends UnregisterVM before the connection is closed.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from hyperd.config import Config
from hyperd.daemon.model import PodRecord
from hyperd.errors import AgentError
from hyperd.rpc.pending import Pending
from hyperd.timings import Timings

HYPER_API_VERSION_MIN = 4243  # hyperhq agents answer GETVERSION with >= this; cc-agent errors


class AgentLink(Protocol):
    """A pod's persistent connection to its VM, through the proxy."""

    @property
    def proxy_url(self) -> str:
        """The URL shims connect to (what the proxy returned at registration)."""
        ...

    async def hyper(
        self, name: str, data: bytes | None = None, *, tokens: Sequence[str] = ()
    ) -> bytes:
        """Send the agent command ``name`` with JSON ``data``; returns the reply payload.

        Raises ``AgentError`` (agent said ERROR), ``ProxyError``, ``VMUnavailable`` (including
        ``ConnectionLost``) or ``Timeout``.
        """
        ...

    def send(self, name: str, data: bytes | None = None) -> Pending[bytes]:
        """The synchronous half of :meth:`hyper` (no tokens): the command is queued now; the
        :class:`Pending` gives the reply payload, or raises what :meth:`hyper` raises. Raises
        ``VMUnavailable`` at once when the command cannot be sent."""
        ...

    async def new_tokens(self, count: int) -> list[str]:
        """``count`` fresh I/O tokens (AttachVM numIOStreams on the same connection)."""
        ...

    def statistics(self) -> dict[str, Any]:
        """Queue and traffic counters of this VM's connection."""
        ...

    def mark_unreachable(self, reason: str) -> None:
        """Fail every queued and future command at once with ``VMUnavailable(reason)``."""
        ...

    @property
    def exit_notifications(self) -> bool:
        """The proxy sends an event for every process exit (hyperd-proxy's extension)."""
        ...


@dataclass(frozen=True)
class LinkEvent:
    """Something the VM reported on its own.

    ``kind``: ``"unreachable"`` (``reason`` says why), ``"reconnected"``, ``"reachable"`` (the
    VM answers again), or ``"process_exited"`` (``token``, ``container``, ``process``,
    ``status``, ``backlog``: a process exit, from the proxy's exit notifications).
    """

    kind: str
    reason: str = ""
    token: str = ""
    container: str = ""
    process: str = ""
    status: int = 0
    backlog: bool = False


@dataclass
class LinkControl:
    """Set ``unregister`` before leaving :func:`open_link`'s block to send UnregisterVM."""

    unregister: bool = False


def parse_version(payload: bytes) -> int | None:
    """The agent API version in a GETVERSION reply (u32 big-endian, or a JSON number)."""
    if len(payload) == 4:
        return int(struct.unpack(">I", payload)[0])
    text = payload.strip()
    if text.isdigit():
        return int(text)
    return None


async def detect_dialect(link: AgentLink) -> str:
    """``"hyper"`` when the agent answers ``version`` with an API version >= 4243, else ``"cc"``."""
    try:
        reply = await link.hyper("version")
    except AgentError:
        return "cc"
    version = parse_version(reply)
    if version is not None and version >= HYPER_API_VERSION_MIN:
        return "hyper"
    return "cc"


@asynccontextmanager
async def open_link(
    pod: PodRecord,
    config: Config,
    *,
    attach: bool,
    on_event: Callable[[LinkEvent], None],
    timings: Timings | None = None,
) -> AsyncIterator[tuple[AgentLink, LinkControl]]:
    """Connect to the pod's proxy and register (or attach to) its VM for the block's duration.
    ``timings``: where each agent command's round trip is recorded (``agent.<name>``)."""
    from hyperd.daemon import vmadapter

    async with vmadapter.open_session(
        pod, config, attach=attach, on_event=on_event, timings=timings
    ) as pair:
        yield pair
