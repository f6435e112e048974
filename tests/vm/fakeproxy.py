"""A scriptable cc-proxy peer for the VM-layer tests, on a real unix socket.

It speaks the server side through ``protocol.ccproxy.ServerConnection``. Unlike the reference
proxy it keeps reading while replies are held, so tests can see how many commands a client put
on the wire before the first reply. Hyper names it understands: ``ping`` (empty ACK), ``echo``
(replies with the raw ``data``), ``agentfail`` (agent ERROR), anything else -> "unknown command".
"""

from __future__ import annotations

import base64
import os
import random
from dataclasses import dataclass, field

import anyio
import msgspec
from anyio.abc import SocketStream, TaskStatus

from protocol import NEED_DATA, RemoteProtocolError
from protocol.ccproxy import (
    AttachVM,
    Command,
    CommandReceived,
    Hyper,
    IOResponse,
    RegisterVM,
    ServerConnection,
    UnregisterVM,
    VMResponse,
    decode_payload,
)

AGENT_ERROR = "ERROR received from VM agent, control msg received : boom"


@dataclass
class Received:
    connection: int
    command: Command
    payload: bytes
    hyper_name: str | None = None


@dataclass
class FakeProxy:
    path: str
    delays: dict[str, float] = field(default_factory=dict)
    """Per hyperName: seconds to wait before answering (other commands still queue behind)."""
    received: list[Received] = field(default_factory=list)
    registered: set[str] = field(default_factory=set)
    jitter: float = 0.0
    """Each Hyper reply waits a random time up to this many seconds (in order: it queues)."""
    ping_error: str | None = None
    """When set, every Hyper is answered with this proxy error (e.g. the VM is gone)."""
    chunks: int = 0
    """Number of ``receive()`` calls that returned data, over all connections."""
    accepted: int = 0
    replies: int = 0

    def __post_init__(self) -> None:
        self._released = anyio.Event()
        self._released.set()
        self._answering = anyio.Event()
        self._answering.set()
        self._changed = anyio.Event()
        self._streams: dict[int, SocketStream] = {}

    @property
    def url(self) -> str:
        return f"unix://{self.path}"

    # -- test controls -----------------------------------------------------------------------

    def hold(self) -> None:
        """Keep reading but send no reply until :meth:`release`."""
        self._released = anyio.Event()

    def release(self) -> None:
        self._released.set()

    def go_silent(self) -> None:
        """Stop answering anything (on every connection) until :meth:`wake`."""
        self._answering = anyio.Event()

    def wake(self) -> None:
        self._answering.set()

    async def drop_connections(self) -> None:
        for stream in list(self._streams.values()):
            await stream.aclose()

    async def wait_for(self, predicate: object, within: float = 5.0) -> None:
        """Wait until ``predicate()`` holds (re-checked whenever the proxy's state changes)."""
        assert callable(predicate)
        with anyio.fail_after(within):
            while not predicate():
                await self._changed.wait()

    def names(self) -> list[str]:
        return [r.hyper_name or r.command.name for r in self.received]

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    # -- serving -----------------------------------------------------------------------------

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_unix_listener(self.path)
        async with listener, anyio.create_task_group() as tg:
            task_status.started()
            while True:
                stream = await listener.accept()
                self.accepted += 1
                tg.start_soon(self._handle, stream, self.accepted)
                self._notify()

    async def _handle(self, stream: SocketStream, number: int) -> None:
        self._streams[number] = stream
        conn = ServerConnection()
        send, receive = anyio.create_memory_object_stream[CommandReceived](1000)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._respond, stream, conn, receive)
                async with send:
                    while True:
                        try:
                            data = await stream.receive()
                        except (anyio.EndOfStream, anyio.BrokenResourceError,
                                anyio.ClosedResourceError):  # fmt: skip
                            break
                        self.chunks += 1
                        conn.receive_data(data)
                        while (event := conn.next_event()) is not NEED_DATA:
                            assert isinstance(event, CommandReceived)
                            name = None
                            if event.command is Command.HYPER:
                                name = decode_payload(Hyper, event.payload).hyperName
                            self.received.append(
                                Received(number, event.command, event.payload, name)
                            )
                            await send.send(event)
                        self._notify()
                tg.cancel_scope.cancel()
        except RemoteProtocolError:
            pass
        finally:
            self._streams.pop(number, None)
            await stream.aclose()
            self._notify()

    async def _respond(
        self,
        stream: SocketStream,
        conn: ServerConnection,
        receive: anyio.abc.ObjectReceiveStream[CommandReceived],
    ) -> None:
        async with receive:
            async for event in receive:
                await self._released.wait()
                await self._answering.wait()
                frame = await self._answer(conn, event)
                await self._answering.wait()
                try:
                    await stream.send(frame)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    return
                self.replies += 1
                self._notify()

    async def _answer(self, conn: ServerConnection, event: CommandReceived) -> bytes:
        command, payload = event.command, event.payload
        if command is Command.REGISTER_VM:
            reg = decode_payload(RegisterVM, payload)
            if reg.containerId in self.registered:
                return conn.send_error(command, f"{reg.containerId}: container already registered")
            if not (reg.containerId and reg.ctlSerial and reg.ioSerial):
                return conn.send_error(command, "malformed RegisterVM command")
            self.registered.add(reg.containerId)
            return conn.send_response(command, self._io(reg.numIOStreams))
        if command is Command.ATTACH_VM:
            att = decode_payload(AttachVM, payload)
            if att.containerId not in self.registered:
                return conn.send_error(command, f"unknown containerID: {att.containerId}")
            return conn.send_response(command, self._io(att.numIOStreams))
        if command is Command.UNREGISTER_VM:
            unreg = decode_payload(UnregisterVM, payload)
            if unreg.containerId not in self.registered:
                return conn.send_error(command, f"unknown containerID: {unreg.containerId}")
            self.registered.discard(unreg.containerId)
            return conn.send_response(command)
        if command is Command.HYPER:
            hyper = decode_payload(Hyper, payload)
            delay = self.delays.get(hyper.hyperName, 0.0) + random.random() * self.jitter
            if delay:
                await anyio.sleep(delay)
            if self.ping_error is not None:
                return conn.send_error(command, self.ping_error)
            if hyper.hyperName == "ping":
                return conn.send_response(command)
            if hyper.hyperName == "echo":
                data = b"" if isinstance(hyper.data, msgspec.UnsetType) else bytes(hyper.data)
                return conn.send_response(command, data)
            if hyper.hyperName == "agentfail":
                return conn.send_error(command, AGENT_ERROR)
            return conn.send_error(command, f"unknown command '{hyper.hyperName}'")
        return conn.send_error(command, f"unsupported {command.name}")

    def _io(self, count: int) -> VMResponse:
        tokens = [base64.urlsafe_b64encode(os.urandom(32)).decode() for _ in range(count)]
        return VMResponse(io=IOResponse(URL=self.url, tokens=tokens or None))
