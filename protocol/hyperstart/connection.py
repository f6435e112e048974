"""Sans-IO ctl channel endpoints: the host side (runtime/proxy) and the agent side (simulator).

The host matches replies FIFO: the agent answers every command with exactly one ACK or ERROR,
in order, with no request id (spec §4.2). NEXT (flow-control acknowledgements) and the dialect's
PROCESSASYNCEVENT are not replies and never consume a FIFO slot.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass
from typing import Final

from protocol import NEED_DATA, _NeedData
from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.hyperstart.codec import decode_message, encode_message
from protocol.hyperstart.dialects import CC, Code, Dialect
from protocol.hyperstart.framing import (
    DEFAULT_MAX_FRAME,
    CtlDecoder,
    CtlFrame,
    encode_ctl,
)
from protocol.hyperstart.messages import ProcessAsyncEvent

__all__ = [
    "AgentCtlConnection",
    "AsyncEvent",
    "HostCtlConnection",
    "NextAck",
    "Ready",
    "Reply",
    "UnexpectedReply",
]

_NEXT_PAYLOAD: Final = struct.Struct(">I")  # NEXT carries the u32 count of bytes consumed
_MAX_U32: Final = 0xFFFFFFFF
_ACK: Final = int(Code.ACK)
_ERROR: Final = int(Code.ERROR)
_NEXT: Final = int(Code.NEXT)
_READY: Final = int(Code.READY)
_READY_FRAME: Final = encode_ctl(Code.READY)
_REPLY_CODES: Final = frozenset((_ACK, _ERROR))


@dataclass(frozen=True, slots=True)
class Ready:
    """The agent's READY (code 8): it is ready for commands. Reported once per connection."""


@dataclass(frozen=True, slots=True)
class Reply:
    """ACK (``ok``) or ERROR (not ``ok``) for ``command``, the code of the oldest command sent."""

    command: int
    ok: bool
    payload: bytes


@dataclass(frozen=True, slots=True)
class NextAck:
    """NEXT (code 14): the agent consumed ``count`` bytes of ctl input (hyperhq flow control)."""

    count: int


@dataclass(frozen=True, slots=True)
class AsyncEvent:
    """The dialect's PROCESSASYNCEVENT (hyperhq 23, CC 24): a process finished."""

    event: ProcessAsyncEvent


@dataclass(frozen=True, slots=True)
class UnexpectedReply:
    """A frame that is neither an expected reply nor an event.

    ACK/ERROR with no command pending, a second READY, or any other code from the agent. It never
    consumes a FIFO slot, so the replies of commands in flight stay matched.
    """

    code: int
    payload: bytes


HostEvent = Ready | Reply | NextAck | AsyncEvent | UnexpectedReply


def _next_count(payload: bytes) -> int:
    if len(payload) != _NEXT_PAYLOAD.size:
        raise RemoteProtocolError(
            f"NEXT payload must be {_NEXT_PAYLOAD.size} bytes, got {len(payload)}"
        )
    count: int = _NEXT_PAYLOAD.unpack(payload)[0]
    return count


class _CtlEndpoint:
    """Shared receive side: a CtlDecoder plus end-of-stream handling."""

    __slots__ = ("_closed", "_decoder", "dialect")

    def __init__(self, dialect: Dialect, max_frame: int) -> None:
        self.dialect = dialect
        self._decoder = CtlDecoder(max_frame)
        self._closed = False

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the ctl socket; ``b""`` means the peer closed it."""
        if data:
            self._decoder.feed(data)
        else:
            self._closed = True

    def _next_frame(self) -> CtlFrame | None:
        frame = self._decoder.next_frame()
        if frame is None and self._closed and self._decoder.buffered:
            raise RemoteProtocolError(
                f"ctl channel closed in the middle of a frame ({self._decoder.buffered} bytes)"
            )
        return frame


class HostCtlConnection(_CtlEndpoint):
    """The host end of the ctl channel.

    ``send_command()`` returns the bytes to write and records a FIFO slot; ``next_event()``
    classifies what the agent sent:

    - the first READY -> :class:`Ready`;
    - ACK / ERROR with a command pending -> :class:`Reply` for the oldest pending command
      (in the CC dialect a PSCONTAINER's ACK payload is the ps output);
    - NEXT -> :class:`NextAck` (4-byte payload, else RemoteProtocolError);
    - the dialect's PROCESSASYNCEVENT code -> :class:`AsyncEvent` (bad JSON -> MessageError);
    - anything else -> :class:`UnexpectedReply`.

    Raises RemoteProtocolError for bad framing (sticky: the stream cannot be resynchronised) and
    for EOF in the middle of a frame. A bad NEXT or event payload raises too, but its frame is
    consumed: the next call goes on with the following frame.
    """

    __slots__ = ("_pending", "_ready_seen")

    def __init__(self, dialect: Dialect = CC, *, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        super().__init__(dialect, max_frame)
        self._pending: deque[int] = deque()
        self._ready_seen = False

    @property
    def pending(self) -> int:
        """Commands sent whose ACK/ERROR has not arrived yet."""
        return len(self._pending)

    @property
    def ready_seen(self) -> bool:
        """Whether the agent's READY has been reported."""
        return self._ready_seen

    def send_command(self, code: int, payload: bytes = b"", *, limit: int | None = None) -> bytes:
        """Return the frame for command ``code`` and expect one reply for it.

        ``limit`` caps the frame size (LocalProtocolError ``message too long``; no slot is
        recorded then).
        """
        frame = encode_ctl(code, payload, limit=limit)
        self._pending.append(code)
        return frame

    def next_event(self) -> HostEvent | _NeedData:
        """Return the next event, or NEED_DATA when more bytes are needed."""
        frame = self._next_frame()
        if frame is None:
            return NEED_DATA
        code = frame.code
        if code in _REPLY_CODES:
            if self._pending:
                return Reply(self._pending.popleft(), code == _ACK, frame.payload)
            return UnexpectedReply(code, frame.payload)
        if code == _NEXT:
            return NextAck(_next_count(frame.payload))
        if code == self.dialect.process_async_event:
            return AsyncEvent(decode_message(ProcessAsyncEvent, frame.payload, self.dialect))
        if code == _READY and not self._ready_seen:
            self._ready_seen = True
            return Ready()
        return UnexpectedReply(code, frame.payload)


class AgentCtlConnection(_CtlEndpoint):
    """The agent end of the ctl channel (what hyperd-sim speaks).

    ``next_event()`` returns each command frame from the host as a :class:`CtlFrame`; the
    ``send_*`` methods return the bytes of the agent's messages. Replying once per command, in
    order, is the caller's job.
    """

    __slots__ = ()

    def __init__(self, dialect: Dialect = CC, *, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        super().__init__(dialect, max_frame)

    def next_event(self) -> CtlFrame | _NeedData:
        """Return the next command frame, or NEED_DATA. Raises RemoteProtocolError."""
        frame = self._next_frame()
        return NEED_DATA if frame is None else frame

    def send_ready(self) -> bytes:
        """READY with an empty payload."""
        return _READY_FRAME

    def send_ack(self, payload: bytes = b"") -> bytes:
        """ACK carrying the command's result (often empty)."""
        return encode_ctl(_ACK, payload)

    def send_error(self, payload: bytes = b"") -> bytes:
        """ERROR (cc-agent: UTF-8 text; hyperhq: empty or NUL-terminated text)."""
        return encode_ctl(_ERROR, payload)

    def send_next(self, count: int) -> bytes:
        """NEXT acknowledging ``count`` bytes read (hyperhq sends one per read)."""
        if not 0 <= count <= _MAX_U32:
            raise LocalProtocolError(f"NEXT count {count} does not fit in a u32")
        return encode_ctl(_NEXT, _NEXT_PAYLOAD.pack(count))

    def send_event(self, event: ProcessAsyncEvent) -> bytes:
        """The dialect's PROCESSASYNCEVENT carrying ``event``."""
        return encode_ctl(self.dialect.process_async_event, encode_message(event, self.dialect))
