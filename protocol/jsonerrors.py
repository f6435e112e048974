"""The texts of JSON decode failures, in hyperd's own words.

msgspec words its errors differently from one release to the next (invalid UTF-8 became a
``DecodeError`` "Invalid UTF-8 encoded string" in 0.23, a ``UnicodeDecodeError`` before; its
``DecodeError`` became a ``ValueError`` subclass on the way). What a peer reads must not change
with the library underneath, so the decoders call :func:`describe` with the bytes and the
exception, and it classifies them itself:

- bytes that are not UTF-8 (Python's strict decoder: lone surrogates encoded as UTF-8 count too)
  -> ``"a string is not valid UTF-8"``;
- a value of the wrong type or out of range (``msgspec.ValidationError``) -> msgspec's validation
  text, whose form ("Expected `str`, got `int` - at `$.key`") has been the same on every release
  the project allows (the tests run on the oldest and the newest);
- nesting too deep for the interpreter -> ``"nested too deeply"``;
- input that ends inside a value -> ``"malformed JSON: truncated"``;
- anything else -> ``"malformed JSON"`` (no position: libraries count bytes differently).

Only the standard library and msgspec are imported.
"""

from __future__ import annotations

from typing import Final

import msgspec

UTF8_TEXT: Final = "a string is not valid UTF-8"
MALFORMED_TEXT: Final = "malformed JSON"
TRUNCATED_TEXT: Final = "malformed JSON: truncated"
NESTING_TEXT: Final = "nested too deeply"

#: What a JSON decode can raise, on every msgspec release the project allows (``DecodeError`` is
#: not a ``ValueError`` before 0.19; ``UnicodeDecodeError`` is one).
DECODE_ERRORS: Final = (msgspec.MsgspecError, ValueError, RecursionError)


def is_utf8(data: bytes | bytearray | memoryview) -> bool:
    """Whether ``data`` is valid UTF-8 (strict: no encoded surrogates)."""
    try:
        bytes(data).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def describe(data: bytes | bytearray | memoryview, exc: BaseException) -> str:
    """Why ``data`` failed to decode with ``exc``, in words that do not depend on msgspec."""
    if isinstance(exc, RecursionError):
        return NESTING_TEXT
    if not is_utf8(data):
        return UTF8_TEXT
    if isinstance(exc, msgspec.ValidationError):
        return str(exc)
    return TRUNCATED_TEXT if "truncated" in str(exc) else MALFORMED_TEXT


__all__ = [
    "DECODE_ERRORS",
    "MALFORMED_TEXT",
    "NESTING_TEXT",
    "TRUNCATED_TEXT",
    "UTF8_TEXT",
    "describe",
    "is_utf8",
]
