# ruff: noqa: E501  (wire examples read best one per line)
"""protocol.jsonrpc: the JSON-RPC 2.0 spec's examples, framing splits, malformed input."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from msgspec import UNSET

from protocol import LocalProtocolError, RemoteProtocolError
from protocol.jsonrpc import (
    APPLICATION_ERROR_MAX,
    APPLICATION_ERROR_MIN,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    MAX_MESSAGE,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    ErrorObject,
    InvalidMessage,
    LineFramer,
    MessageTooLarge,
    Notification,
    Parsed,
    Request,
    Response,
    encode_message,
    is_application_code,
    make_error,
    parse_message,
)

# --- the examples of https://www.jsonrpc.org/specification section 7, one line each ----------

SUBTRACT_POSITIONAL = b'{"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": 1}'
SUBTRACT_NAMED = b'{"jsonrpc": "2.0", "method": "subtract", "params": {"subtrahend": 23, "minuend": 42}, "id": 3}'
NOTIFY_UPDATE = b'{"jsonrpc": "2.0", "method": "update", "params": [1,2,3,4,5]}'
NOTIFY_FOOBAR = b'{"jsonrpc": "2.0", "method": "foobar"}'
FOOBAR_CALL = b'{"jsonrpc": "2.0", "method": "foobar", "id": "1"}'
INVALID_JSON = b'{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]'
INVALID_REQUEST_OBJ = b'{"jsonrpc": "2.0", "method": 1, "params": "bar"}'
BATCH_INVALID_JSON = b'[{"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},{"jsonrpc": "2.0", "method"]'
BIG_BATCH = (
    b'[{"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},'
    b' {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]},'
    b' {"jsonrpc": "2.0", "method": "subtract", "params": [42,23], "id": "2"},'
    b' {"foo": "boo"},'
    b' {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},'
    b' {"jsonrpc": "2.0", "method": "get_data", "id": "9"}]'
)
NOTIFY_BATCH = (
    b'[{"jsonrpc": "2.0", "method": "notify_sum", "params": [1,2,4]},'
    b' {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]}]'
)


def invalid(code: int, id: Any = None) -> tuple[str, int, Any]:
    return ("invalid", code, id)


def shape(parsed: Parsed) -> Any:
    """A comparable summary; InvalidMessage compares by code and id only."""
    if isinstance(parsed, InvalidMessage):
        return invalid(parsed.error.code, parsed.id)
    return parsed


SPEC_EXAMPLES: list[tuple[str, bytes, Any]] = [
    ("positional", SUBTRACT_POSITIONAL, Request(method="subtract", params=[42, 23], id=1)),
    (
        "named",
        SUBTRACT_NAMED,
        Request(method="subtract", params={"subtrahend": 23, "minuend": 42}, id=3),
    ),
    ("notification", NOTIFY_UPDATE, Notification(method="update", params=[1, 2, 3, 4, 5])),
    ("notification-no-params", NOTIFY_FOOBAR, Notification(method="foobar")),
    ("string-id", FOOBAR_CALL, Request(method="foobar", id="1")),
    ("invalid-json", INVALID_JSON, invalid(PARSE_ERROR)),
    ("invalid-request", INVALID_REQUEST_OBJ, invalid(INVALID_REQUEST)),
    ("batch-invalid-json", BATCH_INVALID_JSON, invalid(PARSE_ERROR)),
    ("empty-batch", b"[]", invalid(INVALID_REQUEST)),
    ("batch-of-one-non-object", b"[1]", [invalid(INVALID_REQUEST)]),
    ("batch-of-non-objects", b"[1,2,3]", [invalid(INVALID_REQUEST)] * 3),
    (
        "mixed-batch",
        BIG_BATCH,
        [
            Request(method="sum", params=[1, 2, 4], id="1"),
            Notification(method="notify_hello", params=[7]),
            Request(method="subtract", params=[42, 23], id="2"),
            invalid(INVALID_REQUEST),
            Request(method="foo.get", params={"name": "myself"}, id="5"),
            Request(method="get_data", id="9"),
        ],
    ),
    (
        "notification-batch",
        NOTIFY_BATCH,
        [
            Notification(method="notify_sum", params=[1, 2, 4]),
            Notification(method="notify_hello", params=[7]),
        ],
    ),
    ("result", b'{"jsonrpc": "2.0", "result": 19, "id": 1}', Response(result=19, id=1)),
    ("null-result", b'{"jsonrpc": "2.0", "result": null, "id": 1}', Response(result=None, id=1)),
    (
        "error-response",
        b'{"jsonrpc": "2.0", "error": {"code": -32601, "message": "Method not found"}, "id": "1"}',
        Response(error=ErrorObject(code=METHOD_NOT_FOUND, message="Method not found"), id="1"),
    ),
    (
        "error-response-null-id",
        b'{"jsonrpc": "2.0", "error": {"code": -32700, "message": "Parse error"}, "id": null}',
        Response(error=ErrorObject(code=PARSE_ERROR, message="Parse error"), id=None),
    ),
]

MALFORMED: list[tuple[str, bytes, Any]] = [
    ("bad-utf8", b'{"jsonrpc": "2.0", "method": "a\xff", "id": 1}', invalid(PARSE_ERROR)),
    ("truncated-utf8", b'{"jsonrpc": "2.0", "method": "\xc3"}', invalid(PARSE_ERROR)),
    ("lone-surrogate", b'{"jsonrpc": "2.0", "method": "\\ud800"}', invalid(PARSE_ERROR)),
    ("number-out-of-range", b'{"jsonrpc": "2.0", "method": "m", "id": 1e999}', invalid(PARSE_ERROR)),
    ("nan", b'{"jsonrpc": "2.0", "method": "m", "id": NaN}', invalid(PARSE_ERROR)),
    ("trailing-garbage", b'{"jsonrpc": "2.0", "method": "m"} x', invalid(PARSE_ERROR)),
    ("deep-nesting", b"[" * 200_000 + b"]" * 200_000, invalid(PARSE_ERROR)),
    ("scalar", b"42", invalid(INVALID_REQUEST)),
    ("string", b'"hello"', invalid(INVALID_REQUEST)),
    ("null", b"null", invalid(INVALID_REQUEST)),
    ("no-version", b'{"method": "m", "id": 7}', invalid(INVALID_REQUEST, 7)),
    ("version-1", b'{"jsonrpc": "1.0", "method": "m", "id": "x"}', invalid(INVALID_REQUEST, "x")),
    ("version-number", b'{"jsonrpc": 2.0, "method": "m", "id": 1}', invalid(INVALID_REQUEST, 1)),
    ("method-null", b'{"jsonrpc": "2.0", "method": null, "id": 1}', invalid(INVALID_REQUEST, 1)),
    ("params-string", b'{"jsonrpc": "2.0", "method": "m", "params": "x"}', invalid(INVALID_REQUEST)),
    ("params-null", b'{"jsonrpc": "2.0", "method": "m", "params": null, "id": 2}', invalid(INVALID_REQUEST, 2)),
    ("id-float", b'{"jsonrpc": "2.0", "method": "m", "id": 1.5}', invalid(INVALID_REQUEST)),
    ("id-bool", b'{"jsonrpc": "2.0", "method": "m", "id": true}', invalid(INVALID_REQUEST)),
    ("id-object", b'{"jsonrpc": "2.0", "method": "m", "id": {}}', invalid(INVALID_REQUEST)),
    ("no-method", b'{"jsonrpc": "2.0", "id": 3}', invalid(INVALID_REQUEST, 3)),
    ("response-no-id", b'{"jsonrpc": "2.0", "result": 1}', invalid(INVALID_REQUEST)),
    ("response-both", b'{"jsonrpc": "2.0", "result": 1, "error": {"code": 1, "message": ""}, "id": 4}', invalid(INVALID_REQUEST, 4)),
    ("error-not-object", b'{"jsonrpc": "2.0", "error": "bad", "id": 5}', invalid(INVALID_REQUEST, 5)),
    ("error-code-string", b'{"jsonrpc": "2.0", "error": {"code": "1", "message": "m"}, "id": 6}', invalid(INVALID_REQUEST, 6)),
    ("error-code-bool", b'{"jsonrpc": "2.0", "error": {"code": true, "message": "m"}, "id": 6}', invalid(INVALID_REQUEST, 6)),
    ("error-no-message", b'{"jsonrpc": "2.0", "error": {"code": 1}, "id": 6}', invalid(INVALID_REQUEST, 6)),
    ("batch-nested-empty", b"[[]]", [invalid(INVALID_REQUEST)]),
]  # fmt: skip


def summarize(parsed: Parsed | list[Parsed]) -> Any:
    if isinstance(parsed, list):
        return [shape(p) for p in parsed]
    return shape(parsed)


@pytest.mark.parametrize(("line", "expected"), [c[1:] for c in SPEC_EXAMPLES + MALFORMED],
                         ids=[c[0] for c in SPEC_EXAMPLES + MALFORMED])  # fmt: skip
def test_parse_message(line: bytes, expected: Any) -> None:
    assert summarize(parse_message(line)) == expected


def frame(chunks: Iterable[bytes], framer: LineFramer) -> list[bytes]:
    lines: list[bytes] = []
    for chunk in chunks:
        framer.feed(chunk)
        while (line := framer.next_line()) is not None:
            lines.append(line)
    return lines


def splits(data: bytes) -> dict[str, list[bytes]]:
    return {
        "whole": [data],
        "byte-by-byte": [data[i : i + 1] for i in range(len(data))],
        "halves": [data[: len(data) // 2], data[len(data) // 2 :]],
    }


ALL_SPEC_LINES = [c[1] for c in SPEC_EXAMPLES]


@pytest.mark.parametrize("split", ["whole", "byte-by-byte", "halves"])
def test_spec_examples_over_framing(split: str) -> None:
    """The whole table as one newline-delimited stream, with a partial message trailing."""
    trailing = b'{"jsonrpc": "2.0", "method": "not-yet'
    stream = b"\n".join(ALL_SPEC_LINES) + b"\n" + trailing
    framer = LineFramer()
    lines = frame(splits(stream)[split], framer)
    assert lines == ALL_SPEC_LINES
    assert [summarize(parse_message(line)) for line in lines] == [c[2] for c in SPEC_EXAMPLES]
    assert framer.buffered == len(trailing)
    assert framer.next_line() is None
    framer.feed(b'"}\n')
    assert parse_message(framer.next_line() or b"") == Notification(method="not-yet")


def test_framer_crlf_blank_lines_and_end_of_input() -> None:
    framer = LineFramer()
    framer.feed(b'\n\r\n  \n{"jsonrpc":"2.0","method":"a"}\r\n\n{"jsonrpc":"2.0","method":"b"}')
    line = framer.next_line()
    assert line is not None and parse_message(line) == Notification(method="a")
    assert framer.next_line() is None
    assert parse_message(framer.end_of_input() or b"") == Notification(method="b")
    assert framer.end_of_input() is None
    assert framer.buffered == 0


@pytest.mark.parametrize("split", ["whole", "byte-by-byte", "halves"])
def test_oversized_message_is_dropped_and_framing_resumes(split: str) -> None:
    limit = 32
    ok = b'{"jsonrpc":"2.0","method":"ok"}'
    exact = b'{"jsonrpc":"2.0","method":"' + b"x" * (limit - 29) + b'"}'
    assert len(exact) == limit
    big = b'{"jsonrpc":"2.0","method":"' + b"y" * 500 + b'"}'
    stream = ok + b"\n" + big + b"\n" + exact + b"\n" + big + b"\n" + big + b"\n" + ok + b"\n"
    framer = LineFramer(max_message=limit)
    events: list[bytes | str] = []
    for chunk in splits(stream)[split]:
        framer.feed(chunk)
        assert framer.buffered <= limit
        while True:
            try:
                line = framer.next_line()
            except MessageTooLarge as err:
                assert isinstance(err, RemoteProtocolError)
                assert err.code == INVALID_REQUEST and str(limit) in str(err)
                events.append("too-large")
                continue
            if line is None:
                break
            events.append(line)
    assert events == [ok, "too-large", exact, "too-large", "too-large", ok]


def test_oversized_reported_before_its_newline_arrives() -> None:
    framer = LineFramer(max_message=8)
    framer.feed(b"123456789")
    with pytest.raises(MessageTooLarge):
        framer.next_line()
    for _ in range(1000):
        framer.feed(b"z" * 4096)
        assert framer.buffered == 0
        assert framer.next_line() is None
    framer.feed(b'tail\n{"a":1}\n')
    assert framer.next_line() == b'{"a":1}'


def test_too_large_error_object() -> None:
    err = MessageTooLarge(MAX_MESSAGE)
    obj = err.error_object()
    assert obj.code == INVALID_REQUEST
    assert obj.data == {"kind": "message_too_large", "max_message": MAX_MESSAGE}
    assert MAX_MESSAGE == 1 << 20
    assert LineFramer().max_message == MAX_MESSAGE
    with pytest.raises(ValueError):
        LineFramer(max_message=0)


@pytest.mark.parametrize(
    ("msg", "wire"),
    [
        (Request(method="m", id=1), {"jsonrpc": "2.0", "method": "m", "id": 1}),
        (Request(method="m", id=None, params=[]), {"jsonrpc": "2.0", "method": "m", "params": [], "id": None}),
        (Notification(method="n", params={"a": 1}), {"jsonrpc": "2.0", "method": "n", "params": {"a": 1}}),
        (Response(result=None, id="x"), {"jsonrpc": "2.0", "result": None, "id": "x"}),
        (
            Response(error=ErrorObject(code=-32000, message="boom"), id=2),
            {"jsonrpc": "2.0", "error": {"code": -32000, "message": "boom"}, "id": 2},
        ),
        (
            Response(error=ErrorObject(code=1, message="m", data=None), id=2),
            {"jsonrpc": "2.0", "error": {"code": 1, "message": "m", "data": None}, "id": 2},
        ),
    ],
)  # fmt: skip
def test_encode_always_carries_version(msg: Any, wire: dict[str, Any]) -> None:
    data = encode_message(msg)
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert msgspec.json.decode(data) == wire
    assert parse_message(data) == msg


def test_encode_batch_and_errors() -> None:
    batch = [Response(result=1, id=1), Response(result=2, id=2)]
    assert parse_message(encode_message(batch)) == batch
    with pytest.raises(LocalProtocolError):
        encode_message([])
    with pytest.raises(LocalProtocolError):
        encode_message(Response(result=object(), id=1))


def test_response_needs_exactly_one_of_result_and_error() -> None:
    with pytest.raises(LocalProtocolError):
        Response(id=1)
    with pytest.raises(LocalProtocolError):
        Response(id=1, result=1, error=ErrorObject(code=1, message=""))


def test_make_error_and_invalid_message_response() -> None:
    resp = make_error(METHOD_NOT_FOUND, "no method 'x'", id=3, method="x")
    assert resp.id == 3
    assert resp.error == ErrorObject(
        code=METHOD_NOT_FOUND,
        message="Method not found: no method 'x'",
        data={"kind": "method_not_found", "method": "x"},
    )
    parsed = parse_message(b'{"method": "m", "id": 9}')
    assert isinstance(parsed, InvalidMessage)
    resp = parsed.response()
    assert resp.id == 9 and resp.result is UNSET
    assert isinstance(resp.error, ErrorObject) and resp.error.code == INVALID_REQUEST
    assert resp.error.message.startswith("Invalid Request")
    assert resp.error.data == {"kind": "invalid_request"}


def test_codes() -> None:
    assert (PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS, INTERNAL_ERROR) == (
        -32700,
        -32600,
        -32601,
        -32602,
        -32603,
    )
    assert (APPLICATION_ERROR_MIN, APPLICATION_ERROR_MAX) == (-32099, -32000)
    assert is_application_code(-32000) and is_application_code(-32099)
    assert not is_application_code(-32100) and not is_application_code(INTERNAL_ERROR)


def test_protocol_imports_no_io_library() -> None:
    code = (
        "import sys, protocol.jsonrpc\n"
        "bad = [m for m in ('anyio', 'asyncio', 'socket', 'hyperd', 'trio') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
