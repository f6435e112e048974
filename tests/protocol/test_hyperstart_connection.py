"""Host and agent ctl endpoints and the host tty endpoint, driven with bytes only."""

from __future__ import annotations

import pytest

from protocol import NEED_DATA, LocalProtocolError, RemoteProtocolError
from protocol.hyperstart import (
    CC,
    HYPER,
    MAX_EOF_TRACKED,
    MAX_TTY_FRAME_HYPER,
    AgentCtlConnection,
    AsyncEvent,
    Code,
    CtlFrame,
    CtlFrameError,
    Dialect,
    HostCtlConnection,
    HostTtyConnection,
    MessageError,
    NextAck,
    ProcessAsyncEvent,
    Ready,
    Reply,
    TtyData,
    TtyDecoder,
    TtyEof,
    TtyExitStatus,
    TtyFrame,
    UnexpectedReply,
    encode_ctl,
    encode_tty,
)

READY = encode_ctl(Code.READY)
ACK = encode_ctl(Code.ACK)
ERROR = encode_ctl(Code.ERROR)
EVENT_JSON = b'{"container":"c1","process":"init","event":"finished","status":3}'
EVENT = ProcessAsyncEvent(container="c1", process="init", event="finished", status=3)


def next_frame(count: int) -> bytes:
    return encode_ctl(Code.NEXT, count.to_bytes(4, "big"))


def events(conn: HostCtlConnection | AgentCtlConnection | HostTtyConnection) -> list[object]:
    out: list[object] = []
    while (event := conn.next_event()) is not NEED_DATA:
        out.append(event)
    return out


def feed_bytewise(
    conn: HostCtlConnection | AgentCtlConnection | HostTtyConnection, data: bytes
) -> list[object]:
    out: list[object] = []
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
        out.extend(events(conn))
    return out


# --- HostCtlConnection -----------------------------------------------------------------------

HOST_CASES: list[tuple[str, Dialect, list[tuple[int, bytes]], bytes, list[object]]] = [
    (
        "ready then FIFO replies, NEXT skipped",
        HYPER,
        [(Code.VERSION, b""), (Code.PING, b""), (99, b"")],
        READY
        + next_frame(8)
        + encode_ctl(Code.ACK, b"\x00\x00\x10\x94")
        + next_frame(8)
        + ACK
        + next_frame(8)
        + ERROR,
        [
            Ready(),
            NextAck(8),
            Reply(Code.VERSION, True, b"\x00\x00\x10\x94"),
            NextAck(8),
            Reply(Code.PING, True, b""),
            NextAck(8),
            Reply(99, False, b""),
        ],
    ),
    (
        "hyper PROCESSASYNCEVENT (23) is an event, not a reply",
        HYPER,
        [(Code.NEWCONTAINER, b"{}")],
        READY + encode_ctl(23, EVENT_JSON) + ACK,
        [Ready(), AsyncEvent(EVENT), Reply(Code.NEWCONTAINER, True, b"")],
    ),
    (
        "cc: code 23 sent is PSCONTAINER, its ACK carries the ps text",
        CC,
        [(23, b'{"container":"c1","format":"table","psargs":null}')],
        READY + encode_ctl(Code.ACK, b"PID CMD\n1 sh\n"),
        [Ready(), Reply(23, True, b"PID CMD\n1 sh\n")],
    ),
    (
        "cc: code 24 is the event, 23 from the agent is unexpected",
        CC,
        [(Code.PING, b"")],
        encode_ctl(24, EVENT_JSON) + encode_ctl(23, b"x") + ACK,
        [AsyncEvent(EVENT), UnexpectedReply(23, b"x"), Reply(Code.PING, True, b"")],
    ),
    (
        "hyper: code 24 from the agent is unexpected",
        HYPER,
        [],
        encode_ctl(24, EVENT_JSON),
        [UnexpectedReply(24, EVENT_JSON)],
    ),
    (
        "ack/error with nothing pending, second READY",
        CC,
        [],
        READY + ACK + encode_ctl(Code.ERROR, b"boom") + READY,
        [
            Ready(),
            UnexpectedReply(Code.ACK, b""),
            UnexpectedReply(Code.ERROR, b"boom"),
            UnexpectedReply(Code.READY, b""),
        ],
    ),
    (
        "unexpected codes keep the FIFO in step",
        CC,
        [(Code.STARTPOD, b"{}"), (Code.PING, b"")],
        encode_ctl(Code.GETPOD) + encode_ctl(Code.ERROR, b"Pod already started") + ACK,
        [
            UnexpectedReply(Code.GETPOD, b""),
            Reply(Code.STARTPOD, False, b"Pod already started"),
            Reply(Code.PING, True, b""),
        ],
    ),
    (
        "replies before READY (reconnect) still match",
        HYPER,
        [(Code.PING, b"")],
        ACK,
        [Reply(Code.PING, True, b"")],
    ),
]


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize(
    ("dialect", "commands", "incoming", "expected"),
    [case[1:] for case in HOST_CASES],
    ids=[case[0] for case in HOST_CASES],
)
def test_host_ctl_events(
    dialect: Dialect,
    commands: list[tuple[int, bytes]],
    incoming: bytes,
    expected: list[object],
    bytewise: bool,
) -> None:
    conn = HostCtlConnection(dialect)
    for code, payload in commands:
        assert conn.send_command(code, payload) == encode_ctl(code, payload)
    assert conn.pending == len(commands)
    if bytewise:
        got = feed_bytewise(conn, incoming)
    else:
        conn.receive_data(incoming + b"\x00\x00")  # trailing partial header
        got = events(conn)
    assert got == expected
    replies = sum(isinstance(e, Reply) for e in expected)
    assert conn.pending == len(commands) - replies


def test_host_ready_flag() -> None:
    conn = HostCtlConnection()
    assert not conn.ready_seen
    conn.receive_data(READY)
    assert events(conn) == [Ready()]
    assert conn.ready_seen


def test_host_send_command_limit() -> None:
    conn = HostCtlConnection()
    with pytest.raises(LocalProtocolError, match="message too long"):
        conn.send_command(Code.NEWCONTAINER, b"x" * 10233, limit=10240)
    assert conn.pending == 0  # nothing recorded for a refused command
    assert len(conn.send_command(Code.NEWCONTAINER, b"x" * 10232, limit=10240)) == 10240
    assert conn.pending == 1


@pytest.mark.parametrize("payload", [b"", b"\x00\x00\x08", b"\x00\x00\x00\x08\x00"])
def test_host_next_with_bad_payload(payload: bytes) -> None:
    conn = HostCtlConnection(HYPER)
    conn.receive_data(encode_ctl(Code.NEXT, payload))
    with pytest.raises(
        RemoteProtocolError, match=f"NEXT payload must be 4 bytes, got {len(payload)}"
    ):
        conn.next_event()


@pytest.mark.parametrize(
    "payload", [b"", b"not json", b'{"status":"x"}', b'{"container":"c","extra":1}']
)
def test_host_bad_event_payload(payload: bytes) -> None:
    conn = HostCtlConnection(HYPER)
    conn.receive_data(encode_ctl(23, payload))
    with pytest.raises(MessageError, match="ProcessAsyncEvent"):
        conn.next_event()


def test_cc_event_is_decoded_leniently() -> None:
    conn = HostCtlConnection(CC)
    conn.receive_data(encode_ctl(24, b'{"container":"c","process":"p","event":"e","x":1}'))
    assert events(conn) == [AsyncEvent(ProcessAsyncEvent(container="c", process="p", event="e"))]


def test_host_bad_length_and_eof() -> None:
    conn = HostCtlConnection()
    conn.receive_data(bytes.fromhex("0000000c00000004"))
    with pytest.raises(CtlFrameError, match="below the 8-byte header"):
        conn.next_event()

    conn = HostCtlConnection(max_frame=64)
    conn.receive_data(encode_ctl(Code.ACK, b"x" * 57))
    with pytest.raises(CtlFrameError, match="exceeds the maximum 64"):
        conn.next_event()

    conn = HostCtlConnection()
    conn.receive_data(READY + ACK[:5])
    conn.receive_data(b"")
    assert conn.next_event() == Ready()
    with pytest.raises(RemoteProtocolError, match="closed in the middle of a frame"):
        conn.next_event()

    conn = HostCtlConnection()
    conn.receive_data(READY)
    conn.receive_data(b"")
    assert events(conn) == [Ready()]  # a clean EOF is not an error


# --- AgentCtlConnection ----------------------------------------------------------------------


def test_agent_receives_commands_any_split() -> None:
    stream = encode_ctl(Code.PING) + encode_ctl(Code.STARTPOD, b'{"hostname":"h"}') + b"\x00"
    expected = [CtlFrame(Code.PING, b""), CtlFrame(Code.STARTPOD, b'{"hostname":"h"}')]
    conn = AgentCtlConnection()
    conn.receive_data(stream)
    assert events(conn) == expected
    assert feed_bytewise(AgentCtlConnection(HYPER), stream) == expected


@pytest.mark.parametrize(
    ("dialect", "event_code", "event_json"),
    [
        (HYPER, 23, EVENT_JSON),
        (CC, 24, EVENT_JSON),
        (HYPER, 23, b'{"container":"c1","process":"ex1","event":"finished","status":0}'),
        (CC, 24, b'{"container":"c1","process":"ex1","event":"finished"}'),
    ],
)
def test_agent_messages_bytes(dialect: Dialect, event_code: int, event_json: bytes) -> None:
    agent = AgentCtlConnection(dialect)
    assert agent.send_ready() == bytes.fromhex("0000000800000008")
    assert agent.send_ack() == bytes.fromhex("0000000900000008")
    assert agent.send_ack(b"\x00\x00\x10\x94") == bytes.fromhex("000000090000000c00001094")
    assert agent.send_error(b"no such container\x00") == encode_ctl(10, b"no such container\x00")
    assert agent.send_next(8) == bytes.fromhex("0000000e0000000c00000008")
    event = ProcessAsyncEvent(
        container="c1",
        process="init" if b"init" in event_json else "ex1",
        event="finished",
        status=3 if b":3" in event_json else 0,
    )
    assert agent.send_event(event) == encode_ctl(event_code, event_json)
    # and the host of the same dialect sees it as the event
    host = HostCtlConnection(dialect)
    host.receive_data(agent.send_event(event))
    assert events(host) == [AsyncEvent(event)]


@pytest.mark.parametrize("count", [-1, 1 << 32])
def test_agent_next_count_must_fit(count: int) -> None:
    with pytest.raises(LocalProtocolError, match="u32"):
        AgentCtlConnection().send_next(count)


def test_agent_eof_mid_frame() -> None:
    agent = AgentCtlConnection()
    agent.receive_data(encode_ctl(Code.PING)[:3])
    agent.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="closed in the middle"):
        agent.next_event()


# --- HostTtyConnection -----------------------------------------------------------------------

TTY_CASES: list[tuple[str, bool, bytes, list[object]]] = [
    (
        "cc: data, EOF, 1-byte status",
        True,
        encode_tty(3, b"hello\n") + encode_tty(3) + encode_tty(3, b"\x2a"),
        [TtyData(3, b"hello\n"), TtyEof(3), TtyExitStatus(3, 42)],
    ),
    (
        "a 1-byte frame before EOF is output",
        True,
        encode_tty(3, b"x") + encode_tty(4, b"y") + encode_tty(3) + encode_tty(3, b"\x00"),
        [TtyData(3, b"x"), TtyData(4, b"y"), TtyEof(3), TtyExitStatus(3, 0)],
    ),
    (
        "status rule is per seq: other seqs interleave",
        True,
        encode_tty(3)
        + encode_tty(4, b"z")
        + encode_tty(5)
        + encode_tty(3, b"\xff")
        + encode_tty(5, b"\x01"),
        [TtyEof(3), TtyData(4, b"z"), TtyEof(5), TtyExitStatus(3, 255), TtyExitStatus(5, 1)],
    ),
    (
        "only the first frame after EOF can be the status",
        True,
        encode_tty(3) + encode_tty(3, b"ab") + encode_tty(3, b"c"),
        [TtyEof(3), TtyData(3, b"ab"), TtyData(3, b"c")],
    ),
    (
        "hyperhq: no status frames",
        False,
        encode_tty(1, b"out\n") + encode_tty(2, b"err\n") + encode_tty(1) + encode_tty(1, b"\x03"),
        [TtyData(1, b"out\n"), TtyData(2, b"err\n"), TtyEof(1), TtyData(1, b"\x03")],
    ),
]


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
@pytest.mark.parametrize(
    ("status_frames", "incoming", "expected"),
    [case[1:] for case in TTY_CASES],
    ids=[case[0] for case in TTY_CASES],
)
def test_host_tty_events(
    status_frames: bool, incoming: bytes, expected: list[object], bytewise: bool
) -> None:
    conn = HostTtyConnection(exit_status_frames=status_frames)
    if bytewise:
        got = feed_bytewise(conn, incoming)
    else:
        conn.receive_data(incoming + b"\x00" * 11)
        got = events(conn)
    assert got == expected


def test_tty_eof_tracking_is_bounded() -> None:
    conn = HostTtyConnection()
    conn.receive_data(b"".join(encode_tty(seq) for seq in range(MAX_EOF_TRACKED + 10)))
    assert len(events(conn)) == MAX_EOF_TRACKED + 10
    conn.receive_data(encode_tty(0, b"\x05") + encode_tty(MAX_EOF_TRACKED + 9, b"\x05"))
    # the oldest EOFs were forgotten: seq 0's 1-byte frame is plain data now
    assert events(conn) == [TtyData(0, b"\x05"), TtyExitStatus(MAX_EOF_TRACKED + 9, 5)]


def test_tty_bad_length_and_eof() -> None:
    conn = HostTtyConnection(max_frame=MAX_TTY_FRAME_HYPER)
    conn.receive_data(encode_tty(1, b"x" * MAX_TTY_FRAME_HYPER))
    with pytest.raises(RemoteProtocolError, match="exceeds the maximum 4096"):
        conn.next_event()
    conn = HostTtyConnection()
    conn.receive_data(encode_tty(1, b"abc")[:-1])
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="closed in the middle"):
        conn.next_event()


def _decode_all(data: bytes) -> list[TtyFrame]:
    decoder = TtyDecoder()
    decoder.feed(data)
    frames: list[TtyFrame] = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    return frames


@pytest.mark.parametrize(
    ("data", "max_frame", "sizes"),
    [
        (b"", None, [12]),
        (b"", 13, [12]),
        (b"hello", None, [17]),
        (b"x" * 4084, MAX_TTY_FRAME_HYPER, [4096]),
        (b"x" * 4085, MAX_TTY_FRAME_HYPER, [4096, 13]),
        (b"x" * 10001, 512, [512] * 20 + [13]),
        (b"abc", 13, [13, 13, 13]),
    ],
)
def test_send_stdin_chunks(data: bytes, max_frame: int | None, sizes: list[int]) -> None:
    wire = HostTtyConnection.send_stdin(7, data, max_frame=max_frame)
    frames = _decode_all(wire)
    assert [len(f.data) + 12 for f in frames] == sizes
    assert all(f.seq == 7 for f in frames)
    assert b"".join(f.data for f in frames) == data


def test_send_stdin_refuses_room_less_max_and_sends_eof() -> None:
    with pytest.raises(LocalProtocolError, match="no room"):
        HostTtyConnection.send_stdin(1, b"x", max_frame=12)
    assert HostTtyConnection().send_eof(3) == bytes.fromhex("00000000000000030000000c")


def test_a_bad_event_or_next_is_consumed_and_the_stream_goes_on() -> None:
    conn = HostCtlConnection(HYPER)
    conn.send_command(Code.PING)
    conn.receive_data(encode_ctl(23, b"{oops") + encode_ctl(Code.NEXT, b"") + ACK)
    with pytest.raises(MessageError):
        conn.next_event()
    with pytest.raises(RemoteProtocolError, match="NEXT payload"):
        conn.next_event()
    assert events(conn) == [Reply(Code.PING, True, b"")]
