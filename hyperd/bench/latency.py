"""Scenario 2: RPC latency end to end at low load, and what hyperd adds to an agent command.

One pod (hyperd-sim behind its per-pod hyperd-proxy, both started by the daemon) runs one
container (``sleep``). Calls are made one at a time and interleaved: every round makes one call
of each kind, in a rotating order, so that a change of the machine's load hits all kinds alike:

- ``rpc kill``: ``container.kill`` (SIGCONT) — client → hyperd → proxy → agent → back;
- ``direct kill``: the same ``killcontainer`` Hyper command on a connection of our own straight to
  the pod's proxy (attached once, one at a time);
- ``rpc version``: ``hyperd.version`` — the RPC layer alone, no agent on the path;
- ``relay kill``: the same JSON-RPC request to :mod:`hyperd.bench.relay`, a process that does
  nothing but relay it as the same Hyper command on its own attached connection: the floor of
  one more process on the path (two more wakeups per call) on this machine.

hyperd's overhead = p50(rpc kill) - p50(direct kill), per repetition; the table shows the median
of the repetitions and their spread (lowest, highest), and the median of the paired differences
(each round's rpc kill minus the same round's direct kill), which a load drift cancels out of.
The relay splits it: p50(relay) - p50(direct) is the hop itself, p50(rpc) - p50(relay) hyperd's
own work (parsing, validation, state, the queue).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import Final

import msgspec

from hyperd.bench import wire
from hyperd.bench.daemon import KILL_SIGNAL_NAME, busybox_rootfs, start_container, start_daemon
from hyperd.bench.procs import python_argv
from hyperd.bench.stats import Section, median, percentile
from hyperd.bench.topology import Workspace
from protocol.ccproxy import Hyper, encode_payload
from protocol.hyperstart import KillCommand, encode_message

POD: Final = "lat"
CONTAINER: Final = "c1"
SIGCONT: Final = 18
US: Final = 1e6


@dataclass(frozen=True)
class LatencySettings:
    calls: int = 1000
    repetitions: int = 5
    warmup: int = 100


Call = Callable[[], Awaitable[object]]


async def _interleaved(n: int, calls: Sequence[Call]) -> list[list[float]]:
    """``n`` rounds of one call of each kind (the order rotates every round); durations in us,
    one list per kind."""
    samples: list[list[float]] = [[] for _ in calls]
    k = len(calls)
    for i in range(n):
        for j in range(k):
            index = (i + j) % k
            start = perf_counter()
            await calls[index]()
            samples[index].append((perf_counter() - start) * US)
    return samples


async def latency(ws: Workspace, s: LatencySettings) -> Section:
    sec = Section("2. RPC latency at low load (one call at a time), one pod, one container")
    daemon = start_daemon(ws)
    rootfs = busybox_rootfs(ws)
    rpc = await wire.RpcWire.open(daemon.socket)
    direct: wire.ProxyWire | None = None
    relay: wire.RpcWire | None = None
    container = None
    try:
        await rpc.call("pod.create", {"id": POD})
        pod = await rpc.call("pod.start", {"id": POD})
        container = await start_container(rpc, POD, CONTAINER, rootfs)
        direct = await wire.ProxyWire.open(wire.unix_path(pod["proxy_url"]))
        await direct.attach(POD)
        kill_data = encode_message(KillCommand(container=CONTAINER, signal=SIGCONT))
        relay_sock = ws.path("relay.sock")
        ws.procs.spawn(
            [
                *python_argv("hyperd.bench.relay"),
                "--listen",
                relay_sock,
                "--proxy",
                wire.unix_path(pod["proxy_url"]),
                "--vm",
                POD,
                "--payload",
                encode_payload(Hyper(hyperName="killcontainer", data=msgspec.Raw(kill_data))).hex(),
            ],
            what="relay",
        )
        relay = await wire.RpcWire.open(relay_sock)
        params = {"pod": POD, "id": CONTAINER, "signal": KILL_SIGNAL_NAME}
        proxy = direct

        async def rpc_kill() -> object:
            return await rpc.call("container.kill", params)

        async def direct_kill() -> object:
            return await proxy.hyper("killcontainer", kill_data)

        async def rpc_version() -> object:
            return await rpc.call("hyperd.version")

        async def relay_kill() -> object:
            return await relay.call("container.kill", params)

        kinds = (
            ("rpc", "container.kill via hyperd", rpc_kill),
            ("direct", "killcontainer direct to the proxy", direct_kill),
            ("version", "hyperd.version (RPC only, no agent)", rpc_version),
            ("relay", "the same through a relay doing nothing (hop floor)", relay_kill),
        )
        calls = [call for _, _, call in kinds]
        await _interleaved(s.warmup, calls)
        overheads = []
        for _ in range(s.repetitions):
            p50: dict[str, float] = {}
            by_kind = await _interleaved(s.calls, calls)
            for (key, label, _), samples in zip(kinds, by_kind, strict=True):
                p50[key] = percentile(samples, 50)
                sec.add(f"{key}50", f"{label} p50", "us", p50[key])
                sec.add(f"{key}99", f"{label} p99", "us", percentile(samples, 99))
            overheads.append(p50["rpc"] - p50["direct"])
            sec.add(
                "overhead",
                "hyperd overhead per agent command (p50 rpc - p50 direct)",
                "us",
                overheads[-1],
            )
            paired = [r - d for r, d in zip(by_kind[0], by_kind[1], strict=True)]
            sec.add("paired", "  the same, median of paired differences", "us", median(paired))
            sec.add(
                "hop", "  of which the hop itself (p50 relay - p50 direct)", "us",
                p50["relay"] - p50["direct"],
            )  # fmt: skip
            sec.add(
                "own", "  of which hyperd's own work (p50 rpc - p50 relay)", "us",
                p50["rpc"] - p50["relay"],
            )  # fmt: skip
        sec.add("overhead_min", "  overhead: lowest repetition", "us", min(overheads))
        sec.add("overhead_max", "  overhead: highest repetition", "us", max(overheads))
        sec.ratio("p50 via hyperd / p50 direct", "rpc50", "direct50")
        sec.notes.append(
            f"{s.calls} calls per repetition and kind, interleaved; the pod's proxy and VM are "
            "per-pod processes started by hyperd"
        )
    finally:
        if direct is not None:
            direct.close()
        if container is not None:
            container.shim.close()
        rpc.close()
        if relay is not None:
            relay.close()
    return sec
