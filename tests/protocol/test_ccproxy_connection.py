"""ClientConnection and ServerConnection of protocol.ccproxy: pipelining, FIFO matching,
interleaved shim traffic, role rules and protocol violations."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import NEED_DATA, LocalProtocolError, RemoteProtocolError
from protocol.ccproxy import (
    MAX_PAYLOAD,
    UNKNOWN_ERROR,
    AttachVM,
    ClientConnection,
    Command,
    CommandReceived,
    ConnectShim,
    ErrorReply,
    Frame,
    FrameType,
    Hyper,
    IOResponse,
    LogEntry,
    PayloadError,
    ProcessExited,
    RegisterVM,
    Response,
    ServerConnection,
    Signal,
    Stream,
    StreamData,
    StreamReceived,
    VMResponse,
    encode_frame,
    encode_payload,
)

TOKEN = "pF56IaDpuax6hihJ5PneB8JypqmOvjkqY-wKGVYqgIM="
VM_OK = encode_payload(VMResponse(IOResponse("unix:///p.sock", [TOKEN])))


def response(command: Command, payload: bytes = b"") -> bytes:
    return encode_frame(Frame(FrameType.RESPONSE, command, payload))


def error(command: Command, payload: bytes) -> bytes:
    return encode_frame(Frame(FrameType.RESPONSE, command, payload, error=True))


def stream(kind: Stream, data: bytes) -> bytes:
    return encode_frame(Frame(FrameType.STREAM, kind, data))


def exited(status: int) -> bytes:
    return encode_frame(Frame(FrameType.NOTIFICATION, 0, bytes((status,))))


def events_of(conn: ClientConnection | ServerConnection, data: bytes, step: int = 0) -> list[Any]:
    """Feed ``data`` whole (step 0) or ``step`` bytes at a time, collecting every event."""
    events: list[Any] = []
    chunks = [data] if step == 0 else [data[i : i + step] for i in range(0, len(data), step)]
    for chunk in chunks:
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not NEED_DATA:
            events.append(event)
    return events


SPLITS = pytest.mark.parametrize("step", [0, 1, 5], ids=["whole", "bytewise", "by-5"])


# --- client: runtime role -------------------------------------------------------------------


@SPLITS
def test_pipelined_commands_are_matched_in_order(step: int) -> None:
    client = ClientConnection()
    sent = [
        client.send_command(Command.REGISTER_VM, RegisterVM("pod", "/c", "/t", numIOStreams=1)),
        client.send_command(Command.HYPER, Hyper("ping")),
        client.send_command(Command.ATTACH_VM, AttachVM("nope")),
        client.send_command(Command.HYPER, Hyper("startpod", None, msgspec.Raw(b"{}"))),
        client.send_command(Command.UNREGISTER_VM, b'{"containerId":"pod"}'),
    ]
    assert (
        sent[1] == bytes.fromhex("000203000000000300000022") + b'{"hyperName":"ping","tokens":null}'
    )
    assert client.pending == 5
    replies = (
        response(Command.REGISTER_VM, VM_OK)
        + response(Command.HYPER)
        + error(Command.ATTACH_VM, b'{"msg":"unknown containerID: nope"}')
        + response(Command.HYPER, b"raw ack bytes")
        + response(Command.UNREGISTER_VM)
    )
    assert events_of(client, replies, step) == [
        Response(Command.REGISTER_VM, VM_OK),
        Response(Command.HYPER, b""),
        ErrorReply(Command.ATTACH_VM, "unknown containerID: nope"),
        Response(Command.HYPER, b"raw ack bytes"),
        Response(Command.UNREGISTER_VM, b""),
    ]
    assert client.pending == 0
    assert client.role == "runtime"


def test_fifty_pings_in_one_write() -> None:
    client = ClientConnection()
    wire = b"".join(client.send_command(Command.HYPER, Hyper("ping")) for _ in range(50))
    assert len(wire) == 50 * 46
    assert client.pending == 50
    assert events_of(client, response(Command.HYPER) * 50) == [Response(Command.HYPER, b"")] * 50
    assert client.pending == 0


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", UNKNOWN_ERROR),
        (b"{}", UNKNOWN_ERROR),
        (b'{"msg":""}', UNKNOWN_ERROR),
        (b'{"Msg":"boom"}', "boom"),
        (b'{"msg":"a \\u003c b"}', "a < b"),
    ],
)
def test_error_reply_message(payload: bytes, message: str) -> None:
    client = ClientConnection()
    client.send_command(Command.HYPER, Hyper("ping"))
    assert events_of(client, error(Command.HYPER, payload)) == [ErrorReply(Command.HYPER, message)]


def test_undecodable_error_payload_is_a_remote_error() -> None:
    client = ClientConnection()
    client.send_command(Command.HYPER, Hyper("ping"))
    client.receive_data(error(Command.HYPER, b"{oops"))
    with pytest.raises(PayloadError, match="ErrorResponse"):
        client.next_event()
    with pytest.raises(PayloadError):  # sticky
        client.next_event()


# (id, commands sent, bytes received, words expected in the RemoteProtocolError)
CLIENT_VIOLATIONS = [
    ("response-none-pending", [], response(Command.HYPER), "unexpected HYPER response"),
    (
        "opcode-mismatch",
        [Command.ATTACH_VM, Command.HYPER],
        response(Command.HYPER),
        "HYPER response while the oldest pending command is ATTACH_VM",
    ),
    (
        "stdout-on-runtime",
        [Command.HYPER],
        stream(Stream.STDOUT, b"x"),
        "stream frame on a runtime",
    ),
    ("exited-on-runtime", [], exited(0), "notification frame on a runtime"),
    (
        "command-from-proxy",
        [Command.HYPER],
        encode_frame(Frame(FrameType.COMMAND, Command.HYPER)),
        "HYPER command frame from the proxy",
    ),
    ("bad-version", [Command.HYPER], bytes.fromhex("000103000000010300000000"), "version 1"),
    ("bad-header-length", [], bytes.fromhex("000202000000010300000000"), "header length of 2"),
]


@pytest.mark.parametrize(
    ("commands", "data", "fault"),
    [v[1:] for v in CLIENT_VIOLATIONS],
    ids=[v[0] for v in CLIENT_VIOLATIONS],
)
def test_client_protocol_violations(commands: list[Command], data: bytes, fault: str) -> None:
    client = ClientConnection()
    for command in commands:
        client.send_command(command)
    client.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=fault):
        client.next_event()
    client.receive_data(response(Command.HYPER))
    with pytest.raises(RemoteProtocolError, match=fault):  # sticky
        client.next_event()


def test_runtime_disconnect_shim_expects_the_error_reply() -> None:
    client = ClientConnection()
    client.send_command(Command.DISCONNECT_SHIM)
    assert client.pending == 1
    reply = error(Command.DISCONNECT_SHIM, b'{"msg":"client isn\'t a shim"}')
    assert events_of(client, reply) == [ErrorReply(Command.DISCONNECT_SHIM, "client isn't a shim")]
    client.send_command(Command.HYPER)  # the connection stays usable


# --- client: shim role ----------------------------------------------------------------------


@SPLITS
def test_shim_traffic_interleaves_with_responses(step: int) -> None:
    shim = ClientConnection("shim")
    assert shim.role == "shim"
    shim.send_command(Command.CONNECT_SHIM, ConnectShim(TOKEN))
    assert shim.send_stream(Stream.STDIN, b"hello\n") == stream(Stream.STDIN, b"hello\n")
    shim.send_command(Command.SIGNAL, Signal(28, columns=80, rows=24))
    shim.send_command(Command.SIGNAL, Signal(15))
    assert shim.pending == 3
    wire = (
        stream(Stream.STDOUT, b"early")
        + response(Command.CONNECT_SHIM)
        + stream(Stream.STDOUT, b"out")
        + stream(Stream.STDERR, b"err")
        + response(Command.SIGNAL)
        + stream(Stream.STDOUT, b"")
        + exited(143)
        + response(Command.SIGNAL)
    )
    assert events_of(shim, wire, step) == [
        StreamData(Stream.STDOUT, b"early"),
        Response(Command.CONNECT_SHIM, b""),
        StreamData(Stream.STDOUT, b"out"),
        StreamData(Stream.STDERR, b"err"),
        Response(Command.SIGNAL, b""),
        StreamData(Stream.STDOUT, b""),
        ProcessExited(143),
        Response(Command.SIGNAL, b""),
    ]
    assert shim.pending == 0
    assert shim.send_command(Command.DISCONNECT_SHIM) == bytes.fromhex("000203000000000500000000")
    assert shim.pending == 0  # the proxy closes the connection instead of answering
    with pytest.raises(LocalProtocolError, match="DisconnectShim was sent"):
        shim.send_command(Command.HYPER)
    with pytest.raises(LocalProtocolError, match="DisconnectShim was sent"):
        shim.send_stream(Stream.STDIN, b"")
    # output already in flight is still delivered, then EOF
    assert events_of(shim, stream(Stream.STDERR, b"late")) == [StreamData(Stream.STDERR, b"late")]
    shim.receive_data(b"")
    assert shim.eof
    assert shim.next_event() is NEED_DATA


def test_sigkill_before_start_exit_notification_precedes_the_response() -> None:
    shim = ClientConnection("shim")
    shim.send_command(Command.SIGNAL, Signal(9))
    assert events_of(shim, exited(0) + response(Command.SIGNAL)) == [
        ProcessExited(0),
        Response(Command.SIGNAL, b""),
    ]


def test_runtime_becomes_shim_after_successful_connect_shim() -> None:
    client = ClientConnection()
    with pytest.raises(LocalProtocolError, match="stdin on a connection that is not a shim"):
        client.send_stream(Stream.STDIN, b"x")
    client.send_command(Command.CONNECT_SHIM, ConnectShim("bogus"))
    client.send_command(Command.CONNECT_SHIM, ConnectShim(TOKEN))
    client.send_stream(Stream.STDIN, b"x")  # pipelined behind ConnectShim: allowed
    events = events_of(
        client,
        error(Command.CONNECT_SHIM, b'{"msg":"unknown token: bogus"}')
        + stream(Stream.STDOUT, b"before the response")
        + response(Command.CONNECT_SHIM),
    )
    assert events == [
        ErrorReply(Command.CONNECT_SHIM, "unknown token: bogus"),
        StreamData(Stream.STDOUT, b"before the response"),
        Response(Command.CONNECT_SHIM, b""),
    ]
    assert client.role == "shim"
    assert events_of(client, exited(7)) == [ProcessExited(7)]


def test_failed_connect_shim_leaves_a_runtime() -> None:
    client = ClientConnection()
    client.send_command(Command.CONNECT_SHIM, ConnectShim("bogus"))
    assert events_of(client, error(Command.CONNECT_SHIM, b'{"msg":"unknown token: bogus"}'))
    assert client.role == "runtime"
    client.receive_data(stream(Stream.STDOUT, b"x"))
    with pytest.raises(RemoteProtocolError, match="runtime connection"):
        client.next_event()


@pytest.mark.parametrize(
    ("data", "fault"),
    [
        (stream(Stream.STDIN, b"x"), "STDIN stream from the proxy"),
        (stream(Stream.LOG, b"{}"), "LOG stream from the proxy"),
        (encode_frame(Frame(FrameType.NOTIFICATION, 0, b"")), "payload of 0 bytes"),
        (encode_frame(Frame(FrameType.NOTIFICATION, 0, b"\x01\x02")), "payload of 2 bytes"),
        (bytes.fromhex("000203000000030100000002") + b"{}", "did not ask for it"),
        (bytes.fromhex("000203000000030200000001ff"), "opcode 2 out of range for notification"),
    ],
    ids=["stdin", "log", "exit-empty", "exit-two-bytes", "vm-exit-to-shim", "opcode-2"],
)
def test_shim_protocol_violations(data: bytes, fault: str) -> None:
    shim = ClientConnection("shim")
    shim.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=fault):
        shim.next_event()


# --- client: EOF and local errors -----------------------------------------------------------


def test_eof_inside_a_frame_is_a_remote_error() -> None:
    client = ClientConnection()
    client.send_command(Command.ATTACH_VM, AttachVM("p"))
    client.receive_data(response(Command.ATTACH_VM, VM_OK)[:-1])
    assert client.next_event() is NEED_DATA
    client.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="connection closed inside a frame"):
        client.next_event()


def test_clean_eof_and_data_after_eof() -> None:
    client = ClientConnection()
    client.send_command(Command.HYPER)
    client.receive_data(b"")
    client.receive_data(b"")  # idempotent
    assert client.next_event() is NEED_DATA
    assert client.pending == 1  # the driver decides what an unanswered command means
    with pytest.raises(LocalProtocolError, match="after EOF"):
        client.receive_data(b"x")


@pytest.mark.parametrize("command", [7, -1, 255, "HYPER", 1.0])
def test_unknown_command_is_refused(command: Any) -> None:
    client = ClientConnection()
    with pytest.raises(LocalProtocolError, match="unknown command"):
        client.send_command(command)
    assert client.pending == 0


def test_send_command_accepts_plain_ints_and_buffers() -> None:
    client = ClientConnection()
    assert client.send_command(3, bytearray(b"{}")) == client.send_command(Command.HYPER, b"{}")  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="payload"):
        client.send_command(Command.HYPER, "text")  # type: ignore[arg-type]
    assert client.pending == 2


def test_oversized_payload_is_refused_and_nothing_is_queued() -> None:
    client = ClientConnection()
    with pytest.raises(LocalProtocolError, match="exceeds the maximum"):
        client.send_command(Command.HYPER, b"x" * (MAX_PAYLOAD + 1))
    assert client.pending == 0


@pytest.mark.parametrize(
    ("kind", "role"), [(Stream.STDOUT, "shim"), (Stream.STDERR, "shim"), (4, "shim")]
)
def test_clients_do_not_send_output_streams(kind: Any, role: Any) -> None:
    with pytest.raises(LocalProtocolError):
        ClientConnection(role).send_stream(kind, b"x")


def test_log_stream_from_any_client() -> None:
    entry = encode_payload(LogEntry(source="runtime", level="info", msg="hi"))
    assert ClientConnection().send_stream(Stream.LOG, entry) == stream(Stream.LOG, entry)


def test_role_must_be_known() -> None:
    with pytest.raises(ValueError, match="role"):
        ClientConnection("proxy")  # type: ignore[arg-type]


# --- server ---------------------------------------------------------------------------------


@SPLITS
def test_server_receives_pipelined_commands_and_answers_in_order(step: int) -> None:
    client = ClientConnection("shim")
    wire = (
        client.send_command(Command.CONNECT_SHIM, ConnectShim(TOKEN))
        + client.send_stream(Stream.STDIN, b"data")
        + client.send_command(Command.SIGNAL, Signal(9))
        + client.send_stream(Stream.STDIN, b"")
        + client.send_command(Command.DISCONNECT_SHIM)
    )
    server = ServerConnection()
    assert events_of(server, wire, step) == [
        CommandReceived(Command.CONNECT_SHIM, encode_payload(ConnectShim(TOKEN))),
        StreamReceived(Stream.STDIN, b"data"),
        CommandReceived(Command.SIGNAL, b'{"signalNumber":9}'),
        StreamReceived(Stream.STDIN, b""),
        CommandReceived(Command.DISCONNECT_SHIM, b""),
    ]
    assert server.pending == 3
    with pytest.raises(LocalProtocolError, match="oldest unanswered command is CONNECT_SHIM"):
        server.send_response(Command.SIGNAL)
    out = server.send_response(Command.CONNECT_SHIM)
    out += server.send_stream(Stream.STDOUT, b"o")
    out += server.send_process_exited(0)
    out += server.send_response(Command.SIGNAL)
    assert server.pending == 1  # DisconnectShim: the proxy closes instead of answering
    assert events_of(client, out) == [
        Response(Command.CONNECT_SHIM, b""),
        StreamData(Stream.STDOUT, b"o"),
        ProcessExited(0),
        Response(Command.SIGNAL, b""),
    ]


def test_server_error_response_is_the_spec_example() -> None:
    server = ServerConnection()
    events_of(server, ClientConnection().send_command(Command.ATTACH_VM, AttachVM("foo")))
    assert (
        server.send_error(Command.ATTACH_VM, "unknown containerID: foo")
        == bytes.fromhex("000203000000110200000022") + b'{"msg":"unknown containerID: foo"}'
    )
    assert server.pending == 0
    with pytest.raises(LocalProtocolError, match="no command to answer"):
        server.send_response(Command.ATTACH_VM)


def test_server_payload_struct_response() -> None:
    server = ServerConnection()
    events_of(
        server, ClientConnection().send_command(Command.REGISTER_VM, RegisterVM("p", "c", "t"))
    )
    wire = server.send_response(Command.REGISTER_VM, VMResponse(IOResponse("unix:///p", None)))
    assert wire == response(Command.REGISTER_VM, b'{"io":{"URL":"unix:///p","tokens":null}}')


def test_server_process_exited_is_the_spec_example() -> None:
    server = ServerConnection()
    assert server.send_process_exited(42) == bytes.fromhex("0002030000000300000000012a")
    for status in (-1, 256):
        with pytest.raises(LocalProtocolError, match="one byte"):
            server.send_process_exited(status)


@pytest.mark.parametrize("kind", [Stream.STDIN, Stream.LOG, 9])
def test_server_sends_only_output_streams(kind: Any) -> None:
    with pytest.raises(LocalProtocolError):
        ServerConnection().send_stream(kind, b"x")


def test_server_accepts_long_header_and_ignores_error_flag_on_commands() -> None:
    header = bytes.fromhex("000206000000100300000022") + bytes(12)
    server = ServerConnection()
    events = events_of(server, header + b'{"hyperName":"ping","tokens":null}')
    assert events == [CommandReceived(Command.HYPER, b'{"hyperName":"ping","tokens":null}')]
    # the response still has a 12-byte header
    assert server.send_response(Command.HYPER) == bytes.fromhex("000203000000010300000000")


SERVER_VIOLATIONS = [
    ("response", response(Command.HYPER), "response frame from a client"),
    ("notification", exited(0), "notification frame from a client"),
    ("stdout", stream(Stream.STDOUT, b"x"), "STDOUT stream from a client"),
    ("stderr", stream(Stream.STDERR, b"x"), "STDERR stream from a client"),
    ("command-opcode-7", bytes.fromhex("0002030000000007000000027b7d"), "opcode 7"),
    ("type-4", bytes.fromhex("000203000000040000000000"), "frame type 4"),
    ("version-3", bytes.fromhex("000303000000000300000000"), "version 3"),
    (
        "too-long",
        bytes.fromhex("0002030000000003") + (MAX_PAYLOAD + 1).to_bytes(4, "big"),
        "exceeds",
    ),
]


@pytest.mark.parametrize(
    ("data", "fault"), [v[1:] for v in SERVER_VIOLATIONS], ids=[v[0] for v in SERVER_VIOLATIONS]
)
def test_server_protocol_violations(data: bytes, fault: str) -> None:
    server = ServerConnection()
    server.receive_data(data)
    with pytest.raises(RemoteProtocolError, match=fault):
        server.next_event()
    with pytest.raises(RemoteProtocolError, match=fault):
        server.next_event()


def test_server_eof_inside_a_frame() -> None:
    server = ServerConnection()
    server.receive_data(bytes.fromhex("000203000000"))
    server.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match="inside a frame"):
        server.next_event()


# --- property tests -------------------------------------------------------------------------

client_actions = st.lists(
    st.one_of(
        st.tuples(
            st.just("command"),
            st.sampled_from(
                [c for c in Command if c not in (Command.DISCONNECT_SHIM, Command.CONNECT_SHIM)]
            ),
            st.binary(max_size=20),
        ),
        st.tuples(st.just("stdin"), st.just(Stream.STDIN), st.binary(max_size=20)),
        st.tuples(
            st.just("output"),
            st.sampled_from([Stream.STDOUT, Stream.STDERR]),
            st.binary(max_size=20),
        ),
        st.tuples(st.just("exited"), st.just(0), st.integers(0, 255)),
    ),
    max_size=20,
)


@settings(max_examples=200)
@given(client_actions, st.lists(st.booleans(), min_size=1), st.integers(0, 7))
def test_client_and_server_agree(actions: list[Any], failures: list[bool], step: int) -> None:
    """A shim pipelines commands and stdin; the proxy answers each command in order (success
    or error) interleaved with output; the shim sees exactly what the proxy sent."""
    shim = ClientConnection("shim")
    server = ServerConnection()
    to_server = b""
    expected_server: list[Any] = []
    for kind, what, data in actions:
        if kind == "command":
            to_server += shim.send_command(what, data)
            expected_server.append(CommandReceived(what, data))
        elif kind == "stdin":
            to_server += shim.send_stream(what, data)
            expected_server.append(StreamReceived(what, data))
    assert events_of(server, to_server, step) == expected_server
    to_client = b""
    expected_client: list[Any] = []
    pending = [e.command for e in expected_server if isinstance(e, CommandReceived)]
    for i, command in enumerate(pending):
        for kind, what, data in actions[i : i + 1]:
            if kind == "output":
                to_client += server.send_stream(what, data)
                expected_client.append(StreamData(what, data))
            elif kind == "exited":
                to_client += server.send_process_exited(data)
                expected_client.append(ProcessExited(data))
        if failures[i % len(failures)]:
            to_client += server.send_error(command, f"failed {i} <&>")
            expected_client.append(ErrorReply(command, f"failed {i} <&>"))
        else:
            to_client += server.send_response(command, bytes([i % 256]))
            expected_client.append(Response(command, bytes([i % 256])))
    assert server.pending == 0
    assert events_of(shim, to_client, step) == expected_client
    assert shim.pending == 0


@settings(max_examples=300)
@given(
    st.sampled_from(["runtime", "shim"]),
    st.lists(st.sampled_from([c for c in Command if c is not Command.DISCONNECT_SHIM]), max_size=4),
    st.lists(st.binary(min_size=1, max_size=40), max_size=6),
)
def test_client_any_bytes_give_events_or_remote_error(
    role: Any, commands: list[Command], chunks: list[bytes]
) -> None:
    client = ClientConnection(role)
    for command in commands:
        client.send_command(command)
    try:
        for chunk in [*chunks, b""]:
            client.receive_data(chunk)
            while (event := client.next_event()) is not NEED_DATA:
                assert isinstance(event, Response | ErrorReply | StreamData | ProcessExited)
    except RemoteProtocolError as exc:
        assert str(exc)


# a valid header prefix makes random tails reach the deeper checks more often
VALID_PREFIX = st.sampled_from(
    [b"", bytes.fromhex("000203000000"), bytes.fromhex("0002030000000100")]
)


@settings(max_examples=300)
@given(VALID_PREFIX, st.lists(st.binary(min_size=1, max_size=40), max_size=6))
def test_server_any_bytes_give_events_or_remote_error(prefix: bytes, chunks: list[bytes]) -> None:
    server = ServerConnection(max_payload=64)
    try:
        for chunk in [*(c for c in (prefix, *chunks) if c), b""]:
            server.receive_data(chunk)
            while (event := server.next_event()) is not NEED_DATA:
                if isinstance(event, CommandReceived):
                    assert len(event.payload) <= 64
                else:
                    assert isinstance(event, StreamReceived) and len(event.data) <= 64
    except RemoteProtocolError as exc:
        assert str(exc)  # every error names its fault
