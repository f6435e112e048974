"""Go ``encoding/json`` compatibility: decoding with Go's leniency and Go's error texts.

The reference proxy answers a payload it cannot decode with the text of Go's decoder error
(``unexpected end of JSON input``, ``invalid character 'n' looking for beginning of object key
string``, ``json: cannot unmarshal number into Go struct field AttachVM.containerId of type
string``). :func:`decode` decodes through :func:`protocol.ccproxy.decode_payload` (which already
has Go's leniency: key case, unknown keys, nulls) and, only when that fails, reconstructs the
text Go would have given: a port of Go's syntax scanner (checked first, as ``json.Unmarshal``
does), then the first type mismatch in document order. (Bad payloads over 256 KiB, which no
Go client produces, get msgspec's description instead: the scanner runs in Python.)
"""

from __future__ import annotations

import re
import types
from typing import Any, Final, TypeVar, Union, get_args, get_origin

import msgspec

from protocol import jsonerrors
from protocol.ccproxy import PayloadError, decode_payload

T = TypeVar("T", bound=msgspec.Struct)

END_OF_INPUT: Final = "unexpected end of JSON input"
MAX_GO_SCAN: Final = 256 << 10  # larger bad payloads get msgspec's text: the scan is pure Python
_SPACE: Final = frozenset(b" \t\r\n")
_DIGITS: Final = frozenset(b"0123456789")
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES: Final = frozenset(b'bfnrt\\/"')
_NAMED: Final = {7: "\\a", 8: "\\b", 9: "\\t", 10: "\\n", 11: "\\v", 12: "\\f", 13: "\\r"}
_STRING_STOP: Final = re.compile(rb'["\\\x00-\x1f]')  # bytes that end a run of string text
_NOT_DIGIT: Final = re.compile(rb"[^0-9]")
_ANY: Final = object()  # a field that takes any JSON value (json.RawMessage)


class GoDecodeError(Exception):
    """A payload Go would have refused; ``str()`` is Go's error text."""


def decode(cls: type[T], payload: bytes) -> T:
    """Decode ``payload`` into ``cls`` as Go's ``json.Unmarshal`` would.

    Raises :class:`GoDecodeError` carrying Go's error text.
    """
    try:
        return decode_payload(cls, payload)
    except PayloadError as exc:
        if len(payload) > MAX_GO_SCAN:
            raise GoDecodeError(str(exc)) from None
    text = syntax_error(payload)
    if text is None:
        text = type_error(cls, payload)
    if text is None:
        # Go replaces invalid UTF-8 by U+FFFD instead of failing
        fixed = payload.decode("utf-8", "replace").encode()
        if fixed != payload:
            return decode(cls, fixed)
        text = f"json: cannot unmarshal into Go value of type api.{cls.__name__}"
    raise GoDecodeError(text)


def quote_char(c: int) -> str:
    """Go's ``quoteChar``: a byte quoted for a syntax error message."""
    if c == 0x27:
        return "'\\''"
    if c == 0x22:
        return "'\"'"
    if c == 0x5C:
        return "'\\\\'"
    if c in _NAMED:
        return f"'{_NAMED[c]}'"
    if c < 0x20 or c == 0x7F:
        return f"'\\x{c:02x}'"
    if 0x80 <= c <= 0xA0 or c == 0xAD:
        return f"'\\u{c:04x}'"
    return f"'{chr(c)}'"


class _Scanner:
    """A port of Go's ``encoding/json`` scanner, reduced to finding the first syntax error."""

    def __init__(self) -> None:
        self.stack: list[int] = []  # 0 object key, 1 object value, 2 array value
        self.step = self.begin_value
        self.end_top = False
        self.error: str | None = None

    def finish(self) -> bool:
        """End of input: whether the scanned text is one complete value (Go's ``eof()``)."""
        if not self.end_top:
            self.step(0x20)
        return self.end_top and self.error is None

    def fail(self, c: int, context: str) -> None:
        self.error = f"invalid character {quote_char(c)} {context}"

    def begin_value_or_empty(self, c: int) -> None:
        if c in _SPACE:
            return
        if c == 0x5D:  # ]
            self.end_value(c)
            return
        self.begin_value(c)

    def begin_value(self, c: int) -> None:
        if c in _SPACE:
            return
        if c == 0x7B:  # {
            self.stack.append(0)
            self.step = self.begin_string_or_empty
        elif c == 0x5B:  # [
            self.stack.append(2)
            self.step = self.begin_value_or_empty
        elif c == 0x22:
            self.step = self.in_string
        elif c == 0x2D:  # -
            self.step = self.neg
        elif c == 0x30:
            self.step = self.zero
        elif 0x31 <= c <= 0x39:
            self.step = self.one
        elif c in (0x74, 0x66, 0x6E):  # t f n
            word = {0x74: "true", 0x66: "false", 0x6E: "null"}[c]
            self.step = self._literal(word, 1)
        else:
            self.fail(c, "looking for beginning of value")

    def begin_string_or_empty(self, c: int) -> None:
        if c in _SPACE:
            return
        if c == 0x7D:  # }
            self.stack[-1] = 1
            self.end_value(c)
            return
        self.begin_string(c)

    def begin_string(self, c: int) -> None:
        if c in _SPACE:
            return
        if c == 0x22:
            self.step = self.in_string
        else:
            self.fail(c, "looking for beginning of object key string")

    def end_value(self, c: int) -> None:
        if not self.stack:
            self.step = self.end_top_step
            self.end_top = True
            self.end_top_step(c)
            return
        if c in _SPACE:
            self.step = self.end_value
            return
        top = self.stack[-1]
        if top == 0:
            if c == 0x3A:  # :
                self.stack[-1] = 1
                self.step = self.begin_value
            else:
                self.fail(c, "after object key")
        elif top == 1:
            if c == 0x2C:  # ,
                self.stack[-1] = 0
                self.step = self.begin_string
            elif c == 0x7D:
                self.pop()
            else:
                self.fail(c, "after object key:value pair")
        elif c == 0x2C:
            self.step = self.begin_value
        elif c == 0x5D:
            self.pop()
        else:
            self.fail(c, "after array element")

    def pop(self) -> None:
        self.stack.pop()
        if not self.stack:
            self.step = self.end_top_step
            self.end_top = True
        else:
            self.step = self.end_value

    def end_top_step(self, c: int) -> None:
        if c not in _SPACE:
            self.fail(c, "after top-level value")

    def in_string(self, c: int) -> None:
        if c == 0x22:
            self.step = self.end_value
        elif c == 0x5C:
            self.step = self.in_string_esc
        elif c < 0x20:
            self.fail(c, "in string literal")

    def in_string_esc(self, c: int) -> None:
        if c in _ESCAPES:
            self.step = self.in_string
        elif c == 0x75:  # u
            self.step = self._hex(4)
        else:
            self.fail(c, "in string escape code")

    def _hex(self, left: int) -> Any:
        def step(c: int) -> None:
            if c not in _HEX:
                self.fail(c, "in \\u hexadecimal character escape")
            else:
                self.step = self.in_string if left == 1 else self._hex(left - 1)

        return step

    def _literal(self, word: str, i: int) -> Any:
        def step(c: int) -> None:
            if c != ord(word[i]):
                self.fail(c, f"in literal {word} (expecting {quote_char(ord(word[i]))})")
            else:
                self.step = self.end_value if i + 1 == len(word) else self._literal(word, i + 1)

        return step

    def neg(self, c: int) -> None:
        if c == 0x30:
            self.step = self.zero
        elif 0x31 <= c <= 0x39:
            self.step = self.one
        else:
            self.fail(c, "in numeric literal")

    def one(self, c: int) -> None:
        if c in _DIGITS:
            return
        self.zero(c)

    def zero(self, c: int) -> None:
        if c == 0x2E:  # .
            self.step = self.dot
        elif c in (0x65, 0x45):  # e E
            self.step = self.exp
        else:
            self.end_value(c)

    def dot(self, c: int) -> None:
        if c in _DIGITS:
            self.step = self.dot0
        else:
            self.fail(c, "after decimal point in numeric literal")

    def dot0(self, c: int) -> None:
        if c in _DIGITS:
            return
        if c in (0x65, 0x45):
            self.step = self.exp
        else:
            self.end_value(c)

    def exp(self, c: int) -> None:
        if c in (0x2B, 0x2D):  # + -
            self.step = self.exp_sign
        else:
            self.exp_sign(c)

    def exp_sign(self, c: int) -> None:
        if c in _DIGITS:
            self.step = self.exp0
        else:
            self.fail(c, "in exponent of numeric literal")

    def exp0(self, c: int) -> None:
        if c not in _DIGITS:
            self.end_value(c)


def syntax_error(data: bytes) -> str | None:
    """Go's syntax error text for ``data``, or None if Go's scanner accepts it."""
    scanner = _Scanner()
    in_string = scanner.in_string
    in_digits = (scanner.one, scanner.dot0, scanner.exp0)
    i, size = 0, len(data)
    while i < size:
        step = scanner.step
        if step == in_string:
            # skip the plain bytes of a string in one go: payloads are mostly strings
            stop = _STRING_STOP.search(data, i)
            if stop is None:
                return END_OF_INPUT
            i = stop.start()
        elif step in in_digits:
            stop = _NOT_DIGIT.search(data, i)
            if stop is None:
                break
            i = stop.start()
        scanner.step(data[i])
        if scanner.error is not None:
            return scanner.error
        i += 1
    return None if scanner.finish() else END_OF_INPUT


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, str):
        return "string"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, list):
        return "array"
    return "object"


def _go_type(tp: Any) -> Any:
    """Go type name of a payload field type, or _ANY for raw JSON."""
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a not in (type(None), msgspec.UnsetType)]
        tp = args[0] if len(args) == 1 else msgspec.Raw
    if tp is str:
        return "string"
    if tp is int:
        return "int"
    if get_origin(tp) is list:
        return "[]" + str(_go_type(get_args(tp)[0]))
    return _ANY


def _field_error(struct: str, key: str, go_type: Any, raw: msgspec.Raw) -> str | None:
    if go_type is _ANY:
        return None
    value = msgspec.json.decode(raw)
    if value is None:
        return None
    where = f"Go struct field {struct}.{key}"
    if go_type == "string":
        return (
            None
            if isinstance(value, str)
            else f"json: cannot unmarshal {_kind(value)} into {where} of type string"
        )
    if go_type == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            if -(1 << 63) <= value < (1 << 63):
                return None
            return f"json: cannot unmarshal number {bytes(raw).decode()} into {where} of type int"
        if isinstance(value, float):
            return f"json: cannot unmarshal number {bytes(raw).decode()} into {where} of type int"
        return f"json: cannot unmarshal {_kind(value)} into {where} of type int"
    if isinstance(go_type, str) and go_type.startswith("[]"):
        if not isinstance(value, list):
            return f"json: cannot unmarshal {_kind(value)} into {where} of type {go_type}"
        for item in value:
            if item is not None and not isinstance(item, str):
                return f"json: cannot unmarshal {_kind(item)} into {where} of type string"
    return None


def type_error(cls: type[msgspec.Struct], data: bytes) -> str | None:
    """The first Go type error decoding ``data`` (syntactically valid JSON) into ``cls``."""
    try:
        value = msgspec.json.decode(data)
    except jsonerrors.DECODE_ERRORS:
        return None
    if value is None:
        return None
    if not isinstance(value, dict):
        return f"json: cannot unmarshal {_kind(value)} into Go value of type api.{cls.__name__}"
    fields = {f.encode_name: f for f in msgspec.structs.fields(cls)}
    folded = {name.casefold(): f for name, f in fields.items()}
    items = msgspec.json.decode(data, type=dict[str, msgspec.Raw])
    for key, raw in items.items():
        info = fields.get(key) or folded.get(key.casefold())
        if info is None:
            continue
        text = _field_error(cls.__name__, info.encode_name, _go_type(info.type), raw)
        if text is not None:
            return text
    return None


__all__ = [
    "END_OF_INPUT",
    "GoDecodeError",
    "decode",
    "quote_char",
    "syntax_error",
    "type_error",
]
