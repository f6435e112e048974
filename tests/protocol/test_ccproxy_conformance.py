"""protocol.ccproxy against the byte-exact transcripts of the reference cc-proxy 3.0.23.

The transcripts are kept in the repository under ``tests/data/conformance/ccproxy/``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest

from protocol import NEED_DATA, LocalProtocolError, RemoteProtocolError
from protocol.ccproxy import (
    AttachVM,
    ClientConnection,
    Command,
    CommandReceived,
    ConnectShim,
    ErrorReply,
    ErrorResponse,
    Frame,
    FrameDecoder,
    FrameError,
    FrameType,
    Hyper,
    LogEntry,
    ProcessExited,
    RegisterVM,
    Response,
    ServerConnection,
    Signal,
    Stream,
    StreamData,
    StreamReceived,
    UnregisterVM,
    VMResponse,
    decode_payload,
    encode_frame,
    encode_payload,
)
from tests.paths import CCPROXY_TRANSCRIPTS

TRANSCRIPTS = sorted(CCPROXY_TRANSCRIPTS.glob("*.json"))
OPCODE_COUNTS = {0: 7, 1: 7, 2: 4, 3: 1}


def load(path: Path) -> dict[str, Any]:
    with path.open() as f:
        data: dict[str, Any] = json.load(f)
    return data


def ccproxy_frames() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in TRANSCRIPTS:
        for frame in load(path)["frames"]:
            if frame["kind"] == "ccproxy":
                yield f"{path.stem}:{frame['n']}:{frame['channel']}:{frame['dir']}", frame


FRAMES = list(ccproxy_frames())


def is_valid(header: dict[str, Any]) -> bool:
    return (
        header["version"] == 2
        and header["header_words"] >= 3
        and header["type"] in OPCODE_COUNTS
        and header["opcode"] < OPCODE_COUNTS[header["type"]]
    )


def test_transcripts_are_present() -> None:
    names = {p.stem for p in TRANSCRIPTS}
    assert {"errors", "pipelining", "stdin_and_signal", "newcontainer_with_shim"} <= names
    assert len(FRAMES) > 600


@pytest.mark.parametrize("frame", [f for _, f in FRAMES], ids=[i for i, _ in FRAMES])
def test_every_transcript_frame_decodes_and_reencodes(frame: dict[str, Any]) -> None:
    header = frame["header"]
    raw = bytes.fromhex(frame["raw_hex"])
    decoder = FrameDecoder()
    decoder.feed(raw)
    if not is_valid(header):
        with pytest.raises(FrameError):
            decoder.next_frame()
        return
    decoded = decoder.next_frame()
    assert decoded == Frame(
        FrameType(header["type"]),
        header["opcode"],
        bytes.fromhex(frame["payload_hex"]),
        header["in_error"],
    )
    assert decoder.next_frame() is None and decoder.buffered == 0
    if header["header_words"] == 3 and header["reserved_hex"] == "000000":
        assert encode_frame(decoded) == raw


def test_invalid_frames_of_the_transcripts_are_the_expected_ones() -> None:
    invalid = {i.split(":")[2] for i, f in FRAMES if not is_valid(f["header"])}
    assert invalid == {"bad-version", "bad-version3", "bad-opcode", "bad-type"}


# payload Struct of each (frame type, opcode, error flag)
PAYLOAD_CLASSES: dict[tuple[int, int, bool], type[msgspec.Struct]] = {
    (0, Command.REGISTER_VM, False): RegisterVM,
    (0, Command.UNREGISTER_VM, False): UnregisterVM,
    (0, Command.ATTACH_VM, False): AttachVM,
    (0, Command.HYPER, False): Hyper,
    (0, Command.CONNECT_SHIM, False): ConnectShim,
    (0, Command.SIGNAL, False): Signal,
    (2, Stream.LOG, False): LogEntry,
    (1, Command.REGISTER_VM, False): VMResponse,
    (1, Command.ATTACH_VM, False): VMResponse,
    **{(1, c, True): ErrorResponse for c in Command},
}
# client payloads the recording driver wrote deliberately malformed (errors scenario)
MALFORMED = {
    b'{"containerId":',
    b'{"containerId":42}',
    b'{"hyperName":"ping","tokens":null,"data":{not json}}',
}
JSON_FRAMES = [
    (i, f)
    for i, f in FRAMES
    if is_valid(f["header"])
    and f["payload_hex"]
    and (f["header"]["type"], f["header"]["opcode"], f["header"]["in_error"]) in PAYLOAD_CLASSES
]


def test_payload_coverage() -> None:
    covered = {
        PAYLOAD_CLASSES[(f["header"]["type"], f["header"]["opcode"], f["header"]["in_error"])]
        for _, f in JSON_FRAMES
    }
    assert covered == set(PAYLOAD_CLASSES.values())


@pytest.mark.parametrize("frame", [f for _, f in JSON_FRAMES], ids=[i for i, _ in JSON_FRAMES])
def test_payload_json_decodes_and_reencodes_exactly(frame: dict[str, Any]) -> None:
    header = frame["header"]
    cls = PAYLOAD_CLASSES[(header["type"], header["opcode"], header["in_error"])]
    payload = bytes.fromhex(frame["payload_hex"])
    if payload in MALFORMED:
        with pytest.raises(RemoteProtocolError):
            decode_payload(cls, payload)
        return
    obj = decode_payload(cls, payload)
    assert msgspec.json.decode(encode_payload(obj)) == msgspec.json.decode(payload)
    assert encode_payload(obj) == payload


# --- whole connections: replay each client channel through the connection objects ----------


@dataclass
class Channel:
    name: str
    c2p: list[dict[str, Any]] = field(default_factory=list)
    p2c: list[dict[str, Any]] = field(default_factory=list)
    c2p_chunks: list[bytes] = field(default_factory=list)
    p2c_chunks: list[bytes] = field(default_factory=list)
    closed_by_proxy: bool = False


def channels() -> Iterator[tuple[str, Channel]]:
    for path in TRANSCRIPTS:
        transcript = load(path)
        found: dict[str, Channel] = {}
        for frame in transcript["frames"]:
            if frame["kind"] == "ccproxy":
                chan = found.setdefault(frame["channel"], Channel(frame["channel"]))
                getattr(chan, frame["dir"]).append(frame)
            elif frame["kind"] == "conn" and frame["dir"] == "p2c":
                chan = found.setdefault(frame["channel"], Channel(frame["channel"]))
                chan.closed_by_proxy = True
        for chunk in transcript["chunks"]:
            if chunk["kind"] == "ccproxy" and chunk["channel"] in found:
                chan = found[chunk["channel"]]
                getattr(chan, chunk["dir"] + "_chunks").append(bytes.fromhex(chunk["hex"]))
        for name, chan in found.items():
            yield f"{path.stem}:{name}", chan


CHANNELS = list(channels())


def test_chunks_rebuild_the_frame_streams() -> None:
    for _, chan in CHANNELS:
        for direction in ("c2p", "p2c"):
            frames = getattr(chan, direction)
            stream = b"".join(bytes.fromhex(f["raw_hex"]) for f in frames)
            assert b"".join(getattr(chan, direction + "_chunks")) == stream


def drain(conn: ClientConnection | ServerConnection) -> list[Any]:
    events = []
    while (event := conn.next_event()) is not NEED_DATA:
        events.append(event)
    return events


def expected_client_event(frame: dict[str, Any]) -> Any:
    header = frame["header"]
    payload = bytes.fromhex(frame["payload_hex"])
    if header["type"] == FrameType.RESPONSE:
        command = Command(header["opcode"])
        if header["in_error"]:
            return ErrorReply(command, decode_payload(ErrorResponse, payload).msg)
        return Response(command, payload)
    if header["type"] == FrameType.STREAM:
        return StreamData(Stream(header["opcode"]), payload)
    return ProcessExited(payload[0])


@pytest.mark.parametrize("chan", [c for _, c in CHANNELS], ids=[i for i, _ in CHANNELS])
def test_client_replay_pipelined(chan: Channel) -> None:
    """Send every client frame of the channel first (pipelined), then feed the proxy's bytes in
    the chunks it wrote them: the events are the transcript's frames, in order."""
    client = ClientConnection("runtime")
    for frame in chan.c2p:
        header = frame["header"]
        raw = bytes.fromhex(frame["raw_hex"])
        payload = bytes.fromhex(frame["payload_hex"])
        try:
            if not is_valid(header):
                raise LocalProtocolError("not encodable")
            if header["type"] == FrameType.COMMAND:
                wire = client.send_command(Command(header["opcode"]), payload)
            elif header["type"] == FrameType.STREAM:
                wire = client.send_stream(Stream(header["opcode"]), payload)
            else:
                raise LocalProtocolError("clients send no such frame")
        except LocalProtocolError:
            # what the client refuses to send, the reference proxy did not accept either
            assert chan.closed_by_proxy and not chan.p2c
            return
        if header["in_error"]:
            assert wire[6] | 0x10 == raw[6]
        else:
            assert wire == raw
    for chunk in chan.p2c_chunks:
        client.receive_data(chunk)
    events = drain(client)
    assert events == [expected_client_event(f) for f in chan.p2c]
    if chan.name.startswith("shim") and any(f["header"]["opcode"] == 4 for f in chan.c2p):
        assert client.role == "shim" or any(isinstance(e, ErrorReply) for e in events)
    client.receive_data(b"")
    assert client.next_event() is NEED_DATA


def expected_server_event(frame: dict[str, Any]) -> Any:
    header = frame["header"]
    payload = bytes.fromhex(frame["payload_hex"])
    if header["type"] == FrameType.COMMAND:
        return CommandReceived(Command(header["opcode"]), payload)
    return StreamReceived(Stream(header["opcode"]), payload)


@pytest.mark.parametrize("chan", [c for _, c in CHANNELS], ids=[i for i, _ in CHANNELS])
def test_server_replay(chan: Channel) -> None:
    """Feed the client's bytes into a ServerConnection as they were written, then produce the
    proxy's frames with its send_* methods: byte-exact, in the recorded order."""
    server = ServerConnection()
    events: list[Any] = []
    try:
        for chunk in chan.c2p_chunks:
            server.receive_data(chunk)
            events.extend(drain(server))
    except RemoteProtocolError:
        # what we reject, the reference proxy closed the connection for, answering nothing
        assert chan.closed_by_proxy and not chan.p2c
        return
    assert events == [expected_server_event(f) for f in chan.c2p]
    for frame in chan.p2c:
        header = frame["header"]
        payload = bytes.fromhex(frame["payload_hex"])
        if header["type"] == FrameType.RESPONSE and header["in_error"]:
            message = decode_payload(ErrorResponse, payload).msg
            wire = server.send_error(Command(header["opcode"]), message)
        elif header["type"] == FrameType.RESPONSE:
            wire = server.send_response(Command(header["opcode"]), payload)
        elif header["type"] == FrameType.STREAM:
            wire = server.send_stream(Stream(header["opcode"]), payload)
        else:
            wire = server.send_process_exited(payload[0])
        assert wire == bytes.fromhex(frame["raw_hex"])
