""":class:`~hyperd.daemon.vmlink.AgentLink` on top of :class:`hyperd.vm.VMSession`.

The session runs in a task group owned by the ``async with`` block of :func:`open_session`
(which must stay in one task: the pod's link task). Leaving the block sends UnregisterVM when
:class:`~hyperd.daemon.vmlink.LinkControl` asks for it, then closes the session.

I/O tokens are allocated ahead: once a token has been asked for, the link keeps spare ones,
refilled in the background (one AttachVM for all of them) when fewer than half of the target
are left, so ``container.create`` and ``exec.create`` need no round trip to the proxy. The
target follows the pod's use: twice the spares it has taken so far, between
:data:`SPARE_MIN` and :data:`SPARE_MAX` (a pod of a few containers holds at most 4 spares; one
that keeps creating holds up to 16, one AttachVM per 8 creates). A spare token is just an
allocated, unclaimed token: the proxy keeps it for the VM's life, and the ones still spare when
the link closes (or hyperd stops) are never used (the proxy frees them with the VM). A
reconnect to the proxy drops the spares.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from time import perf_counter
from typing import Any

import anyio
import msgspec

from hyperd.config import Config
from hyperd.daemon.model import PodRecord
from hyperd.daemon.vmlink import LinkControl, LinkEvent
from hyperd.errors import HyperdError
from hyperd.rpc.pending import Pending
from hyperd.timings import Timings
from hyperd.vm import ProcessExit, VMConfig, VMEvent, VMSession
from protocol.hyperstart import CC, HYPER

log = logging.getLogger(__name__)

SPARE_MIN = 4
"""Spare I/O tokens kept per pod at first (see the module's docstring)."""
SPARE_MAX = 16
"""Spare I/O tokens kept per pod at most, for a pod that keeps creating processes."""


def spare_target(used: int) -> int:
    """How many spare tokens to keep once ``used`` spares were taken: twice that, within
    :data:`SPARE_MIN` .. :data:`SPARE_MAX`; they are refilled when fewer than half are left."""
    return min(SPARE_MAX, max(SPARE_MIN, 2 * used))


_AGENT_KEYS = {name: "agent." + name for name in {*CC.names, *HYPER.names}}
"""Timing keys of the agent commands (a fixed set: any other name counts as ``agent.other``)."""


def _reply(future: asyncio.Future[bytes]) -> bytes:
    return future.result()


def _timed_reply(
    timings: Timings, key: str | None, start: float, future: asyncio.Future[bytes]
) -> bytes:
    timings.since(key or "agent.other", start)
    return future.result()


class SessionLink:
    """The daemon's :class:`~hyperd.daemon.vmlink.AgentLink` over a ``VMSession``.

    ``spares``: the task group that refills the spare tokens (none: no spares are kept).
    """

    def __init__(
        self,
        session: VMSession,
        spares: anyio.abc.TaskGroup | None = None,
        timings: Timings | None = None,
    ) -> None:
        self.session = session
        self._timings = timings
        self._spares: list[str] = []
        self._spare_group = spares
        self._refilling = False
        self._generation = 0  # bumped when the spares are dropped: a refill under way is stale
        self.spares_used = 0

    @property
    def proxy_url(self) -> str:
        return self.session.proxy_url

    async def hyper(
        self, name: str, data: bytes | None = None, *, tokens: Sequence[str] = ()
    ) -> bytes:
        start = perf_counter()
        try:
            return await self.session.hyper(name, data, tokens=list(tokens) or None)
        finally:
            if self._timings is not None:
                self._timings.since(_AGENT_KEYS.get(name) or "agent.other", start)

    def send(self, name: str, data: bytes | None = None) -> Pending[bytes]:
        start = perf_counter()
        future = self.session.send(name, data)
        timings = self._timings
        if timings is None:
            return Pending(future, _reply)
        return Pending(future, partial(_timed_reply, timings, _AGENT_KEYS.get(name), start))

    async def new_tokens(self, count: int) -> list[str]:
        spares = self._spares
        if count <= len(spares):
            tokens = spares[:count]
            del spares[:count]
            self.spares_used += count
        else:
            tokens = await self.session.new_tokens(count)
        self._refill()
        return tokens

    def drop_spares(self) -> None:
        """Forget the spare tokens (the proxy connection was lost: they may be gone with it)."""
        self._spares.clear()
        self._generation += 1

    @property
    def spare_target(self) -> int:
        """The spare tokens the link keeps now (0: it keeps none)."""
        return spare_target(self.spares_used) if self._spare_group is not None else 0

    def _refill(self) -> None:
        if self._refilling or 2 * len(self._spares) >= self.spare_target:
            return
        assert self._spare_group is not None
        self._refilling = True
        self._spare_group.start_soon(self._fill, self._generation)

    async def _fill(self, generation: int) -> None:
        try:
            missing = self.spare_target - len(self._spares)
            if missing > 0:
                tokens = await self.session.new_tokens(missing)
                if generation == self._generation:
                    self._spares.extend(tokens)
        except HyperdError as exc:
            # the next create allocates its token itself, and tries to refill again
            log.debug("refilling the spare I/O tokens failed: %s", exc)
        except Exception:  # a bug: it must not end the pod's link
            log.exception("refilling the spare I/O tokens failed")
        finally:
            self._refilling = False

    def statistics(self) -> dict[str, Any]:
        stats: dict[str, Any] = msgspec.to_builtins(self.session.statistics())
        stats["spare_tokens"] = len(self._spares)
        stats["spare_target"] = self.spare_target
        stats["spare_tokens_used"] = self.spares_used
        return stats

    def mark_unreachable(self, reason: str) -> None:
        self.session.mark_unreachable(reason)

    @property
    def exit_notifications(self) -> bool:
        return self.session.exit_notifications


def vm_config(config: Config) -> VMConfig:
    t = config.timeouts
    return VMConfig(
        command_timeout=t.command,
        connect_timeout=t.connect,
        ping_interval=t.ping_interval,
        ping_timeout=t.ping_timeout,
        ready_timeout=t.ready,
    )


@asynccontextmanager
async def open_session(
    pod: PodRecord,
    config: Config,
    *,
    attach: bool,
    on_event: Callable[[LinkEvent], None],
    timings: Timings | None = None,
) -> AsyncIterator[tuple[SessionLink, LinkControl]]:
    """Register (or attach to) the pod's VM through its proxy for the block's duration."""

    link: SessionLink | None = None

    def translate(event: VMEvent) -> None:
        if link is not None and event.kind in ("unreachable", "reconnected"):
            link.drop_spares()
        on_event(LinkEvent(kind=event.kind, reason=event.reason))

    def exited(exit: ProcessExit) -> None:
        on_event(
            LinkEvent(
                kind="process_exited",
                token=exit.token,
                container=exit.container,
                process=exit.process,
                status=exit.status,
                backlog=exit.backlog,
            )
        )

    session = VMSession(
        pod.id,
        pod.proxy_url,
        ctl=pod.ctl_path,
        tty=pod.tty_path,
        console=pod.vm.console,
        register=not attach,
        config=vm_config(config),
        on_event=translate,
        on_exit=exited,
    )
    control = LinkControl()
    async with anyio.create_task_group() as tg:
        await tg.start(session.run)
        link = SessionLink(session, tg, timings)
        try:
            yield link, control
        finally:
            with anyio.CancelScope(shield=True):
                if control.unregister:
                    try:
                        with anyio.fail_after(config.timeouts.command):
                            await session.unregister()
                    except (HyperdError, TimeoutError) as exc:
                        log.warning("UnregisterVM failed: %s", exc, extra={"pod": pod.id})
                await session.close()
