"""A private containerd 1.6 (Debian's) per test session, driving containerd-shim-hyperd-v2
against a real ``hyperd serve`` on its embedded default (simulated VMs).

Everything lives under one fresh ``/tmp/hdc-*`` directory: containerd's root, state, sockets
and FIFOs, the shim sockets and hyperd's base dir, so parallel sessions cannot collide. The image
is built by the test from a busybox rootfs and imported with ``ctr image import``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperd.shim.ociimage import build_image
from hyperd.shim.testbed import CTR_TIMEOUT, RUNTIME, PrivateContainerd
from tests.conftest import make_busybox_rootfs
from tests.e2e.conftest import Hyperd, _kill_leftovers, mounts_under

IMAGE = "docker.io/library/hdbusybox:1"
NAMESPACE = "hdtest"

__all__ = ["CTR_TIMEOUT", "IMAGE", "NAMESPACE", "Containerd"]


class Containerd(PrivateContainerd):
    """The session's containerd and the hyperd its shims use."""

    def __init__(self, dir: Path, hyperd: Hyperd) -> None:
        super().__init__(dir, hyperd.socket, NAMESPACE)
        self.hyperd = hyperd

    def run(
        self, cid: str, *cmd: str, flags: tuple[str, ...] = (), **kw: object
    ) -> subprocess.CompletedProcess[bytes]:
        """``ctr run --runtime io.containerd.hyperd.v2 [flags] IMAGE cid cmd...``."""
        return self.ctr(
            "run", "--fifo-dir", str(self.dir / "fifo"), "--runtime", RUNTIME, *flags,
            IMAGE, cid, *cmd, **kw,  # type: ignore[arg-type]
        )  # fmt: skip


def _fail_without(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed (Debian package {package}; .ci/run installs it)")


@pytest.fixture(scope="session")
def containerd() -> Iterator[Containerd]:
    """A private containerd with the busybox image imported, and the hyperd it uses (which
    leaves pods running when it stops, so a test can restart it under running tasks)."""
    if os.geteuid() != 0:
        pytest.fail("the containerd tests need root (containerd, overlay mounts)")
    _fail_without("containerd", "containerd")
    _fail_without("ctr", "containerd")
    _fail_without("runc", "runc")
    d = Path(tempfile.mkdtemp(prefix="hdc-", dir="/tmp"))
    (d / "rec").mkdir()
    hyperd = Hyperd(base=d / "h", record_dir=d / "rec")
    c = Containerd(d, hyperd)
    try:
        hyperd.start(stop_pods_on_exit=False)
        c.start()
        tar = build_image(make_busybox_rootfs(d / "rootfs"), d / "image.tar", IMAGE)
        c.ctr("image", "import", str(tar))
        yield c
    finally:
        c.stop()
        for pid in c.shim_pids():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if hyperd.proc is not None and hyperd.proc.poll() is None:
            hyperd.stop()
        _kill_leftovers(d)
        for point in sorted(mounts_under(str(d)), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)
        if c.log.is_file():  # shown by pytest when a test failed
            print("---- containerd log (shim lines) ----")
            print(
                "\n".join(
                    line
                    for line in c.log.read_text().splitlines()
                    if "shim" in line or "level=error" in line
                )[-30000:]
            )
        shutil.rmtree(d, ignore_errors=True)
