"""The service lifecycle: load state, re-adopt pods, serve the RPC socket, shut down cleanly.

:func:`serve` runs in one root task group. Start-up: create the directories, load the persisted
pods and re-attach to the running ones, listen (a socket passed by systemd, or a fresh one),
then ``READY=1``. Shutdown (SIGTERM/SIGINT, or the injectable ``shutdown`` event for tests):
``STOPPING=1``, stop accepting and drain the RPC server, then either leave every pod running
(default: VMs and proxies survive a daemon restart) or stop them (``stop_pods_on_exit``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import anyio
import anyio.abc

from hyperd import notify
from hyperd.config import Config
from hyperd.daemon.api import build_methods
from hyperd.daemon.service import Daemon
from hyperd.rpc.access import AccessPolicy, group_id
from hyperd.rpc.listeners import create_unix_listener, listener_from_socket
from hyperd.rpc.server import RPCServer
from hyperd.store import StateStore

log = logging.getLogger(__name__)

DIR_MODE = 0o755  # base, run and shared dirs: traversable; sockets and state guard themselves
STATE_DIR_MODE = 0o700
LOCK_FILE = "hyperd.lock"  # flock()ed by the daemon that owns the state dir


def make_dirs(config: Config) -> None:
    for path in (config.base_dir, config.run_dir, config.shared_root):
        Path(path).mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    Path(config.state_dir).mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)


async def _wait_for_signal(shutdown: anyio.Event) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s: shutting down", signal.Signals(signum).name)
            shutdown.set()
            return


async def serve(
    config: Config,
    *,
    stop_pods_on_exit: bool | None = None,
    activated: list[socket.socket] | None = None,
    shutdown: anyio.Event | None = None,
    task_status: anyio.abc.TaskStatus[Daemon] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until SIGTERM/SIGINT or ``shutdown`` is set.

    ``activated``: sockets passed by systemd (read with :func:`hyperd.notify.listen_fds` before
    the event loop started); the first one is served instead of ``config.rpc.socket``.
    """
    stop_pods = config.stop_pods_on_exit if stop_pods_on_exit is None else stop_pods_on_exit
    shutdown = shutdown or anyio.Event()
    make_dirs(config)
    # one daemon per state dir: a second one must not reconcile (and tear down) the first's pods
    with _exclusive(config.state_dir):
        await _serve(config, stop_pods, activated, shutdown, task_status)


@contextlib.contextmanager
def _exclusive(state_dir: str) -> Iterator[None]:
    path = os.path.join(state_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OSError(
                errno.EBUSY, f"another hyperd uses the state dir {state_dir} ({path} is locked)"
            ) from None
        yield
    finally:
        os.close(fd)


async def _serve(
    config: Config,
    stop_pods: bool,
    activated: list[socket.socket] | None,
    shutdown: anyio.Event,
    task_status: anyio.abc.TaskStatus[Daemon],
) -> None:
    store = StateStore(config.state_dir)
    gid = group_id(config.rpc.group)
    # listen first: a socket in use fails the start before any pod is touched
    if activated:
        listener = await listener_from_socket(activated[0])
        where = "socket-activated fd"
    else:
        listener = await create_unix_listener(
            config.rpc.socket, mode=config.rpc.file_mode(), gid=gid
        )
        where = config.rpc.socket
    async with anyio.create_task_group() as tg:
        daemon = Daemon(config, store, tg)
        try:
            problems = await daemon.load()
        except BaseException:
            await listener.aclose()
            raise
        for problem in problems:
            log.error("state: %s", problem)
        rpc = config.rpc
        server = RPCServer(
            build_methods(daemon),
            access=AccessPolicy(group_gid=gid),
            max_message=rpc.max_message,
            max_in_flight=rpc.max_in_flight,
            max_batch=rpc.max_batch,
            max_output=rpc.max_output,
            notify_queue=rpc.notify_queue,
        )
        daemon.rpc_statistics = lambda: dataclasses.asdict(server.statistics())
        await tg.start(server.serve, listener)
        tg.start_soon(_wait_for_signal, shutdown)
        tg.start_soon(notify.watchdog_task)
        statuses = notify.StatusUpdates(daemon.status_line)
        daemon.bus.add_listener(lambda _event: statuses.changed())
        log.info("serving on %s (pid %d): %s", where, os.getpid(), daemon.status_line())
        statuses.last = daemon.status_line()
        notify.ready(statuses.last)
        task_status.started(daemon)
        await shutdown.wait()
        statuses.close()
        notify.stopping()
        daemon.end_waits()  # waits would hold the RPC server's drain for its whole grace
        await server.shutdown()
        await daemon.shutdown(stop_pods=stop_pods)
        log.info("stopped (%s)", "pods stopped" if stop_pods else "pods left running")
        tg.cancel_scope.cancel()
