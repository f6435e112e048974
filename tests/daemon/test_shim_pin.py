"""shim_pid pinning with real processes: who may name a pid, and signals through the pidfd."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator

import pytest

from hyperd import procs
from hyperd.daemon.exits import pin_shim, repin_shim
from hyperd.daemon.model import ContainerRecord
from hyperd.errors import InvalidParams
from hyperd.spec import ProcessSpec, RootfsSpec

NOBODY = 65534
DEADLINE = 30.0  # a sleep process ending after SIGTERM on a busy machine


@pytest.fixture
def root_sleep() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "1000"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_root_may_pin_any_process_and_signals_go_through_the_pidfd(
    root_sleep: subprocess.Popen[bytes],
) -> None:
    pin = pin_shim(root_sleep.pid, caller_uid=0)
    try:
        assert pin.start_time == procs.start_time(root_sleep.pid)
        pin.send_signal(signal.SIGTERM)
        assert root_sleep.wait(DEADLINE) == -signal.SIGTERM
        # reaped: whatever now has that pid, the pidfd names the dead process
        with pytest.raises(ProcessLookupError):
            pin.send_signal(signal.SIGTERM)
    finally:
        pin.close()


def test_a_process_of_another_user_is_refused(root_sleep: subprocess.Popen[bytes]) -> None:
    with pytest.raises(InvalidParams) as err:
        pin_shim(root_sleep.pid, caller_uid=NOBODY)
    assert err.value.data == {"field": "shim_pid"}
    assert f"not a process of the caller (uid {NOBODY})" in err.value.message


@pytest.mark.root
def test_the_callers_own_process_is_accepted() -> None:
    own = subprocess.Popen(["sleep", "1000"], user=NOBODY, group=NOBODY, extra_groups=[])
    try:
        pin_shim(own.pid, caller_uid=NOBODY).close()
    finally:
        own.kill()
        own.wait()


@pytest.mark.parametrize("pid", [0, -1, 2**22 + 1])
def test_no_such_process(pid: int) -> None:
    with pytest.raises(InvalidParams, match="shim_pid"):
        pin_shim(pid, caller_uid=0)


def test_repin_refuses_a_recycled_pid(root_sleep: subprocess.Popen[bytes]) -> None:
    record = ContainerRecord(
        id="c",
        rootfs=RootfsSpec(path="/"),
        process=ProcessSpec(args=["x"]),
        token="t",
        shim_pid=root_sleep.pid,
        shim_start_time=procs.start_time(root_sleep.pid),
    )
    pin = repin_shim(record)
    assert pin is not None
    pin.close()
    # another start time: the pid now names some other process
    record.shim_start_time = (record.shim_start_time or 0) + 1
    assert repin_shim(record) is None
