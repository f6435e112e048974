"""The two ends of a ttrpc connection, without I/O.

ttrpc 1.1 (containerd 1.6) has unary calls only: a client sends a REQUEST on a fresh odd stream
id (1, 3, 5, ...), the server answers one RESPONSE on the same id, and calls are multiplexed on
one connection, so responses may come in any order.

:class:`ServerConnection` mirrors the Go server: a request on an even stream id becomes
:class:`InvalidStream` and a message longer than the maximum becomes :class:`TooLarge` (the
server answers both with an error status on that stream and keeps serving); messages of other
types are ignored. :class:`ClientConnection` allocates stream ids and accepts only responses to
calls it made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from protocol import NEED_DATA, _NeedData
from protocol.errors import LocalProtocolError
from protocol.ttrpc.frames import (
    MAX_DATA,
    MAX_STREAM_ID,
    Frame,
    FrameDecoder,
    FrameError,
    MessageType,
    OversizedFrame,
    encode_frame,
)

_REQUEST: Final = int(MessageType.REQUEST)
_RESPONSE: Final = int(MessageType.RESPONSE)


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """A whole request (server side); ``data`` is the serialized ``ttrpc.Request``."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """A whole response to one of our calls (client side); ``data`` is a ``ttrpc.Response``."""

    stream_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class InvalidStream:
    """A request on a stream id a client may not use (even, or 0). Answer INVALID_ARGUMENT."""

    stream_id: int
    message: str


@dataclass(frozen=True, slots=True)
class TooLarge:
    """A message over the maximum on ``stream_id``; its data was dropped. A server answers
    RESOURCE_EXHAUSTED with :attr:`message`; a client fails that call."""

    stream_id: int
    length: int
    max_data: int

    @property
    def message(self) -> str:
        """ttrpc's own text for it."""
        return f"message length {self.length} exceed maximum message size of {self.max_data}"


ServerEvent = RequestReceived | InvalidStream | TooLarge
ClientEvent = ResponseReceived | TooLarge


class ServerConnection:
    """A server's view of one client connection."""

    def __init__(self, max_data: int = MAX_DATA) -> None:
        self._decoder = FrameDecoder(max_data)
        self.ignored = 0  # messages of other types, dropped as the Go server does

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._decoder.feed(data)

    def next_event(self) -> ServerEvent | _NeedData:
        while True:
            frame = self._decoder.next_frame()
            if isinstance(frame, _NeedData):
                return NEED_DATA
            if frame.type != _REQUEST:
                self.ignored += 1
                continue
            if frame.stream_id % 2 == 0:
                return InvalidStream(
                    frame.stream_id, "StreamID must be odd for client initiated streams"
                )
            if isinstance(frame, OversizedFrame):
                return TooLarge(frame.stream_id, frame.length, self._decoder.max_data)
            assert isinstance(frame, Frame)
            return RequestReceived(frame.stream_id, frame.data)

    def send_response(self, stream_id: int, data: bytes) -> bytes:
        """The bytes of a response on ``stream_id``; raises :class:`LocalProtocolError` when
        ``data`` is over the maximum (answer an error status instead)."""
        return encode_frame(stream_id, _RESPONSE, data)


class ClientConnection:
    """A client's end: odd stream ids from 1, responses matched to outstanding calls."""

    def __init__(self, max_data: int = MAX_DATA) -> None:
        self._decoder = FrameDecoder(max_data)
        self._next_id = 1
        self._pending: set[int] = set()
        self._late: set[int] = set()  # calls given up on, whose answers are still to come

    @property
    def outstanding(self) -> int:
        """Calls sent and not answered."""
        return len(self._pending)

    def send_request(self, data: bytes) -> tuple[int, bytes]:
        """A new call: its stream id and the bytes to write."""
        stream_id = self._next_id
        if stream_id > MAX_STREAM_ID:
            raise LocalProtocolError("stream ids exhausted on this connection")
        frame = encode_frame(stream_id, _REQUEST, data)
        self._next_id += 2
        self._pending.add(stream_id)
        return stream_id, frame

    def forget(self, stream_id: int) -> None:
        """Stop expecting an answer on ``stream_id`` (its caller gave up); a late answer is
        then dropped."""
        self._pending.discard(stream_id)
        self._late.add(stream_id)

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        self._decoder.feed(data)

    def next_event(self) -> ClientEvent | _NeedData:
        """The next response; raises :class:`FrameError` for a message that is not the answer
        to an outstanding call."""
        while True:
            frame = self._decoder.next_frame()
            if isinstance(frame, _NeedData):
                return NEED_DATA
            if frame.type != _RESPONSE:
                raise FrameError(f"unexpected message type {frame.type} from a ttrpc server")
            if frame.stream_id not in self._pending:
                if frame.stream_id in self._late:
                    self._late.discard(frame.stream_id)
                    continue
                raise FrameError(f"response on stream {frame.stream_id}, which has no call")
            self._pending.discard(frame.stream_id)
            if isinstance(frame, OversizedFrame):
                return TooLarge(frame.stream_id, frame.length, self._decoder.max_data)
            assert isinstance(frame, Frame)
            return ResponseReceived(frame.stream_id, frame.data)
