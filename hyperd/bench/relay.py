"""A relay that does nothing but the hop: scenario 2's floor for "one more process".

``python -m hyperd.bench.relay --listen SOCK --proxy SOCK --vm ID --payload HEX --ready-fd N``
attaches once to the VM through the proxy, then answers every line received on ``SOCK`` by
sending the one pre-encoded Hyper frame (``--payload``, the command's JSON) on that persistent
connection and writing a fixed JSON-RPC result when the proxy replies. No parsing beyond finding
the request's end and id, no state, no validation: what is left of hyperd's overhead over this
relay is hyperd's own work, the rest is what any extra process on the path costs on the machine
(two more wakeups per call).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final, cast

import msgspec
import uvloop

from protocol import NEED_DATA
from protocol.ccproxy import AttachVM, ClientConnection, Command, ErrorReply, Response

RESULT: Final = b'{"jsonrpc":"2.0","result":{},"id":%d}\n'


class _Upstream(asyncio.Protocol):
    """The persistent runtime connection to the proxy; replies are matched in order."""

    def __init__(self) -> None:
        self.conn = ClientConnection("runtime")
        self.waiting: deque[Callable[[object], None]] = deque()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA:
                return
            if isinstance(event, (Response, ErrorReply)) and self.waiting:
                self.waiting.popleft()(event)

    def send(
        self, command: Command, payload: bytes | msgspec.Struct, done: Callable[[object], None]
    ) -> None:
        assert self.transport is not None
        self.waiting.append(done)
        self.transport.write(self.conn.send_command(command, payload))


def _answer(transport: asyncio.Transport, answer: bytes, _event: object) -> None:
    transport.write(answer)


class _Downstream(asyncio.Protocol):
    """One client: every request line is relayed as the same command."""

    def __init__(self, up: _Upstream, payload: bytes) -> None:
        self.up = up
        self.payload = payload
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\n")
            if end < 0:
                return
            line, self.buffer = self.buffer[:end], self.buffer[end + 1 :]
            request: Any = msgspec.json.decode(line)
            request_id = int(request["id"])
            transport = self.transport
            assert transport is not None
            answer = RESULT % request_id
            self.up.send(Command.HYPER, self.payload, functools.partial(_answer, transport, answer))


async def _serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    _, up = await loop.create_unix_connection(_Upstream, args.proxy)
    attached: asyncio.Future[object] = loop.create_future()
    up.send(Command.ATTACH_VM, AttachVM(containerId=args.vm), attached.set_result)
    await attached
    payload = bytes.fromhex(args.payload)
    server = await loop.create_unix_server(lambda: _Downstream(up, payload), args.listen)
    os.write(args.ready_fd, b"ready\n")
    os.close(args.ready_fd)
    async with server:
        await asyncio.Event().wait()  # until the runner stops us


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m hyperd.bench.relay", description=__doc__)
    p.add_argument("--listen", required=True, help="unix socket to serve on")
    p.add_argument("--proxy", required=True, help="the proxy's unix socket")
    p.add_argument("--vm", required=True, help="the VM (pod) id to attach to")
    p.add_argument("--payload", required=True, help="the Hyper payload to send, hex")
    p.add_argument("--ready-fd", type=int, required=True)
    uvloop.run(_serve(p.parse_args(argv)))


if __name__ == "__main__":
    main()
