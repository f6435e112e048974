"""Scenario 1: command throughput on one VM (Hyper ``ping`` through hyperd-proxy to hyperd-sim).

Variants, each run once per repetition, interleaved so that drift hits them all alike:

- ``A`` the seed's pattern: connect, AttachVM, ping, disconnect, for every command;
- ``B`` one connection, one command at a time;
  (A, B and the agent alone use blocking sockets, as a Go client would: the event loop of the
  runner is idle meanwhile, so nothing of the runner's own runs between client and wire);
- ``hyperd xN``: :class:`hyperd.vm.VMSession` (persistent connection, pipelined FIFO queue)
  driven by N concurrent callers;
- ``reference``: a bare ``asyncio.Protocol`` client with the same N callers (futures matched
  FIFO, nothing else): how much of hyperd's gap to ``raw`` any event-loop client pays;
- ``raw``: every ping written back to back in one write on one connection (the limit of this
  proxy and agent);
- ``agent``: the agent round trip alone, pings one at a time straight on a second simulated
  VM's ctl channel (the sim takes one host connection per socket, hence a second VM), so that the
  proxy's own cost per command is the raw time per command minus the agent round trip;
- then :mod:`hyperd.bench.manyvm`: the same proxy driving many (ACK-only) VMs at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from time import perf_counter
from typing import Final

import anyio

from hyperd.bench import wire
from hyperd.bench.manyvm import ManyVMSettings, many_vms
from hyperd.bench.stats import Section
from hyperd.bench.topology import Workspace
from hyperd.vm import VMConfig, VMSession
from protocol.ccproxy import Command

VM_ID: Final = "bench-vm"
IDLE_PING: Final = 3600.0
"""Liveness ping interval of the measured sessions: no background pings during a measurement."""
US: Final = 1e6


@dataclass(frozen=True)
class ThroughputSettings:
    commands: int = 3000
    seed_commands: int = 600
    callers: Sequence[int] = (1, 8, 64)
    repetitions: int = 9
    warmup: int = 200
    many: ManyVMSettings = field(default_factory=ManyVMSettings)


def session_config() -> VMConfig:
    return VMConfig(ping_interval=IDLE_PING)


async def run_session_load(url: str, vm: str, callers: int, total: int) -> float:
    """``total`` pings from ``callers`` tasks sharing one :class:`VMSession`; seconds taken."""
    per_caller = max(1, total // callers)
    async with anyio.create_task_group() as tg:
        session = VMSession(vm, url, register=False, config=session_config())
        await tg.start(session.run)

        async def caller() -> None:
            for _ in range(per_caller):
                await session.hyper(wire.PING_NAME)

        start = perf_counter()
        async with anyio.create_task_group() as workers:
            for _ in range(callers):
                workers.start_soon(caller)
        elapsed = perf_counter() - start
        await session.close()
    return elapsed * total / (per_caller * callers)


async def run_protocol_load(sock: str, vm: str, callers: int, total: int) -> float:
    """``total`` pings from ``callers`` tasks on one :class:`wire.PipelineProtocol`."""
    per_caller = max(1, total // callers)
    proto = await wire.PipelineProtocol.open(sock, vm)
    try:

        async def caller() -> None:
            for _ in range(per_caller):
                await proto.command(Command.HYPER, wire.PING_PAYLOAD)

        start = perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)))
        elapsed = perf_counter() - start
    finally:
        proto.close()
    return elapsed * total / (per_caller * callers)


def run_one_at_a_time(sock: str, vm: str, total: int) -> float:
    """Baseline B on a blocking socket; seconds taken."""
    conn = wire.BlockingProxy(sock)
    try:
        conn.attach(vm)
        start = perf_counter()
        for _ in range(total):
            conn.ping()
        return perf_counter() - start
    finally:
        conn.close()


def run_seed_pattern(sock: str, vm: str, total: int) -> float:
    """Baseline A on blocking sockets; seconds taken."""
    start = perf_counter()
    for _ in range(total):
        wire.blocking_seed_ping(sock, vm)
    return perf_counter() - start


def run_agent_direct(agent: wire.BlockingAgent, total: int) -> float:
    start = perf_counter()
    for _ in range(total):
        agent.ping()
    return perf_counter() - start


async def throughput(ws: Workspace, s: ThroughputSettings) -> Section:
    sec = Section(
        "1. command throughput (Hyper ping via hyperd-proxy to hyperd-sim), one VM, then many"
    )
    vm = ws.start_sim("tp-vm")
    sock = ws.start_proxy("tp-proxy")
    url = f"unix://{sock}"
    registrar = await wire.ProxyWire.open(sock)
    direct_vm = ws.start_sim("tp-agent")
    agent = wire.BlockingAgent(direct_vm.ctl, direct_vm.tty)
    try:
        await registrar.register(VM_ID, vm.ctl, vm.tty)
        # warm-up: first connections, code paths, allocator
        run_seed_pattern(sock, VM_ID, s.warmup // 4)
        run_one_at_a_time(sock, VM_ID, s.warmup)
        await wire.raw_pipelined(sock, VM_ID, s.warmup)
        await run_session_load(url, VM_ID, max(s.callers), s.warmup)
        await run_protocol_load(sock, VM_ID, max(s.callers), s.warmup)
        run_agent_direct(agent, s.warmup)
        for _ in range(s.repetitions):
            t = run_seed_pattern(sock, VM_ID, s.seed_commands)
            sec.add("A", "A  seed pattern (connect+attach+cmd+close)", "cmd/s", s.seed_commands / t)
            t = run_one_at_a_time(sock, VM_ID, s.commands)
            sec.add("B", "B  one connection, one at a time", "cmd/s", s.commands / t)
            for n in s.callers:
                t = await run_session_load(url, VM_ID, n, s.commands)
                sec.add(f"hyperd{n}", f"hyperd VMSession, {n} callers", "cmd/s", s.commands / t)
            t = await run_protocol_load(sock, VM_ID, max(s.callers), s.commands)
            sec.add(
                "proto",
                f"reference: bare asyncio.Protocol client, {max(s.callers)} callers",
                "cmd/s",
                s.commands / t,
            )
            t_raw = await wire.raw_pipelined(sock, VM_ID, s.commands)
            sec.add("raw", "raw limit (one write, pipelined)", "cmd/s", s.commands / t_raw)
            sec.add("raw_us", "raw limit: time per command", "us", t_raw / s.commands * US)
            t_agent = run_agent_direct(agent, s.commands)
            sec.add("agent", "agent alone (ctl socket, no proxy)", "cmd/s", s.commands / t_agent)
            sec.add("agent_us", "agent round trip", "us", t_agent / s.commands * US)
            sec.add(
                "proxy_us",
                "proxy's own cost per command (raw - agent)",
                "us",
                (t_raw - t_agent) / s.commands * US,
            )
        for n in s.callers:
            for base, name in (("A", "A"), ("B", "B"), ("raw", "raw")):
                sec.ratio(f"hyperd ({n} callers) / {name}", f"hyperd{n}", base)
        await many_vms(ws, sock, sec, s.many)
    finally:
        registrar.close()
        agent.close()
    sec.notes.append(
        "the proxy keeps one agent command outstanding per VM, so the agent round "
        "trip bounds one VM; client, proxy and sim share the machine's cores"
    )
    return sec
