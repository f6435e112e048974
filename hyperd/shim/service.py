"""The ``containerd.task.v2.Task`` service of one pod's shim, mapped onto hyperd.

One shim process serves one hyperd pod: the first task created creates and starts the pod, later
ones (same CRI sandbox id or group annotation) become further containers in it. For every process
(a container's init or an exec) the shim claims the process's token on the pod's proxy, as
``hyperctl run`` does, and relays its stdio between the proxy and containerd's FIFOs; the
process's exit status comes from the proxy (ProcessExited), after all its output has been written
to the FIFOs. State, Wait and Connect are answered from the shim's own table and never wait on
hyperd or the VM.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import anyio.abc
from google.protobuf import empty_pb2
from google.protobuf.message import Message

from hyperd.cli.client import ShimClient, ShimError
from hyperd.shim import bundle as bundles
from hyperd.shim.events import Publisher, timestamp
from hyperd.shim.hyperd_api import HyperdAPI, HyperdError
from hyperd.shim.proto import events_pb2, mount_pb2, shim_pb2, task_types_pb2
from hyperd.shim.stdio import Input, Output, StdioError
from hyperd.shim.ttrpc import CallInfo, Code, Method, TtrpcError
from protocol.ccproxy import ErrorReply, ProcessExited, Response, Stream, StreamData

log = logging.getLogger(__name__)

SERVICE: Final = "containerd.task.v2.Task"
EXIT_LOST: Final = 255  # the process's status never arrived (proxy connection lost)
SIGNAL_EXIT_BASE: Final = 128  # exit status of a process killed by signal N is 128 + N
PROCESS_SPEC_TYPE: Final = "types.containerd.io/opencontainers/runtime-spec/1/Process"
VERSION: Final = "hyperd-shim 1"
CLAIM_DEADLINE: Final = 60.0
"""Seconds for the proxy to answer ConnectShim (it answers at once; this only ends a wait on a
proxy that hangs)."""


class Status(enum.IntEnum):
    CREATED = task_types_pb2.CREATED
    RUNNING = task_types_pb2.RUNNING
    STOPPED = task_types_pb2.STOPPED


@dataclass(eq=False)
class Process:
    """A container's init (``exec_id == ""``) or an exec process."""

    container: str
    exec_id: str
    stdin_path: str
    stdout_path: str
    stderr_path: str
    terminal: bool
    hyperd_exec_id: str = ""
    status: Status = Status.CREATED
    pid: int = 0
    exit_status: int = 0
    exited_at: float = 0.0
    exited: anyio.Event = field(default_factory=anyio.Event)
    start_announced: anyio.Event = field(default_factory=anyio.Event)
    proxy: ShimClient | None = None
    proxy_events: AsyncIterator[object] | None = None
    stdin: Input | None = None
    stdout: Output | None = None
    stderr: Output | None = None
    stdin_scope: anyio.CancelScope | None = None
    stdin_lock: anyio.Lock = field(default_factory=anyio.Lock)
    stdin_closed: bool = False

    def open_stdio(self) -> None:
        self.stdout = Output(self.stdout_path)
        self.stderr = Output(self.stderr_path)
        self.stdin = Input(self.stdin_path)

    def close_stdio(self) -> None:
        for io in (self.stdin, self.stdout, self.stderr):
            if io is not None:
                io.close()


@dataclass(eq=False)
class Task:
    """A container: its bundle, its init and its exec processes."""

    id: str
    bundle: str
    rootfs_mounted: bool
    init: Process
    execs: dict[str, Process] = field(default_factory=dict)
    create_request: shim_pb2.CreateTaskRequest | None = None


def _not_found(what: str) -> TtrpcError:
    return TtrpcError(Code.NOT_FOUND, f"{what}: not found")


class TaskService:
    """The Task service of one pod's shim."""

    def __init__(
        self,
        *,
        namespace: str,
        hyperd: HyperdAPI,
        publisher: Publisher,
        tg: anyio.abc.TaskGroup,
    ) -> None:
        self.namespace = namespace
        self.hyperd = hyperd
        self.publisher = publisher
        self.tg = tg
        self.tasks: dict[str, Task] = {}
        self.pod: str | None = None
        self.pod_created = False
        self.vm_pid = 0
        self.shutdown = anyio.Event()
        self._pod_lock = anyio.Lock()

    # ---- helpers ------------------------------------------------------------------------

    def methods(self) -> dict[str, Method]:
        """The method table; methods not listed answer UNIMPLEMENTED."""
        return {
            "State": Method(shim_pb2.StateRequest, self.state),
            "Create": Method(shim_pb2.CreateTaskRequest, self.create),
            "Start": Method(shim_pb2.StartRequest, self.start),
            "Delete": Method(shim_pb2.DeleteRequest, self.delete),
            "Pids": Method(shim_pb2.PidsRequest, self.pids),
            "Kill": Method(shim_pb2.KillRequest, self.kill),
            "Exec": Method(shim_pb2.ExecProcessRequest, self.exec),
            "ResizePty": Method(shim_pb2.ResizePtyRequest, self.resize_pty),
            "CloseIO": Method(shim_pb2.CloseIORequest, self.close_io),
            "Wait": Method(shim_pb2.WaitRequest, self.wait),
            "Connect": Method(shim_pb2.ConnectRequest, self.connect),
            "Shutdown": Method(shim_pb2.ShutdownRequest, self.shutdown_rpc),
        }

    def _task(self, task_id: str) -> Task:
        task = self.tasks.get(task_id)
        if task is None:
            raise _not_found(f"task {task_id}")
        return task

    def _process(self, task_id: str, exec_id: str) -> Process:
        task = self._task(task_id)
        if not exec_id:
            return task.init
        proc = task.execs.get(exec_id)
        if proc is None:
            raise _not_found(f"exec {exec_id} of task {task_id}")
        return proc

    def _pod(self) -> str:
        if self.pod is None:  # pragma: no cover - every task has created the pod
            raise TtrpcError(Code.FAILED_PRECONDITION, "no pod")
        return self.pod

    async def _ensure_pod(self, spec: dict[str, Any], task_id: str) -> None:
        """Create and start the pod on the first task; later tasks join it."""
        async with self._pod_lock:
            pod = bundles.pod_id(self.namespace, bundles.group_key(spec, task_id))
            if self.pod is not None and self.pod != pod:
                raise TtrpcError(
                    Code.INVALID_ARGUMENT,
                    f"task {task_id} belongs to pod {pod}, this shim serves {self.pod}",
                )
            try:
                info = await self.hyperd.call("pod.inspect", {"id": pod})
            except HyperdError as exc:
                if exc.kind != "not_found":
                    raise
                params: dict[str, Any] = {"id": pod}
                netns = bundles.netns_path(spec)
                if netns:
                    params["netns"] = netns
                hostname = spec.get("hostname")
                if isinstance(hostname, str) and hostname:
                    params["hostname"] = hostname
                info = await self.hyperd.call("pod.create", params)
                self.pod_created = True
            if info.get("state") != "running":
                info = await self.hyperd.call("pod.start", {"id": pod})
            self.pod = pod
            self.vm_pid = int(info.get("vm_pid") or 0)

    async def _claim(self, proc: Process, url: str, token: str) -> None:
        """Connect to the proxy as the process's shim and wait until the token is claimed."""
        try:
            proc.proxy = await ShimClient.connect(url, token)
        except OSError as exc:
            raise TtrpcError(Code.UNAVAILABLE, f"cannot reach the pod's proxy: {exc}") from None
        events = proc.proxy.events()
        with anyio.move_on_after(CLAIM_DEADLINE):
            async for event in events:
                if isinstance(event, Response):
                    proc.proxy_events = events
                    return
                if isinstance(event, ErrorReply):
                    raise TtrpcError(Code.UNKNOWN, f"proxy refused the token: {event.message}")
            raise TtrpcError(
                Code.UNAVAILABLE, "the proxy closed the connection before answering ConnectShim"
            )
        raise TtrpcError(Code.DEADLINE_EXCEEDED, "the proxy did not answer ConnectShim")

    async def _relay(self, task: Task, proc: Process) -> None:
        """Output from the proxy to the FIFOs until the exit status; then the exit."""
        status: int | None = None
        if proc.proxy_events is not None:
            try:
                async for event in proc.proxy_events:
                    if isinstance(event, StreamData):
                        out = proc.stderr if event.stream == Stream.STDERR else proc.stdout
                        if out is not None:
                            await out.write(event.data)
                    elif isinstance(event, ProcessExited):
                        status = event.status
                        break
            except (OSError, anyio.BrokenResourceError) as exc:
                log.warning("proxy connection of %s/%s lost: %s", task.id, proc.exec_id, exc)
        await self._exited(task, proc, EXIT_LOST if status is None else status)

    async def _exited(self, task: Task, proc: Process, status: int) -> None:
        if proc.exited.is_set():
            return
        if proc.stdin_scope is not None:
            proc.stdin_scope.cancel()
        proc.close_stdio()
        if proc.proxy is not None:
            await proc.proxy.disconnect()
            proc.proxy = None
        await proc.start_announced.wait()  # /tasks/exit only after /tasks/start
        proc.status, proc.exit_status, proc.exited_at = Status.STOPPED, status, time.time()
        proc.exited.set()
        log.info("%s %s exited with status %d", task.id, proc.exec_id or "init", status)
        self.publisher.publish(
            "/tasks/exit",
            events_pb2.TaskExit(
                container_id=task.id,
                id=proc.exec_id or task.id,
                pid=proc.pid,
                exit_status=status,
                exited_at=timestamp(proc.exited_at),
            ),
        )

    async def _forward_stdin(self, proc: Process) -> None:
        """stdin FIFO → the process, until EOF (then stdin EOF to the process)."""
        assert proc.stdin is not None and proc.proxy is not None
        with anyio.CancelScope() as scope:
            proc.stdin_scope = scope
            while True:
                data = await proc.stdin.read()
                # shielded: a cancel (CloseIO, exit) must not cut a frame in half
                with anyio.CancelScope(shield=True):
                    async with proc.stdin_lock:
                        if proc.stdin_closed or proc.proxy is None:
                            return
                        await proc.proxy.send_stdin(data)
                        if not data:
                            proc.stdin_closed = True
                            return

    async def _start_io(self, task: Task, proc: Process) -> None:
        self.tg.start_soon(self._relay, task, proc)
        if proc.stdin is not None and proc.stdin.fd is not None:
            self.tg.start_soon(self._forward_stdin, proc)

    # ---- methods --------------------------------------------------------------------------

    async def create(self, req: shim_pb2.CreateTaskRequest, info: CallInfo) -> Message:
        if req.id in self.tasks:
            raise TtrpcError(Code.ALREADY_EXISTS, f"task {req.id}: already exists")
        if req.checkpoint:
            raise TtrpcError(Code.UNIMPLEMENTED, "checkpoint/restore is not supported")
        try:
            spec = bundles.read_config(req.bundle)
            process = bundles.process_params(spec.get("process"))
        except bundles.BundleError as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, str(exc)) from None
        process["terminal"] = req.terminal
        rootfs = os.path.join(req.bundle, "rootfs")
        mounts = [bundles.RootMount(m.type, m.source, tuple(m.options)) for m in req.rootfs]
        proc = Process(req.id, "", req.stdin, req.stdout, req.stderr, req.terminal)
        mounted = False
        created = False
        began = time.monotonic()
        try:
            mounted = bundles.mount_rootfs(mounts, rootfs, readonly=bundles.readonly_root(spec))
            await self._ensure_pod(spec, req.id)
            pod_ready = time.monotonic()
            proc.open_stdio()
            result = await self.hyperd.call(
                "container.create",
                {
                    "pod": self._pod(),
                    "id": req.id,
                    "rootfs": {"path": rootfs, "readonly": bundles.readonly_root(spec)},
                    "process": process,
                    "mounts": bundles.mount_params(spec),
                    "shim_pid": os.getpid(),
                },
            )
            created = True
            await self._claim(proc, result["proxy_url"], result["token"])
        except BaseException as exc:
            proc.close_stdio()
            if proc.proxy is not None:
                await proc.proxy.aclose()
            with anyio.CancelScope(shield=True):
                if created:
                    await self._forget_container(req.id)
                if mounted:
                    bundles.unmount(rootfs)
                if not self.tasks:
                    await self._remove_pod()
            if isinstance(exc, bundles.BundleError | StdioError):
                raise TtrpcError(Code.INVALID_ARGUMENT, str(exc)) from None
            raise
        proc.pid = self.vm_pid
        task = Task(req.id, req.bundle, mounted, proc, create_request=req)
        self.tasks[req.id] = task
        log.info(
            "created task %s in pod %s: pod ready after %.3f s, container after %.3f s more",
            req.id, self.pod, pod_ready - began, time.monotonic() - pod_ready,
        )  # fmt: skip
        self.publisher.publish(
            "/tasks/create",
            events_pb2.TaskCreate(
                container_id=req.id,
                bundle=req.bundle,
                rootfs=[
                    mount_pb2.Mount(type=m.type, source=m.source, options=m.options)
                    for m in req.rootfs
                ],
                io=events_pb2.TaskIO(
                    stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, terminal=req.terminal
                ),
                pid=proc.pid,
            ),
        )
        return shim_pb2.CreateTaskResponse(pid=proc.pid)

    async def start(self, req: shim_pb2.StartRequest, info: CallInfo) -> Message:
        task = self._task(req.id)
        proc = self._process(req.id, req.exec_id)
        if proc.status != Status.CREATED:
            raise TtrpcError(
                Code.FAILED_PRECONDITION, f"process {req.exec_id or req.id} was already started"
            )
        await self._start_io(task, proc)
        try:
            if req.exec_id:
                await self.hyperd.call(
                    "exec.start", {"pod": self._pod(), "exec_id": proc.hyperd_exec_id}
                )
            else:
                await self.hyperd.call("container.start", {"pod": self._pod(), "id": req.id})
        except BaseException:
            proc.start_announced.set()
            with anyio.CancelScope(shield=True):
                if proc.proxy is not None:
                    await proc.proxy.aclose()  # the relay then reports the process as lost
            raise
        proc.pid = self.vm_pid
        if not proc.exited.is_set():
            proc.status = Status.RUNNING
        if req.exec_id:
            self.publisher.publish(
                "/tasks/exec-started",
                events_pb2.TaskExecStarted(container_id=req.id, exec_id=req.exec_id, pid=proc.pid),
            )
        else:
            self.publisher.publish(
                "/tasks/start", events_pb2.TaskStart(container_id=req.id, pid=proc.pid)
            )
        proc.start_announced.set()
        return shim_pb2.StartResponse(pid=proc.pid)

    async def state(self, req: shim_pb2.StateRequest, info: CallInfo) -> Message:
        task = self._task(req.id)
        proc = self._process(req.id, req.exec_id)
        resp = shim_pb2.StateResponse(
            id=req.exec_id or req.id,
            bundle=task.bundle,
            pid=proc.pid,
            status=int(proc.status),  # type: ignore[arg-type]
            stdin=proc.stdin_path,
            stdout=proc.stdout_path,
            stderr=proc.stderr_path,
            terminal=proc.terminal,
            exit_status=proc.exit_status,
            exec_id=req.exec_id,
        )
        if proc.exited.is_set():
            resp.exited_at.CopyFrom(timestamp(proc.exited_at))
        return resp

    async def wait(self, req: shim_pb2.WaitRequest, info: CallInfo) -> Message:
        proc = self._process(req.id, req.exec_id)
        await proc.exited.wait()
        return shim_pb2.WaitResponse(
            exit_status=proc.exit_status, exited_at=timestamp(proc.exited_at)
        )

    async def kill(self, req: shim_pb2.KillRequest, info: CallInfo) -> Message:
        task = self._task(req.id)
        proc = self._process(req.id, req.exec_id)
        if proc.exited.is_set():
            raise TtrpcError(Code.NOT_FOUND, "process already finished: not found")
        if proc.status == Status.CREATED:
            # Never started in the VM: there is nothing to signal there (and hyperd would signal
            # the shim itself, the container's shim_pid). A terminating signal ends it here.
            if req.signal in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                proc.start_announced.set()
                if proc.proxy is not None:
                    await proc.proxy.aclose()
                    proc.proxy = None
                await self._exited(task, proc, SIGNAL_EXIT_BASE + req.signal)
            return empty_pb2.Empty()
        if req.exec_id:
            if proc.proxy is not None:
                await proc.proxy.send_signal(req.signal)
        else:
            await self.hyperd.call(
                "container.kill",
                {"pod": self._pod(), "id": req.id, "signal": req.signal, "all": req.all},
            )
        return empty_pb2.Empty()

    async def exec(self, req: shim_pb2.ExecProcessRequest, info: CallInfo) -> Message:
        task = self._task(req.id)
        if req.exec_id in task.execs:
            raise TtrpcError(Code.ALREADY_EXISTS, f"exec {req.exec_id}: already exists")
        if task.init.status != Status.RUNNING:
            raise TtrpcError(Code.FAILED_PRECONDITION, f"task {req.id} is not running")
        try:
            oci = json.loads(req.spec.value) if req.spec.value else None
            process = bundles.process_params(oci)
        except (ValueError, bundles.BundleError) as exc:
            raise TtrpcError(Code.INVALID_ARGUMENT, f"exec spec: {exc}") from None
        process["terminal"] = req.terminal
        proc = Process(req.id, req.exec_id, req.stdin, req.stdout, req.stderr, req.terminal)
        task.execs[req.exec_id] = proc  # reserved while hyperd works
        try:
            proc.open_stdio()
            result = await self.hyperd.call(
                "exec.create", {"pod": self._pod(), "container": req.id, "process": process}
            )
            proc.hyperd_exec_id = result["exec_id"]
            await self._claim(proc, result["proxy_url"], result["token"])
        except BaseException as exc:
            task.execs.pop(req.exec_id, None)
            proc.close_stdio()
            if proc.proxy is not None:
                with anyio.CancelScope(shield=True):
                    await proc.proxy.aclose()
            if isinstance(exc, StdioError):
                raise TtrpcError(Code.INVALID_ARGUMENT, str(exc)) from None
            raise
        proc.pid = self.vm_pid
        self.publisher.publish(
            "/tasks/exec-added",
            events_pb2.TaskExecAdded(container_id=req.id, exec_id=req.exec_id),
        )
        return empty_pb2.Empty()

    async def resize_pty(self, req: shim_pb2.ResizePtyRequest, info: CallInfo) -> Message:
        proc = self._process(req.id, req.exec_id)
        if not proc.terminal:
            raise TtrpcError(Code.FAILED_PRECONDITION, "the process has no terminal")
        if proc.proxy is not None and not proc.exited.is_set():
            await proc.proxy.send_winsize(req.width, req.height)
        return empty_pb2.Empty()

    async def close_io(self, req: shim_pb2.CloseIORequest, info: CallInfo) -> Message:
        proc = self._process(req.id, req.exec_id)
        if not req.stdin:
            return empty_pb2.Empty()
        if proc.stdin_scope is not None:
            proc.stdin_scope.cancel()
        async with proc.stdin_lock:
            if proc.stdin_closed or proc.proxy is None:
                return empty_pb2.Empty()
            proc.stdin_closed = True
            chunks = proc.stdin.read_available() if proc.stdin is not None else []
            for chunk in chunks:
                await proc.proxy.send_stdin(chunk)
            await proc.proxy.send_stdin(b"")
        return empty_pb2.Empty()

    async def pids(self, req: shim_pb2.PidsRequest, info: CallInfo) -> Message:
        task = self._task(req.id)
        pids: list[int] = []
        if task.init.status == Status.RUNNING and not task.init.exited.is_set():
            try:
                result = await self.hyperd.call(
                    "container.ps", {"pod": self._pod(), "id": req.id, "format": "json"}
                )
                parsed = json.loads(result.get("output") or "[]")
                pids = [int(p) for p in parsed if isinstance(p, int)]
            except (HyperdError, ValueError, TypeError) as exc:
                log.warning("ps of %s: %s", req.id, exc)
        if not pids and task.init.pid:
            pids = [task.init.pid]
        return shim_pb2.PidsResponse(processes=[task_types_pb2.ProcessInfo(pid=p) for p in pids])

    async def delete(self, req: shim_pb2.DeleteRequest, info: CallInfo) -> Message:
        task = self._task(req.id)
        proc = self._process(req.id, req.exec_id)
        if proc.status == Status.RUNNING and not proc.exited.is_set():
            raise TtrpcError(
                Code.FAILED_PRECONDITION, f"process {req.exec_id or req.id} is still running"
            )
        if not proc.exited.is_set():  # created, never started
            proc.start_announced.set()
            if proc.proxy is not None:
                await proc.proxy.aclose()
                proc.proxy = None
            proc.close_stdio()
        resp = shim_pb2.DeleteResponse(pid=proc.pid, exit_status=proc.exit_status)
        resp.exited_at.CopyFrom(timestamp(proc.exited_at or time.time()))
        if req.exec_id:
            task.execs.pop(req.exec_id, None)
            return resp
        for other in list(task.execs.values()):
            other.close_stdio()
            if other.proxy is not None:
                await other.proxy.aclose()
        with anyio.CancelScope(shield=True):
            await self._forget_container(req.id)
            if task.rootfs_mounted:
                try:
                    bundles.unmount(os.path.join(task.bundle, "rootfs"))
                except bundles.BundleError as exc:
                    log.warning("%s", exc)
            del self.tasks[req.id]
            if not self.tasks:
                await self._remove_pod()
        self.publisher.publish(
            "/tasks/delete",
            events_pb2.TaskDelete(
                container_id=req.id,
                pid=proc.pid,
                exit_status=proc.exit_status,
                exited_at=resp.exited_at,
            ),
        )
        return resp

    async def connect(self, req: shim_pb2.ConnectRequest, info: CallInfo) -> Message:
        task = self.tasks.get(req.id)
        return shim_pb2.ConnectResponse(
            shim_pid=os.getpid(), task_pid=task.init.pid if task else 0, version=VERSION
        )

    async def shutdown_rpc(self, req: shim_pb2.ShutdownRequest, info: CallInfo) -> Message:
        if not self.tasks:
            self.shutdown.set()
        return empty_pb2.Empty()

    # ---- hyperd clean-up ------------------------------------------------------------------

    async def _forget_container(self, cid: str) -> None:
        """Stop and delete the container in hyperd; what is already gone is fine."""
        if self.pod is None:
            return
        for method in ("container.stop", "container.delete"):
            try:
                await self.hyperd.call(method, {"pod": self.pod, "id": cid})
            except HyperdError as exc:
                if exc.kind not in ("not_found", "invalid_state"):
                    log.warning("%s", exc)

    async def _remove_pod(self) -> None:
        """Stop and delete the pod once its last task is gone (if this shim created it)."""
        if self.pod is None or not self.pod_created:
            self.pod = None
            return
        for method in ("pod.stop", "pod.delete"):
            try:
                await self.hyperd.call(method, {"id": self.pod})
            except HyperdError as exc:
                if exc.kind not in ("not_found", "invalid_state"):
                    log.warning("%s", exc)
        self.pod, self.pod_created = None, False

    async def close(self) -> None:
        """On exit: release what the remaining tasks hold (their pod stays if tasks remain)."""
        for task in self.tasks.values():
            for proc in [task.init, *task.execs.values()]:
                proc.close_stdio()
                if proc.proxy is not None:
                    await proc.proxy.aclose()


__all__ = ["SERVICE", "ShimError", "TaskService"]
