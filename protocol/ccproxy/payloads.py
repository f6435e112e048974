"""JSON payloads of the cc-proxy protocol (spec §5), encoded as Go's ``encoding/json`` does.

Every Struct has the exact wire keys as attribute names (``URL`` is upper-case on the wire).
Go's ``omitempty`` is reproduced with ``omit_defaults`` on the Structs whose optional fields are
all ``omitempty``; fields without ``omitempty`` are always emitted (``tokens`` as ``null`` when
there are none). :func:`encode_payload` also escapes ``<``, ``>``, ``&``, U+2028 and U+2029 as Go
does (except inside ``Hyper.data``, which is raw JSON passed through verbatim, as the proxy
forwards it), so payloads re-encode byte-for-byte.

:func:`decode_payload` decodes as Go does: keys match case-insensitively (an exact match wins),
unknown keys are ignored, a missing key or a ``null`` for a string or number leaves the zero
value. Anything else -- malformed JSON, a wrong type, invalid UTF-8 -- raises
:class:`PayloadError`. The Structs forbid unknown fields so that the fast, exact decode fails
over to that tolerant path; always decode through :func:`decode_payload`.
"""

from __future__ import annotations

import re
import types
from dataclasses import dataclass
from typing import Any, Final, TypeVar, Union, get_args, get_origin

import msgspec

from protocol import jsonerrors
from protocol.errors import LocalProtocolError, RemoteProtocolError

T = TypeVar("T", bound=msgspec.Struct)


class PayloadError(RemoteProtocolError):
    """A payload that does not decode into the expected Struct; the message says why."""


class RegisterVM(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Command 0: register a VM and connect to its agent (spec §5.1)."""

    containerId: str
    ctlSerial: str
    ioSerial: str
    console: str = ""  # omitempty
    numIOStreams: int = 0  # omitempty
    exitNotifications: bool = False  # hyperd's extension (omitempty); the reference ignores it


class UnregisterVM(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Command 1 (spec §5.4)."""

    containerId: str


class AttachVM(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Command 2: attach this connection to a registered VM (spec §5.3)."""

    containerId: str
    numIOStreams: int = 0  # omitempty
    exitNotifications: bool = False  # hyperd's extension (omitempty); the reference ignores it


class IOResponse(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where shims connect and the tokens allocated (spec §5.2); ``tokens`` is null when none."""

    URL: str
    tokens: list[str] | None = None


class VMResponse(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Success payload of RegisterVM and AttachVM.

    ``exitNotifications`` is hyperd's extension: true when the proxy will send this connection a
    ``VM_PROCESS_EXITED`` notification for every process exit of the VM. The reference never
    sends the key (it decodes as false), so a runtime can tell which proxy it talks to.
    """

    io: IOResponse
    exitNotifications: bool = False  # omitempty


class ProcessExitNotice(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True, kw_only=True
):
    """Payload of the ``VM_PROCESS_EXITED`` notification (**hyperd's extension**, notification
    opcode 1, proxy → runtime connection that registered or attached with exitNotifications).

    ``containerId`` is the VM; ``token`` the I/O token the process was started with (empty for a
    process started without one); ``container`` and ``process`` the agent's ids;
    ``status`` the exit status as the agent reported it (0..255). ``backlog`` is true for an
    exit that happened while no runtime connection listened, delivered on the next AttachVM.
    """

    containerId: str
    token: str = ""  # omitempty
    container: str = ""  # omitempty
    process: str = ""  # omitempty
    status: int  # always sent, 0 included
    backlog: bool = False  # omitempty


class Hyper(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Command 3: an agent command (spec §5.5). ``data`` is raw JSON, omitted when unset."""

    hyperName: str
    tokens: list[str] | None = None  # no omitempty: null when there are none
    data: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET


class ConnectShim(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Command 4: claim an I/O token (spec §5.6)."""

    token: str


class Signal(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Command 6: a signal, or a terminal size with SIGWINCH (spec §5.8)."""

    signalNumber: int
    columns: int = 0  # omitempty
    rows: int = 0  # omitempty


class ErrorResponse(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Payload of every response with the E flag (spec §5.9)."""

    msg: str


class LogEntry(
    msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True, kw_only=True
):
    """Stream 3 (log) payload (spec §5.10). Keyword-only: Go's key order puts the optional
    ``containerId`` before required fields."""

    source: str
    containerId: str = ""  # omitempty
    level: str
    msg: str


PAYLOAD_TYPES: Final[tuple[type[msgspec.Struct], ...]] = (
    RegisterVM,
    UnregisterVM,
    AttachVM,
    IOResponse,
    VMResponse,
    Hyper,
    ConnectShim,
    Signal,
    ErrorResponse,
    LogEntry,
    ProcessExitNotice,
)

_ENCODER: Final = msgspec.json.Encoder()

_GO_ESCAPE_RE: Final = re.compile(rb"[<>&]|\xe2\x80[\xa8\xa9]")  # U+2028, U+2029 in UTF-8
"""Characters Go's encoder escapes although JSON allows them raw. None of them can occur outside
a JSON string, so substituting over the whole text (Raw values included) is exact."""

_GO_ESCAPE_BYTES: Final = b"<>&\xe2"
"""Bytes that may start a character Go escapes (0xE2 starts U+2028 and U+2029)."""

_GO_ESCAPES: Final = {ch.encode(): f"\\u{ord(ch):04x}".encode() for ch in "<>&\u2028\u2029"}


def _go_escape(match: re.Match[bytes]) -> bytes:
    return _GO_ESCAPES[match.group()]


def encode_payload(obj: msgspec.Struct) -> bytes:
    """Return the JSON bytes Go's ``json.Marshal`` produces for ``obj``.

    Raises :class:`LocalProtocolError` if ``obj`` cannot be encoded (e.g. a lone surrogate).
    """
    try:
        out = _ENCODER.encode(obj)
    except (msgspec.MsgspecError, TypeError, ValueError, OverflowError) as exc:
        raise LocalProtocolError(f"cannot encode {type(obj).__name__}: {exc}") from None
    if len(out.translate(None, _GO_ESCAPE_BYTES)) == len(out):
        return out  # the common case, checked faster than a regex search
    if isinstance(obj, Hyper) and obj.data is not msgspec.UNSET:
        # data, the last key, is forwarded verbatim: escape only what precedes it
        head = _ENCODER.encode(msgspec.structs.replace(obj, data=msgspec.UNSET))
        return b"".join(
            (_GO_ESCAPE_RE.sub(_go_escape, head[:-1]), b',"data":', bytes(obj.data), b"}")
        )
    return _GO_ESCAPE_RE.sub(_go_escape, out)


@dataclass(frozen=True, slots=True)
class _Field:
    name: str
    nullable: bool  # JSON null is a value (Raw, or a list that may be nil)
    nested: type[msgspec.Struct] | None
    zero: bytes | None  # JSON of Go's zero value, for required fields


@dataclass(frozen=True, slots=True)
class _FieldTable:
    exact: dict[str, _Field]
    folded: dict[str, _Field]
    required: tuple[_Field, ...]


_DECODERS: dict[type[Any], msgspec.json.Decoder[Any]] = {}
_TABLES: dict[type[Any], _FieldTable] = {}
_OBJECT_DECODER: Final = msgspec.json.Decoder(dict[str, msgspec.Raw] | None)


def _is_struct(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


def _table(cls: type[msgspec.Struct]) -> _FieldTable:
    table = _TABLES.get(cls)
    if table is not None:
        return table
    exact: dict[str, _Field] = {}
    folded: dict[str, _Field] = {}
    required: list[_Field] = []
    for info in msgspec.structs.fields(cls):
        tp = info.type
        args = get_args(tp) if get_origin(tp) in (Union, types.UnionType) else (tp,)
        nullable = type(None) in args or msgspec.Raw in args
        nested = tp if _is_struct(tp) else None
        zero: bytes | None = None
        if info.required:
            if nested is not None:
                zero = _normalize(nested, b"{}")
            elif nullable:
                zero = b"null"
            elif tp is int:
                zero = b"0"
            elif tp is str:
                zero = b'""'
            else:  # pragma: no cover - every payload field is one of the above
                raise TypeError(f"no Go zero value for {tp!r}")
        field = _Field(info.encode_name, nullable, nested, zero)
        exact[field.name] = field
        folded.setdefault(field.name.casefold(), field)
        if zero is not None:
            required.append(field)
    table = _FieldTable(exact, folded, tuple(required))
    _TABLES[cls] = table
    return table


def _normalize(cls: type[msgspec.Struct], data: bytes | msgspec.Raw) -> bytes:
    """Rewrite a JSON object the way Go would see it: canonical key case, unknown keys dropped,
    nulls of non-nullable fields dropped, missing required fields set to Go's zero value.
    Raises msgspec/Unicode errors for input that is not a JSON object (or null)."""
    table = _table(cls)
    decoded = _OBJECT_DECODER.decode(data)
    out: dict[str, msgspec.Raw] = {}
    for key, value in (decoded or {}).items():
        field = table.exact.get(key) or table.folded.get(key.casefold())
        if field is None:
            continue
        if bytes(value) == b"null":
            if not field.nullable:
                continue  # Go leaves the field as it was
        elif field.nested is not None:
            value = msgspec.Raw(_normalize(field.nested, value))
        out[field.name] = value
    for field in table.required:
        if field.name not in out:
            assert field.zero is not None
            out[field.name] = msgspec.Raw(field.zero)
    return _ENCODER.encode(out)


def _decoder(cls: type[T]) -> msgspec.json.Decoder[T]:
    decoder = msgspec.json.Decoder(cls)
    _DECODERS[cls] = decoder
    return decoder


def _error(cls: type[Any], payload: bytes, exc: Exception) -> PayloadError:
    name = cls.__name__
    if not payload:
        return PayloadError(f"invalid {name} payload: empty")
    return PayloadError(f"invalid {name} payload: {jsonerrors.describe(payload, exc)}")


def decode_payload(cls: type[T], payload: bytes) -> T:
    """Decode ``payload`` into ``cls`` with Go's leniency (see the module docstring).

    Raises :class:`PayloadError` (a :class:`RemoteProtocolError`) for malformed JSON, a value of
    the wrong type, or invalid UTF-8.
    """
    decoder: msgspec.json.Decoder[T] = _DECODERS.get(cls) or _decoder(cls)
    try:
        return decoder.decode(payload)
    except msgspec.ValidationError:
        pass  # key case, unknown or missing keys, nulls: take the tolerant path
    except jsonerrors.DECODE_ERRORS as exc:
        raise _error(cls, payload, exc) from None
    try:
        return decoder.decode(_normalize(cls, payload))
    except jsonerrors.DECODE_ERRORS as exc:
        raise _error(cls, payload, exc) from None


__all__ = [
    "PAYLOAD_TYPES",
    "AttachVM",
    "ConnectShim",
    "ErrorResponse",
    "Hyper",
    "IOResponse",
    "LogEntry",
    "PayloadError",
    "ProcessExitNotice",
    "RegisterVM",
    "Signal",
    "UnregisterVM",
    "VMResponse",
    "decode_payload",
    "encode_payload",
]
