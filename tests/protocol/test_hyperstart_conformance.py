"""Replay of the real hyperhq/hyperstart v1.1.0 transcripts (conformance/hyperstart/*.json).

Every recorded frame decodes; the four recorded byte streams decode, fed whole and in the
recorded write pieces, into the recorded frames and the expected host events; the JSON bodies
the recording host sent decode strictly in the HYPER dialect and re-encode to the same bytes.
"""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import msgspec
import pytest

from protocol import NEED_DATA
from protocol.hyperstart import (
    CTL_HEADER_SIZE,
    HYPER,
    MAX_TTY_FRAME_HYPER,
    AgentCtlConnection,
    AsyncEvent,
    Code,
    Container,
    CtlDecoder,
    CtlFrame,
    CtlFrameError,
    ExecCommand,
    HostCtlConnection,
    HostTtyConnection,
    KillCommand,
    MessageError,
    NextAck,
    Pod,
    ProcessAsyncEvent,
    Ready,
    RemoveCommand,
    Reply,
    SignalCommand,
    TtyData,
    TtyDecoder,
    TtyEof,
    TtyFrame,
    TtyFrameError,
    WindowSizeMessage,
    decode_message,
    encode_ctl,
    encode_message,
    encode_tty,
)
from tests.paths import HYPERSTART_TRANSCRIPTS

TRANSCRIPTS = HYPERSTART_TRANSCRIPTS

Record = dict[str, Any]


def _runs() -> list[tuple[str, Record]]:
    runs: list[tuple[str, Record]] = []
    for path in sorted(TRANSCRIPTS.glob("*.json")):
        data = json.loads(path.read_text())
        runs.extend((f"{path.stem}/{run['run']}", run) for run in data["runs"])
    return runs


RUNS = _runs()
RUN_IDS = [name for name, _ in RUNS]
# run -> what the agent-side decoder must refuse in the h2a stream (the agent died on it)
BAD_H2A = {
    "boot_version_ping/bad_length": ("ctl", CtlFrameError, "length 4 (code 12) is below"),
    "large_message/tty_big_stdin": ("tty", TtyFrameError, "length 4112 (seq 1) exceeds"),
}
HOST_BODIES: dict[int, type[msgspec.Struct]] = {
    Code.STARTPOD: Pod,
    Code.NEWCONTAINER: Container,
    Code.EXECCMD: ExecCommand,
    Code.WINSIZE: WindowSizeMessage,
    Code.KILLCONTAINER: KillCommand,
    Code.REMOVECONTAINER: RemoveCommand,
    HYPER.signal_process or 0: SignalCommand,
}


def _frames(run: Record, ch: str, direction: str) -> list[Record]:
    return [
        r
        for r in run["records"]
        if r["kind"] == "frame" and r["ch"] == ch and r["dir"] == direction
    ]


def _raw(frame: Record) -> bytes:
    return bytes.fromhex(frame["header_hex"] + frame["payload_hex"])


def _drain(decoder: CtlDecoder | TtyDecoder) -> list[Any]:
    out: list[Any] = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    return out


def test_transcripts_are_present() -> None:
    assert len(RUNS) >= 9
    assert {"pod_container_echo/main", "exec_and_signals/main"} <= set(RUN_IDS)


@pytest.mark.parametrize(("name", "run"), RUNS, ids=RUN_IDS)
def test_every_recorded_frame_decodes_and_reencodes(name: str, run: Record) -> None:
    for ch in ("ctl", "tty"):
        for direction in ("a2h", "h2a"):
            for frame in _frames(run, ch, direction):
                raw = _raw(frame)
                decoder: CtlDecoder | TtyDecoder = CtlDecoder() if ch == "ctl" else TtyDecoder()
                decoder.feed(raw)
                if ch == "ctl" and frame["length"] < CTL_HEADER_SIZE:
                    # the recorded PING with length 4: it killed the agent
                    assert name == "boot_version_ping/bad_length"
                    with pytest.raises(CtlFrameError, match="is below the 8-byte header"):
                        decoder.next_frame()
                    continue
                got = decoder.next_frame()
                payload = bytes.fromhex(frame["payload_hex"])
                if ch == "ctl":
                    assert got == CtlFrame(frame["code"], payload)
                    assert encode_ctl(frame["code"], payload) == raw
                else:
                    assert got == TtyFrame(frame["seq"], payload)
                    assert encode_tty(frame["seq"], payload) == raw
                    assert (payload == b"") == frame["eof"]


@pytest.mark.parametrize(("name", "run"), RUNS, ids=RUN_IDS)
def test_streams_are_the_frames(name: str, run: Record) -> None:
    for key, stream_hex in run["raw_hex"].items():
        ch, direction = key.split("_")
        assert bytes.fromhex(stream_hex) == b"".join(_raw(f) for f in _frames(run, ch, direction))


def _expected_host_events(run: Record) -> list[object]:
    """What a host that sent the recorded h2a commands must see for the a2h ctl stream."""
    sent = [f["code"] for f in _frames(run, "ctl", "h2a")]
    expected: list[object] = []
    for frame in _frames(run, "ctl", "a2h"):
        payload = bytes.fromhex(frame["payload_hex"])
        if frame["name"] == "READY":
            expected.append(Ready())
        elif frame["name"] == "NEXT":
            expected.append(NextAck(frame["payload_u32"]))
        elif frame["name"] in ("ACK", "ERROR"):
            expected.append(Reply(sent.pop(0), frame["name"] == "ACK", payload))
        else:
            assert frame["name"] == "PROCESSASYNCEVENT"
            expected.append(AsyncEvent(ProcessAsyncEvent(**frame["payload_json"])))
    return expected


@pytest.mark.parametrize("split", ["whole", "bytewise"])
@pytest.mark.parametrize(("name", "run"), RUNS, ids=RUN_IDS)
def test_host_ctl_replays_agent_stream(name: str, run: Record, split: str) -> None:
    host = HostCtlConnection(HYPER)
    for frame in _frames(run, "ctl", "h2a"):
        host.send_command(frame["code"], bytes.fromhex(frame["payload_hex"]))
    stream = bytes.fromhex(run["raw_hex"]["ctl_a2h"])
    pieces = [stream] if split == "whole" else [stream[i : i + 1] for i in range(len(stream))]
    got: list[object] = []
    for piece in pieces:
        host.receive_data(piece)
        while (event := host.next_event()) is not NEED_DATA:
            got.append(event)
    host.receive_data(b"")  # the recordings end with the agent closing the channel
    assert host.next_event() is NEED_DATA
    assert got == _expected_host_events(run)


def test_pod_container_echo_events_by_hand() -> None:
    run = dict(RUNS)["pod_container_echo/main"]
    assert _expected_host_events(run) == [
        Ready(),
        NextAck(8),
        NextAck(61),
        Reply(Code.STARTPOD, True, b""),
        NextAck(8),
        NextAck(214),
        Reply(Code.NEWCONTAINER, True, b""),
        AsyncEvent(ProcessAsyncEvent("c1", "init", "finished", status=3)),
        NextAck(8),
        NextAck(18),
        Reply(Code.REMOVECONTAINER, False, b""),  # the container was freed when init exited
        NextAck(8),
        Reply(Code.DESTROYPOD, True, b""),
    ]


@pytest.mark.parametrize(("name", "run"), RUNS, ids=RUN_IDS)
def test_agent_ctl_replays_host_stream_in_recorded_writes(name: str, run: Record) -> None:
    agent = AgentCtlConnection(HYPER)
    stream = bytes.fromhex(run["raw_hex"]["ctl_h2a"])
    frames = _frames(run, "ctl", "h2a")
    # cut the stream where the recording host's writes were cut
    cuts = {0, len(stream)}
    offset = 0
    for frame in frames:
        for write in frame.get("writes", []):
            cuts.add(offset + write["off"])
        offset += frame["length"] if frame["length"] >= 8 else 8
    points = sorted(cuts)
    got: list[object] = []
    bad = BAD_H2A.get(name)
    try:
        for start, end in itertools.pairwise(points):
            agent.receive_data(stream[start:end])
            while (event := agent.next_event()) is not NEED_DATA:
                got.append(event)
    except CtlFrameError as exc:
        assert bad is not None and bad[0] == "ctl"
        assert bad[2] in str(exc)
        return
    assert not (bad and bad[0] == "ctl")
    assert got == [CtlFrame(f["code"], bytes.fromhex(f["payload_hex"])) for f in frames]


@pytest.mark.parametrize(("name", "run"), RUNS, ids=RUN_IDS)
def test_host_tty_replays_agent_stream(name: str, run: Record) -> None:
    tty = HostTtyConnection(exit_status_frames=False)
    tty.receive_data(bytes.fromhex(run["raw_hex"]["tty_a2h"]))
    got: list[object] = []
    while (event := tty.next_event()) is not NEED_DATA:
        got.append(event)
    expected = [
        TtyEof(f["seq"]) if f["eof"] else TtyData(f["seq"], bytes.fromhex(f["payload_hex"]))
        for f in _frames(run, "tty", "a2h")
    ]
    assert got == expected


@pytest.mark.parametrize(("name", "run"), RUNS, ids=RUN_IDS)
def test_tty_h2a_stream_with_the_hyperhq_limit(name: str, run: Record) -> None:
    decoder = TtyDecoder(max_frame=MAX_TTY_FRAME_HYPER)
    decoder.feed(bytes.fromhex(run["raw_hex"]["tty_h2a"]))
    frames = _frames(run, "tty", "h2a")
    bad = BAD_H2A.get(name)
    if bad and bad[0] == "tty":
        assert decoder.next_frame() == TtyFrame(1, bytes.fromhex(frames[0]["payload_hex"]))
        with pytest.raises(TtyFrameError, match=re.escape(bad[2])):
            decoder.next_frame()
        return
    assert _drain(decoder) == [TtyFrame(f["seq"], bytes.fromhex(f["payload_hex"])) for f in frames]


def _go_escaped(payload: bytes) -> bytes:
    for raw, escaped in ((b"<", b"\\u003c"), (b">", b"\\u003e"), (b"&", b"\\u0026")):
        payload = payload.replace(raw, escaped)
    return payload


def _host_bodies() -> list[tuple[str, int, bytes, str]]:
    bodies: dict[tuple[int, bytes], tuple[str, int, bytes, str]] = {}
    for name, run in RUNS:
        ctl_in = _frames(run, "ctl", "h2a")
        replies = [f for f in _frames(run, "ctl", "a2h") if f["name"] in ("ACK", "ERROR")]
        for index, frame in enumerate(ctl_in):
            payload = bytes.fromhex(frame["payload_hex"])
            if frame["code"] in HOST_BODIES and payload:
                answer = replies[index]["name"] if index < len(replies) else "none"
                bodies.setdefault(
                    (frame["code"], payload),
                    (f"{name}#{frame['i']}", frame["code"], payload, answer),
                )
    return sorted(bodies.values())


HOST_BODY_CASES = _host_bodies()


def test_host_bodies_cover_every_command_kind() -> None:
    assert {code for _, code, _, _ in HOST_BODY_CASES} == set(HOST_BODIES)


@pytest.mark.parametrize(
    ("code", "payload", "answer"),
    [case[1:] for case in HOST_BODY_CASES],
    ids=[case[0] for case in HOST_BODY_CASES],
)
def test_host_bodies_decode_strictly_and_reencode(code: int, payload: bytes, answer: str) -> None:
    cls = HOST_BODIES[code]
    if payload.startswith(b'{"seq"'):
        # the H07/CC WINSIZE form: hyperhq answered ERROR, our strict decoding refuses it
        assert answer == "ERROR"
        with pytest.raises(MessageError, match="unknown field `seq`"):
            decode_message(cls, payload, HYPER)
        return
    msg = decode_message(cls, payload, HYPER)
    wire = encode_message(msg, HYPER)
    if code == Code.STARTPOD:
        # the recording host also sent the empty "containers":[] that Go's omitempty drops
        assert json.loads(wire) == {k: v for k, v in json.loads(payload).items() if v != []}
    else:
        # byte for byte, except that we escape < > & inside strings as Go's encoder does
        assert wire == _go_escaped(payload)
        assert json.loads(wire) == json.loads(payload)


def test_agent_events_are_reproduced_byte_for_byte() -> None:
    agent = AgentCtlConnection(HYPER)
    count = 0
    for _, run in RUNS:
        for frame in _frames(run, "ctl", "a2h"):
            if frame["code"] == HYPER.process_async_event:
                event = decode_message(
                    ProcessAsyncEvent, bytes.fromhex(frame["payload_hex"]), HYPER
                )
                assert agent.send_event(event) == _raw(frame)
                count += 1
            elif frame["name"] == "NEXT":
                assert agent.send_next(frame["payload_u32"]) == _raw(frame)
            elif frame["name"] == "READY":
                assert agent.send_ready() == _raw(frame)
            elif frame["name"] == "ACK":
                assert agent.send_ack(bytes.fromhex(frame["payload_hex"])) == _raw(frame)
            else:
                assert agent.send_error(bytes.fromhex(frame["payload_hex"])) == _raw(frame)
    assert count >= 10
