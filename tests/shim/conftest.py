"""A private containerd 1.6 (Debian's) per test session, driving containerd-shim-hyperd-v2
against a real ``hyperd serve`` on its embedded default (simulated VMs).

Everything lives under one fresh ``/tmp/hdc-*`` directory: containerd's root, state, sockets
and FIFOs, the shim sockets (``HYPERD_SHIM_SOCKET_DIR``) and hyperd's base dir, so parallel
sessions cannot collide. The image is built by the test from a busybox rootfs and imported with
``ctr image import``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import make_busybox_rootfs
from tests.e2e.conftest import Hyperd, _kill_leftovers, mounts_under
from tests.shim.image import build_image

IMAGE = "docker.io/library/hdbusybox:1"
NAMESPACE = "hdtest"
RUNTIME = "io.containerd.hyperd.v2"
CTR_TIMEOUT = 90.0  # seconds for one ctr command on a loaded 2-core machine (a pod boots)
CONTAINERD_READY = 60.0  # seconds for containerd to report READY=1

CONFIG = """version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{d}/c.sock"
[debug]
  level = "debug"
"""


@dataclass
class Containerd:
    """A private containerd and the helpers to drive it with ctr."""

    dir: Path
    hyperd: Hyperd
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> str:
        return str(self.dir / "c.sock")

    @property
    def log(self) -> Path:
        return self.dir / "containerd.log"

    def env(self) -> dict[str, str]:
        bindir = os.path.dirname(sys.executable)
        return dict(
            os.environ,
            PATH=f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            HYPERD_SOCKET=self.hyperd.socket,
            HYPERD_SHIM_SOCKET_DIR=str(self.dir / "s"),
            TMPDIR=str(self.dir / "tmp"),
        )

    def start(self) -> None:
        """Start containerd and wait for its sd_notify READY=1 (it supports NOTIFY_SOCKET)."""
        notify_path = str(self.dir / f"n-{secrets.token_hex(4)}")
        ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        ns.bind(notify_path)
        ns.settimeout(CONTAINERD_READY)
        try:
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(
                    ["containerd", "--config", str(self.dir / "config.toml")],
                    stdout=log,
                    stderr=log,
                    env={**self.env(), "NOTIFY_SOCKET": notify_path},
                    start_new_session=True,
                )
            while True:
                try:
                    msg = ns.recv(4096).decode()
                except TimeoutError:
                    raise AssertionError(
                        f"containerd did not report READY=1:\n{self.log.read_text()[-5000:]}"
                    ) from None
                if "READY=1" in msg.splitlines():
                    return
        finally:
            ns.close()
            os.unlink(notify_path)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def ctr(
        self,
        *args: str,
        input: bytes | None = b"",
        check: bool = True,
        timeout: float = CTR_TIMEOUT,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``ctr -a SOCK -n NS ARGS``; its result (``check``: a non-zero exit is a
        failure showing its output)."""
        argv = ["ctr", "-a", self.socket, "-n", NAMESPACE, *args]
        result = subprocess.run(argv, input=input, capture_output=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {result.returncode}: {result.stderr.decode()}"
            )
        return result

    def run(
        self, cid: str, *cmd: str, flags: tuple[str, ...] = (), **kw: object
    ) -> subprocess.CompletedProcess[bytes]:
        """``ctr run --runtime io.containerd.hyperd.v2 [flags] IMAGE cid cmd...``."""
        return self.ctr(
            "run", "--fifo-dir", str(self.dir / "fifo"), "--runtime", RUNTIME, *flags,
            IMAGE, cid, *cmd, **kw,  # type: ignore[arg-type]
        )  # fmt: skip

    def bundle(self, cid: str) -> Path:
        return self.dir / "state" / "io.containerd.runtime.v2.task" / NAMESPACE / cid

    def shim_pids(self) -> list[int]:
        """Pids of the shim daemons of this containerd."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if (
                b"hyperd.shim" in cmdline
                and b"serve" in cmdline
                and self.socket.encode() in cmdline
            ):
                pids.append(int(entry.name))
        return pids


def _fail_without(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed (Debian package {package}; .ci/run installs it)")


@pytest.fixture(scope="session")
def containerd() -> Iterator[Containerd]:
    """A private containerd with the busybox image imported, and the hyperd it uses."""
    if os.geteuid() != 0:
        pytest.fail("the containerd tests need root (containerd, overlay mounts)")
    _fail_without("containerd", "containerd")
    _fail_without("ctr", "containerd")
    _fail_without("runc", "runc")
    d = Path(tempfile.mkdtemp(prefix="hdc-", dir="/tmp"))
    for sub in ("s", "tmp", "fifo", "rec"):
        (d / sub).mkdir()
    (d / "config.toml").write_text(CONFIG.format(d=d))
    hyperd = Hyperd(base=d / "h", record_dir=d / "rec")
    c = Containerd(dir=d, hyperd=hyperd)
    try:
        hyperd.start()
        c.start()
        tar = build_image(make_busybox_rootfs(d / "rootfs"), d / "image.tar", IMAGE)
        c.ctr("image", "import", str(tar))
        yield c
    finally:
        c.stop()
        for pid in c.shim_pids():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if hyperd.proc is not None:
            hyperd.stop()
        _kill_leftovers(d)
        for point in sorted(mounts_under(str(d)), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
        if os.environ.get("HYPERD_KEEP_TEST_DIR"):
            print(f"kept {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)
