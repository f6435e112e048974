"""A private containerd for the shim's end-to-end tests and benchmark: its own root, state,
sockets and FIFO dir under one directory, Debian's containerd 1.6 binary, readiness through
``NOTIFY_SOCKET`` (containerd sends ``READY=1`` as under systemd), and ``ctr`` to drive it.

The shim found by containerd is ``containerd-shim-hyperd-v2`` next to the running Python (the
venv's bin directory is put first on containerd's PATH); its sockets go to ``<dir>/s``
(``HYPERD_SHIM_SOCKET_DIR``) and it talks to the hyperd at ``hyperd_socket``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Final

from hyperd.notify import ReadyListener

READY_TIMEOUT: Final = 60.0  # seconds for containerd to report READY=1 on a loaded machine
STOP_TIMEOUT: Final = 30.0  # seconds for containerd to exit after SIGTERM
CTR_TIMEOUT: Final = 90.0  # seconds for one ctr command (a pod boots in it)
RUNTIME: Final = "io.containerd.hyperd.v2"

CONFIG: Final = """version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{d}/c.sock"
[debug]
  level = "{level}"
"""


class ContainerdError(Exception):
    """containerd or ctr failed; the message carries its output."""


class PrivateContainerd:
    """containerd with everything under ``dir``; ``start()``, ``ctr(...)``, ``stop()``."""

    def __init__(
        self, dir: Path, hyperd_socket: str, namespace: str, *, log_level: str = "debug"
    ) -> None:
        self.dir = dir
        self.hyperd_socket = hyperd_socket
        self.namespace = namespace
        self.proc: subprocess.Popen[bytes] | None = None
        for sub in ("s", "tmp", "fifo"):
            (dir / sub).mkdir(parents=True, exist_ok=True)
        (dir / "config.toml").write_text(CONFIG.format(d=dir, level=log_level))

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
            HYPERD_SOCKET=self.hyperd_socket,
            HYPERD_SHIM_SOCKET_DIR=str(self.dir / "s"),
            TMPDIR=str(self.dir / "tmp"),
        )

    def start(self) -> None:
        """Start containerd and wait for its ``READY=1``; raises :class:`ContainerdError`."""
        with ReadyListener(self.dir) as ready:
            with open(self.log, "ab") as log:
                self.proc = proc = subprocess.Popen(
                    ["containerd", "--config", str(self.dir / "config.toml")],
                    stdout=log,
                    stderr=log,
                    env={**self.env(), "NOTIFY_SOCKET": ready.path},
                    start_new_session=True,
                )
            if not ready.wait(READY_TIMEOUT, alive=lambda: proc.poll() is None):
                raise ContainerdError(
                    f"containerd did not report READY=1 (exit status {proc.poll()}):\n"
                    f"{self.log.read_text()[-5000:]}"
                )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
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
        """``ctr -a SOCK -n NS ARGS``; with ``check``, a non-zero exit raises
        :class:`ContainerdError` with ctr's stderr."""
        argv = ["ctr", "-a", self.socket, "-n", self.namespace, *args]
        result = subprocess.run(argv, input=input, capture_output=True, timeout=timeout)
        if check and result.returncode != 0:
            raise ContainerdError(
                f"ctr {' '.join(args)} exited {result.returncode}: {result.stderr.decode()}"
            )
        return result

    def bundle(self, cid: str) -> Path:
        return self.dir / "state" / "io.containerd.runtime.v2.task" / self.namespace / cid

    def shim_pids(self) -> list[int]:
        """Pids of the hyperd shim daemons serving this containerd."""
        pids = []
        mine = self.socket.encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if mine in argv and b"hyperd.shim" in argv and b"serve" in argv:
                pids.append(int(entry.name))
        return pids
