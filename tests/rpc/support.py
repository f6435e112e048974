"""Helpers for the RPC tests: a method table with test handlers, a server runner, a raw client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import msgspec
from anyio.abc import SocketStream

from hyperd.errors import InvalidState, NotFound
from hyperd.rpc import CallContext, MethodTable, RPCServer, create_unix_listener
from protocol.jsonrpc import LineFramer, MessageTooLarge

DEADLINE = 10.0  # seconds any single wait in these tests may take
POLL = 0.01  # seconds between looks at a server's statistics


class AddParams(msgspec.Struct, forbid_unknown_fields=True):
    a: int
    b: int


class EchoParams(msgspec.Struct):
    value: Any = None


class NameParams(msgspec.Struct):
    name: str


class PublishParams(msgspec.Struct):
    count: int
    size: int = 0


class BlobParams(msgspec.Struct):
    size: int


class Point(msgspec.Struct):
    x: int
    y: int


@dataclass
class State:
    """What the handlers share with the test."""

    gate: anyio.Event = field(default_factory=anyio.Event)
    waiting: int = 0
    waiting_changed: anyio.Event = field(default_factory=anyio.Event)
    noted: list[Any] = field(default_factory=list)
    noted_event: anyio.Event = field(default_factory=anyio.Event)
    subscribers: set[CallContext] = field(default_factory=set)
    unsubscribed: anyio.Event = field(default_factory=anyio.Event)
    published: list[bool] = field(default_factory=list)
    cancelled: int = 0

    async def wait_for_waiting(self, n: int) -> None:
        with anyio.fail_after(DEADLINE):
            while self.waiting < n:
                await self.waiting_changed.wait()


def make_methods(state: State) -> MethodTable:
    methods = MethodTable()

    @methods.method("add", AddParams)
    async def add(params: AddParams, ctx: CallContext) -> int:
        return params.a + params.b

    @methods.method("echo", EchoParams)
    async def echo(params: EchoParams, ctx: CallContext) -> Any:
        return params.value

    async def ping(params: None, ctx: CallContext) -> str:
        return "pong"

    methods.register("ping", ping)

    @methods.method("point")
    async def point(params: None, ctx: CallContext) -> Point:
        return Point(x=1, y=2)

    @methods.method("whoami")
    async def whoami(params: None, ctx: CallContext) -> dict[str, int]:
        return {"pid": ctx.peer.pid, "uid": ctx.peer.uid, "conn": ctx.connection_id}

    @methods.method("wait")
    async def wait(params: None, ctx: CallContext) -> str:
        state.waiting += 1
        state.waiting_changed.set()
        state.waiting_changed = anyio.Event()
        try:
            await state.gate.wait()
        except anyio.get_cancelled_exc_class():
            state.cancelled += 1
            raise
        return "released"

    @methods.method("blob", BlobParams)
    async def blob(params: BlobParams, ctx: CallContext) -> str:
        return "x" * params.size  # an answer far larger than its request

    @methods.method("note", EchoParams)
    async def note(params: EchoParams, ctx: CallContext) -> None:
        state.noted.append(params.value)
        state.noted_event.set()

    @methods.method("lookup", NameParams)
    async def lookup(params: NameParams, ctx: CallContext) -> None:
        raise NotFound(f"pod {params.name!r} not found", pod=params.name)

    @methods.method("grouped")
    async def grouped(params: None, ctx: CallContext) -> None:
        async with anyio.create_task_group() as tg:

            async def fail() -> None:
                raise InvalidState("pod is stopped", state="stopped")

            tg.start_soon(fail)

    @methods.method("crash")
    async def crash(params: None, ctx: CallContext) -> None:
        raise RuntimeError("handler bug")

    @methods.method("unencodable")
    async def unencodable(params: None, ctx: CallContext) -> object:
        return object()

    @methods.method("subscribe")
    async def subscribe(params: None, ctx: CallContext) -> bool:
        state.subscribers.add(ctx)

        def gone() -> None:
            state.subscribers.discard(ctx)
            state.unsubscribed.set()

        ctx.on_close(gone)
        return True

    @methods.method("publish", PublishParams)
    async def publish(params: PublishParams, ctx: CallContext) -> int:
        delivered = 0
        for i in range(params.count):
            for sub in list(state.subscribers):
                ok = sub.notify("event", {"seq": i, "pad": "x" * params.size})
                state.published.append(ok)
                delivered += ok
        return delivered

    return methods


@asynccontextmanager
async def running_server(
    path: Path, state: State | None = None, *, methods: MethodTable | None = None, **options: Any
) -> AsyncIterator[RPCServer]:
    """Serve the test methods (or ``methods``) on ``path`` for the duration of the block, then
    shut down."""
    server = RPCServer(methods or make_methods(state or State()), **options)
    listener = await create_unix_listener(path)
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, listener)
        try:
            yield server
        finally:
            with anyio.fail_after(DEADLINE):
                await server.shutdown()


def request(method: str, id: int | None, params: Any = None) -> bytes:
    """One request line (a notification when ``id`` is ``None``)."""
    msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if id is not None:
        msg["id"] = id
    if params is not None:
        msg["params"] = params
    return msgspec.json.encode(msg) + b"\n"


async def eventually(condition: Callable[[], bool]) -> None:
    """Wait (polling: the server's statistics have no event) until ``condition()`` holds."""
    with anyio.fail_after(DEADLINE):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(POLL)


class RawClient:
    """Bytes in, parsed JSON lines out, with deadlines."""

    def __init__(self, stream: SocketStream) -> None:
        self.stream = stream
        self.framer = LineFramer(max_message=1 << 24)
        self.lines: list[bytes] = []

    @classmethod
    @asynccontextmanager
    async def connect(cls, path: Path) -> AsyncIterator[RawClient]:
        async with await anyio.connect_unix(path) as stream:
            yield cls(stream)

    async def send(self, data: bytes) -> None:
        await self.stream.send(data)

    async def send_json(self, obj: Any) -> None:
        await self.stream.send(msgspec.json.encode(obj) + b"\n")

    async def recv(self, within: float = DEADLINE) -> Any:
        """The next JSON message; raises TimeoutError, or EOFError at end of stream."""
        with anyio.fail_after(within):
            while not self.lines:
                try:
                    data = await self.stream.receive()
                except anyio.EndOfStream:
                    raise EOFError from None
                self.framer.feed(data)
                while True:
                    try:
                        line = self.framer.next_line()
                    except MessageTooLarge:  # pragma: no cover - the test would fail below
                        raise AssertionError("server sent an oversized line") from None
                    if line is None:
                        break
                    self.lines.append(line)
        return msgspec.json.decode(self.lines.pop(0))

    async def call(self, method: str, params: Any = None, id: Any = 1) -> Any:
        msg: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": id}
        if params is not None:
            msg["params"] = params
        await self.send_json(msg)
        return await self.recv()

    async def expect_eof(self, within: float = DEADLINE) -> None:
        with anyio.fail_after(within):
            try:
                while True:
                    await self.stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
                return
