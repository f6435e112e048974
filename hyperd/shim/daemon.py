"""The shim daemon: serves the Task service on the socket ``start`` bound, until containerd
sends ``Shutdown`` with no task left (or SIGTERM/SIGINT).

Logs go to the bundle's ``log`` FIFO (containerd copies it to its own stderr), written without
blocking: when nobody reads and the pipe is full, lines are dropped rather than stalling the shim.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from typing import Any

import anyio
import anyio.abc

from hyperd.rpc.listeners import listener_from_socket
from hyperd.shim.events import Publisher
from hyperd.shim.hyperd_api import HyperdAPI
from hyperd.shim.service import SERVICE, TaskService
from hyperd.shim.ttrpc import serve_connection

log = logging.getLogger("hyperd.shim")


class FifoHandler(logging.Handler):
    """Writes records to a non-blocking fd; drops them when the pipe is full or gone."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd

    def emit(self, record: logging.LogRecord) -> None:
        try:
            os.write(self.fd, (self.format(record) + "\n").encode(errors="replace"))
        except OSError:
            pass


def _setup_logging(bundle: str, debug: bool) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    try:
        fd = os.open(os.path.join(bundle, "log"), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    handler = FifoHandler(fd)
    handler.setFormatter(
        logging.Formatter("hyperd-shim[%(process)d] %(levelname)s %(name)s: %(message)s")
    )
    root.addHandler(handler)


async def _run(args: Any) -> None:
    listener = await listener_from_socket(socket.socket(fileno=args.socket_fd))
    ttrpc_address = os.environ.get("TTRPC_ADDRESS") or args.address + ".ttrpc"
    publisher = Publisher(ttrpc_address, args.namespace)
    async with anyio.create_task_group() as tg:
        service = TaskService(
            namespace=args.namespace,
            hyperd=HyperdAPI(args.hyperd_socket),
            publisher=publisher,
            tg=tg,
        )
        services = {SERVICE: service.methods()}

        async def handle(stream: anyio.abc.SocketStream) -> None:
            async with stream:
                await serve_connection(stream, services)

        async def signals() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
                async for signum in received:
                    log.info("signal %d: shutting down", signum)
                    service.shutdown.set()
                    return

        tg.start_soon(publisher.run)
        tg.start_soon(listener.serve, handle)
        tg.start_soon(signals)
        log.info("serving %s for namespace %s", args.socket, args.namespace)
        await service.shutdown.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.socket)
        await listener.aclose()
        with anyio.CancelScope(shield=True):
            await service.close()
        tg.cancel_scope.cancel()
    log.info("exited")


def serve(args: Any) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    _setup_logging(args.bundle, args.debug)
    try:
        import uvloop  # noqa: F401

        backend_options = {"use_uvloop": True}
    except ImportError:  # pragma: no cover - uvloop is a dependency
        backend_options = {}
    anyio.run(_run, args, backend_options=backend_options)
    return 0
