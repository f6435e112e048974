"""Helpers shared by the VM-layer tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio

from hyperd.vm import VMConnection, VMEvent
from tests.vm.fakeproxy import FakeProxy

VM = "vm-test"


@asynccontextmanager
async def serving(tmp: Path, **kwargs: object) -> AsyncIterator[FakeProxy]:
    """A :class:`FakeProxy` listening on ``tmp/p.sock`` for the duration of the block."""
    proxy = FakeProxy(str(tmp / "p.sock"), **kwargs)  # type: ignore[arg-type]
    async with anyio.create_task_group() as tg:
        await tg.start(proxy.serve)
        yield proxy
        tg.cancel_scope.cancel()


@asynccontextmanager
async def connected(proxy: FakeProxy) -> AsyncIterator[VMConnection]:
    """A bare :class:`VMConnection` to ``proxy``, driven for the duration of the block."""
    conn = await VMConnection.connect(proxy.path, vm_id=VM)
    async with anyio.create_task_group() as tg:
        tg.start_soon(conn.run)
        yield conn
        conn.close("test done")


class EventLog:
    """Collects session events; :meth:`wait` blocks until a given kind arrives."""

    def __init__(self) -> None:
        self.events: list[VMEvent] = []
        self._changed = anyio.Event()

    def __call__(self, event: VMEvent) -> None:
        self.events.append(event)
        self._changed.set()
        self._changed = anyio.Event()

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    async def wait(self, kind: str, count: int = 1, within: float = 5.0) -> None:
        with anyio.fail_after(within):
            while self.kinds().count(kind) < count:
                await self._changed.wait()
