"""The RPC server: accepts clients on a listener, checks their credentials, serves them."""

from __future__ import annotations

import errno
import itertools
import logging
from dataclasses import dataclass
from typing import Final

import anyio
import anyio.lowlevel
from anyio.abc import SocketAttribute, SocketListener, SocketStream, TaskStatus

from hyperd.rpc.access import AccessPolicy, PeerCredentials, peer_credentials
from hyperd.rpc.connection import DEFAULT_MAX_IN_FLIGHT, DEFAULT_NOTIFY_QUEUE, RPCConnection
from hyperd.rpc.methods import MethodTable
from protocol.jsonrpc import MAX_MESSAGE, ErrorObject, Response, encode_message

log = logging.getLogger(__name__)

DEFAULT_SHUTDOWN_GRACE: Final = 10.0  # seconds for in-flight calls to finish on shutdown
ACCEPT_RETRY_DELAY: Final = 0.1  # seconds to wait after EMFILE & co before accepting again

_RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass(frozen=True, slots=True)
class ServerStatistics:
    """A snapshot of the server."""

    connections: int
    accepted: int
    refused: int
    in_flight: int


class RPCServer:
    """A JSON-RPC 2.0 server over a unix stream listener.

    ``serve(listener)`` accepts until :meth:`shutdown`. Shutdown closes the listener, stops
    reading requests, lets the calls running finish and be answered for up to
    ``shutdown_grace`` seconds, then closes the connections still busy (cancelling their
    calls); ``serve`` then returns. Cancelling ``serve`` closes every connection at once.
    """

    def __init__(
        self,
        methods: MethodTable,
        *,
        access: AccessPolicy | None = None,
        max_message: int = MAX_MESSAGE,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        notify_queue: int = DEFAULT_NOTIFY_QUEUE,
        shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
    ) -> None:
        self.methods = methods
        self.access = access if access is not None else AccessPolicy()
        self._max_message = max_message
        self._max_in_flight = max_in_flight
        self._notify_queue = notify_queue
        self._shutdown_grace = shutdown_grace
        self._ids = itertools.count(1)
        self._connections: set[RPCConnection] = set()
        self._handling = 0  # accepted streams not yet finished (incl. credential checks)
        self._accepted = 0
        self._refused = 0
        self._stopping = False
        self._listener: SocketListener | None = None
        self._drained: anyio.Event | None = None
        self._stopped: anyio.Event | None = None

    def statistics(self) -> ServerStatistics:
        """Connections open, accepted and refused so far, calls running."""
        return ServerStatistics(
            connections=len(self._connections),
            accepted=self._accepted,
            refused=self._refused,
            in_flight=sum(c.statistics().in_flight for c in self._connections),
        )

    async def serve(
        self,
        listener: SocketListener,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve clients until :meth:`shutdown`; takes ownership of ``listener``.

        Use with ``await tg.start(server.serve, listener)``: started once accepting.
        """
        if self._stopped is not None:
            await listener.aclose()
            raise RuntimeError("an RPCServer serves once")
        self._stopped = anyio.Event()
        self._drained = anyio.Event()
        self._listener = listener
        try:
            async with listener, anyio.create_task_group() as tg:
                try:
                    task_status.started()
                    if not self._stopping:
                        await self._accept_loop(listener, tg)
                    await self._drain()
                finally:
                    # Also on cancellation: shut every socket so no shielded write stays
                    # blocked. First let the reads just cancelled unregister from the event
                    # loop, or their sockets turning ready would complete cancelled futures.
                    with anyio.CancelScope(shield=True):
                        await anyio.lowlevel.checkpoint()
                    self._close_all()
        finally:
            self._stopped.set()

    async def shutdown(self) -> None:
        """Stop accepting, drain (bounded by ``shutdown_grace``), and wait for ``serve`` to end."""
        self._stopping = True
        if self._listener is not None:
            # closing the listener ends accept(); cancelling accept() could lose a connection
            await self._listener.aclose()
        for connection in list(self._connections):
            connection.stop_reading()
        self._check_drained()
        if self._stopped is not None:
            await self._stopped.wait()

    async def _drain(self) -> None:
        assert self._drained is not None
        self._check_drained()
        with anyio.move_on_after(self._shutdown_grace):
            await self._drained.wait()
            return
        log.warning(
            "shutdown: %d connection(s) still busy after %.1fs: closing them",
            len(self._connections),
            self._shutdown_grace,
        )
        self._close_all()
        await self._drained.wait()

    def _close_all(self) -> None:
        for connection in list(self._connections):
            connection.close()

    def _check_drained(self) -> None:
        if self._stopping and self._handling == 0 and self._drained is not None:
            self._drained.set()

    async def _accept_loop(self, listener: SocketListener, tg: anyio.abc.TaskGroup) -> None:
        while True:
            try:
                stream = await listener.accept()
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                if self._stopping:
                    return
                raise
            except OSError as err:
                if err.errno not in _RESOURCE_ERRNOS:
                    raise
                log.error("accept failed: %s; retrying in %.1fs", err, ACCEPT_RETRY_DELAY)
                await anyio.sleep(ACCEPT_RETRY_DELAY)
                continue
            if self._stopping:
                await stream.aclose()
                return
            self._handling += 1
            self._accepted += 1
            tg.start_soon(self._handle_client, stream)

    async def _handle_client(self, stream: SocketStream) -> None:
        try:
            async with stream:
                try:
                    raw = stream.extra(SocketAttribute.raw_socket)
                    peer = await anyio.to_thread.run_sync(peer_credentials, raw)
                except OSError as err:
                    log.warning("cannot read peer credentials (%s): closing", err)
                    return
                if not self.access.allows(peer):
                    await self._refuse(stream, peer)
                    return
                await self._serve_connection(stream, peer)
        finally:
            self._handling -= 1
            self._check_drained()

    async def _serve_connection(self, stream: SocketStream, peer: PeerCredentials) -> None:
        connection = RPCConnection(
            stream,
            self.methods,
            peer,
            connection_id=next(self._ids),
            max_message=self._max_message,
            max_in_flight=self._max_in_flight,
            notify_queue=self._notify_queue,
        )
        self._connections.add(connection)
        log.debug("%r: connected", connection)
        if self._stopping:
            connection.stop_reading()
        try:
            await connection.run()
        except Exception:
            # a bug in one connection must not take the server (and every client) down
            log.exception("%r failed", connection)
        finally:
            self._connections.discard(connection)
            log.debug("%r: closed", connection)

    async def _refuse(self, stream: SocketStream, peer: PeerCredentials) -> None:
        self._refused += 1
        error = self.access.refusal(peer)
        log.warning("refused pid %d uid %d gid %d: %s", peer.pid, peer.uid, peer.gid, error)
        response = Response(
            id=None,
            error=ErrorObject(code=error.code, message=error.message, data=error.to_error_data()),
        )
        # a fresh socket's send buffer is empty: this short message never blocks
        try:
            await stream.send(encode_message(response))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
