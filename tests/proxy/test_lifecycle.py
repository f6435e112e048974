"""Process lifecycle: system mode (socket directory and modes, stale socket), pod mode (exit
after UnregisterVM once the VM is gone), systemd socket activation, SIGTERM, options."""

from __future__ import annotations

import os
import select
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from hyperd.proxy.cli import _parser, config_from_args
from protocol.ccproxy import Command
from tests.proxy.harness import RawClient, agent_running, hyper, register, spawn_proxy

pytestmark = pytest.mark.anyio

CC = ("--agent-dialect", "cc")


def test_default_waits_are_the_reference_30_s() -> None:
    """The three waits default to the reference's 30 s; READY gets the same deadline (the
    reference has none) and agent replies 60 s (the reference has none)."""
    args = _parser().parse_args(["--socket", "/tmp/x.sock"])
    config = config_from_args(args, "/tmp/x.sock", False, None)
    assert (config.ready_timeout, config.shim_timeout, config.process_timeout) == (30, 30, 30)
    assert config.agent_timeout == 60
    assert config.dialect is None  # auto
    args = _parser().parse_args(
        ["-uri", "unix:///tmp/y.sock", "-log", "debug", "--agent-timeout", "0"]
    )
    assert (args.uri, args.log_level) == ("unix:///tmp/y.sock", "debug")
    assert config_from_args(args, "/tmp/y.sock", True, None).agent_timeout is None


async def test_system_mode_socket(anyio_backend: object, short_tmp: Path) -> None:
    """mkdir -p of the directory (0750), a stale socket removed, the socket chmod'ed 0660;
    the URL handed out is unix:// + the path; SIGTERM exits 0 and removes the socket."""
    directory = short_tmp / "run" / "cc"
    directory.mkdir(parents=True)
    path = directory / "proxy.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    proxy = spawn_proxy(path, *CC)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        client = await RawClient.connect(str(path))
        async with agent_running(short_tmp) as agent:
            tokens = await register(client, "p", agent)
            assert tokens == []
            _, body = await client.call(Command.ATTACH_VM, {"containerId": "p"})
            assert body == {"io": {"URL": f"unix://{path}", "tokens": None}}
        await client.aclose()
    finally:
        assert proxy.stop() == 0
        assert proxy.proc.stderr is not None
        proxy.proc.stderr.close()
    assert not path.exists()


async def test_system_mode_creates_the_directory(anyio_backend: object, short_tmp: Path) -> None:
    path = short_tmp / "a" / "b" / "proxy.sock"
    proxy = spawn_proxy(path, *CC)
    try:
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o750
        assert stat.S_ISSOCK(os.stat(path).st_mode)
    finally:
        proxy.stop()
        assert proxy.proc.stderr is not None
        proxy.proc.stderr.close()


async def test_pod_mode_exits_after_unregister(anyio_backend: object, short_tmp: Path) -> None:
    """Pod mode: UnregisterVM closes the listener; the process exits (status 0) once the VM's
    channels close, not before. The spec leaves the shutdown order with clients still
    connected unknown; as the reference, the process simply exits and they see EOF."""
    path = short_tmp / "pod.sock"
    proxy = spawn_proxy(path, *CC, pod=True)
    try:
        client = await RawClient.connect(str(path))
        bystander = await RawClient.connect(str(path))
        async with agent_running(short_tmp) as agent:
            await register(client, "sb", agent)
            assert await client.call(Command.HYPER, hyper("destroypod")) == (True, b"")
            assert await client.call(Command.UNREGISTER_VM, {"containerId": "sb"}) == (True, b"")
            await anyio.sleep(0.2)
            assert not path.exists()
            with pytest.raises(OSError):
                await RawClient.connect(str(path))
            assert proxy.proc.poll() is None  # the VM is still there
            await agent.die()
            assert await anyio.to_thread.run_sync(proxy.proc.wait, 5) == 0
            await bystander.expect_eof()
        await client.aclose()
        await bystander.aclose()
    finally:
        proxy.stop()
        assert proxy.proc.stderr is not None
        proxy.proc.stderr.close()


async def test_pod_mode_vm_gone_first(anyio_backend: object, short_tmp: Path) -> None:
    """VM loss alone does not end a pod-mode proxy; UnregisterVM afterwards does, at once."""
    path = short_tmp / "pod.sock"
    proxy = spawn_proxy(path, *CC, pod=True)
    try:
        client = await RawClient.connect(str(path))
        async with agent_running(short_tmp) as agent:
            await register(client, "sb", agent)
            await agent.die()
            await anyio.sleep(0.3)
            assert proxy.proc.poll() is None
            assert await client.call(Command.UNREGISTER_VM, {"containerId": "sb"}) == (True, b"")
            assert await anyio.to_thread.run_sync(proxy.proc.wait, 5) == 0
        await client.aclose()
    finally:
        proxy.stop()
        assert proxy.proc.stderr is not None
        proxy.proc.stderr.close()


_EXEC_ACTIVATED = """
import os, sys
listener, ready, count = (int(a) for a in sys.argv[1:4])
os.dup2(listener, 3)
os.dup2(ready, 4)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(count))
os.execv(sys.executable, [sys.executable, "-m", "hyperd.proxy", *sys.argv[4:]])
"""


def _activated(listener: socket.socket, listen_fds: str) -> subprocess.Popen[bytes]:
    """Start the proxy as systemd would: the listener as fd 3, LISTEN_PID = its pid."""
    read_fd, write_fd = os.pipe()
    argv = [
        sys.executable, "-c", _EXEC_ACTIVATED, str(listener.fileno()), str(write_fd),
        listen_fds, "--agent-dialect", "cc", "--ready-fd", "4",
    ]  # fmt: skip
    try:
        proc = subprocess.Popen(
            argv, pass_fds=(listener.fileno(), write_fd), stderr=subprocess.PIPE
        )
    finally:
        os.close(write_fd)
    ready, _, _ = select.select([read_fd], [], [], 10)
    proc.ready_line = os.read(read_fd, 64) if ready else b""  # type: ignore[attr-defined]
    os.close(read_fd)
    return proc


async def test_socket_activation(anyio_backend: object, short_tmp: Path) -> None:
    """LISTEN_PID/LISTEN_FDS=1: fd 3 is the listener; the URL is its path."""
    path = str(short_tmp / "act.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()
    proc = _activated(listener, "1")
    listener.close()
    try:
        assert proc.ready_line == b"ready\n"  # type: ignore[attr-defined]
        client = await RawClient.connect(path)
        async with agent_running(short_tmp) as agent:
            await register(client, "p", agent)
            _, body = await client.call(Command.ATTACH_VM, {"containerId": "p"})
            assert body["io"]["URL"] == f"unix://{path}"
        await client.aclose()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert proc.stderr is not None
        proc.stderr.close()
    assert _exists(path)  # an activated socket belongs to systemd


def _exists(path: str) -> bool:
    return os.path.exists(path)


def test_too_many_activated_sockets(short_tmp: Path) -> None:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(short_tmp / "act.sock"))
    listener.listen()
    proc = _activated(listener, "2")
    listener.close()
    assert proc.wait(10) == 1
    assert proc.stderr is not None
    assert b"too many activated sockets" in proc.stderr.read()
    proc.stderr.close()


@pytest.mark.parametrize("level", ["debug", "warn"])
async def test_console_logged_at_debug(anyio_backend: object, short_tmp: Path, level: str) -> None:
    """As the reference: the VM console is dialled and logged only at debug level."""
    from tests.proxy.harness import PipeListener

    console = await PipeListener.create(str(short_tmp / "console.sock"))
    proxy = spawn_proxy(short_tmp / "p.sock", *CC, "--log-level", level)
    try:
        client = await RawClient.connect(proxy.socket)
        async with agent_running(short_tmp) as agent:
            payload = {
                "containerId": "p",
                "ctlSerial": agent.ctl_path,
                "ioSerial": agent.tty_path,
                "console": str(short_tmp / "console.sock"),
            }
            assert (await client.call(Command.REGISTER_VM, payload))[0]
            if level == "debug":
                with anyio.fail_after(5):
                    pipe = await console.accept()
                await pipe.send(b"hello console\n")
                await anyio.sleep(0.2)
                await pipe.aclose()
            else:
                await anyio.sleep(0.2)
                assert console.accepted.empty()
        await client.aclose()
    finally:
        proxy.stop()
        await console.aclose()
    assert proxy.proc.stderr is not None
    logged = proxy.proc.stderr.read()
    proxy.proc.stderr.close()
    assert (b"VM p console: hello console" in logged) == (level == "debug")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--uri", "tcp://127.0.0.1:5000"], b"only unix:// is supported"),
        (["--socket", "/tmp/" + "x" * 120], b"socket path too long"),
    ],
)
def test_bad_listen_address(args: list[str], message: bytes) -> None:
    """The proxy only listens on unix sockets (as the reference); it exits 1 with a reason."""
    proc = subprocess.run(
        [sys.executable, "-m", "hyperd.proxy", *args], capture_output=True, timeout=20
    )
    assert proc.returncode == 1
    assert message in proc.stderr
