"""Scenario 3: N pods held by one hyperd — memory per VM, RPC latency under load, start-up time.

For each N: a fresh daemon, one system-mode hyperd-proxy shared by all pods, and N VMs on the
``external`` backend: N hyperd-sim processes up to ``process_limit``, above it the in-process
endpoints of :mod:`hyperd.bench.farm` (one process answering as N VMs; the output says so).
Measured:

- time to ``pod.create`` + ``pod.start`` the N pods (``create_concurrency`` clients at once);
- hyperd's RSS growth per VM (pods started), and per VM with one running container each;
- a mixed RPC load across all pods from ``concurrency`` clients, one call at a time each:
  half ``container.kill`` (SIGCONT, an agent round trip), a quarter ``pod.inspect``, a quarter
  ``container.list``; p50/p99 of all calls and p99 of the agent calls, calls/s;
- a burst of ``container.kill`` only from ``burst_clients`` clients: agent commands per second
  through one daemon across all N VMs (one VM is bound by its agent round trip).
"""

from __future__ import annotations

import os
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Final

import anyio

from hyperd.bench import farm, wire
from hyperd.bench.daemon import (
    KILL_SIGNAL_NAME,
    RunningContainer,
    busybox_rootfs,
    start_container,
    start_daemon,
)
from hyperd.bench.procs import python_argv
from hyperd.bench.stats import Section, percentile
from hyperd.bench.topology import Workspace

US: Final = 1e6
CONTAINER: Final = "c"
SEED: Final = 6  # the load's pod choice is reproducible
WARMUP_POD: Final = "warm"
SIM_RSS_MIB: Final = 28  # measured: one idle hyperd-sim process (VmRSS)
SIM_START_CPU: Final = 0.1  # measured: CPU seconds for one hyperd-sim to get ready


@dataclass(frozen=True)
class ScaleSettings:
    sizes: tuple[int, ...] = (1, 100, 1000)
    calls: int = 2000
    concurrency: int = 8
    repetitions: int = 3
    process_limit: int = 100
    create_concurrency: int = 16
    burst_clients: int = 64
    """Clients of the agent-command burst: the many-VM throughput through one daemon."""


async def _pool(
    clients: list[wire.RpcWire],
    items: list[Any],
    job: Callable[[wire.RpcWire, Any], Awaitable[None]],
) -> float:
    """Run ``job(client, item)`` for every item, one client per worker; seconds taken."""
    todo = iter(items)

    async def worker(client: wire.RpcWire) -> None:
        for item in todo:
            await job(client, item)

    start = perf_counter()
    async with anyio.create_task_group() as tg:
        for client in clients:
            tg.start_soon(worker, client)
    return perf_counter() - start


def _endpoints(
    ws: Workspace, n: int, s: ScaleSettings, shared: str, pods: list[str]
) -> tuple[list[tuple[str, str]], str]:
    """ctl/tty paths of N VMs, and what provides them."""
    if n <= s.process_limit + 1:  # + the warm-up pod
        vms = ws.start_sims([f"s{n}v{i}" for i in range(n)], [f"{shared}/{pod}" for pod in pods])
        return [(vm.ctl, vm.tty) for vm in vms], "hyperd-sim processes (one per VM)"
    directory = ws.path(ws.unique(f"farm{n}"))
    os.makedirs(directory)
    ws.procs.spawn(
        [*python_argv("hyperd.bench.farm"), "--dir", directory, "--count", str(n)],
        what="agent farm",
    )
    return (
        [farm.socket_paths(directory, i) for i in range(n)],
        "lightweight agent endpoints, all in one process (hyperd.bench.farm: ACKs only); "
        f"hyperd-sim processes are used up to {s.process_limit} VMs (each ~{SIM_RSS_MIB} "
        f"MiB RSS and ~{SIM_START_CPU} s CPU to start: {n - 1} would need "
        f"~{(n - 1) * SIM_RSS_MIB / 1024:.0f} GiB, this machine has {_ram_gib():.0f} GiB)",
    )


def _ram_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / (1024 * 1024)
    return float("nan")


async def scale_one(ws: Workspace, s: ScaleSettings, n: int, sec: Section, rootfs: str) -> None:
    """One size: a warm-up pod (index 0, excluded from the figures) and N measured pods."""
    pods = [WARMUP_POD] + [f"p{i}" for i in range(n)]
    daemon = start_daemon(ws, f"hd{n}", stop_pods=False)
    proxy = ws.start_proxy(f"sp{n}", "--agent-dialect", "cc")
    endpoints, what = _endpoints(ws, n + 1, s, f"{daemon.base}/shared", pods)
    clients = [
        await wire.RpcWire.open(daemon.socket)
        for _ in range(max(s.concurrency, s.create_concurrency, s.burst_clients))
    ]
    containers: list[RunningContainer] = []
    try:

        async def create(client: wire.RpcWire, i: int) -> None:
            ctl, tty = endpoints[i]
            await client.call(
                "pod.create",
                {
                    "id": pods[i],
                    "vm": {"backend": "external", "ctl": ctl, "tty": tty},
                    "proxy": {"mode": "system", "url": f"unix://{proxy}"},
                    "agent_dialect": "cc",
                },
            )
            await client.call("pod.start", {"id": pods[i]})

        async def add_container(client: wire.RpcWire, i: int) -> None:
            containers.append(await start_container(client, pods[i], CONTAINER, rootfs))

        # the warm-up pod pays for first-use imports and allocations, outside the figures
        await create(clients[0], 0)
        await add_container(clients[0], 0)
        rss0 = daemon.rss_kib()
        measured = list(range(1, n + 1))
        elapsed = await _pool(clients[: s.create_concurrency], measured, create)
        sec.add(f"start{n}", f"N={n}: create+start N pods", "s", elapsed)
        sec.add(f"startrate{n}", f"N={n}: pods started per second", "/s", n / elapsed)
        rss1 = daemon.rss_kib()
        sec.add(f"rss{n}", f"N={n}: hyperd RSS growth per VM", "KiB", (rss1 - rss0) / n)

        elapsed = await _pool(clients[: s.create_concurrency], measured, add_container)
        sec.add(f"cstart{n}", f"N={n}: create+start one container per pod", "s", elapsed)
        rss2 = daemon.rss_kib()
        sec.add(f"rssc{n}", f"N={n}: hyperd RSS per VM incl. 1 container", "KiB", (rss2 - rss0) / n)
        sec.add(f"rsstotal{n}", f"N={n}: hyperd RSS total", "MiB", rss2 / 1024)

        rng = random.Random(SEED)
        for _ in range(s.repetitions):
            all_calls: list[float] = []
            agent_calls: list[float] = []

            async def call(
                client: wire.RpcWire,
                k: int,
                all_calls: list[float] = all_calls,
                agent_calls: list[float] = agent_calls,
            ) -> None:
                pod = pods[1 + rng.randrange(n)]
                kind = k % 4
                start = perf_counter()
                if kind < 2:
                    await client.call(
                        "container.kill", {"pod": pod, "id": CONTAINER, "signal": KILL_SIGNAL_NAME}
                    )
                elif kind == 2:
                    await client.call("pod.inspect", {"id": pod})
                else:
                    await client.call("container.list", {"pod": pod})
                took = (perf_counter() - start) * US
                all_calls.append(took)
                if kind < 2:
                    agent_calls.append(took)

            elapsed = await _pool(clients[: s.concurrency], list(range(s.calls)), call)
            sec.add(
                f"p50_{n}", f"N={n}: mixed load p50 (all calls)", "us", percentile(all_calls, 50)
            )
            sec.add(
                f"p99_{n}", f"N={n}: mixed load p99 (all calls)", "us", percentile(all_calls, 99)
            )
            sec.add(
                f"p99k_{n}",
                f"N={n}: mixed load p99 (container.kill)",
                "us",
                percentile(agent_calls, 99),
            )
            sec.add(f"rate{n}", f"N={n}: mixed load calls/s", "/s", s.calls / elapsed)

            kills: list[float] = []

            async def kill(client: wire.RpcWire, k: int, kills: list[float] = kills) -> None:
                pod = pods[1 + rng.randrange(n)]
                start = perf_counter()
                await client.call(
                    "container.kill", {"pod": pod, "id": CONTAINER, "signal": KILL_SIGNAL_NAME}
                )
                kills.append((perf_counter() - start) * US)

            elapsed = await _pool(clients[: s.burst_clients], list(range(s.calls)), kill)
            sec.add(
                f"burst{n}",
                f"N={n}: agent commands/s, {s.burst_clients} clients (container.kill only)",
                "/s",
                s.calls / elapsed,
            )
            sec.add(f"burst99_{n}", f"N={n}: p99 of those", "us", percentile(kills, 99))
        sec.notes.append(f"N={n}: VMs are {what}; RSS figures exclude a warm-up pod")
    finally:
        for c in containers:
            c.shim.close()
        for client in clients:
            client.close()
        ws.procs.stop_all()
        ws.unmount_all()


async def scale(ws: Workspace, s: ScaleSettings) -> Section:
    sec = Section("3. scale: N pods held by one hyperd (one shared system-mode hyperd-proxy)")
    rootfs = busybox_rootfs(ws)
    for n in s.sizes:
        await scale_one(ws, s, n, sec, rootfs)
    sec.notes.append(
        f"mixed load: {s.calls} calls per repetition from {s.concurrency} clients, "
        "1/2 container.kill (agent round trip), 1/4 pod.inspect, 1/4 container.list, "
        "random pods; then the same number of container.kill calls from "
        f"{s.burst_clients} clients (one VM allows one agent command at a time: many VMs "
        "show how far one hyperd scales past that)"
    )
    return sec
