"""``python -m hyperd.bench`` / ``hyperd bench``: run the scenarios and print the table.

    python -m hyperd.bench [--quick] [--only 1,2,3,4,5] [--repetitions N] [--scale 1,100,1000]
                           [--plot FILE.png] [--json FILE] [--profile DIR]
    python -m hyperd.bench soak [--minutes N] [--clients C] [--seed S] [--json FILE]

Every process the run starts (proxies, simulated VMs, the daemon and what the daemon starts) is
stopped before it returns, also on an error, ^C or SIGTERM; SIGKILL of the runner reaches them
through ``PR_SET_PDEATHSIG``. Exit status: 0 after printing the table, 1 when a scenario failed
(the table of what did run is still printed), 2 for bad arguments.

Debugging: ``HYPERD_BENCH_LOG_DIR=DIR`` keeps each helper's stderr in a file there, and
``HYPERD_BENCH_HELPER_LOG_LEVEL=debug`` makes them talk. Needs root (bind mounts of container
root filesystems in scenarios 2-4) and a static busybox (``busybox-static``) for the containers.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import logging
import os
import platform
import resource
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import anyio

from hyperd.bench.exits import ExitSettings, exit_delivery
from hyperd.bench.latency import LatencySettings, latency
from hyperd.bench.lifecycle import LifecycleSettings, lifecycle
from hyperd.bench.manyvm import ManyVMSettings
from hyperd.bench.profile import Profiler
from hyperd.bench.qemuvm import QemuSettings, qemu_boot
from hyperd.bench.scale import ScaleSettings, scale
from hyperd.bench.shim import ShimSettings, shim
from hyperd.bench.stats import Section, render
from hyperd.bench.summary import summary
from hyperd.bench.throughput import ThroughputSettings, throughput
from hyperd.bench.topology import Workspace

log = logging.getLogger("hyperd.bench")

EXIT_FAILED = 1
EXIT_USAGE = 2
SCENARIOS = ("1", "2", "3", "4", "5", "6")
EXTRA_SCENARIOS = ("7",)  # run only when named in --only: real VMs take minutes under TCG


@dataclass(frozen=True)
class Settings:
    """All knobs of a run; :data:`DEFAULT` fits in 5 minutes on 2 cores, :data:`QUICK` in ~30 s."""

    throughput: ThroughputSettings = field(default_factory=ThroughputSettings)
    latency: LatencySettings = field(default_factory=LatencySettings)
    scale: ScaleSettings = field(default_factory=ScaleSettings)
    lifecycle: LifecycleSettings = field(default_factory=LifecycleSettings)
    exits: ExitSettings = field(default_factory=ExitSettings)
    shim: ShimSettings = field(default_factory=ShimSettings)
    qemu: QemuSettings = field(default_factory=QemuSettings)


DEFAULT = Settings()
QUICK = Settings(
    throughput=ThroughputSettings(
        commands=300,
        seed_commands=60,
        repetitions=2,
        warmup=50,
        many=ManyVMSettings(vms=(1, 4), commands=400, repetitions=1),
    ),
    latency=LatencySettings(calls=60, repetitions=2, warmup=10),
    scale=ScaleSettings(sizes=(1, 20), calls=200, repetitions=1, process_limit=4),
    lifecycle=LifecycleSettings(containers=3, repetitions=1, warmup=1),
    exits=ExitSettings(containers=10, repetitions=1, warmup=1),
    shim=ShimSettings(runs=3, warmup=1),
    qemu=QemuSettings(vms=1, repetitions=1),
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hyperd bench",
        description="hyperd benchmarks: throughput, latency, scale and container lifecycle, "
        "against the seed's one-connection-per-command pattern, measured in the same run",
        epilog="HYPERD_BENCH_LOG_DIR=DIR keeps the helpers' stderr; "
        "HYPERD_BENCH_HELPER_LOG_LEVEL sets their log level",
    )
    p.add_argument("--quick", action="store_true", help="small counts (CI smoke test, < 1 min)")
    p.add_argument(
        "--only",
        default=",".join(SCENARIOS),
        help="comma-separated scenarios to run: 1 throughput, 2 RPC latency, "
        "3 scale, 4 container lifecycle, 5 exit delivery, 6 containerd shim vs runc "
        "(default: these six), 7 real VMs with the qemu backend (needs QEMU; builds the guest "
        "image if missing)",
    )
    p.add_argument("--repetitions", type=int, help="repetitions of every scenario")
    p.add_argument("--scale", help="pod counts of scenario 3, e.g. 1,100,1000")
    p.add_argument(
        "--plot", metavar="FILE.png", help="plot throughput vs concurrency (needs matplotlib)"
    )
    p.add_argument("--json", metavar="FILE", help="also write every sample as JSON")
    p.add_argument(
        "--profile",
        metavar="DIR",
        help="sample every helper process with py-spy (if installed) into DIR, "
        "with a top-functions summary per process (sampling slows the helpers: "
        "use it to see where time goes, not for the figures)",
    )
    p.add_argument("--log-level", default="warning", help="runner log level")
    return p


def settings_from(args: argparse.Namespace) -> Settings:
    s = QUICK if args.quick else DEFAULT
    if args.repetitions is not None:
        n = args.repetitions
        if n < 1:
            raise ValueError("--repetitions must be >= 1")
        s = replace(
            s,
            throughput=replace(
                s.throughput, repetitions=n, many=replace(s.throughput.many, repetitions=n)
            ),
            latency=replace(s.latency, repetitions=n),
            scale=replace(s.scale, repetitions=n),
            lifecycle=replace(s.lifecycle, repetitions=n),
            exits=replace(s.exits, repetitions=n),
            qemu=replace(s.qemu, repetitions=n),
        )
    if args.scale:
        sizes = tuple(int(x) for x in args.scale.split(",") if x.strip())
        if not sizes or min(sizes) < 1:
            raise ValueError("--scale needs positive pod counts")
        s = replace(s, scale=replace(s.scale, sizes=sizes))
    return s


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def _header(args: argparse.Namespace, only: Sequence[str], load_before: str) -> list[str]:
    return [
        f"hyperd bench ({'quick' if args.quick else 'default'} settings, scenarios "
        f"{','.join(only)}), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"machine: {os.cpu_count()} CPUs, {platform.machine()}, Linux {platform.release()}, "
        f"Python {platform.python_version()}, uvloop; medians of n repetitions, "
        "ratios of medians from this run",
        f"load average (1/5/15 min) before: {load_before}, after: {_load()} "
        "(other work on the machine skews absolute figures; ratios less so)",
    ]


Scenario = Callable[[Workspace, Settings], Awaitable[Section]]


def _scenarios() -> dict[str, Scenario]:
    async def one(ws: Workspace, s: Settings) -> Section:
        return await throughput(ws, s.throughput)

    async def two(ws: Workspace, s: Settings) -> Section:
        return await latency(ws, s.latency)

    async def four(ws: Workspace, s: Settings) -> Section:
        return await lifecycle(ws, s.lifecycle)

    async def three(ws: Workspace, s: Settings) -> Section:
        return await scale(ws, s.scale)

    async def five(ws: Workspace, s: Settings) -> Section:
        return await exit_delivery(ws, s.exits)

    async def six(ws: Workspace, s: Settings) -> Section:
        return await shim(ws, s.shim)

    async def seven(ws: Workspace, s: Settings) -> Section:
        return await qemu_boot(ws, s.qemu)

    table: dict[str, Scenario] = {
        "1": one,
        "2": two,
        "3": three,
        "4": four,
        "5": five,
        "6": six,
        "7": seven,
    }
    return table


class _CallbackErrors:
    """A loop exception handler that counts one known, harmless error instead of printing a
    traceback each time, and passes everything else to the default handler.

    anyio's ``wait_until_readable`` registers ``future.set_result`` with ``add_reader``; under
    uvloop the callback can fire once more after the future is done when hyperd.vm closes a
    connection (``InvalidStateError``). The count is reported under the table.
    """

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, asyncio.InvalidStateError) and "set_result" in repr(
            context.get("handle", "")
        ):
            self.count += 1
            return
        loop.default_exception_handler(context)


async def _run(
    only: Sequence[str],
    settings: Settings,
    sections: list[Section],
    failures: list[str],
    warnings: list[str],
    profiler: Profiler | None,
) -> None:
    scenarios = _scenarios()
    handler = _CallbackErrors()
    asyncio.get_running_loop().set_exception_handler(handler)
    try:
        await _run_scenarios(only, settings, scenarios, sections, failures, profiler)
    finally:
        if handler.count:
            warnings.append(
                f"{handler.count} InvalidStateError(s) in Future.set_result callbacks (anyio "
                "add_reader under uvloop, when a hyperd.vm connection closes); not counted as "
                "failures"
            )


async def _run_scenarios(
    only: Sequence[str],
    settings: Settings,
    scenarios: dict[str, Scenario],
    sections: list[Section],
    failures: list[str],
    profiler: Profiler | None,
) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:

            async def on_signal() -> None:
                async for _ in signals:
                    failures.append("interrupted by SIGTERM")
                    tg.cancel_scope.cancel()
                    return

            tg.start_soon(on_signal)
            for key in only:
                scenario = scenarios.get(key)
                if scenario is None:
                    failures.append(f"scenario {key}: not available in this build")
                    continue
                ws = Workspace(profiler=profiler)
                started = time.monotonic()
                own = cProfile.Profile() if profiler is not None else None
                try:
                    if own is not None:
                        own.enable()  # the runner itself: hyperd.vm's client side in scenario 1
                    try:
                        sections.append(await scenario(ws, settings))
                    finally:
                        if own is not None:
                            own.disable()
                            assert profiler is not None
                            profiler.write_own(f"runner-scenario{key}", own)
                    sections[-1].notes.append(
                        f"scenario wall time {time.monotonic() - started:.1f} s"
                    )
                except Exception as exc:
                    log.debug("scenario %s failed", key, exc_info=True)
                    failures.append(f"scenario {key} failed: {exc!r}")
                    traceback.print_exc(file=sys.stderr)
                finally:
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(ws.close)
                        if profiler is not None:
                            await anyio.to_thread.run_sync(profiler.finish)
            tg.cancel_scope.cancel()


def _raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit (inherited by every helper): a thousand VMs take
    some 4000 descriptors in the proxy, 2000 in the agent farm, 1000+ in the runner."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["soak"]:
        from hyperd.bench.soak import main as soak_main

        return soak_main(argv[1:])
    args = _parser().parse_args(argv)
    _raise_fd_limit()
    logging.basicConfig(
        level=args.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s bench %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = settings_from(args)
    except ValueError as exc:
        print(f"hyperd bench: {exc}", file=sys.stderr)
        return EXIT_USAGE
    only = [x.strip() for x in args.only.split(",") if x.strip()]
    unknown = [x for x in only if x not in SCENARIOS + EXTRA_SCENARIOS]
    if unknown:
        print(
            f"hyperd bench: unknown scenario(s) {unknown}; choose from {SCENARIOS}", file=sys.stderr
        )
        return EXIT_USAGE
    sections: list[Section] = []
    failures: list[str] = []
    warnings: list[str] = []
    profiler = Profiler(args.profile) if args.profile else None
    if profiler is not None and not profiler.available:
        warnings.append("--profile: py-spy is not installed (pip install py-spy); no profiles")
        profiler = None
    started = time.monotonic()
    load_before = _load()
    try:
        anyio.run(
            _run,
            only,
            settings,
            sections,
            failures,
            warnings,
            profiler,
            backend="asyncio",
            backend_options={"use_uvloop": True},
        )
    except KeyboardInterrupt:
        failures.append("interrupted")
    finally:
        if profiler is not None:
            profiler.stop_all()
    header = _header(args, only, load_before)
    header.append(f"total wall time {time.monotonic() - started:.1f} s")
    print(render(sections, header))
    closing = summary(sections)
    if closing:
        print("\n== summary")
        for line in closing:
            print(f"  {line}")
    for warning in warnings:
        print(f"warning: {warning}")
    for failure in failures:
        print(f"FAILED: {failure}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                [
                    {
                        "title": s.title,
                        "rows": {
                            k: {"label": r.label, "unit": r.unit, "samples": r.samples}
                            for k, r in s.rows.items()
                        },
                        "ratios": s.ratios,
                        "notes": s.notes,
                    }
                    for s in sections
                ],
                f,
                indent=1,
            )
    if profiler is not None:
        print(f"profiles: {args.profile}/*.top.txt (raw stacks: *.raw)")
    if args.plot:
        from hyperd.bench.plot import plot

        problem = plot(sections, args.plot)
        print(problem or f"plot written to {args.plot}")
    sys.stdout.flush()
    return EXIT_FAILED if failures else 0
