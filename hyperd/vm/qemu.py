"""The ``qemu`` VM backend: one ``qemu-system-x86_64`` per pod, launched and stopped by hyperd.

hyperd binds the pod's sockets itself and hands QEMU the listening fds (``fd=`` of a socket
chardev), so they exist before QEMU runs and nothing polls for them:

- ``ctl.sock`` / ``tty.sock``: the virtio-serial ports ``sh.hyper.channel.0`` and ``.1`` (the
  proxy connects to both at once when the VM is registered; the guest agent sends READY when
  both are connected, so nothing it says is lost);
- ``qmp.sock``: QMP, for a graceful ``system_powerdown`` and then ``quit`` (:func:`shut_down`).

The pod's share dir is exported with 9p under the pod's mount tag (passed on the kernel command
line as ``hyperd.share=``), the serial console goes to ``console.log`` and QEMU's own messages to
``qemu.log`` in the pod's run dir. When the pod has a network namespace, QEMU runs in it (via
``nsenter``) with a ``-netdev tap`` (see :mod:`hyperd.vm.qemunet`).

``accel = "auto"`` picks KVM only when a real guest boots with it (:func:`choose_accel`): an
``ioctl`` probe, then a kernel-only boot that must end within :data:`KVM_PROBE_TIMEOUT`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from hyperd.vm.kvm import kvm_usable

__all__ = [
    "KVM_PROBE_TIMEOUT",
    "QMP",
    "QemuError",
    "QemuLaunch",
    "choose_accel",
    "paths",
    "qemu_argv",
    "shut_down",
]

log = logging.getLogger(__name__)

KVM_PROBE_TIMEOUT = 10.0  # seconds a kernel-only KVM boot may take (a working one: < 2 s)
POWEROFF_GRACE = 10.0  # seconds QEMU gets to exit after each step of a graceful stop
QMP_TIMEOUT = 10.0  # seconds for one QMP exchange (QEMU's monitor answers in ms, even under TCG)
QMP_LIMIT = 1 << 20  # longest QMP line read (replies here are a few hundred bytes)
NINEP_MSIZE = 262144  # the guest's 9p msize; QEMU warns about (and is slow with) small ones
# no_timer_check: a TCG guest on a loaded host can fail the IO-APIC timer check and panic (VM
# runtimes pass it for the same reason); the i8042 flags skip probing a keyboard controller
DEFAULT_KERNEL_ARGS = (
    "console=ttyS0 panic=1 quiet cryptomgr.notests no_timer_check "
    "i8042.direct=1 i8042.dumbkbd=1 i8042.nopnp=1 i8042.noaux=1"
)
PORT_NAMES = ("sh.hyper.channel.0", "sh.hyper.channel.1")


class QemuError(Exception):
    """QEMU cannot be started or controlled; the message says why."""


@dataclass(frozen=True)
class QemuLaunch:
    """Everything one VM is started with (config defaults merged with ``pod.create``'s vm)."""

    binary: str
    kernel: str
    initrd: str
    memory_mib: int
    cpus: int
    accel: str  # "kvm" or "tcg": already chosen
    kernel_args: str
    machine: str
    share_dir: str
    share_tag: str
    run_dir: str
    dialect: str | None = None
    netns: str | None = None
    tap: str | None = None
    mac: str | None = None
    extra: list[str] = field(default_factory=list)


def paths(run_dir: str) -> dict[str, str]:
    """The files of a VM in its pod's run dir."""
    return {
        "ctl": os.path.join(run_dir, "ctl.sock"),
        "tty": os.path.join(run_dir, "tty.sock"),
        "qmp": os.path.join(run_dir, "qmp.sock"),
        "console": os.path.join(run_dir, "console.log"),
        "log": os.path.join(run_dir, "qemu.log"),
    }


def qemu_argv(v: QemuLaunch, fds: dict[str, int]) -> list[str]:
    """QEMU's command line; ``fds`` are the listening sockets ``ctl``, ``tty`` and ``qmp``."""
    p = paths(v.run_dir)
    append = f"{DEFAULT_KERNEL_ARGS} hyperd.share={v.share_tag}"
    if v.dialect:
        append += f" hyperd.agent=--dialect,{v.dialect}"
    if v.kernel_args:
        append += " " + v.kernel_args
    argv = [
        v.binary,
        "-accel",
        v.accel,
        "-M",
        v.machine,
        "-cpu",
        "host" if v.accel == "kvm" else "max",  # max: RDRAND, so Python starts at once
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-m",
        str(v.memory_mib),
        "-smp",
        str(v.cpus),
        "-kernel",
        v.kernel,
        "-initrd",
        v.initrd,
        "-append",
        append,
        "-serial",
        f"file:{p['console']}",
        "-chardev",
        f"socket,id=qmp,fd={fds['qmp']},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
        "-device",
        "virtio-serial-pci",
    ]
    for i, (name, port) in enumerate(zip(("ctl", "tty"), PORT_NAMES, strict=True)):
        argv += [
            "-chardev",
            f"socket,id={name},fd={fds[name]},server=on,wait=off",
            "-device",
            f"virtserialport,chardev={name},name={port},id=port{i}",
        ]
    argv += [
        "-fsdev",
        f"local,id=share,path={v.share_dir},security_model=none",
        "-device",
        f"virtio-9p-pci,fsdev=share,mount_tag={v.share_tag}",
    ]
    if v.tap:
        argv += [
            "-netdev",
            f"tap,id=net0,ifname={v.tap},script=no,downscript=no",
            "-device",
            f"virtio-net-pci,netdev=net0,mac={v.mac}",
        ]
    argv += v.extra
    if v.netns:
        nsenter = shutil.which("nsenter") or "nsenter"
        argv = [nsenter, f"--net={v.netns}", "--", *argv]
    return argv


def listen(path: str) -> socket.socket:
    """A unix socket listening at ``path`` (a stale socket file there is replaced), for its
    owner only (0600, set between bind and listen: nobody can connect before): the pod's run
    dir is open to the RPC group, the VM's channels and monitor are hyperd's alone."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(1)
    except OSError:
        sock.close()
        raise
    return sock


def log_tail(run_dir: str, lines: int = 3) -> str:
    """The last lines QEMU wrote to its log (for error messages)."""
    try:
        text = Path(paths(run_dir)["log"]).read_text(errors="replace")
    except OSError:
        return ""
    return " / ".join(text.strip().splitlines()[-lines:])


# -- accelerator ----------------------------------------------------------------------------------

_accel_cache: dict[tuple[str, str], tuple[str, str]] = {}


async def choose_accel(binary: str, kernel: str, wanted: str) -> tuple[str, str]:
    """The accelerator to use for ``wanted`` ("auto", "kvm", "tcg") and why.

    "auto" gives "kvm" only when a kernel-only guest boots under KVM and ends (panics with no
    root, reboots, and QEMU exits under ``-no-reboot``) within :data:`KVM_PROBE_TIMEOUT`; the
    answer is cached per binary and kernel for the daemon's life.
    """
    if wanted in ("kvm", "tcg"):
        return wanted, "asked for"
    key = (binary, kernel)
    if key not in _accel_cache:
        ok, why = await anyio.to_thread.run_sync(kvm_usable)
        if ok:
            ok, why = await _boot_probe(binary, kernel)
        _accel_cache[key] = ("kvm", "KVM runs a test guest") if ok else ("tcg", why)
    return _accel_cache[key]


async def _boot_probe(binary: str, kernel: str) -> tuple[bool, str]:
    argv = [
        binary,
        "-accel",
        "kvm",
        "-M",
        "q35",
        "-cpu",
        "host",
        "-m",
        "128",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-kernel",
        kernel,
        "-append",
        "panic=-1 quiet root=/dev/nonexistent",
    ]
    try:
        with anyio.fail_after(KVM_PROBE_TIMEOUT):
            done = await anyio.run_process(argv, check=False)
    except TimeoutError:
        return False, f"a KVM guest did not boot within {KVM_PROBE_TIMEOUT:g} s"
    except OSError as exc:
        return False, f"cannot run {binary}: {exc}"
    if done.returncode != 0:
        return False, f"QEMU with KVM failed: {done.stderr.decode(errors='replace').strip()}"
    return True, ""


# -- QMP ------------------------------------------------------------------------------------------


class QMP:
    """A minimal QMP client: ``async with QMP(path) as qmp: await qmp.execute("quit")``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stream: anyio.abc.SocketStream | None = None
        self._buffer = b""

    async def __aenter__(self) -> QMP:
        with anyio.fail_after(QMP_TIMEOUT):
            self._stream = await anyio.connect_unix(self.path)
            await self._read_message()  # the greeting
            await self.execute("qmp_capabilities")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._stream is not None:
            await self._stream.aclose()

    async def _read_message(self) -> dict[str, Any]:
        assert self._stream is not None
        while b"\n" not in self._buffer:
            if len(self._buffer) > QMP_LIMIT:
                raise QemuError("QMP: line too long")
            chunk = await self._stream.receive()
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        return message

    async def execute(self, command: str, **arguments: Any) -> Any:
        """Run ``command``; returns its ``return`` value, raises ``QemuError`` for an error."""
        assert self._stream is not None
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        with anyio.fail_after(QMP_TIMEOUT):
            await self._stream.send(json.dumps(request).encode() + b"\n")
            while True:
                try:
                    message = await self._read_message()
                except anyio.EndOfStream:
                    if command == "quit":
                        return None  # QEMU may close before answering
                    raise
                if "return" in message:
                    return message["return"]
                if "error" in message:
                    raise QemuError(f"QMP {command}: {message['error'].get('desc', message)}")
                # an event (SHUTDOWN, POWERDOWN, ...): not the reply


async def shut_down(run_dir: str, wait_exit: Any, grace: float = POWEROFF_GRACE) -> str:
    """Stop a VM gracefully; returns how it ended ("poweroff", "powerdown", "quit" or "").

    ``wait_exit()`` returns when QEMU has exited. After DESTROYPOD the guest powers itself off;
    if QEMU still runs after ``grace`` seconds, ACPI ``system_powerdown``; then ``quit``. ""
    means QEMU still runs (the caller signals it).
    """
    with anyio.move_on_after(grace):
        await wait_exit()
        return "poweroff"
    qmp_path = paths(run_dir)["qmp"]
    for command, how in (("system_powerdown", "powerdown"), ("quit", "quit")):
        try:
            async with QMP(qmp_path) as qmp:
                await qmp.execute(command)
        except (OSError, TimeoutError, QemuError, anyio.EndOfStream, ValueError) as exc:
            log.warning("QMP %s failed: %s", command, exc)
        with anyio.move_on_after(grace):
            await wait_exit()
            return how
    return ""


def spawn_argv(
    argv: Sequence[str],
    fds: dict[str, int],
    log_path: str,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start QEMU in its own session with the listening fds; stdout/stderr to ``log_path``;
    ``env``: its environment (None: inherit ours)."""
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            pass_fds=tuple(fds.values()),
            start_new_session=True,
            env=env,
        )
