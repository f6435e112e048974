"""A ``hyperd serve`` process for the daemon scenarios, and what they share.

The daemon runs from a base directory inside the run's workspace, with ``--stop-pods-on-exit``
(its pods' helper processes go with it) and reports readiness through ``$NOTIFY_SOCKET``
(``READY=1``), as under systemd: no polling. Its RSS is read from ``/proc/<pid>/status``.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from hyperd.bench import wire
from hyperd.bench.procs import READY_TIMEOUT, HelperError, python_argv
from hyperd.bench.topology import HELPER_LOG_LEVEL, Workspace
from hyperd.cli.rootfs import build_busybox_rootfs
from hyperd.notify import ReadyListener

KILL_SIGNAL_NAME: Final = "CONT"
"""The signal the latency scenarios send with ``container.kill``: harmless to a sleeping init."""
SLEEP_ARGS: Final = ["sleep", "100000"]


@dataclass
class Daemon:
    """A running ``hyperd serve``."""

    proc: subprocess.Popen[bytes]
    socket: str
    base: str

    def rss_kib(self) -> int:
        """Resident set size of the daemon process, KiB (``VmRSS``)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise HelperError("hyperd has no VmRSS (exited?)")


def start_daemon(
    ws: Workspace, name: str = "hyperd", *, stop_pods: bool = True, base: str | None = None
) -> Daemon:
    """Start ``hyperd serve`` with its own base dir (or ``base``: a restart) and wait for
    READY=1.

    ``stop_pods``: ``--stop-pods-on-exit`` (pods whose helpers the daemon started must go with
    it; pods on external VMs and a system proxy are left for the runner to tear down).
    """
    base = base or ws.path(ws.unique(name))
    os.makedirs(base, exist_ok=True)
    with ReadyListener(ws.root) as ready:
        argv = [
            *python_argv("hyperd"),
            "serve",
            "--base-dir",
            base,
            "--log-level",
            HELPER_LOG_LEVEL,
        ]
        if stop_pods:
            argv.append("--stop-pods-on-exit")
        proc = ws.procs.spawn(argv, what="hyperd", ready=False, env={"NOTIFY_SOCKET": ready.path})
        if not ready.wait(READY_TIMEOUT, alive=lambda: proc.poll() is None):
            ws.procs.stop(proc)
            raise HelperError(f"hyperd did not report READY=1 (exit status {proc.returncode})")
    return Daemon(proc, os.path.join(base, "hyperd.sock"), base)


def busybox_rootfs(ws: Workspace) -> str:
    """A static busybox rootfs for containers (built once per workspace)."""
    root = Path(ws.path("rootfs"))
    if not (root / "bin" / "busybox").exists():
        build_busybox_rootfs(root)
    return str(root)


@dataclass
class RunningContainer:
    """A container started through hyperd, its shim holding the token's I/O session."""

    pod: str
    id: str
    shim: wire.ShimWire


async def start_container(
    rpc: wire.RpcWire, pod: str, cid: str, rootfs: str, args: list[str] | None = None
) -> RunningContainer:
    """container.create, ConnectShim with the token, container.start."""
    created: dict[str, Any] = await rpc.call(
        "container.create",
        {
            "pod": pod,
            "id": cid,
            "rootfs": {"path": rootfs},
            "process": {"args": args or SLEEP_ARGS},
        },
    )
    shim = await wire.ShimWire.connect(wire.unix_path(created["proxy_url"]), created["token"])
    try:
        await rpc.call("container.start", {"pod": pod, "id": cid})
    except BaseException:
        shim.close()
        raise
    return RunningContainer(pod, cid, shim)
