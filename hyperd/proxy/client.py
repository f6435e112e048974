"""One client connection (runtime or shim) of the proxy.

Frames are read continuously and queued; the queue is handled strictly in order, one frame at
a time, so responses go out in request order and a command's side effects happen before the
next frame's, as with the reference (which reads the next frame only after answering). A slow
command (READY wait, shim wait, agent round trip) holds up only its own connection.

Commands that finish at once are answered inline; agent round trips complete through a
callback from the VM's ctl reader (no task per command); only commands that must wait for
something else (RegisterVM, a shim, a process start) run as a task owned by the connection and
cancelled when it closes. Every frame goes out with one ``write()``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final, cast

import msgspec

from hyperd.proxy import texts
from hyperd.proxy.relocate import PROCESS_COMMANDS, relocate
from hyperd.proxy.sessions import IOSession
from hyperd.proxy.shim import ASYNC, ShimCommands, decode_command
from hyperd.proxy.vm import AgentVM
from protocol import ProtocolError
from protocol.ccproxy import (
    AttachVM,
    Command,
    CommandReceived,
    Hyper,
    ProcessExitNotice,
    RegisterVM,
    ServerConnection,
    Stream,
    StreamReceived,
    UnregisterVM,
)
from protocol.hyperstart import (
    Reply,
    UnknownCommand,
)

if TYPE_CHECKING:
    from hyperd.proxy.server import Proxy

log = logging.getLogger("hyperd.proxy.client")

MAX_QUEUED: Final = 256  # frames read ahead of the one being handled; reading pauses beyond
MAX_QUEUED_BYTES: Final = 1 << 20  # ... or payload bytes read ahead
RESUME_QUEUED: Final = 64
MAX_WRITE_BUFFER: Final = 64 << 20  # bytes queued to a client that does not read: drop it

_CLOSE: Final = object()  # queued after a protocol violation or EOF: close once reached
Handler = Callable[["ClientConnection", bytes], Any]


class ClientConnection(asyncio.Protocol, ShimCommands):
    """A client of the proxy: runtime until a successful ConnectShim, a shim after."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.conn = ServerConnection()
        self.transport: asyncio.Transport | None = None
        self.queue: deque[Any] = deque()
        self.busy = False
        self.closed = False
        self.vm: AgentVM | None = None
        self.session: IOSession | None = None
        self.exit_vms: list[AgentVM] = []  # VMs whose exits this connection asked for
        self._pumping = False
        self._paused = False
        self._queued_bytes = 0
        self._task: asyncio.Task[None] | None = None
        self._hyper_done = self._answer(Command.HYPER)  # reused: no closure per command

    # -- transport -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its interface
        self.transport = cast(asyncio.Transport, transport)
        self.proxy.clients.add(self)

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        queue = self.queue
        conn.receive_data(data)
        try:
            while True:
                event = conn.next_event()
                if type(event) is CommandReceived:
                    self._queued_bytes += len(event.payload)
                elif type(event) is StreamReceived:
                    self._queued_bytes += len(event.data)
                else:
                    break
                queue.append(event)
        except ProtocolError as exc:
            log.debug("closing client after a protocol violation: %s", exc)
            queue.append(_CLOSE)
            self._pause()
        else:
            if len(queue) > MAX_QUEUED or self._queued_bytes > MAX_QUEUED_BYTES:
                self._pause()
        if not self.busy:
            self._pump()

    def eof_received(self) -> bool:
        # a runtime going away: exits from now on are kept for the next one, not written here
        self._stop_exit_notices()
        # finish what the client sent before closing (it may have half-closed after pipelining)
        self.queue.append(_CLOSE)
        if not self.busy:
            self._pump()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed()

    def _pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def write(self, data: bytes) -> None:
        """Write one frame (one ``write()``); a client that stops reading is dropped."""
        transport = self.transport
        if transport is None or self.closed:
            return
        transport.write(data)
        if transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            log.warning("dropping a client that does not read its frames")
            self.close()

    def close(self) -> None:
        """Close the connection (pending output is flushed first)."""
        if self.transport is not None and not self.closed:
            self.transport.close()
        self._closed()

    def _closed(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.queue.clear()
        self.proxy.clients.discard(self)
        if self._task is not None:
            self._task.cancel()
            self._task = None
        session, self.session = self.session, None
        if session is not None:
            session.detach_shim(self)
        self._stop_exit_notices()

    def _stop_exit_notices(self) -> None:
        vms, self.exit_vms = self.exit_vms, []
        for vm in vms:
            vm.unlisten_exits(self)

    def send_exit_notice(self, notice: ProcessExitNotice) -> None:
        """hyperd's extension: one VM_PROCESS_EXITED notification (ExitListener)."""
        self.write(self.conn.send_vm_process_exited(notice))

    def _listen_exits(self, requested: bool) -> bool:
        """Whether this connection gets the VM's exits (asked for and the extension is on)."""
        return requested and self.proxy.config.exit_notifications

    # -- shim output (ShimPeer) ------------------------------------------------------------------

    def send_output(self, stream: Stream, data: bytes) -> None:
        self.write(self.conn.send_stream(stream, data))

    def send_exited(self, status: int) -> None:
        self.write(self.conn.send_process_exited(status))

    # -- in-order handling -----------------------------------------------------------------------

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            queue = self.queue
            while queue and not self.busy and not self.closed:
                event = queue.popleft()
                if event is _CLOSE:
                    self.close()
                    return
                self.busy = True
                if type(event) is CommandReceived:
                    self._queued_bytes -= len(event.payload)
                    self._command(event.command, event.payload)
                else:
                    assert isinstance(event, StreamReceived)
                    self._queued_bytes -= len(event.data)
                    self._stream(event.stream, event.data)
            if (
                self._paused
                and len(queue) < RESUME_QUEUED
                and self._queued_bytes < MAX_QUEUED_BYTES // 2
                and not self.closed
            ):
                self._paused = False
                if self.transport is not None:
                    self.transport.resume_reading()
        finally:
            self._pumping = False

    def _resume(self) -> None:
        self.busy = False
        self._task = None
        if not self._pumping:
            self._pump()

    def _command(self, command: Command, payload: bytes) -> None:
        try:
            result = _HANDLERS[command](self, payload)
        except texts.CommandError as exc:
            self.write(self.conn.send_error(command, exc.message))
            result = None
        except Exception as exc:  # a bug: answer rather than take the connection down
            log.exception("%s failed", command.name)
            if not self.closed:
                self.write(self.conn.send_error(command, str(exc) or type(exc).__name__))
            result = None
        if result is None:
            self.busy = False
        elif result is not ASYNC:
            self._task = asyncio.get_running_loop().create_task(self._run(command, result))

    async def _run(self, command: Command, work: Coroutine[Any, Any, bytes]) -> None:
        try:
            payload = await work
        except texts.CommandError as exc:
            if not self.closed:
                self.write(self.conn.send_error(command, exc.message))
        except asyncio.CancelledError:
            return  # the connection closed
        except Exception as exc:  # a bug: answer rather than wedge the connection
            log.exception("%s failed", command.name)
            if not self.closed:
                self.write(self.conn.send_error(command, str(exc) or type(exc).__name__))
        else:
            if not self.closed:
                self.write(self.conn.send_response(command, payload))
        self._resume()

    def _answer(self, command: Command) -> Callable[[Reply | None, str | None], None]:
        """A VM reply callback that answers ``command`` (ACK payload verbatim)."""

        def done(reply: Reply | None, error: str | None) -> None:
            if not self.closed:
                if reply is None:
                    self.write(self.conn.send_error(command, error or texts.NO_CTL_CHANNEL))
                elif reply.ok:
                    self.write(self.conn.send_response(command, reply.payload))
                else:
                    self.write(self.conn.send_error(command, texts.agent_error(reply.payload)))
            self._resume()

        return done

    # -- commands --------------------------------------------------------------------------------

    def _register_vm(self, payload: bytes) -> Coroutine[Any, Any, bytes]:
        req: RegisterVM = decode_command(RegisterVM, payload)
        if not (req.containerId and req.ctlSerial and req.ioSerial):
            # the reference registers and connects anyway, then answers this error
            raise texts.CommandError(texts.MALFORMED_REGISTER)
        vm = self.proxy.add_vm(req.containerId)
        return self._connect(vm, req)

    async def _connect(self, vm: AgentVM, req: RegisterVM) -> bytes:
        proxy = self.proxy
        try:
            await vm.connect(req.ctlSerial, req.ioSerial, proxy.config.ready_timeout, req.console)
        except BaseException:
            proxy.drop_vm(vm)
            raise
        tokens = proxy.allocate(vm, req.numIOStreams)
        self.vm = vm
        notify = self._listen_exits(req.exitNotifications)
        if notify and not self.closed:
            # the response is written right after this returns, in the same loop step, and a
            # new VM has no earlier exits: nothing can come before the response
            self.exit_vms.append(vm)
            vm.listen_exits(self)
        return proxy.io_response(tokens, exit_notifications=notify)

    def _attach_vm(self, payload: bytes) -> None:
        req: AttachVM = decode_command(AttachVM, payload)
        proxy = self.proxy
        vm = proxy.vms.get(req.containerId)
        if vm is None:
            raise texts.CommandError(texts.unknown_container(req.containerId))
        tokens = proxy.allocate(vm, req.numIOStreams)
        self.vm = vm
        notify = self._listen_exits(req.exitNotifications)
        payload = proxy.io_response(tokens, exit_notifications=notify)
        self.write(self.conn.send_response(Command.ATTACH_VM, payload))
        if notify and vm not in self.exit_vms:
            self.exit_vms.append(vm)
            vm.listen_exits(self)  # after the response: the exits kept meanwhile follow it

    def _unregister_vm(self, payload: bytes) -> None:
        req: UnregisterVM = decode_command(UnregisterVM, payload)
        vm = self.proxy.vms.get(req.containerId)
        if vm is None:
            raise texts.CommandError(texts.unknown_container(req.containerId))
        self.vm = None
        if vm in self.exit_vms:
            self.exit_vms.remove(vm)
            vm.unlisten_exits(self)
        self.write(self.conn.send_response(Command.UNREGISTER_VM))
        self.proxy.unregister(vm)

    def _hyper(self, payload: bytes) -> object:
        req: Hyper = decode_command(Hyper, payload)
        vm = self.vm
        if vm is None:
            raise texts.CommandError(texts.NOT_ATTACHED)
        name = req.hyperName
        tokens = req.tokens or ()
        data = b"" if req.data is msgspec.UNSET else bytes(req.data)
        session: IOSession | None = None
        if name in PROCESS_COMMANDS:
            session = self._process_session(vm, tokens)
            relocated = relocate(name, data, session.io_base, vm.dialect)
            data = relocated.payload
        elif tokens:
            raise texts.CommandError(texts.no_tokens_needed(name, len(tokens)))
        try:
            code = vm.dialect.code_for(name)
        except UnknownCommand:
            raise texts.CommandError(texts.unknown_command(name)) from None
        total = vm.frame_too_long(data)
        if total is not None:
            raise texts.CommandError(texts.message_too_long(total))
        if session is None:
            vm.request(name, code, data, self._hyper_done)
            return ASYNC
        session.used = True
        session.container_id = relocated.container_id
        session.process_id = relocated.process_id
        session.terminal = relocated.terminal
        session.is_exec = name != "newcontainer"
        return self._start_process(vm, session, name, code, data)

    def _process_session(self, vm: AgentVM, tokens: Any) -> IOSession:
        if len(tokens) > 1:
            raise texts.CommandError(texts.too_many_tokens(len(tokens)))
        if not tokens:
            return vm.null_session
        token = tokens[0]
        session = self.proxy.tokens.get(token)
        if session is None or session.vm is not vm or session.freed:
            raise texts.CommandError(texts.unknown_token_hyper(token))
        if session.used:
            raise texts.CommandError(texts.token_in_use(token))
        return session

    async def _start_process(
        self, vm: AgentVM, session: IOSession, name: str, code: int, data: bytes
    ) -> bytes:
        try:
            if not session.is_null and not session.shim_connected.is_set():
                try:
                    async with asyncio.timeout(self.proxy.config.shim_timeout):
                        await session.shim_connected.wait()
                except TimeoutError:
                    raise texts.CommandError(texts.shim_timeout(session.token)) from None
                if vm.lost:
                    raise texts.CommandError(texts.NO_CTL_CHANNEL)
                if session.freed:
                    raise texts.CommandError(texts.unknown_token_hyper(session.token))
            # indexed before sending: the exit event may come in the same read as the ACK
            vm.bind_process(session)
            reply = await vm.call(name, code, data)
            if not reply.ok:
                raise texts.CommandError(texts.agent_error(reply.payload))
        except BaseException:
            session.used = False
            vm.unbind_process(session)
            raise
        session.process_started.set()
        return reply.payload


_HANDLERS: Final[dict[Command, Handler]] = {
    Command.REGISTER_VM: ClientConnection._register_vm,
    Command.UNREGISTER_VM: ClientConnection._unregister_vm,
    Command.ATTACH_VM: ClientConnection._attach_vm,
    Command.HYPER: ClientConnection._hyper,
    Command.CONNECT_SHIM: ClientConnection._connect_shim,
    Command.DISCONNECT_SHIM: ClientConnection._disconnect_shim,
    Command.SIGNAL: ClientConnection._signal,
}

__all__ = ["MAX_QUEUED", "MAX_WRITE_BUFFER", "ClientConnection"]
