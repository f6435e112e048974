"""``hyperd-proxy``: command line, listening socket, logging, readiness, signals.

    hyperd-proxy (--socket PATH | --uri unix://PATH) [--agent-dialect auto|cc|hyper]
                 [--socket-mode MODE] [--socket-group GID]
                 [--log-level LEVEL] [--ready-fd FD] [--ready-timeout S] [--shim-timeout S]
                 [--process-timeout S] [--agent-timeout S]

The reference's Go-style spellings are accepted too (``-uri``, ``-socket-path``, ``-log``), so a
runtime that starts ``cc-proxy -uri unix://… -log debug`` can start this instead.
With systemd socket activation (``LISTEN_PID`` = our pid, ``LISTEN_FDS`` = 1) fd 3 is the
listener; more than one fd is an error (``too many activated sockets``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Sequence
from typing import Final

import anyio

from hyperd.proxy.server import (
    DEFAULT_AGENT_TIMEOUT,
    DEFAULT_MAX_UNDELIVERED_EXITS,
    DEFAULT_WAIT,
    Proxy,
    ProxyConfig,
)
from protocol.hyperstart import DIALECTS

log = logging.getLogger("hyperd.proxy")

DEFAULT_SOCKET: Final = "/var/run/clear-containers/proxy.sock"  # the reference's system path
SOCKET_DIR_MODE: Final = 0o750
SOCKET_MODE: Final = 0o660
SD_LISTEN_FDS_START: Final = 3
MAX_UNIX_PATH: Final = 107  # sun_path holds 108 bytes including the NUL
URI_SCHEME: Final = "unix://"
LOG_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
    "panic": logging.CRITICAL,
}
DESCRIPTION: Final = (
    "A proxy compatible on the wire with cc-proxy 3.0.23: runtime and shim clients on a unix"
    " socket, hyperstart agents (CC or hyperhq dialect) behind it."
)
LOG_LEVEL_ENV: Final = "CC_PROXY_LOG_LEVEL"  # overrides --log-level, as with the reference


class SetupError(Exception):
    """The proxy cannot start; the message is printed and the exit status is 1."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hyperd-proxy", description=DESCRIPTION)
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--socket",
        "-socket-path",
        dest="socket",
        metavar="PATH",
        help="system mode: listen on this unix socket path",
    )
    where.add_argument(
        "--uri",
        "-uri",
        dest="uri",
        metavar="unix://PATH",
        help="pod mode: listen here, exit after UnregisterVM once the VM is gone",
    )
    p.add_argument(
        "--agent-dialect",
        choices=("auto", "cc", "hyper"),
        default="auto",
        help="agent protocol dialect (auto: GETVERSION after READY)",
    )
    p.add_argument(
        "--log-level",
        "-log",
        dest="log_level",
        default="warn",
        choices=sorted(LOG_LEVELS),
        help="log level (default warn)",
    )
    p.add_argument(
        "--socket-mode",
        type=_octal_mode,
        default=SOCKET_MODE,
        metavar="MODE",
        help="permission bits of the socket, octal (default 0660)",
    )
    p.add_argument(
        "--socket-group",
        type=int,
        metavar="GID",
        help="group of the socket (default: the proxy's own group)",
    )
    p.add_argument(
        "--ready-fd",
        type=int,
        metavar="FD",
        help="write 'ready\\n' to this fd once listening, then close it",
    )
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=DEFAULT_WAIT,
        metavar="S",
        help="RegisterVM: deadline for connecting and the agent's READY",
    )
    p.add_argument(
        "--shim-timeout",
        type=float,
        default=DEFAULT_WAIT,
        metavar="S",
        help="newcontainer/execcmd: how long to wait for the token's shim",
    )
    p.add_argument(
        "--process-timeout",
        type=float,
        default=DEFAULT_WAIT,
        metavar="S",
        help="stdin/Signal: how long to wait for the process to start",
    )
    p.add_argument(
        "--agent-timeout",
        type=float,
        default=DEFAULT_AGENT_TIMEOUT,
        metavar="S",
        help="deadline for an agent reply (0: wait forever, as the reference)",
    )
    p.add_argument(
        "--no-exit-notifications",
        dest="exit_notifications",
        action="store_false",
        help="turn off hyperd's exit-notification extension (behave as the reference cc-proxy)",
    )
    p.add_argument(
        "--max-undelivered-exits",
        type=int,
        default=DEFAULT_MAX_UNDELIVERED_EXITS,
        metavar="N",
        help="exits kept per VM while no runtime connection listens (oldest dropped beyond)",
    )
    return p


def config_from_args(
    args: argparse.Namespace, path: str, pod_mode: bool, owned_path: str | None
) -> ProxyConfig:
    """The :class:`ProxyConfig` for parsed ``args`` listening on ``path``."""
    dialect = None if args.agent_dialect == "auto" else DIALECTS[args.agent_dialect]
    return ProxyConfig(
        url=URI_SCHEME + path,
        pod_mode=pod_mode,
        dialect=dialect,
        ready_timeout=args.ready_timeout,
        shim_timeout=args.shim_timeout,
        process_timeout=args.process_timeout,
        agent_timeout=args.agent_timeout or None,
        socket_path=owned_path,
        exit_notifications=args.exit_notifications,
        max_undelivered_exits=max(args.max_undelivered_exits, 0),
    )


def activated_socket() -> socket.socket | None:
    """The systemd-activated listener (fd 3), or None when not socket-activated."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return None
    if count < 1:
        return None
    if count > 1:
        raise SetupError("too many activated sockets")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    return socket.socket(fileno=SD_LISTEN_FDS_START)


def _octal_mode(text: str) -> int:
    mode = int(text, 8)
    if not 0 <= mode <= 0o777:
        raise ValueError(text)
    return mode


def listen(path: str, mode: int = SOCKET_MODE, gid: int | None = None) -> socket.socket:
    """Create the directory (0750), remove a stale socket, listen; the socket gets ``mode``
    (default 0660) and, when given, the group ``gid`` before anyone can connect."""
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise SetupError(f"socket path too long: {path}")
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, mode=SOCKET_DIR_MODE, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, mode)
        if gid is not None:
            os.chown(path, -1, gid)
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise SetupError(f"cannot listen on {path}: {exc}") from None
    return sock


def _signal_ready(fd: int | None) -> None:
    if fd is None:
        return
    try:
        os.write(fd, b"ready\n")
    finally:
        os.close(fd)


async def _watch_signals(proxy: Proxy) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for _ in signals:
            proxy.stop()
            return


async def run(proxy: Proxy, listener: socket.socket, ready_fd: int | None) -> None:
    """Serve until SIGTERM/SIGINT or pod-mode exit."""
    async with anyio.create_task_group() as tg:
        tg.start_soon(_watch_signals, proxy)
        await proxy.serve(listener, lambda: _signal_ready(ready_fd))
        tg.cancel_scope.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hyperd-proxy``; returns the exit status."""
    args = _parser().parse_args(argv)
    level_name = os.environ.get(LOG_LEVEL_ENV, args.log_level)
    logging.basicConfig(
        level=LOG_LEVELS.get(level_name, logging.WARNING),
        format="%(asctime)s hyperd-proxy[%(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        listener = activated_socket()
        pod_mode = args.uri is not None
        if listener is not None:
            path = listener.getsockname()
            if not isinstance(path, str):
                path = os.fsdecode(path)
            owned_path = None
        else:
            if args.uri is not None:
                if not args.uri.startswith(URI_SCHEME):
                    raise SetupError(f"unsupported URI {args.uri!r}: only unix:// is supported")
                path = args.uri[len(URI_SCHEME) :]
            else:
                path = args.socket or DEFAULT_SOCKET
            listener = listen(path, args.socket_mode, args.socket_group)
            owned_path = path
    except SetupError as exc:
        print(f"hyperd-proxy: {exc}", file=sys.stderr)
        return 1
    proxy = Proxy(config_from_args(args, path, pod_mode, owned_path))
    try:
        anyio.run(
            run,
            proxy,
            listener,
            args.ready_fd,
            backend="asyncio",
            backend_options={"use_uvloop": True},
        )
    except KeyboardInterrupt:
        pass
    finally:
        if owned_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(owned_path)
    return 0


__all__ = ["DEFAULT_SOCKET", "SetupError", "activated_socket", "config_from_args", "listen", "main"]
