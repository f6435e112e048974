"""ctl and tty framing: spec byte examples, every split, errors, bounds, round trips."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import LocalProtocolError, RemoteProtocolError
from protocol.hyperstart import (
    CTL_HEADER_SIZE,
    MAX_CTL_FRAME,
    TTY_HEADER_SIZE,
    CtlDecoder,
    CtlFrame,
    CtlFrameError,
    TtyDecoder,
    TtyFrame,
    TtyFrameError,
    encode_ctl,
    encode_tty,
)

# (hex from the spec, frame) -- spec §2 and §6.1 examples
CTL_EXAMPLES = [
    ("00 00 00 0c 00 00 00 08", CtlFrame(12, b"")),  # PING
    ("00 00 00 08 00 00 00 08", CtlFrame(8, b"")),  # READY
    ("00 00 00 0e 00 00 00 0c 00 00 00 08", CtlFrame(14, b"\x00\x00\x00\x08")),  # NEXT(8)
    ("00 00 00 09 00 00 00 0c 00 00 10 94", CtlFrame(9, (4244).to_bytes(4, "big"))),  # ACK 4244
]
TTY_EXAMPLES = [
    ("00 00 00 00 00 00 00 03 00 00 00 12 68 65 6c 6c 6f 0a", TtyFrame(3, b"hello\n")),
    ("00 00 00 00 00 00 00 03 00 00 00 0c", TtyFrame(3, b"")),  # EOF
    ("00 00 00 00 00 00 00 03 00 00 00 0d 2a", TtyFrame(3, b"\x2a")),  # exit status 42
]


def _unhex(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


def _drain(decoder: CtlDecoder | TtyDecoder) -> list[object]:
    frames: list[object] = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    return frames


def _feed_split(decoder: CtlDecoder | TtyDecoder, data: bytes, step: int) -> list[object]:
    frames: list[object] = []
    for start in range(0, len(data), step):
        decoder.feed(data[start : start + step])
        frames.extend(_drain(decoder))
    return frames


@pytest.mark.parametrize(("hex_", "frame"), CTL_EXAMPLES)
def test_ctl_example_encodes_exactly(hex_: str, frame: CtlFrame) -> None:
    assert encode_ctl(frame.code, frame.payload) == _unhex(hex_)


@pytest.mark.parametrize(("hex_", "frame"), TTY_EXAMPLES)
def test_tty_example_encodes_exactly(hex_: str, frame: TtyFrame) -> None:
    assert encode_tty(frame.seq, frame.data) == _unhex(hex_)


@pytest.mark.parametrize("step", [None, 1, 3])
@pytest.mark.parametrize(("hex_", "frame"), CTL_EXAMPLES)
def test_ctl_example_decodes_whole_bytewise_and_with_trailing(
    hex_: str, frame: CtlFrame, step: int | None
) -> None:
    data = _unhex(hex_)
    trailing = b"\x00\x00\x00"  # an incomplete next header
    decoder = CtlDecoder()
    got = _feed_split(decoder, data + trailing, step or len(data) + len(trailing))
    assert got == [frame]
    assert decoder.buffered == len(trailing)


@pytest.mark.parametrize("step", [None, 1, 5])
@pytest.mark.parametrize(("hex_", "frame"), TTY_EXAMPLES)
def test_tty_example_decodes_whole_bytewise_and_with_trailing(
    hex_: str, frame: TtyFrame, step: int | None
) -> None:
    data = _unhex(hex_)
    trailing = _unhex(TTY_EXAMPLES[0][0])[:7]
    decoder = TtyDecoder()
    got = _feed_split(decoder, data + trailing, step or len(data) + len(trailing))
    assert got == [frame]
    assert decoder.buffered == len(trailing)


def test_all_ctl_examples_back_to_back_in_one_feed() -> None:
    decoder = CtlDecoder()
    decoder.feed(b"".join(_unhex(h) for h, _ in CTL_EXAMPLES))
    assert _drain(decoder) == [f for _, f in CTL_EXAMPLES]
    assert decoder.buffered == 0


@pytest.mark.parametrize(
    ("header", "fault"),
    [
        ("0000000c00000004", "ctl frame length 4 (code 12) is below the 8-byte header"),
        ("0000000c00000000", "ctl frame length 0 (code 12) is below the 8-byte header"),
        ("0000000c00000007", "below the 8-byte header"),
        ("00000011ffffffff", "ctl frame length 4294967295 (code 17) exceeds the maximum 1024"),
        ("0000001100000401", "exceeds the maximum 1024"),
    ],
)
def test_ctl_bad_length_is_refused_before_buffering(header: str, fault: str) -> None:
    decoder = CtlDecoder(max_frame=1024)
    decoder.feed(bytes.fromhex(header))
    with pytest.raises(CtlFrameError, match=re.escape(fault)):
        decoder.next_frame()
    # sticky: the stream cannot be resynchronised
    decoder.feed(encode_ctl(12))
    with pytest.raises(CtlFrameError, match=re.escape(fault)):
        decoder.next_frame()


def test_ctl_length_equal_to_max_is_accepted() -> None:
    decoder = CtlDecoder(max_frame=16)
    decoder.feed(encode_ctl(9, b"12345678"))
    assert decoder.next_frame() == CtlFrame(9, b"12345678")


@pytest.mark.parametrize(
    ("header", "fault"),
    [
        ("00000000000000030000000b", "tty frame length 11 (seq 3) is below the 12-byte header"),
        ("000000000000000300000000", "below the 12-byte header"),
        ("000000000000000100001001", "tty frame length 4097 (seq 1) exceeds the maximum 4096"),
    ],
)
def test_tty_bad_length(header: str, fault: str) -> None:
    decoder = TtyDecoder(max_frame=4096)
    decoder.feed(bytes.fromhex(header))
    with pytest.raises(TtyFrameError, match=re.escape(fault)):
        decoder.next_frame()
    with pytest.raises(TtyFrameError):
        decoder.next_frame()


def test_frame_errors_are_remote_protocol_errors() -> None:
    assert issubclass(CtlFrameError, RemoteProtocolError)
    assert issubclass(TtyFrameError, RemoteProtocolError)


def test_encode_ctl_limit_is_the_cc_writer_limit() -> None:
    payload = b"x" * (MAX_CTL_FRAME - CTL_HEADER_SIZE)
    assert len(encode_ctl(17, payload, limit=MAX_CTL_FRAME)) == MAX_CTL_FRAME
    with pytest.raises(LocalProtocolError, match="message too long"):
        encode_ctl(17, payload + b"x", limit=MAX_CTL_FRAME)
    assert len(encode_ctl(17, payload + b"x")) == MAX_CTL_FRAME + 1  # no limit unless asked


@pytest.mark.parametrize("code", [-1, 1 << 32])
def test_encode_ctl_refuses_codes_beyond_u32(code: int) -> None:
    with pytest.raises(LocalProtocolError, match="u32"):
        encode_ctl(code)


@pytest.mark.parametrize("seq", [-1, 1 << 64])
def test_encode_tty_refuses_seqs_beyond_u64(seq: int) -> None:
    with pytest.raises(LocalProtocolError, match="u64"):
        encode_tty(seq, b"x")


@pytest.mark.parametrize("max_frame", [0, 7])
def test_ctl_decoder_max_below_header_is_a_programming_error(max_frame: int) -> None:
    with pytest.raises(ValueError, match="below"):
        CtlDecoder(max_frame=max_frame)


def test_tty_decoder_max_below_header_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="below"):
        TtyDecoder(max_frame=TTY_HEADER_SIZE - 1)


# --- properties ------------------------------------------------------------------------------

ctl_frames = st.builds(CtlFrame, st.integers(0, 0xFFFFFFFF), st.binary(max_size=300))
tty_frames = st.builds(TtyFrame, st.integers(0, 0xFFFFFFFFFFFFFFFF), st.binary(max_size=300))


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


@given(st.lists(ctl_frames, max_size=8), st.lists(st.integers(0, 10_000), max_size=12))
def test_ctl_round_trip_any_split(frames: list[CtlFrame], cuts: list[int]) -> None:
    data = b"".join(encode_ctl(f.code, f.payload) for f in frames)
    decoder = CtlDecoder()
    got: list[object] = []
    for chunk in _chunks(data, cuts):
        decoder.feed(chunk)
        got.extend(_drain(decoder))
    assert got == frames
    assert decoder.buffered == 0


@given(st.lists(tty_frames, max_size=8), st.lists(st.integers(0, 10_000), max_size=12))
def test_tty_round_trip_any_split(frames: list[TtyFrame], cuts: list[int]) -> None:
    data = b"".join(encode_tty(f.seq, f.data) for f in frames)
    decoder = TtyDecoder()
    got: list[object] = []
    for chunk in _chunks(data, cuts):
        decoder.feed(chunk)
        got.extend(_drain(decoder))
    assert got == frames


MAX_FRAME_FOR_FUZZ = 256


@pytest.mark.parametrize("decoder_type", [CtlDecoder, TtyDecoder])
@given(chunks=st.lists(st.binary(max_size=64), max_size=20))
def test_any_bytes_decode_or_raise_with_bounded_buffer(
    decoder_type: type[CtlDecoder] | type[TtyDecoder], chunks: list[bytes]
) -> None:
    decoder = decoder_type(max_frame=MAX_FRAME_FOR_FUZZ)
    for chunk in chunks:
        decoder.feed(chunk)
        try:
            frames = _drain(decoder)
        except RemoteProtocolError:
            return
        for frame in frames:
            assert isinstance(frame, CtlFrame | TtyFrame)
        # what stays buffered is at most one incomplete frame within the maximum
        assert decoder.buffered < MAX_FRAME_FOR_FUZZ
