"""A generic JSON-RPC 2.0 server (and client) on unix sockets.

Methods::

    methods = MethodTable()

    class CreateParams(msgspec.Struct, forbid_unknown_fields=True):
        id: str
        memory_mib: int = 128

    @methods.method("pod.create", CreateParams)
    async def pod_create(params: CreateParams, ctx: CallContext) -> PodInfo:   # JSON-able or Struct
        ...

    methods.register("hyperd.version", version_handler)   # no params_type: handler gets None

Params are by-name (a JSON object; absent means ``{}``), decoded with ``msgspec.convert`` into the
Struct. A missing, unknown (top-level names are always checked) or ill-typed field is answered
``-32602`` with ``data.kind == "invalid_params"`` and a message naming the field (msgspec's
text, e.g. "Expected `int`, got `str` - at `$.memory_mib`"). A handler raising
:class:`hyperd.errors.HyperdError` is answered ``{code: err.code, message: err.message, data:
err.to_error_data()}`` (also when it is the only exception of an ExceptionGroup); any other
exception, or a result msgspec cannot encode, is logged with its traceback and answered
``-32603``. Unknown method: ``-32601`` with ``data.method``.

Serving::

    listener = await create_unix_listener("/run/hyperd/hyperd.sock", mode=0o660, gid=api_gid)
    # or, socket activation: listener = await listener_from_socket(fd)
    server = RPCServer(methods, access=AccessPolicy(group_gid=api_gid))
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, listener)      # started once accepting
        ...
        await server.shutdown()                     # graceful; serve() returns

Per connection (:class:`RPCConnection`, an ``asyncio.Protocol`` on the event loop's own
transport): lines are framed with ``protocol.jsonrpc.LineFramer`` (``max_message``, default
1 MiB; an oversized line is answered with a ``-32600`` error, id null, and dropped without being
buffered). A call whose handler never awaits (an ``async def`` without ``await``/``async
for``/``async with``, see :func:`~hyperd.rpc.methods.never_suspends`) is answered inside the
read callback, with no task of its own. A handler may also be a plain function (``def``): it
returns the result, or a :class:`Pending` one (a future and what turns it into the result, see
:mod:`hyperd.rpc.pending`), which is answered from the future's done callback, again with no
task (the daemon's one-round-trip agent commands, ``container.kill`` and ``container.ps``). Every
other request, notification or batch runs in a task of its own, so a slow call does not hold
up the others. Calls start in the order they were
read and responses come out in completion order; a batch is answered as one array
(notifications in it get no element; a batch of notifications gets nothing), and a batch of
more than ``max_batch`` calls is refused whole; at most ``max_in_flight`` calls (each element of
a batch counts) run (or wait for their response to be written) at once, then reading pauses
(backpressure), as it does while more than ``max_output`` bytes wait for a client that does not
read; writes never interleave, and responses and notifications go out in the
order they were produced (also while a slow reader makes them queue). At EOF the calls running
are still answered before the connection closes. Hot path: one read, one write and one
``epoll_wait`` per call.

Pushing: ``ctx.notify(method, params)`` queues a notification on the caller's connection without
waiting (``True`` if queued). The queue is bounded (``notify_queue``); a client too slow to take
it is disconnected with a log line, ``notify`` returns ``False`` and the ``ctx.on_close``
callbacks run, so keep subscribers as a set of contexts and drop them there::

    async def subscribe(params: None, ctx: CallContext) -> dict[str, bool]:
        subscribers.add(ctx)
        ctx.on_close(lambda: subscribers.discard(ctx))
        return {"subscribed": True}

Access control (:class:`AccessPolicy`): each accepted peer's ``SO_PEERCRED`` (pid, uid, gid)
plus its supplementary groups from ``/proc/<pid>/status`` (``ctx.peer``). Root and the server's
own uid are always allowed; others only if ``group_gid`` is set and is their gid or one of their
groups. A refused peer gets one error response (id null, code ``Unauthorized.code``, message
naming its uid and the required group, ``data.kind == "unauthorized"``) and is disconnected; the
refusal is logged.

Shutdown: ``server.shutdown()`` closes the listener, stops reading requests, lets running calls
finish and be answered for up to ``shutdown_grace`` seconds, then cancels them and closes every
connection; ``serve()`` then returns. Cancelling ``serve()`` instead closes everything at once
(prefer ``shutdown()``). ``server.statistics()`` and ``connection.statistics()`` give snapshots.

Implementation note: on asyncio and uvloop, anyio's unix streams turn "cancel a task blocked in
``receive()``/``send()`` just as its socket becomes ready" into an ``InvalidStateError`` in a loop
callback. The server therefore does no socket I/O through anyio streams: connections are
protocols (nothing blocks in a read; closing aborts the transport) and accepting uses the loop's
``sock_accept``, whose cancellation is safe. Handlers that never await run with a placeholder
task as ``asyncio.current_task()`` (anyio needs one even for ``CancelScope`` or
``Lock.acquire_nowait``): they must not rely on their task's identity. The client
(:class:`RPCClient`) still uses anyio streams and never cancels their I/O (``shutdown(2)`` wakes
its reader). ``python -m hyperd.rpc.bench`` measures the hot path.

Client (:class:`RPCClient`)::

    async with RPCClient.connect(path) as client:
        result = await client.call("pod.list")          # RemoteError(code, message, data, kind)
        await client.notify("x")                        # no answer
        note = await client.receive_notification()      # server pushes
"""

from hyperd.rpc.access import AccessPolicy, PeerCredentials, peer_credentials
from hyperd.rpc.client import RemoteError, RPCClient, RPCConnectionClosed
from hyperd.rpc.connection import (
    BATCH_CONCURRENCY,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_NOTIFY_QUEUE,
    ConnectionStatistics,
    RPCConnection,
)
from hyperd.rpc.listeners import DEFAULT_SOCKET_MODE, create_unix_listener, listener_from_socket
from hyperd.rpc.methods import CallContext, Channel, Method, MethodTable
from hyperd.rpc.pending import Pending
from hyperd.rpc.server import DEFAULT_SHUTDOWN_GRACE, RPCServer, ServerStatistics

__all__ = [
    "BATCH_CONCURRENCY",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_NOTIFY_QUEUE",
    "DEFAULT_SHUTDOWN_GRACE",
    "DEFAULT_SOCKET_MODE",
    "AccessPolicy",
    "CallContext",
    "Channel",
    "ConnectionStatistics",
    "Method",
    "MethodTable",
    "PeerCredentials",
    "Pending",
    "RPCClient",
    "RPCConnection",
    "RPCConnectionClosed",
    "RPCServer",
    "RemoteError",
    "ServerStatistics",
    "create_unix_listener",
    "listener_from_socket",
    "peer_credentials",
]
