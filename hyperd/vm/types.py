"""Value types of :mod:`hyperd.vm`: configuration, statistics and events."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

EventKind = Literal["reachable", "unreachable", "reconnected"]

REACHABLE: Final = "reachable"
UNREACHABLE: Final = "unreachable"
RECONNECTED: Final = "reconnected"


@dataclass(frozen=True)
class VMConfig:
    """Deadlines and liveness settings of one VM session (all in seconds).

    - ``command_timeout``: default deadline of a command when the caller gives none.
    - ``connect_timeout``: how long the first connection to the proxy is retried (the seed's
      ``waitForProxyTimeoutSecs``); also bounds each reconnect attempt's connect.
    - ``ping_interval``: an idle connection (no reply owed) sends a liveness ping after this long
      without hearing from the proxy.
    - ``ping_timeout``: a ping must be answered within this; when replies are owed, the proxy is
      declared unresponsive once the oldest owed reply is this far past its caller's deadline
      (and nothing arrived meanwhile).
    - ``reconnect_backoff_max``: cap of the exponential backoff between reconnect attempts.
    - ``ready_timeout``: deadline of RegisterVM (the proxy waits for the agent's READY).
    """

    command_timeout: float = 30.0
    connect_timeout: float = 5.0
    ping_interval: float = 5.0
    ping_timeout: float = 3.0
    reconnect_backoff_max: float = 2.0
    ready_timeout: float = 35.0


@dataclass(frozen=True)
class ConnectionStatistics:
    """Counters of one :class:`~hyperd.vm.connection.VMConnection`.

    ``queued``: accepted, not yet handed to the transport (frames wait at most until the end of
    the current loop iteration, where they are written together). ``in_flight``: written, reply
    still owed (including replies owed to callers that gave up). ``sent``: commands written.
    ``failed``: callers that got an error (proxy/agent error, connection lost). ``timed_out``:
    callers whose deadline passed. ``last_rtt``: seconds from enqueue to reply of the last answered
    command (``None`` before the first). ``discarded``: late replies dropped because their
    caller had given up. ``open``: the connection is usable.
    """

    queued: int
    in_flight: int
    sent: int
    failed: int
    timed_out: int
    discarded: int
    last_rtt: float | None
    open: bool


@dataclass(frozen=True)
class VMStatistics:
    """Counters of a :class:`~hyperd.vm.session.VMSession`, summed over all its connections.

    ``reconnects`` counts successful re-establishments after a loss; ``reachable`` is the
    session's current state. Other fields as in :class:`ConnectionStatistics`.
    """

    queued: int
    in_flight: int
    sent: int
    failed: int
    timed_out: int
    reconnects: int
    last_rtt: float | None
    reachable: bool


@dataclass(frozen=True)
class ProcessExit:
    """A process of the VM exited (hyperd's exit-notification extension of the proxy).

    ``token``: the I/O token it was started with; ``container``/``process``: the agent's ids
    (``process`` is empty for the CC dialect); ``status``: 0..255 as the agent reported it;
    ``backlog``: it happened while no runtime connection listened, and was kept by the proxy.
    """

    vm_id: str
    token: str
    container: str
    process: str
    status: int
    backlog: bool = False


@dataclass(frozen=True)
class VMEvent:
    """A change of a VM's reachability, published through ``on_event``.

    ``kind`` is ``"unreachable"`` (connection lost, liveness failed, or marked by the daemon),
    ``"reconnected"`` (a new proxy connection is attached after a loss) or ``"reachable"`` (the
    VM answered again; follows ``"reconnected"``). ``reason`` is human-readable.
    """

    vm_id: str
    kind: EventKind
    reason: str
