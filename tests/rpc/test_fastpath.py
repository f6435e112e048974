"""The hot path: handlers that never await are answered without a task; flow control."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import resource
import socket
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import pytest

from hyperd.rpc import CallContext, MethodTable, RPCServer
from hyperd.rpc.methods import NEEDS_TASK, never_suspends
from protocol.jsonrpc import METHOD_NOT_FOUND, ErrorObject, Request, Response
from tests.rpc.support import DEADLINE, RawClient, eventually, request, running_server

pytestmark = pytest.mark.anyio

BIG = 400_000  # bytes of one big result: more than a unix socket's buffers hold
BURST = 20  # notifications pushed by one call


class SizeParams(msgspec.Struct):
    size: int


class TagParams(msgspec.Struct):
    tag: str


# --- never_suspends ----------------------------------------------------------------------------


async def plain(params: None, ctx: CallContext) -> int:
    return 1


async def awaits(params: None, ctx: CallContext) -> int:
    await anyio.lowlevel.checkpoint()
    return 1


async def with_async_with(params: None, ctx: CallContext) -> int:
    async with anyio.Lock():
        return 1


async def with_async_for(params: None, ctx: CallContext) -> int:
    async def gen() -> AsyncIterator[int]:
        yield 1

    return sum([i async for i in gen()])


async def with_cancel_scope(params: None, ctx: CallContext) -> int:
    result = 0
    with anyio.CancelScope():  # noqa: ASYNC100 - a sync context manager cannot suspend
        result = 1
    return result


def not_async(params: None, ctx: CallContext) -> int:
    return 1


class Handlers:
    async def method(self, params: None, ctx: CallContext) -> int:
        return 1


@pytest.mark.parametrize(
    ("handler", "expected"),
    [
        (plain, True),
        (with_cancel_scope, True),
        (Handlers().method, True),
        (awaits, False),
        (with_async_with, False),
        (with_async_for, False),
        (functools.partial(plain), False),  # not inspected: assumed to suspend
        (not_async, False),
    ],
    ids=[
        "plain",
        "cancel-scope",
        "bound-method",
        "await",
        "async-with",
        "async-for",
        "partial",
        "sync",
    ],
)
def test_never_suspends(handler: Any, expected: bool) -> None:
    assert never_suspends(handler) is expected


def test_dispatch_now_only_for_handlers_that_cannot_suspend() -> None:
    methods = MethodTable()
    methods.register("plain", plain)
    methods.register("awaits", awaits)
    assert methods.names() == ["awaits", "plain"]

    class Overridden(MethodTable):
        async def dispatch(self, msg: Any, ctx: CallContext) -> Any:
            return await super().dispatch(msg, ctx)

    overridden = Overridden()
    overridden.register("plain", plain)
    ctx: Any = object()  # not used by these handlers
    answer = methods.dispatch_now(Request(method="plain", id=1), ctx)
    assert isinstance(answer, Response)
    assert (answer.id, msgspec.json.decode(answer.result)) == (1, 1)
    assert methods.dispatch_now(Request(method="awaits", id=2), ctx) is NEEDS_TASK
    unknown = methods.dispatch_now(Request(method="nope", id=3), ctx)
    assert isinstance(unknown, Response) and isinstance(unknown.error, ErrorObject)
    assert unknown.error.code == METHOD_NOT_FOUND
    assert overridden.dispatch_now(Request(method="plain", id=4), ctx) is NEEDS_TASK


# --- a server with methods of its own ----------------------------------------------------------


class Seen:
    def __init__(self) -> None:
        self.order: list[str] = []
        self.tasks: list[asyncio.Task[Any] | None] = []
        self.released = anyio.Event()
        self.finished = 0


def fast_methods(seen: Seen) -> MethodTable:
    methods = MethodTable()

    @methods.method("sync.anyio")
    async def sync_anyio(params: None, ctx: CallContext) -> dict[str, Any]:
        # anyio looks the current task up even without awaiting
        with anyio.move_on_after(DEADLINE) as scope:  # noqa: ASYNC100 - the point
            lock = anyio.Lock()
            lock.acquire_nowait()
            lock.release()
            event = anyio.Event()
            event.set()
        seen.tasks.append(asyncio.current_task())
        return {"now": anyio.current_time() > 0, "cancelled": scope.cancelled_caught}

    @methods.method("record.sync", TagParams)
    async def record_sync(params: TagParams, ctx: CallContext) -> str:
        seen.order.append(params.tag)
        return params.tag

    @methods.method("record.async", TagParams)
    async def record_async(params: TagParams, ctx: CallContext) -> str:
        seen.order.append(params.tag)  # before the first await
        await anyio.lowlevel.checkpoint()
        return params.tag

    @methods.method("big", SizeParams)
    async def big(params: SizeParams, ctx: CallContext) -> str:
        return "x" * params.size

    @methods.method("burst", SizeParams)
    async def burst(params: SizeParams, ctx: CallContext) -> str:
        for seq in range(BURST):
            assert ctx.notify("note", {"seq": seq, "pad": "x" * params.size})
        return "after the notes"

    @methods.method("hold")
    async def hold(params: None, ctx: CallContext) -> str:
        try:
            await seen.released.wait()
        finally:
            seen.finished += 1
        return "held"

    return methods


def fast_server(path: Path, seen: Seen, **options: Any) -> AbstractAsyncContextManager[RPCServer]:
    return running_server(path, methods=fast_methods(seen), **options)


async def test_handler_that_never_awaits_runs_inside_a_task_as_anyio_sees_it(
    short_tmp: Path,
) -> None:
    seen = Seen()
    path = short_tmp / "rpc.sock"
    async with fast_server(path, seen), RawClient.connect(path) as a, RawClient.connect(path) as b:
        for client in (a, b, a):
            answer = await client.call("sync.anyio")
            assert answer["result"] == {"now": True, "cancelled": False}
    # no task of their own: every such call ran with the server's one host task current
    assert len(seen.tasks) == 3 and seen.tasks[0] is not None
    assert seen.tasks[0] is seen.tasks[1] is seen.tasks[2]


async def test_without_asyncio_enter_task_every_call_runs_in_a_task(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fallback where asyncio's ``_enter_task`` is missing: same answers, each call in a task
    of its own (so none runs with the host task current), order kept."""
    from hyperd.rpc import connection

    monkeypatch.setattr(connection, "_enter_task", None)
    monkeypatch.setattr(connection, "_leave_task", None)
    seen = Seen()
    path = short_tmp / "rpc.sock"
    async with fast_server(path, seen), RawClient.connect(path) as a, RawClient.connect(path) as b:
        for client in (a, b, a):
            answer = await client.call("sync.anyio")
            assert answer["result"] == {"now": True, "cancelled": False}
        await a.send(
            request("record.async", 1, {"tag": "a1"}) + request("record.sync", 2, {"tag": "s2"})
        )
        assert sorted([(await a.recv())["id"] for _ in range(2)]) == [1, 2]
    assert len(seen.tasks) == 3 and len({id(t) for t in seen.tasks}) == 3
    assert all(t is not None for t in seen.tasks)
    assert seen.order == ["a1", "s2"]


async def test_calls_start_in_the_order_they_were_read(short_tmp: Path) -> None:
    seen = Seen()
    path = short_tmp / "rpc.sock"
    async with fast_server(path, seen), RawClient.connect(path) as c:
        await c.send(
            request("record.async", 1, {"tag": "a1"})
            + request("record.sync", 2, {"tag": "s2"})
            + request("record.async", 3, {"tag": "a3"})
            + request("record.sync", 4, {"tag": "s4"})
        )
        answers = [await c.recv() for _ in range(4)]
        assert sorted(a["id"] for a in answers) == [1, 2, 3, 4]
        # a call that completes at once does not overtake one read before it
        assert seen.order == ["a1", "s2", "a3", "s4"]
        assert await c.call("record.sync", {"tag": "s5"}, id=5) == {
            "jsonrpc": "2.0",
            "result": "s5",
            "id": 5,
        }


async def test_client_not_reading_its_answers_stops_being_read(short_tmp: Path) -> None:
    seen = Seen()
    path = short_tmp / "rpc.sock"
    calls = 8
    async with fast_server(path, seen, max_in_flight=2) as server:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(path))
            sock.setblocking(False)
            sock.sendall(b"".join(request("big", i, {"size": BIG}) for i in range(calls)))
            # the first answers fill the socket and the transport's buffer (max_output):
            # the server stops reading before it has taken every call
            await eventually(lambda: server.statistics().reading_paused == 1)
            stats = server.statistics()
            assert stats.in_flight <= 2
            assert stats.calls_started < calls
            assert stats.output_buffered > 0
            received = b""
            with anyio.fail_after(DEADLINE):
                while received.count(b"\n") < calls:
                    await anyio.wait_readable(sock)
                    received += sock.recv(1 << 20)
        answers = [msgspec.json.decode(line) for line in received.splitlines()]
        assert sorted(a["id"] for a in answers) == list(range(calls))
        assert all(len(a["result"]) == BIG for a in answers)
        await eventually(lambda: server.statistics().connections == 0)


async def test_client_gone_during_a_call(short_tmp: Path) -> None:
    seen = Seen()
    path = short_tmp / "rpc.sock"
    async with fast_server(path, seen) as server:
        async with RawClient.connect(path) as c:
            await c.send(request("hold", 1))
            await eventually(lambda: server.statistics().in_flight == 1)
        # the client closed: the call still runs to its end (as after a half-close)
        await anyio.sleep(0.05)
        assert server.statistics().connections == 1
        seen.released.set()
        await eventually(lambda: server.statistics().connections == 0)
        assert seen.finished == 1


async def test_accept_out_of_descriptors_is_retried(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    seen = Seen()
    path = short_tmp / "rpc.sock"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    async with fast_server(path, seen) as server:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            lowest_free = os.dup(0)
            os.close(lowest_free)
            with caplog.at_level(logging.ERROR, logger="hyperd.rpc"):
                resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
                try:
                    sock.connect(str(path))  # queued: the server cannot take a descriptor
                    await eventually(lambda: "accept failed" in caplog.text)
                finally:
                    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            assert "Too many open files" in caplog.text
            sock.setblocking(False)
            sock.sendall(request("record.sync", 1, {"tag": "t"}))
            with anyio.fail_after(DEADLINE):
                await anyio.wait_readable(sock)
            assert msgspec.json.decode(sock.recv(65536))["result"] == "t"
        assert server.statistics().accepted == 1


async def test_output_keeps_its_order_while_writes_queue(short_tmp: Path) -> None:
    seen = Seen()
    path = short_tmp / "rpc.sock"
    async with fast_server(path, seen), RawClient.connect(path) as c:
        # 20 x 64 KiB: more than the socket and the transport take, so most of it queues
        await c.send(request("burst", 1, {"size": 65536}))
        messages = [await c.recv() for _ in range(BURST + 1)]
        assert [m["params"]["seq"] for m in messages[:BURST]] == list(range(BURST))
        assert messages[BURST] == {"jsonrpc": "2.0", "result": "after the notes", "id": 1}
