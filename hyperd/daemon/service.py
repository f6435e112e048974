"""The daemon's core: the pod registry, the pod lifecycle and each pod's VM link.

:class:`Daemon` owns every :class:`~hyperd.daemon.model.PodRecord` (persisted through
:class:`hyperd.daemon.persist.PodPersistence` after every change, intent first), the helper
processes it started for each pod
(simulated VM, per-pod proxy), and one long-lived *link task* per running pod that keeps the VM's
proxy connection open, watches the helper processes, and turns what the VM reports on its own
(VM lost, process exited) into state changes and events.

Concurrency: lifecycle operations on a pod (start, stop, delete) hold the pod's lock; operations
on one container hold that container's lock; everything else (ps, kill, exec, list) runs
concurrently, and the VM's command queue orders the agent commands.

Container and exec operations live in :mod:`hyperd.daemon.containers`.

Saves are synchronous, on the event loop: a commit to the state database is one ``write`` to
its WAL (some 20 µs), cheaper than handing it to a worker thread, and a save can then never be
overtaken by a later one. A save that fails raises :class:`hyperd.errors.StateError`; the
operation undoes what it started, or, past the point where the agent acted, says so.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, Final

import anyio
import anyio.abc

from hyperd import __version__ as HYPERD_VERSION
from hyperd.config import Config
from hyperd.daemon import bridge, exits, launcher, podfs, qemuvm, testhooks
from hyperd.daemon.events import EventBus
from hyperd.daemon.model import (
    ContainerRecord,
    ContainerState,
    ExecRecord,
    ExecState,
    LaunchIntent,
    MountRecord,
    PodRecord,
    PodState,
    ProcessRef,
    ProxySpec,
    VMSpec,
    check_pod_transition,
    pod_summary,
    pod_view,
)
from hyperd.daemon.persist import PodPersistence
from hyperd.daemon.qemuvm import check_qemu_spec
from hyperd.daemon.vmlink import AgentLink, LinkControl, LinkEvent, detect_dialect, open_link
from hyperd.errors import (
    AlreadyExists,
    HyperdError,
    InvalidParams,
    NotFound,
    StateError,
    VMUnavailable,
)
from hyperd.rpc.access import SocketAccess, group_id
from hyperd.spec import validate_id
from hyperd.store import StateStore, StoreError
from hyperd.timings import Timings
from protocol.hyperstart import Container

log = logging.getLogger(__name__)

# the built-in helpers log at the daemon's level (``[log] level``), in their own level names
_SIM_LOG_LEVELS: Final = {"debug": "DEBUG", "info": "INFO", "warning": "WARNING", "error": "ERROR"}
_PROXY_LOG_LEVELS: Final = {"debug": "debug", "info": "info", "warning": "warn", "error": "error"}

MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes including the NUL
DEFAULT_SHARE_TAG = "hyperShared"  # the VM's 9p mount tag, as in the seed
MAX_HOSTNAME = 64  # hyperstart truncates longer hostnames; the seed cuts them first


@dataclass
class PreMount:
    """A container's rootfs and volumes being mounted ahead of its start, right after the answer
    of ``container.create`` (see :mod:`hyperd.daemon.containers`): ``records`` once made; still
    ``None`` once ``done`` if it failed (``container.start`` then mounts itself and reports the
    error)."""

    done: anyio.Event = field(default_factory=anyio.Event)
    records: list[MountRecord] | None = None


@dataclass
class PodRuntime:
    """What hyperd holds for a pod beyond its record: locks, the VM link and its task."""

    lock: anyio.Lock = field(default_factory=anyio.Lock)
    container_locks: dict[str, anyio.Lock] = field(default_factory=dict)
    link: AgentLink | None = None
    control: LinkControl | None = None
    stop_link: anyio.Event = field(default_factory=anyio.Event)
    link_done: anyio.Event | None = None
    stopping: bool = False
    exits: exits.PodExits = field(default_factory=exits.PodExits)
    premounts: dict[str, PreMount] = field(default_factory=dict)
    messages: dict[str, Container] = field(default_factory=dict)
    """NEWCONTAINER messages built by ``container.create`` (its check of what the dialect can
    carry), for the start to send when no volume changes them; taken by start or delete."""

    async def premount_of(self, cid: str) -> PreMount | None:
        """The container's mounting ahead, once it has ended (None: there was none); it is
        taken: a second call returns None."""
        pre = self.premounts.pop(cid, None)
        if pre is not None and not pre.done.is_set():  # (no yield to the loop when it is over)
            with anyio.CancelScope(shield=True):
                await pre.done.wait()
        return pre

    async def settle_premounts(self) -> None:
        """Wait until no mount is being made ahead (before the pod's share is cleaned)."""
        for cid in list(self.premounts):
            await self.premount_of(cid)

    def container_lock(self, cid: str) -> anyio.Lock:
        lock = self.container_locks.get(cid)
        if lock is None:
            # fast_acquire: an uncontended acquire does not yield to the event loop first
            lock = self.container_locks[cid] = anyio.Lock(fast_acquire=True)
        return lock


class Daemon:
    """Pods, containers and exec processes, and the operations of the RPC API on them."""

    def __init__(
        self,
        config: Config,
        store: StateStore,
        task_group: anyio.abc.TaskGroup,
        bus: EventBus | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.tg = task_group
        self.bus = bus or EventBus()
        self.timings = Timings()  # where the time of each step goes (hyperd.stats)
        self.persist = PodPersistence(store)
        self.pods: dict[str, PodRecord] = {}
        self.runtime: dict[str, PodRuntime] = {}
        self.rpc_statistics: Callable[[], dict[str, Any]] | None = None  # set by serve()
        self.state_problems: list[str] = []  # what loading the state set aside
        self.state_failures = 0  # saves that failed
        self.last_state_failure = ""
        self.stopping = False  # shutting down: waits end (see end_waits)

    # ---- registry and persistence -------------------------------------------------------

    def get_pod(self, pod_id: object) -> PodRecord:
        """The pod ``pod_id``; raises ``InvalidParams`` for a bad id, ``NotFound`` if unknown."""
        if type(pod_id) is str:
            pod = self.pods.get(pod_id)
            if pod is not None:  # a pod's id was valid when it was created
                return pod
        pid = validate_id("pod", pod_id)
        pod = self.pods.get(pid)
        if pod is None:
            raise NotFound(f"pod {pid!r} not found", pod=pid)
        return pod

    def rt(self, pod: PodRecord) -> PodRuntime:
        """The pod's runtime part (made on first use: not on every call, it holds locks and
        events)."""
        rt = self.runtime.get(pod.id)
        if rt is None:
            rt = self.runtime[pod.id] = PodRuntime()
        return rt

    async def save(self, pod: PodRecord, *records: ContainerRecord | ExecRecord) -> None:
        """:meth:`save_now` (for callers that await it)."""
        self.save_now(pod, *records)

    def save_now(self, pod: PodRecord, *records: ContainerRecord | ExecRecord) -> None:
        """Persist ``records`` as they are now (a container or exec operation: the pod's own
        fields did not change), or, if none is named, ``pod``'s own fields and every container
        and exec of it; one transaction. Raises ``StateError`` (the stored rows unchanged). A
        pod that was forgotten is not saved."""
        if self.pods.get(pod.id) is not pod:
            return
        start = perf_counter()
        try:
            self.persist.save(pod, records or None)
        except StoreError as exc:
            self.state_failures += 1
            self.last_state_failure = exc.message
            raise
        finally:
            self.timings.since("state.save", start)

    def save_soon(self, pod: PodRecord, *records: ContainerRecord | ExecRecord) -> None:
        """:meth:`save_logged` once the current task step is over: after the answer of the call
        under way has been written. Only for a change whose intent was saved before it was made
        (a crash before this save leaves that intent, which a restart settles to the same
        state; see :mod:`hyperd.daemon.adoption`)."""
        asyncio.get_running_loop().call_soon(functools.partial(self.save_logged, pod, *records))

    def save_logged(self, pod: PodRecord, *records: ContainerRecord | ExecRecord) -> None:
        """:meth:`save_now` for changes nobody waits on (events from the VM): a failure is
        logged and shown by ``hyperd.health``; a restart reconciles the pod with its VM."""
        try:
            self.save_now(pod, *records)
        except StateError as exc:
            log.error("saving the pod's state failed: %s", exc, extra={"pod": pod.id})

    async def forget(self, pod: PodRecord) -> None:
        """Delete the pod's records, then forget it; raises ``StateError`` (then it stays)."""
        try:
            self.persist.forget(pod)
        except StoreError as exc:
            self.state_failures += 1
            self.last_state_failure = exc.message
            raise
        self.pods.pop(pod.id, None)
        rt = self.runtime.pop(pod.id, None)
        if rt is not None:
            rt.exits.close()

    def publish(self, kind: str, pod: PodRecord, state: str, **fields: Any) -> None:
        self.bus.publish(kind, pod.id, state, **fields)

    def status_line(self) -> str:
        """A one-line summary (sd_notify STATUS=)."""
        running = sum(1 for p in self.pods.values() if p.state == PodState.RUNNING)
        containers = sum(
            1
            for p in self.pods.values()
            for c in p.containers.values()
            if c.state == ContainerState.RUNNING
        )
        return f"{len(self.pods)} pods ({running} running), {containers} running containers"

    # ---- hyperd.* -------------------------------------------------------------------------

    def version(self) -> dict[str, Any]:
        return {"version": HYPERD_VERSION, "api": 1, "dialects": ["cc", "hyper"]}

    def health(self) -> dict[str, Any]:
        states: dict[str, int] = {}
        for p in self.pods.values():
            states[str(p.state)] = states.get(str(p.state), 0) + 1
        unreachable = sorted(p.id for p in self.pods.values() if p.state == PodState.UNREACHABLE)
        degraded = unreachable or self.state_problems or self.state_failures
        result: dict[str, Any] = {
            "status": "degraded" if degraded else "ok",
            "pods": states,
            "unreachable": unreachable,
            "subscribers": self.bus.subscribers,
        }
        if self.state_problems or self.state_failures:
            result["state"] = {
                "load_problems": self.state_problems,
                "save_failures": self.state_failures,
                "last_save_failure": self.last_state_failure,
            }
        return result

    def stats(self) -> dict[str, Any]:
        """Per-VM connection statistics, plus the RPC server's and the event bus's counters."""
        vms: dict[str, Any] = {}
        for pid, rt in self.runtime.items():
            if rt.link is not None:
                vms[pid] = rt.link.statistics()
        result: dict[str, Any] = {
            "vms": vms,
            "events": {"published": self.bus.published, "subscribers": self.bus.subscribers},
            "exits": {"waiting": exits.waiting(self)},
            "timings": self.timings.summary(),
        }
        if self.rpc_statistics is not None:
            result["rpc"] = self.rpc_statistics()
        return result

    # ---- pod.create / list / inspect / delete -----------------------------------------------

    def _pod_paths(self, pod_id: str) -> str:
        run = os.path.join(self.config.run_dir, pod_id)
        if len(os.path.join(run, "proxy.sock")) > MAX_SOCKET_PATH:
            raise InvalidParams(
                f"pod {pod_id!r}: socket paths under {self.config.run_dir} would exceed "
                f"{MAX_SOCKET_PATH} bytes; use a shorter id or run_dir",
                field="id",
            )
        return run

    def _share_dir(self, pod_id: str, requested: str | None) -> str:
        root = os.path.realpath(self.config.shared_root)
        if requested is None:
            return os.path.join(root, pod_id)
        if not os.path.isabs(requested) or "\x00" in requested:
            raise InvalidParams(
                f"invalid share_dir {requested!r}: must be an absolute path", field="share_dir"
            )
        real = os.path.realpath(requested)
        if os.path.dirname(real) != root:
            raise InvalidParams(
                f"invalid share_dir {requested!r}: must be a directory directly in the shared "
                f"root {root}",
                field="share_dir",
            )
        validate_id("share_dir", os.path.basename(real))
        return real

    def _check_share_free(self, pod_id: str, share_dir: str) -> None:
        for other in self.pods.values():
            if other.share_dir == share_dir:
                raise InvalidParams(
                    f"pod {pod_id!r}: share_dir {share_dir} is the share of pod {other.id!r}",
                    field="share_dir",
                )

    async def pod_create(
        self,
        pod_id: str,
        *,
        hostname: str | None,
        vm: VMSpec | None,
        proxy: ProxySpec | None,
        netns: str | None,
        share_dir: str | None,
        share_tag: str | None,
        agent_dialect: str | None,
    ) -> dict[str, Any]:
        """Record a new pod (state ``created``); nothing is started yet."""
        pid = validate_id("pod", pod_id)
        if pid in self.pods:
            raise AlreadyExists(f"pod {pid!r} already exists", pod=pid)
        vm = vm or VMSpec(backend=self.config.vm.backend)
        if vm.backend == "external" and not (vm.ctl and vm.tty):
            raise InvalidParams(
                f"pod {pid!r}: an external VM needs vm.ctl and vm.tty socket paths", field="vm"
            )
        if vm.backend in ("sim", "qemu") and (vm.ctl or vm.tty or vm.console):
            raise InvalidParams(
                f"pod {pid!r}: vm.ctl/tty/console are for external VMs only", field="vm"
            )
        qemu_only = ("kernel", "initrd", "memory_mib", "cpus", "accel", "kernel_args")
        if vm.backend != "qemu" and any(getattr(vm, k) is not None for k in qemu_only):
            raise InvalidParams(
                f"pod {pid!r}: vm.{'/'.join(qemu_only)} are for the qemu backend only", field="vm"
            )
        check_qemu_spec(pid, vm)
        for name in ("ctl", "tty", "console"):
            path = getattr(vm, name)
            if path is not None and (not path.startswith("/") or "\x00" in path):
                raise InvalidParams(f"invalid vm.{name} {path!r}: must be an absolute path")
        proxy = proxy or ProxySpec(mode=self.config.proxy.mode, url=self.config.proxy.url or None)
        if proxy.mode == "system":
            url = proxy.url or self.config.proxy.url
            if not url or not url.startswith("unix://"):
                raise InvalidParams(
                    f"pod {pid!r}: system proxy mode needs a unix:// url, got {url!r}",
                    field="proxy.url",
                )
            proxy = ProxySpec(mode="system", url=url)
        if netns is not None and (not netns.startswith("/") or "\x00" in netns):
            raise InvalidParams(f"invalid netns {netns!r}: must be an absolute path")
        tag = share_tag or DEFAULT_SHARE_TAG
        if not tag.isprintable() or len(tag) > MAX_HOSTNAME:
            raise InvalidParams(f"invalid share_tag {tag!r}", field="share_tag")
        run = self._pod_paths(pid)
        share = self._share_dir(pid, share_dir)
        self._check_share_free(pid, share)
        pod = PodRecord(
            id=pid,
            hostname=hostname if hostname is not None else pid,
            vm=vm,
            proxy=proxy,
            netns=netns,
            share_dir=share,
            share_tag=tag,
            agent_dialect=agent_dialect,
            run_dir=run,
            ctl_path=vm.ctl or os.path.join(run, "ctl.sock"),
            tty_path=vm.tty or os.path.join(run, "tty.sock"),
            proxy_url=proxy.url if proxy.mode == "system" and proxy.url else "",
        )
        self.pods[pid] = pod
        self.runtime[pid] = PodRuntime()
        try:
            self.save_now(pod)
        except StateError:
            del self.pods[pid], self.runtime[pid]
            raise
        self.publish("pod", pod, str(pod.state))
        log.info("pod created", extra={"pod": pid})
        return pod_view(pod)

    def pod_list(self) -> dict[str, Any]:
        return {"pods": [pod_summary(p) for p in sorted(self.pods.values(), key=lambda p: p.id)]}

    def pod_inspect(self, pod_id: object) -> dict[str, Any]:
        return pod_view(self.get_pod(pod_id))

    async def pod_delete(self, pod_id: object) -> dict[str, Any]:
        """Forget a pod that is not running; removes its share and run directories."""
        pod = self.get_pod(pod_id)
        async with self.rt(pod).lock:
            check_pod_transition(pod, "delete")
            await bridge.cleanup_pod(pod)
            await anyio.to_thread.run_sync(podfs.remove_dirs, pod)
            await self.forget(pod)
        self.bus.publish("pod", pod.id, "deleted")
        log.info("pod deleted", extra={"pod": pod.id})
        return {"id": pod.id, "state": "deleted"}

    # ---- pod.start --------------------------------------------------------------------------

    async def pod_start(self, pod_id: object) -> dict[str, Any]:
        """Start the pod's VM and proxy (when hyperd runs them), connect, and send STARTPOD."""
        pod = self.get_pod(pod_id)
        rt = self.rt(pod)
        async with rt.lock:
            check_pod_transition(pod, "start")
            before = pod.state
            try:
                await self._start_locked(pod, rt)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    try:
                        await self.teardown(pod, rt, unregister=True)
                    except HyperdError as exc:  # the start's own error is what the caller needs
                        log.error("undoing a failed start: %s", exc, extra={"pod": pod.id})
                    pod.state = before  # a failed start changes nothing
                    self.save_logged(pod)  # (else the restart finds what is left to undo)
                raise
        self.publish("pod", pod, str(pod.state))
        log.info("pod started", extra={"pod": pod.id})
        return pod_view(pod)

    async def _start_locked(self, pod: PodRecord, rt: PodRuntime) -> None:
        network = await bridge.discover_network(pod.netns) if pod.netns else None
        sockets = SocketAccess(self.config.rpc.file_mode(), group_id(self.config.rpc.group))
        await anyio.to_thread.run_sync(podfs.make_dirs, pod, sockets)
        deadline = self.config.timeouts.ready
        if pod.vm.backend == "sim":
            argv = [*self._sim_command(), "--ctl", pod.ctl_path, "--tty", pod.tty_path]
            argv += ["--share", pod.share_dir]
            if pod.vm.dialect:
                argv += ["--dialect", pod.vm.dialect]
            if pod.netns:
                argv += ["--netns", pod.netns]
            argv += testhooks.sim_args(pod.id)
            intent = self._intend(pod, "vm")
            what = f"simulated VM of pod {pod.id!r}"
            pod.vm_process = await launcher.launch(
                argv, what=what, deadline=deadline, marker=intent.marker
            )
            pod.launching.remove(intent)
            self.save_now(pod)
            testhooks.crash_point("pod.start:vm-launched")
        elif pod.vm.backend == "qemu":
            intent = self._intend(pod, "vm")
            pod.vm_process = await qemuvm.start_vm(
                pod, self.config, deadline=deadline, marker=intent.marker
            )
            pod.launching.remove(intent)
            self.save_now(pod)
        if pod.proxy.mode == "pod":
            sock = os.path.join(pod.run_dir, "proxy.sock")
            pod.proxy_url = f"unix://{sock}"
            what = f"proxy of pod {pod.id!r}"
            intent = self._intend(pod, "proxy")
            if self.config.proxy.command:
                # a configured proxy binary (e.g. the reference cc-proxy): its flags only, no
                # readiness handshake; the VM session retries connecting to it
                argv = [*self.config.proxy.command, "-uri", pod.proxy_url]
                pod.proxy_process = launcher.spawn(argv, what=what, marker=intent.marker)
            else:
                argv = [*launcher.python_module_argv("hyperd.proxy"), "--uri", pod.proxy_url]
                argv += ["--log-level", _PROXY_LOG_LEVELS[self.config.log.level]]
                argv += sockets.proxy_args()
                if pod.agent_dialect:
                    argv += ["--agent-dialect", pod.agent_dialect]
                if pod.vm.backend == "qemu":  # the guest boots while RegisterVM waits for READY
                    argv += ["--ready-timeout", repr(deadline)]
                pod.proxy_process = await launcher.launch(
                    argv, what=what, deadline=deadline, marker=intent.marker
                )
            pod.launching.remove(intent)
            self.save_now(pod)
        try:
            link = await self.connect_vm(pod, rt, attach=False)
        except HyperdError as exc:
            if pod.vm.backend == "qemu":
                raise qemuvm.explain_failure(pod, exc) from None
            raise
        pod.proxy_url = link.proxy_url
        pod.exit_notifications = link.exit_notifications
        self.save_now(pod)
        testhooks.crash_point("pod.start:registered")
        pod.dialect = pod.agent_dialect or await detect_dialect(link)
        message = bridge.pod_message(pod, network)
        await bridge.call(pod, link, "startpod", message)
        pod.state = PodState.RUNNING
        pod.reason = ""
        self.save_now(pod)  # a failure undoes the start (the caller's except clause)

    def _intend(self, pod: PodRecord, kind: str) -> LaunchIntent:
        """Record that a helper of ``kind`` is about to be started (intent first)."""
        intent = launcher.intent(kind)
        pod.launching.append(intent)
        self.save_now(pod)
        return intent

    def _sim_command(self) -> list[str]:
        """The configured simulator command as it is, or the built-in hyperd-sim logging at the
        daemon's level (its default, INFO, adds two lines per container to every start)."""
        if self.config.vm.sim_command:
            return list(self.config.vm.sim_command)
        level = _SIM_LOG_LEVELS[self.config.log.level]
        return [*launcher.python_module_argv("hyperd.sim"), "--log-level", level]

    # ---- the link task ----------------------------------------------------------------------

    async def connect_vm(self, pod: PodRecord, rt: PodRuntime, *, attach: bool) -> AgentLink:
        rt.stop_link = anyio.Event()
        rt.link_done = anyio.Event()
        rt.stopping = False
        try:
            link: AgentLink = await self.tg.start(
                functools.partial(self._link_task, pod, rt, attach)
            )
        except BaseException:
            rt.link_done.set()
            raise
        return link

    async def _link_task(
        self,
        pod: PodRecord,
        rt: PodRuntime,
        attach: bool,
        *,
        task_status: anyio.abc.TaskStatus[AgentLink],
    ) -> None:
        started = False
        done = rt.link_done
        try:
            on_event = functools.partial(self._on_link_event, pod)
            async with open_link(
                pod, self.config, attach=attach, on_event=on_event, timings=self.timings
            ) as (
                link,
                control,
            ):
                rt.link, rt.control = link, control
                task_status.started(link)
                started = True
                async with anyio.create_task_group() as watchers:
                    for ref, what in ((pod.vm_process, "VM"), (pod.proxy_process, "proxy")):
                        if ref is not None:
                            watchers.start_soon(self._watch_process, pod, rt, ref, what)
                    await rt.stop_link.wait()
                    watchers.cancel_scope.cancel()
        except Exception as exc:
            if not started:
                raise
            log.error("VM link of pod %s failed: %s", pod.id, exc, extra={"pod": pod.id})
            self._mark_unreachable(pod, f"VM link failed: {exc}")
        finally:
            rt.link = None
            rt.control = None
            if done is not None:
                done.set()

    async def _watch_process(
        self, pod: PodRecord, rt: PodRuntime, ref: ProcessRef, what: str
    ) -> None:
        await launcher.wait_exit(ref)
        if rt.stopping:
            return
        reason = f"the {what} process (pid {ref.pid}) of pod {pod.id!r} exited"
        if rt.link is not None:
            rt.link.mark_unreachable(reason)
        self._mark_unreachable(pod, reason)

    def _mark_unreachable(self, pod: PodRecord, reason: str) -> None:
        if pod.state != PodState.RUNNING or self.pods.get(pod.id) is not pod:
            return
        pod.state = PodState.UNREACHABLE
        pod.reason = reason
        log.warning("pod unreachable: %s", reason, extra={"pod": pod.id, "reason": reason})
        self.publish("vm", pod, "unreachable", reason=reason)
        self.publish("pod", pod, str(pod.state), reason=reason)
        self.save_logged(pod)

    def _on_link_event(self, pod: PodRecord, event: LinkEvent) -> None:
        if event.kind == "unreachable":
            self._mark_unreachable(pod, event.reason or "the VM stopped answering")
        elif event.kind == "reachable":
            self.publish("vm", pod, "reachable")
            rt = self.runtime.get(pod.id)
            if rt is not None and rt.link is not None:
                self.exit_source(pod, rt.link)
            helpers_alive = all(
                launcher.is_alive(ref)
                for ref in (pod.vm_process, pod.proxy_process)
                if ref is not None
            )
            if pod.state == PodState.UNREACHABLE and helpers_alive and rt and not rt.stopping:
                pod.state = PodState.RUNNING
                pod.reason = ""
                self.publish("pod", pod, str(pod.state))
                self.save_logged(pod)
        elif event.kind == "process_exited":
            exits.on_process_exited(self, pod, event)

    def exit_source(self, pod: PodRecord, link: AgentLink) -> None:
        """Record whether the pod's proxy sends exits; watch the shims' pids when it does not."""
        if pod.exit_notifications != link.exit_notifications:
            pod.exit_notifications = link.exit_notifications
            self.save_logged(pod)
        if not link.exit_notifications:
            for c in pod.containers.values():
                exits.watch_shim(self, pod, c)

    async def _close_link(self, rt: PodRuntime, *, unregister: bool) -> None:
        rt.stopping = True
        if rt.control is not None:
            rt.control.unregister = unregister
        rt.stop_link.set()
        if rt.link_done is not None:
            await rt.link_done.wait()

    async def teardown(self, pod: PodRecord, rt: PodRuntime, *, unregister: bool) -> None:
        """Close the link, stop the helper processes hyperd started, undo every mount.

        Every step runs even when an earlier one failed; then ``HyperdError`` names what could
        not be undone (the steps are idempotent: calling this again retries them).
        """
        await self._close_link(rt, unregister=unregister)
        failed: list[str] = []
        if pod.launching:
            # helpers whose start was under way: found by the marker in their environment
            markers = [intent.marker for intent in pod.launching]
            found = await anyio.to_thread.run_sync(launcher.find_marked, markers)
            for refs in found.values():
                for ref in refs:
                    await launcher.terminate(ref)
                    if launcher.is_alive(ref):
                        failed.append(f"pid {ref.pid} does not exit")
            if not any(launcher.is_alive(ref) for refs in found.values() for ref in refs):
                pod.launching = []
        for attr in ("proxy_process", "vm_process"):
            ref = getattr(pod, attr)
            if ref is not None:
                if attr == "vm_process" and pod.vm.backend == "qemu":
                    await qemuvm.stop_vm(pod, ref)  # powerdown first; terminate what is left
                await launcher.terminate(ref)
                if launcher.is_alive(ref):
                    failed.append(f"pid {ref.pid} does not exit")
                else:
                    setattr(pod, attr, None)
        await rt.settle_premounts()  # (a mount made ahead must not land after the cleanup)
        for c in pod.containers.values():
            if c.mounts_made:
                try:
                    await bridge.unmount_container(pod, c)
                    c.mounts_made = []
                except (HyperdError, OSError) as exc:
                    failed.append(f"container {c.id!r}: {exc}")
        try:
            await bridge.cleanup_pod(pod)
        except (HyperdError, OSError) as exc:
            failed.append(f"share dir: {exc}")
        if pod.proxy.mode == "pod":
            pod.proxy_url = ""
        await anyio.to_thread.run_sync(podfs.remove_sockets, pod)
        if failed:
            for problem in failed:
                log.error("cleanup: %s", problem, extra={"pod": pod.id})
            raise HyperdError(f"pod {pod.id!r}: cleanup incomplete: {'; '.join(failed)}")

    # ---- pod.stop ---------------------------------------------------------------------------

    async def pod_stop(self, pod_id: object) -> dict[str, Any]:
        """DESTROYPOD, UnregisterVM, stop the proxy and VM hyperd started, undo every mount."""
        pod = self.get_pod(pod_id)
        rt = self.rt(pod)
        async with rt.lock:
            check_pod_transition(pod, "stop")
            with anyio.CancelScope(shield=True):
                await self._stop_locked(pod, rt)
        self.publish("pod", pod, str(pod.state))
        log.info("pod stopped", extra={"pod": pod.id})
        return pod_view(pod)

    async def _stop_locked(self, pod: PodRecord, rt: PodRuntime) -> None:
        if pod.state == PodState.RUNNING and rt.link is not None:
            try:
                await bridge.call(pod, rt.link, "destroypod", None)
            except HyperdError as exc:
                log.warning("destroypod failed: %s", exc, extra={"pod": pod.id})
        # UnregisterVM whenever the proxy is still there, even for a lost VM: a system proxy
        # would otherwise keep the VM registered (the session uses a fresh connection if needed)
        proxy_gone = pod.proxy_process is not None and not launcher.is_alive(pod.proxy_process)
        for c in pod.containers.values():
            if c.state != ContainerState.STOPPED:
                c.state = ContainerState.STOPPED
                self.publish("container", pod, str(c.state), container=c.id)
        for e in pod.execs.values():
            e.state = ExecState.EXITED
        rt.exits.close()  # waiters see the processes ended with the pod
        await self.teardown(pod, rt, unregister=not proxy_gone)
        pod.state = PodState.STOPPED
        try:
            self.save_now(pod)
        except StateError as exc:
            raise StateError(
                f"pod {pod.id!r} was stopped, but its state could not be saved ({exc.message}); "
                "a restart finds it stopped"
            ) from None

    def end_waits(self) -> None:
        """Daemon shutdown: every ``container.wait``/``exec.wait`` ends with ``shutting_down``."""
        self.stopping = True
        for rt in self.runtime.values():
            rt.exits.wake_all()

    async def shutdown(self, *, stop_pods: bool) -> None:
        """Stop every pod (``stop_pods``) or just close their links, leaving them running."""
        for pod in list(self.pods.values()):
            rt = self.rt(pod)
            with anyio.CancelScope(shield=True):
                if stop_pods and pod.state in (PodState.RUNNING, PodState.UNREACHABLE):
                    try:
                        await self.pod_stop(pod.id)
                    except HyperdError as exc:
                        log.error("stopping pod failed: %s", exc, extra={"pod": pod.id})
                else:
                    await self._close_link(rt, unregister=False)

    # ---- restart adoption (see hyperd.daemon.adoption) ----------------------------------------

    async def load(self) -> list[str]:
        """Load persisted pods and re-adopt the running ones; returns the load problems."""
        from hyperd.daemon import adoption

        return await adoption.load(self)

    def link_of(self, pod: PodRecord) -> AgentLink:
        """The pod's VM link; raises ``VMUnavailable`` if the pod has none."""
        link = self.rt(pod).link
        if pod.state == PodState.UNREACHABLE:
            raise VMUnavailable(f"pod {pod.id!r}: VM unreachable: {pod.reason}", pod=pod.id)
        if link is None:
            raise VMUnavailable(f"pod {pod.id!r}: no connection to its VM", pod=pod.id)
        return link
