"""The hot paths of protocol.ccproxy are the general paths, only faster.

``ClientConnection.send_command`` with a known command and a bytes payload,
``ClientConnection.next_payload`` and ``FrameDecoder.next_payload_of`` must give exactly what the
general code gives: the same bytes, the same events, the same errors, for any input split.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import NEED_DATA, LocalProtocolError, RemoteProtocolError
from protocol.ccproxy import (
    MAX_PAYLOAD,
    ClientConnection,
    Command,
    ConnectShim,
    ErrorResponse,
    Frame,
    FrameDecoder,
    FrameType,
    Response,
    Stream,
    encode_frame,
    encode_payload,
)

COMMANDS = [c for c in Command if c not in (Command.CONNECT_SHIM, Command.DISCONNECT_SHIM)]


def long_header(words: int, flags: int, opcode: int, payload: bytes) -> bytes:
    head = bytes((0, 2, words, 0, 0, 0, flags, opcode)) + len(payload).to_bytes(4, "big")
    return head + bytes(4 * words - 12) + payload


@st.composite
def wire_frames(draw: st.DrawFn) -> bytes:
    """One frame as a proxy might send it: mostly responses, sometimes odd ones."""
    kind = draw(st.sampled_from(["response", "response", "error", "stream", "exited", "odd"]))
    opcode = draw(st.sampled_from(list(Command)))
    payload = draw(st.binary(max_size=24))
    if kind == "response":
        return encode_frame(Frame(FrameType.RESPONSE, opcode, payload))
    if kind == "error":
        message = draw(st.text(max_size=8))
        body = draw(st.sampled_from([encode_payload(ErrorResponse(message)), b"", b"{"]))
        return encode_frame(Frame(FrameType.RESPONSE, opcode, body, error=True))
    if kind == "stream":
        stream = draw(st.sampled_from(list(Stream)))
        return encode_frame(Frame(FrameType.STREAM, stream, payload))
    if kind == "exited":
        return encode_frame(Frame(FrameType.NOTIFICATION, 0, payload[:1]))
    # a response with a longer header, reserved bits set, or a command frame
    flags = draw(st.sampled_from([FrameType.RESPONSE, FrameType.RESPONSE | 0x20, 0]))
    return long_header(draw(st.integers(3, 5)), flags, opcode, payload)


def chunked(data: bytes, sizes: list[int]) -> list[bytes]:
    chunks, pos, i = [], 0, 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        chunks.append(data[pos : pos + size])
        pos += size
        i += 1
    return chunks


def outcomes(client: ClientConnection, chunks: list[bytes], *, fast: bool) -> list[Any]:
    """What a reader sees: payloads of success responses, other events, the final error."""
    seen: list[Any] = []
    try:
        for chunk in [*chunks, b""]:
            client.receive_data(chunk)
            while True:
                if fast:
                    payload = client.next_payload()
                    if payload is NEED_DATA:
                        assert client.next_event() is NEED_DATA
                        break
                    if payload is not None:
                        seen.append(("payload", payload, client.pending))
                        continue
                event = client.next_event()
                if event is NEED_DATA:
                    break
                if isinstance(event, Response):
                    seen.append(("payload", event.payload, client.pending))
                else:
                    seen.append((event, client.pending))
    except RemoteProtocolError as exc:
        seen.append(("error", type(exc), str(exc)))
    return seen


@settings(max_examples=400)
@given(
    st.sampled_from(["runtime", "shim"]),
    st.lists(st.sampled_from([*COMMANDS, Command.CONNECT_SHIM]), max_size=6),
    st.data(),
    st.binary(max_size=6),
    st.lists(st.integers(1, 40), min_size=1, max_size=4),
)
def test_next_payload_sees_what_next_event_sees(
    role: Any, commands: list[Command], data: st.DataObject, tail: bytes, sizes: list[int]
) -> None:
    frames = []
    for command in commands:  # mostly the answers, in order, with odd frames in between
        if data.draw(st.booleans()):
            frames.append(data.draw(wire_frames()))
        payload = data.draw(st.binary(max_size=24))
        words = data.draw(st.sampled_from([3, 3, 4]))
        flags = data.draw(st.sampled_from([FrameType.RESPONSE] * 3 + [FrameType.RESPONSE | 0x20]))
        frames.append(long_header(words, flags, command, payload))
    frames.extend(data.draw(st.lists(wire_frames(), max_size=3)))
    chunks = chunked(b"".join(frames) + tail, sizes)
    results = []
    for fast in (False, True):
        client = ClientConnection(role)
        for command in commands:
            client.send_command(
                command, ConnectShim("t") if command is Command.CONNECT_SHIM else b""
            )
        results.append((outcomes(client, chunks, fast=fast), client.pending, client.role))
    assert results[0] == results[1]


def test_next_payload_takes_only_success_responses_to_the_oldest_command() -> None:
    client = ClientConnection()
    client.send_command(Command.HYPER, b"{}")
    client.send_command(Command.ATTACH_VM, b"{}")
    assert client.next_payload() is NEED_DATA  # nothing received
    client.receive_data(encode_frame(Frame(FrameType.RESPONSE, Command.HYPER, b"ack"))[:-1])
    assert client.next_payload() is None  # incomplete
    client.receive_data(b"k")
    assert client.next_payload() == b"ack"
    assert client.pending == 1
    # an error response is left for next_event, untouched
    client.receive_data(
        encode_frame(Frame(FrameType.RESPONSE, Command.ATTACH_VM, b'{"msg":"no"}', error=True))
    )
    assert client.next_payload() is None
    assert client.pending == 1
    event = client.next_event()
    assert event.message == "no"  # type: ignore[union-attr]
    assert client.next_payload() is NEED_DATA  # none pending, nothing buffered
    assert client.next_event() is NEED_DATA
    client.receive_data(b"")
    assert client.next_payload() is None  # EOF is next_event's to report
    assert client.next_event() is NEED_DATA


def test_next_payload_leaves_a_mismatched_response_to_next_event() -> None:
    client = ClientConnection()
    client.send_command(Command.HYPER, b"{}")
    client.receive_data(encode_frame(Frame(FrameType.RESPONSE, Command.SIGNAL, b"")))
    assert client.next_payload() is None
    with pytest.raises(RemoteProtocolError, match="oldest pending command is HYPER"):
        client.next_event()
    assert client.next_payload() is None  # the error is sticky
    with pytest.raises(RemoteProtocolError):
        client.next_event()


def test_next_payload_of_interleaves_with_next_frame() -> None:
    frames = [
        Frame(FrameType.RESPONSE, Command.HYPER, b"a"),
        Frame(FrameType.STREAM, Stream.STDOUT, b"b"),
        Frame(FrameType.RESPONSE, Command.HYPER, b"c" * 5000),
        Frame(FrameType.RESPONSE, Command.HYPER, b"", error=True),
        Frame(FrameType.RESPONSE, Command.HYPER, b""),
    ]
    decoder = FrameDecoder()
    decoder.feed(b"".join(encode_frame(f) for f in frames))
    got: list[Any] = []
    while True:
        payload = decoder.next_payload_of(FrameType.RESPONSE, Command.HYPER)
        if payload is not None:
            got.append(payload)
            continue
        frame = decoder.next_frame()
        if frame is None:
            break
        got.append(frame)
    assert got == [b"a", frames[1], b"c" * 5000, frames[3], b""]
    assert decoder.buffered == 0


def test_next_payload_of_refuses_an_oversized_frame_to_next_frame() -> None:
    decoder = FrameDecoder(max_payload=4)
    decoder.feed(encode_frame(Frame(FrameType.RESPONSE, Command.HYPER, b"12345")))
    assert decoder.next_payload_of(FrameType.RESPONSE, Command.HYPER) is None
    with pytest.raises(RemoteProtocolError, match="exceeds the maximum 4"):
        decoder.next_frame()
    assert decoder.next_payload_of(FrameType.RESPONSE, Command.HYPER) is None


@settings(max_examples=200)
@given(st.sampled_from(COMMANDS), st.binary(max_size=64))
def test_send_command_hot_path_writes_the_general_frame(command: Command, payload: bytes) -> None:
    client = ClientConnection()
    wire = client.send_command(command, payload)
    assert wire == encode_frame(Frame(FrameType.COMMAND, command, payload))
    # the general path (a plain int, a bytearray) gives the same bytes and the same queue
    other = ClientConnection()
    assert other.send_command(int(command), bytearray(payload)) == wire  # type: ignore[arg-type]
    assert client.pending == other.pending == 1


def test_send_command_hot_path_refusals() -> None:
    client = ClientConnection()
    with pytest.raises(LocalProtocolError, match=f"exceeds the maximum {MAX_PAYLOAD}"):
        client.send_command(Command.HYPER, bytes(MAX_PAYLOAD + 1))
    assert client.pending == 0
    shim = ClientConnection("shim")
    shim.send_command(Command.DISCONNECT_SHIM)
    with pytest.raises(LocalProtocolError, match="DisconnectShim was sent"):
        shim.send_command(Command.HYPER, b"{}")
    assert shim.pending == 0
