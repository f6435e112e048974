"""The RPC server: accepts clients on a listener, checks their credentials, serves them.

Accepting is one task calling ``loop.sock_accept`` on the listener's socket; each accepted
socket's credentials are checked right away (``SO_PEERCRED`` and a read of
``/proc/<pid>/status``, which never waits for I/O), then the socket becomes the transport of an
:class:`RPCConnection` protocol (``loop.connect_accepted_socket``): from there on a connection
costs no task. Ending accept is a cancellation of ``sock_accept`` (safe: the loop's own socket
calls unregister their reader when cancelled).
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import socket
from dataclasses import dataclass
from typing import Any, Final

import anyio
from anyio.abc import SocketAttribute, SocketListener, TaskStatus

from hyperd.rpc.access import AccessPolicy, PeerCredentials, peer_credentials
from hyperd.rpc.connection import (
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_MAX_OUTPUT,
    DEFAULT_NOTIFY_QUEUE,
    RPCConnection,
)
from hyperd.rpc.methods import MethodTable
from protocol.jsonrpc import MAX_MESSAGE, ErrorObject, Response, encode_message

log = logging.getLogger(__name__)

DEFAULT_SHUTDOWN_GRACE: Final = 10.0  # seconds for in-flight calls to finish on shutdown
ACCEPT_RETRY_DELAY: Final = 0.1  # seconds to wait after EMFILE & co before accepting again

_RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_ABORTED_ERRNOS: Final = frozenset({errno.ECONNABORTED, errno.EPROTO})  # that client is gone


@dataclass(frozen=True, slots=True)
class ServerStatistics:
    """A snapshot of the server."""

    connections: int
    accepted: int
    refused: int
    in_flight: int
    calls_started: int = 0
    reading_paused: int = 0  # connections not read (backpressure: a limit is reached)
    output_buffered: int = 0  # bytes written for clients that have not read them yet
    batches_refused: int = 0


class RPCServer:
    """A JSON-RPC 2.0 server over a unix stream listener.

    ``serve(listener)`` accepts until :meth:`shutdown`. Shutdown closes the listener, stops
    reading requests, lets the calls running finish and be answered for up to
    ``shutdown_grace`` seconds, then closes the connections still busy (cancelling their
    calls); ``serve`` then returns. Cancelling ``serve`` closes every connection at once.
    ``max_message``, ``max_in_flight``, ``max_batch``, ``max_output`` and ``notify_queue``
    bound what one connection can make the server hold (see :mod:`hyperd.rpc.connection`).
    """

    def __init__(
        self,
        methods: MethodTable,
        *,
        access: AccessPolicy | None = None,
        max_message: int = MAX_MESSAGE,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_output: int = DEFAULT_MAX_OUTPUT,
        notify_queue: int = DEFAULT_NOTIFY_QUEUE,
        shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE,
    ) -> None:
        self.methods = methods
        self.access = access if access is not None else AccessPolicy()
        self._max_message = max_message
        self._max_in_flight = max_in_flight
        self._max_batch = max_batch
        self._max_output = max_output
        self._notify_queue = notify_queue
        self._shutdown_grace = shutdown_grace
        self._ids = itertools.count(1)
        self._connections: set[RPCConnection] = set()
        self._accepted = 0
        self._refused = 0
        self._stopping = False
        self._accept_scope: anyio.CancelScope | None = None
        self._host: asyncio.Task[None] | None = None
        self._idle: asyncio.Event | None = None  # set while no connection is open
        self._stopped: anyio.Event | None = None

    def statistics(self) -> ServerStatistics:
        """Connections open, accepted and refused so far, calls running, backpressure."""
        each = [c.statistics() for c in self._connections]
        return ServerStatistics(
            connections=len(self._connections),
            accepted=self._accepted,
            refused=self._refused,
            in_flight=sum(s.in_flight for s in each),
            calls_started=sum(s.calls_started for s in each),
            reading_paused=sum(s.reading_paused for s in each),
            output_buffered=sum(s.output_buffered for s in each),
            batches_refused=sum(s.batches_refused for s in each),
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
        self._idle = asyncio.Event()
        self._idle.set()
        loop = asyncio.get_running_loop()
        host_done = loop.create_future()
        self._host = loop.create_task(_wait(host_done), name="hyperd.rpc synchronous calls")
        try:
            async with listener:
                raw = listener.extra(SocketAttribute.raw_socket)
                raw.setblocking(False)
                task_status.started()
                with anyio.CancelScope() as self._accept_scope:
                    if not self._stopping:
                        await self._accept_loop(loop, raw)
            # the listener is closed: nobody can connect any more
            self._stopping = True
            await self._drain()
        finally:
            # Also on cancellation: close every connection (cancelling its calls), then wait
            # for their transports to be gone and their calls to have ended.
            self._stopping = True
            with anyio.CancelScope(shield=True):
                self._close_all()
                await self._idle.wait()
                host_done.set_result(None)
                await self._host
            self._stopped.set()

    async def shutdown(self) -> None:
        """Stop accepting, drain (bounded by ``shutdown_grace``), and wait for ``serve`` to end."""
        self._stopping = True
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        if self._stopped is not None:
            await self._stopped.wait()

    async def _drain(self) -> None:
        assert self._idle is not None
        for connection in list(self._connections):
            connection.stop_reading()
        with anyio.move_on_after(self._shutdown_grace):
            await self._idle.wait()
            return
        log.warning(
            "shutdown: %d connection(s) still busy after %.1fs: closing them",
            len(self._connections),
            self._shutdown_grace,
        )
        self._close_all()
        await self._idle.wait()

    def _close_all(self) -> None:
        for connection in list(self._connections):
            connection.close()

    async def _accept_loop(self, loop: asyncio.AbstractEventLoop, raw: socket.socket) -> None:
        while not self._stopping:
            try:
                sock, _ = await loop.sock_accept(raw)
            except OSError as err:
                if err.errno in _ABORTED_ERRNOS:
                    continue
                if err.errno not in _RESOURCE_ERRNOS:
                    raise
                log.error("accept failed: %s; retrying in %.1fs", err, ACCEPT_RETRY_DELAY)
                await anyio.sleep(ACCEPT_RETRY_DELAY)
                continue
            self._accepted += 1
            connection = self._admit(sock)
            if connection is not None:
                await self._connect(loop, sock, connection)

    def _admit(self, sock: socket.socket) -> RPCConnection | None:
        """The connection to serve ``sock`` with; ``None`` (and ``sock`` closed) if refused."""
        try:
            peer = peer_credentials(sock)
        except OSError as err:
            log.warning("cannot read peer credentials (%s): closing", err)
            sock.close()
            return None
        if not self.access.allows(peer):
            self._refuse(sock, peer)
            return None
        return RPCConnection(
            self.methods,
            peer,
            connection_id=next(self._ids),
            max_message=self._max_message,
            max_in_flight=self._max_in_flight,
            max_batch=self._max_batch,
            max_output=self._max_output,
            notify_queue=self._notify_queue,
            host_task=self._host,
            on_finished=self._finished,
        )

    async def _connect(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, connection: RPCConnection
    ) -> None:
        """Make ``sock`` the transport of ``connection`` and track it until it has finished."""
        assert self._idle is not None
        self._connections.add(connection)
        self._idle.clear()
        try:
            await loop.connect_accepted_socket(lambda: connection, sock)
        except BaseException:
            if not connection.connected:
                # no transport was made (a made one is closed by the loop, and connection_lost
                # then finishes the connection)
                sock.close()
                self._finished(connection)
            raise
        log.debug("%r: connected", connection)
        if self._stopping:
            connection.stop_reading()

    def _finished(self, connection: RPCConnection) -> None:
        if connection not in self._connections:
            return
        self._connections.discard(connection)
        log.debug("%r: closed", connection)
        if not self._connections and self._idle is not None:
            self._idle.set()

    def _refuse(self, sock: socket.socket, peer: PeerCredentials) -> None:
        self._refused += 1
        error = self.access.refusal(peer)
        log.warning("refused pid %d uid %d gid %d: %s", peer.pid, peer.uid, peer.gid, error)
        response = Response(
            id=None,
            error=ErrorObject(code=error.code, message=error.message, data=error.to_error_data()),
        )
        # a fresh socket's send buffer is empty: this short message never blocks
        try:
            sock.send(encode_message(response))
        except OSError:
            pass
        finally:
            sock.close()


async def _wait(done: asyncio.Future[Any]) -> None:
    """The host task of synchronous calls: it only waits (see hyperd.rpc.connection)."""
    await done
