"""The helper-process launcher: readiness over --ready-fd with a deadline, stopping, watching."""

from __future__ import annotations

import sys
import time

import anyio
import pytest

from hyperd.daemon import launcher
from hyperd.daemon.model import ProcessRef
from hyperd.errors import Timeout, VMUnavailable

pytestmark = pytest.mark.anyio

# tiny programs that take --ready-fd N as their last two arguments
READY = "import os,sys,time; os.write(int(sys.argv[-1]), b'ready\\n'); time.sleep(60)"
SILENT = "import time; time.sleep(60)"
EXITS = "import sys; sys.exit(3)"
STUBBORN = (
    "import os,signal,sys,time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "os.write(int(sys.argv[-1]), b'ready\\n'); time.sleep(60)"
)


def argv(code: str) -> list[str]:
    return [sys.executable, "-c", code, "--"]


async def test_launch_waits_for_ready_and_terminate_stops_it() -> None:
    ref = await launcher.launch(argv(READY), what="helper", deadline=10)
    assert launcher.is_alive(ref)
    await launcher.terminate(ref)
    assert not launcher.is_alive(ref)


async def test_launch_deadline_kills_a_silent_program() -> None:
    began = time.monotonic()
    with pytest.raises(Timeout, match=r"helper was not ready within 0\.5 s"):
        await launcher.launch(argv(SILENT), what="helper", deadline=0.5)
    assert time.monotonic() - began < 5


async def test_launch_reports_a_program_that_exits_first() -> None:
    with pytest.raises(VMUnavailable, match="helper exited before it was ready"):
        await launcher.launch(argv(EXITS), what="helper", deadline=10)


async def test_launch_of_a_missing_program() -> None:
    with pytest.raises(VMUnavailable, match="cannot start helper"):
        await launcher.launch(["/nonexistent/program"], what="helper", deadline=10)


async def test_terminate_escalates_to_sigkill() -> None:
    ref = await launcher.launch(argv(STUBBORN), what="helper", deadline=10)
    began = time.monotonic()
    await launcher.terminate(ref, grace=0.3)
    assert not launcher.is_alive(ref)
    assert time.monotonic() - began < 5


async def test_wait_exit_sees_the_death() -> None:
    ref = await launcher.launch(argv(READY), what="helper", deadline=10)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(launcher.wait_exit, ref)
            await anyio.sleep(0.1)
            launcher.signal_process(ref, 9)
    assert not launcher.is_alive(ref)


async def test_a_reused_pid_is_never_signalled() -> None:
    ref = await launcher.launch(argv(READY), what="helper", deadline=10)
    try:
        impostor = ProcessRef(pid=ref.pid, start_time=ref.start_time + 1)
        assert not launcher.is_alive(impostor)
        assert launcher.signal_process(impostor, 9) is False
        assert launcher.is_alive(ref)
        with anyio.fail_after(1):
            await launcher.wait_exit(impostor)  # returns at once: not that process
    finally:
        await launcher.terminate(ref)
