"""``kill -9`` of hyperd at random moments during 200 concurrent container lifecycles.

Each round starts 200 lifecycles at once (create, the shim claims the token, start, kill, the
shim sees the exit, stop, delete) over 4 pods, SIGKILLs the daemon at a random moment, restarts
it and checks what it reports against what the RPCs had reported before the kill:

- every container it lists is one whose ``container.create`` was reported or in flight (nothing
  invented), with the token that create reported;
- its state is the last one an RPC reported for it, or the one the call in flight at the kill
  would have made (no torn state): absent counts as "deleted";
- nothing is left that it does not report: every mount under the base dir is one of a listed
  container's mounts, every helper process is a reported VM or proxy of a running pod, and every
  container process belongs to a container reported running.

A second test kills hyperd during 50 concurrent pod starts (each with a container): every
helper process and mount left must be one that hyperd reports after its restart.

The kill comes after a random number of answered calls. The seed is printed (``-s``) and can be
set with ``HYPERD_TEST_SEED``.
"""

from __future__ import annotations

import os
import random
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from hyperd.cli.client import ConnectionClosed, RPCClient, RPCError, ShimClient
from tests.e2e.conftest import Hyperd, helper_pids, process_alive, rpc

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.root]

PODS = 4
LIFECYCLES = 200  # per round, all at once
ROUNDS = 3
CALLS = 5  # RPCs of one lifecycle: the kill comes after a random number of all the answers
EXIT_WAIT = 30.0  # seconds for a killed container's process to go (busy 2-core machine)
ROUND_DEADLINE = 240.0  # seconds for one round on a busy machine (generous on purpose)
MARK = "HD_TEST_CONTAINER"  # in each container's environment: finds its process
RESULT = {"create": "created", "start": "running", "stop": "stopped", "delete": "deleted"}


class Progress:
    """Counts the calls answered; ``reached`` is set at the random count chosen for the kill
    (a moment defined by progress, not by time: the machine's speed does not matter)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.answered = 0
        self.reached = anyio.Event()

    def tick(self) -> None:
        self.answered += 1
        if self.answered >= self.target:
            self.reached.set()


@dataclass
class Entry:
    """What the RPCs reported for one container, and the call in flight when hyperd died."""

    reported: list[str] = field(default_factory=list)
    in_flight: str | None = None
    token: str | None = None
    killed: bool = False  # a SIGKILL was sent: the process may have ended since

    def allowed(self) -> set[str]:
        states = {self.reported[-1] if self.reported else "deleted"}  # never created: absent
        if self.in_flight in RESULT:
            states.add(RESULT[self.in_flight])
        if self.killed and "running" in states:
            states.add("exited")  # its exit reached hyperd (the proxy's exit notification)
        return states


async def _lifecycle(
    sock: str, pod: str, cid: str, rootfs: Path, entry: Entry, progress: Progress
) -> None:
    """One container's life; ends quietly at the first call the dead daemon cannot answer."""
    ref = {"pod": pod, "id": cid}
    shim: ShimClient | None = None
    try:
        client = await RPCClient.connect(sock)
    except OSError:
        return
    try:

        async def step(op: str, method: str, params: dict[str, Any]) -> object:
            entry.in_flight = op
            entry.killed = entry.killed or op == "kill"
            result = await client.call(method, params)
            progress.tick()
            entry.in_flight = None
            if op in RESULT:
                entry.reported.append(RESULT[op])
            return result

        process = {"args": ["sleep", "1000"], "env": [f"{MARK}={pod}/{cid}"]}
        entry.in_flight = "create"
        created = await client.call(
            "container.create", {**ref, "rootfs": {"path": str(rootfs)}, "process": process}
        )
        progress.tick()
        entry.token = created["token"]
        entry.reported.append("created")
        entry.in_flight = None
        shim = await ShimClient.connect(created["proxy_url"], created["token"])
        await shim.wait_connected()
        await step("start", "container.start", ref)
        await step("kill", "container.kill", {**ref, "signal": "KILL"})
        await shim.pump(lambda _: None, lambda _: None)
        await step("stop", "container.stop", ref)
        await step("delete", "container.delete", ref)
    except (ConnectionClosed, RPCError, OSError, anyio.BrokenResourceError, anyio.EndOfStream):
        pass  # the daemon died (or refused because of it): the ledger says what was in flight
    finally:
        if shim is not None:
            await shim.aclose()
        await client.aclose()


def _environ_marks() -> dict[int, str]:
    """pid -> the container a process belongs to (by the mark in its environment)."""
    found = {}
    key = f"{MARK}=".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for var in env:
            if var.startswith(key):
                found[int(entry.name)] = var[len(key) :].decode()
    return found


async def _wait_gone(pid: int) -> bool:
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return True
    try:
        with anyio.move_on_after(EXIT_WAIT):
            await anyio.wait_readable(fd)
            return True
        return not process_alive(pid)
    finally:
        os.close(fd)


async def _reported(
    hyperd: Hyperd,
) -> tuple[dict[str, dict[str, object]], dict[tuple[str, str], dict[str, object]], set[str]]:
    """Pods, containers (by pod and id) and mounts as the restarted daemon reports them."""
    pods: dict[str, dict[str, object]] = {}
    listed: dict[tuple[str, str], dict[str, object]] = {}
    mounts: set[str] = set()
    async with rpc(hyperd.socket) as c:
        for row in (await c.call("pod.list"))["pods"]:
            info = await c.call("pod.inspect", {"id": row["id"]})
            pods[row["id"]] = info
            for ct in info["containers"]:
                listed[(row["id"], ct["id"])] = ct
                mounts |= set(ct["mounts"])
    return pods, listed, mounts


async def _check_nothing_unknown(
    hyperd: Hyperd,
    pods: dict[str, dict[str, object]],
    listed: dict[tuple[str, str], dict[str, object]],
    reported_mounts: set[str],
) -> None:
    """No mount, helper or container process that the daemon does not report."""
    leftover = set(hyperd.mounts_under_base()) - reported_mounts
    assert not leftover, f"mounts hyperd does not report: {sorted(leftover)}"
    helpers = {info[k] for info in pods.values() for k in ("vm_pid", "proxy_pid")} - {None}
    assert helper_pids(hyperd.base, top_only=True) == helpers
    running = {f"{p}/{cid}" for (p, cid), ct in listed.items() if ct["state"] == "running"}
    for pid, owner in _environ_marks().items():
        if owner not in running:
            # its kill was in flight: it must go on its own; anything else is a leak
            assert await _wait_gone(pid), f"process {pid} of {owner} runs, hyperd says not"


async def _check(hyperd: Hyperd, ledger: dict[tuple[str, str], Entry], pods: list[str]) -> None:
    infos, listed, reported_mounts = await _reported(hyperd)
    assert sorted(infos) == sorted(pods)
    for info in infos.values():
        assert info["state"] == "running", info  # the VMs survived: re-adopted
    for key, ct in listed.items():
        entry = ledger.get(key)
        assert entry is not None, f"{key}: a container no RPC created: {ct}"
        assert ct["state"] in entry.allowed(), (key, ct["state"], entry)
        if entry.token is not None:
            assert ct["token"] == entry.token, key
    for key, entry in ledger.items():
        if key not in listed:
            assert "deleted" in entry.allowed(), (key, "missing", entry)
    await _check_nothing_unknown(hyperd, infos, listed, reported_mounts)


async def test_random_kill9_during_concurrent_lifecycles(
    hyperd_factory: Hyperd, busybox_rootfs: Path
) -> None:
    seed = int(os.environ.get("HYPERD_TEST_SEED", random.randrange(2**32)))
    print(f"HYPERD_TEST_SEED={seed}")
    rng = random.Random(seed)
    pods = [f"p{i}" for i in range(PODS)]
    hyperd_factory.start(stop_pods_on_exit=False)
    async with rpc(hyperd_factory.socket) as c:
        for pod in pods:
            await c.call("pod.create", {"id": pod})
            await c.call("pod.start", {"id": pod})
    ledger: dict[tuple[str, str], Entry] = {}
    kills_mid_flight = 0
    for round_ in range(ROUNDS):
        progress = Progress(rng.randrange(1, LIFECYCLES * CALLS))
        with anyio.fail_after(ROUND_DEADLINE):
            async with anyio.create_task_group() as tg:
                for n in range(LIFECYCLES):
                    key = (pods[n % PODS], f"r{round_}c{n}")
                    ledger[key] = Entry()
                    tg.start_soon(
                        _lifecycle,
                        hyperd_factory.socket,
                        *key,
                        busybox_rootfs,
                        ledger[key],
                        progress,
                    )
                await progress.reached.wait()
                assert hyperd_factory.proc is not None
                hyperd_factory.proc.send_signal(signal.SIGKILL)
                await anyio.to_thread.run_sync(hyperd_factory.proc.wait)
            kills_mid_flight += any(e.in_flight for e in ledger.values())
            hyperd_factory.start(stop_pods_on_exit=False)
            await _check(hyperd_factory, ledger, pods)
        print(f"round {round_}: killed after {progress.answered} answers")
    print(f"{kills_mid_flight} of {ROUNDS} kills came with calls in flight")
    async with rpc(hyperd_factory.socket) as c:
        for pod in pods:
            await c.call("pod.stop", {"id": pod})
            await c.call("pod.delete", {"id": pod})
    assert hyperd_factory.mounts_under_base() == []
    assert helper_pids(hyperd_factory.base, top_only=True) == set()


POD_STARTS = 50
POD_CALLS = 4  # RPCs of one pod's start


async def _pod_life(sock: str, pod: str, rootfs: Path, progress: Progress) -> None:
    try:
        client = await RPCClient.connect(sock)
    except OSError:
        return
    shim: ShimClient | None = None
    try:
        await client.call("pod.create", {"id": pod})
        progress.tick()
        await client.call("pod.start", {"id": pod})
        progress.tick()
        process = {"args": ["sleep", "1000"], "env": [f"{MARK}={pod}/c"]}
        created = await client.call(
            "container.create",
            {"pod": pod, "id": "c", "rootfs": {"path": str(rootfs)}, "process": process},
        )
        progress.tick()
        shim = await ShimClient.connect(created["proxy_url"], created["token"])
        await shim.wait_connected()
        await client.call("container.start", {"pod": pod, "id": "c"})
        progress.tick()
    except (ConnectionClosed, RPCError, OSError, anyio.BrokenResourceError, anyio.EndOfStream):
        pass
    finally:
        if shim is not None:
            await shim.aclose()
        await client.aclose()


async def test_kill9_during_concurrent_pod_starts_leaves_nothing_unknown(
    hyperd_factory: Hyperd, busybox_rootfs: Path
) -> None:
    seed = int(os.environ.get("HYPERD_TEST_SEED", random.randrange(2**32)))
    print(f"HYPERD_TEST_SEED={seed}")
    progress = Progress(random.Random(seed).randrange(1, POD_STARTS * POD_CALLS))
    hyperd_factory.start(stop_pods_on_exit=False)
    with anyio.fail_after(ROUND_DEADLINE):
        async with anyio.create_task_group() as tg:
            for n in range(POD_STARTS):
                tg.start_soon(_pod_life, hyperd_factory.socket, f"s{n}", busybox_rootfs, progress)
            await progress.reached.wait()
            assert hyperd_factory.proc is not None
            hyperd_factory.proc.send_signal(signal.SIGKILL)
            await anyio.to_thread.run_sync(hyperd_factory.proc.wait)
        hyperd_factory.start()
        pods, listed, mounts = await _reported(hyperd_factory)
        states = sorted(str(info["state"]) for info in pods.values())
        print(
            f"killed after {progress.answered} answers; after the restart: {len(pods)} pods, "
            f"{states.count('running')} running"
        )
        for info in pods.values():
            assert info["state"] in ("created", "running"), info
        await _check_nothing_unknown(hyperd_factory, pods, listed, mounts)

        async def stop(pod: str) -> None:
            async with rpc(hyperd_factory.socket) as c:
                await c.call("pod.stop", {"id": pod})

        async with anyio.create_task_group() as tg:  # (one at a time is slow on 2 cores)
            for pod, info in pods.items():
                if info["state"] == "running":
                    tg.start_soon(stop, pod)
    assert hyperd_factory.stop() == 0
    assert hyperd_factory.mounts_under_base() == []
    assert helper_pids(hyperd_factory.base, top_only=True) == set()
