"""Listening sockets for the RPC server: a fresh unix socket, or one handed over by systemd."""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path
from typing import Final

import anyio
from anyio.abc import SocketListener

DEFAULT_SOCKET_MODE: Final = 0o660  # owner and the API group; nobody else
PARENT_DIR_MODE: Final = 0o755  # /run/hyperd: traversable, the socket's own mode guards it
DEFAULT_BACKLOG: Final = 128  # pending connects; clients are few and local


def _remove_stale_socket(path: Path) -> None:
    """Unlink a socket file nobody listens on; refuse to touch anything else."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(errno.EEXIST, "exists and is not a socket", str(path))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
            return
        except BlockingIOError:
            pass  # a live server whose backlog is full
    raise OSError(errno.EADDRINUSE, "another server is listening on", str(path))


async def create_unix_listener(
    path: str | os.PathLike[str],
    *,
    mode: int = DEFAULT_SOCKET_MODE,
    gid: int | None = None,
    backlog: int = DEFAULT_BACKLOG,
) -> SocketListener:
    """Listen on a unix socket at ``path``.

    Creates the parent directory if missing, removes a stale socket file (one nobody accepts
    on), binds, sets ``mode`` and, if ``gid`` is given, the socket's group. Raises
    ``OSError(EADDRINUSE)`` when a server is already listening there and ``FileExistsError``
    when ``path`` is something other than a socket.
    """
    sock_path = Path(path)
    sock_path.parent.mkdir(mode=PARENT_DIR_MODE, parents=True, exist_ok=True)
    _remove_stale_socket(sock_path)
    listener = await anyio.create_unix_listener(sock_path, mode=mode, backlog=backlog)
    try:
        if gid is not None:
            os.chown(sock_path, -1, gid)
    except BaseException:
        await listener.aclose()
        raise
    return listener


async def listener_from_socket(
    sock: socket.socket | int, *, backlog: int = DEFAULT_BACKLOG
) -> SocketListener:
    """Wrap an already bound unix stream socket (e.g. from systemd socket activation).

    Calls ``listen()`` if the socket is not listening yet. The listener owns the socket.
    Raises ``ValueError`` for a socket that is not a bound AF_UNIX stream socket.
    """
    raw = sock if isinstance(sock, socket.socket) else socket.socket(fileno=sock)
    if raw.family != socket.AF_UNIX or raw.type != socket.SOCK_STREAM:
        raise ValueError("expected an AF_UNIX SOCK_STREAM socket")
    if not raw.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raw.listen(backlog)
    return await SocketListener.from_socket(raw)
