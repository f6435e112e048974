"""protocol.ttrpc: frames fed whole, byte by byte and with trailing bytes; the server's and the
client's rules for stream ids and oversized messages; any bytes parse or raise."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import NEED_DATA, LocalProtocolError, RemoteProtocolError
from protocol.ttrpc import (
    HEADER_SIZE,
    MAX_DATA,
    ClientConnection,
    Frame,
    FrameDecoder,
    InvalidStream,
    MessageType,
    OversizedFrame,
    RequestReceived,
    ResponseReceived,
    ServerConnection,
    TooLarge,
    encode_frame,
)

# A request as containerd 1.6 sends it: stream 1, type 1, flags 0, then a ttrpc.Request whose
# service is "containerd.task.v2.Task" and method "Connect", payload 0a 02 "t1".
CONNECT_DATA = b"\x0a\x17containerd.task.v2.Task" + b"\x12\x07Connect" + b"\x1a\x04\x0a\x02t1"
CONNECT_FRAME = struct.pack(">IIBB", len(CONNECT_DATA), 1, 1, 0) + CONNECT_DATA


def drain_server(conn: ServerConnection) -> list[object]:
    events: list[object] = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
    return events


def test_header_layout() -> None:
    assert encode_frame(1, MessageType.REQUEST, CONNECT_DATA) == CONNECT_FRAME
    assert encode_frame(0xFFFFFFFF, 2, b"", 0x04) == b"\0\0\0\0\xff\xff\xff\xff\x02\x04"
    assert HEADER_SIZE == 10 and MAX_DATA == 4 * 1024 * 1024


@pytest.mark.parametrize("split", ["whole", "bytewise"])
def test_server_request_any_split(split: str) -> None:
    conn = ServerConnection()
    stream = CONNECT_FRAME * 2 + encode_frame(3, 1, b"")
    chunks = [stream] if split == "whole" else [stream[i : i + 1] for i in range(len(stream))]
    events: list[object] = []
    for chunk in chunks:
        conn.receive_data(chunk)
        events += drain_server(conn)
    assert events == [
        RequestReceived(1, CONNECT_DATA),
        RequestReceived(1, CONNECT_DATA),
        RequestReceived(3, b""),
    ]


def test_trailing_partial_header_is_kept() -> None:
    dec = FrameDecoder()
    dec.feed(CONNECT_FRAME + CONNECT_FRAME[:7])
    assert dec.next_frame() == Frame(1, 1, 0, CONNECT_DATA)
    assert dec.next_frame() is NEED_DATA
    assert dec.buffered == 7
    dec.feed(CONNECT_FRAME[7:])
    assert dec.next_frame() == Frame(1, 1, 0, CONNECT_DATA)


def test_server_even_stream_is_invalid_and_other_types_ignored() -> None:
    conn = ServerConnection()
    conn.receive_data(encode_frame(2, 1, b"x") + encode_frame(5, 2, b"y") + encode_frame(7, 3, b""))
    conn.receive_data(encode_frame(0, 1, b""))
    events = drain_server(conn)
    assert [type(e) for e in events] == [InvalidStream, InvalidStream]
    assert events[0] == InvalidStream(2, "StreamID must be odd for client initiated streams")
    assert conn.ignored == 2


def test_oversized_request_is_dropped_and_reported_before_its_data() -> None:
    conn = ServerConnection(max_data=16)
    conn.receive_data(struct.pack(">IIBB", 1000, 9, 1, 0) + b"a" * 10)
    assert drain_server(conn) == [TooLarge(9, 1000, 16)]
    assert conn._decoder.buffered == 0  # nothing of the oversized data is held
    # the rest of its data arrives byte by byte, then a normal request
    rest = b"b" * 990 + encode_frame(11, 1, b"ok")
    for i in range(len(rest)):
        conn.receive_data(rest[i : i + 1])
        assert conn._decoder.buffered <= HEADER_SIZE + 2
    assert drain_server(conn) == [RequestReceived(11, b"ok")]
    assert TooLarge(9, 1000, 16).message == (
        "message length 1000 exceed maximum message size of 16"
    )


def test_oversized_default_limit_is_4_mib() -> None:
    dec = FrameDecoder()
    dec.feed(struct.pack(">IIBB", MAX_DATA + 1, 1, 1, 0))
    assert dec.next_frame() == OversizedFrame(1, 1, MAX_DATA + 1)
    dec2 = FrameDecoder()
    dec2.feed(struct.pack(">IIBB", MAX_DATA, 1, 1, 0))
    assert dec2.next_frame() is NEED_DATA  # exactly the maximum is allowed: it waits for data


def test_encode_refuses_what_the_wire_cannot_carry() -> None:
    with pytest.raises(LocalProtocolError, match="maximum message size"):
        encode_frame(1, 1, bytes(MAX_DATA + 1))
    with pytest.raises(LocalProtocolError, match="32 bits"):
        encode_frame(1 << 32, 1, b"")
    with pytest.raises(LocalProtocolError):
        encode_frame(1, 256, b"")


def test_client_odd_ids_and_out_of_order_responses() -> None:
    client = ClientConnection()
    ids = [client.send_request(b"r")[0] for _ in range(3)]
    assert ids == [1, 3, 5]
    assert client.send_request(b"q")[1] == encode_frame(7, 1, b"q")
    client.receive_data(encode_frame(5, 2, b"five") + encode_frame(1, 2, b"one"))
    assert client.next_event() == ResponseReceived(5, b"five")
    assert client.next_event() == ResponseReceived(1, b"one")
    assert client.next_event() is NEED_DATA
    assert client.outstanding == 2


def test_client_refuses_unknown_stream_and_requests_but_drops_forgotten_answers() -> None:
    client = ClientConnection()
    sid, _ = client.send_request(b"")
    client.forget(sid)
    client.receive_data(encode_frame(sid, 2, b"late"))
    assert client.next_event() is NEED_DATA
    client.receive_data(encode_frame(99, 2, b""))
    with pytest.raises(RemoteProtocolError, match="stream 99"):
        client.next_event()
    other = ClientConnection()
    other.send_request(b"")
    other.receive_data(encode_frame(1, 1, b""))
    with pytest.raises(RemoteProtocolError, match="message type 1"):
        other.next_event()


def test_client_oversized_response_fails_that_call() -> None:
    client = ClientConnection(max_data=4)
    client.send_request(b"")
    client.receive_data(struct.pack(">IIBB", 5, 1, 2, 0) + b"12345")
    assert client.next_event() == TooLarge(1, 5, 4)
    assert client.outstanding == 0


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=40))
def test_any_bytes_parse_or_raise_server(data: bytes, step: int) -> None:
    conn = ServerConnection(max_data=64)
    for i in range(0, len(data), step):
        conn.receive_data(data[i : i + step])
        for event in drain_server(conn):
            assert isinstance(event, RequestReceived | InvalidStream | TooLarge)
        assert conn._decoder.buffered <= HEADER_SIZE + 64 + step


@given(st.binary(max_size=300), st.integers(min_value=1, max_value=40))
def test_any_bytes_parse_or_raise_client(data: bytes, step: int) -> None:
    client = ClientConnection(max_data=64)
    for _ in range(8):
        client.send_request(b"")
    try:
        for i in range(0, len(data), step):
            client.receive_data(data[i : i + step])
            while (event := client.next_event()) is not NEED_DATA:
                assert isinstance(event, ResponseReceived | TooLarge)
    except RemoteProtocolError:
        pass


@given(
    st.lists(st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=50)), min_size=1, max_size=8),
    st.integers(min_value=1, max_value=17),
)
def test_round_trip_any_split(frames: list[tuple[int, bytes]], step: int) -> None:
    wire = b"".join(encode_frame(sid, 1, data) for sid, data in frames)
    dec = FrameDecoder()
    out = []
    for i in range(0, len(wire), step):
        dec.feed(wire[i : i + step])
        while (frame := dec.next_frame()) is not NEED_DATA:
            assert isinstance(frame, Frame)
            out.append((frame.stream_id, frame.data))
    assert out == frames
