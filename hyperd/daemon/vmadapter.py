""":class:`~hyperd.daemon.vmlink.AgentLink` on top of :class:`hyperd.vm.VMSession`.

The session runs in a task group owned by the ``async with`` block of :func:`open_session`
(which must stay in one task: the pod's link task). Leaving the block sends UnregisterVM when
:class:`~hyperd.daemon.vmlink.LinkControl` asks for it, then closes the session.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import msgspec

from hyperd.config import Config
from hyperd.daemon.model import PodRecord
from hyperd.daemon.vmlink import LinkControl, LinkEvent
from hyperd.errors import HyperdError
from hyperd.vm import ProcessExit, VMConfig, VMEvent, VMSession

log = logging.getLogger(__name__)


class SessionLink:
    """The daemon's :class:`~hyperd.daemon.vmlink.AgentLink` over a ``VMSession``."""

    def __init__(self, session: VMSession) -> None:
        self.session = session

    @property
    def proxy_url(self) -> str:
        return self.session.proxy_url

    async def hyper(
        self, name: str, data: bytes | None = None, *, tokens: Sequence[str] = ()
    ) -> bytes:
        return await self.session.hyper(name, data, tokens=list(tokens) or None)

    async def new_tokens(self, count: int) -> list[str]:
        return await self.session.new_tokens(count)

    def statistics(self) -> dict[str, Any]:
        stats: dict[str, Any] = msgspec.to_builtins(self.session.statistics())
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
) -> AsyncIterator[tuple[SessionLink, LinkControl]]:
    """Register (or attach to) the pod's VM through its proxy for the block's duration."""

    def translate(event: VMEvent) -> None:
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
        try:
            yield SessionLink(session), control
        finally:
            with anyio.CancelScope(shield=True):
                if control.unregister:
                    try:
                        with anyio.fail_after(config.timeouts.command):
                            await session.unregister()
                    except (HyperdError, TimeoutError) as exc:
                        log.warning("UnregisterVM failed: %s", exc, extra={"pod": pod.id})
                await session.close()
