"""VMSession against the real pair: ``python -m hyperd.sim`` behind ``python -m hyperd.proxy``."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from time import monotonic
from typing import Any

import anyio
import pytest

from hyperd.errors import VMUnavailable
from hyperd.vm import VMConfig, VMSession
from tests.procs import spawn_ready, stop
from tests.vm.helpers import VM, EventLog

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

READY_DEADLINE = 10.0
LIVENESS = VMConfig(
    command_timeout=5.0,
    connect_timeout=2.0,
    ping_interval=0.2,
    ping_timeout=0.5,
    reconnect_backoff_max=0.2,
    ready_timeout=5.0,
)
SLACK = 5.0
"""Scheduling allowance (two real processes) on top of a liveness deadline: generous, a busy CI
machine can hold a process off the CPU for seconds; far below the 30 s of a command deadline."""
FAIL_FAST = 10.0
"""A call to an unreachable VM fails at once, not after its 30 s deadline; 10 s leaves room for
a busy machine."""


def spawn(module: str, *args: str, log: Path) -> subprocess.Popen[bytes]:
    """Start ``python -m module args --ready-fd FD`` (stderr to ``log``), wait for ``ready``."""
    with log.open("ab") as stderr:
        try:
            return spawn_ready(
                [sys.executable, "-m", module, *args], stderr=stderr, deadline=READY_DEADLINE
            )
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; stderr: {log.read_text()}") from None


class Pair:
    def __init__(self, tmp: Path, *sim_args: str) -> None:
        self.ctl = str(tmp / "ctl.sock")
        self.tty = str(tmp / "tty.sock")
        self.proxy_sock = str(tmp / "proxy.sock")
        share = tmp / "share"
        share.mkdir()
        where = ("--ctl", self.ctl, "--tty", self.tty, "--share", str(share))
        self.sim = spawn("hyperd.sim", *where, *sim_args, log=tmp / "sim.log")
        self.proxy = spawn("hyperd.proxy", "--socket", self.proxy_sock, log=tmp / "proxy.log")

    @property
    def url(self) -> str:
        return f"unix://{self.proxy_sock}"

    def session(self, events: EventLog | None = None, **kwargs: Any) -> VMSession:
        kwargs.setdefault("config", LIVENESS)
        return VMSession(VM, self.url, ctl=self.ctl, tty=self.tty, on_event=events, **kwargs)


@contextmanager
def real_pair(tmp: Path, *sim_args: str) -> Iterator[Pair]:
    pair = Pair(tmp, *sim_args)
    try:
        yield pair
    finally:
        stop(pair.proxy)
        stop(pair.sim)


async def test_register_ping_tokens_unregister(anyio_backend: Any, short_tmp: Path) -> None:
    with real_pair(short_tmp) as pair:
        async with anyio.create_task_group() as tg:
            s = pair.session()
            await tg.start(s.run)
            assert s.reachable
            assert s.proxy_url == pair.url
            assert await s.hyper("ping") == b""
            tokens = await s.new_tokens(2)
            assert len(tokens) == 2 and all(len(t) == 44 for t in tokens)
            # pipelined concurrent pings through the real proxy and agent
            results: list[bytes] = []

            async def ping() -> None:
                results.append(await s.hyper("ping"))

            async with anyio.create_task_group() as callers:
                for _ in range(200):
                    callers.start_soon(ping)
            assert results == [b""] * 200
            stats = s.statistics()
            assert stats.failed == 0 and stats.timed_out == 0 and stats.sent >= 203
            await s.unregister()
            # the proxy forgot the VM: attaching again fails
            again = VMSession(VM, pair.url, register=False, config=LIVENESS)
            with pytest.raises(VMUnavailable, match="unknown containerID"):
                await tg.start(again.run)


async def test_reattach_after_daemon_restart(anyio_backend: Any, short_tmp: Path) -> None:
    with real_pair(short_tmp) as pair:
        async with anyio.create_task_group() as tg:
            first = pair.session()
            await tg.start(first.run)
            await first.close()  # the daemon went away; the VM stays registered
            second = pair.session(register=False)
            await tg.start(second.run)
            assert await second.hyper("ping") == b""
            await second.unregister()


async def test_killed_sim_makes_callers_fail_within_the_liveness_deadline(
    anyio_backend: Any, short_tmp: Path
) -> None:
    events = EventLog()
    with real_pair(short_tmp) as pair:
        async with anyio.create_task_group() as tg:
            s = pair.session(events)
            await tg.start(s.run)
            assert await s.hyper("ping") == b""
            pair.sim.kill()
            pair.sim.wait()
            killed = monotonic()
            deadline = LIVENESS.ping_interval + LIVENESS.ping_timeout + SLACK
            await events.wait("unreachable", within=deadline)
            assert monotonic() - killed <= deadline
            with anyio.fail_after(FAIL_FAST), pytest.raises(VMUnavailable, match="unreachable"):
                await s.hyper("ping")
            assert not s.statistics().reachable
            await s.unregister()  # the proxy still answers: the VM can be unregistered
            assert "reachable" not in events.kinds()


async def test_killed_sim_fails_in_flight_callers(anyio_backend: Any, short_tmp: Path) -> None:
    events = EventLog()
    with real_pair(short_tmp, "--delay", "0.5") as pair:
        async with anyio.create_task_group() as tg:
            s = pair.session(events)
            await tg.start(s.run)
            errors: list[Exception] = []

            async def call() -> None:
                try:
                    await s.hyper("ping", timeout=30)
                except VMUnavailable as exc:
                    errors.append(exc)

            deadline = LIVENESS.ping_interval + LIVENESS.ping_timeout + SLACK
            async with anyio.create_task_group() as callers:
                for _ in range(5):
                    callers.start_soon(call)
                await anyio.sleep(0.2)  # the agent holds the first ping for 0.5 s
                pair.sim.kill()
                pair.sim.wait()
                killed = monotonic()
            assert monotonic() - killed <= deadline
            assert len(errors) == 5
            await events.wait("unreachable", within=deadline)
            assert not s.reachable
            with anyio.fail_after(FAIL_FAST), pytest.raises(VMUnavailable):
                await s.hyper("ping")
            await s.close()
