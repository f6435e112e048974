"""Plain handlers and ``Pending`` results: calls answered from a future's callback, no task."""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from hyperd.errors import InvalidState, NotFound
from hyperd.rpc import CallContext, MethodTable, RPCServer
from hyperd.rpc.pending import Pending
from protocol.jsonrpc import INTERNAL_ERROR, Notification, Request, Response
from tests.rpc.support import RawClient, eventually, request, running_server

pytestmark = pytest.mark.anyio


def _result(future: asyncio.Future[Any]) -> Any:
    return future.result()


def _not_found(future: asyncio.Future[Any]) -> Any:
    """A ``then`` that maps any failure of the future to NotFound, as the daemon maps errors."""
    try:
        return future.result()
    except LookupError as exc:
        raise NotFound(f"mapped: {exc}") from None


# --- Pending alone ------------------------------------------------------------------------------


async def test_awaiting_a_pending_gives_then_of_the_done_future() -> None:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[int] = loop.create_future()
    loop.call_soon(future.set_result, 20)
    doubled = Pending(future, _result).map(lambda n: n * 2)
    assert await doubled == 40
    assert await doubled == 40  # already done: then() again, no wait


async def test_a_failed_future_reaches_then_which_maps_it() -> None:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[int] = loop.create_future()
    loop.call_soon(future.set_exception, KeyError("c9"))
    with pytest.raises(NotFound, match="mapped: 'c9'"):
        await Pending(future, _not_found)


async def test_cancelling_the_waiter_cancels_the_future() -> None:
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    with anyio.move_on_after(0.01):
        await Pending(future, _result)
    assert future.cancelled()
    with pytest.raises(asyncio.CancelledError):
        await Pending(future, _result)  # a cancelled future is never handed to then()


# --- MethodTable -----------------------------------------------------------------------------


class Trigger:
    """The futures handed out by the ``later`` method, resolved by the test."""

    def __init__(self) -> None:
        self.futures: list[asyncio.Future[Any]] = []
        self.tasks: list[asyncio.Task[Any] | None] = []

    def make(self) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.futures.append(future)
        return future


class Tag(msgspec.Struct, forbid_unknown_fields=True):
    tag: str


def pending_methods(trigger: Trigger) -> MethodTable:
    methods = MethodTable()

    def later(params: Tag, ctx: CallContext) -> Pending[dict[str, str]]:
        trigger.tasks.append(asyncio.current_task())
        if params.tag == "refused":
            raise InvalidState("refused before anything was sent")
        future = trigger.make()
        return Pending(future, _not_found).map(lambda reply: {"tag": params.tag, "reply": reply})

    def now(params: Tag, ctx: CallContext) -> str:
        return params.tag

    def broken(params: None, ctx: CallContext) -> Pending[int]:
        return Pending(trigger.make(), lambda future: 1 // 0)

    methods.register("later", later, Tag)
    methods.register("now", now, Tag)
    methods.register("broken", broken)
    return methods


async def test_dispatch_now_runs_a_plain_handler_and_hands_back_its_pending() -> None:
    trigger = Trigger()
    methods = pending_methods(trigger)
    ctx: Any = object()
    assert not methods.runs_in_task("later")
    answer = methods.dispatch_now(Request(method="now", params={"tag": "t"}, id=1), ctx)
    assert isinstance(answer, Response) and msgspec.json.decode(answer.result) == "t"
    pending = methods.dispatch_now(Request(method="later", params={"tag": "x"}, id=2), ctx)
    assert isinstance(pending, Pending)
    trigger.futures[-1].set_result("pong")
    response = pending.then(trigger.futures[-1])
    assert isinstance(response, Response)
    assert msgspec.json.decode(response.result) == {"tag": "x", "reply": "pong"}
    # the same call through dispatch (a task, e.g. in a batch) awaits the Pending
    call = asyncio.ensure_future(
        methods.dispatch(Request(method="later", params={"tag": "y"}, id=3), ctx)
    )
    await asyncio.sleep(0)
    trigger.futures[-1].set_exception(LookupError("gone"))
    response = await call
    assert isinstance(response, Response) and response.error is not msgspec.UNSET
    assert response.error.message == "mapped: gone"
    # a notification's pending gives no response
    note = methods.dispatch_now(Notification(method="later", params={"tag": "n"}), ctx)
    assert isinstance(note, Pending)
    trigger.futures[-1].set_result("ignored")
    assert note.then(trigger.futures[-1]) is None


# --- through a server --------------------------------------------------------------------------


def pending_server(path: Path, trigger: Trigger) -> AbstractAsyncContextManager[RPCServer]:
    return running_server(path, methods=pending_methods(trigger))


async def test_calls_answered_from_their_futures_in_completion_order(short_tmp: Path) -> None:
    trigger = Trigger()
    path = short_tmp / "rpc.sock"
    async with pending_server(path, trigger) as server, RawClient.connect(path) as client:
        await client.send(
            request("later", 1, {"tag": "a"})
            + request("later", 2, {"tag": "b"})
            + request("later", None, {"tag": "note"})
        )
        await eventually(lambda: len(trigger.futures) == 3)
        assert server.statistics().in_flight == 3
        # no task per call: the handlers ran with the server's one host task current
        assert trigger.tasks[0] is not None and trigger.tasks.count(trigger.tasks[0]) == 3
        trigger.futures[1].set_result("second")
        assert await client.recv() == {
            "jsonrpc": "2.0",
            "result": {"tag": "b", "reply": "second"},
            "id": 2,
        }
        trigger.futures[0].set_exception(LookupError("c1"))
        answer = await client.recv()
        assert answer["id"] == 1 and answer["error"]["message"] == "mapped: c1"
        trigger.futures[2].set_result("dropped")  # a notification: no answer
        await eventually(lambda: server.statistics().in_flight == 0)
        # an error before anything was sent, and a then() that fails: answered, the
        # connection goes on
        refused = await client.call("later", {"tag": "refused"}, id=4)
        assert refused["error"]["data"]["kind"] == "invalid_state"
        await client.send(request("broken", 5))
        await eventually(lambda: len(trigger.futures) == 4)
        trigger.futures[3].set_result(None)
        broken = await client.recv()
        assert broken["id"] == 5 and broken["error"]["code"] == INTERNAL_ERROR
        assert await client.call("now", {"tag": "still here"}, id=6) == {
            "jsonrpc": "2.0",
            "result": "still here",
            "id": 6,
        }


async def test_a_batch_waits_for_its_pending_calls(short_tmp: Path) -> None:
    trigger = Trigger()
    path = short_tmp / "rpc.sock"
    async with pending_server(path, trigger), RawClient.connect(path) as client:
        await client.send(
            b"["
            + request("later", 1, {"tag": "a"}).strip()
            + b","
            + request("now", 2, {"tag": "b"}).strip()
            + b"]\n"
        )
        await eventually(lambda: len(trigger.futures) == 1)
        trigger.futures[0].set_result("done")
        answers = await client.recv()
        assert sorted(answers, key=lambda a: a["id"]) == [
            {"jsonrpc": "2.0", "result": {"tag": "a", "reply": "done"}, "id": 1},
            {"jsonrpc": "2.0", "result": "b", "id": 2},
        ]


async def test_a_connection_closed_by_shutdown_cancels_its_pending_calls(short_tmp: Path) -> None:
    trigger = Trigger()
    path = short_tmp / "rpc.sock"
    async with pending_server(path, trigger) as server, RawClient.connect(path) as client:
        await client.send(request("later", 1, {"tag": "a"}))
        await eventually(lambda: len(trigger.futures) == 1)
        for connection in list(server._connections):  # as shutdown's grace period ending
            connection.close()
        await eventually(lambda: server.statistics().connections == 0)
        assert trigger.futures[0].cancelled()
        assert server.statistics().in_flight == 0


async def test_without_asyncio_enter_task_a_pending_call_runs_in_a_task(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fallback where asyncio's ``_enter_task`` is missing: a plain handler then runs in a
    task of its own (one per call), which awaits its Pending; the answers are the same."""
    from hyperd.rpc import connection

    monkeypatch.setattr(connection, "_enter_task", None)
    monkeypatch.setattr(connection, "_leave_task", None)
    trigger = Trigger()
    path = short_tmp / "rpc.sock"
    async with pending_server(path, trigger), RawClient.connect(path) as client:
        await client.send(request("later", 1, {"tag": "a"}) + request("later", 2, {"tag": "b"}))
        await eventually(lambda: len(trigger.futures) == 2)
        assert len({id(task) for task in trigger.tasks}) == 2 and None not in trigger.tasks
        trigger.futures[0].set_result("one")
        trigger.futures[1].set_exception(LookupError("c2"))
        answers = sorted([await client.recv(), await client.recv()], key=lambda a: a["id"])
        assert answers[0] == {"jsonrpc": "2.0", "result": {"tag": "a", "reply": "one"}, "id": 1}
        assert answers[1]["error"]["message"] == "mapped: c2"
