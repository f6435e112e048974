"""End-to-end fixtures: a real ``hyperd serve`` process (with its per-pod hyperd-proxy and
hyperd-sim processes), a real network namespace, and helpers to drive them as a shim would.

The daemon is started with ``NOTIFY_SOCKET`` pointing at a datagram socket the test owns, so the
fixture waits for ``READY=1`` instead of polling the RPC socket. The daemon under test always runs
on uvloop (as in production); the test side runs on plain asyncio.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hyperd.cli.client import RPCClient, ShimClient
from hyperd.notify import ReadyListener

READY_TIMEOUT = 30.0  # seconds for hyperd to report READY=1
STOP_TIMEOUT = 30.0  # seconds for hyperd to exit after SIGTERM


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, bool]]:
    # the daemon under test runs on uvloop in its own process; the client loop does not matter
    return ("asyncio", {"use_uvloop": False})


@dataclass
class Hyperd:
    """A running ``hyperd serve`` process."""

    base: Path
    record_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=Path)
    args: list[str] = field(default_factory=list)

    @property
    def socket(self) -> str:
        return str(self.base / "hyperd.sock")

    def start(self, *, stop_pods_on_exit: bool = True, env: dict[str, str] | None = None) -> None:
        ready = ReadyListener(self.base.parent)
        full_env = dict(
            os.environ, NOTIFY_SOCKET=ready.path, HYPERD_TEST_SIM_RECORD_DIR=str(self.record_dir)
        )
        full_env.update(env or {})
        argv = [
            sys.executable,
            "-m",
            "hyperd",
            "serve",
            "--base-dir",
            str(self.base),
            "--log-level",
            "debug",
            *self.args,
        ]
        if stop_pods_on_exit:
            argv.append("--stop-pods-on-exit")
        self.log = self.base.parent / "hyperd.log"
        with ready:
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(argv, env=full_env, stdout=log, stderr=log)
            proc = self.proc
            if not ready.wait(READY_TIMEOUT, alive=lambda: proc.poll() is None):
                raise AssertionError(
                    f"hyperd did not report READY=1 (exit status {proc.poll()}):\n"
                    f"{self.log.read_text()}"
                )

    def stop(self) -> int:
        """SIGTERM hyperd and wait; returns its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"hyperd ignored SIGTERM:\n{self.log.read_text()}") from None

    def records(self, pod: str) -> list[dict[str, Any]]:
        import json

        path = self.record_dir / f"{pod}.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def mounts_under_base(self) -> list[str]:
        return mounts_under(str(self.base))


def mounts_under(prefix: str) -> list[str]:
    """Mount points at or below ``prefix`` per /proc/self/mountinfo."""
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point == prefix or point.startswith(prefix.rstrip("/") + "/"):
                points.append(point)
    return points


def process_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def helper_pids(base: Path, *, top_only: bool = False) -> set[int]:
    """The live helper processes (VMs, proxies) started for ``base``: hyperd's programs whose
    command line names it. ``top_only``: not the simulator's own children (a container's init
    in its PID namespace is a forked copy of the simulator)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if str(base).encode() in cmdline and b"hyperd." in cmdline:
                pids.add(int(entry.name))
    return {p for p in pids if process_alive(p) and not (top_only and _ppid(p) in pids)}


def spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv)


def _kill_leftovers(base: Path) -> None:
    """Kill helper processes that still use files under ``base`` (a failed test's leftovers)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if str(base).encode() in cmdline and b"hyperd" in cmdline:
            with contextlib.suppress(OSError):
                os.kill(int(entry.name), signal.SIGKILL)


def _unmount_all(base: Path) -> None:
    for point in sorted(mounts_under(str(base)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)


@pytest.fixture
def hyperd_factory(short_tmp: Path) -> Iterator[Hyperd]:
    """A :class:`Hyperd` under a fresh base dir, not started; stopped and cleaned up after."""
    record = short_tmp / "rec"
    record.mkdir()
    d = Hyperd(base=short_tmp / "b", record_dir=record)
    try:
        yield d
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
        _kill_leftovers(short_tmp)
        _unmount_all(short_tmp)
        if d.log.is_file():  # shown by pytest when the test failed
            print("---- hyperd log ----\n" + d.log.read_text()[-20000:])


@pytest.fixture
def hyperd(hyperd_factory: Hyperd) -> Hyperd:
    """A started ``hyperd serve`` that stops every pod when it exits."""
    hyperd_factory.start()
    return hyperd_factory


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace with ``eth0`` (10.200.<n>.2/24 and fd00:200::2/64) and default
    routes via 10.200.<n>.1 and fd00:200::1; yields its path."""
    if os.geteuid() != 0:
        pytest.fail("end-to-end tests need root (ip netns, mounts)")
    name = f"hd-e2e-{secrets.token_hex(3)}"
    host_if = f"vh{secrets.token_hex(3)}"

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    ip("netns", "add", name)
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", name)
        ip("-n", name, "link", "set", "lo", "up")
        ip("-n", name, "addr", "add", "10.200.7.2/24", "dev", "eth0")
        ip("-n", name, "-6", "addr", "add", "fd00:200::2/64", "dev", "eth0", "nodad")
        ip("-n", name, "link", "set", "eth0", "up", "mtu", "1400")
        ip("-n", name, "route", "add", "default", "via", "10.200.7.1")
        ip("-n", name, "-6", "route", "add", "default", "via", "fd00:200::1", "dev", "eth0")
        yield f"/var/run/netns/{name}"
    finally:
        subprocess.run(["ip", "link", "del", host_if], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


@contextlib.asynccontextmanager
async def rpc(path: str) -> AsyncIterator[RPCClient]:
    client = await RPCClient.connect(path)
    try:
        yield client
    finally:
        await client.aclose()


async def start_pod(client: RPCClient, pod: str, **params: Any) -> dict[str, Any]:
    await client.call("pod.create", {"id": pod, **params})
    result: dict[str, Any] = await client.call("pod.start", {"id": pod})
    return result


@dataclass
class Started:
    """A process started through hyperd with a shim attached."""

    shim: ShimClient
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)

    async def wait(self) -> int | None:
        status = await self.shim.pump(self.stdout.extend, self.stderr.extend)
        await self.shim.disconnect()
        return status


async def create_and_start(
    client: RPCClient, pod: str, cid: str, rootfs: Path, args: list[str]
) -> Started:
    """container.create, claim the token as the shim, container.start."""
    created = await client.call(
        "container.create",
        {"pod": pod, "id": cid, "rootfs": {"path": str(rootfs)}, "process": {"args": args}},
    )
    shim = await ShimClient.connect(created["proxy_url"], created["token"])
    try:
        await shim.wait_connected()
        await client.call("container.start", {"pod": pod, "id": cid})
    except BaseException:
        await shim.aclose()
        raise
    return Started(shim)


async def exec_and_start(client: RPCClient, pod: str, cid: str, args: list[str]) -> Started:
    created = await client.call(
        "exec.create", {"pod": pod, "container": cid, "process": {"args": args}}
    )
    shim = await ShimClient.connect(created["proxy_url"], created["token"])
    await shim.wait_connected()
    await client.call("exec.start", {"pod": pod, "exec_id": created["exec_id"]})
    return Started(shim)
