"""Sans-IO ttrpc framing, as spoken by containerd 1.6 (containerd/ttrpc v1.1.1).

A ttrpc message is a 10-byte big-endian header -- data length (u32), stream id (u32), message
type (u8), flags (u8) -- followed by the data, at most :data:`MAX_DATA` bytes. The data of a
request or a response is a protobuf ``ttrpc.Request`` / ``ttrpc.Response``; encoding those is the
caller's business (``hyperd.shim.proto``), so this package stays stdlib-only.

- :mod:`.frames` -- :func:`encode_frame` and the incremental :class:`FrameDecoder`;
- :mod:`.connection` -- :class:`ServerConnection` (odd client stream ids, oversized and
  misdirected messages turned into events the server answers) and :class:`ClientConnection`
  (allocates odd stream ids, matches responses).

Nothing here performs I/O.
"""

from __future__ import annotations

from protocol.ttrpc.connection import (
    ClientConnection,
    InvalidStream,
    RequestReceived,
    ResponseReceived,
    ServerConnection,
    TooLarge,
)
from protocol.ttrpc.frames import (
    HEADER_SIZE,
    MAX_DATA,
    Frame,
    FrameDecoder,
    FrameError,
    MessageType,
    OversizedFrame,
    encode_frame,
)

__all__ = [
    "HEADER_SIZE",
    "MAX_DATA",
    "ClientConnection",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "InvalidStream",
    "MessageType",
    "OversizedFrame",
    "RequestReceived",
    "ResponseReceived",
    "ServerConnection",
    "TooLarge",
    "encode_frame",
]
