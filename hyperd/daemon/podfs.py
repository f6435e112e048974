"""A pod's directories on the host: its run dir (sockets) and its share dir.

All functions are synchronous (the daemon runs them in a worker thread) and never follow into a
mount point or remove a non-empty file.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from hyperd.daemon.model import PodRecord
from hyperd.rpc.access import SocketAccess


def make_dirs(pod: PodRecord, sockets: SocketAccess | None = None) -> None:
    """Create the pod's directories; the run dir (its proxy socket) is open to whom ``sockets``
    says (those who may use the RPC socket), else to root only."""
    Path(pod.run_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    if sockets is not None:
        sockets.apply_to_dir(pod.run_dir)
    Path(pod.share_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(pod.share_dir, 0o700)  # volumes are mounted inside: not for other users


def remove_sockets(pod: PodRecord) -> None:
    if pod.vm.backend in ("sim", "qemu"):
        for path in (pod.ctl_path, pod.tty_path):
            with contextlib.suppress(OSError):
                os.unlink(path)
    if pod.vm.backend == "qemu":
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(pod.run_dir, "qmp.sock"))
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(pod.run_dir, "proxy.sock"))


def remove_dirs(pod: PodRecord) -> None:
    remove_sockets(pod)
    for log_file in ("console.log", "qemu.log"):  # qemu: kept after a stop, for a look
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(pod.run_dir, log_file))
    with contextlib.suppress(OSError):
        os.rmdir(pod.run_dir)
    remove_empty_tree(pod.share_dir)


def remove_empty_tree(top: str) -> None:
    """Remove ``top`` if it holds only empty directories and empty files (old mount points).

    Never descends into a mount point and never removes a non-empty file: a mount that could not
    be undone must not cost the user the data behind it.
    """
    if not os.path.isdir(top) or os.path.ismount(top):
        return
    dirs: list[str] = []
    for root, subdirs, files in os.walk(top, topdown=True, followlinks=False):
        dirs.append(root)
        subdirs[:] = [d for d in subdirs if not os.path.ismount(os.path.join(root, d))]
        for name in files:
            path = os.path.join(root, name)
            with contextlib.suppress(OSError):
                if not os.path.ismount(path) and os.lstat(path).st_size == 0:
                    os.unlink(path)
    for d in reversed(dirs):
        with contextlib.suppress(OSError):
            os.rmdir(d)
