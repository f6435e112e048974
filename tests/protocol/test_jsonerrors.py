"""Decode-error texts are hyperd's own: the same on every msgspec release the project allows.

CI runs this file on the locked (newest) msgspec and again in a venv made from
``.ci/oldest.lock`` (the lowest versions pyproject.toml allows), so a wording that moves with the
library fails one of the two runs.
"""

from __future__ import annotations

import msgspec
import pytest

from protocol import jsonerrors
from protocol.ccproxy import payloads
from protocol.hyperstart import CC, HYPER, Dialect, Pod, codec
from protocol.jsonrpc import PARSE_ERROR, InvalidMessage, parse_message


class _S(msgspec.Struct):
    name: str


CASES = [
    (b'{"name":"\xff"}', "a string is not valid UTF-8"),
    (b'{"name":"\xed\xa0\x80"}', "a string is not valid UTF-8"),  # an encoded surrogate
    (b'{"name":', "malformed JSON: truncated"),
    (b"{", "malformed JSON: truncated"),
    (b'{"name":"a"} x', "malformed JSON"),
    (b"\x00", "malformed JSON"),
    (b'{"name":1}', "Expected `str`, got `int` - at `$.name`"),
]


@pytest.mark.parametrize(("data", "text"), CASES)
def test_describe(data: bytes, text: str) -> None:
    with pytest.raises(jsonerrors.DECODE_ERRORS) as info:
        msgspec.json.decode(data, type=_S)
    assert jsonerrors.describe(data, info.value) == text


def test_describe_nesting() -> None:
    assert jsonerrors.describe(b"[[", RecursionError()) == "nested too deeply"


@pytest.mark.parametrize(("data", "text"), CASES[:-1])
def test_ccproxy_payload_errors_use_them(data: bytes, text: str) -> None:
    raw = data.replace(b'"name"', b'"containerId"')
    with pytest.raises(payloads.PayloadError) as info:
        payloads.decode_payload(payloads.AttachVM, raw)
    assert str(info.value) == f"invalid AttachVM payload: {text}"


@pytest.mark.parametrize(("data", "text"), CASES[:-1])
def test_jsonrpc_parse_errors_use_them(data: bytes, text: str) -> None:
    parsed = parse_message(data)
    assert isinstance(parsed, InvalidMessage)
    assert parsed.error.code == PARSE_ERROR
    assert parsed.error.message == f"Parse error: {text}"


@pytest.mark.parametrize("dialect", [CC, HYPER], ids=["cc", "hyper"])
@pytest.mark.parametrize(("data", "text"), CASES[:-1])
def test_hyperstart_body_errors_use_them(data: bytes, text: str, dialect: Dialect) -> None:
    raw = data.replace(b'"name"', b'"hostname"')
    with pytest.raises(codec.MessageError) as info:
        codec.decode_message(Pod, raw, dialect)
    assert str(info.value) == f"malformed Pod body: {text}"
