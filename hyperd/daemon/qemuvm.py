"""The daemon's side of the qemu backend: start a pod's VM, and stop it gracefully.

:func:`start_vm` merges ``[vm.qemu]`` with the pod's ``vm`` spec, checks that QEMU and the guest
image are there (naming how to get them), chooses the accelerator, binds the pod's sockets, starts
QEMU (in the pod's netns with a tap when it has one) and returns once QMP answers. The VM is a
:class:`~hyperd.daemon.model.ProcessRef` like the simulated VM: watched, stopped with the pod,
re-adopted after a restart. :func:`stop_vm` waits for the guest's own poweroff after DESTROYPOD,
then asks over QMP (``system_powerdown``, then ``quit``); the caller signals what is left.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket

import anyio

from hyperd.config import Config
from hyperd.daemon import launcher
from hyperd.daemon.model import PodRecord, PodState, ProcessRef, VMSpec
from hyperd.errors import HyperdError, InvalidParams, VMUnavailable
from hyperd.image.build import default_cache_dir, image_paths
from hyperd.vm import qemunet
from hyperd.vm.qemu import (
    POWEROFF_GRACE,
    QMP,
    QemuError,
    QemuLaunch,
    choose_accel,
    listen,
    log_tail,
    paths,
    qemu_argv,
    shut_down,
    spawn_argv,
)

__all__ = ["check_qemu_spec", "explain_failure", "start_vm", "stop_vm"]

CONSOLE_TAIL_LINES = 5  # guest console lines quoted when a VM died while starting

log = logging.getLogger(__name__)


def _image_file(configured: str, default: str, what: str) -> str:
    path = configured or default
    if not os.path.isfile(path):
        how = (
            "build the image with: hyperd image build"
            if not configured
            else f"fix [vm.qemu] {what} or the pod's vm.{what}"
        )
        raise VMUnavailable(f"guest {what} {path} not found: {how}")
    return path


async def start_vm(
    pod: PodRecord, config: Config, *, deadline: float, marker: str | None = None
) -> ProcessRef:
    """Start the pod's QEMU and wait until its monitor answers; sets ``pod.vm_accel``.
    ``marker``: the launch intent's marker, in QEMU's environment (intent first, as every helper).

    Raises ``VMUnavailable`` naming what is missing or why QEMU did not start.
    """
    q, v = config.vm.qemu, pod.vm
    binary = shutil.which(q.binary)
    if binary is None:
        raise VMUnavailable(
            f"QEMU binary {q.binary!r} not found: install qemu-system-x86 or set [vm.qemu] binary"
        )
    default_kernel, default_initrd = image_paths(default_cache_dir())
    kernel = _image_file(v.kernel or q.kernel, str(default_kernel), "kernel")
    initrd = _image_file(v.initrd or q.initrd, str(default_initrd), "initrd")
    accel, why = await choose_accel(binary, kernel, v.accel or q.accel)
    pod.vm_accel = f"{accel} ({why})"
    log.info("VM accelerator: %s", pod.vm_accel, extra={"pod": pod.id})
    tap = mac = None
    if pod.netns:
        tap, mac = await qemunet.setup(pod.netns)
    try:
        return await _launch(pod, config, binary, kernel, initrd, accel, tap, mac, deadline, marker)
    except BaseException:
        if pod.netns:  # the tap and redirects of a VM that did not start
            with anyio.CancelScope(shield=True):
                await qemunet.teardown(pod.netns)
        raise


async def _launch(
    pod: PodRecord,
    config: Config,
    binary: str,
    kernel: str,
    initrd: str,
    accel: str,
    tap: str | None,
    mac: str | None,
    deadline: float,
    marker: str | None,
) -> ProcessRef:
    q, v = config.vm.qemu, pod.vm
    p = paths(pod.run_dir)
    launch = QemuLaunch(
        binary=binary,
        kernel=kernel,
        initrd=initrd,
        memory_mib=v.memory_mib or q.memory_mib,
        cpus=v.cpus or q.cpus,
        accel=accel,
        kernel_args=v.kernel_args if v.kernel_args is not None else q.kernel_args,
        machine=q.machine,
        share_dir=pod.share_dir,
        share_tag=pod.share_tag,
        run_dir=pod.run_dir,
        dialect=v.dialect,
        netns=pod.netns,
        tap=tap,
        mac=mac,
    )
    listeners: dict[str, socket.socket] = {}
    try:
        for name in ("ctl", "tty", "qmp"):
            listeners[name] = listen(p[name])
        fds = {name: s.fileno() for name, s in listeners.items()}
        proc = spawn_argv(qemu_argv(launch, fds), fds, p["log"], launcher.environment(marker))
    except OSError as exc:
        raise VMUnavailable(f"cannot start QEMU: {exc}") from None
    finally:
        for s in listeners.values():
            s.close()  # QEMU holds its own copies
    ref = launcher.track(proc, f"QEMU of pod {pod.id!r}")
    try:
        with anyio.fail_after(deadline):
            async with QMP(p["qmp"]) as qmp:
                await qmp.execute("query-status")
    except (TimeoutError, OSError, QemuError, anyio.EndOfStream, ValueError) as exc:
        await launcher.terminate(ref)
        detail = log_tail(pod.run_dir) or str(exc) or type(exc).__name__
        raise VMUnavailable(f"QEMU of pod {pod.id!r} did not start: {detail}") from None
    return ref


def explain_failure(pod: PodRecord, exc: HyperdError) -> HyperdError:
    """``exc`` of a failed start, with why QEMU exited (its log, the guest console's end)."""
    ref = pod.vm_process
    if ref is None or launcher.is_alive(ref):
        return exc
    p = paths(pod.run_dir)
    try:
        with open(p["console"], errors="replace") as f:
            console = " / ".join(f.read().strip().splitlines()[-CONSOLE_TAIL_LINES:])
    except OSError:
        console = ""
    detail = log_tail(pod.run_dir) or "no message"
    return VMUnavailable(
        f"{exc}; QEMU exited ({detail}); guest console: {console or 'empty'}", pod=pod.id
    )


async def stop_vm(pod: PodRecord, ref: ProcessRef) -> None:
    """Stop the pod's QEMU gracefully (see :func:`hyperd.vm.qemu.shut_down`)."""
    if launcher.is_alive(ref):
        # after DESTROYPOD (pod.stop of a running pod) the guest powers itself off
        grace = POWEROFF_GRACE if pod.state == PodState.RUNNING else 0.0
        how = await shut_down(pod.run_dir, lambda: launcher.wait_exit(ref), grace)
        log.info("VM stopped (%s)", how or "still running: signalled", extra={"pod": pod.id})
    if pod.netns:
        with contextlib.suppress(OSError):
            await qemunet.teardown(pod.netns)


MAX_MEMORY_MIB = 1 << 20
MAX_CPUS = 255


def check_qemu_spec(pod_id: str, vm: VMSpec) -> None:
    """Refuse a ``pod.create`` qemu spec with out-of-range or relative values."""
    if vm.memory_mib is not None and not 64 <= vm.memory_mib <= MAX_MEMORY_MIB:
        raise InvalidParams(
            f"pod {pod_id!r}: vm.memory_mib must be 64..{MAX_MEMORY_MIB}", field="vm.memory_mib"
        )
    if vm.cpus is not None and not 1 <= vm.cpus <= MAX_CPUS:
        raise InvalidParams(f"pod {pod_id!r}: vm.cpus must be 1..{MAX_CPUS}", field="vm.cpus")
    for name in ("kernel", "initrd"):
        path = getattr(vm, name)
        if path is not None and (not path.startswith("/") or "\x00" in path):
            raise InvalidParams(
                f"pod {pod_id!r}: vm.{name} must be an absolute path", field=f"vm.{name}"
            )
    if vm.kernel_args is not None and ("\x00" in vm.kernel_args or "\n" in vm.kernel_args):
        raise InvalidParams(f"pod {pod_id!r}: invalid vm.kernel_args", field="vm.kernel_args")
