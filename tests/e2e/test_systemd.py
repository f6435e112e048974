"""hyperd under systemd's protocols: socket activation, READY/STATUS/WATCHDOG/STOPPING."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import READY_TIMEOUT, STOP_TIMEOUT

pytestmark = [pytest.mark.e2e]

SD_LISTEN_FDS_START = 3
WATCHDOG_USEC = 200_000  # hyperd pings every 0.1 s


def _recv_until(sock: socket.socket, wanted: str) -> list[str]:
    """Datagrams (as KEY=VALUE lines) until one contains the line ``wanted``."""
    seen: list[str] = []
    while True:
        lines = sock.recv(4096).decode().splitlines()
        seen += lines
        if wanted in lines:
            return seen


def test_socket_activation_and_notify(short_tmp: Path) -> None:
    base = short_tmp / "b"
    listen_path = str(short_tmp / "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(listen_path)
    listener.listen()
    notify_path = str(short_tmp / "notify")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.settimeout(READY_TIMEOUT)

    def as_systemd_would() -> None:  # runs in the child between fork and exec
        os.dup2(listener.fileno(), SD_LISTEN_FDS_START)
        os.environ.update(
            LISTEN_PID=str(os.getpid()),
            LISTEN_FDS="1",
            NOTIFY_SOCKET=notify_path,
            WATCHDOG_USEC=str(WATCHDOG_USEC),
        )

    proc = subprocess.Popen(
        [sys.executable, "-m", "hyperd", "serve", "--base-dir", str(base)],
        pass_fds=(SD_LISTEN_FDS_START, listener.fileno()),
        preexec_fn=as_systemd_would,  # the test process runs no other threads here
        stderr=subprocess.DEVNULL,
    )
    try:
        seen = _recv_until(notify, "READY=1")
        assert any(line.startswith("STATUS=0 pods") for line in seen)
        _recv_until(notify, "WATCHDOG=1")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(listen_path)
            client.sendall(b'{"jsonrpc": "2.0", "id": 1, "method": "hyperd.version"}\n')
            reply = client.recv(4096)
        assert b'"api":1' in reply
        assert not (base / "hyperd.sock").exists()  # the activated socket was used instead
        proc.send_signal(signal.SIGTERM)
        _recv_until(notify, "STOPPING=1")
        assert proc.wait(STOP_TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        listener.close()
        notify.close()
