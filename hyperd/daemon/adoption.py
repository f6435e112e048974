"""Restart adoption: load the persisted pods and reconcile each with what is really there.

- Helper processes whose start was under way (a :class:`~hyperd.daemon.model.LaunchIntent`
  with no pid recorded yet) are found by the marker in their environment and stopped: the
  ``pod.start`` that started them never finished.
- A pod that was running: its VM and proxy processes (when hyperd started them) must still be
  the same processes (pid + start time); then hyperd re-attaches to the VM through its proxy
  (AttachVM, not RegisterVM) and settles the containers caught in the middle of an operation
  (:attr:`~hyperd.daemon.model.ContainerRecord.intent`):

  - ``created``: ``container.start`` saves nothing before NEWCONTAINER, so it may have reached
    the agent. If the agent knows the container (it accepts a SIGCONT for it) it is adopted as
    ``running``, with the mounts found under its directory in the mount table (mounted ahead by
    ``container.create``, never saved); else whatever is mounted there is undone and it stays
    ``created``. (Records of earlier versions may say intent ``start``: settled the same way.)
  - ``stop``: if the agent still has the container, REMOVECONTAINER is sent again (refused: it
    still runs, and stays ``running``); then it is unmounted and ``stopped``.

  The exits that happened meanwhile come from the proxy right after the AttachVM (or, without
  exit notifications, shims that are gone mark their containers exited). A pod whose helpers
  died, or whose VM cannot be re-attached or answer, is torn down and marked ``stopped`` with
  the reason.
- A pod that was not running (or was caught in the middle of ``pod.start`` by a crash): every
  helper process it recorded is stopped and its share dir cleaned, so it can start again.

Pods are reconciled concurrently; one broken record does not keep the others from loading.
"""

from __future__ import annotations

import logging
import signal

import anyio

from hyperd.daemon import bridge, exits, launcher
from hyperd.daemon.model import ContainerRecord, ContainerState, ExecState, PodRecord, PodState
from hyperd.daemon.service import Daemon, PodRuntime
from hyperd.daemon.vmlink import AgentLink
from hyperd.errors import AgentError, HyperdError

log = logging.getLogger(__name__)

PROBE_SIGNAL = signal.SIGCONT  # asks "do you have this container?" without harming it


async def load(d: Daemon) -> list[str]:
    """Load persisted pods and re-adopt the running ones; returns the load problems."""
    pods, problems = await anyio.to_thread.run_sync(d.persist.load)
    d.state_problems = list(problems)
    for pid, pod in sorted(pods.items()):
        d.pods[pid] = pod
        d.runtime[pid] = PodRuntime()
    async with anyio.create_task_group() as tg:  # one slow VM must not delay the others
        for pod in list(d.pods.values()):
            tg.start_soon(_reconcile, d, pod)
    return problems


async def _reconcile(d: Daemon, pod: PodRecord) -> None:
    try:
        if pod.state in (PodState.RUNNING, PodState.UNREACHABLE):
            await _adopt(d, pod)
        else:
            await _reconcile_stopped(d, pod)
    except Exception:
        # one broken pod record must not keep the daemon from serving the others
        log.exception("reconciling the pod after a restart failed", extra={"pod": pod.id})


async def _reconcile_stopped(d: Daemon, pod: PodRecord) -> None:
    """A pod that was not running (or was caught mid-start by a crash): nothing may be left."""
    share_left = await anyio.Path(pod.share_dir).exists()
    if pod.vm_process or pod.proxy_process or pod.launching or share_left:
        log.info("cleaning up after an interrupted operation", extra={"pod": pod.id})
        await d.teardown(pod, d.rt(pod), unregister=False)
        for c in pod.containers.values():
            c.intent = ""
        d.save_logged(pod)


async def _adopt(d: Daemon, pod: PodRecord) -> None:
    rt = d.rt(pod)
    if pod.launching:
        # (a running pod starts no helper; a record that says so is settled the safe way)
        await _reconcile_lost(d, pod, rt, "helper processes were being started")
        return
    dead = [
        ref
        for ref in (pod.vm_process, pod.proxy_process)
        if ref is not None and not launcher.is_alive(ref)
    ]
    if dead:
        reason = f"helper process(es) {[r.pid for r in dead]} died while hyperd was down"
        await _reconcile_lost(d, pod, rt, reason)
        return
    try:
        link = await d.connect_vm(pod, rt, attach=True)
    except HyperdError as exc:
        await _reconcile_lost(d, pod, rt, f"cannot re-attach to the VM: {exc}")
        return
    try:
        for c in pod.containers.values():
            await _settle(d, pod, c, link)
    except HyperdError as exc:
        await _reconcile_lost(d, pod, rt, f"the VM does not answer after a restart: {exc}")
        return
    # the exits kept by the proxy while hyperd was down arrived right after the AttachVM (and
    # were applied); without exit notifications the shims' pids are watched again
    d.exit_source(pod, link)
    pod.state = PodState.RUNNING
    pod.reason = ""
    d.save_logged(pod)
    log.info("pod re-adopted", extra={"pod": pod.id})


async def _settle(d: Daemon, pod: PodRecord, c: ContainerRecord, link: AgentLink) -> None:
    """Settle the operation a crash interrupted on ``c`` (see the module's docstring)."""
    intent = c.intent
    if c.state == ContainerState.CREATED:
        # container.start saves nothing before NEWCONTAINER (records of earlier versions may
        # say intent "start"): the agent says whether it was sent
        # started: the agent knows it, or (the hyperhq agent frees a container whose init
        # exits) the proxy kept its exit, which came before the probe's answer on the same
        # connection
        if await _agent_has(pod, c, link) or c.token in d.rt(pod).exits.early:
            if not c.mounts_made:  # mounted ahead by container.create, never saved
                c.mounts_made = await bridge.found_mounts(pod, c)
            # (an exit recorded before: a record of an earlier version)
            exited = c.exited_at is not None
            c.state = ContainerState.EXITED if exited else ContainerState.RUNNING
            log.info("container start completed", extra={"pod": pod.id, "container": c.id})
            # its exit may have come right after the AttachVM, kept aside while it was created
            exits.apply_early_exit(d, pod, c)
        else:
            # what container.create mounted ahead (no record lists it), or a start's mounts
            await bridge.unmount_container(pod, c)
            c.mounts_made = []
    elif intent == "stop":
        if await _agent_has(pod, c, link):
            try:
                await bridge.call(pod, link, "removecontainer", bridge.remove_message(c))
            except AgentError as exc:
                log.info(
                    "interrupted stop not completed: %s",
                    exc,
                    extra={"pod": pod.id, "container": c.id},
                )
                c.intent = ""
                return
        c.state = ContainerState.STOPPED
        for e in pod.execs.values():  # as container.stop leaves them
            if e.container == c.id:
                e.state = ExecState.EXITED
        await bridge.unmount_container(pod, c)
        c.mounts_made = []
    c.intent = ""


async def _agent_has(pod: PodRecord, c: ContainerRecord, link: AgentLink) -> bool:
    """Whether the agent knows the container (an ERROR to a harmless signal means it does not:
    unknown, or for the hyperhq agent, freed since its init exited)."""
    try:
        await bridge.call(pod, link, "killcontainer", bridge.kill_message(c, PROBE_SIGNAL, False))
    except AgentError:
        return False
    return True


async def _reconcile_lost(d: Daemon, pod: PodRecord, rt: PodRuntime, reason: str) -> None:
    log.warning("pod lost: %s", reason, extra={"pod": pod.id, "reason": reason})
    await d.teardown(pod, rt, unregister=False)
    for c in pod.containers.values():
        c.state = ContainerState.STOPPED
        c.intent = ""
    pod.state = PodState.STOPPED
    pod.reason = reason
    d.save_logged(pod)
    d.publish("pod", pod, str(pod.state), reason=reason)
