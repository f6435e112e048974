"""Every process exit reaches hyperd: real hyperd, hyperd-proxy (pod and system mode) and
hyperd-sim (both dialects). ``container.wait``/``exec.wait`` give the status, one event per
exit, ``inspect`` stays right across a restart, an exit while hyperd is down arrives after the
restart, a proxy without exit notifications falls back to the shim's pid, and 100 concurrent
waits on 100 containers each return once with their own status."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from hyperd.cli.client import RPCClient, RPCError, ShimClient
from tests.e2e.conftest import (
    Hyperd,
    create_and_start,
    mounts_under,
    rpc,
    spawn,
    start_pod,
)
from tests.procs import spawn_ready

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.root]

DEADLINE = 60.0  # a whole scenario on a busy 2-core machine (several processes start)
READY_DEADLINE = 20.0
SIGKILL_STATUS = {"cc": 128 + 9, "hyper": 0}  # hyperhq reports 0 for a death by signal


@contextlib.contextmanager
def system_proxy(directory: Path, *extra: str) -> Iterator[str]:
    """A system-mode hyperd-proxy started by the test; yields its URL."""
    sock = directory / "sysproxy.sock"
    argv = [sys.executable, "-m", "hyperd.proxy", "--socket", str(sock), *extra]
    proc = spawn_ready(argv, deadline=READY_DEADLINE)
    try:
        yield f"unix://{sock}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(READY_DEADLINE)


class Events:
    """The events of one ``events.subscribe`` connection, read as they are needed."""

    def __init__(self, client: RPCClient, path: str) -> None:
        self.client = client
        self.path = path
        self.seen: list[dict[str, Any]] = []

    async def until(self, predicate: Any) -> None:
        with anyio.fail_after(DEADLINE):
            while not any(predicate(e) for e in self.seen):
                self.seen.append((await self.client.next_notification())["params"])

    async def drain(self) -> list[dict[str, Any]]:
        """Everything published so far: a marker event is published last and awaited."""
        marker = "marker-" + os.urandom(3).hex()
        async with rpc(self.path) as other:
            await other.call("pod.create", {"id": marker})
            await self.until(lambda e: e.get("pod") == marker)
            await other.call("pod.delete", {"id": marker})
        return self.seen


@contextlib.asynccontextmanager
async def subscribed(path: str) -> AsyncIterator[Events]:
    async with rpc(path) as client:
        await client.call("events.subscribe", {})
        yield Events(client, path)


def exits_of(seen: list[dict[str, Any]], pod: str) -> list[tuple[Any, Any, Any]]:
    return [
        (e["kind"], e.get("exec_id") or e.get("container"), e.get("status"))
        for e in seen
        if e.get("pod") == pod and e["state"] == "exited"
    ]


async def start_exec(c: RPCClient, pod: str, cid: str, args: list[str]) -> tuple[str, ShimClient]:
    created = await c.call("exec.create", {"pod": pod, "container": cid, "process": {"args": args}})
    shim = await ShimClient.connect(created["proxy_url"], created["token"])
    await shim.wait_connected()
    await c.call("exec.start", {"pod": pod, "exec_id": created["exec_id"]})
    return created["exec_id"], shim


def proxy_spec(stack: contextlib.ExitStack, mode: str, directory: Path) -> dict[str, str]:
    if mode == "pod":
        return {"mode": "pod"}
    return {"mode": "system", "url": stack.enter_context(system_proxy(directory))}


@pytest.mark.parametrize("dialect", ["cc", "hyper"])
@pytest.mark.parametrize("proxy_mode", ["pod", "system"])
async def test_wait_events_inspect_and_restart(
    hyperd_factory: Hyperd, busybox_rootfs: Path, dialect: str, proxy_mode: str
) -> None:
    hyperd_factory.start(stop_pods_on_exit=False)
    sock = hyperd_factory.socket
    with contextlib.ExitStack() as stack:
        proxy = proxy_spec(stack, proxy_mode, hyperd_factory.base.parent)
        with anyio.fail_after(DEADLINE):
            async with subscribed(sock) as ev, rpc(sock) as c:
                vm = {"backend": "sim", "dialect": dialect}
                pod = await start_pod(c, "p", vm=vm, proxy=proxy)
                assert pod["exit_notifications"] is True
                # a container that exits by itself with 3
                c1 = await create_and_start(c, "p", "c1", busybox_rootfs, ["sh", "-c", "exit 3"])
                waited = await c.call("container.wait", {"pod": "p", "id": "c1"})
                assert waited["exit_status"] == 3 and waited["exited_at"] > 0
                assert await c1.wait() == 3  # the shim got the same status
                # an exec that exits 0, in a container that runs until killed
                c2 = await create_and_start(c, "p", "c2", busybox_rootfs, ["sleep", "1000"])
                eid, exec_shim = await start_exec(c, "p", "c2", ["true"])
                assert (await c.call("exec.wait", {"pod": "p", "exec_id": eid}))["exit_status"] == 0
                await exec_shim.aclose()
                # a deadline: a timeout error, and the process keeps running
                with pytest.raises(RPCError) as err:
                    await c.call("container.wait", {"pod": "p", "id": "c2", "timeout": 1.0})
                assert err.value.kind == "timeout"
                running = await c.call("container.inspect", {"pod": "p", "id": "c2"})
                assert running["state"] == "running" and running["exit_watch"] == "proxy"
                # killed by a signal
                await c.call("container.kill", {"pod": "p", "id": "c2", "signal": "KILL"})
                waited = await c.call("container.wait", {"pod": "p", "id": "c2"})
                assert waited["exit_status"] == SIGKILL_STATUS[dialect]
                await c2.wait()
                seen = await ev.drain()
                assert sorted(exits_of(seen, "p"), key=str) == sorted(
                    [
                        ("container", "c1", 3),
                        ("exec", eid, 0),
                        ("container", "c2", SIGKILL_STATUS[dialect]),
                    ],
                    key=str,
                )
        before = await inspect_all(sock)
        assert before["c1"]["state"] == "exited" and before["c1"]["exit_status"] == 3
        assert before["c2"]["state"] == "exited"
        assert before[eid]["state"] == "exited" and before[eid]["exit_status"] == 0

        hyperd_factory.stop()  # SIGTERM: the pod keeps running
        hyperd_factory.start(stop_pods_on_exit=False)
        with anyio.fail_after(DEADLINE):
            async with subscribed(sock) as ev, rpc(sock) as c:
                assert await inspect_all(sock) == before
                again = await c.call("container.wait", {"pod": "p", "id": "c1"})
                assert (again["exit_status"], again["exited_at"]) == (3, before["c1"]["exited_at"])
                # stopping an exited container still cleans up
                stopped = await c.call("container.stop", {"pod": "p", "id": "c1"})
                assert stopped["state"] == "stopped" and stopped["exit_status"] == 3
                assert not [m for m in mounts_under(str(hyperd_factory.base)) if "/c1/" in m]
                await c.call("pod.stop", {"id": "p"})
                assert exits_of(await ev.drain(), "p") == []  # nothing twice after the restart


async def inspect_all(sock: str) -> dict[str, Any]:
    """container.inspect of every container and exec.inspect of every exec of pod ``p``
    (without the fields that change with the connection: none do today)."""
    out: dict[str, Any] = {}
    async with rpc(sock) as c:
        for row in (await c.call("container.list", {"pod": "p"}))["containers"]:
            out[row["id"]] = await c.call("container.inspect", {"pod": "p", "id": row["id"]})
            for eid in row["execs"]:
                out[eid] = await c.call("exec.inspect", {"pod": "p", "exec_id": eid})
    return out


@pytest.mark.parametrize("dialect", ["cc", "hyper"])
async def test_exit_while_hyperd_is_stopped(
    hyperd_factory: Hyperd, busybox_rootfs: Path, dialect: str
) -> None:
    hyperd_factory.start(stop_pods_on_exit=False)
    sock = hyperd_factory.socket
    with anyio.fail_after(DEADLINE):
        async with rpc(sock) as c:
            await start_pod(c, "p", vm={"backend": "sim", "dialect": dialect})
            started = await create_and_start(
                c, "p", "c1", busybox_rootfs, ["sh", "-c", "read x; exit 5"]
            )
            # a wait pending when hyperd stops ends with shutting_down (the process runs on)
            errors: list[RPCError] = []

            async def waiting() -> None:
                try:
                    await c.call("container.wait", {"pod": "p", "id": "c1"})
                except RPCError as exc:
                    errors.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(waiting)
                async with rpc(sock) as probe:
                    while (await probe.call("hyperd.stats"))["exits"]["waiting"] < 1:  # noqa: ASYNC110
                        await anyio.sleep(0.05)
                await anyio.to_thread.run_sync(hyperd_factory.stop)
            (err,) = errors
            assert err.kind == "shutting_down"
        await started.shim.send_stdin(b"go\n")
        assert await started.wait() == 5  # exited while hyperd was down
        hyperd_factory.start(stop_pods_on_exit=False)
        async with rpc(sock) as c:
            waited = await c.call("container.wait", {"pod": "p", "id": "c1"})
            assert waited["exit_status"] == 5
            seen = await c.call("container.inspect", {"pod": "p", "id": "c1"})
            assert (seen["state"], seen["exit_status"]) == ("exited", 5)
            await c.call("pod.stop", {"id": "p"})


async def test_without_exit_notifications_the_shim_pid_is_watched(
    hyperd_factory: Hyperd, busybox_rootfs: Path
) -> None:
    hyperd_factory.start()
    sock = hyperd_factory.socket
    shim_process = spawn(["sleep", "1000"])
    try:
        with (
            system_proxy(hyperd_factory.base.parent, "--no-exit-notifications") as url,
            anyio.fail_after(DEADLINE),
        ):
            async with subscribed(sock) as ev, rpc(sock) as c:
                pod = await start_pod(c, "p", proxy={"mode": "system", "url": url})
                assert pod["exit_notifications"] is False
                # no shim pid, no notifications: inspect says so and wait does not hang
                spec = {"rootfs": {"path": str(busybox_rootfs)}, "process": {"args": ["true"]}}
                await c.call("container.create", {"pod": "p", "id": "c0", **spec})
                blind = await c.call("container.inspect", {"pod": "p", "id": "c0"})
                assert blind["exit_watch"] == "none"
                with pytest.raises(RPCError) as err:
                    await c.call("container.wait", {"pod": "p", "id": "c0"})
                assert err.value.kind == "invalid_state" and "not observable" in err.value.message
                # with the shim's pid: its end marks the container exited, status unknown
                created = await c.call(
                    "container.create",
                    {
                        "pod": "p",
                        "id": "c1",
                        "shim_pid": shim_process.pid,
                        "rootfs": {"path": str(busybox_rootfs)},
                        "process": {"args": ["sleep", "1000"]},
                    },
                )
                shim = await ShimClient.connect(created["proxy_url"], created["token"])
                await shim.wait_connected()
                await c.call("container.start", {"pod": "p", "id": "c1"})
                watched = await c.call("container.inspect", {"pod": "p", "id": "c1"})
                assert watched["exit_watch"] == "shim_pid"
                async with anyio.create_task_group() as tg:
                    result: list[Any] = []

                    async def wait() -> None:
                        async with rpc(sock) as waiter:
                            result.append(
                                await waiter.call("container.wait", {"pod": "p", "id": "c1"})
                            )

                    tg.start_soon(wait)  # waiting already or not yet: the result is the same
                    shim_process.kill()
                    shim_process.wait()
                (waited,) = result
                assert waited["exit_status"] is None and "shim" in waited["reason"]
                seen = await c.call("container.inspect", {"pod": "p", "id": "c1"})
                assert (seen["state"], seen["exit_status"]) == ("exited", None)
                assert "unknown" in seen["exit_reason"]
                await shim.aclose()
                await c.call("pod.stop", {"id": "p"})
                assert exits_of(await ev.drain(), "p") == [("container", "c1", None)]
    finally:
        shim_process.kill()
        shim_process.wait()


def hyperctl(hyperd: Hyperd, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "hyperd.cli.ctl", "--socket", hyperd.socket, *args],
        capture_output=True,
        timeout=DEADLINE,
        check=False,
    )


async def test_hyperctl_wait_prints_the_status_and_exits_with_it(
    hyperd: Hyperd, busybox_rootfs: Path
) -> None:
    with anyio.fail_after(DEADLINE * 2):
        async with rpc(hyperd.socket) as c:
            await start_pod(c, "p")
            started = await create_and_start(c, "p", "c1", busybox_rootfs, ["sh", "-c", "exit 42"])
            assert await started.wait() == 42
            r = await anyio.to_thread.run_sync(hyperctl, hyperd, "wait", "p", "c1")
            assert (r.returncode, r.stdout) == (42, b"42\n"), r.stderr
            long = await create_and_start(c, "p", "c2", busybox_rootfs, ["sleep", "1000"])
            eid, shim = await start_exec(c, "p", "c2", ["sh", "-c", "exit 6"])
            r = await anyio.to_thread.run_sync(hyperctl, hyperd, "exec", "wait", "p", eid)
            assert (r.returncode, r.stdout) == (6, b"6\n"), r.stderr
            await shim.aclose()
            r = await anyio.to_thread.run_sync(
                hyperctl, hyperd, "wait", "p", "c2", "--timeout", "1"
            )
            assert r.returncode == 1 and b"[timeout]" in r.stderr
            await c.call("container.kill", {"pod": "p", "id": "c2", "signal": "KILL"})
            r = await anyio.to_thread.run_sync(hyperctl, hyperd, "--json", "wait", "p", "c2")
            assert r.returncode == 128 + 9 and json.loads(r.stdout)["exit_status"] == 128 + 9
            await long.wait()
            await c.call("pod.stop", {"id": "p"})


def test_a_shim_pid_must_be_the_callers(hyperd_factory: Hyperd, busybox_rootfs: Path) -> None:
    """A non-root caller naming a root-owned pid as its shim is refused (invalid_params); its
    own process is accepted."""
    nobody = 65534
    config = hyperd_factory.base.parent / "hyperd.toml"
    config.write_text(
        f'base_dir = "{hyperd_factory.base}"\n[rpc]\nmode = "0666"\ngroup = {nobody}\n'
    )
    hyperd_factory.args = ["--config", str(config)]
    hyperd_factory.base.parent.chmod(0o755)  # let the unprivileged client reach the socket
    busybox_rootfs.parent.chmod(0o755)
    hyperd_factory.start()

    async def start() -> None:
        async with rpc(hyperd_factory.socket) as c:
            await start_pod(c, "p")

    anyio.run(start)
    root_owned = spawn(["sleep", "1000"])
    # the client runs as nobody: the system python, stdlib only
    system_python = shutil.which("python3", path="/usr/bin:/bin") or "/usr/bin/python3"
    client = "\n".join(
        [
            "import json, socket, subprocess, sys",
            "own = subprocess.Popen(['sleep', '1000'])",
            "s = socket.socket(socket.AF_UNIX)",
            "s.connect(sys.argv[1])",
            "f = s.makefile('rwb')",
            "def call(i, pid):",
            "    params = {'pod': 'p', 'id': 'c%d' % i, 'shim_pid': pid,",
            "              'rootfs': {'path': sys.argv[3]}, 'process': {'args': ['true']}}",
            "    req = {'jsonrpc': '2.0', 'id': i, 'method': 'container.create', 'params': params}",
            "    f.write(json.dumps(req).encode() + b'\\n'); f.flush()",
            "    return json.loads(f.readline())",
            "print(json.dumps([call(1, int(sys.argv[2])), call(2, own.pid)]))",
            "own.kill()",
        ]
    )
    try:
        r = subprocess.run(
            [system_python, "-c", client, hyperd_factory.socket, str(root_owned.pid),
             str(busybox_rootfs)],
            capture_output=True, timeout=DEADLINE, check=False, user=nobody, group=nobody,
            extra_groups=[], env={"PATH": os.environ.get("PATH", "")},
        )  # fmt: skip
    finally:
        root_owned.kill()
        root_owned.wait()
    refused, accepted = msgspec.json.decode(r.stdout)
    assert refused["error"]["data"]["kind"] == "invalid_params", r
    assert refused["error"]["data"]["field"] == "shim_pid"
    assert "not a process of the caller (uid 65534)" in refused["error"]["message"]
    assert "result" in accepted, accepted
    assert accepted["result"]["state"] == "created"


@pytest.mark.timeout(DEADLINE * 6)
async def test_100_concurrent_waits_on_100_containers(hyperd: Hyperd, busybox_rootfs: Path) -> None:
    count = 100
    with anyio.fail_after(DEADLINE * 6):  # 100 container starts on a busy 2-core machine
        async with subscribed(hyperd.socket) as ev, rpc(hyperd.socket) as c:
            await start_pod(c, "p")
            shims: list[ShimClient] = []
            for i in range(count):
                started = await create_and_start(
                    c, "p", f"c{i}", busybox_rootfs, ["sh", "-c", f"read x; exit {i}"]
                )
                shims.append(started.shim)
            results: dict[int, list[dict[str, Any]]] = {i: [] for i in range(count)}

            async def wait(i: int) -> None:
                async with rpc(hyperd.socket) as own:  # one client each
                    results[i].append(await own.call("container.wait", {"pod": "p", "id": f"c{i}"}))

            async with anyio.create_task_group() as tg:
                for i in range(count):
                    tg.start_soon(wait, i)
                # every wait is registered before any process is let go (hyperd publishes no
                # event for that: its statistics are read until they say so)
                async with rpc(hyperd.socket) as probe:
                    while (await probe.call("hyperd.stats"))["exits"]["waiting"] < count:  # noqa: ASYNC110
                        await anyio.sleep(0.05)
                for shim in shims:
                    await shim.send_stdin(b"go\n")
            assert {i: [r["exit_status"] for r in rs] for i, rs in results.items()} == {
                i: [i] for i in range(count)
            }
            for shim in shims:
                await shim.aclose()
            await c.call("pod.stop", {"id": "p"})
            exited = exits_of(await ev.drain(), "p")
            assert sorted(exited, key=str) == sorted(
                [("container", f"c{i}", i) for i in range(count)], key=str
            )


async def test_a_client_that_goes_away_cancels_its_wait(
    hyperd: Hyperd, busybox_rootfs: Path
) -> None:
    with anyio.fail_after(DEADLINE):
        async with rpc(hyperd.socket) as c:
            await start_pod(c, "p")
            started = await create_and_start(c, "p", "c1", busybox_rootfs, ["sleep", "1000"])

            async def waiting() -> int:
                return int((await c.call("hyperd.stats"))["exits"]["waiting"])

            gone = await RPCClient.connect(hyperd.socket)
            request = {"jsonrpc": "2.0", "id": 1, "method": "container.wait"}
            await gone.send_raw(
                msgspec.json.encode({**request, "params": {"pod": "p", "id": "c1"}}) + b"\n"
            )
            # no event says "a wait was registered" or "ended": the statistics are read
            while await waiting() != 1:  # noqa: ASYNC110 - hyperd has the call
                await anyio.sleep(0.05)
            await gone.aclose()  # the client goes away without reading its answer
            while await waiting() != 0:  # noqa: ASYNC110 - the wait was cancelled
                await anyio.sleep(0.05)
            # other clients' calls were never disturbed, and the container still runs
            seen = await c.call("container.inspect", {"pod": "p", "id": "c1"})
            assert seen["state"] == "running"
            await started.shim.aclose()
            await c.call("pod.stop", {"id": "p"})
