"""The RPC API v1: params Structs and the method table that maps each method to the daemon.

JSON-RPC 2.0, one JSON text per line, on hyperd's unix socket; batches and notifications work.
Params are by name; unknown keys are refused. Every application error carries ``data.kind``:
``not_found``, ``already_exists``, ``invalid_state``, ``invalid_params``, ``vm_unavailable``,
``timeout``, ``agent_error``, ``proxy_error`` (``unauthorized`` at connect time); its message
names the object and the cause.

Methods (``params`` → ``result``):

- ``hyperd.version {}`` → ``{version, api, dialects}``
- ``hyperd.health {}`` → ``{status: "ok"|"degraded", pods: {state: count}, unreachable: [pod],
  subscribers}``
- ``hyperd.stats {}`` → ``{vms: {pod: {queued, in_flight, sent, failed, timed_out, reconnects,
  last_rtt, reachable, spare_tokens, spare_tokens_used}}, rpc, events, exits, timings: {key:
  {count, p50_us, p99_us, mean_us}}}`` (:mod:`hyperd.timings`)
- ``pod.create {id, hostname?, vm?: {backend: "sim", dialect?: "cc"|"hyper"} |
  {backend: "external", ctl, tty, console?}, proxy?: {mode: "pod"} | {mode: "system", url},
  netns?, share_dir?, share_tag?, agent_dialect?: "cc"|"hyper"}`` → the pod (as ``pod.inspect``),
  state ``created``; nothing is started yet.
- ``pod.start {id}``: start the sim VM and per-pod proxy when hyperd runs them, RegisterVM,
  detect the agent dialect (Hyper ``version``), read the netns, STARTPOD → the pod, ``running``.
- ``pod.stop {id}``: DESTROYPOD, UnregisterVM, stop what hyperd started, undo every mount →
  the pod, ``stopped``. Also for ``unreachable`` pods. A stopped pod can be started again.
- ``pod.delete {id}`` (``created``/``stopped`` only) → ``{id, state: "deleted"}``
- ``pod.list {}`` → ``{pods: [{id, state, backend, proxy_mode, dialect, containers,
  created_at}]}``
- ``pod.inspect {id}`` → ``{id, state, reason, hostname, vm, proxy, proxy_url, netns, share_dir,
  share_tag, ctl, tty, vm_pid, proxy_pid, dialect, containers: [...], execs: [...]}``
- ``container.create {pod, id, rootfs: {path, readonly?} | {block: {index, fstype, driver?}},
  process: {args, env?, cwd?, user?, group?, additional_groups?, terminal?,
  no_new_privileges?, capabilities?}, mounts?: [{source, destination, type?, options?}],
  devices?: [{guest_path, container_path, scsi_addr?}], resources?: {cpu_quota?, cpu_period?,
  cpu_shares?}, bind_mount_dev?, shim_pid?}`` → ``{id, token, proxy_url, state: "created"}``;
  no agent command yet.
- ``container.start {pod, id}``: bind mounts, then NEWCONTAINER with the token (the proxy holds
  it until a shim has claimed the token with ConnectShim) → the container (``container.inspect``)
- ``container.stop {pod, id}``: REMOVECONTAINER, undo its mounts → the container, ``stopped``
- ``container.delete {pod, id}`` (``created``/``stopped`` only) → ``{pod, id, state: "deleted"}``
- ``container.kill {pod, id, signal: int | "TERM" | "SIGKILL", all?}`` →
  ``{id, signal, target: "agent"|"shim"}`` (before start: the shim is signalled through the
  pidfd pinned at create)
- ``container.wait {pod, id, timeout?}`` / ``exec.wait {pod, exec_id, timeout?}`` →
  ``{exit_status, exited_at, reason}`` once the process has ended (at once if it has);
  ``timeout`` (seconds) gives a ``timeout`` error, the process keeps running; a client that
  disconnects cancels its wait; ``invalid_state`` when the pod's exits are not observable
- ``container.ps {pod, id, format?: "table"|"json", args?: [str]}`` → ``{output}`` (CC only)
- ``container.list {pod}`` → ``{containers: [container]}``
- ``container.inspect {pod, id}`` → ``{pod, id, state, args, rootfs, token, proxy_url,
  exit_status, exited_at, exit_reason, exit_watch: "proxy"|"shim_pid"|"none"|"unknown",
  shim_pid, mounts, execs, created_at}``
- ``exec.create {pod, container, process, exec_id?}`` → ``{exec_id, token, proxy_url, state}``
- ``exec.start {pod, exec_id}``: EXECCMD with the token → ``{exec_id, container, state}``
- ``exec.inspect {pod, exec_id}`` → ``{exec_id, container, state, args, exit_status,
  exited_at, exit_reason, exit_watch, token, proxy_url}``
- ``events.subscribe {}`` → ``{subscribed: true}``, then notifications
  ``{"method": "event", "params": {kind: "pod"|"container"|"exec"|"vm", pod, container?,
  exec_id?, state, reason?, time}}`` until the connection closes. A subscriber that falls
  behind the event bus gets one ``events.dropped`` notification ``{reason}`` and no more events
  (subscribe again); one whose connection does not read its queued notifications
  (``rpc.notify_queue``) is disconnected.
- ``container.create`` by a caller other than root: ``rootfs.path`` and bind ``mounts[].source``
  must lie under ``rpc.allowed_host_paths`` when that is set (else ``invalid_params`` naming
  the path).

Nested process/rootfs/mount/device/resources objects are decoded with :func:`hyperd.spec.parse`
inside the handler, so that every problem in them becomes an ``invalid_params`` error naming
the field.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Coroutine
from typing import Any, Literal

import anyio
import anyio.abc
import msgspec

from hyperd.daemon import containers as ops
from hyperd.daemon import exits
from hyperd.daemon.events import SUBSCRIBER_BUFFER
from hyperd.daemon.model import ProxySpec, VMSpec
from hyperd.daemon.service import Daemon
from hyperd.errors import HyperdError
from hyperd.rpc.access import HostPathPolicy
from hyperd.rpc.methods import CallContext, MethodTable
from hyperd.spec import DeviceSpec, MountSpec, ProcessSpec, ResourcesSpec, RootfsSpec, parse

JSONObject = dict[str, Any]


class _Params(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class PodCreate(_Params):
    id: str
    hostname: str | None = None
    vm: VMSpec | None = None
    proxy: ProxySpec | None = None
    netns: str | None = None
    share_dir: str | None = None
    share_tag: str | None = None
    agent_dialect: Literal["cc", "hyper"] | None = None


class PodRef(_Params):
    id: str


class PodOnly(_Params):
    pod: str


class ContainerCreate(_Params):
    pod: str
    id: str
    rootfs: JSONObject
    process: JSONObject
    mounts: list[JSONObject] = []
    devices: list[JSONObject] = []
    resources: JSONObject | None = None
    bind_mount_dev: bool = False
    shim_pid: int | None = None


class ContainerRef(_Params):
    pod: str
    id: str


class ContainerWait(_Params):
    pod: str
    id: str
    timeout: float | None = None


class ExecWait(_Params):
    pod: str
    exec_id: str
    timeout: float | None = None


class ContainerKill(_Params):
    pod: str
    id: str
    signal: int | str
    all: bool = False


class ContainerPs(_Params):
    pod: str
    id: str
    format: str = "table"
    args: list[str] = []


class ExecCreate(_Params):
    pod: str
    container: str
    process: JSONObject
    exec_id: str | None = None


class ExecRef(_Params):
    pod: str
    exec_id: str


class Empty(_Params):
    pass


def _decode_list(cls: type[Any], items: list[JSONObject], field: str) -> list[Any]:
    out = []
    for i, item in enumerate(items):
        try:
            out.append(parse(cls, item))
        except Exception as exc:
            from hyperd.errors import InvalidParams

            if isinstance(exc, InvalidParams):
                raise InvalidParams(f"{field}[{i}]: {exc.message}", **exc.data) from None
            raise
    return out


Handler = Callable[[Any, CallContext], Any]  # async def, or a plain function (see hyperd.rpc)


def build_methods(d: Daemon) -> MethodTable:
    """The method table of API v1 bound to ``d``."""
    table = MethodTable()
    table.timings = d.timings

    def add(name: str, params: type[msgspec.Struct]) -> Callable[[Handler], Handler]:
        def decorate(fn: Handler) -> Handler:
            table.register(name, fn, params)
            return fn

        return decorate

    @add("hyperd.version", Empty)
    async def version(p: Empty, ctx: CallContext) -> Any:
        return d.version()

    @add("hyperd.health", Empty)
    async def health(p: Empty, ctx: CallContext) -> Any:
        return d.health()

    @add("hyperd.stats", Empty)
    async def stats(p: Empty, ctx: CallContext) -> Any:
        return d.stats()

    @add("pod.create", PodCreate)
    async def pod_create(p: PodCreate, ctx: CallContext) -> Any:
        return await d.pod_create(
            p.id,
            hostname=p.hostname,
            vm=p.vm,
            proxy=p.proxy,
            netns=p.netns,
            share_dir=p.share_dir,
            share_tag=p.share_tag,
            agent_dialect=p.agent_dialect,
        )

    @add("pod.start", PodRef)
    async def pod_start(p: PodRef, ctx: CallContext) -> Any:
        return await d.pod_start(p.id)

    @add("pod.stop", PodRef)
    async def pod_stop(p: PodRef, ctx: CallContext) -> Any:
        return await d.pod_stop(p.id)

    @add("pod.delete", PodRef)
    async def pod_delete(p: PodRef, ctx: CallContext) -> Any:
        return await d.pod_delete(p.id)

    @add("pod.list", Empty)
    async def pod_list(p: Empty, ctx: CallContext) -> Any:
        return d.pod_list()

    @add("pod.inspect", PodRef)
    async def pod_inspect(p: PodRef, ctx: CallContext) -> Any:
        return d.pod_inspect(p.id)

    host_paths = HostPathPolicy(d.config.rpc.allowed_host_paths)

    @add("container.create", ContainerCreate)
    async def container_create(p: ContainerCreate, ctx: CallContext) -> Any:
        rootfs = parse(RootfsSpec, p.rootfs)
        mounts = _decode_list(MountSpec, p.mounts, "mounts")
        restricted = host_paths.restricts(ctx.peer)
        if restricted:
            if rootfs.path is not None:
                host_paths.check(ctx.peer, "rootfs.path", rootfs.path)
            for index, mount in enumerate(mounts):
                if mount.type == "bind":
                    host_paths.check(ctx.peer, f"mounts[{index}].source", mount.source)
            # what was checked is what gets mounted: the resolved paths, which the mount then
            # opens refusing any symlink (one swapped in before container.start included)
            rootfs, mounts = resolved_sources(rootfs, mounts)
        return await ops.container_create(
            d,
            p.pod,
            p.id,
            rootfs=rootfs,
            process=parse(ProcessSpec, p.process),
            mounts=mounts,
            devices=_decode_list(DeviceSpec, p.devices, "devices"),
            resources=parse(ResourcesSpec, p.resources) if p.resources is not None else None,
            bind_mount_dev=p.bind_mount_dev,
            shim_pid=p.shim_pid,
            caller_uid=ctx.peer.uid,
            sources_resolved=restricted,
        )

    @add("container.start", ContainerRef)
    async def container_start(p: ContainerRef, ctx: CallContext) -> Any:
        return await ops.container_start(d, p.pod, p.id)

    @add("container.stop", ContainerRef)
    async def container_stop(p: ContainerRef, ctx: CallContext) -> Any:
        return await ops.container_stop(d, p.pod, p.id)

    @add("container.delete", ContainerRef)
    async def container_delete(p: ContainerRef, ctx: CallContext) -> Any:
        return await ops.container_delete(d, p.pod, p.id)

    # plain functions (no task per call): the agent's reply comes as a Pending
    @add("container.kill", ContainerKill)
    def container_kill(p: ContainerKill, ctx: CallContext) -> Any:
        return ops.container_kill(d, p.pod, p.id, p.signal, p.all)

    @add("container.wait", ContainerWait)
    async def container_wait(p: ContainerWait, ctx: CallContext) -> Any:
        return await _unless_gone(ctx, exits.wait(d, p.pod, "container", p.id, p.timeout))

    @add("container.ps", ContainerPs)
    def container_ps(p: ContainerPs, ctx: CallContext) -> Any:
        return ops.container_ps(d, p.pod, p.id, p.format, p.args)

    @add("container.list", PodOnly)
    async def container_list(p: PodOnly, ctx: CallContext) -> Any:
        return ops.container_list(d, p.pod)

    @add("container.inspect", ContainerRef)
    async def container_inspect(p: ContainerRef, ctx: CallContext) -> Any:
        return ops.container_inspect(d, p.pod, p.id)

    @add("exec.create", ExecCreate)
    async def exec_create(p: ExecCreate, ctx: CallContext) -> Any:
        process = parse(ProcessSpec, p.process)
        return await ops.exec_create(d, p.pod, p.container, process, p.exec_id)

    @add("exec.start", ExecRef)
    async def exec_start(p: ExecRef, ctx: CallContext) -> Any:
        return await ops.exec_start(d, p.pod, p.exec_id)

    @add("exec.wait", ExecWait)
    async def exec_wait(p: ExecWait, ctx: CallContext) -> Any:
        return await _unless_gone(ctx, exits.wait(d, p.pod, "exec", p.exec_id, p.timeout))

    @add("exec.inspect", ExecRef)
    async def exec_inspect(p: ExecRef, ctx: CallContext) -> Any:
        return ops.exec_inspect(d, p.pod, p.exec_id)

    @add("events.subscribe", Empty)
    async def events_subscribe(p: Empty, ctx: CallContext) -> Any:
        await d.tg.start(functools.partial(_forward_events, d, ctx))
        return {"subscribed": True}

    return table


async def _unless_gone(ctx: CallContext, work: Coroutine[Any, Any, Any]) -> Any:
    """Run ``work``, cancelled if the client goes away first (nobody would read its answer)."""
    outcome: list[Any] = []
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            outcome.append(await work)
            tg.cancel_scope.cancel()

        tg.start_soon(run)
        await ctx.wait_hangup()
        tg.cancel_scope.cancel()
    if not outcome:
        raise HyperdError(f"{ctx.method}: the client went away; the call was cancelled")
    return outcome[0]


async def _forward_events(
    d: Daemon, ctx: CallContext, *, task_status: anyio.abc.TaskStatus[None]
) -> None:
    """Push every event to the subscriber as an ``event`` notification until it goes away."""
    async with d.bus.subscribe() as events, anyio.create_task_group() as tg:
        task_status.started()

        async def until_closed() -> None:
            await ctx.wait_closed()
            tg.cancel_scope.cancel()

        tg.start_soon(until_closed)
        async for event in events:
            if not ctx.notify("event", event):
                break  # the connection is gone, or was dropped for not reading its queue
        else:
            # the bus dropped this subscriber (it fell behind): say so, rather than go quiet
            ctx.notify(
                "events.dropped",
                {"reason": f"fell {SUBSCRIBER_BUFFER} events behind; subscribe again"},
            )
        tg.cancel_scope.cancel()


def resolved_sources(
    rootfs: RootfsSpec, mounts: list[MountSpec]
) -> tuple[RootfsSpec, list[MountSpec]]:
    """The rootfs and bind mounts with their host paths' symlinks resolved (now, once)."""
    if rootfs.path is not None:
        rootfs = msgspec.structs.replace(rootfs, path=os.path.realpath(rootfs.path))
    return rootfs, [
        msgspec.structs.replace(m, source=os.path.realpath(m.source)) if m.type == "bind" else m
        for m in mounts
    ]
