"""systemd integration without libsystemd: sd_notify, the watchdog and socket activation.

- :func:`notify` sends ``KEY=VALUE`` lines to ``$NOTIFY_SOCKET`` (a path or an abstract ``@name``)
  as one datagram; a no-op when the variable is unset. :func:`ready`, :func:`stopping`,
  :func:`status` and :func:`watchdog` are the messages hyperd sends.
- :func:`watchdog_interval` is half of ``$WATCHDOG_USEC`` (when ``$WATCHDOG_PID`` is unset or
  ours): pinging twice per period keeps a healthy daemon alive while a stuck event loop, which
  cannot ping, gets restarted.
- :func:`listen_fds` takes the sockets systemd passed (``$LISTEN_FDS`` from fd 3, when
  ``$LISTEN_PID`` is ours) and unsets the variables so children do not inherit them. Call it
  before the event loop starts.
- :class:`ReadyListener` is the manager's side, for starting a program the way systemd does
  (tests, the benchmark, the containerd testbed): a socket to pass as ``$NOTIFY_SOCKET``, and
  a wait for ``READY=1`` that also notices the program's death.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import select
import socket
import time
from collections.abc import Callable
from pathlib import Path

import anyio

SD_LISTEN_FDS_START = 3  # systemd passes activated sockets from this fd on
STATUS_INTERVAL = 0.2
"""Seconds a state change waits before its STATUS= line goes out: the changes of that time
share one line (a container lifecycle makes four events; systemctl status needs none of them
at once)."""


def _address(value: str) -> str:
    # an abstract socket is written "@name" and addressed with a leading NUL
    return "\0" + value[1:] if value.startswith("@") else value


def notify(**fields: str | int) -> bool:
    """Send ``fields`` to the service manager; True when a manager was told."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return False
    message = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(message, _address(target))
        except OSError:
            return False
    return True


def ready(status_text: str | None = None) -> bool:
    """READY=1 (and STATUS= when given): sent once the daemon serves."""
    if status_text is None:
        return notify(ready=1)
    return notify(ready=1, status=status_text)


def stopping() -> bool:
    """STOPPING=1: sent when shutdown begins."""
    return notify(stopping=1)


def status(text: str) -> bool:
    """STATUS=<text>: a one-line summary ``systemctl status`` shows."""
    return notify(status=text)


class StatusUpdates:
    """STATUS= lines that follow the state: :meth:`changed` after a change; the line
    (``line()``) is sent :data:`STATUS_INTERVAL` later, once for every change made meanwhile,
    and only when its text differs from the last one sent. Nothing is done (not even building
    the line) when no service manager listens. Call from the event loop's thread."""

    def __init__(self, line: Callable[[], str], interval: float = STATUS_INTERVAL) -> None:
        self._line = line
        self._interval = interval
        self._enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._pending: asyncio.TimerHandle | None = None
        self.last = ""
        self.sent = 0

    def changed(self) -> None:
        if not self._enabled or self._pending is not None:
            return
        self._pending = asyncio.get_running_loop().call_later(self._interval, self._send)

    def _send(self) -> None:
        self._pending = None
        text = self._line()
        if text != self.last:
            self.last = text
            self.sent += 1
            status(text)

    def close(self) -> None:
        """Drop a pending line (shutdown says STOPPING=1 instead)."""
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None


def watchdog() -> bool:
    """WATCHDOG=1: the keep-alive ping."""
    return notify(watchdog=1)


def watchdog_interval() -> float | None:
    """Seconds between pings (half the configured period), or None when no watchdog is set."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 1_000_000 / 2


async def watchdog_task(
    interval: float | None = None, *, ping: Callable[[], object] = watchdog
) -> None:
    """Ping the watchdog from the event loop forever (returns at once when there is none)."""
    period = interval if interval is not None else watchdog_interval()
    if period is None:
        return
    while True:
        ping()
        await anyio.sleep(period)


def listen_fds(*, unset_environment: bool = True) -> list[socket.socket]:
    """The sockets passed by systemd socket activation (empty when not activated)."""
    pid = os.environ.get("LISTEN_PID")
    count = os.environ.get("LISTEN_FDS")
    if unset_environment:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    if not pid or not count or pid != str(os.getpid()):
        return []
    try:
        n = int(count)
    except ValueError:
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets


READY_POLL = 0.5
"""Seconds between two looks at whether the program waited on is still alive."""


class ReadyListener:
    """A ``$NOTIFY_SOCKET`` for a program started here, as a service manager holds one.

    ``with ReadyListener(directory) as ready:`` binds a datagram socket at a fresh path in
    ``directory`` (:attr:`path`, for the program's environment); leaving the block closes and
    removes it.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.path = str(Path(directory) / f"n-{secrets.token_hex(4)}")  # (sun_path is short)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.bind(self.path)
        except BaseException:
            self._sock.close()
            raise

    def __enter__(self) -> ReadyListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def wait(self, timeout: float, alive: Callable[[], bool] = lambda: True) -> bool:
        """Wait until a datagram has a ``READY=1`` line: True; False once ``alive()`` says the
        program is gone or ``timeout`` seconds have passed without it (blocking: call it from a
        thread or outside an event loop)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            readable, _, _ = select.select([self._sock], [], [], min(left, READY_POLL))
            if readable:
                message = self._sock.recv(4096).decode(errors="replace")
                if "READY=1" in message.splitlines():
                    return True
            elif not alive():
                return False
