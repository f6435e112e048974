"""Scenario 2: RPC latency end to end at low load, and what hyperd adds to an agent command.

One pod (hyperd-sim behind its per-pod hyperd-proxy, both started by the daemon) runs one
container (``sleep``). Calls are made one at a time, alternating in blocks per repetition:

- ``rpc kill``: ``container.kill`` (SIGCONT) — client → hyperd → proxy → agent → back;
- ``direct kill``: the same ``killcontainer`` Hyper command on a connection of our own straight to
  the pod's proxy (attached once, one at a time);
- ``rpc version``: ``hyperd.version`` — the RPC layer alone, no agent on the path.

hyperd's overhead = p50(rpc kill) - p50(direct kill), per repetition, then the median.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Final

from hyperd.bench import wire
from hyperd.bench.daemon import KILL_SIGNAL_NAME, busybox_rootfs, start_container, start_daemon
from hyperd.bench.stats import Section, percentile
from hyperd.bench.topology import Workspace
from protocol.hyperstart import KillCommand, encode_message

POD: Final = "lat"
CONTAINER: Final = "c1"
SIGCONT: Final = 18
US: Final = 1e6


@dataclass(frozen=True)
class LatencySettings:
    calls: int = 400
    repetitions: int = 5
    warmup: int = 50


async def _timed(n: int, call: Callable[[], Awaitable[object]]) -> list[float]:
    samples = []
    for _ in range(n):
        start = perf_counter()
        await call()
        samples.append((perf_counter() - start) * US)
    return samples


async def latency(ws: Workspace, s: LatencySettings) -> Section:
    sec = Section("2. RPC latency at low load (one call at a time), one pod, one container")
    daemon = start_daemon(ws)
    rootfs = busybox_rootfs(ws)
    rpc = await wire.RpcWire.open(daemon.socket)
    direct: wire.ProxyWire | None = None
    container = None
    try:
        await rpc.call("pod.create", {"id": POD})
        pod = await rpc.call("pod.start", {"id": POD})
        container = await start_container(rpc, POD, CONTAINER, rootfs)
        direct = await wire.ProxyWire.open(wire.unix_path(pod["proxy_url"]))
        await direct.attach(POD)
        kill_data = encode_message(KillCommand(container=CONTAINER, signal=SIGCONT))
        params = {"pod": POD, "id": CONTAINER, "signal": KILL_SIGNAL_NAME}
        proxy = direct

        async def rpc_kill() -> object:
            return await rpc.call("container.kill", params)

        async def direct_kill() -> object:
            return await proxy.hyper("killcontainer", kill_data)

        async def rpc_version() -> object:
            return await rpc.call("hyperd.version")

        kinds = (
            ("rpc", "container.kill via hyperd", rpc_kill),
            ("direct", "killcontainer direct to the proxy", direct_kill),
            ("version", "hyperd.version (RPC only, no agent)", rpc_version),
        )
        for _, _, call in kinds:
            await _timed(s.warmup, call)
        for _ in range(s.repetitions):
            p50: dict[str, float] = {}
            for key, label, call in kinds:
                samples = await _timed(s.calls, call)
                p50[key] = percentile(samples, 50)
                sec.add(f"{key}50", f"{label} p50", "us", p50[key])
                sec.add(f"{key}99", f"{label} p99", "us", percentile(samples, 99))
            sec.add(
                "overhead",
                "hyperd overhead per agent command (p50 rpc - p50 direct)",
                "us",
                p50["rpc"] - p50["direct"],
            )
        sec.ratio("p50 via hyperd / p50 direct", "rpc50", "direct50")
        sec.notes.append(
            f"{s.calls} calls per repetition and kind; the pod's proxy and VM are "
            "per-pod processes started by hyperd"
        )
    finally:
        if direct is not None:
            direct.close()
        if container is not None:
            container.shim.close()
        rpc.close()
    return sec
