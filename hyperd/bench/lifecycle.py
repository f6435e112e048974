"""Scenario 4: container lifecycle in a running pod, hyperd vs a seed-pattern driver.

One container at a time: create (an I/O token), the shim claims the token, start (bind-mount the
rootfs, NEWCONTAINER running ``sleep``), kill (SIGKILL), the shim sees the exit status, stop
(REMOVECONTAINER, unmount). Both drivers send the same agent commands, built by the same
:mod:`hyperd.agent` builders, to a hyperd-sim behind a hyperd-proxy:

- ``hyperd``: ``container.create`` / ``container.start`` / ``container.kill`` /
  ``container.stop`` over JSON-RPC to a daemon (per-pod proxy and sim started by the daemon);
- ``seed``: what the seed's ``createContainer`` / ``startContainer`` / ``killContainer`` /
  ``stopContainer`` do: connect + AttachVM (+ command) + disconnect for every agent command, the
  rootfs bind mount done inline; against a sim and a system-mode proxy started by the runner.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Final

import anyio
import msgspec

from hyperd import agent
from hyperd.bench import wire
from hyperd.bench.daemon import SLEEP_ARGS, busybox_rootfs, start_daemon
from hyperd.bench.procs import child_pids
from hyperd.bench.stats import Section, percentile
from hyperd.bench.topology import Workspace
from hyperd.host.mountsys import MNT_DETACH, MS_BIND, umount
from hyperd.host.mountsys import mount as sys_mount
from hyperd.spec import DirRootfs, ProcessSpec
from hyperd.store import StateStore
from protocol.hyperstart import encode_message

POD: Final = "lc"
SEED_VM: Final = "lc-seed"
SIGKILL: Final = 9
MS: Final = 1e3
PHASES: Final = ("create", "start", "kill", "exit", "stop")
RECORD_BYTES: Final = 1024  # about the size of a container's row
SAVE_SAMPLES: Final = 200
SAVES_PER_LIFECYCLE: Final = 3
"""hyperd saves the container's row on container.create, on the exit and on container.stop
(its intent, before REMOVECONTAINER); start and the end of stop save nothing (a restart learns
those from the agent, the proxy and the mount table). The seed-pattern driver keeps no state."""


CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and of the children it has reaped (``/proc/<pid>/stat``: utime,
    stime, cutime, cstime), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / CLK_TCK


def _helpers(parent: int) -> dict[str, int]:
    """The direct children of ``parent`` that are our programs, by role: ``hyperd`` (the
    daemon), ``sim`` and ``proxy``."""
    out: dict[str, int] = {}
    for pid in child_pids(parent):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if len(argv) < 3:
            continue
        role = {b"hyperd": "hyperd", b"hyperd.sim": "sim", b"hyperd.proxy": "proxy"}.get(argv[2])
        if role is not None:
            out[role] = pid
    return out


@dataclass
class CpuUse:
    """CPU seconds spent for one driver's lifecycles: by its helper processes (the daemon, the
    proxy and the VM with the processes it reaped) and by the runner's own thread (the client
    side: RPC calls, or the seed pattern's connections and mounts)."""

    processes: dict[str, int]
    runner: float = 0.0
    lifecycles: int = 0
    _start: dict[str, float] = field(default_factory=dict)
    used: dict[str, float] = field(default_factory=dict)

    def begin(self) -> None:
        self._start = {role: cpu_seconds(pid) for role, pid in self.processes.items()}

    def end(self) -> None:
        for role, pid in self.processes.items():
            self.used[role] = self.used.get(role, 0.0) + cpu_seconds(pid) - self._start[role]


@dataclass(frozen=True)
class LifecycleSettings:
    containers: int = 20
    repetitions: int = 3
    warmup: int = 2


Phases = dict[str, float]


async def _phase(times: Phases, name: str, step: Callable[[], Awaitable[object]]) -> object:
    start = perf_counter()
    result = await step()
    times[name] = (perf_counter() - start) * MS
    return result


async def hyperd_lifecycle(rpc: wire.RpcWire, rootfs: str, cid: str) -> Phases:
    """One container through the daemon; the duration of each phase in ms."""
    t: Phases = {}
    ref = {"pod": POD, "id": cid}
    created = await _phase(
        t,
        "create",
        lambda: rpc.call(
            "container.create", {**ref, "rootfs": {"path": rootfs}, "process": {"args": SLEEP_ARGS}}
        ),
    )
    assert isinstance(created, dict)
    shim = await wire.ShimWire.connect(wire.unix_path(created["proxy_url"]), created["token"])
    try:
        await _phase(t, "start", lambda: rpc.call("container.start", ref))
        await _phase(t, "kill", lambda: rpc.call("container.kill", {**ref, "signal": SIGKILL}))
        await _phase(t, "exit", shim.wait_exit)
    finally:
        shim.close()
    await _phase(t, "stop", lambda: rpc.call("container.stop", ref))
    return t


class SeedDriver:
    """The seed's container calls, each agent command on a fresh proxy connection."""

    def __init__(self, proxy: str, share: str, rootfs: str) -> None:
        self.proxy = proxy
        self.share = share
        self.rootfs = rootfs

    async def start_pod(self, ctl: str, tty: str) -> None:
        registrar = await wire.ProxyWire.open(self.proxy)  # seed register(): connect, register,
        try:  # disconnect
            await registrar.register(SEED_VM, ctl, tty)
        finally:
            registrar.close()
        pod = agent.build_pod(SEED_VM)
        await wire.seed_command(self.proxy, SEED_VM, "startpod", encode_message(pod))

    def _mount(self, cid: str) -> str:
        target = os.path.join(self.share, cid, agent.ROOTFS_DIR)
        os.makedirs(target, exist_ok=True)
        sys_mount(self.rootfs, target, MS_BIND)
        return target

    def _unmount(self, cid: str) -> None:
        target = os.path.join(self.share, cid, agent.ROOTFS_DIR)
        umount(target, MNT_DETACH)
        with contextlib.suppress(OSError):
            os.rmdir(target)
            os.rmdir(os.path.dirname(target))

    async def lifecycle(self, cid: str) -> Phases:
        t: Phases = {}
        tokens = await _phase(t, "create", lambda: wire.seed_tokens(self.proxy, SEED_VM, 1))
        assert isinstance(tokens, list)
        shim = await wire.ShimWire.connect(self.proxy, tokens[0])
        try:
            process = agent.build_process(
                ProcessSpec(args=SLEEP_ARGS), process_id=agent.INIT_PROCESS_ID
            )
            message = encode_message(
                agent.build_container(cid, DirRootfs(path=self.rootfs), process)
            )

            async def start() -> object:
                self._mount(cid)
                try:
                    return await wire.seed_command(
                        self.proxy, SEED_VM, "newcontainer", message, tokens=tokens
                    )
                except BaseException:
                    self._unmount(cid)
                    raise

            kill = encode_message(agent.build_kill(cid, SIGKILL))
            await _phase(t, "start", start)
            await _phase(
                t, "kill", lambda: wire.seed_command(self.proxy, SEED_VM, "killcontainer", kill)
            )
            await _phase(t, "exit", shim.wait_exit)
        finally:
            shim.close()
        remove = encode_message(agent.build_remove(cid))

        async def stop() -> None:
            await wire.seed_command(self.proxy, SEED_VM, "removecontainer", remove)
            self._unmount(cid)

        await _phase(t, "stop", stop)
        return t


class _Record(msgspec.Struct):
    blob: str


def durable_save_ms(directory: str, count: int) -> list[float]:
    """Durations of ``hyperd.store.StateStore.save`` of a container-sized record (one SQLite
    transaction in WAL mode)."""
    store = StateStore(directory)
    record = _Record(blob="x" * RECORD_BYTES)
    samples = []
    try:
        for n in range(count):
            start = perf_counter()
            store.save("bench", f"pod/c{n % 20}", record)
            samples.append((perf_counter() - start) * MS)
    finally:
        store.close()
    return samples


def _record(sec: Section, key: str, label: str, runs: list[Phases]) -> None:
    totals = [sum(r.values()) for r in runs]
    sec.add(f"{key}_p50", f"{label}: lifecycle p50", "ms", percentile(totals, 50))
    sec.add(f"{key}_p99", f"{label}: lifecycle p99", "ms", percentile(totals, 99))
    sec.add(
        f"{key}_rate", f"{label}: containers/s (sequential)", "/s", len(totals) / (sum(totals) / MS)
    )
    sec.add(
        f"{key}_cmds",
        f"{label}: agent+proxy commands/s",
        "cmd/s",
        # AttachVM for the token, newcontainer, killcontainer, removecontainer
        4 * len(totals) / (sum(totals) / MS),
    )
    for phase in PHASES:
        sec.add(
            f"{key}_{phase}",
            f"{label}: {phase} p50",
            "ms",
            percentile([r[phase] for r in runs], 50),
        )
    sec.add(
        f"{key}_create_start",
        f"{label}: create+start p50",
        "ms",
        percentile([r["create"] + r["start"] for r in runs], 50),
    )


INSIDE: Final = (
    ("rpc.container.create", "container.create"),
    ("rpc.container.start", "container.start"),
    ("rpc.container.kill", "container.kill"),
    ("rpc.container.stop", "container.stop"),
    ("state.save", "one save"),
    ("mount.ahead", "mounting ahead (from create, in the background)"),
    ("mount.waited_by_start", "start waiting for those mounts"),
    ("mount.undone_by_stop", "stop's unmount"),
    ("agent.newcontainer", "NEWCONTAINER round trip"),
    ("agent.killcontainer", "KILLCONTAINER round trip"),
    ("agent.removecontainer", "REMOVECONTAINER round trip"),
)
"""Steps timed inside the daemon (``hyperd.stats`` → ``timings``), shown with scenario 4."""


def _cpu(sec: Section, key: str, label: str, cpu: CpuUse) -> None:
    per = MS / max(cpu.lifecycles, 1)
    for role, seconds in cpu.used.items():
        sec.add(f"{key}_cpu_{role}", f"{label}: CPU per lifecycle, {role}", "ms", seconds * per)
    sec.add(f"{key}_cpu_runner", f"{label}: CPU per lifecycle, client side", "ms", cpu.runner * per)
    total = sum(cpu.used.values()) + cpu.runner
    sec.add(f"{key}_cpu", f"{label}: CPU per lifecycle, all processes", "ms", total * per)


def _inside(sec: Section, timings: dict[str, dict[str, float]]) -> None:
    for key, label in INSIDE:
        if key in timings:
            sec.add(f"in_{key}", f"inside hyperd: {label} p50", "us", timings[key]["p50_us"])


async def lifecycle(ws: Workspace, s: LifecycleSettings) -> Section:
    sec = Section("4. container lifecycle (create, start, kill+exit, stop), one running pod")
    rootfs = busybox_rootfs(ws)
    daemon = start_daemon(ws)
    rpc = await wire.RpcWire.open(daemon.socket)
    vm = ws.start_sim("lc-seed")
    seed = SeedDriver(ws.start_proxy("lc-proxy"), vm.share, rootfs)
    try:
        await rpc.call("pod.create", {"id": POD})
        await rpc.call("pod.start", {"id": POD})
        await seed.start_pod(vm.ctl, vm.tty)
        mine = _helpers(os.getpid())
        ours = _helpers(daemon.proc.pid)
        h_cpu = CpuUse({"daemon": daemon.proc.pid, "proxy": ours["proxy"], "VM": ours["sim"]})
        s_cpu = CpuUse({"proxy": mine["proxy"], "VM": mine["sim"]})
        n = 0

        async def timed(cpu: CpuUse, run: Callable[[], Awaitable[Phases]]) -> Phases:
            start = time.thread_time()
            try:
                return await run()
            finally:
                cpu.runner += time.thread_time() - start
                cpu.lifecycles += 1

        async def both(count: int, record: bool) -> None:
            nonlocal n
            h_runs, s_runs = [], []
            for cpu in (h_cpu, s_cpu):
                cpu.begin()
            for _ in range(count):
                n += 1
                cid = f"c{n}"
                hyperd_run = functools.partial(hyperd_lifecycle, rpc, rootfs, cid)
                seed_run = functools.partial(seed.lifecycle, cid)
                if n % 2:  # who goes first alternates: neither always follows the other
                    h_runs.append(await timed(h_cpu, hyperd_run))
                    s_runs.append(await timed(s_cpu, seed_run))
                else:
                    s_runs.append(await timed(s_cpu, seed_run))
                    h_runs.append(await timed(h_cpu, hyperd_run))
            for cpu in (h_cpu, s_cpu):
                cpu.end()
            if record:
                _record(sec, "hyperd", "hyperd", h_runs)
                _record(sec, "seed", "seed pattern", s_runs)
            else:  # the warm-up's CPU is not counted
                for cpu in (h_cpu, s_cpu):
                    cpu.used.clear()
                    cpu.runner, cpu.lifecycles = 0.0, 0

        await both(s.warmup, record=False)
        for _ in range(s.repetitions):
            await both(s.containers, record=True)
            _inside(sec, (await rpc.call("hyperd.stats")).get("timings", {}))
            saves = await anyio.to_thread.run_sync(durable_save_ms, ws.path("store"), SAVE_SAMPLES)
            sec.add(
                "save",
                f"one StateStore.save ({RECORD_BYTES} B row, one transaction) p50",
                "ms",
                percentile(saves, 50),
            )
            sec.add(
                "saves",
                f"{SAVES_PER_LIFECYCLE} saves (hyperd's per lifecycle) at that p50",
                "ms",
                SAVES_PER_LIFECYCLE * percentile(saves, 50),
            )
        _cpu(sec, "hyperd", "hyperd", h_cpu)
        _cpu(sec, "seed", "seed pattern", s_cpu)
    finally:
        rpc.close()
    sec.ratio("containers/s hyperd / seed", "hyperd_rate", "seed_rate")
    sec.ratio("lifecycle p50 seed / hyperd", "seed_p50", "hyperd_p50")
    sec.notes.append(
        f"{s.containers} containers per repetition, one at a time, alternating "
        "drivers (who goes first alternates too); 'exit' = SIGKILL to exit status at the "
        "shim (the sim reaping)"
    )
    return sec
