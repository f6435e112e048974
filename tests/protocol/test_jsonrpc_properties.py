"""protocol.jsonrpc properties: round trips; any bytes parse or raise RemoteProtocolError."""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec import UNSET

from protocol import RemoteProtocolError
from protocol.jsonrpc import (
    ErrorObject,
    InvalidMessage,
    LineFramer,
    Notification,
    Request,
    Response,
    encode_message,
    parse_incoming,
    parse_message,
)

json_values: st.SearchStrategy[Any] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
ids = st.none() | st.integers() | st.text(max_size=16)
params = (
    st.just(UNSET)
    | st.lists(json_values, max_size=4)
    | st.dictionaries(st.text(max_size=8), json_values, max_size=4)
)
requests = st.builds(Request, method=st.text(max_size=20), params=params, id=ids)
notifications = st.builds(Notification, method=st.text(max_size=20), params=params)
errors = st.builds(
    ErrorObject, code=st.integers(), message=st.text(), data=st.just(UNSET) | json_values
)
responses = st.builds(Response, id=ids, result=json_values) | st.builds(
    Response, id=ids, error=errors
)
messages = requests | notifications | responses


def frame_all(data: bytes, framer: LineFramer) -> list[bytes]:
    framer.feed(data)
    lines = []
    while (line := framer.next_line()) is not None:
        lines.append(line)
    return lines


@settings(deadline=None)
@given(messages)
def test_message_round_trip(msg: Request | Notification | Response) -> None:
    lines = frame_all(encode_message(msg), LineFramer())
    assert len(lines) == 1
    assert parse_message(lines[0]) == msg


@settings(deadline=None)
@given(st.lists(messages, min_size=1, max_size=5))
def test_batch_round_trip(batch: list[Request | Notification | Response]) -> None:
    assert parse_message(encode_message(batch)) == batch


@settings(deadline=None)
@given(st.lists(messages, min_size=1, max_size=6), st.data())
def test_stream_of_messages_any_split(
    msgs: list[Request | Notification | Response], data: st.DataObject
) -> None:
    stream = b"".join(encode_message(m) for m in msgs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    framer = LineFramer()
    lines: list[bytes] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        lines += frame_all(stream[start:cut], framer)
        start = cut
    assert [parse_message(line) for line in lines] == msgs
    assert framer.buffered == 0


PARSED_TYPES = (Request, Notification, Response, InvalidMessage)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=80), max_size=10), st.integers(1, 64))
def test_any_bytes_parse_or_raise_remote_protocol_error(chunks: list[bytes], limit: int) -> None:
    framer = LineFramer(max_message=limit)
    for chunk in chunks:
        framer.feed(chunk)
        assert framer.buffered <= limit
        while True:
            try:
                line = framer.next_line()
            except RemoteProtocolError:
                continue
            if line is None:
                break
            assert len(line) <= limit
            parsed = parse_message(line)
            items = parsed if isinstance(parsed, list) else [parsed]
            assert items and all(isinstance(p, PARSED_TYPES) for p in items)


json_ish = st.sampled_from(
    [b"{", b"}", b"[", b"]", b",", b":", b'"jsonrpc"', b'"2.0"', b'"method"', b'"id"', b'"params"',
     b'"result"', b'"error"', b'"code"', b'"message"', b"1", b"-1.5", b"null", b"true", b'"\xff"',
     b"\\u0000", b" ", b"\n"]
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.lists(json_ish, max_size=40))
def test_json_shaped_garbage_never_raises(tokens: list[bytes]) -> None:
    for line in frame_all(b"".join(tokens) + b"\n", LineFramer()):
        parsed = parse_message(line)
        items = parsed if isinstance(parsed, list) else [parsed]
        assert all(isinstance(p, PARSED_TYPES) for p in items)
        for p in items:
            if isinstance(p, InvalidMessage):
                # the error must itself be sendable
                assert parse_message(encode_message(p.response())) == p.response()


members = st.dictionaries(
    st.sampled_from(["jsonrpc", "method", "params", "id", "result", "error", "x"]),
    json_values | st.just("2.0"),
    max_size=6,
)


@settings(deadline=None)
@given(st.one_of(messages.map(encode_message), members.map(msgspec.json.encode)))
def test_parse_incoming_is_parse_message(line: bytes) -> None:
    """The server's fast path for request lines gives what the general parser gives, for
    messages of every kind and for objects with any mix of members and values."""
    assert parse_incoming(line) == parse_message(line)
