"""Sans-IO connection state machines of the cc-proxy protocol (spec §4).

:class:`ClientConnection` is a runtime or shim client: it may pipeline commands, and matches the
responses, which carry no id, to its commands in order (the response opcode must echo the
oldest pending command). :class:`ServerConnection` is one accepted client of a proxy.

Both raise :class:`RemoteProtocolError` from ``next_event()`` when the peer breaks the protocol;
the error is sticky (every later call raises it again) because the peer is expected to be
disconnected. ``send_*`` methods return the bytes to write (one write per frame keeps frames of
concurrent writers apart) and raise :class:`LocalProtocolError` for something the protocol
cannot carry.
"""

from __future__ import annotations

from collections import deque
from typing import Final, Literal, NoReturn

import msgspec

from protocol import NEED_DATA, _NeedData
from protocol.ccproxy.constants import (
    HEADER_WORDS,
    MAX_PAYLOAD,
    VERSION,
    Command,
    FrameType,
    Notification,
    Stream,
)
from protocol.ccproxy.events import (
    CommandReceived,
    ErrorReply,
    ProcessExited,
    Response,
    StreamData,
    StreamReceived,
    VMProcessExited,
)
from protocol.ccproxy.frames import _HEADER, Frame, FrameDecoder, encode_raw
from protocol.ccproxy.payloads import (
    ErrorResponse,
    ProcessExitNotice,
    decode_payload,
    encode_payload,
)
from protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError

Role = Literal["runtime", "shim"]

UNKNOWN_ERROR: Final = "unknown error"
"""Message of an error response whose ``msg`` is empty or missing (as the Go client says)."""

MAX_EXIT_STATUS: Final = 0xFF
"""ProcessExited carries the status in one byte."""

# Enum members as module constants: reading ``Command.X`` costs an attribute lookup through the
# enum's metaclass (about 60 ns on Python 3.11), several times per frame on the paths below.
_COMMAND_FRAME: Final = FrameType.COMMAND
_RESPONSE_FRAME: Final = FrameType.RESPONSE
_STREAM_FRAME: Final = FrameType.STREAM
_CONNECT_SHIM: Final = Command.CONNECT_SHIM
_DISCONNECT_SHIM: Final = Command.DISCONNECT_SHIM
_STDIN: Final = Stream.STDIN
_NOTIFICATION_FRAME: Final = FrameType.NOTIFICATION
_VM_PROCESS_EXITED: Final = Notification.VM_PROCESS_EXITED

_COMMANDS: Final = tuple(Command)
_SPECIAL: Final = frozenset((_CONNECT_SHIM, _DISCONNECT_SHIM))
"""Commands that change the connection's role or state (the general send path handles them)."""

_STREAMS: Final = tuple(Stream)
_OUTPUT_STREAMS: Final = frozenset((Stream.STDOUT, Stream.STDERR))
_CLIENT_STREAMS: Final = frozenset((_STDIN, Stream.LOG))
_PROCESS_EXITED_FRAMES: Final = tuple(
    encode_raw(FrameType.NOTIFICATION, Notification.PROCESS_EXITED, bytes((status,)))
    for status in range(MAX_EXIT_STATUS + 1)
)


def _command(command: int) -> Command:
    if type(command) is not Command and not (
        isinstance(command, int) and 0 <= command < len(_COMMANDS)
    ):
        raise LocalProtocolError(f"unknown command {command!r}")
    return _COMMANDS[command]


def _stream(stream: int) -> Stream:
    if type(stream) is not Stream and not (isinstance(stream, int) and 0 <= stream < len(_STREAMS)):
        raise LocalProtocolError(f"unknown stream {stream!r}")
    return _STREAMS[stream]


def _payload_bytes(payload: object) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, msgspec.Struct):
        return encode_payload(payload)
    if isinstance(payload, bytearray | memoryview):
        return bytes(payload)
    raise LocalProtocolError(f"a payload is bytes or a payload Struct, not {type(payload)!r}")


def _error_message(payload: bytes) -> str:
    """Text of an E-flagged response; raises PayloadError if the payload is not ErrorResponse."""
    if not payload:
        return UNKNOWN_ERROR
    return decode_payload(ErrorResponse, payload).msg or UNKNOWN_ERROR


class _Receiver:
    """Shared byte intake: a frame decoder, EOF, and the sticky remote error."""

    __slots__ = ("_decoder", "_eof", "_error")

    def __init__(self, max_payload: int) -> None:
        self._decoder = FrameDecoder(max_payload)
        self._eof = False
        self._error: ProtocolError | None = None

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the socket; ``b""`` means EOF.

        Raises :class:`LocalProtocolError` if data is fed after EOF.
        """
        if not data:
            self._eof = True
        elif self._eof:
            raise LocalProtocolError("receive_data() called after EOF")
        else:
            self._decoder.feed(data)

    @property
    def eof(self) -> bool:
        """True once ``receive_data(b"")`` was called."""
        return self._eof

    def _next_frame(self) -> Frame | None:
        if self._error is not None:
            raise type(self._error)(*self._error.args)
        try:
            frame = self._decoder.next_frame()
        except ProtocolError as exc:
            self._error = exc
            raise
        if frame is None and self._eof and self._decoder.buffered:
            self._fail(f"connection closed inside a frame ({self._decoder.buffered} bytes left)")
        return frame

    def _fail(self, message: str) -> NoReturn:
        self._error = RemoteProtocolError(message)
        raise self._error


class ClientConnection(_Receiver):
    """A client of a proxy: ``"runtime"`` (registers VMs, sends Hyper) or ``"shim"`` (claims a
    token; also receives stdout/stderr streams and ProcessExited at any time).

    A runtime connection becomes a shim after a successful ConnectShim response; while a
    ConnectShim is pending, stream and notification frames are accepted too (the proxy may send
    output before it writes the response). DisconnectShim sent on a shim connection expects no
    response (the proxy closes the connection); afterwards nothing more may be sent.

    ``exit_notifications``: the runtime asks for hyperd's extension (``exitNotifications`` in
    RegisterVM/AttachVM), so ``VM_PROCESS_EXITED`` notifications are accepted, at any time, as
    :class:`VMProcessExited` events; without it they are a protocol violation, as any
    notification on a runtime connection.
    """

    __slots__ = ("_connecting", "_disconnecting", "_exit_notifications", "_expected", "_role")

    def __init__(
        self,
        role: Role = "runtime",
        *,
        max_payload: int = MAX_PAYLOAD,
        exit_notifications: bool = False,
    ) -> None:
        if role not in ("runtime", "shim"):
            raise ValueError(f"role must be 'runtime' or 'shim', not {role!r}")
        super().__init__(max_payload)
        self._exit_notifications = exit_notifications and role == "runtime"
        self._role: Role = role
        self._expected: deque[Command] = deque()
        self._connecting = 0  # ConnectShim commands awaiting their response
        self._disconnecting = False

    @property
    def role(self) -> Role:
        """``"shim"`` from construction or after a successful ConnectShim, else ``"runtime"``."""
        return self._role

    @property
    def pending(self) -> int:
        """Number of responses still expected."""
        return len(self._expected)

    def _is_shim(self) -> bool:
        return self._role == "shim" or self._connecting > 0

    def _check_open(self) -> None:
        if self._disconnecting:
            raise LocalProtocolError("DisconnectShim was sent: the proxy closes this connection")

    def send_command(self, command: Command, payload: bytes | msgspec.Struct = b"") -> bytes:
        """Return the frame for ``command`` and expect its response (none for DisconnectShim on a
        shim connection; on a runtime connection the proxy answers it with an error).

        Raises :class:`LocalProtocolError` for an unknown command, a payload too large or not
        encodable, or anything sent after DisconnectShim.
        """
        if type(command) is Command and type(payload) is bytes and command not in _SPECIAL:
            # the hot path (a known command, a bytes payload): what the general path below does
            if self._disconnecting:
                self._check_open()
            size = len(payload)
            if size > MAX_PAYLOAD:
                raise LocalProtocolError(
                    f"payload of {size} bytes exceeds the maximum {MAX_PAYLOAD}"
                )
            self._expected.append(command)
            return _HEADER.pack(VERSION, HEADER_WORDS, _COMMAND_FRAME, command, size) + payload
        self._check_open()
        cmd = _command(command)
        data = encode_raw(_COMMAND_FRAME, cmd, _payload_bytes(payload))
        if cmd is _DISCONNECT_SHIM and self._is_shim():
            self._disconnecting = True
        else:
            self._expected.append(cmd)
            if cmd is _CONNECT_SHIM:
                self._connecting += 1
        return data

    def send_stream(self, stream: Stream, data: bytes) -> bytes:
        """Return a stream frame: stdin (shim only; ``b""`` = EOF) or log (JSON ``LogEntry``).

        Raises :class:`LocalProtocolError` for stdout/stderr (the proxy closes the connection
        of a client that sends them), stdin before ConnectShim, or a payload too large.
        """
        self._check_open()
        kind = _stream(stream)
        if kind not in _CLIENT_STREAMS:
            raise LocalProtocolError(f"clients do not send {kind.name} streams")
        if kind is _STDIN and not self._is_shim():
            raise LocalProtocolError("stdin on a connection that is not a shim")
        return encode_raw(_STREAM_FRAME, kind, _payload_bytes(data))

    def next_payload(self) -> bytes | _NeedData | None:
        """Fast path of :meth:`next_event` for the common events.

        If the next frame is a complete success response to the oldest pending command (other
        than ConnectShim), consume it and return its payload: exactly what :meth:`next_event`
        would have returned as ``Response(command, payload)``, without building the event.
        Return :data:`NEED_DATA` when no byte is buffered (and no EOF or error is pending), as
        :meth:`next_event` would. Otherwise consume nothing and return ``None``:
        :meth:`next_event` then returns the event, :data:`NEED_DATA`, or raises.
        """
        if self._error is None:
            decoder = self._decoder
            if not decoder.buffered and not self._eof:
                return NEED_DATA
            expected = self._expected
            if expected and expected[0] is not _CONNECT_SHIM:
                payload = decoder.next_payload_of(_RESPONSE_FRAME, expected[0])
                if payload is not None:
                    expected.popleft()
                    return payload
        return None

    def next_event(
        self,
    ) -> Response | ErrorReply | StreamData | ProcessExited | VMProcessExited | _NeedData:
        """Return the next event, or :data:`NEED_DATA`.

        Raises :class:`RemoteProtocolError` for an invalid frame, a response with no command
        pending or whose opcode is not the oldest pending command's, a command frame, a stream
        or notification on a runtime connection (except ``VM_PROCESS_EXITED`` when
        ``exit_notifications`` is on: its payload must decode), stdin/log streams from the
        proxy, a ProcessExited payload that is not one byte, an undecodable error payload, or
        EOF in the middle of a frame.
        """
        frame = self._next_frame()
        if frame is None:
            return NEED_DATA
        frame_type = frame.type
        if frame_type is _RESPONSE_FRAME:
            return self._response(frame)
        if frame_type is _COMMAND_FRAME:
            self._fail(f"{_COMMANDS[frame.opcode].name} command frame from the proxy")
        if frame_type is _NOTIFICATION_FRAME and frame.opcode == _VM_PROCESS_EXITED:
            return self._vm_process_exited(frame)
        if not self._is_shim():
            self._fail(f"{frame_type.name.lower()} frame on a runtime connection")
        if frame_type is _STREAM_FRAME:
            stream = _STREAMS[frame.opcode]
            if stream not in _OUTPUT_STREAMS:
                self._fail(f"{stream.name} stream from the proxy")
            return StreamData(stream, frame.payload)
        if len(frame.payload) != 1:
            self._fail(f"ProcessExited payload of {len(frame.payload)} bytes (expected 1)")
        return ProcessExited(frame.payload[0])

    def _vm_process_exited(self, frame: Frame) -> VMProcessExited:
        if not self._exit_notifications or self._role != "runtime":
            self._fail("VM_PROCESS_EXITED notification on a connection that did not ask for it")
        try:
            notice = decode_payload(ProcessExitNotice, frame.payload)
        except ProtocolError as exc:
            self._error = exc
            raise
        if not 0 <= notice.status <= MAX_EXIT_STATUS:
            self._fail(f"VM_PROCESS_EXITED status {notice.status} is not 0..{MAX_EXIT_STATUS}")
        return VMProcessExited(notice)

    def _response(self, frame: Frame) -> Response | ErrorReply:
        expected = self._expected
        if not expected:
            self._fail(f"unexpected {_COMMANDS[frame.opcode].name} response: no command is pending")
        command = expected[0]
        if frame.opcode != command:
            self._fail(
                f"{_COMMANDS[frame.opcode].name} response while the oldest pending command"
                f" is {command.name}"
            )
        event: Response | ErrorReply
        if frame.error:
            try:
                event = ErrorReply(command, _error_message(frame.payload))
            except ProtocolError as exc:
                self._error = exc  # sticky, like every other remote error
                raise
        else:
            event = Response(command, frame.payload)
        expected.popleft()
        if command is _CONNECT_SHIM:
            self._connecting -= 1
            if not frame.error:
                self._role = "shim"
        return event


class ServerConnection(_Receiver):
    """One client connection as a proxy sees it.

    Commands must be answered in the order received (responses carry no id); DisconnectShim
    from a shim is not answered -- the proxy closes the connection instead.
    """

    __slots__ = ("_unanswered",)

    def __init__(self, *, max_payload: int = MAX_PAYLOAD) -> None:
        super().__init__(max_payload)
        self._unanswered: deque[Command] = deque()

    @property
    def pending(self) -> int:
        """Number of received commands not yet answered."""
        return len(self._unanswered)

    def next_event(self) -> CommandReceived | StreamReceived | _NeedData:
        """Return the next command or stream from the client, or :data:`NEED_DATA`.

        Raises :class:`RemoteProtocolError` for an invalid frame, a response or notification
        frame, a stdout/stderr stream from the client, or EOF in the middle of a frame. The
        reference proxy closes the connection on each of these without answering.
        """
        frame = self._next_frame()
        if frame is None:
            return NEED_DATA
        frame_type = frame.type
        if frame_type is _COMMAND_FRAME:
            command = _COMMANDS[frame.opcode]
            self._unanswered.append(command)
            return CommandReceived(command, frame.payload)
        if frame_type is _STREAM_FRAME:
            stream = _STREAMS[frame.opcode]
            if stream not in _CLIENT_STREAMS:
                self._fail(f"{stream.name} stream from a client: no handler for stream")
            return StreamReceived(stream, frame.payload)
        self._fail(f"{frame_type.name.lower()} frame from a client")

    def _answer(self, command: Command) -> Command:
        cmd = _command(command)
        if not self._unanswered:
            raise LocalProtocolError(f"no command to answer with a {cmd.name} response")
        oldest = self._unanswered[0]
        if oldest is not cmd:
            raise LocalProtocolError(
                f"responses go in order: the oldest unanswered command is {oldest.name},"
                f" not {cmd.name}"
            )
        return cmd

    def send_response(self, command: Command, payload: bytes | msgspec.Struct = b"") -> bytes:
        """Return a success response to the oldest unanswered command, which must be
        ``command``; raises :class:`LocalProtocolError` otherwise."""
        cmd = self._answer(command)
        data = encode_raw(_RESPONSE_FRAME, cmd, _payload_bytes(payload))
        self._unanswered.popleft()
        return data

    def send_error(self, command: Command, message: str) -> bytes:
        """Return an error response (E flag, ``{"msg": message}``) to the oldest unanswered
        command, which must be ``command``; raises :class:`LocalProtocolError` otherwise."""
        cmd = self._answer(command)
        payload = encode_payload(ErrorResponse(message))
        data = encode_raw(_RESPONSE_FRAME, cmd, payload, True)
        self._unanswered.popleft()
        return data

    def send_stream(self, stream: Stream, data: bytes) -> bytes:
        """Return a stdout or stderr frame for a shim; other streams raise
        :class:`LocalProtocolError`."""
        kind = _stream(stream)
        if kind not in _OUTPUT_STREAMS:
            raise LocalProtocolError(f"a proxy does not send {kind.name} streams")
        return encode_raw(_STREAM_FRAME, kind, _payload_bytes(data))

    def send_process_exited(self, status: int) -> bytes:
        """Return a ProcessExited notification; ``status`` must be 0..255."""
        if not 0 <= status <= MAX_EXIT_STATUS:
            raise LocalProtocolError(f"exit status {status} does not fit in one byte")
        return _PROCESS_EXITED_FRAMES[status]

    def send_vm_process_exited(self, notice: ProcessExitNotice) -> bytes:
        """Return hyperd's ``VM_PROCESS_EXITED`` notification (for a runtime connection that
        asked for exit notifications); ``notice.status`` must be 0..255."""
        if not 0 <= notice.status <= MAX_EXIT_STATUS:
            raise LocalProtocolError(f"exit status {notice.status} does not fit in one byte")
        return encode_raw(_NOTIFICATION_FRAME, _VM_PROCESS_EXITED, encode_payload(notice))


__all__ = ["UNKNOWN_ERROR", "ClientConnection", "Role", "ServerConnection"]
