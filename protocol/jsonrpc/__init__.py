"""JSON-RPC 2.0, sans-IO: message objects, error codes, newline-delimited framing.

Receiving::

    framer = LineFramer(max_message=MAX_MESSAGE)
    framer.feed(data)                       # any split of the stream
    while True:
        try:
            line = framer.next_line()       # None: need more bytes
        except MessageTooLarge as err:      # line dropped; answer err.error_object() with id null
            ...
            continue
        if line is None:
            break
        parsed = parse_message(line)        # never raises

``parse_message`` returns a :class:`Request`, :class:`Notification`, :class:`Response`, an
:class:`InvalidMessage` (bad JSON / not a JSON-RPC 2.0 message / empty batch: answer its
``response()``), or a non-empty list of those for a batch.

Sending: ``encode_message(msg)`` gives one JSON text plus ``b"\\n"``; ``make_error(code, detail,
id=...)`` builds an error response with the spec's message and ``data.kind``.

Errors: :class:`MessageTooLarge` is a :class:`protocol.RemoteProtocolError`; encoding something
invalid raises :class:`protocol.LocalProtocolError`. Nothing else is raised on any input.
"""

from protocol.jsonrpc.framing import MAX_MESSAGE, LineFramer, MessageTooLarge
from protocol.jsonrpc.messages import (
    APPLICATION_ERROR_MAX,
    APPLICATION_ERROR_MIN,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    STANDARD_MESSAGES,
    VERSION,
    ErrorObject,
    Id,
    InvalidMessage,
    Message,
    Notification,
    Params,
    Parsed,
    Request,
    Response,
    encode_message,
    is_application_code,
    make_error,
    parse_incoming,
    parse_message,
)

__all__ = [
    "APPLICATION_ERROR_MAX",
    "APPLICATION_ERROR_MIN",
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "MAX_MESSAGE",
    "METHOD_NOT_FOUND",
    "PARSE_ERROR",
    "STANDARD_MESSAGES",
    "VERSION",
    "ErrorObject",
    "Id",
    "InvalidMessage",
    "LineFramer",
    "Message",
    "MessageTooLarge",
    "Notification",
    "Params",
    "Parsed",
    "Request",
    "Response",
    "encode_message",
    "is_application_code",
    "make_error",
    "parse_incoming",
    "parse_message",
]
