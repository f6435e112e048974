"""Commands that act on existing containers and processes, and the hyperhq-only extras.

KILLCONTAINER, SIGNALPROCESS (hyperhq), WINSIZE (both forms), PSCONTAINER (CC), REMOVECONTAINER,
GETVERSION (hyperhq), SETUPINTERFACE / SETUPROUTE / DELETEINTERFACE (recorded, not applied) and
WRITEFILE / READFILE (inside the container root, its symlinks resolved inside it).
"""

from __future__ import annotations

import os
import signal
import struct
from pathlib import Path

from hyperd.host.mountsys import RESOLVE_IN_ROOT, openat2
from hyperd.sim import ps
from hyperd.sim.base import AgentBase, log
from protocol.hyperstart import (
    FileCommand,
    KillCommand,
    NetworkIface,
    PsCommand,
    RemoveCommand,
    RouteList,
    SignalCommand,
    WindowSize,
    WindowSizeMessage,
)

__all__ = ["HYPER_API_VERSION", "ControlCommands", "version_payload"]

HYPER_API_VERSION = 4244  # hyperhq/hyperstart v1.0.0+ GETVERSION answer
FILE_MODE = 0o644  # a file WRITEFILE creates


def version_payload() -> bytes:
    """hyperhq's GETVERSION ACK payload: the API version as a big-endian u32."""
    return struct.pack(">I", HYPER_API_VERSION)


class ControlCommands(AgentBase):
    """Handlers of the commands that do not start processes."""

    async def _version(self, payload: bytes) -> bytes:
        return version_payload()

    async def _killcontainer(self, payload: bytes) -> bytes:
        cmd = self._decode(KillCommand, payload)  # lenient in both dialects (parson in C)
        container = self.registry.containers.get(cmd.container)
        if container is None:
            self._refuse(f"container {cmd.container!r} not found", b"no such container\0")
        if cmd.signal not in signal.valid_signals() or cmd.signal == 0:
            self._refuse(f"invalid signal {cmd.signal}", b"invalid signal\0")
        if not container.running:
            if self._hyper:
                self._refuse("no such process", b"no such process\0")
            return b""  # cc-agent: killing a stopped container is a no-op
        targets = container.live() if cmd.all_processes and not self._hyper else [container.init]
        for rec in targets:
            if rec.proc is None:
                continue
            try:
                if cmd.all_processes and not self._hyper:
                    rec.proc.signal_group(cmd.signal)
                else:
                    rec.proc.signal(cmd.signal)
            except ProcessLookupError:
                if self._hyper:
                    self._refuse("no such process", b"no such process\0")
            except PermissionError:
                self._refuse("no permission", b"no permission\0")
            except OSError as exc:
                self._refuse(f"kill failed: {exc}", b"kill failed\0")
        return b""

    async def _signalprocess(self, payload: bytes) -> bytes:
        cmd = self._decode(SignalCommand, payload)
        rec = self.registry.find_process(cmd.container, cmd.process)
        if rec is None or not rec.running or rec.proc is None:
            self._refuse(f"process {cmd.container}/{cmd.process} not found")
        try:
            rec.proc.signal_group(cmd.signal)
        except (OSError, ValueError) as exc:
            self._refuse(f"signal {cmd.signal} to {cmd.container}/{cmd.process}: {exc}")
        return b""

    async def _winsize(self, payload: bytes) -> bytes:
        if self._hyper:
            msg = self._decode(WindowSizeMessage, payload)
            rec = self.registry.find_process(msg.container, msg.process)
            if rec is None or not rec.running:
                self._refuse(f"process {msg.container}/{msg.process} not found")
            rows, columns = msg.row, msg.column
        else:
            size = self._decode(WindowSize, payload)
            found = self.registry.by_seq(size.seq)
            if found is None or not found.running:
                return b""  # cc-agent: unknown seq or stopped process -> silent ACK
            rec, rows, columns = found, size.row, size.column
        if not rec.terminal or rec.proc is None:
            self._refuse(f"process {rec.container}/{rec.id} has no terminal")
        try:
            rec.proc.resize(rows, columns)
        except OSError as exc:
            self._refuse(f"cannot resize the terminal of {rec.container}/{rec.id}: {exc}")
        return b""

    async def _pscontainer(self, payload: bytes) -> bytes:
        cmd = self._decode(PsCommand, payload)
        container = self._container(cmd.container)
        if not container.running:
            self._refuse(f"container {cmd.container!r} is not running")
        if cmd.format not in ("", "table", "json"):
            self._refuse("invalid format option")
        roots = [rec.pid for rec in container.live() if rec.pid is not None]
        # synchronous on purpose: a few ms of /proc reads, and no worker thread exists when
        # spawn() forks with a pre-exec hook
        procs = ps.container_pids(roots)
        return ps.format_json(procs) if cmd.format == "json" else ps.format_table(procs)

    async def _removecontainer(self, payload: bytes) -> bytes:
        cmd = self._decode(RemoveCommand, payload)
        container = self._container(cmd.container)
        if container.running:
            self._refuse(f"container {cmd.container!r} is running, stop it first")
        del self.registry.containers[cmd.container]
        return b""

    # -- hyperstart-only extras ----------------------------------------------------------------

    async def _setupinterface(self, payload: bytes) -> bytes:
        iface = self._decode(NetworkIface, payload)
        log.info("interface %s recorded (not applied)", iface.new_device_name or iface.device)
        return b""

    async def _setuproute(self, payload: bytes) -> bytes:
        self._decode(RouteList, payload)
        return b""

    def _container_file(self, payload: bytes) -> tuple[Path, str, bytes]:
        """The container's root, the file's path in it and the data after the JSON header."""
        end = payload.find(b"}")  # hyperstart: the JSON ends at the first '}', data follows
        if end < 0:
            self._refuse("file command without a JSON header")
        cmd = self._decode(FileCommand, payload[: end + 1])
        container = self._container(cmd.container)
        relative = os.path.normpath(cmd.file.lstrip("/"))
        if relative in (".", "..") or relative.startswith("../"):
            self._refuse(f"file {cmd.file!r} is outside the container")
        return container.root, relative, payload[end + 1 :]

    @staticmethod
    def _open_in_root(root: Path, relative: str, flags: int) -> int:
        """Open ``relative`` as the container sees it: symlinks resolved inside its root."""
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            mode = FILE_MODE if flags & os.O_CREAT else 0  # openat2: a mode only to create
            return openat2(root_fd, relative, flags, RESOLVE_IN_ROOT, mode)
        finally:
            os.close(root_fd)

    async def _writefile(self, payload: bytes) -> bytes:
        root, relative, data = self._container_file(payload)
        try:
            fd = self._open_in_root(root, relative, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        except OSError as exc:
            self._refuse(f"cannot write {os.path.basename(relative)}: {exc}")
        return b""

    async def _readfile(self, payload: bytes) -> bytes:
        root, relative, _ = self._container_file(payload)
        try:
            with os.fdopen(self._open_in_root(root, relative, os.O_RDONLY), "rb") as f:
                return f.read()
        except OSError as exc:
            self._refuse(f"cannot read {os.path.basename(relative)}: {exc}")
