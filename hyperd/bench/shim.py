"""Scenario 6: ``ctr run --rm IMAGE ID true`` through containerd-shim-hyperd-v2 against
containerd's own runc shim (``io.containerd.runc.v2``), on the same image, the same private
containerd, in the same run; and the memory of one shim per pod.

Every run is a whole container life as containerd drives it: the ``start`` action, Create (a new
hyperd pod: simulated VM and proxy started, the rootfs mounted), Start, Wait, Delete, Shutdown,
and the ``delete`` action. The two runtimes alternate run by run, so load on the machine hits
both alike. Needs root and Debian's containerd, ctr and runc; without them the scenario reports
that and measures nothing.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import anyio

from hyperd.bench.daemon import busybox_rootfs, start_daemon
from hyperd.bench.stats import Section, percentile
from hyperd.bench.topology import Workspace
from hyperd.shim.ociimage import build_image
from hyperd.shim.testbed import RUNTIME, PrivateContainerd

IMAGE: Final = "docker.io/library/hdbench:1"
RUNC: Final = "io.containerd.runc.v2"


@dataclass(frozen=True)
class ShimSettings:
    runs: int = 20  # ctr run --rm per runtime (p50 and p99 of these)
    warmup: int = 1  # runs per runtime not counted (page cache, first snapshot)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"process {pid} has no VmRSS")


def _shim_pid(ctd: PrivateContainerd, cid: str) -> int:
    """The shim daemon started for task ``cid`` (its argv has ``-id cid`` and our socket)."""
    want = (b"-id", cid.encode())
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        pairs = set(itertools.pairwise(argv))
        if want in pairs and ctd.socket.encode() in argv and b"start" not in argv:
            return int(entry.name)
    raise RuntimeError(f"no shim process for task {cid}")


def _missing() -> list[str]:
    missing = [t for t in ("containerd", "ctr", "runc") if shutil.which(t) is None]
    if os.geteuid() != 0:
        missing.append("root")
    return missing


def _run_once(ctd: PrivateContainerd, runtime: str, cid: str) -> float:
    started = time.perf_counter()
    ctd.ctr("run", "--rm", "--fifo-dir", str(ctd.dir / "fifo"), "--runtime", runtime,
            IMAGE, cid, "true")  # fmt: skip
    return time.perf_counter() - started


def _measure(ws: Workspace, s: ShimSettings, sec: Section) -> None:
    daemon = start_daemon(ws, "hyperd-shim")
    # a namespace of its own: runc keeps its containers' state in /run/containerd/runc/<ns>
    namespace = f"hdbench-{secrets.token_hex(4)}"
    ctd = PrivateContainerd(Path(ws.path("containerd")), daemon.socket, namespace, log_level="warn")
    try:
        ctd.start()
        rootfs = Path(busybox_rootfs(ws))
        ctd.ctr("image", "import", str(build_image(rootfs, Path(ws.path("image.tar")), IMAGE)))
        times: dict[str, list[float]] = {RUNTIME: [], RUNC: []}
        for i in range(s.warmup + s.runs):
            for runtime, tag in ((RUNTIME, "h"), (RUNC, "r")):
                elapsed = _run_once(ctd, runtime, f"b{tag}{i}")
                if i >= s.warmup:
                    times[runtime].append(elapsed * 1000)
        for runtime, label in ((RUNTIME, "hyperd shim"), (RUNC, "runc shim")):
            key = "hyperd" if runtime == RUNTIME else "runc"
            for q in (50, 99):
                sec.add(f"{key}-p{q}", f"{label}: ctr run --rm true, p{q}", "ms",
                        percentile(times[runtime], q))  # fmt: skip
        sec.ratio("hyperd / runc, p50 wall time", "hyperd-p50", "runc-p50")
        sec.ratio("hyperd / runc, p99 wall time", "hyperd-p99", "runc-p99")
        # memory of one pod's shim: a detached task per runtime
        ctd.ctr("run", "-d", "--fifo-dir", str(ctd.dir / "fifo"), "--runtime", RUNTIME,
                IMAGE, "rss-h", "sleep", "100000")  # fmt: skip
        ctd.ctr("run", "-d", "--fifo-dir", str(ctd.dir / "fifo"), "--runtime", RUNC,
                IMAGE, "rss-r", "sleep", "100000")  # fmt: skip
        for cid, key, label in (("rss-h", "hyperd-rss", "hyperd shim"),
                                ("rss-r", "runc-rss", "runc shim")):  # fmt: skip
            sec.add(key, f"{label}: RSS per pod", "KiB", _rss_kib(_shim_pid(ctd, cid)))
        sec.ratio("hyperd / runc shim RSS", "hyperd-rss", "runc-rss")
        sec.notes.append(
            f"{s.runs} runs per runtime after {s.warmup} warm-up; every hyperd run boots a "
            "pod (hyperd-sim + hyperd-proxy); the hyperd shim's RSS excludes the pod's VM "
            "and proxy processes"
        )
    finally:
        _remove_all(ctd)
        ctd.stop()
        for pid in ctd.shim_pids():  # only left if a run failed half-way
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.rmdir(f"/run/containerd/runc/{namespace}")


def _remove_all(ctd: PrivateContainerd) -> None:
    """Force-delete every task and container of the run's namespace (also after a failure)."""
    if ctd.proc is None or ctd.proc.poll() is not None:
        return
    listed = ctd.ctr("container", "ls", "-q", check=False).stdout.decode().split()
    for cid in listed:
        ctd.ctr("task", "delete", "--force", cid, check=False)
        ctd.ctr("container", "rm", cid, check=False)


async def shim(ws: Workspace, s: ShimSettings) -> Section:
    sec = Section("5. containerd: ctr run --rm true, hyperd shim vs runc shim")
    missing = _missing()
    if missing:
        sec.notes.append(f"not measured: needs {', '.join(missing)} (Debian containerd, runc)")
        return sec
    await anyio.to_thread.run_sync(_measure, ws, s, sec)
    return sec
