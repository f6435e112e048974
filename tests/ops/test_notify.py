"""sd_notify, watchdog and socket activation against a real datagram socket and inherited fds."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperd import notify


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A fake service manager: the datagram socket NOTIFY_SOCKET names."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()


def test_messages(manager: socket.socket) -> None:
    assert notify.ready("serving 0 pods")
    assert manager.recv(4096) == b"READY=1\nSTATUS=serving 0 pods"
    assert notify.watchdog()
    assert manager.recv(4096) == b"WATCHDOG=1"
    assert notify.status("3 pods")
    assert manager.recv(4096) == b"STATUS=3 pods"
    assert notify.stopping()
    assert manager.recv(4096) == b"STOPPING=1"


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"hyperd-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        assert notify.ready()
        assert sock.recv(100) == b"READY=1"
    finally:
        sock.close()


def test_no_manager(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert notify.ready() is False  # a vanished manager is not an error


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert notify.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert notify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notify.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert notify.watchdog_interval() is None  # meant for another process
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    monkeypatch.setenv("WATCHDOG_USEC", "garbage")
    assert notify.watchdog_interval() is None


@pytest.mark.anyio
async def test_watchdog_task_pings_from_the_loop(anyio_backend: object) -> None:
    import anyio

    pings: list[int] = []
    with anyio.move_on_after(0.25):
        await notify.watchdog_task(0.05, ping=lambda: pings.append(1))
    assert 3 <= len(pings) <= 7


CHILD = textwrap.dedent(
    """
    import os, sys
    os.environ["LISTEN_PID"] = str(os.getpid())  # what systemd sets for the exec'd process
    from hyperd.notify import listen_fds
    socks = listen_fds()
    assert "LISTEN_FDS" not in os.environ and "LISTEN_PID" not in os.environ
    print(len(socks), socks[0].fileno() if socks else -1, flush=True)
    if socks:
        conn, _ = socks[0].accept()
        conn.sendall(b"hello from activated child")
        conn.close()
    """
)


def test_listen_fds_takes_inherited_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "act.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen()
    # place the listener at fd 3 in the child, as systemd would
    env = {**os.environ, "LISTEN_FDS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        env=env,
        stdout=subprocess.PIPE,
        pass_fds=(3,),
        preexec_fn=lambda: os.dup2(listener.fileno(), 3),
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline().split()
        assert line == [b"1", b"3"]
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(5)
        client.connect(path)
        assert client.recv(100) == b"hello from activated child"
        client.close()
        assert child.wait(10) == 0
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
        listener.close()


def test_listen_fds_ignores_other_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", "1")
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert notify.listen_fds() == []
    assert "LISTEN_FDS" not in os.environ


@pytest.mark.anyio
async def test_status_updates_share_one_line(manager: socket.socket) -> None:
    """Changes made close together give one STATUS= line, the last state's; a change that
    leaves the text as it was sends nothing."""
    import anyio

    state = {"pods": 0}
    sent = anyio.Event()
    updates = notify.StatusUpdates(lambda: f"{state['pods']} pods", interval=0.05)
    updates.last = "0 pods"
    for n in range(1, 4):
        state["pods"] = n
        updates.changed()
    manager.setblocking(False)
    # wait for the datagram on the socket itself (readable), not for a fixed time
    await anyio.wait_readable(manager)
    assert manager.recv(4096) == b"STATUS=3 pods"
    assert updates.sent == 1
    state["pods"] = 3  # unchanged text
    updates.changed()
    updates.changed()
    with anyio.move_on_after(0.3):
        await anyio.wait_readable(manager)
        sent.set()
    assert not sent.is_set()  # nothing new to say
    assert updates.sent == 1
    updates.close()


def test_status_updates_without_manager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    updates = notify.StatusUpdates(lambda: pytest.fail("no line is built without a manager"))
    updates.changed()  # no loop needed either: it returns at once
    assert updates.sent == 0


def _notifying(path: str, code: str) -> subprocess.Popen[bytes]:
    """A child process that runs ``code`` with ``NOTIFY_SOCKET=path``."""
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "NOTIFY_SOCKET": path})


def test_ready_listener_sees_ready_and_the_programs_death(tmp_path: Path) -> None:
    with notify.ReadyListener(tmp_path) as ready:
        path = ready.path
        # other lines first, then READY=1 in a datagram of several lines
        proc = _notifying(
            path,
            "from hyperd import notify; notify.status('starting'); "
            "notify.ready('serving'); import time; time.sleep(30)",
        )
        try:
            assert ready.wait(30, alive=lambda: proc.poll() is None)
        finally:
            proc.kill()
            proc.wait()
        # a program that dies without READY=1: noticed without waiting for the timeout
        dead = _notifying(path, "raise SystemExit(3)")
        assert not ready.wait(600, alive=lambda: dead.poll() is None)
        assert dead.returncode == 3
        # nobody sends anything: the timeout
        assert not ready.wait(0.05)
    assert not os.path.exists(path)  # removed when the block ends
