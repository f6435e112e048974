"""Task events to containerd: ``Events.Forward`` over ttrpc to ``$TTRPC_ADDRESS``.

Events go out from one queue, in order, on one connection that is reopened when it breaks
(containerd restarts: the first send on the old connection fails with EPIPE). A failed event is
retried a few times with a growing pause, as containerd's own shims do, then dropped with a log
line; the queue is bounded, so a containerd that never comes back costs bounded memory.
"""

from __future__ import annotations

import logging
import time
from typing import Final

import anyio
from google.protobuf import any_pb2, empty_pb2, timestamp_pb2
from google.protobuf.message import Message

from hyperd.shim.proto import events_service_pb2
from hyperd.shim.ttrpc import TtrpcClient, TtrpcError
from protocol import ProtocolError

log = logging.getLogger(__name__)

SERVICE: Final = "containerd.services.events.ttrpc.v1.Events"
MAX_QUEUED: Final = 1024  # events waiting for containerd; more are dropped with a warning
ATTEMPTS: Final = 5  # tries per event (containerd's shim publisher requeues 5 times)
CALL_DEADLINE: Final = 5.0  # seconds per Forward, as containerd's publisher


def timestamp(at: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(at * 1e9))
    return ts


class Publisher:
    """``publish()`` queues; ``run()`` (a task) delivers."""

    def __init__(self, address: str, namespace: str) -> None:
        self.address = address.removeprefix("unix://")
        self.namespace = namespace
        self._send, self._receive = anyio.create_memory_object_stream[tuple[str, Message, float]](
            MAX_QUEUED
        )
        self.sent = 0
        self.dropped = 0

    def publish(self, topic: str, event: Message) -> None:
        """Queue ``event`` for ``topic`` (never waits)."""
        try:
            self._send.send_nowait((topic, event, time.time()))
        except anyio.WouldBlock:
            self.dropped += 1
            log.warning("event queue full, dropped %s", topic)

    def _envelope(self, topic: str, event: Message, at: float) -> Message:
        payload = any_pb2.Any(type_url=event.DESCRIPTOR.full_name, value=event.SerializeToString())
        return events_service_pb2.ForwardRequest(
            envelope=events_service_pb2.Envelope(
                timestamp=timestamp(at), namespace=self.namespace, topic=topic, event=payload
            )
        )

    async def run(self) -> None:
        client: TtrpcClient | None = None
        try:
            async for topic, event, at in self._receive:
                request = self._envelope(topic, event, at)
                for attempt in range(1, ATTEMPTS + 1):
                    try:
                        if client is None:
                            client = await TtrpcClient.connect(self.address)
                        await client.call(
                            SERVICE, "Forward", request, empty_pb2.Empty, deadline=CALL_DEADLINE
                        )
                        self.sent += 1
                        break
                    except (
                        OSError,
                        TimeoutError,
                        TtrpcError,
                        ProtocolError,
                        anyio.BrokenResourceError,
                        anyio.EndOfStream,
                        anyio.ClosedResourceError,
                    ) as exc:
                        if client is not None:
                            await client.aclose()
                            client = None
                        if attempt == ATTEMPTS:
                            self.dropped += 1
                            log.warning("could not publish %s: %s", topic, exc)
                        else:
                            await anyio.sleep(attempt)  # back-off before the next try
        finally:
            if client is not None:
                await client.aclose()
