"""The simulated guest agent: what each ctl command does, and the life of its processes.

:class:`Agent` is transport-free: :meth:`Agent.handle` turns one ctl command into a
:class:`Answer`, :meth:`Agent.stdin` takes one tty frame from the host, and process output, EOFs,
exit statuses and exit events leave through the :class:`Channels` it was given.

Two dialects (spec §0):

- **cc** behaves as cc-agent: ERROR payloads are UTF-8 messages, the exit status follows the EOF
  as a 1-byte tty frame, PSCONTAINER is code 23, WINSIZE is ``{"seq","row","column"}``,
  GETVERSION is not implemented.
- **hyper** behaves as hyperhq/hyperstart v1.1.0 as recorded in the conformance transcripts:
  empty ERROR payloads (NUL-terminated strings for KILLCONTAINER), GETVERSION answers 4244,
  strict keys, PROCESSASYNCEVENT (23) after the EOF instead of a status frame, containers freed
  when their init exits, terminal input ended by ^D only. Where the real agent crashes or hangs
  (an unknown key inside ``process``, EXECCMD while an id-less process runs) the simulator
  answers ERROR with a message instead.

This module starts and reaps processes (STARTPOD, NEWCONTAINER, EXECCMD, DESTROYPOD, stdin);
:mod:`hyperd.sim.control` holds the commands on existing containers, :mod:`hyperd.sim.base` the
state and the ERROR conventions.
"""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.abc import TaskGroup

from hyperd.sim.base import Answer, Channels, Handler, Refused, log
from hyperd.sim.containers import ContainerRecord, ProcessRecord
from hyperd.sim.control import ControlCommands, version_payload
from hyperd.sim.isolation import CapabilityError, capability_mask
from hyperd.sim.process import LaunchSpec, exit_status, spawn
from hyperd.sim.rootfs import (
    BindMount,
    IdentityError,
    RootfsError,
    check_fsmap_source,
    container_root,
    prepare_bind,
    resolve_identity,
)
from protocol import jsonerrors
from protocol.hyperstart import (
    Code,
    Container,
    CtlFrame,
    Dialect,
    ExecCommand,
    FsmapDescriptor,
    Pod,
    Process,
    ProcessAsyncEvent,
    TtyFrame,
    encode_tty,
)

__all__ = ["Agent", "Answer", "Channels"]

DESTROY_TIMEOUT = 10.0  # seconds DESTROYPOD waits for processes before SIGKILL
KILL_WAIT = 5.0  # seconds to wait for processes after SIGKILL
EXIT_STATUS_MASK = 0xFF  # the CC status frame carries one byte
EXEC_FAILED_STATUS = {errno.ENOENT: 127, errno.EACCES: 126}  # hyperstart's exec failure codes
SETUP_FAILED_STATUS = 125  # hyperstart: any other process setup failure
SIGTERM_IGNORED = 1 << (signal.SIGTERM - 1)  # bit of SIGTERM in /proc/<pid>/status SigIgn
# The keys hyperhq's process parser knows; any other one derails it (conformance note 3).
HYPER_PROCESS_KEYS = frozenset(
    [
        "id",
        "user",
        "group",
        "additionalGroups",
        "terminal",
        "stdio",
        "stderr",
        "args",
        "envs",
        "workdir",
    ]
)
ACK = Answer(True)
HYPER_STDIN_BUFFER = 512  # hyperstart keeps this much pending stdin per process, drops the rest


class Agent(ControlCommands):
    """One simulated guest agent. Process supervisors run in ``task_group``."""

    def __init__(
        self,
        *,
        dialect: Dialect,
        share: Path,
        channels: Channels,
        task_group: TaskGroup,
        chroot: bool,
        netns_fd: int | None = None,
    ) -> None:
        super().__init__(
            dialect=dialect, share=share, channels=channels, chroot=chroot, netns_fd=netns_fd
        )
        self._tg = task_group
        common: dict[int, Handler] = {
            Code.STARTPOD: self._startpod,
            Code.DESTROYPOD: self._destroypod,
            Code.EXECCMD: self._execcmd,
            Code.READY: self._ack,
            Code.WINSIZE: self._winsize,
            Code.PING: self._ack,
            Code.NEWCONTAINER: self._newcontainer,
            Code.KILLCONTAINER: self._killcontainer,
            Code.REMOVECONTAINER: self._removecontainer,
        }
        if self._hyper:
            common.update(
                {
                    Code.VERSION: self._version,
                    Code.ONLINECPUMEM: self._ack,
                    Code.SETUPINTERFACE: self._setupinterface,
                    Code.SETUPROUTE: self._setuproute,
                    Code.WRITEFILE: self._writefile,
                    Code.READFILE: self._readfile,
                }
            )
            if dialect.signal_process is not None:
                common[dialect.signal_process] = self._signalprocess
            if dialect.delete_interface is not None:
                common[dialect.delete_interface] = self._setupinterface
        elif dialect.ps_container is not None:
            common[dialect.ps_container] = self._pscontainer
        self._handlers = common
        # replies that need no work: answered without a task switch (see answer_now)
        self._instant = {code: ACK for code, handler in common.items() if handler == self._ack}
        if self._hyper:
            self._instant[Code.VERSION] = Answer(True, version_payload())

    # -- entry points --------------------------------------------------------------------------

    async def handle(self, frame: CtlFrame) -> Answer:
        """Run one ctl command and return its reply. Never raises for bad input."""
        handler = self._handlers.get(frame.code)
        try:
            if handler is None:
                self._unknown(frame.code)
            return Answer(True, await handler(frame.payload))
        except Refused as exc:
            log.info("%s refused: %s", self.dialect.name_of(frame.code), exc)
            return Answer(False, exc.payload)
        except Exception as exc:  # a simulator bug must not take the VM down
            log.exception("%s failed", self.dialect.name_of(frame.code))
            return Answer(False, f"internal error: {exc}".encode())

    def answer_now(self, frame: CtlFrame) -> Answer | None:
        """The reply to a command that needs no waiting, or None: then use :meth:`handle`.

        Answered here: the ACK-only commands (PING, READY, hyperhq's ONLINECPUMEM), hyperhq's
        GETVERSION and every code without a handler; the reply is the one :meth:`handle` gives.
        """
        code = frame.code
        instant = self._instant.get(code)
        if instant is not None:
            return instant
        if code in self._handlers:
            return None
        try:
            self._unknown(code)
        except Refused as exc:
            log.info("%s refused: %s", self.dialect.name_of(code), exc)
            return Answer(False, exc.payload)

    def stdin(self, frame: TtyFrame) -> bytes:
        """Deliver one host tty frame (stdin data, or EOF when empty) to its process.

        Returns the bytes to answer on the tty channel (hyperhq's EOF frame for an unknown or
        finished seq), usually none.
        """
        rec = self.registry.by_seq(frame.seq) if frame.seq else None  # seq 0 is never a stream
        if rec is None or not rec.running or rec.proc is None:
            if self._hyper:  # hyperstart says goodbye to an unknown or finished seq
                return encode_tty(frame.seq, b"")
            return b""
        if frame.data:
            rec.proc.write_stdin(frame.data)
        elif not rec.terminal:
            rec.proc.close_stdin()
        # an empty frame to a terminal process is ignored (only ^D ends pty input)
        return b""

    def kill_everything(self) -> None:
        """SIGKILL every process group the agent started (used on simulator exit)."""
        for c in self.registry.containers.values():
            c.kill_all()
        for rec in self.registry.all_processes():
            if rec.proc is not None:
                rec.proc.kill_group_quietly()

    # -- helpers -------------------------------------------------------------------------------

    # -- pod -----------------------------------------------------------------------------------

    async def _startpod(self, payload: bytes) -> bytes:
        pod = self._decode(Pod, payload)
        if self.pod is not None:
            if self._hyper:  # hyperstart answers ERROR and SIGTERMs every running container
                for c in self.registry.containers.values():
                    self._signal_quietly(c.init, signal.SIGTERM)
            self._refuse("Pod already started, impossible to start again")
        self.pod = pod
        log.info(
            "pod %r started (not applied: %d interfaces, %d routes)",
            pod.hostname,
            len(pod.interfaces),
            len(pod.routes),
        )
        if self._hyper:
            for container in pod.containers:
                await self._start_container(container)
        return b""

    async def _destroypod(self, payload: bytes) -> bytes:
        live = [rec for rec in self.registry.all_processes() if rec.running]
        if self._hyper:
            for rec in live:
                self._signal_quietly(rec, self._hyper_term_signal(rec))
            with anyio.move_on_after(DESTROY_TIMEOUT):
                await _wait_all(live)
        for rec in live:
            if rec.running and rec.proc is not None:
                rec.proc.kill_group_quietly()
        with anyio.move_on_after(KILL_WAIT):
            await _wait_all(live)
        self.registry.containers.clear()
        self.pod = None
        return b""

    @staticmethod
    def _hyper_term_signal(rec: ProcessRecord) -> int:
        """SIGTERM, or SIGKILL for a process that ignores SIGTERM (as hyperstart does)."""
        try:
            with open(f"/proc/{rec.pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"SigIgn:") and int(line.split()[1], 16) & SIGTERM_IGNORED:
                        return signal.SIGKILL
        except (OSError, ValueError):
            pass
        return signal.SIGTERM

    # -- containers and processes --------------------------------------------------------------

    def _check_hyper_process_keys(self, payload: bytes, *path: str) -> None:
        """Refuse with a message an unknown process key placed where it hangs hyperhq.

        Unknown keys elsewhere are left to the strict decoder (ERROR with an empty payload).
        """
        try:
            doc: Any = msgspec.json.decode(payload)
        except jsonerrors.DECODE_ERRORS:
            return  # decode_message reports it
        for key in path:
            doc = doc.get(key) if isinstance(doc, dict) else None
        if not isinstance(doc, dict):
            return
        for key in doc:  # JSON order: only an unknown key *before* args hangs the real agent
            if key == "args":
                return
            if key not in HYPER_PROCESS_KEYS:
                self._refuse(f"unknown process key {key!r} before args (hyperstart hangs)", None)

    async def _newcontainer(self, payload: bytes) -> bytes:
        if self._hyper:
            self._check_hyper_process_keys(payload, "process")
        container = self._decode(Container, payload)
        if self.pod is None:
            self._refuse("Pod not started, impossible to run a new container")
        await self._start_container(container)
        return b""

    async def _start_container(self, spec: Container) -> None:
        if not spec.id:
            self._refuse("container id is empty")
        if spec.id in self.registry.containers:
            self._refuse(f"container {spec.id!r} already exists")
        if spec.process is None:
            self._refuse(f"container {spec.id!r} has no process")
        rec = self._new_record(spec.id, spec.process, in_container=None)
        try:
            root = container_root(self.share, spec.image, spec.rootfs)
            binds = tuple(self._bind(root, m) for m in spec.fsmap)
        except RootfsError as exc:
            self._refuse(f"container {spec.id!r}: {exc}")
        container = ContainerRecord(id=spec.id, root=root, init=rec, binds=binds)
        self._launch(container, rec, spec.process)
        self.registry.containers[spec.id] = container
        container.processes[rec.id] = rec

    def _bind(self, root: Path, m: FsmapDescriptor) -> BindMount:
        """An fsmap entry to mount (chroot mode); without chroot only the source is checked."""
        if not self.chroot:
            source = check_fsmap_source(self.share, m.source, m.absolute_path)
            return BindMount(source, root / m.path.lstrip("/"), m.read_only)
        return prepare_bind(
            self.share,
            root,
            m.source,
            m.path,
            absolute=m.absolute_path,
            read_only=m.read_only,
        )

    async def _execcmd(self, payload: bytes) -> bytes:
        if self._hyper:
            self._check_hyper_process_keys(payload, "process")
        cmd = self._decode(ExecCommand, payload)
        container = self._container(cmd.container)
        if not container.running:
            self._refuse(f"container {cmd.container!r} is not running")
        if self._hyper:
            live = self.registry.all_processes()
            idless = [p.id for p in live if p.running and not p.explicit_id]
            if idless:
                self._refuse(
                    f"EXECCMD while process(es) {idless} without an id run "
                    "(hyperstart would crash)",
                    None,
                )
        rec = self._new_record(cmd.container, cmd.process, in_container=container)
        self._launch(container, rec, cmd.process)
        container.processes[rec.id] = rec
        return b""

    def _new_record(
        self, cid: str, process: Process, in_container: ContainerRecord | None
    ) -> ProcessRecord:
        """Validate a process spec against the live processes; raises Refused."""
        if not process.args:
            self._refuse("process has no args")
        if self._hyper and not process.stdio:
            self._refuse("process has no stdio seq")
        if self._hyper and not process.terminal and not process.stderr:
            self._refuse("non-terminal process has no stderr seq")
        stderr = 0 if process.terminal and not self._hyper else process.stderr
        used = self.registry.seq_in_use(process.stdio, stderr)
        if used is not None:
            self._refuse(f"Sequence number {used} already registered")
        pid = process.id or str(process.stdio)
        if in_container is not None:
            scope = (
                [p for c in self.registry.containers.values() for p in c.processes.values()]
                if self._hyper
                else list(in_container.processes.values())
            )
            if any(p.id == pid and p.running for p in scope):
                self._refuse(f"process {pid!r} already exists in container {cid!r}")
        return ProcessRecord(
            container=cid,
            id=pid,
            stdio=process.stdio,
            stderr=stderr,
            terminal=process.terminal,
            explicit_id=bool(process.id),
        )

    def _launch(self, container: ContainerRecord, rec: ProcessRecord, process: Process) -> None:
        """Start the process and its supervisor; raises Refused when it cannot start."""
        try:
            identity = (
                resolve_identity(
                    container.root, process.user, process.group, process.additional_groups
                )
                if self.chroot
                else None
            )
            capabilities = (
                capability_mask(process.capabilities.bounding)
                if process.capabilities.bounding is not None
                else None
            )
        except (IdentityError, CapabilityError) as exc:
            self._refuse(str(exc))
        init = container.init.proc
        if self.chroot and rec is not container.init and (init is None or init.namespaces is None):
            # its init has exited (being reaped): there are no namespaces left to join
            self._refuse(f"container {container.id!r} is not running")
        spec = LaunchSpec(
            args=process.args or [],
            env={e.env: e.value for e in process.envs},
            root=container.root,
            workdir=process.workdir,
            identity=identity,
            chroot=self.chroot,
            terminal=process.terminal,
            separate_stderr=self._hyper and process.terminal and bool(process.stderr),
            netns_fd=self.netns_fd,
            binds=container.binds,
            namespaces=init.namespaces if init is not None and rec is not container.init else None,
            capabilities=capabilities,
            no_new_privileges=process.no_new_privileges,
            hostname=self.pod.hostname if self.pod is not None else "",
        )
        failure: OSError | None = None
        try:
            rec.proc = spawn(spec)
            if self._hyper:
                rec.proc.stdin_limit = HYPER_STDIN_BUFFER
        except OSError as exc:
            if not self._hyper:
                self._refuse(f"cannot start process {rec.id!r}: {exc.strerror or exc}")
            failure = exc  # hyperstart ACKs, then reports the exec failure like an exit
        except Exception as exc:  # SubprocessError from the child setup
            self._refuse(f"cannot start process {rec.id!r}: {exc}")
        self.registry.register(rec)
        if rec.proc is not None:
            container.pgids.add(rec.proc.pid)
        log.info("started %s/%s pid %s: %s", rec.container, rec.id, rec.pid, spec.args)
        self._tg.start_soon(self._supervise, container, rec, failure)

    async def _supervise(
        self, container: ContainerRecord, rec: ProcessRecord, failure: OSError | None
    ) -> None:
        """Pump a process until it exits, then send its EOF and status (or exit event)."""
        try:
            status = await self._wait_status(container, rec, failure)
        except Exception:  # a simulator bug: report the process as failed, keep running
            log.exception("supervising %s/%s", rec.container, rec.id)
            if rec.proc is not None:
                rec.proc.kill_group_quietly()
            status = SETUP_FAILED_STATUS
        await self._finish(container, rec, status)

    async def _wait_status(
        self, container: ContainerRecord, rec: ProcessRecord, failure: OSError | None
    ) -> int:
        if rec.proc is not None:
            on_exit = container.on_init_exit if rec is container.init else None
            raw = await rec.proc.run(self._send_output, rec.stdio, rec.stderr, on_exit)
            status = exit_status(raw, signal_status_zero=self._hyper)
        else:
            reason = os.strerror(failure.errno) if failure and failure.errno else str(failure)
            message = f"exec failed: {reason}\n".encode()
            await self._send_output(rec.stderr or rec.stdio, message)
            code = failure.errno if failure is not None else None
            status = EXEC_FAILED_STATUS.get(code or 0, SETUP_FAILED_STATUS)
        return status

    async def _send_output(self, seq: int, data: bytes) -> None:
        await self._channels.send_tty(encode_tty(seq, data))

    async def _finish(self, container: ContainerRecord, rec: ProcessRecord, status: int) -> None:
        """Report a finished process: EOF on its stdio seq, then its status.

        hyperhq orders deaths caused by an init's exit as all EOFs first, then the events, init's
        first; the other processes' events wait for the init's, and the init's waits for the
        others' EOFs.
        """
        is_init = rec is container.init
        others = [p for p in container.live() if p is not rec] if is_init else []
        rec.status = status
        self.registry.unregister(rec)
        log.info("%s/%s exited with status %d", rec.container, rec.id, status)
        if is_init:
            container.dying = True
            container.kill_all()  # a container dies with its init, as a pid namespace does
            if self._hyper and self.registry.containers.get(container.id) is container:
                del self.registry.containers[container.id]
        await self._channels.send_tty(encode_tty(rec.stdio, b""))
        rec.eof_sent.set()
        if self._hyper:
            with anyio.move_on_after(KILL_WAIT):
                if is_init:
                    for other in others:
                        await other.eof_sent.wait()
                elif container.dying:
                    await container.init.finished.wait()
            await self._channels.send_event(
                ProcessAsyncEvent(
                    container=rec.container, process=rec.id, event="finished", status=status
                )
            )
        else:
            await self._channels.send_tty(encode_tty(rec.stdio, bytes([status & EXIT_STATUS_MASK])))
        rec.finished.set()


async def _wait_all(records: list[ProcessRecord]) -> None:
    for rec in records:
        await rec.finished.wait()
