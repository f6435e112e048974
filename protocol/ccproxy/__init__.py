"""Sans-IO implementation of the Clear Containers proxy protocol, version 2.

- :mod:`.constants` -- version, sizes, frame types and opcodes;
- :mod:`.frames` -- :func:`encode_frame` and the incremental :class:`FrameDecoder`;
- :mod:`.payloads` -- the JSON payload Structs, encoded and decoded as Go does;
- :mod:`.events` and :mod:`.connection` -- :class:`ClientConnection` (runtime or shim) and
  :class:`ServerConnection` (a proxy's view of one client). ``ClientConnection.next_payload``
  (and ``FrameDecoder.next_payload_of`` under it) is the fast path of ``next_event`` for the
  common event, a success response, returning its payload without building an event object.

hyperd's extension (never sent by the reference cc-proxy): ``exitNotifications`` in
RegisterVM/AttachVM and their response, and the ``VM_PROCESS_EXITED`` notification (opcode 1,
a JSON :class:`ProcessExitNotice`) that a proxy sends to a runtime connection that asked for it
(``ClientConnection(exit_notifications=True)`` accepts it, as :class:`VMProcessExited`).

Only the standard library and msgspec are imported; nothing here performs I/O.
"""

from __future__ import annotations

from protocol.ccproxy.connection import UNKNOWN_ERROR, ClientConnection, Role, ServerConnection
from protocol.ccproxy.constants import (
    HEADER_SIZE,
    MAX_HEADER_SIZE,
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
from protocol.ccproxy.frames import Frame, FrameDecoder, FrameError, encode_frame
from protocol.ccproxy.payloads import (
    PAYLOAD_TYPES,
    AttachVM,
    ConnectShim,
    ErrorResponse,
    Hyper,
    IOResponse,
    LogEntry,
    PayloadError,
    ProcessExitNotice,
    RegisterVM,
    Signal,
    UnregisterVM,
    VMResponse,
    decode_payload,
    encode_payload,
)

__all__ = [
    "HEADER_SIZE",
    "MAX_HEADER_SIZE",
    "MAX_PAYLOAD",
    "PAYLOAD_TYPES",
    "UNKNOWN_ERROR",
    "VERSION",
    "AttachVM",
    "ClientConnection",
    "Command",
    "CommandReceived",
    "ConnectShim",
    "ErrorReply",
    "ErrorResponse",
    "Frame",
    "FrameDecoder",
    "FrameError",
    "FrameType",
    "Hyper",
    "IOResponse",
    "LogEntry",
    "Notification",
    "PayloadError",
    "ProcessExitNotice",
    "ProcessExited",
    "RegisterVM",
    "Response",
    "Role",
    "ServerConnection",
    "Signal",
    "Stream",
    "StreamData",
    "StreamReceived",
    "UnregisterVM",
    "VMProcessExited",
    "VMResponse",
    "decode_payload",
    "encode_frame",
    "encode_payload",
]
