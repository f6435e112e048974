"""ttrpc over unix sockets on anyio: a server that dispatches to typed handlers, and a client.

The framing is :mod:`protocol.ttrpc` (sans-IO); the envelope and payloads are protobuf messages
(:mod:`hyperd.shim.proto`). The server handles each request in its own task (containerd keeps a
``Wait`` pending while it sends more calls on the same connection), serializes writes, and bounds
the requests in flight per connection so a flood waits instead of growing memory.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import anyio
import anyio.abc
from google.protobuf.message import DecodeError, Message

from hyperd.shim.proto import ttrpc_pb2
from protocol import NEED_DATA, LocalProtocolError
from protocol.ttrpc import (
    ClientConnection,
    InvalidStream,
    RequestReceived,
    ResponseReceived,
    ServerConnection,
    TooLarge,
)

log = logging.getLogger(__name__)

READ_SIZE: Final = 65536
MAX_IN_FLIGHT: Final = 64  # concurrent requests per connection; containerd uses a handful


class Code(enum.IntEnum):
    """gRPC status codes, as ttrpc carries them and containerd's errdefs maps them."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    FAILED_PRECONDITION = 9
    RESOURCE_EXHAUSTED = 8
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14


class TtrpcError(Exception):
    """An error status: raised by handlers (sent to the client) and by client calls."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(f"{message} ({code.name})")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class CallInfo:
    """What a handler may want besides its request."""

    service: str
    method: str
    timeout_nano: int
    metadata: Mapping[str, str]


Handler = Callable[[Any, CallInfo], Awaitable[Message]]


@dataclass(frozen=True, slots=True)
class Method:
    """A handler and the protobuf type of its request."""

    request: type[Message]
    handler: Handler


Services = Mapping[str, Mapping[str, Method]]


def _response(status: ttrpc_pb2.Status | None, payload: bytes = b"") -> bytes:
    resp = ttrpc_pb2.Response(payload=payload)
    resp.status.CopyFrom(status or ttrpc_pb2.Status())  # Go always sends a status (0a 00)
    return resp.SerializeToString()


def error_response(code: Code, message: str) -> bytes:
    return _response(ttrpc_pb2.Status(code=int(code), message=message))


async def dispatch(services: Services, data: bytes) -> bytes:
    """The serialized ``ttrpc.Response`` for the serialized ``ttrpc.Request`` ``data``."""
    try:
        req = ttrpc_pb2.Request.FromString(data)
    except DecodeError as exc:
        return error_response(Code.INVALID_ARGUMENT, f"invalid ttrpc request: {exc}")
    service = services.get(req.service)
    if service is None:
        return error_response(Code.UNIMPLEMENTED, f"service {req.service}")
    method = service.get(req.method)
    if method is None:
        return error_response(Code.UNIMPLEMENTED, f"method {req.method}")
    try:
        request = method.request.FromString(req.payload)
    except DecodeError as exc:
        return error_response(Code.INVALID_ARGUMENT, f"invalid {req.method} request: {exc}")
    info = CallInfo(
        req.service, req.method, req.timeout_nano, {kv.key: kv.value for kv in req.metadata}
    )
    try:
        reply = await method.handler(request, info)
    except TtrpcError as exc:
        return error_response(exc.code, exc.message)
    except Exception as exc:
        log.exception("%s/%s failed", req.service, req.method)
        return error_response(Code.INTERNAL, f"{req.method}: {exc}")
    return _response(None, reply.SerializeToString())


async def serve_connection(stream: anyio.abc.ByteStream, services: Services) -> None:
    """Serve one client until it closes the connection; pending calls are then cancelled."""
    conn = ServerConnection()
    write_lock = anyio.Lock()
    limiter = anyio.CapacityLimiter(MAX_IN_FLIGHT)

    async def answer(stream_id: int, data: bytes) -> None:
        try:
            frame = conn.send_response(stream_id, data)
        except LocalProtocolError as exc:  # a reply over 4 MiB: say so instead
            frame = conn.send_response(stream_id, error_response(Code.RESOURCE_EXHAUSTED, str(exc)))
        async with write_lock:
            try:
                await stream.send(frame)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass  # the client went away; its reader sees EOF

    async def handle(stream_id: int, data: bytes) -> None:
        try:
            await answer(stream_id, await dispatch(services, data))
        finally:
            limiter.release_on_behalf_of(stream_id)

    async with anyio.create_task_group() as tg:
        while True:
            try:
                chunk = await stream.receive(READ_SIZE)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                break
            except OSError:
                break
            conn.receive_data(chunk)
            while (event := conn.next_event()) is not NEED_DATA:
                if isinstance(event, RequestReceived):
                    await limiter.acquire_on_behalf_of(event.stream_id)
                    tg.start_soon(handle, event.stream_id, event.data)
                elif isinstance(event, InvalidStream):
                    await answer(
                        event.stream_id, error_response(Code.INVALID_ARGUMENT, event.message)
                    )
                elif isinstance(event, TooLarge):
                    await answer(
                        event.stream_id, error_response(Code.RESOURCE_EXHAUSTED, event.message)
                    )
        tg.cancel_scope.cancel()


class TtrpcClient:
    """A ttrpc client on one connection, one call at a time (the event publisher's needs)."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self._stream = stream
        self._conn = ClientConnection()
        self._lock = anyio.Lock()

    @classmethod
    async def connect(cls, path: str) -> TtrpcClient:
        return cls(await anyio.connect_unix(path))

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[Message],
        *,
        deadline: float,
        metadata: Mapping[str, str] | None = None,
    ) -> Message:
        """Call and return the decoded response; raises :class:`TtrpcError` for an error
        status, ``OSError``/``anyio`` errors when the connection breaks, ``TimeoutError`` after
        ``deadline`` seconds (also sent to the server as the call's timeout)."""
        envelope = ttrpc_pb2.Request(
            service=service,
            method=method,
            payload=request.SerializeToString(),
            timeout_nano=int(deadline * 1e9),
            metadata=[ttrpc_pb2.KeyValue(key=k, value=v) for k, v in (metadata or {}).items()],
        )
        async with self._lock:
            stream_id, frame = self._conn.send_request(envelope.SerializeToString())
            with anyio.fail_after(deadline):
                await self._stream.send(frame)
                while True:
                    event = self._conn.next_event()
                    if event is NEED_DATA:
                        self._conn.receive_data(await self._stream.receive(READ_SIZE))
                        continue
                    if isinstance(event, TooLarge):
                        raise TtrpcError(Code.RESOURCE_EXHAUSTED, event.message)
                    assert isinstance(event, ResponseReceived)
                    if event.stream_id == stream_id:
                        break
        resp = ttrpc_pb2.Response.FromString(event.data)
        if resp.status.code != 0:
            code = (
                Code(resp.status.code)
                if resp.status.code in Code._value2member_map_
                else Code.UNKNOWN
            )
            raise TtrpcError(code, resp.status.message)
        return response_type.FromString(resp.payload)
