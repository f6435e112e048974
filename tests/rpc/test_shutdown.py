"""Graceful shutdown: stop accepting, let calls finish within the grace period, then close."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from hyperd.rpc import RPCClient, RPCConnectionClosed, RPCServer, create_unix_listener
from tests.rpc.support import DEADLINE, RawClient, State, make_methods

pytestmark = pytest.mark.anyio


async def test_in_flight_call_finishes_during_shutdown(short_tmp: Path) -> None:
    path = short_tmp / "rpc.sock"
    state = State()
    server = RPCServer(make_methods(state), shutdown_grace=DEADLINE)
    listener = await create_unix_listener(path)
    served = anyio.Event()
    async with anyio.create_task_group() as tg:

        async def serve() -> None:
            await server.serve(listener)
            served.set()

        tg.start_soon(serve)
        with anyio.fail_after(DEADLINE):
            while server.statistics().accepted == 0:
                async with RawClient.connect(path) as probe:
                    assert (await probe.call("ping"))["result"] == "pong"
        async with RawClient.connect(path) as busy, RawClient.connect(path) as idle:
            assert (await idle.call("subscribe"))["result"] is True
            await busy.send_json({"jsonrpc": "2.0", "method": "wait", "id": 1})
            await state.wait_for_waiting(1)
            tg.start_soon(server.shutdown)
            await idle.expect_eof()  # nothing running there: closed at once
            with anyio.fail_after(DEADLINE):
                await state.unsubscribed.wait()
            with pytest.raises(OSError):  # no longer accepting
                await anyio.connect_unix(path)
            assert not served.is_set()
            state.gate.set()
            assert await busy.recv() == {"jsonrpc": "2.0", "result": "released", "id": 1}
            await busy.expect_eof()
        with anyio.fail_after(DEADLINE):
            await served.wait()
    assert state.cancelled == 0


async def test_grace_period_expires_and_calls_are_cancelled(short_tmp: Path) -> None:
    path = short_tmp / "rpc.sock"
    state = State()
    grace = 0.3
    server = RPCServer(make_methods(state), shutdown_grace=grace)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, await create_unix_listener(path))
        async with RPCClient.connect(path) as client:

            async def stuck_call() -> None:
                with pytest.raises(RPCConnectionClosed):
                    await client.call("wait")

            tg.start_soon(stuck_call)
            await state.wait_for_waiting(1)
            started = anyio.current_time()
            with anyio.fail_after(DEADLINE):
                await server.shutdown()
            assert grace <= anyio.current_time() - started < DEADLINE
    assert state.cancelled == 1
    assert server.statistics().connections == 0


async def test_cancelling_serve_closes_connections(short_tmp: Path) -> None:
    path = short_tmp / "rpc.sock"
    state = State()
    server = RPCServer(make_methods(state))
    serve_ended = anyio.Event()
    async with anyio.create_task_group() as outer:

        async def client() -> None:
            async with RawClient.connect(path) as c:
                await c.send_json({"jsonrpc": "2.0", "method": "wait", "id": 1})
                await state.wait_for_waiting(1)
                scope.cancel()
                await serve_ended.wait()
                await c.expect_eof()

        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                await tg.start(server.serve, await create_unix_listener(path))
                outer.start_soon(client)
                await anyio.sleep_forever()
        serve_ended.set()
    assert state.cancelled == 1
    assert server.statistics().connections == 0


async def test_shutdown_before_any_client(short_tmp: Path) -> None:
    server = RPCServer(make_methods(State()))
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, await create_unix_listener(short_tmp / "rpc.sock"))
        with anyio.fail_after(DEADLINE):
            await server.shutdown()
    with pytest.raises(RuntimeError):
        await server.serve(await create_unix_listener(short_tmp / "again.sock"))
