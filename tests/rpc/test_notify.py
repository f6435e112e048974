"""Server-to-client notifications: subscribers, on_close, and dropping a slow subscriber."""

from __future__ import annotations

import logging
from pathlib import Path

import anyio
import pytest

from hyperd.rpc import RPCClient
from tests.rpc.support import DEADLINE, RawClient, State, running_server

pytestmark = pytest.mark.anyio


async def test_notify_reaches_subscriber_and_close_unsubscribes(short_tmp: Path) -> None:
    path = short_tmp / "rpc.sock"
    state = State()
    async with running_server(path, state):
        async with RPCClient.connect(path) as subscriber, RPCClient.connect(path) as publisher:
            assert await subscriber.call("subscribe") is True
            assert await publisher.call("publish", {"count": 3}) == 3
            with anyio.fail_after(DEADLINE):
                notes = [await subscriber.receive_notification() for _ in range(3)]
            assert [n.method for n in notes] == ["event"] * 3
            assert [n.params for n in notes] == [{"seq": i, "pad": ""} for i in range(3)]
            [ctx] = state.subscribers
            was_open = not ctx.closed
        with anyio.fail_after(DEADLINE):
            await state.unsubscribed.wait()
            await ctx.wait_closed()
        assert state.subscribers == set()
        assert was_open and ctx.closed
        assert ctx.notify("event", {"late": True}) is False
        called: list[bool] = []
        ctx.on_close(lambda: called.append(True))  # after close: runs at once
        assert called == [True]


async def test_notifications_interleave_with_responses_whole_lines(short_tmp: Path) -> None:
    path = short_tmp / "rpc.sock"
    state = State()
    async with running_server(path, state), RawClient.connect(path) as c:
        assert (await c.call("subscribe", id=1))["result"] is True
        await c.send_json(
            {"jsonrpc": "2.0", "method": "publish", "params": {"count": 50, "size": 5000}, "id": 2}
        )
        seen = []
        for _ in range(51):
            seen.append(await c.recv())
        notes = [m for m in seen if m.get("method") == "event"]
        assert [n["params"]["seq"] for n in notes] == list(range(50))
        assert all("id" not in n and n["jsonrpc"] == "2.0" for n in notes)
        assert [m for m in seen if "id" in m] == [{"jsonrpc": "2.0", "result": 50, "id": 2}]


async def test_slow_subscriber_is_dropped_without_blocking_the_server(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = short_tmp / "rpc.sock"
    state = State()
    async with (
        running_server(path, state, notify_queue=4),
        RawClient.connect(path) as slow,
        RPCClient.connect(path) as publisher,
    ):
        assert (await slow.call("subscribe", id=1))["result"] is True
        # the slow subscriber now reads nothing; 200 x 64 KiB overflow socket buffer and queue
        with caplog.at_level(logging.WARNING, logger="hyperd.rpc"), anyio.fail_after(DEADLINE):
            delivered = await publisher.call("publish", {"count": 200, "size": 65536})
            await state.unsubscribed.wait()
        assert 4 <= delivered < 200
        assert state.published[:delivered] == [True] * delivered
        assert False in state.published
        assert state.subscribers == set()
        assert any("dropping the subscriber" in r.getMessage() for r in caplog.records)
        # the server goes on serving others; the dropped client sees the end of its stream
        assert await publisher.call("ping") == "pong"
        await slow.expect_eof()
