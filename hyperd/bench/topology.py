"""Where a run lives: one short temporary directory, and the sims and proxies started in it.

Socket paths stay short (``/tmp/hb-XXXXXXXX/<name>.sock``): AF_UNIX paths must be < 108 bytes.
Every process goes through :class:`~hyperd.bench.procs.Processes`, so the runner's ``finally``
stops all of them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from hyperd.bench.procs import Processes, python_argv
from hyperd.bench.profile import Profiler
from hyperd.host.mountsys import MNT_DETACH, MountError, read_mountinfo, umount

HELPER_LOG_LEVEL: Final = os.environ.get("HYPERD_BENCH_HELPER_LOG_LEVEL", "error")
"""Log level of every helper (``$HYPERD_BENCH_HELPER_LOG_LEVEL``, for debugging)."""
WORKDIR_PREFIX: Final = "hb-"


@dataclass(frozen=True)
class SimVM:
    """A running ``hyperd-sim``: its ctl and tty sockets and shared directory."""

    name: str
    ctl: str
    tty: str
    share: str


class Workspace:
    """A temporary directory and the helper processes of one run (see module docstring)."""

    def __init__(self, base: str | None = None, profiler: Profiler | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX, dir=base or "/tmp"))
        self.profiler = profiler
        self.procs = Processes(on_start=self._profile if profiler is not None else None)
        self._names: set[str] = set()

    def _profile(self, proc: subprocess.Popen[bytes], argv: Sequence[str]) -> None:
        assert self.profiler is not None
        module = argv[2] if len(argv) > 2 and argv[1] == "-m" else os.path.basename(argv[0])
        # the daemon starts per-pod proxies and VMs: sample them with it
        self.profiler.attach(proc.pid, module, subprocesses=module == "hyperd")

    def path(self, name: str) -> str:
        return str(self.root / name)

    def unique(self, name: str) -> str:
        """``name``, or ``name-2``, ``name-3``… when it was taken in this run."""
        candidate, n = name, 1
        while candidate in self._names:
            n += 1
            candidate = f"{name}-{n}"
        self._names.add(candidate)
        return candidate

    def start_sim(self, name: str, share: str | None = None) -> SimVM:
        """Start a simulated VM (CC dialect) listening on ``<name>.ctl`` / ``<name>.tty``."""
        return self.start_sims([name], [share])[0]

    def start_sims(
        self, names: Sequence[str], shares: Sequence[str | None] | None = None
    ) -> list[SimVM]:
        """Start several simulated VMs at once (in parallel) and wait until all listen."""
        vms, argvs = [], []
        for i, wanted in enumerate(names):
            name = self.unique(wanted)
            share_dir = (shares[i] if shares else None) or self.path(f"{name}.share")
            os.makedirs(share_dir, exist_ok=True)
            vm = SimVM(name, self.path(f"{name}.ctl"), self.path(f"{name}.tty"), share_dir)
            vms.append(vm)
            argvs.append(
                [
                    *python_argv("hyperd.sim"),
                    "--ctl",
                    vm.ctl,
                    "--tty",
                    vm.tty,
                    "--share",
                    share_dir,
                    "--log-level",
                    HELPER_LOG_LEVEL.upper(),
                ]
            )
        self.procs.spawn_many(argvs, what="hyperd-sim")
        return vms

    def start_proxy(self, name: str, *extra: str) -> str:
        """Start ``hyperd-proxy`` in system mode; returns its socket path."""
        name = self.unique(name)
        sock = self.path(f"{name}.sock")
        argv = [
            *python_argv("hyperd.proxy"),
            "--socket",
            sock,
            "--log-level",
            HELPER_LOG_LEVEL,
            *extra,
        ]
        self.procs.spawn(argv, what=f"hyperd-proxy {name}")
        return sock

    def unmount_all(self) -> None:
        """Detach every mount left below the directory, deepest first."""
        prefix = str(self.root) + "/"
        points = [m.mount_point for m in read_mountinfo() if m.mount_point.startswith(prefix)]
        for point in reversed(points):
            try:
                umount(point, MNT_DETACH)
            except MountError:
                pass

    def close(self) -> None:
        """Stop every helper, detach leftover mounts and remove the directory.

        The directory is only removed when no mount is left below it (removing files through a
        bind mount would delete its source).
        """
        try:
            self.procs.stop_all()
        finally:
            self.unmount_all()
            prefix = str(self.root) + "/"
            if not any(m.mount_point.startswith(prefix) for m in read_mountinfo()):
                shutil.rmtree(self.root, ignore_errors=True)
