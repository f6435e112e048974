"""Frame codec of the cc-proxy protocol version 2 (spec §2).

A frame is a big-endian header -- version (u16), header length in 32-bit words (u8), three
reserved bytes, flags|type (u8), opcode (u8), payload length (u32) -- followed by the payload.
:func:`encode_frame` always writes version 2 with a 12-byte header; :class:`FrameDecoder` accepts
any split of its input, skips header bytes beyond the 12 it understands, and refuses a payload
longer than its maximum as soon as the header announces it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from protocol.ccproxy.constants import (
    ERROR_FLAG,
    HEADER_SIZE,
    HEADER_WORDS,
    MAX_HEADER_SIZE,
    MAX_PAYLOAD,
    OPCODES,
    TYPE_MASK,
    VERSION,
    FrameType,
)
from protocol.errors import LocalProtocolError, RemoteProtocolError

_HEADER: Final = struct.Struct(">HBxxxBBI")
"""version, header words, 3 reserved bytes, flags|type, opcode, payload length."""

_TYPES: Final = tuple(FrameType)
"""FrameType by value, indexed without the cost of an enum lookup."""

_OPCODE_COUNT: Final = tuple(len(OPCODES[t]) for t in _TYPES)

_COPY_VIA_VIEW: Final = 2048
"""Payloads at least this long are copied once through a memoryview; shorter ones are sliced
(two copies, but cheaper than setting up a view)."""


class FrameError(RemoteProtocolError):
    """The peer sent a frame the protocol does not allow; the message names the fault.

    The reference proxy closes the connection on any of these, without an error frame.
    """


@dataclass(frozen=True, slots=True)
class Frame:
    """One protocol frame. ``opcode`` is interpreted according to ``type`` (spec §3)."""

    type: FrameType
    opcode: int
    payload: bytes = b""
    error: bool = False


def encode_raw(frame_type: int, opcode: int, payload: bytes, error: bool = False) -> bytes:
    """Encode one frame from its parts (the hot path of :func:`encode_frame`).

    Raises :class:`LocalProtocolError` for an unknown type, an out-of-range opcode or a payload
    longer than :data:`MAX_PAYLOAD`.
    """
    if not 0 <= frame_type < len(_TYPES):
        raise LocalProtocolError(f"unknown frame type {frame_type}")
    if not 0 <= opcode < _OPCODE_COUNT[frame_type]:
        raise LocalProtocolError(
            f"opcode {opcode} out of range for {_TYPES[frame_type].name.lower()} frames"
        )
    size = len(payload)
    if size > MAX_PAYLOAD:
        raise LocalProtocolError(f"payload of {size} bytes exceeds the maximum {MAX_PAYLOAD}")
    header = _HEADER.pack(
        VERSION, HEADER_WORDS, frame_type | ERROR_FLAG if error else frame_type, opcode, size
    )
    return header + payload if size else header


def encode_frame(frame: Frame) -> bytes:
    """Return the wire bytes of ``frame``: version 2, a 12-byte header, then the payload.

    Raises :class:`LocalProtocolError` if the opcode is out of range for the type or the payload
    is longer than :data:`MAX_PAYLOAD`.
    """
    return encode_raw(frame.type, frame.opcode, frame.payload, frame.error)


class FrameDecoder:
    """Incremental frame reader.

    ``feed()`` bytes split anywhere, then call ``next_frame()`` until it returns ``None``. The
    header is validated as soon as its 12 bytes are in: version 2, header length >= 3 words,
    type < 4, opcode within the type's range, payload length <= ``max_payload``; a violation
    raises :class:`FrameError`, and every later call raises the same error again (the stream
    cannot be resynchronised). Bytes still buffered after ``next_frame()`` returned ``None``
    never exceed :data:`MAX_HEADER_SIZE` + ``max_payload``.
    """

    __slots__ = ("_buffer", "_error", "_max_payload", "_pos")

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        if max_payload < 0:
            raise ValueError("max_payload must not be negative")
        self._max_payload = max_payload
        self._buffer = bytearray()
        self._pos = 0  # start of the first unconsumed byte; the prefix is deleted in one go
        self._error: FrameError | None = None

    @property
    def max_payload(self) -> int:
        """Largest payload length accepted."""
        return self._max_payload

    @property
    def buffered(self) -> int:
        """Number of received bytes not yet returned as frames."""
        return len(self._buffer) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes. After a :class:`FrameError` the bytes are discarded."""
        if self._error is None:
            self._buffer += data

    def next_frame(self) -> Frame | None:
        """Return the next complete frame, or ``None`` if more bytes are needed.

        Raises :class:`FrameError` (a :class:`RemoteProtocolError`) on an invalid header.
        """
        if self._error is not None:
            raise FrameError(*self._error.args)
        buffer = self._buffer
        pos = self._pos
        available = len(buffer) - pos
        if available < HEADER_SIZE:
            self._compact()
            return None
        version, words, flags, opcode, size = _HEADER.unpack_from(buffer, pos)
        frame_type = flags & TYPE_MASK
        if (
            version != VERSION
            or words < HEADER_WORDS
            or frame_type >= len(_TYPES)
            or opcode >= _OPCODE_COUNT[frame_type]
            or size > self._max_payload
        ):
            self._fail(version, words, frame_type, opcode, size)
        start = pos + 4 * words
        end = start + size
        if end - pos > available:
            self._compact()
            return None
        if size < _COPY_VIA_VIEW:
            payload = bytes(buffer[start:end])
        else:
            with memoryview(buffer) as view:
                payload = bytes(view[start:end])
        self._pos = end
        if end == len(buffer):
            buffer.clear()
            self._pos = 0
        return Frame(_TYPES[frame_type], opcode, payload, bool(flags & ERROR_FLAG))

    def next_payload_of(self, frame_type: int, opcode: int) -> bytes | None:
        """Fast path of :meth:`next_frame` for a frame the caller expects.

        If the next frame is complete, has the standard 12-byte version 2 header, ``frame_type``
        with no flags set, ``opcode`` and a payload within the maximum, consume it and return its
        payload (no :class:`Frame` is built). Otherwise consume nothing and return ``None``:
        :meth:`next_frame` then returns that frame, ``None`` (more bytes needed) or raises.
        """
        buffer = self._buffer
        pos = self._pos
        if len(buffer) - pos < HEADER_SIZE or self._error is not None:
            return None
        version, words, flags, op, size = _HEADER.unpack_from(buffer, pos)
        if (
            flags != frame_type
            or op != opcode
            or words != HEADER_WORDS
            or version != VERSION
            or size > self._max_payload
        ):
            return None
        start = pos + HEADER_SIZE
        end = start + size
        if end > len(buffer):
            return None
        if not size:
            payload = b""
        elif size < _COPY_VIA_VIEW:
            payload = bytes(buffer[start:end])
        else:
            with memoryview(buffer) as view:
                payload = bytes(view[start:end])
        if end == len(buffer):
            buffer.clear()
            self._pos = 0
        else:
            self._pos = end
        return payload

    def _compact(self) -> None:
        if self._pos:
            del self._buffer[: self._pos]
            self._pos = 0

    def _fail(self, version: int, words: int, frame_type: int, opcode: int, size: int) -> None:
        if version != VERSION:
            message = f"unsupported protocol version {version} (expected {VERSION})"
        elif words < HEADER_WORDS:
            message = f"header length of {words} words is below the minimum {HEADER_WORDS}"
        elif frame_type >= len(_TYPES):
            message = f"unknown frame type {frame_type}"
        elif opcode >= _OPCODE_COUNT[frame_type]:
            message = (
                f"opcode {opcode} out of range for {_TYPES[frame_type].name.lower()} frames"
                f" (at most {_OPCODE_COUNT[frame_type] - 1})"
            )
        else:
            message = f"payload length {size} exceeds the maximum {self._max_payload}"
        self._error = FrameError(message)
        self._buffer = bytearray()
        self._pos = 0
        raise self._error


__all__ = ["MAX_HEADER_SIZE", "Frame", "FrameDecoder", "FrameError", "encode_frame", "encode_raw"]
