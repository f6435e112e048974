"""The event bus: pod, container, exec and VM state changes, fanned out to subscribers.

:meth:`EventBus.publish` never blocks: each subscriber has a bounded buffer, and a subscriber
that falls :data:`SUBSCRIBER_BUFFER` events behind is dropped (its stream ends), so one slow
client cannot stall the daemon. Events are plain JSON-able dicts
``{"kind", "pod", "container"?, "state", ...}``: the ``params`` of the ``event`` notification.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

log = logging.getLogger(__name__)

SUBSCRIBER_BUFFER = 1024  # events a subscriber may lag behind before it is dropped

Event = dict[str, Any]


class EventBus:
    """Fan-out of events to any number of subscribers."""

    def __init__(self) -> None:
        self._subscribers: set[MemoryObjectSendStream[Event]] = set()
        self._listeners: list[Callable[[Event], object]] = []
        self.published = 0

    def add_listener(self, callback: Callable[[Event], object]) -> None:
        """Call ``callback(event)`` synchronously for every event (keep it cheap)."""
        self._listeners.append(callback)

    def publish(self, kind: str, pod: str, state: str, **fields: Any) -> Event:
        """Send one event to every subscriber; returns it."""
        event: Event = {"kind": kind, "pod": pod, "state": state, "time": time.time()}
        event.update({k: v for k, v in fields.items() if v is not None})
        self.published += 1
        for callback in self._listeners:
            try:
                callback(event)
            except Exception:
                log.exception("event listener failed")
        for send in list(self._subscribers):
            try:
                send.send_nowait(event)
            except anyio.WouldBlock:
                log.warning("event subscriber fell behind by %d events; dropped", SUBSCRIBER_BUFFER)
                self._subscribers.discard(send)
                send.close()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                self._subscribers.discard(send)
        return event

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[MemoryObjectReceiveStream[Event]]:
        """A stream of the events published from now on, until the context exits."""
        send, receive = anyio.create_memory_object_stream[Event](SUBSCRIBER_BUFFER)
        self._subscribers.add(send)
        try:
            yield receive
        finally:
            self._subscribers.discard(send)
            send.close()
            receive.close()

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)
