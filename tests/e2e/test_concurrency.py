"""Many concurrent RPC clients against many pods; a VM killed in the middle of commands."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from hyperd.cli.client import RPCClient, RPCError
from tests.e2e.conftest import Hyperd, Started, create_and_start, process_alive, rpc, start_pod

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.root]

PODS = 10
CLIENTS = 100
CALLS_PER_CLIENT = 12
LIVENESS_DEADLINE = 10.0  # the embedded default pings every 5 s with a 3 s deadline


async def _start_pods(hyperd: Hyperd, rootfs: Path, count: int) -> list[Started]:
    """``count`` running pods, each with a running container ``main`` (``sleep``)."""
    started: list[Started] = []

    async def one(i: int) -> None:
        async with rpc(hyperd.socket) as c:
            await start_pod(c, f"pod{i}")
            started.append(await create_and_start(c, f"pod{i}", "main", rootfs, ["sleep", "1000"]))

    async with anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(one, i)
    return started


async def _mixed_client(path: str, n: int, errors: list[str]) -> int:
    """One client sending a random mix of commands; checks each reply answers its own call."""
    rng = random.Random(n)
    answered = 0
    async with rpc(path) as c:
        for k in range(CALLS_PER_CLIENT):
            pod = f"pod{rng.randrange(PODS)}"
            op = rng.choice(["inspect", "list", "ps", "stats", "create", "cinspect", "health"])
            try:
                if op == "inspect":
                    r = await c.call("pod.inspect", {"id": pod})
                    assert r["id"] == pod
                elif op == "list":
                    r = await c.call("container.list", {"pod": pod})
                    assert all(x["pod"] == pod for x in r["containers"])
                elif op == "ps":
                    r = await c.call("container.ps", {"pod": pod, "id": "main"})
                    assert "sleep" in r["output"]
                elif op == "stats":
                    r = await c.call("hyperd.stats")
                    assert pod in r["vms"]
                elif op == "create":
                    cid = f"c{n}-{k}"
                    r = await c.call(
                        "container.create",
                        {
                            "pod": pod,
                            "id": cid,
                            "rootfs": {"path": "/"},
                            "process": {"args": ["true"]},
                        },
                    )
                    assert r["id"] == cid and r["state"] == "created" and r["token"]
                elif op == "cinspect":
                    r = await c.call("container.inspect", {"pod": pod, "id": "main"})
                    assert r["pod"] == pod and r["id"] == "main" and r["state"] == "running"
                else:
                    r = await c.call("hyperd.health")
                    assert r["status"] == "ok"
            except (RPCError, AssertionError) as exc:
                errors.append(f"client {n} {op} {pod}: {exc!r}")
            answered += 1
    return answered


async def test_100_clients_10_pods(hyperd: Hyperd, busybox_rootfs: Path) -> None:
    with anyio.fail_after(90):
        shims = await _start_pods(hyperd, busybox_rootfs, PODS)
        errors: list[str] = []
        answered: list[int] = []

        async def client(n: int) -> None:
            answered.append(await _mixed_client(hyperd.socket, n, errors))

        async with anyio.create_task_group() as tg:
            for n in range(CLIENTS):
                tg.start_soon(client, n)
        assert errors == []
        assert sum(answered) == CLIENTS * CALLS_PER_CLIENT
        async with rpc(hyperd.socket) as c:
            stats = (await c.call("hyperd.stats"))["vms"]
            assert all(v["reachable"] and v["timed_out"] == 0 for v in stats.values())
        for s in shims:
            await s.shim.aclose()


async def test_vm_killed_mid_command(hyperd: Hyperd, busybox_rootfs: Path) -> None:
    shims: list[Started] = []
    try:
        with anyio.fail_after(90):
            shims = await _start_pods(hyperd, busybox_rootfs, 2)
            async with rpc(hyperd.socket) as watcher:
                await _kill_and_check(hyperd, watcher)
    finally:
        for s in shims:
            await s.shim.aclose()


async def _kill_and_check(hyperd: Hyperd, watcher: RPCClient) -> None:
    await watcher.call("events.subscribe")
    async with rpc(hyperd.socket) as c:
        victim = await c.call("pod.inspect", {"id": "pod0"})
    failures: list[tuple[float, RPCError]] = []
    successes_after: list[float] = []
    killed_at: list[float] = []

    async def hammer(client: RPCClient) -> None:
        # keep ps commands in flight on the victim until they fail
        while True:
            try:
                await client.call("container.ps", {"pod": "pod0", "id": "main"})
            except RPCError as exc:
                failures.append((time.monotonic(), exc))
                return
            if killed_at:
                successes_after.append(time.monotonic())

    clients = [await RPCClient.connect(hyperd.socket) for _ in range(20)]
    try:
        async with anyio.create_task_group() as tg:
            for client in clients:
                tg.start_soon(hammer, client)
            await anyio.sleep(0.3)
            killed_at.append(time.monotonic())
            os.kill(victim["vm_pid"], signal.SIGKILL)
    finally:
        for client in clients:
            await client.aclose()

    assert len(failures) == len(clients)
    for when, exc in failures:
        assert exc.kind == "vm_unavailable", exc
        assert "pod0" in exc.message
        assert when - killed_at[0] < LIVENESS_DEADLINE

    # the pod is declared unreachable within the liveness deadline (at once, in practice:
    # hyperd watches the VM process), with an event
    with anyio.fail_after(LIVENESS_DEADLINE):
        while True:
            event = (await watcher.next_notification())["params"]
            if (event["kind"], event["pod"], event["state"]) == ("pod", "pod0", "unreachable"):
                break
    async with rpc(hyperd.socket) as c:
        # the other pod is unaffected
        ps = await c.call("container.ps", {"pod": "pod1", "id": "main"})
        assert "sleep" in ps["output"]
        info = await c.call("pod.inspect", {"id": "pod0"})
        assert info["state"] == "unreachable"
        assert info["reason"]  # the VM process exited, or the proxy lost the VM first
        with pytest.raises(RPCError) as err:
            await c.call("container.ps", {"pod": "pod0", "id": "main"})
        assert err.value.kind == "vm_unavailable"
        health: dict[str, Any] = await c.call("hyperd.health")
        assert health["unreachable"] == ["pod0"]
        # an unreachable pod can still be stopped and deleted cleanly
        await c.call("pod.stop", {"id": "pod0"})
        await c.call("pod.delete", {"id": "pod0"})
        assert [p for p in hyperd.mounts_under_base() if "/pod0" in p] == []


async def test_proxy_killed(hyperd: Hyperd, busybox_rootfs: Path) -> None:
    """The per-pod proxy dies: the pod is declared unreachable, callers get vm_unavailable,
    and pod.stop still cleans everything up (the VM process included)."""
    shims: list[Started] = []
    try:
        with anyio.fail_after(60):
            shims = await _start_pods(hyperd, busybox_rootfs, 1)
            async with rpc(hyperd.socket) as watcher, rpc(hyperd.socket) as c:
                await watcher.call("events.subscribe")
                pod = await c.call("pod.inspect", {"id": "pod0"})
                os.kill(pod["proxy_pid"], signal.SIGKILL)
                while True:
                    event = (await watcher.next_notification())["params"]
                    if (event["kind"], event["state"]) == ("pod", "unreachable"):
                        break
                with pytest.raises(RPCError) as err:
                    await c.call("container.ps", {"pod": "pod0", "id": "main"})
                assert err.value.kind == "vm_unavailable"
                stopped = await c.call("pod.stop", {"id": "pod0"})
                assert stopped["state"] == "stopped"
                assert not process_alive(pod["vm_pid"])
                assert hyperd.mounts_under_base() == []
    finally:
        for s in shims:
            await s.shim.aclose()
