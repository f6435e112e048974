"""Restart adoption: load the persisted pods and reconcile each with what is really there.

- A pod that was running: its VM and proxy processes (when hyperd started them) must still be
  the same processes (pid + start time); then hyperd re-attaches to the VM through its proxy
  (AttachVM, not RegisterVM) and undoes the mounts of containers caught in the middle of
  ``container.start``; the exits that happened meanwhile come from the proxy right after the
  AttachVM (or, without exit notifications, shims that are gone mark their containers exited).
  A pod whose helpers died, or whose VM cannot be re-attached, is torn down
  and marked ``stopped`` with the reason.
- A pod that was not running (or was caught in the middle of ``pod.start`` by a crash): every
  helper process it recorded is stopped and its share dir cleaned, so it can start again.

Pods are reconciled concurrently; one broken record does not keep the others from loading.
"""

from __future__ import annotations

import logging

import anyio

from hyperd.daemon import bridge, launcher
from hyperd.daemon.model import ContainerState, PodRecord, PodState
from hyperd.daemon.service import STORE_KIND, Daemon, PodRuntime
from hyperd.errors import HyperdError

log = logging.getLogger(__name__)


async def load(d: Daemon) -> list[str]:
    """Load persisted pods and re-adopt the running ones; returns the load problems."""
    result = await anyio.to_thread.run_sync(d.store.load_all, STORE_KIND, PodRecord)
    for pid, pod in sorted(result.records.items()):
        d.pods[pid] = pod
        d.runtime[pid] = PodRuntime()
    async with anyio.create_task_group() as tg:  # one slow VM must not delay the others
        for pod in list(d.pods.values()):
            tg.start_soon(_reconcile, d, pod)
    return result.problems


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
    if pod.vm_process or pod.proxy_process or share_left:
        log.info("cleaning up after an interrupted operation", extra={"pod": pod.id})
        await d.teardown(pod, d.rt(pod), unregister=False)
        await d.save(pod)


async def _adopt(d: Daemon, pod: PodRecord) -> None:
    rt = d.rt(pod)
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
    # the exits kept by the proxy while hyperd was down arrived right after the AttachVM (and
    # were applied); without exit notifications the shims' pids are watched again
    d.exit_source(pod, link)
    for c in pod.containers.values():
        if c.state == ContainerState.CREATED:
            # a crash in the middle of container.start may have left its mounts
            await bridge.unmount_container(pod, c)
            c.mounts_made = []
    pod.state = PodState.RUNNING
    pod.reason = ""
    await d.save(pod)
    log.info("pod re-adopted", extra={"pod": pod.id})


async def _reconcile_lost(d: Daemon, pod: PodRecord, rt: PodRuntime, reason: str) -> None:
    log.warning("pod lost: %s", reason, extra={"pod": pod.id, "reason": reason})
    await d.teardown(pod, rt, unregister=False)
    for c in pod.containers.values():
        c.state = ContainerState.STOPPED
    pod.state = PodState.STOPPED
    pod.reason = reason
    await d.save(pod)
    d.publish("pod", pod, str(pod.state), reason=reason)
