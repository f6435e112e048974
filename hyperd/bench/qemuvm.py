"""Scenario 7 (only with ``--only 7``): real VMs with the qemu backend.

Per repetition, measured in the same run:

- **boot to READY**: QEMU started by the runner with the guest image (the qemu backend's own
  command line) until the guest agent's READY arrives on the ctl port; the time a VM needs before
  hyperd can talk to it;
- **pod start**: ``pod.create`` + ``pod.start`` of a ``{"backend": "qemu"}`` pod through a daemon
  (QEMU launch, boot, RegisterVM, STARTPOD);
- **hyperd RSS per VM**: the daemon's RSS growth with the pods running, divided by their count
  (QEMU's own RSS, reported apart, is mostly guest RAM and translation cache).

The accelerator is chosen once, as ``accel = "auto"`` would, and named in the table; pods are
created with it, so the KVM probe's cost is not in the pod start figure. The guest image is
built first if the cache has none (not timed).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from time import perf_counter

import anyio

from hyperd.bench import wire
from hyperd.bench.daemon import start_daemon
from hyperd.bench.stats import Section
from hyperd.bench.topology import Workspace
from hyperd.image import build_image, default_cache_dir
from hyperd.vm.qemu import QemuLaunch, choose_accel, listen, qemu_argv

__all__ = ["QemuSettings", "qemu_boot"]

READY_FRAME = b"\x00\x00\x00\x08\x00\x00\x00\x08"  # ctl READY: code 8, length 8
BOOT_DEADLINE = 300.0  # seconds to READY under TCG on a loaded machine (6-20 s idle)
KIB = 1024


@dataclass(frozen=True)
class QemuSettings:
    vms: int = 2  # pods running at once (hyperd RSS per VM)
    repetitions: int = 2


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def _boot_to_ready(ws: Workspace, binary: str, kernel: str, initrd: str, accel: str) -> float:
    run = ws.path(ws.unique("qemu-boot"))
    share = os.path.join(run, "share")
    os.makedirs(share)
    launch = QemuLaunch(
        binary=binary,
        kernel=kernel,
        initrd=initrd,
        memory_mib=512,
        cpus=1,
        accel=accel,
        kernel_args="",
        machine="q35",
        share_dir=share,
        share_tag="hyperShared",
        run_dir=run,
    )
    listeners = {name: listen(os.path.join(run, f"{name}.sock")) for name in ("ctl", "tty", "qmp")}
    fds = {name: s.fileno() for name, s in listeners.items()}
    started = perf_counter()
    proc = subprocess.Popen(  # noqa: ASYNC220
        qemu_argv(launch, fds),
        pass_fds=tuple(fds.values()),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for s in listeners.values():
        s.close()
    try:
        with anyio.fail_after(BOOT_DEADLINE):
            ctl = await anyio.connect_unix(os.path.join(run, "ctl.sock"))
            tty = await anyio.connect_unix(os.path.join(run, "tty.sock"))
            got = b""
            while len(got) < len(READY_FRAME):
                got += await ctl.receive()
            elapsed = perf_counter() - started
            await ctl.aclose()
            await tty.aclose()
        if not got.startswith(READY_FRAME):
            raise RuntimeError(f"the guest's first ctl frame is not READY: {got[:16]!r}")
        return elapsed
    finally:
        proc.kill()
        proc.wait()


async def qemu_boot(ws: Workspace, s: QemuSettings) -> Section:
    section = Section("5. real VMs (qemu backend)")
    cache = default_cache_dir()
    image = await anyio.to_thread.run_sync(lambda: build_image(cache))
    binary = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
    accel, why = await choose_accel(binary, str(image.kernel), "auto")
    section.notes.append(
        f"accelerator: {accel} ({why}); {os.cpu_count()} host cores; "
        f"initrd {image.initrd_bytes / KIB / KIB:.1f} MiB"
    )
    for _ in range(s.repetitions):
        section.add(
            "boot",
            f"boot to READY ({accel})",
            "s",
            await _boot_to_ready(ws, binary, str(image.kernel), str(image.initrd), accel),
        )
    daemon = start_daemon(ws, "hyperd-qemu")
    try:
        rpc = await wire.RpcWire.open(daemon.socket)
        try:
            for rep in range(s.repetitions):
                before = daemon.rss_kib()
                pods = [f"vm{rep}-{i}" for i in range(s.vms)]
                qemu_rss = []
                for pod in pods:
                    begin = perf_counter()
                    with anyio.fail_after(BOOT_DEADLINE):
                        await rpc.call(
                            "pod.create", {"id": pod, "vm": {"backend": "qemu", "accel": accel}}
                        )
                        started = await rpc.call("pod.start", {"id": pod})
                    section.add("start", f"pod start ({accel})", "s", perf_counter() - begin)
                    qemu_rss.append(_rss_kib(started["vm_pid"]))
                grown = daemon.rss_kib() - before
                section.add("rss", "hyperd RSS per running VM", "KiB", grown / len(pods))
                section.add(
                    "qemu", "QEMU RSS per VM (apart)", "MiB", sum(qemu_rss) / len(qemu_rss) / KIB
                )
                for pod in pods:
                    await rpc.call("pod.stop", {"id": pod})
                    await rpc.call("pod.delete", {"id": pod})
        finally:
            rpc.close()
    finally:
        ws.procs.stop(daemon.proc)
    return section
