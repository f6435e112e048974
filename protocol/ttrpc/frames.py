"""ttrpc frame codec: a 10-byte header and at most :data:`MAX_DATA` bytes of data.

:class:`FrameDecoder` accepts any split of its input. A header announcing more than the
decoder's maximum is not an error of the connection (ttrpc's Go receiver discards such a message
and answers RESOURCE_EXHAUSTED on its stream): the decoder reports an :class:`OversizedFrame`
event at once and then drops the message's data as it arrives, never buffering it.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import Final

from protocol import NEED_DATA, _NeedData
from protocol.errors import LocalProtocolError, RemoteProtocolError

HEADER_SIZE: Final = 10
MAX_DATA: Final = 4 << 20  # ttrpc's messageLengthMax: 4 MiB of data per message
MAX_STREAM_ID: Final = (1 << 32) - 1  # the header's u32

_HEADER: Final = struct.Struct(">IIBB")
"""data length, stream id, message type, flags."""


class MessageType(enum.IntEnum):
    """The header's type byte. containerd 1.6 (ttrpc 1.1) sends only requests and responses;
    DATA belongs to ttrpc >= 1.2 streaming."""

    REQUEST = 1
    RESPONSE = 2
    DATA = 3


class FrameError(RemoteProtocolError):
    """The peer sent bytes that are not ttrpc; the message names the fault."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One whole ttrpc message. ``type`` is the raw type byte (unknown ones are passed on)."""

    stream_id: int
    type: int
    flags: int
    data: bytes


@dataclass(frozen=True, slots=True)
class OversizedFrame:
    """A message whose header announced ``length`` > the maximum; its data is being dropped."""

    stream_id: int
    type: int
    length: int


def encode_frame(stream_id: int, msg_type: int, data: bytes, flags: int = 0) -> bytes:
    """Header + ``data``; raises :class:`LocalProtocolError` for what the wire cannot carry."""
    if len(data) > MAX_DATA:
        raise LocalProtocolError(
            f"message length {len(data)} exceeds the maximum message size of {MAX_DATA}"
        )
    if not 0 <= stream_id <= MAX_STREAM_ID:
        raise LocalProtocolError(f"stream id {stream_id} does not fit 32 bits")
    if not 0 <= msg_type <= 0xFF or not 0 <= flags <= 0xFF:
        raise LocalProtocolError(f"message type {msg_type} or flags {flags} do not fit a byte")
    return _HEADER.pack(len(data), stream_id, msg_type, flags) + data


class FrameDecoder:
    """Incremental decoder: ``feed(bytes)``, then ``next_frame()`` until ``NEED_DATA``.

    Memory: at most one header plus ``max_data`` bytes of a message are held beyond what the
    caller has fed and not yet drained.
    """

    def __init__(self, max_data: int = MAX_DATA) -> None:
        if max_data < 0:
            raise ValueError("max_data must not be negative")
        self.max_data = max_data
        self._buf = bytearray()
        self._skip = 0  # data bytes of an oversized message still to drop

    @property
    def buffered(self) -> int:
        """Bytes held and not yet returned as a frame."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = memoryview(data)[dropped:]
        self._buf += data

    def next_frame(self) -> Frame | OversizedFrame | _NeedData:
        """The next whole message, an :class:`OversizedFrame`, or ``NEED_DATA``."""
        if self._skip:
            dropped = min(self._skip, len(self._buf))
            del self._buf[:dropped]
            self._skip -= dropped
            if self._skip:
                return NEED_DATA
        if len(self._buf) < HEADER_SIZE:
            return NEED_DATA
        length, stream_id, msg_type, flags = _HEADER.unpack_from(self._buf)
        if length > self.max_data:
            del self._buf[:HEADER_SIZE]
            dropped = min(length, len(self._buf))
            del self._buf[:dropped]
            self._skip = length - dropped
            return OversizedFrame(stream_id, msg_type, length)
        end = HEADER_SIZE + length
        if len(self._buf) < end:
            return NEED_DATA
        data = bytes(self._buf[HEADER_SIZE:end])
        del self._buf[:end]
        return Frame(stream_id, msg_type, flags, data)
