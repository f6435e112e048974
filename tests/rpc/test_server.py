"""RPC server over a real unix socket: calls, batches, errors, concurrency, backpressure."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import anyio
import pytest

from hyperd.errors import InvalidState, NotFound
from hyperd.rpc import (
    CallContext,
    MethodTable,
    RemoteError,
    RPCClient,
    RPCConnectionClosed,
    RPCServer,
    create_unix_listener,
)
from protocol.jsonrpc import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    Notification,
    Request,
    Response,
)
from tests.rpc.support import DEADLINE, RawClient, State, running_server

pytestmark = pytest.mark.anyio


def sock(short_tmp: Path) -> Path:
    return short_tmp / "rpc.sock"


async def test_call_results_and_struct_result(short_tmp: Path) -> None:
    async with running_server(sock(short_tmp)), RPCClient.connect(sock(short_tmp)) as client:
        assert await client.call("add", {"a": 2, "b": 40}) == 42
        assert await client.call("ping") == "pong"
        assert await client.call("point") == {"x": 1, "y": 2}
        assert await client.call("echo", {"value": [1, "two", None]}) == [1, "two", None]
        who = await client.call("whoami")
        assert who["uid"] == 0 and who["pid"] > 0


async def test_many_concurrent_clients(short_tmp: Path) -> None:
    results: dict[int, list[int]] = {}

    async def one_client(n: int) -> None:
        async with RPCClient.connect(sock(short_tmp)) as client:
            out: list[int] = []

            async def one_call(i: int) -> None:
                out.append(await client.call("add", {"a": n, "b": i}))

            async with anyio.create_task_group() as tg:
                for i in range(10):
                    tg.start_soon(one_call, i)
            results[n] = sorted(out)

    async with running_server(sock(short_tmp)) as server:
        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tg:
                for n in range(20):
                    tg.start_soon(one_client, n)
        assert server.statistics().accepted == 20
    assert results == {n: [n + i for i in range(10)] for n in range(20)}


async def test_slow_request_does_not_block_the_connection(short_tmp: Path) -> None:
    state = State()
    async with running_server(sock(short_tmp), state), RawClient.connect(sock(short_tmp)) as c:
        await c.send_json({"jsonrpc": "2.0", "method": "wait", "id": "slow"})
        await state.wait_for_waiting(1)
        await c.send_json({"jsonrpc": "2.0", "method": "add", "params": {"a": 1, "b": 1}, "id": 2})
        assert await c.recv() == {"jsonrpc": "2.0", "result": 2, "id": 2}
        state.gate.set()
        assert await c.recv() == {"jsonrpc": "2.0", "result": "released", "id": "slow"}


BIG_BATCH = [
    {"jsonrpc": "2.0", "method": "add", "params": {"a": 1, "b": 2}, "id": "1"},
    {"jsonrpc": "2.0", "method": "note", "params": {"value": 7}},
    {"jsonrpc": "2.0", "method": "add", "params": {"a": 42, "b": -23}, "id": "2"},
    {"foo": "boo"},
    {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
    {"jsonrpc": "2.0", "method": "ping", "id": "9"},
]


async def test_batch_answered_as_one_array(short_tmp: Path) -> None:
    state = State()
    async with running_server(sock(short_tmp), state), RawClient.connect(sock(short_tmp)) as c:
        await c.send_json(BIG_BATCH)
        answer = await c.recv()
        assert isinstance(answer, list)
        by_id = {r["id"]: r for r in answer if r["id"] is not None}
        assert len(answer) == 5  # the notification gets no element
        assert by_id["1"]["result"] == 3
        assert by_id["2"]["result"] == 19
        assert by_id["5"]["error"]["code"] == METHOD_NOT_FOUND
        assert by_id["9"]["result"] == "pong"
        [invalid] = [r for r in answer if r["id"] is None]
        assert invalid["error"]["code"] == INVALID_REQUEST
        assert state.noted == [7]


async def test_batch_edge_cases(short_tmp: Path) -> None:
    state = State()
    async with running_server(sock(short_tmp), state), RawClient.connect(sock(short_tmp)) as c:
        await c.send(b"[]\n")
        empty = await c.recv()
        assert empty["error"]["code"] == INVALID_REQUEST and empty["id"] is None
        await c.send(b"[1,2,3]\n")
        errors = await c.recv()
        assert [e["error"]["code"] for e in errors] == [INVALID_REQUEST] * 3
        # a batch of notifications is not answered at all: the next answer is the ping's
        await c.send_json(
            [{"jsonrpc": "2.0", "method": "note", "params": {"value": v}} for v in (1, 2)]
        )
        assert (await c.call("ping", id=3))["id"] == 3
        assert sorted(state.noted) == [1, 2]


@pytest.mark.parametrize(
    ("data", "code", "id"),
    [
        (b'{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]\n', PARSE_ERROR, None),
        (b'{"jsonrpc": "2.0", "method": "ping\xff", "id": 1}\n', PARSE_ERROR, None),
        (b'{"jsonrpc": "2.0", "method": 1, "params": "bar"}\n', INVALID_REQUEST, None),
        (b'{"method": "ping", "id": 4}\n', INVALID_REQUEST, 4),
        (b'{"jsonrpc": "2.0", "method": "nope", "id": "x"}\n', METHOD_NOT_FOUND, "x"),
        (b"42\n", INVALID_REQUEST, None),
    ],
    ids=["bad-json", "bad-utf8", "bad-request", "no-version", "unknown-method", "scalar"],
)
async def test_bad_message_answered_then_serving_goes_on(
    short_tmp: Path, data: bytes, code: int, id: Any
) -> None:
    async with running_server(sock(short_tmp)), RawClient.connect(sock(short_tmp)) as c:
        await c.send(data)
        answer = await c.recv()
        assert answer["jsonrpc"] == "2.0"
        assert answer["error"]["code"] == code and answer["id"] == id
        assert "result" not in answer
        assert await c.call("ping", id=2) == {"jsonrpc": "2.0", "result": "pong", "id": 2}


@pytest.mark.parametrize(
    ("params", "names"),
    [
        ({"a": 1, "b": "2"}, "$.b"),
        ({"a": 1}, "`b`"),
        ({"a": 1, "b": 2, "c": 3}, "`c`"),
        ([1, 2], "object"),
        ("not-structured", None),
    ],
    ids=["wrong-type", "missing", "unknown", "positional", "params-string"],
)
async def test_invalid_params(short_tmp: Path, params: Any, names: str | None) -> None:
    async with running_server(sock(short_tmp)), RawClient.connect(sock(short_tmp)) as c:
        answer = await c.call("add", params, id=7)
        assert answer["id"] == 7
        if names is None:  # not even a structured value: the request itself is invalid
            assert answer["error"]["code"] == INVALID_REQUEST
        else:
            assert answer["error"]["code"] == INVALID_PARAMS
            assert answer["error"]["data"]["kind"] == "invalid_params"
            assert names in answer["error"]["message"]
        no_params = await c.call("ping", {"x": 1}, id=8)
        assert no_params["error"]["code"] == INVALID_PARAMS
        assert (await c.call("ping", {}, id=9))["result"] == "pong"


async def test_oversized_message_answered_then_serving_goes_on(short_tmp: Path) -> None:
    limit = 4096
    async with (
        running_server(sock(short_tmp), max_message=limit),
        RawClient.connect(sock(short_tmp)) as c,
    ):
        big = b'{"jsonrpc": "2.0", "method": "echo", "params": {"value": "' + b"x" * 100_000
        for offset in range(0, len(big), 8192):
            await c.send(big[offset : offset + 8192])
        answer = await c.recv()
        assert answer["id"] is None
        assert answer["error"]["code"] == INVALID_REQUEST
        assert answer["error"]["data"]["kind"] == "message_too_large"
        await c.send(b'"}, "id": 1}\n')  # the rest of the oversized line is discarded
        assert await c.call("echo", {"value": "y" * 1000}, id=2) == {
            "jsonrpc": "2.0",
            "result": "y" * 1000,
            "id": 2,
        }


async def test_handler_errors(short_tmp: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with running_server(sock(short_tmp)), RPCClient.connect(sock(short_tmp)) as client:
        with pytest.raises(RemoteError) as err:
            await client.call("lookup", {"name": "web"})
        assert err.value.code == NotFound.code
        assert err.value.message == "pod 'web' not found"
        assert err.value.data == {"kind": "not_found", "pod": "web"}
        assert err.value.kind == "not_found"

        with pytest.raises(RemoteError) as err:
            await client.call("grouped")
        assert err.value.code == InvalidState.code
        assert err.value.data == {"kind": "invalid_state", "state": "stopped"}

        with caplog.at_level(logging.ERROR, logger="hyperd.rpc"):
            with pytest.raises(RemoteError) as err:
                await client.call("crash")
            assert err.value.code == INTERNAL_ERROR
            assert "handler bug" in err.value.message
            assert any("crash" in r.getMessage() and r.exc_info for r in caplog.records)

            with pytest.raises(RemoteError) as err:
                await client.call("unencodable")
            assert err.value.code == INTERNAL_ERROR

        assert await client.call("ping") == "pong"


async def test_notifications_are_never_answered(short_tmp: Path) -> None:
    state = State()
    async with running_server(sock(short_tmp), state), RawClient.connect(sock(short_tmp)) as c:
        await c.send_json({"jsonrpc": "2.0", "method": "note", "params": {"value": "n1"}})
        await c.send_json({"jsonrpc": "2.0", "method": "crash"})  # failing: still silent
        await c.send_json({"jsonrpc": "2.0", "method": "no.such.method"})
        assert (await c.call("ping", id=1))["id"] == 1
        assert state.noted == ["n1"]
        with pytest.raises(TimeoutError):
            await c.recv(within=0.2)


async def test_in_flight_bound_applies_backpressure(short_tmp: Path) -> None:
    state = State()
    async with (
        running_server(sock(short_tmp), state, max_in_flight=2) as server,
        RawClient.connect(sock(short_tmp)) as c,
    ):
        for i in range(4):
            await c.send_json({"jsonrpc": "2.0", "method": "wait", "id": i})
        await state.wait_for_waiting(2)
        await c.send_json({"jsonrpc": "2.0", "method": "ping", "id": "p"})
        with pytest.raises(TimeoutError):  # the reader is paused: the ping is not read yet
            await c.recv(within=0.3)
        assert state.waiting == 2
        assert server.statistics().in_flight == 2
        state.gate.set()
        answers = [await c.recv() for _ in range(5)]
        assert sorted(str(a["id"]) for a in answers) == ["0", "1", "2", "3", "p"]


async def test_half_closed_client_still_answered(short_tmp: Path) -> None:
    state = State()
    async with running_server(sock(short_tmp), state), RawClient.connect(sock(short_tmp)) as c:
        await c.send(b'{"jsonrpc": "2.0", "method": "wait", "id": 1}\n')
        # the last message may lack its newline
        await c.send(b'{"jsonrpc": "2.0", "method": "add", "params": {"a": 1, "b": 2}, "id": 2}')
        await c.stream.send_eof()
        assert await c.recv() == {"jsonrpc": "2.0", "result": 3, "id": 2}
        await state.wait_for_waiting(1)
        state.gate.set()
        assert await c.recv() == {"jsonrpc": "2.0", "result": "released", "id": 1}
        await c.expect_eof()


async def test_responses_from_client_are_ignored(short_tmp: Path) -> None:
    async with running_server(sock(short_tmp)), RawClient.connect(sock(short_tmp)) as c:
        await c.send(b'{"jsonrpc": "2.0", "result": 1, "id": 5}\n')
        assert await c.call("ping", id=6) == {"jsonrpc": "2.0", "result": "pong", "id": 6}


async def test_batch_elements_run_concurrently(short_tmp: Path) -> None:
    state = State()
    async with running_server(sock(short_tmp), state), RawClient.connect(sock(short_tmp)) as c:
        await c.send_json(
            [{"jsonrpc": "2.0", "method": "wait", "id": i} for i in range(3)]
            + [{"jsonrpc": "2.0", "method": "ping", "id": "p"}]
        )
        await state.wait_for_waiting(3)  # all three are waiting at once
        with pytest.raises(TimeoutError):  # one array, only when every element is done
            await c.recv(within=0.2)
        state.gate.set()
        answer = await c.recv()
        assert sorted(str(r["id"]) for r in answer) == ["0", "1", "2", "p"]


def _adds(n: int) -> list[dict[str, Any]]:
    return [
        {"jsonrpc": "2.0", "method": "add", "params": {"a": i, "b": 1}, "id": i} for i in range(n)
    ]


async def test_large_batch(short_tmp: Path) -> None:
    n = 2000
    path = sock(short_tmp)
    async with running_server(path, max_batch=n), RawClient.connect(path) as c:
        await c.send_json(_adds(n))
        answer = await c.recv()
        assert sorted((r["id"], r["result"]) for r in answer) == [(i, i + 1) for i in range(n)]


async def test_batch_over_max_batch_is_refused_whole(short_tmp: Path) -> None:
    path = sock(short_tmp)
    async with running_server(path, max_batch=10) as server, RawClient.connect(path) as c:
        await c.send_json(_adds(10))
        assert len(await c.recv()) == 10
        await c.send_json(_adds(11))
        refused = await c.recv()
        assert refused["id"] is None
        assert refused["error"]["code"] == INVALID_REQUEST
        assert refused["error"]["data"] == {"kind": "batch_too_large", "calls": 11, "max_batch": 10}
        assert "11 calls" in refused["error"]["message"]
        # none of the refused batch ran, and the connection goes on serving
        assert await c.call("add", {"a": 2, "b": 3}) == {"jsonrpc": "2.0", "result": 5, "id": 1}
        stats = server.statistics()
        assert stats.batches_refused == 1
        assert stats.calls_started == 11


async def test_a_failing_connection_does_not_stop_the_server(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class BrokenTable(MethodTable):
        async def dispatch(self, msg: Request | Notification, ctx: CallContext) -> Response | None:
            raise RuntimeError("bug in the dispatcher")  # breaks dispatch's never-raises contract

    server = RPCServer(BrokenTable())
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, await create_unix_listener(sock(short_tmp)))
        with caplog.at_level(logging.ERROR, logger="hyperd.rpc"):
            for _ in range(2):
                async with RPCClient.connect(sock(short_tmp)) as client:
                    with pytest.raises(RPCConnectionClosed):
                        await client.call("ping")
        assert server.statistics().accepted == 2
        assert any("failed" in r.getMessage() and r.exc_info for r in caplog.records)
        await server.shutdown()
