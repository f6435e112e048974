"""Container and exec operations of the RPC API (``container.*``, ``exec.*``).

Two phases, as in containerd: ``create`` hands out an I/O token and the proxy URL (the shim
claims the token with ConnectShim) and sends nothing to the agent; ``start`` sends
``newcontainer`` / ``execcmd`` carrying that token. The proxy holds that command until the
shim has connected, so a caller must claim the token before (or while) it calls ``start``.

Work is moved off the calls a caller waits on where it can be:

- the token comes from the pod's spare tokens (:mod:`hyperd.daemon.vmadapter`): ``create``
  sends nothing to the proxy either;
- ``create`` mounts the rootfs and volumes right after its answer is written, while the caller
  sets up its shim; ``start`` waits for that (and mounts itself if it failed: the error is
  ``start``'s, as before);
- ``stop`` unmounts, and leaves the container's empty directory in the share to ``delete``;
- neither ``start`` nor the end of ``stop`` saves anything (below).

Every function takes the :class:`~hyperd.daemon.service.Daemon` and validated parameters, and
raises :class:`hyperd.errors.HyperdError` subclasses whose message names the object.

Persistence: ``create`` saves the container before it answers. ``start`` saves nothing before
NEWCONTAINER: a restart asks the agent about every ``created`` container and adopts the ones it
knows as running, with the mounts found in the mount table (:mod:`hyperd.daemon.adoption`).
``stop`` records ``intent="stop"`` before REMOVECONTAINER and nothing after: a restart settles
that intent to ``stopped``. So the record says ``created`` until the container's next save
(its exit, its stop's intent). Each save writes the container's row only. A save that fails
before the agent acted undoes the call and fails it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal as signal_module
from time import perf_counter
from typing import Any

import anyio

from hyperd.daemon import bridge, exits
from hyperd.daemon.model import (
    ContainerRecord,
    ContainerState,
    ExecRecord,
    ExecState,
    PodRecord,
    check_container_transition,
    check_pod_transition,
    container_view,
    exit_watch,
)
from hyperd.daemon.service import Daemon, PreMount
from hyperd.daemon.testhooks import crash_point
from hyperd.errors import (
    AgentError,
    AlreadyExists,
    HyperdError,
    InvalidParams,
    InvalidState,
    NotFound,
    StateError,
)
from hyperd.rpc.pending import Pending
from hyperd.spec import DeviceSpec, MountSpec, ProcessSpec, ResourcesSpec, RootfsSpec, validate_id
from hyperd.timings import Timings

log = logging.getLogger(__name__)

EXEC_ID_BYTES = 6  # random hex bytes in a generated exec id
MAX_SIGNAL = 64  # signals 1..64 (SIGRTMAX) exist on Linux


def get_container(pod: PodRecord, cid: object) -> ContainerRecord:
    """The container ``cid`` of ``pod``; ``InvalidParams`` for a bad id, ``NotFound`` if absent."""
    if type(cid) is str:
        c = pod.containers.get(cid)
        if c is not None:  # a container's id was valid when it was created
            return c
    cid = validate_id("container", cid)
    c = pod.containers.get(cid)
    if c is None:
        raise NotFound(f"container {cid!r} not found in pod {pod.id!r}", pod=pod.id, container=cid)
    return c


_SIGNALS: dict[str, int] = {
    **{s.name: int(s) for s in signal_module.Signals},
    **{s.name[3:]: int(s) for s in signal_module.Signals if s.name.startswith("SIG")},
}  # "SIGKILL" and "KILL" -> 9, looked up once here rather than through the enum per call


def parse_signal(value: int | str) -> int:
    """A signal number from ``9``, ``"9"``, ``"KILL"`` or ``"SIGKILL"``; ``InvalidParams``."""
    if isinstance(value, str):
        known = _SIGNALS.get(value)
        if known is not None:
            return known
        name = value.strip().upper()
        if name.isdigit():
            value = int(name)
        else:
            try:
                return _SIGNALS[name]
            except KeyError:
                raise InvalidParams(f"invalid signal {value!r}", field="signal") from None
    if not 1 <= value <= MAX_SIGNAL:
        raise InvalidParams(f"invalid signal {value!r}: must be 1..{MAX_SIGNAL}", field="signal")
    return value


def _check_rootfs(rootfs: RootfsSpec) -> None:
    if rootfs.path is not None and not os.path.isdir(rootfs.path):
        raise InvalidParams(
            f"invalid rootfs.path {rootfs.path!r}: not a directory", field="rootfs.path"
        )


async def container_create(
    d: Daemon,
    pod_id: object,
    cid: object,
    *,
    rootfs: RootfsSpec,
    process: ProcessSpec,
    mounts: list[MountSpec],
    devices: list[DeviceSpec],
    resources: ResourcesSpec | None,
    bind_mount_dev: bool,
    shim_pid: int | None,
    caller_uid: int = exits.ROOT_UID,
    sources_resolved: bool = False,
) -> dict[str, Any]:
    """Record a container and hand out its I/O token; the agent is not told yet.

    ``sources_resolved``: the rootfs and mount sources are resolved paths checked against the
    allowlist; they are mounted only if no symlink has appeared in them since.

    A ``shim_pid`` must be a process of the caller (``caller_uid``, root excepted); it is
    pinned with a pidfd here (see :mod:`hyperd.daemon.exits`).
    """
    pod = d.get_pod(pod_id)
    cid = validate_id("container", cid)
    check_pod_transition(pod, "use")
    if cid in pod.containers:
        raise AlreadyExists(
            f"container {cid!r} already exists in pod {pod.id!r}", pod=pod.id, container=cid
        )
    _check_rootfs(rootfs)
    pin = exits.pin_shim(shim_pid, caller_uid) if shim_pid is not None else None
    try:
        return await _create(
            d, pod, cid, pin, rootfs=rootfs, process=process, mounts=mounts, devices=devices,
            resources=resources, bind_mount_dev=bind_mount_dev,
            sources_resolved=sources_resolved,
        )  # fmt: skip
    except BaseException:
        if pin is not None:
            pin.close()
        raise


async def _create(
    d: Daemon,
    pod: PodRecord,
    cid: str,
    pin: exits.ShimPin | None,
    *,
    rootfs: RootfsSpec,
    process: ProcessSpec,
    mounts: list[MountSpec],
    devices: list[DeviceSpec],
    resources: ResourcesSpec | None,
    bind_mount_dev: bool,
    sources_resolved: bool = False,
) -> dict[str, Any]:
    c = ContainerRecord(
        id=cid,
        rootfs=rootfs,
        process=process,
        token="",
        mounts=list(mounts),
        devices=list(devices),
        resources=resources,
        bind_mount_dev=bind_mount_dev,
        shim_pid=pin.pid if pin is not None else None,
        shim_start_time=pin.start_time if pin is not None else None,
        sources_resolved=sources_resolved,
    )
    # what the agent's dialect cannot carry is refused now, not at start
    message = bridge.container_message(pod, c, [])
    link = d.link_of(pod)
    rt = d.rt(pod)
    if cid in rt.premounts:  # a create of the same id is under way (or being undone)
        raise AlreadyExists(
            f"container {cid!r} is being created in pod {pod.id!r}", pod=pod.id, container=cid
        )
    pre = rt.premounts[cid] = PreMount()  # (the id is taken from here on)
    try:
        c.token = token = (await bridge.tokens(pod, link, 1))[0]
        if cid in pod.containers:  # created concurrently while we waited for the token
            raise AlreadyExists(
                f"container {cid!r} already exists in pod {pod.id!r}", pod=pod.id, container=cid
            )
        pod.containers[cid] = c
        try:
            d.save_now(pod, c)
        except StateError:
            del pod.containers[cid]  # the token is simply never used
            raise
    except BaseException:
        del rt.premounts[cid]
        raise
    # the mounts are made once the answer is written, while the caller sets up its shim
    # (after the save: a mount exists only for a container that has a record); container.start
    # waits for them, and mounts itself if they failed (the error is start's, as it was)
    asyncio.get_running_loop().call_soon(_premount, pod, c, pre, d.timings)
    if pin is not None:
        rt.exits.pins[cid] = pin
    rt.messages[cid] = message  # (start sends it unless volumes add to it)
    d.publish("container", pod, str(c.state), container=cid)
    return {"id": cid, "token": token, "proxy_url": pod.proxy_url, "state": str(c.state)}


def _premount(pod: PodRecord, c: ContainerRecord, pre: PreMount, timings: Timings) -> None:
    """Mount the container's rootfs and volumes ahead of its start (``container.create``).

    A callback on the event loop, run once the create's answer is written: a few ``mkdir``,
    ``open`` and mount syscalls (60 µs on tmpfs, 85 µs on ext4 here), where a worker thread's
    hand-off and the fight for the GIL cost more than the work. Like ``create``'s check of the
    rootfs, it touches caller-given paths on the loop: a source on a hung network filesystem
    blocks the daemon (as the seed's inline mount blocked its caller).

    Not saved (the record lists them from the container's next save: its exit, its stop's
    intent): a crash before that leaves mounts no record lists, under the container's own
    directory, which a restart finds in the mount table (:mod:`hyperd.daemon.adoption`): it
    undoes them, or records them if the container was started.
    """
    start = perf_counter()
    try:
        made = bridge.mount_container_now(pod, c)
    except HyperdError as exc:
        log.info(
            "mounting ahead of the start failed: %s", exc,
            extra={"pod": pod.id, "container": c.id},
        )  # fmt: skip
    except Exception:  # a bug: container.start tries again and reports it
        log.exception(
            "mounting ahead of the start failed", extra={"pod": pod.id, "container": c.id}
        )
    else:
        pre.records = made
        c.mounts_made = made
    finally:
        pre.done.set()
        timings.since("mount.ahead", start)


async def container_start(d: Daemon, pod_id: object, cid: object) -> dict[str, Any]:
    """Bind-mount the rootfs and volumes, then ``newcontainer`` with the container's token.

    On any failure every mount made for the container is undone.
    """
    pod = d.get_pod(pod_id)
    c = get_container(pod, cid)
    rt = d.rt(pod)
    async with rt.container_lock(c.id):
        check_pod_transition(pod, "use")
        check_container_transition(pod, c, "start")
        link = d.link_of(pod)
        # not cancelled half-way by a caller that goes away: the mounts and the agent's view
        # must agree (every step below has its own deadline)
        with anyio.CancelScope(shield=True):
            waited = perf_counter()
            pre = await rt.premount_of(c.id)  # the mounts container.create began
            d.timings.since("mount.waited_by_start", waited)
            # nothing is saved before NEWCONTAINER: the saved record says "created", and a
            # restart asks the agent about every created container (adoption): one it knows
            # was started, and gets the mounts found under its directory; one it does not
            # know never was, and whatever is mounted there is undone
            try:
                if pre is not None and pre.records is not None:
                    layout = pre.records
                else:
                    made, layout = await bridge.mount_container(pod, c)
                    c.mounts_made = made
                crash_point("container.start:mounted")
                message = rt.messages.pop(c.id, None)
                if message is None or any(m.purpose == "volume" for m in layout):
                    message = bridge.container_message(pod, c, layout)
                await bridge.call(pod, link, "newcontainer", message, tokens=[c.token])
                crash_point("container.start:sent")
            except BaseException:
                await bridge.unmount_recorded(pod, c)
                c.mounts_made = []  # (as saved: the record never listed them)
                raise
            c.state = ContainerState.RUNNING
            d.publish("container", pod, "running", container=c.id)
            exits.apply_early_exit(d, pod, c)  # an exit that came with newcontainer's reply
            exits.watch_shim(d, pod, c)  # when the proxy sends no exits
            # not saved: the record says "created" until the next save of the container (its
            # exit, its stop), and a restart asks the agent, which has it, and adopts it as
            # running with its mounts (or, freed by the agent since, as exited with the status
            # the proxy kept)
    return container_view(pod, c)


async def container_stop(d: Daemon, pod_id: object, cid: object) -> dict[str, Any]:
    """``removecontainer`` (unless the agent freed it already), then undo its mounts.

    Also for an ``exited`` container: the CC agent keeps a container whose init ended until
    it is removed (the hyperhq agent frees it itself: its "not found" is expected then).
    """
    pod = d.get_pod(pod_id)
    c = get_container(pod, cid)
    rt = d.rt(pod)
    async with rt.container_lock(c.id):
        check_pod_transition(pod, "use")
        check_container_transition(pod, c, "stop")
        await rt.premount_of(c.id)  # (a created container's mounts made ahead: undone below)
        if c.state in (ContainerState.RUNNING, ContainerState.EXITED):
            c.intent = "stop"
            try:
                d.save_now(pod, c)  # intent first: the agent may free it from here on
            except StateError:
                c.intent = ""
                raise
            try:
                if c.state == ContainerState.RUNNING:
                    await _remove(d, pod, c)
                else:
                    try:
                        await _remove(d, pod, c)
                    except AgentError as exc:
                        log.info(
                            "removecontainer of an exited container: %s", exc,
                            extra={"pod": pod.id, "container": c.id},
                        )  # fmt: skip
                crash_point("container.stop:removed")
            except AgentError:
                c.intent = ""  # refused: nothing changed (other errors leave the outcome
                d.save_logged(pod, c)  # unknown: the intent stays for a restart to settle)
                raise
        # stopped as soon as the agent let it go (no await from here on: nothing cancels this
        # half-way); a failed unmount below is retried by container.delete and pod.stop (both
        # undo whatever mounts_made still lists)
        c.state = ContainerState.STOPPED
        c.intent = ""
        execs = [e for e in pod.execs.values() if e.container == c.id]
        for e in execs:
            e.state = ExecState.EXITED
            d.rt(pod).exits.wake(("exec", e.id))
        d.rt(pod).exits.unpin(c.id)
        d.rt(pod).exits.wake(("container", c.id))
        try:
            # the mounts go now; the container's directory waits for container.delete
            unmounting = perf_counter()
            bridge.unmount_for_stop(pod, c)
            d.timings.since("mount.undone_by_stop", unmounting)
            c.mounts_made = []
        except (HyperdError, OSError):
            try:
                d.save_now(pod, c, *execs)  # stopped, and what is still mounted
            finally:
                d.publish("container", pod, str(c.state), container=c.id)
            raise
        # the saved intent (stop) says the same to a restart (it finds the agent without the
        # container, unmounts what is left and ends its execs), so the container's row is not
        # saved again (container.delete deletes it); its execs are, once the answer is out
        if execs:
            d.save_soon(pod, *execs)
        d.publish("container", pod, str(c.state), container=c.id)
    return container_view(pod, c)


async def container_delete(d: Daemon, pod_id: object, cid: object) -> dict[str, Any]:
    """Forget a container that is not running (created, or stopped); its execs go with it."""
    pod = d.get_pod(pod_id)
    c = get_container(pod, cid)
    async with d.rt(pod).container_lock(c.id):
        check_container_transition(pod, c, "delete")
        await d.rt(pod).premount_of(c.id)
        d.rt(pod).messages.pop(c.id, None)
        # found from mountinfo: also what a failed unmount, a crash or mounting ahead left
        await bridge.unmount_container(pod, c)
        c.mounts_made = []
        execs = [e for e in pod.execs.values() if e.container == c.id]
        del pod.containers[c.id]
        for e in execs:
            del pod.execs[e.id]
        try:
            d.save_now(pod, c, *execs)  # deletes their rows
        except StateError:
            pod.containers[c.id] = c  # still there, as its record says
            for e in execs:
                pod.execs[e.id] = e
            raise
        pod_exits = d.rt(pod).exits
        pod_exits.unpin(c.id)
        pod_exits.wake(("container", c.id))  # its waiters find it gone
        for e in execs:
            pod_exits.wake(("exec", e.id))
    d.rt(pod).container_locks.pop(c.id, None)
    d.publish("container", pod, "deleted", container=c.id)
    return {"pod": pod.id, "id": c.id, "state": "deleted"}


async def _remove(d: Daemon, pod: PodRecord, c: ContainerRecord) -> None:
    """``removecontainer``. The hyperhq agent frees a container itself when its init exits and
    refuses to remove one that still runs (conformance notes #6), and hyperd may not have seen
    the exit yet (or ever, behind a proxy without exit notifications): an ERROR there means
    "already freed" or "still running"; in the second case the container is killed, and its
    init's exit frees it.
    """
    link = d.link_of(pod)
    try:
        await bridge.call(pod, link, "removecontainer", bridge.remove_message(c))
    except AgentError:
        if pod.dialect != "hyper":
            raise
        try:
            await bridge.call(
                pod, link, "killcontainer", bridge.kill_message(c, signal_module.SIGKILL, True)
            )
        except AgentError:
            pass  # not found: the agent freed it when its init exited
        log.info("container freed by the hyperhq agent", extra={"pod": pod.id, "container": c.id})


def container_kill(
    d: Daemon, pod_id: object, cid: object, signal: int | str, all_processes: bool
) -> dict[str, Any] | Pending[dict[str, Any]]:
    """Signal the container: ``killcontainer`` once started, its shim before that (through the
    pidfd pinned at ``container.create``, never ``kill()`` of a bare pid).

    A plain function (no task needed): the command is sent at once, the result comes with the
    agent's reply (a :class:`Pending`)."""
    pod = d.get_pod(pod_id)
    c = get_container(pod, cid)
    signum = parse_signal(signal)
    check_pod_transition(pod, "use")
    check_container_transition(pod, c, "kill")
    if c.state == ContainerState.CREATED:
        if c.shim_pid is None:
            raise InvalidState(
                f"container {c.id!r} of pod {pod.id!r} is not started and has no shim_pid to "
                "signal",
                pod=pod.id,
                container=c.id,
                state=str(c.state),
            )
        pod_exits = d.rt(pod).exits
        pin = pod_exits.pins.get(c.id)
        if pin is None:  # hyperd restarted since container.create: pin the same process again
            pin = exits.repin_shim(c)
            if pin is not None:
                pod_exits.pins[c.id] = pin
        try:
            if pin is None:
                raise ProcessLookupError
            pin.send_signal(signum)
        except ProcessLookupError:
            raise NotFound(
                f"shim pid {c.shim_pid} of container {c.id!r} does not exist",
                pod=pod.id,
                container=c.id,
            ) from None
        return {"id": c.id, "signal": signum, "target": "shim"}
    link = d.link_of(pod)
    result = {"id": c.id, "signal": signum, "target": "agent"}
    sent = bridge.send(pod, link, "killcontainer", bridge.kill_message(c, signum, all_processes))
    return sent.map(lambda _reply: result)


def container_ps(
    d: Daemon, pod_id: object, cid: object, fmt: str, args: list[str]
) -> Pending[dict[str, Any]]:
    """``pscontainer``: the agent's process listing as text (sent at once, as kill)."""
    pod = d.get_pod(pod_id)
    c = get_container(pod, cid)
    check_pod_transition(pod, "use")
    check_container_transition(pod, c, "ps")
    link = d.link_of(pod)
    sent = bridge.send(pod, link, "pscontainer", bridge.ps_message(pod, c, fmt, args))
    return sent.map(lambda reply: {"output": bridge.decode_ps(reply)})


def container_list(d: Daemon, pod_id: object) -> dict[str, Any]:
    pod = d.get_pod(pod_id)
    return {"containers": [container_view(pod, c) for c in pod.containers.values()]}


def container_inspect(d: Daemon, pod_id: object, cid: object) -> dict[str, Any]:
    pod = d.get_pod(pod_id)
    return container_view(pod, get_container(pod, cid))


async def exec_create(
    d: Daemon, pod_id: object, cid: object, process: ProcessSpec, exec_id: str | None
) -> dict[str, Any]:
    """Record an exec process in a running container and hand out its token."""
    pod = d.get_pod(pod_id)
    c = get_container(pod, cid)
    check_pod_transition(pod, "use")
    check_container_transition(pod, c, "exec")
    eid = validate_id("exec_id", exec_id) if exec_id is not None else _new_exec_id(pod)
    if eid in pod.execs:
        raise AlreadyExists(
            f"exec {eid!r} already exists in pod {pod.id!r}", pod=pod.id, exec_id=eid
        )
    e = ExecRecord(id=eid, container=c.id, process=process, token="")
    bridge.exec_message(pod, c, e)  # refuse what the agent's dialect cannot carry, now
    link = d.link_of(pod)
    e.token = token = (await bridge.tokens(pod, link, 1))[0]
    if eid in pod.execs:
        raise AlreadyExists(
            f"exec {eid!r} already exists in pod {pod.id!r}", pod=pod.id, exec_id=eid
        )
    pod.execs[eid] = e
    try:
        d.save_now(pod, e)
    except StateError:
        del pod.execs[eid]
        raise
    d.publish("exec", pod, str(e.state), container=c.id, exec_id=eid)
    return {"exec_id": eid, "token": token, "proxy_url": pod.proxy_url, "state": str(e.state)}


def _new_exec_id(pod: PodRecord) -> str:
    while True:
        eid = "exec-" + secrets.token_hex(EXEC_ID_BYTES)
        if eid not in pod.execs:
            return eid


def get_exec(pod: PodRecord, exec_id: object) -> ExecRecord:
    eid = validate_id("exec_id", exec_id)
    e = pod.execs.get(eid)
    if e is None:
        raise NotFound(f"exec {eid!r} not found in pod {pod.id!r}", pod=pod.id, exec_id=eid)
    return e


async def exec_start(d: Daemon, pod_id: object, exec_id: object) -> dict[str, Any]:
    """``execcmd`` with the exec's token."""
    pod = d.get_pod(pod_id)
    e = get_exec(pod, exec_id)
    c = get_container(pod, e.container)
    check_pod_transition(pod, "use")
    check_container_transition(pod, c, "exec")
    if e.state != ExecState.CREATED:
        raise InvalidState(
            f"exec {e.id!r} of pod {pod.id!r} is {e.state}: cannot start it (needs created)",
            pod=pod.id,
            exec_id=e.id,
            state=str(e.state),
        )
    e.state = ExecState.RUNNING  # claimed before the await: a second start is refused
    pod_exits = d.rt(pod).exits
    pod_exits.starting.add(e.token)  # an exit arriving meanwhile waits for the reply
    try:
        link = d.link_of(pod)
        await bridge.call(pod, link, "execcmd", bridge.exec_message(pod, c, e), tokens=[e.token])
    except BaseException:
        e.state = ExecState.CREATED
        pod_exits.early.pop(e.token, None)
        raise
    finally:
        pod_exits.starting.discard(e.token)
    d.publish("exec", pod, "running", container=c.id, exec_id=e.id)
    exits.apply_early_exit(d, pod, e)
    d.save_logged(pod, e)  # (a restart finds the exec created: the VM has its process)
    return {"exec_id": e.id, "container": c.id, "state": str(e.state)}


def exec_inspect(d: Daemon, pod_id: object, exec_id: object) -> dict[str, Any]:
    pod = d.get_pod(pod_id)
    e = get_exec(pod, exec_id)
    return {
        "exec_id": e.id,
        "container": e.container,
        "state": str(e.state),
        "args": list(e.process.args),
        "exit_status": e.exit_status,
        "exited_at": e.exited_at,
        "exit_reason": e.exit_reason,
        "exit_watch": exit_watch(pod),  # an exec has no shim pid: proxy, none or unknown
        "token": e.token,
        "proxy_url": pod.proxy_url,
    }
