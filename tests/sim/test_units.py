"""Pure parts of hyperd-sim: NEXT accounting, fault plan, recorder, ps table, identities."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from hyperd.sim.faults import Action, FaultPlan, Recorder
from hyperd.sim.process import exit_status
from hyperd.sim.ps import ProcInfo, container_pids, format_json, format_table
from hyperd.sim.rootfs import (
    Identity,
    IdentityError,
    RootfsError,
    container_root,
    resolve_identity,
)
from hyperd.sim.server import ReadSplitter
from protocol.hyperstart import encode_ctl

PING = encode_ctl(12)
STARTPOD = encode_ctl(1, b'{"hostname":"x"}')


@pytest.mark.parametrize(
    ("chunks", "reads"),
    [
        ([PING], [8]),
        ([STARTPOD], [8, 16]),
        ([PING + PING + PING], [8, 8, 8]),
        ([STARTPOD + PING], [8, 16, 8]),
        ([STARTPOD[:18], STARTPOD[18:]], [8, 10, 6]),
        ([STARTPOD[:3], STARTPOD[3:]], [3, 5, 16]),
        ([STARTPOD + PING[:4], PING[4:]], [8, 16, 4, 4]),
        ([encode_ctl(1, b"x" * 3363)], [8, 3363]),
    ],
)
def test_read_splitter_cuts_like_hyperstart_reads(chunks: list[bytes], reads: list[int]) -> None:
    splitter = ReadSplitter()
    pieces = [p for chunk in chunks for p in splitter.split(chunk)]
    assert [len(p) for p in pieces] == reads
    assert b"".join(pieces) == b"".join(chunks)


def test_read_splitter_byte_by_byte() -> None:
    splitter = ReadSplitter()
    pieces = [p for b in STARTPOD + PING for p in splitter.split(bytes([b]))]
    assert len(pieces) == len(STARTPOD + PING)


def test_fault_plan_numbers_commands_from_one() -> None:
    plan = FaultPlan(silent_after=2, garbage_after=1)
    assert [plan.next_command() for _ in range(3)] == [Action.REPLY, Action.GARBAGE, Action.SILENT]
    assert plan.silent
    crash = FaultPlan(crash_after=0, silent_after=0)
    assert crash.next_command() is Action.CRASH
    assert [FaultPlan().next_command() for _ in range(5)] == [Action.REPLY] * 5


def test_recorder_lines(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    rec = Recorder(path)
    rec.record(12, "ping", b"")
    rec.record(1, "startpod", b'{"hostname":"p"}')
    rec.record(15, "writefile", b'{"file":"x"}raw')
    rec.close()
    lines = [msgspec.json.decode(x) for x in path.read_bytes().splitlines()]
    assert lines == [
        {"code": 12, "name": "ping", "payload": None},
        {"code": 1, "name": "startpod", "payload": {"hostname": "p"}},
        {"code": 15, "name": "writefile", "payload": None},
    ]
    Recorder(None).record(1, "x", b"{}")  # no file: nothing happens


def test_exit_status() -> None:
    assert exit_status(3, signal_status_zero=False) == 3
    assert exit_status(-15, signal_status_zero=False) == 143
    assert exit_status(-9, signal_status_zero=True) == 0


def test_ps_of_this_process() -> None:
    procs = container_pids([os.getpid()])
    assert procs[0].pid == os.getpid()
    table = format_table(procs).decode().splitlines()
    assert table[0].split() == ["UID", "PID", "PPID", "STAT", "TIME", "CMD"]
    assert table[1].split()[1] == str(os.getpid())
    assert format_json([ProcInfo(7, 1, 0, "S", 0, "x"), ProcInfo(9, 7, 0, "R", 0, "y")]) == b"[7,9]"
    assert container_pids([2**22 + 12345]) == []


def test_identities(busybox_rootfs: Path) -> None:
    assert resolve_identity(busybox_rootfs, "", "", None) == Identity(0, 0, ())
    assert resolve_identity(busybox_rootfs, "nobody", "", ["root"]) == Identity(65534, 65534, (0,))
    assert resolve_identity(busybox_rootfs, "1000", "", None) == Identity(1000, 0, ())
    assert resolve_identity(busybox_rootfs, "nobody:root", "", None) == Identity(65534, 0, ())
    assert resolve_identity(busybox_rootfs, "0", "nogroup", ["7"]) == Identity(0, 65534, (7,))
    with pytest.raises(IdentityError, match="ghost"):
        resolve_identity(busybox_rootfs, "ghost", "", None)
    with pytest.raises(IdentityError, match="ghosts"):
        resolve_identity(busybox_rootfs, "", "ghosts", None)


def test_container_root(tmp_path: Path) -> None:
    (tmp_path / "c1" / "rootfs").mkdir(parents=True)
    assert container_root(tmp_path, "c1", "rootfs") == tmp_path / "c1" / "rootfs"
    for image, rootfs in (("c2", "rootfs"), ("..", "rootfs"), ("c1", "../../.."), ("", "x")):
        with pytest.raises(RootfsError):
            container_root(tmp_path, image, rootfs)
