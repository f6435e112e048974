"""CallContext.wait_hangup over a real unix socket: a client that closes its socket is seen at
once, one that only half-closes after its request still gets its answer."""

from __future__ import annotations

import socket
from pathlib import Path

import anyio
import msgspec
import pytest

from hyperd.rpc import CallContext, MethodTable, RPCServer, create_unix_listener

pytestmark = pytest.mark.anyio

DEADLINE = 10.0  # a hang-up is seen within one loop iteration; this is only a safety net


class Watch:
    def __init__(self) -> None:
        self.gate = anyio.Event()
        self.holding = anyio.Event()
        self.hung_up = anyio.Event()


def methods(watch: Watch) -> MethodTable:
    table = MethodTable()

    @table.method("hold")
    async def hold(params: None, ctx: CallContext) -> str:
        async with anyio.create_task_group() as tg:

            async def hangup() -> None:
                await ctx.wait_hangup()
                watch.hung_up.set()
                tg.cancel_scope.cancel()

            tg.start_soon(hangup)
            watch.holding.set()
            await watch.gate.wait()
            tg.cancel_scope.cancel()
        return "released"

    return table


REQUEST = msgspec.json.encode({"jsonrpc": "2.0", "id": 1, "method": "hold"}) + b"\n"


@pytest.mark.parametrize("half_close", [False, True])
async def test_hangup(short_tmp: Path, half_close: bool) -> None:
    path = short_tmp / "rpc.sock"
    watch = Watch()
    server = RPCServer(methods(watch))
    listener = await create_unix_listener(path)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, listener)
        with anyio.fail_after(DEADLINE):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            await anyio.to_thread.run_sync(client.connect, str(path))
            client.sendall(REQUEST)
            await watch.holding.wait()
            if half_close:
                client.shutdown(socket.SHUT_WR)  # "no more requests", still reading
                with anyio.move_on_after(0.5):  # a hang-up would come within one iteration
                    await watch.hung_up.wait()
                assert not watch.hung_up.is_set()
                watch.gate.set()
                await anyio.wait_readable(client)
                answer = msgspec.json.decode(client.recv(4096).splitlines()[0])
                assert answer["result"] == "released"
            else:
                client.close()
                await watch.hung_up.wait()
            client.close()
        await server.shutdown()
