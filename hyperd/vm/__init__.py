"""The daemon's side of a VM: one persistent, pipelined proxy connection per VM.

Public API (the daemon codes against these names):

``VMConfig(command_timeout=30.0, connect_timeout=5.0, ping_interval=5.0, ping_timeout=3.0,
reconnect_backoff_max=2.0, ready_timeout=35.0)``
    Deadlines and liveness settings, in seconds (see :class:`~hyperd.vm.types.VMConfig`).

``VMSession(vm_id, proxy_url, *, ctl=None, tty=None, console=None, register=True,
config=VMConfig(), on_event=None)``
    The pod's VM. ``proxy_url`` is ``unix:///path`` (or a bare path) of the proxy socket.

    - ``await tg.start(session.run)``: connects (retrying for ``connect_timeout`` with capped
      backoff, logging at most once a second), sends RegisterVM (``register=True``; an
      "already registered" answer falls back to AttachVM) or AttachVM + ping (``register=False``,
      e.g. re-adopting a VM after a daemon restart; an "unknown containerID" answer falls back to
      RegisterVM when ctl/tty are known), then reports started. ``tg.start`` raises
      :class:`~hyperd.errors.VMUnavailable` if that fails. ``run`` then keeps the VM reachable
      (liveness, reconnection) and returns after :meth:`close`.
    - ``await session.hyper(name, data=None, *, tokens=None, timeout=None) -> bytes``: an agent
      command; ``data`` is a Struct/JSON-able value or pre-encoded JSON bytes; returns the agent's
      raw reply payload.
    - ``await session.new_tokens(count=1) -> list[str]``: AttachVM(numIOStreams=count).
    - ``session.proxy_url``: the ``io.URL`` the proxy returned (what shims connect to).
    - ``session.reachable``; ``session.statistics() -> VMStatistics``.
    - ``session.mark_unreachable(reason)``: the daemon saw the VM or proxy die.
    - ``await session.unregister()`` (UnregisterVM, then close); ``await session.close()``.

``VMConnection`` (:mod:`hyperd.vm.connection`)
    One socket to a proxy: ``conn = await VMConnection.connect(path, vm_id=...)``, run
    ``conn.run()`` in a task group for the connection's lifetime, then
    ``await conn.command(Command.X, payload, timeout=..., label=None) -> bytes`` from any number
    of tasks; ``conn.close(reason)`` (sync); ``conn.statistics() -> ConnectionStatistics``.
    The session uses it; the daemon normally does not need it.

Errors (:mod:`hyperd.errors`): ``VMUnavailable`` (unreachable, closed, the command was never
written, or the proxy answered that the VM's agent is gone -- "No multicast available for CTL
channel"; the next liveness ping then marks the VM unreachable, leaving the daemon's own process
watch time to report the more precise cause first), ``ConnectionLost`` (subclass of
``VMUnavailable``: the connection dropped after the command was written, outcome unknown),
``Timeout`` (the caller's deadline passed; the late reply is discarded), ``AgentError`` (the agent
answered ERROR) and ``ProxyError`` (any other error response). Errors built from a proxy answer
carry its text as ``exc.data["proxy_message"]``. Messages name the VM, the command and the cause.

Events (``on_event``, called synchronously): ``VMEvent(vm_id, kind, reason)`` with ``kind``
``"unreachable"`` (connection lost, liveness ping failed or timed out, the proxy left a reply
owed ``ping_timeout`` past its caller's deadline, or ``mark_unreachable``), ``"reconnected"``
(a new connection is attached after a loss) then ``"reachable"`` (the VM answered a ping on it).

Semantics: any number of concurrent callers; commands are written in arrival order and
pipelined (frames enqueued in one loop iteration go out in one write); replies are matched to
callers in FIFO order (the proxy answers in order and carries no request id). A caller that times
out or is cancelled keeps its slot, so later replies still reach their own callers. Liveness: a
connection idle for ``ping_interval`` sends a Hyper ``ping`` that must be answered within
``ping_timeout``; while replies are owed, the VM is declared unreachable once the oldest is
``ping_timeout`` past its caller's deadline with nothing received since. Losing reachability
closes the connection; the session reconnects (capped exponential backoff), re-attaches,
pings, and reports ``reconnected`` + ``reachable``.

Process exits: a session made with ``on_exit`` asks the proxy for hyperd's exit notifications
(``exitNotifications`` in RegisterVM/AttachVM, on every (re)connection) and passes each exit
up as a :class:`ProcessExit`; ``VMSession.exit_notifications`` says whether the proxy agreed.
"""

from hyperd.vm.connection import VMConnection
from hyperd.vm.session import VMSession, socket_path
from hyperd.vm.types import ConnectionStatistics, ProcessExit, VMConfig, VMEvent, VMStatistics

__all__ = [
    "ConnectionStatistics",
    "ProcessExit",
    "VMConfig",
    "VMConnection",
    "VMEvent",
    "VMSession",
    "VMStatistics",
    "socket_path",
]
