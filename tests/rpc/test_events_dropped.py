"""A subscriber that falls behind the event bus is told so (``events.dropped``), not left quiet.

The real forwarding code of ``events.subscribe`` (:func:`hyperd.daemon.api._forward_events`)
and the real :class:`~hyperd.daemon.events.EventBus`, served by a real RPC server on a unix
socket; the daemon around them is reduced to the two attributes the forwarder uses.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import pytest

from hyperd.daemon.api import _forward_events
from hyperd.daemon.events import SUBSCRIBER_BUFFER, EventBus
from hyperd.rpc import CallContext, MethodTable, RPCServer, create_unix_listener
from tests.rpc.support import DEADLINE, RawClient

pytestmark = pytest.mark.anyio


@dataclass
class Daemon:
    """What ``_forward_events`` uses of the daemon: its bus and its task group."""

    bus: EventBus
    tg: anyio.abc.TaskGroup


async def test_a_subscriber_behind_the_bus_gets_events_dropped(short_tmp: Path) -> None:
    path = short_tmp / "rpc.sock"
    async with anyio.create_task_group() as tg:
        daemon: Any = Daemon(EventBus(), tg)
        methods = MethodTable()

        async def subscribe(params: None, ctx: CallContext) -> Any:
            await tg.start(functools.partial(_forward_events, daemon, ctx))
            return {"subscribed": True}

        methods.register("events.subscribe", subscribe)
        server = RPCServer(methods, notify_queue=4 * SUBSCRIBER_BUFFER)
        await tg.start(server.serve, await create_unix_listener(path))
        async with RawClient.connect(path) as client:
            assert (await client.call("events.subscribe"))["result"] == {"subscribed": True}
            # a burst with no await in between: the forwarder cannot keep up with the bus
            for i in range(SUBSCRIBER_BUFFER + 10):
                daemon.bus.publish("pod", f"p{i}", "created")
            received = []
            while True:
                message = await client.recv()
                if message["method"] != "event":
                    break
                received.append(message["params"]["pod"])
            # the events it got are the first ones, in order, with none missing among them
            assert received == [f"p{i}" for i in range(len(received))]
            assert SUBSCRIBER_BUFFER <= len(received) < SUBSCRIBER_BUFFER + 10
            assert message["method"] == "events.dropped"
            assert "subscribe again" in message["params"]["reason"]
            assert daemon.bus.subscribers == 0
            # the connection still serves; subscribing again works
            assert (await client.call("events.subscribe", id=2))["result"] == {"subscribed": True}
            daemon.bus.publish("pod", "after", "created")
            assert (await client.recv())["params"]["pod"] == "after"
        with anyio.fail_after(DEADLINE):
            await server.shutdown()
        tg.cancel_scope.cancel()
