"""Scenario 1, part 2: ping throughput across many VMs behind one hyperd-proxy.

The proxy keeps one agent command outstanding per VM, so one VM is bound by its agent round
trip. Here K :class:`~hyperd.vm.VMSession` s (K = 1, 8, 32) each drive one VM with
``callers_per_vm`` callers; the VMs are ACK-only endpoints of :mod:`hyperd.bench.farm` in one
process (K hyperd-sim processes would measure the machine's scheduler rather than the proxy).
Reported: aggregate pings/s per K, and the raw limit of one such VM for reference: with an
agent that costs next to nothing, that is about the proxy's own ceiling.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import Final

import anyio

from hyperd.bench import farm, wire
from hyperd.bench.procs import python_argv
from hyperd.bench.stats import Section
from hyperd.bench.topology import Workspace
from hyperd.vm import VMConfig, VMSession

IDLE_PING: Final = 3600.0  # no liveness pings during a measurement


@dataclass(frozen=True)
class ManyVMSettings:
    vms: Sequence[int] = (1, 8, 32)
    callers_per_vm: int = 8
    commands: int = 6000
    repetitions: int = 5


async def run_many(url: str, vms: Sequence[str], callers_per_vm: int, total: int) -> float:
    """``total`` pings spread over one session per VM; seconds taken (scaled to ``total``)."""
    per_caller = max(1, total // (len(vms) * callers_per_vm))
    async with anyio.create_task_group() as tg:
        sessions = []
        for vm in vms:
            session = VMSession(vm, url, register=False, config=VMConfig(ping_interval=IDLE_PING))
            await tg.start(session.run)
            sessions.append(session)

        async def caller(session: VMSession) -> None:
            for _ in range(per_caller):
                await session.hyper(wire.PING_NAME)

        start = perf_counter()
        async with anyio.create_task_group() as workers:
            for session in sessions:
                for _ in range(callers_per_vm):
                    workers.start_soon(caller, session)
        elapsed = perf_counter() - start
        for session in sessions:
            await session.close()
    return elapsed * total / (per_caller * callers_per_vm * len(vms))


async def many_vms(ws: Workspace, sock: str, sec: Section, s: ManyVMSettings) -> None:
    """Add the many-VM rows to ``sec`` (the proxy at ``sock`` is shared with part 1)."""
    count = max(s.vms)
    directory = ws.path(ws.unique("farm"))
    os.makedirs(directory)
    ws.procs.spawn(
        [*python_argv("hyperd.bench.farm"), "--dir", directory, "--count", str(count)],
        what="agent farm",
    )
    names = [f"farm-vm{i}" for i in range(count)]
    registrar = await wire.ProxyWire.open(sock)
    try:
        for i, name in enumerate(names):
            ctl, tty = farm.socket_paths(directory, i)
            await registrar.register(name, ctl, tty)
    finally:
        registrar.close()
    url = f"unix://{sock}"
    await run_many(url, names, s.callers_per_vm, s.commands // 4)  # warm-up
    for _ in range(s.repetitions):
        for k in s.vms:
            t = await run_many(url, names[:k], s.callers_per_vm, s.commands)
            sec.add(
                f"many{k}",
                f"many VMs: {k} VMs x {s.callers_per_vm} callers (hyperd)",
                "cmd/s",
                s.commands / t,
            )
        t = await wire.raw_pipelined(sock, names[0], s.commands)
        sec.add(
            "manyraw",
            "many VMs: raw limit of one such VM (~ the proxy's ceiling)",
            "cmd/s",
            s.commands / t,
        )
    top, one = max(s.vms), min(s.vms)
    sec.ratio(f"hyperd: {top} VMs / {one} VM", f"many{top}", f"many{one}")
    sec.ratio(f"hyperd: {top} VMs / raw limit of one VM", f"many{top}", "manyraw")
    sec.notes.append(
        "many VMs: ACK-only agents of hyperd.bench.farm in one process, one "
        "hyperd-proxy; shows how far hyperd goes past one VM's agent round trip"
    )
