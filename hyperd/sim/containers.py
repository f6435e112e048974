"""The simulated agent's bookkeeping: containers, their processes, and the stdio seqs in use."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from hyperd.sim.process import SimProcess, kill_group_quietly
from hyperd.sim.rootfs import BindMount

__all__ = ["ContainerRecord", "ProcessRecord", "Registry"]


@dataclass(eq=False)
class ProcessRecord:
    """One process of a container, as the host named it (id, seqs)."""

    container: str
    id: str
    stdio: int
    stderr: int
    terminal: bool
    explicit_id: bool  # the host sent process.id (hyperhq crashes on EXECCMD otherwise)
    proc: SimProcess | None = None  # None: the exec failed (hyper reports it like a process)
    status: int | None = None  # set once it has exited
    eof_sent: anyio.Event = field(default_factory=anyio.Event)
    finished: anyio.Event = field(default_factory=anyio.Event)  # EOF and status sent

    @property
    def running(self) -> bool:
        return self.status is None

    @property
    def pid(self) -> int | None:
        """The program's host pid (for ps and logs; below an isolated init, its PID 2)."""
        return self.proc.main_pid if self.proc is not None else None


@dataclass(eq=False)
class ContainerRecord:
    """A container: its root on the host, its init and every process started in it."""

    id: str
    root: Path
    init: ProcessRecord
    processes: dict[str, ProcessRecord] = field(default_factory=dict)
    pgids: set[int] = field(default_factory=set)  # process groups started in it, live or not
    dying: bool = False  # its init has exited: every other process is being killed
    binds: tuple[BindMount, ...] = ()  # its fsmap, mounted into each of its processes

    @property
    def running(self) -> bool:
        return self.init.running

    def on_init_exit(self) -> None:
        """The init has exited: the container dies (called before its output is drained)."""
        self.dying = True
        self.kill_all()

    def kill_all(self) -> None:
        """SIGKILL every process group started in the container (its pid namespace dies)."""
        for pgid in self.pgids:
            kill_group_quietly(pgid)

    def live(self) -> list[ProcessRecord]:
        """Processes that have not finished, init first."""
        return [p for p in self.processes.values() if p.running]


class Registry:
    """Containers by id and live processes by stdio seq (seqs are unique among live processes)."""

    def __init__(self) -> None:
        self.containers: dict[str, ContainerRecord] = {}
        self._by_seq: dict[int, ProcessRecord] = {}

    def seq_in_use(self, *seqs: int) -> int | None:
        """The first of ``seqs`` (non-zero) a live process already uses, or None."""
        used = {p.stdio for p in self._by_seq.values()} | {p.stderr for p in self._by_seq.values()}
        for seq in seqs:
            if seq and seq in used:
                return seq
        return None

    def register(self, rec: ProcessRecord) -> None:
        self._by_seq[rec.stdio] = rec

    def unregister(self, rec: ProcessRecord) -> None:
        if self._by_seq.get(rec.stdio) is rec:
            del self._by_seq[rec.stdio]

    def by_seq(self, seq: int) -> ProcessRecord | None:
        return self._by_seq.get(seq)

    def all_processes(self) -> Iterator[ProcessRecord]:
        """Every process still registered (running or finishing)."""
        yield from list(self._by_seq.values())

    def find_process(self, container: str, process: str) -> ProcessRecord | None:
        c = self.containers.get(container)
        return c.processes.get(process) if c is not None else None
