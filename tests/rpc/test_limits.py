"""What one connection can make the server hold: clients that send and never read.

Real unix sockets, a real server: clients pipeline batches whose answers are far larger than
the requests and do not read. The server must stop reading them (``reading_paused``), hold a
bounded amount of output for each, serve other clients meanwhile, and lose nothing once the
slow clients do read.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from anyio.abc import SocketStream

from hyperd.rpc import RPCServer
from tests.rpc.support import DEADLINE, RawClient, running_server

ANSWER = 10_000  # bytes of one answer: each request line is ~60 bytes per call
MAX_OUTPUT = 64 * 1024
MAX_IN_FLIGHT = 8
MAX_BATCH = 16
CLIENTS = 4
BATCHES = 200  # per client: 200 * 16 * 10 kB = 32 MB of answers asked for, per client
POLL = 0.01  # seconds between looks at the server's statistics (they have no event)

pytestmark = pytest.mark.anyio


def _batch(first_id: int) -> bytes:
    calls = [
        {"jsonrpc": "2.0", "method": "blob", "params": {"size": ANSWER}, "id": first_id + i}
        for i in range(MAX_BATCH)
    ]
    return msgspec.json.encode(calls) + b"\n"


async def _wait_until(server: RPCServer, paused: int) -> None:
    with anyio.fail_after(DEADLINE):
        while server.statistics().reading_paused < paused:  # noqa: ASYNC110
            await anyio.sleep(POLL)


async def _send_until_blocked(stream: SocketStream, data: bytes) -> int:
    """Send ``data`` repeatedly until the kernel's buffers are full; returns lines sent."""
    raw: socket.socket = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    sent = 0
    pending = b""
    while sent < BATCHES:
        pending = pending or data
        try:
            n = raw.send(pending)
        except BlockingIOError:
            break
        pending = pending[n:]
        if not pending:
            sent += 1
    if pending:
        await stream.send(pending)  # finish the line that was cut: the server's framer needs it
        sent += 1
    return sent


async def test_clients_that_never_read_hold_bounded_output(short_tmp: Path) -> None:
    path = short_tmp / "rpc.sock"
    async with (
        running_server(
            path, max_output=MAX_OUTPUT, max_in_flight=MAX_IN_FLIGHT, max_batch=MAX_BATCH
        ) as server,
        anyio.create_task_group(),
    ):
        hostile = [await anyio.connect_unix(path) for _ in range(CLIENTS)]
        try:
            sent: list[int] = []
            for stream in hostile:
                sent.append(await _send_until_blocked(stream, _batch(0)))
            await _wait_until(server, paused=CLIENTS)
            stats = server.statistics()
            # one answer batch may be in the transport beyond the mark, and the calls in
            # flight may each hold an answer queued behind it
            per_client = MAX_OUTPUT + (MAX_IN_FLIGHT + MAX_BATCH) * (ANSWER + 100)
            assert stats.output_buffered <= CLIENTS * per_client
            assert stats.in_flight <= CLIENTS * (MAX_IN_FLIGHT + MAX_BATCH - 1)
            # far fewer calls were taken than were sent: the rest wait in the kernel
            assert stats.calls_started < sum(sent) * MAX_BATCH

            # another client is served meanwhile
            async with RawClient.connect(path) as other:
                assert await other.call("add", {"a": 1, "b": 2}) == {
                    "jsonrpc": "2.0",
                    "result": 3,
                    "id": 1,
                }

            # once a slow client reads, it gets every answer, in whole batches
            first = RawClient(hostile[0])
            for _ in range(sent[0]):
                answer: list[dict[str, Any]] = await first.recv()
                assert sorted(r["id"] for r in answer) == list(range(MAX_BATCH))
                assert all(len(r["result"]) == ANSWER for r in answer)
        finally:
            for stream in hostile:
                await stream.aclose()


async def test_in_flight_counts_each_call_of_a_batch(short_tmp: Path) -> None:
    path = short_tmp / "rpc.sock"
    async with (
        running_server(path, max_in_flight=4, max_batch=MAX_BATCH) as server,
        RawClient.connect(path) as c,
    ):
        # two batches sent together: the first (16 calls >= 4) fills the slots; the second is
        # taken only once the first is answered, and both are answered in full
        await c.send(_batch(0) + _batch(100))
        ids = sorted(r["id"] for r in await c.recv()) + sorted(r["id"] for r in await c.recv())
        assert ids == list(range(MAX_BATCH)) + list(range(100, 100 + MAX_BATCH))
        assert server.statistics().calls_started == 2 * MAX_BATCH
