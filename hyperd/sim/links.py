"""Host connections of the simulated VM's ports, driven as asyncio protocols.

Each accepted host connection is a :class:`Link`: an ``asyncio.Protocol`` on the event loop's
own transport (C in uvloop). Bytes are handled in ``data_received`` without a task switch; what
they answer is written with one ``transport.write`` per received chunk. A :class:`Port` names
the current link of one virtio-serial port (a newer connection replaces the older one).

Flow control: :meth:`Link.drain` waits while the transport's write buffer is above its high-water
mark (``pause_writing``), so process output never piles up for a host that does not read; the
ctl link also stops reading while its writes are paused, as a blocking writer would.

uvloop's transports implement ``asyncio.Transport`` without subclassing it: they are cast, never
checked with ``isinstance``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

__all__ = ["Link", "Port"]

log = logging.getLogger("hyperd.sim.server")


class Link(asyncio.Protocol):
    """One host connection on a port. Subclasses handle ``data_received``."""

    def __init__(self, port: Port) -> None:
        self.port = port
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self._lost: asyncio.Future[None] = self._loop.create_future()
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        log.info("%s: host connected", self.port.name)
        self.port.attach(self)

    def eof_received(self) -> bool:
        return False  # the host hung up: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake_drainers()
        self.port.release(self)
        if exc is not None:
            log.info("%s: connection lost (%s)", self.port.name, exc)
        log.info("%s: host disconnected", self.port.name)
        if not self._lost.done():
            self._lost.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drainers()

    # -- use -----------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Write ``data`` (dropped once the connection is closing or closed)."""
        transport = self.transport
        if transport is not None and not self.closed and not transport.is_closing():
            transport.write(data)

    async def drain(self) -> None:
        """Wait while the write buffer is above its high-water mark (or until closed)."""
        while self._write_paused and not self.closed:
            waiter: asyncio.Future[None] = self._loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter

    def close(self) -> None:
        """Close after the buffered writes are flushed."""
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Close now, dropping whatever is still buffered."""
        if self.transport is not None:
            self.transport.abort()

    async def wait_lost(self) -> None:
        await asyncio.shield(self._lost)

    def replaced(self) -> None:
        """A newer host connection took over the port: drop this one."""
        self.abort()

    def _wake_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


class Port:
    """One virtio-serial port: its current host link, if any; output with no host is dropped."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.link: Link | None = None
        self.links: set[Link] = set()  # every link not yet lost (replaced ones included)

    def attach(self, link: Link) -> None:
        old = self.link
        self.link = link
        self.links.add(link)
        if old is not None:
            old.replaced()

    def release(self, link: Link) -> None:
        self.links.discard(link)
        if self.link is link:
            self.link = None

    def write(self, data: bytes) -> None:
        link = self.link
        if link is not None:
            link.write(data)

    async def send(self, data: bytes) -> None:
        """Write ``data`` to the current host and wait while its buffer is full."""
        link = self.link
        if link is not None:
            link.write(data)
            await link.drain()

    def abort_all(self) -> list[Link]:
        """Abort every open link; returns them (to wait for their ``connection_lost``)."""
        links = list(self.links)
        for link in links:
            link.abort()
        return links
