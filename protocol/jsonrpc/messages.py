"""JSON-RPC 2.0 message objects, error codes, and the parser/encoder of one message line.

Envelopes are msgspec Structs whose optional members default to ``msgspec.UNSET`` (omitted on
the wire) while ``"jsonrpc": "2.0"`` is always emitted. Parsing never raises: anything malformed
becomes an :class:`InvalidMessage` value carrying the error object (and the id when one could be
read) that a server answers with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

import msgspec
from msgspec import UNSET, UnsetType

from protocol import jsonerrors
from protocol.errors import LocalProtocolError

VERSION: Final = "2.0"

PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
APPLICATION_ERROR_MIN: Final = -32099
"""Lowest code of the range the spec reserves for implementation-defined server errors."""
APPLICATION_ERROR_MAX: Final = -32000
"""Highest code of that range; hyperd's application codes live in it."""

STANDARD_MESSAGES: Final = {
    PARSE_ERROR: "Parse error",
    INVALID_REQUEST: "Invalid Request",
    METHOD_NOT_FOUND: "Method not found",
    INVALID_PARAMS: "Invalid params",
    INTERNAL_ERROR: "Internal error",
}
"""The spec's message text of each standard code."""

_KINDS: Final = {
    PARSE_ERROR: "parse_error",
    INVALID_REQUEST: "invalid_request",
    METHOD_NOT_FOUND: "method_not_found",
    INVALID_PARAMS: "invalid_params",
    INTERNAL_ERROR: "internal",
}

Id: TypeAlias = int | str | None
Params: TypeAlias = dict[str, Any] | list[Any]


def is_application_code(code: int) -> bool:
    """Whether ``code`` is in the implementation-defined server error range."""
    return APPLICATION_ERROR_MIN <= code <= APPLICATION_ERROR_MAX


class Request(msgspec.Struct, frozen=True, kw_only=True):
    """A call that expects a response with the same ``id``."""

    jsonrpc: Literal["2.0"] = VERSION
    method: str
    params: Params | UnsetType = UNSET
    id: Id


class Notification(msgspec.Struct, frozen=True, kw_only=True):
    """A call without ``id``: never answered."""

    jsonrpc: Literal["2.0"] = VERSION
    method: str
    params: Params | UnsetType = UNSET


class ErrorObject(msgspec.Struct, frozen=True, kw_only=True):
    """The ``error`` member of an error response."""

    code: int
    message: str
    data: Any = UNSET


class Response(msgspec.Struct, frozen=True, kw_only=True):
    """The answer to a request: exactly one of ``result`` (may be ``None``) and ``error``.

    Constructing one with both or neither raises :class:`LocalProtocolError`.
    """

    jsonrpc: Literal["2.0"] = VERSION
    result: Any = UNSET
    error: ErrorObject | UnsetType = UNSET
    id: Id

    def __post_init__(self) -> None:
        if (self.result is UNSET) == (self.error is UNSET):
            raise LocalProtocolError("a response carries exactly one of result and error")


def make_error(code: int, detail: str = "", *, id: Id = None, **data: Any) -> Response:
    """An error response with a standard code: its spec message (plus ``detail``), ``data.kind``."""
    message = STANDARD_MESSAGES.get(code, "Server error")
    if detail:
        message = f"{message}: {detail}"
    kind = _KINDS.get(code, "error")
    return Response(
        id=id, error=ErrorObject(code=code, message=message, data={"kind": kind, **data})
    )


@dataclass(frozen=True, slots=True)
class InvalidMessage:
    """A received message that is not valid JSON-RPC 2.0.

    ``error`` is what to answer with; ``id`` is the message's id when it could be read, else
    ``None``. Servers answer ``response()``; clients treat it as a protocol violation by the server.
    """

    error: ErrorObject
    id: Id = None

    def response(self) -> Response:
        """The error response to send back."""
        return Response(id=self.id, error=self.error)


Message: TypeAlias = Request | Notification | Response
Parsed: TypeAlias = Message | InvalidMessage


def _invalid(code: int, detail: str, id: Id = None) -> InvalidMessage:
    error = make_error(code, detail).error
    assert isinstance(error, ErrorObject)
    return InvalidMessage(error=error, id=id)


def _is_id(value: object) -> bool:
    return (
        value is None
        or isinstance(value, str)
        or (isinstance(value, int) and not isinstance(value, bool))
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_error_object(value: object) -> ErrorObject | None:
    if not isinstance(value, dict):
        return None
    code, message = value.get("code"), value.get("message")
    if not _is_int(code) or not isinstance(message, str):
        return None
    assert isinstance(code, int)
    return ErrorObject(code=code, message=message, data=value.get("data", UNSET))


def _parse_object(obj: object) -> Parsed:
    if not isinstance(obj, dict):
        return _invalid(INVALID_REQUEST, "not a JSON object")
    raw_id = obj.get("id")
    id = raw_id if _is_id(raw_id) else None
    if obj.get("jsonrpc") != VERSION:
        return _invalid(INVALID_REQUEST, 'member "jsonrpc" must be "2.0"', id)
    if "method" in obj:
        method = obj["method"]
        if not isinstance(method, str):
            return _invalid(INVALID_REQUEST, 'member "method" must be a string', id)
        params = obj.get("params", UNSET)
        if not (params is UNSET or isinstance(params, dict | list)):
            return _invalid(INVALID_REQUEST, 'member "params" must be an object or an array', id)
        if "id" not in obj:
            return Notification(method=method, params=params)
        if not _is_id(raw_id):
            return _invalid(INVALID_REQUEST, 'member "id" must be a string, an integer or null')
        return Request(method=method, params=params, id=id)
    if "result" in obj or "error" in obj:
        if "id" not in obj or not _is_id(raw_id):
            return _invalid(INVALID_REQUEST, 'a response needs an "id" (string, integer or null)')
        if "result" in obj and "error" in obj:
            return _invalid(INVALID_REQUEST, 'a response has both "result" and "error"', id)
        if "result" in obj:
            return Response(id=id, result=obj["result"])
        error = _parse_error_object(obj["error"])
        if error is None:
            return _invalid(INVALID_REQUEST, 'member "error" must be {code: int, message: str}', id)
        return Response(id=id, error=error)
    return _invalid(INVALID_REQUEST, 'neither a request ("method") nor a response', id)


_decoder: Final = msgspec.json.Decoder()
_encoder: Final = msgspec.json.Encoder()


def parse_message(line: bytes | bytearray) -> Parsed | list[Parsed]:
    """Parse one message line (a JSON text, without or with its newline); never raises.

    Returns a Request, Notification or Response; a non-empty list of them for a batch (each
    element parsed on its own); or an :class:`InvalidMessage`: bad JSON or invalid UTF-8 ->
    ``PARSE_ERROR``; valid JSON that is not a message, or an empty batch -> ``INVALID_REQUEST``
    (one InvalidMessage, not a list, for an empty batch).
    """
    try:
        value = _decoder.decode(line)
    except jsonerrors.DECODE_ERRORS as err:
        # bad JSON, invalid UTF-8, numbers out of range, nesting deeper than the interpreter
        # allows: described in hyperd's words, whatever msgspec release raised it.
        return _invalid(PARSE_ERROR, jsonerrors.describe(line, err))
    if isinstance(value, list):
        if not value:
            return _invalid(INVALID_REQUEST, "empty batch")
        return [_parse_object(item) for item in value]
    return _parse_object(value)


class _RequestLine(msgspec.Struct, frozen=True):
    """A request as it must arrive (every member the spec requires is required here)."""

    jsonrpc: Literal["2.0"]
    method: str
    id: Id
    params: Params | UnsetType = UNSET


_request_decoder: Final = msgspec.json.Decoder(_RequestLine)


def parse_incoming(line: bytes | bytearray) -> Parsed | list[Parsed]:
    """:func:`parse_message` for a server, whose lines are nearly all requests: a request (an
    object with ``jsonrpc`` "2.0", a string ``method``, object or array ``params`` if any, and
    an integer, string or null ``id``) is decoded straight into a :class:`Request`; anything
    else is parsed by :func:`parse_message`, with the same outcome."""
    try:
        line_ = _request_decoder.decode(line)
    except (msgspec.DecodeError, ValueError, RecursionError):
        return parse_message(line)
    return Request(method=line_.method, params=line_.params, id=line_.id)


def encode_message(msg: Message | list[Message] | list[Response]) -> bytes:
    """One JSON text for ``msg`` (or a batch) followed by ``b"\\n"``.

    Raises :class:`LocalProtocolError` for an empty batch or a value msgspec cannot encode.
    """
    if isinstance(msg, list) and not msg:
        raise LocalProtocolError("a batch must not be empty")
    try:
        return _encoder.encode(msg) + b"\n"
    except (TypeError, ValueError, OverflowError, RecursionError, msgspec.EncodeError) as err:
        raise LocalProtocolError(f"cannot encode message: {err}") from err
