"""A ps-like process table of a simulated container, read from /proc.

A container's processes are the processes the simulator started for it and all their
descendants (found through the parent pid in ``/proc/<pid>/stat``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import msgspec

__all__ = ["ProcInfo", "container_pids", "format_json", "format_table", "read_proc"]

_CLK_TCK = os.sysconf("SC_CLK_TCK")  # clock ticks per second for utime/stime
_STAT_STATE, _STAT_PPID, _STAT_UTIME, _STAT_STIME = 0, 1, 11, 12  # fields after "comm)"
TABLE_HEADER = ("UID", "PID", "PPID", "STAT", "TIME", "CMD")
SECONDS_PER_HOUR = 3600
SECONDS_PER_MINUTE = 60


@dataclass(frozen=True, slots=True)
class ProcInfo:
    """What the table shows about one process."""

    pid: int
    ppid: int
    uid: int
    state: str
    cpu_seconds: int
    command: str


def read_proc(pid: int) -> ProcInfo | None:
    """Read ``/proc/<pid>``; None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/status", "rb") as f:
            status = f.read()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except OSError:
        return None
    open_paren, close_paren = stat.find(b"("), stat.rfind(b")")
    comm = stat[open_paren + 1 : close_paren].decode(errors="replace")
    fields = stat[close_paren + 2 :].split()
    uid = 0
    for line in status.splitlines():
        if line.startswith(b"Uid:"):
            uid = int(line.split()[1])
    ticks = int(fields[_STAT_UTIME]) + int(fields[_STAT_STIME])
    args = [a.decode(errors="replace") for a in cmdline.split(b"\0") if a]
    return ProcInfo(
        pid=pid,
        ppid=int(fields[_STAT_PPID]),
        uid=uid,
        state=fields[_STAT_STATE].decode(),
        cpu_seconds=ticks // _CLK_TCK,
        command=" ".join(args) if args else f"[{comm}]",
    )


def _all_procs() -> dict[int, ProcInfo]:
    procs: dict[int, ProcInfo] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            info = read_proc(int(name))
            if info is not None:
                procs[info.pid] = info
    return procs


def container_pids(roots: Iterable[int]) -> list[ProcInfo]:
    """The processes ``roots`` and all their live descendants, in pid order."""
    procs = _all_procs()
    children: dict[int, list[int]] = {}
    for info in procs.values():
        children.setdefault(info.ppid, []).append(info.pid)
    found: set[int] = set()
    todo = [pid for pid in roots if pid in procs]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return [procs[pid] for pid in sorted(found)]


def _cpu_time(seconds: int) -> str:
    hours, rest = divmod(seconds, SECONDS_PER_HOUR)
    return f"{hours:02d}:{rest // SECONDS_PER_MINUTE:02d}:{rest % SECONDS_PER_MINUTE:02d}"


def format_table(procs: Iterable[ProcInfo]) -> bytes:
    """A ``ps -ef``-like table: a header line, then one line per process, each ending in \\n."""
    rows = [TABLE_HEADER] + [
        (str(p.uid), str(p.pid), str(p.ppid), p.state, _cpu_time(p.cpu_seconds), p.command)
        for p in procs
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEADER) - 1)]
    lines = [
        " ".join(cell.rjust(w) for cell, w in zip(row[:-1], widths, strict=True)) + " " + row[-1]
        for row in rows
    ]
    return "".join(line + "\n" for line in lines).encode()


def format_json(procs: Iterable[ProcInfo]) -> bytes:
    """The container's pids as a JSON array (cc-agent's ``format: "json"``)."""
    return msgspec.json.encode([p.pid for p in procs])
