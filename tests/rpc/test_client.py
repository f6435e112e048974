"""RPCClient against scripted servers: unsolicited errors, lost connections."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketStream

from hyperd.rpc import RemoteError, RPCClient, RPCConnectionClosed
from tests.rpc.support import DEADLINE

pytestmark = pytest.mark.anyio

Script = Callable[[SocketStream], Awaitable[None]]


async def with_scripted_server(
    path: Path, script: Script, body: Callable[[], Awaitable[None]]
) -> None:
    """Accept one connection on ``path`` and run ``script`` on it while ``body`` runs."""
    async with await anyio.create_unix_listener(path) as listener, anyio.create_task_group() as tg:

        async def serve_one() -> None:
            async with await listener.accept() as stream:
                await script(stream)

        tg.start_soon(serve_one)
        with anyio.fail_after(DEADLINE):
            await body()


async def read_line(stream: SocketStream) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        data += await stream.receive()
    return data


async def test_unsolicited_error_fails_pending_calls(short_tmp: Path) -> None:
    path = short_tmp / "s.sock"

    async def refuse(stream: SocketStream) -> None:
        await read_line(stream)
        await stream.send(
            b'{"jsonrpc":"2.0","error":{"code":-32008,"message":"uid 7 may not use this socket",'
            b'"data":{"kind":"unauthorized"}},"id":null}\n'
        )

    async def body() -> None:
        async with RPCClient.connect(path) as client:
            with pytest.raises(RemoteError) as err:
                await client.call("ping")
            assert err.value.code == -32008 and err.value.kind == "unauthorized"
            assert client.unsolicited_error is not None
            assert client.unsolicited_error.message == "uid 7 may not use this socket"
            with pytest.raises(RPCConnectionClosed):
                await client.call("ping")

    await with_scripted_server(path, refuse, body)


async def test_connection_lost_during_call(short_tmp: Path) -> None:
    path = short_tmp / "s.sock"

    async def hang_up(stream: SocketStream) -> None:
        await read_line(stream)

    async def body() -> None:
        async with RPCClient.connect(path) as client:
            with pytest.raises(RPCConnectionClosed):
                await client.call("ping")

    await with_scripted_server(path, hang_up, body)


async def test_responses_matched_by_id_and_notifications_queued(short_tmp: Path) -> None:
    path = short_tmp / "s.sock"

    async def reversed_answers(stream: SocketStream) -> None:
        first, second = await read_line(stream), b""
        while second.count(b"\n") < 1:
            second += await stream.receive()
        assert b'"id":1' in first and b'"id":2' in second
        await stream.send(b'{"jsonrpc":"2.0","method":"hello","params":{"n":1}}\n')
        await stream.send(b'{"jsonrpc":"2.0","result":"two","id":2}\n')
        await stream.send(b'{"jsonrpc":"2.0","result":"one","id":1}\n')
        await stream.send(b"garbage that is not json\n")
        with pytest.raises(anyio.EndOfStream):
            await stream.receive()

    async def body() -> None:
        async with RPCClient.connect(path) as client:
            results: dict[str, object] = {}

            async def call(method: str) -> None:
                results[method] = await client.call(method)

            async with anyio.create_task_group() as tg:
                tg.start_soon(call, "a")
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(call, "b")
            assert results == {"a": "one", "b": "two"}
            note = await client.receive_notification()
            assert (note.method, note.params) == ("hello", {"n": 1})

    await with_scripted_server(path, reversed_answers, body)
