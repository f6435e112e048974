"""Frame codec of protocol.ccproxy: spec §2 byte examples, validation, any split, bounds."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import RemoteProtocolError
from protocol.ccproxy import (
    HEADER_SIZE,
    MAX_HEADER_SIZE,
    MAX_PAYLOAD,
    Command,
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
    Notification,
    Stream,
    encode_frame,
)
from protocol.errors import LocalProtocolError

PING = b'{"hyperName":"ping","tokens":null}'
UNKNOWN_FOO = b'{"msg":"unknown containerID: foo"}'

# (name, frame, exact wire bytes) -- the byte examples of the spec's §2
SPEC_EXAMPLES = [
    (
        "hyper-ping",
        Frame(FrameType.COMMAND, Command.HYPER, PING),
        bytes.fromhex("000203000000000300000022") + PING,
    ),
    (
        "attach-error",
        Frame(FrameType.RESPONSE, Command.ATTACH_VM, UNKNOWN_FOO, error=True),
        bytes.fromhex("000203000000110200000022") + UNKNOWN_FOO,
    ),
    (
        "process-exited-42",
        Frame(FrameType.NOTIFICATION, Notification.PROCESS_EXITED, b"\x2a"),
        bytes.fromhex("0002030000000300000000012a"),
    ),
    (
        "stdin-eof",
        Frame(FrameType.STREAM, Stream.STDIN, b""),
        bytes.fromhex("000203000000020000000000"),
    ),
]
EXAMPLE_IDS = [name for name, _, _ in SPEC_EXAMPLES]


def decode_all(decoder: FrameDecoder) -> list[Frame]:
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    return frames


def test_spec_examples_are_what_the_spec_says() -> None:
    assert len(PING) == 0x22 and len(UNKNOWN_FOO) == 0x22


@pytest.mark.parametrize(("name", "frame", "wire"), SPEC_EXAMPLES, ids=EXAMPLE_IDS)
def test_encode_spec_example(name: str, frame: Frame, wire: bytes) -> None:
    assert encode_frame(frame) == wire


@pytest.mark.parametrize(("name", "frame", "wire"), SPEC_EXAMPLES, ids=EXAMPLE_IDS)
def test_decode_spec_example_whole(name: str, frame: Frame, wire: bytes) -> None:
    decoder = FrameDecoder()
    decoder.feed(wire)
    assert decoder.next_frame() == frame
    assert decoder.next_frame() is None
    assert decoder.buffered == 0


@pytest.mark.parametrize(("name", "frame", "wire"), SPEC_EXAMPLES, ids=EXAMPLE_IDS)
def test_decode_spec_example_byte_by_byte(name: str, frame: Frame, wire: bytes) -> None:
    decoder = FrameDecoder()
    for i in range(len(wire) - 1):
        decoder.feed(wire[i : i + 1])
        assert decoder.next_frame() is None
        assert decoder.buffered == i + 1
    decoder.feed(wire[-1:])
    assert decoder.next_frame() == frame
    assert decoder.next_frame() is None


@pytest.mark.parametrize(("name", "frame", "wire"), SPEC_EXAMPLES, ids=EXAMPLE_IDS)
def test_decode_spec_example_with_trailing_bytes(name: str, frame: Frame, wire: bytes) -> None:
    decoder = FrameDecoder()
    trailing = wire[:7]  # the start of the same frame again
    decoder.feed(wire + trailing)
    assert decoder.next_frame() == frame
    assert decoder.next_frame() is None
    assert decoder.buffered == len(trailing)
    decoder.feed(wire[7:])
    assert decoder.next_frame() == frame


def test_all_examples_back_to_back_in_one_feed() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"".join(wire for _, _, wire in SPEC_EXAMPLES))
    assert decode_all(decoder) == [frame for _, frame, _ in SPEC_EXAMPLES]
    assert decoder.buffered == 0


def long_header(words: int, frame_type: int, opcode: int, payload: bytes) -> bytes:
    """A frame with a header of ``words`` 32-bit words; the extra bytes are junk."""
    head = bytes((0, 2, words, 0, 0, 0, frame_type, opcode)) + len(payload).to_bytes(4, "big")
    return head + bytes((0xA0 + i) % 256 for i in range(4 * words - HEADER_SIZE)) + payload


@pytest.mark.parametrize("words", [4, 6, 255], ids=["16-byte", "24-byte", "1020-byte"])
def test_longer_header_is_skipped(words: int) -> None:
    wire = long_header(words, FrameType.COMMAND, Command.HYPER, PING)
    expected = Frame(FrameType.COMMAND, Command.HYPER, PING)
    for chunk in (len(wire), 1, 5):
        decoder = FrameDecoder()
        for i in range(0, len(wire), chunk):
            decoder.feed(wire[i : i + chunk])
        decoder.feed(SPEC_EXAMPLES[3][2])
        assert decode_all(decoder) == [expected, SPEC_EXAMPLES[3][1]]


def test_reserved_bits_and_bytes_are_ignored() -> None:
    wire = bytearray(encode_frame(Frame(FrameType.RESPONSE, Command.HYPER, b"ok", error=True)))
    wire[3:6] = b"\xff\xff\xff"
    wire[6] |= 0xE0
    decoder = FrameDecoder()
    decoder.feed(bytes(wire))
    assert decoder.next_frame() == Frame(FrameType.RESPONSE, Command.HYPER, b"ok", error=True)


def test_error_flag_on_a_command_is_decoded_as_sent() -> None:
    decoder = FrameDecoder()
    decoder.feed(bytes.fromhex("000203000000100300000000"))
    assert decoder.next_frame() == Frame(FrameType.COMMAND, Command.HYPER, b"", error=True)


# (id, 12-byte header, words expected in the FrameError message)
BAD_HEADERS = [
    ("version-1", "000103000000000300000000", "version 1"),
    ("version-3", "000303000000000300000000", "version 3"),
    ("version-0x0102", "010203000000000300000000", "version 258"),
    ("header-length-0", "000200000000000300000000", "header length of 0 words"),
    ("header-length-2", "000202000000000300000000", "header length of 2 words"),
    ("type-4", "000203000000040000000000", "frame type 4"),
    ("type-15", "0002030000000f0000000000", "frame type 15"),
    ("command-opcode-7", "000203000000000700000000", "opcode 7 out of range for command"),
    ("response-opcode-7", "000203000000010700000000", "opcode 7 out of range for response"),
    ("stream-opcode-4", "000203000000020400000000", "opcode 4 out of range for stream"),
    ("notification-opcode-2", "000203000000030200000000", "opcode 2 out of range for notif"),
    ("payload-too-long", "0002030000000003ffffffff", "payload length 4294967295 exceeds"),
]


@pytest.mark.parametrize(
    ("header", "fault"), [b[1:] for b in BAD_HEADERS], ids=[b[0] for b in BAD_HEADERS]
)
def test_invalid_header_raises_frame_error_naming_the_fault(header: str, fault: str) -> None:
    decoder = FrameDecoder()
    decoder.feed(bytes.fromhex(header) + b"{}")
    with pytest.raises(FrameError, match=fault) as info:
        decoder.next_frame()
    assert isinstance(info.value, RemoteProtocolError)
    # sticky: the stream cannot be resynchronised, later bytes are dropped
    decoder.feed(SPEC_EXAMPLES[0][2])
    with pytest.raises(FrameError, match=fault):
        decoder.next_frame()
    assert decoder.buffered == 0


def test_valid_frames_before_a_bad_header_are_returned_first() -> None:
    decoder = FrameDecoder()
    decoder.feed(SPEC_EXAMPLES[0][2] + bytes.fromhex(BAD_HEADERS[0][1]))
    assert decoder.next_frame() == SPEC_EXAMPLES[0][1]
    with pytest.raises(FrameError):
        decoder.next_frame()


def test_oversized_payload_is_refused_from_the_header_alone() -> None:
    decoder = FrameDecoder(max_payload=100)
    assert decoder.max_payload == 100
    decoder.feed(encode_frame(Frame(FrameType.STREAM, Stream.STDIN, b"x" * 100)))
    assert decoder.next_frame() == Frame(FrameType.STREAM, Stream.STDIN, b"x" * 100)
    decoder.feed(bytes.fromhex("000203000000020000000065"))  # 101 bytes announced, none sent
    with pytest.raises(FrameError, match="payload length 101 exceeds the maximum 100"):
        decoder.next_frame()


def test_default_maximum_is_the_named_constant() -> None:
    assert FrameDecoder().max_payload == MAX_PAYLOAD == 4 * 1024 * 1024
    decoder = FrameDecoder()
    decoder.feed((MAX_PAYLOAD + 1).to_bytes(4, "big").rjust(12, b"\x00"))
    with pytest.raises(FrameError):  # version 0 is checked first; any fault is a FrameError
        decoder.next_frame()
    decoder = FrameDecoder()
    decoder.feed(bytes.fromhex("0002030000000200") + (MAX_PAYLOAD + 1).to_bytes(4, "big"))
    with pytest.raises(FrameError, match="exceeds the maximum"):
        decoder.next_frame()


def test_negative_maximum_is_refused() -> None:
    with pytest.raises(ValueError, match="max_payload"):
        FrameDecoder(max_payload=-1)


@pytest.mark.parametrize(
    ("frame", "fault"),
    [
        (Frame(FrameType.COMMAND, 7), "opcode 7 out of range for command"),
        (Frame(FrameType.STREAM, 4), "opcode 4 out of range for stream"),
        (Frame(FrameType.NOTIFICATION, 2), "opcode 2 out of range for notification"),
        (Frame(FrameType.RESPONSE, -1), "opcode -1 out of range for response"),
        (Frame(4, 0), "unknown frame type 4"),  # type: ignore[arg-type]
        (Frame(FrameType.STREAM, 0, b"x" * (MAX_PAYLOAD + 1)), "exceeds the maximum"),
    ],
)
def test_encode_refuses_what_the_protocol_cannot_carry(frame: Frame, fault: str) -> None:
    with pytest.raises(LocalProtocolError, match=fault):
        encode_frame(frame)


def test_encode_writes_version_2_header_length_3_and_error_flag() -> None:
    wire = encode_frame(Frame(FrameType.RESPONSE, Command.SIGNAL, b"abc", error=True))
    assert wire == bytes.fromhex("000203000000110600000003") + b"abc"
    assert (
        encode_frame(Frame(FrameType.STREAM, Stream.LOG, b"{}"))
        == bytes.fromhex("000203000000020300000002") + b"{}"
    )


# --- property tests -------------------------------------------------------------------------

OPCODE_COUNTS = {
    FrameType.COMMAND: 7,
    FrameType.RESPONSE: 7,
    FrameType.STREAM: 4,
    FrameType.NOTIFICATION: 2,
}


@st.composite
def frames(draw: st.DrawFn) -> Frame:
    frame_type = draw(st.sampled_from(FrameType))
    opcode = draw(st.integers(0, OPCODE_COUNTS[frame_type] - 1))
    return Frame(frame_type, opcode, draw(st.binary(max_size=64)), draw(st.booleans()))


@given(st.lists(frames(), max_size=8), st.lists(st.integers(1, 40), min_size=1))
def test_roundtrip_any_frames_any_split(frame_list: list[Frame], splits: list[int]) -> None:
    wire = b"".join(encode_frame(f) for f in frame_list)
    decoder = FrameDecoder()
    out: list[Frame] = []
    pos = 0
    i = 0
    while pos < len(wire):
        step = splits[i % len(splits)]
        decoder.feed(wire[pos : pos + step])
        pos += step
        i += 1
        out.extend(decode_all(decoder))
    assert out == frame_list
    assert decoder.buffered == 0


@given(frames())
def test_decode_of_encode_is_identity(frame: Frame) -> None:
    decoder = FrameDecoder()
    decoder.feed(encode_frame(frame))
    assert decoder.next_frame() == frame


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=64), max_size=10), st.integers(0, 200))
def test_any_bytes_decode_or_raise_remote_error_with_bounded_buffer(
    chunks: list[bytes], max_payload: int
) -> None:
    decoder = FrameDecoder(max_payload=max_payload)
    try:
        for chunk in chunks:
            decoder.feed(chunk)
            for frame in decode_all(decoder):
                assert len(frame.payload) <= max_payload
            assert decoder.buffered <= MAX_HEADER_SIZE + max_payload
    except RemoteProtocolError:
        assert decoder.buffered == 0


@settings(max_examples=200)
@given(st.binary(min_size=4, max_size=4), st.binary(max_size=300))
def test_headers_with_valid_prefix_decode_or_raise(tail: bytes, rest: bytes) -> None:
    # a valid version and header length, random type/opcode/length: exercises deeper checks
    decoder = FrameDecoder(max_payload=256)
    decoder.feed(bytes.fromhex("000203000000") + tail[:2] + b"\x00\x00" + tail[2:] + rest)
    try:
        decode_all(decoder)
    except FrameError:
        return
    assert decoder.buffered <= MAX_HEADER_SIZE + 256


@pytest.mark.parametrize("size", [2047, 2048, 100_000, MAX_PAYLOAD])
def test_large_payloads_any_split(size: int) -> None:
    payload = bytes(i % 251 for i in range(size))
    frame = Frame(FrameType.STREAM, Stream.STDOUT, payload)
    wire = encode_frame(frame) * 2
    decoder = FrameDecoder()
    out: list[Frame] = []
    for i in range(0, len(wire), 65_536):
        decoder.feed(wire[i : i + 65_536])
        out.extend(decode_all(decoder))
        assert decoder.buffered <= HEADER_SIZE + MAX_PAYLOAD
    assert out == [frame, frame]
