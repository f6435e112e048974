"""Framing of the two hyperstart channels (spec sections 2 and 6.1), sans I/O.

ctl frame: ``u32 code | u32 length | payload``; tty frame: ``u64 seq | u32 length | data``.
Both lengths count the header too, and both integers are big-endian. The decoders accept any
split of the byte stream, check a frame's length against a named maximum as soon as its header is
complete (before buffering its body), and delete one prefix of their buffer per frame.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from protocol.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "CTL_HEADER_SIZE",
    "DEFAULT_MAX_FRAME",
    "HYPER_CHUNK",
    "MAX_CTL_FRAME",
    "MAX_TTY_FRAME_HYPER",
    "TTY_HEADER_SIZE",
    "CtlDecoder",
    "CtlFrame",
    "CtlFrameError",
    "TtyDecoder",
    "TtyFrame",
    "TtyFrameError",
    "encode_ctl",
    "encode_tty",
]

CTL_HEADER_SIZE: Final = 8  # u32 code + u32 total length
TTY_HEADER_SIZE: Final = 12  # u64 seq + u32 total length
MAX_CTL_FRAME: Final = 10240  # the CC host writer (WriteCtlMessage) refuses longer frames
MAX_TTY_FRAME_HYPER: Final = 4096  # hyperhq's tty read buffer; a longer frame kills the agent
HYPER_CHUNK: Final = 512  # runv writes at most this much ctl data per NEXT-acknowledged chunk
DEFAULT_MAX_FRAME: Final = 1 << 20  # decoders refuse longer frames: bounds what a peer can buffer
_MAX_U32: Final = 0xFFFFFFFF
_MAX_U64: Final = 0xFFFFFFFFFFFFFFFF

_CTL_HEADER: Final = struct.Struct(">II")
_TTY_HEADER: Final = struct.Struct(">QI")


class CtlFrameError(RemoteProtocolError):
    """The peer sent a ctl frame header that cannot be valid (length below 8 or too large)."""


class TtyFrameError(RemoteProtocolError):
    """The peer sent a tty frame header that cannot be valid (length below 12 or too large)."""


@dataclass(frozen=True, slots=True)
class CtlFrame:
    """One ctl message: a code (:class:`~protocol.hyperstart.Code` or dialect code) and payload."""

    code: int
    payload: bytes = b""


@dataclass(frozen=True, slots=True)
class TtyFrame:
    """One tty message: stream sequence number and data (empty data = EOF)."""

    seq: int
    data: bytes = b""


def encode_ctl(code: int, payload: bytes = b"", *, limit: int | None = None) -> bytes:
    """Return the bytes of one ctl frame.

    Raises LocalProtocolError if ``code`` is not a u32, or ``"message too long"`` if the frame
    would exceed ``limit`` bytes (pass :data:`MAX_CTL_FRAME` to act as the CC host writer) or the
    u32 length field.
    """
    length = CTL_HEADER_SIZE + len(payload)
    if limit is not None and length > limit:
        raise LocalProtocolError(f"message too long: ctl frame of {length} bytes > {limit}")
    if length > _MAX_U32:
        raise LocalProtocolError(f"message too long: ctl frame of {length} bytes")
    if not 0 <= code <= _MAX_U32:
        raise LocalProtocolError(f"ctl code {code} does not fit in a u32")
    return _CTL_HEADER.pack(code, length) + payload


def encode_tty(seq: int, data: bytes = b"") -> bytes:
    """Return the bytes of one tty frame (``data`` empty = EOF). Raises LocalProtocolError."""
    length = TTY_HEADER_SIZE + len(data)
    if length > _MAX_U32:
        raise LocalProtocolError(f"message too long: tty frame of {length} bytes")
    if not 0 <= seq <= _MAX_U64:
        raise LocalProtocolError(f"tty seq {seq} does not fit in a u64")
    return _TTY_HEADER.pack(seq, length) + data


def _length_fault(channel: str, what: str, length: int, header: int, max_frame: int) -> str:
    if length < header:
        return f"{channel} frame length {length} ({what}) is below the {header}-byte header"
    return f"{channel} frame length {length} ({what}) exceeds the maximum {max_frame}"


def _check_max(max_frame: int, header_size: int) -> int:
    if max_frame < header_size:
        raise ValueError(f"max_frame {max_frame} is below the {header_size}-byte header")
    return max_frame


class CtlDecoder:
    """Splits a ctl byte stream into :class:`CtlFrame` objects.

    ``feed()`` appends bytes; ``next_frame()`` returns the next complete frame or ``None`` when
    more bytes are needed. A bad header raises :class:`CtlFrameError`, and every later call
    raises it again (the stream cannot be resynchronised).
    """

    __slots__ = ("_buffer", "_error", "max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = _check_max(max_frame, CTL_HEADER_SIZE)
        self._buffer = bytearray()
        self._error: CtlFrameError | None = None

    def feed(self, data: bytes) -> None:
        """Append received bytes (any split)."""
        self._buffer += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buffer)

    def next_frame(self) -> CtlFrame | None:
        """Return the next frame, ``None`` if incomplete; raise :class:`CtlFrameError`."""
        if self._error is not None:
            raise self._error
        buffer = self._buffer
        if len(buffer) < CTL_HEADER_SIZE:
            return None
        code, length = _CTL_HEADER.unpack_from(buffer)
        if length < CTL_HEADER_SIZE or length > self.max_frame:
            self._error = CtlFrameError(
                _length_fault("ctl", f"code {code}", length, CTL_HEADER_SIZE, self.max_frame)
            )
            raise self._error
        if len(buffer) < length:
            return None
        payload = bytes(buffer[CTL_HEADER_SIZE:length])
        del buffer[:length]
        return CtlFrame(code, payload)


class TtyDecoder:
    """Splits a tty byte stream into :class:`TtyFrame` objects (same contract as CtlDecoder)."""

    __slots__ = ("_buffer", "_error", "max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = _check_max(max_frame, TTY_HEADER_SIZE)
        self._buffer = bytearray()
        self._error: TtyFrameError | None = None

    def feed(self, data: bytes) -> None:
        """Append received bytes (any split)."""
        self._buffer += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buffer)

    def next_frame(self) -> TtyFrame | None:
        """Return the next frame, ``None`` if incomplete; raise :class:`TtyFrameError`."""
        if self._error is not None:
            raise self._error
        buffer = self._buffer
        if len(buffer) < TTY_HEADER_SIZE:
            return None
        seq, length = _TTY_HEADER.unpack_from(buffer)
        if length < TTY_HEADER_SIZE or length > self.max_frame:
            self._error = TtyFrameError(
                _length_fault("tty", f"seq {seq}", length, TTY_HEADER_SIZE, self.max_frame)
            )
            raise self._error
        if len(buffer) < length:
            return None
        data = bytes(buffer[TTY_HEADER_SIZE:length])
        del buffer[:length]
        return TtyFrame(seq, data)
