"""Error paths: the spec's byte examples and error texts, and where the reference wedges,
crashes or leaks, our better behaviour (each such test says what the reference does)."""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import anyio
import pytest

from protocol.ccproxy import Command, FrameType, Stream
from protocol.hyperstart import Code
from tests.proxy.harness import (
    Agent,
    agent_running,
    hyper,
    proxied,
    register,
)

pytestmark = pytest.mark.anyio

CC = ("--agent-dialect", "cc")
UNMARSHAL = "json: cannot unmarshal "


async def test_spec_byte_examples(anyio_backend: object, short_tmp: Path) -> None:
    """ccproxy spec §2: the Hyper ping command, the AttachVM error response and the stdin EOF
    stream, byte for byte."""
    async with proxied(short_tmp, *CC) as proxy:
        client = await proxy.connect()
        await client.send(bytes.fromhex("000203000000000200000012") + b'{"containerId":"foo"}'[:18])
        # an 18-byte payload is cut short of the JSON: Go's decode error text
        frame = await client.frame()
        assert frame.error and frame.payload == b'{"msg":"unexpected end of JSON input"}'
        await client.send(bytes.fromhex("000203000000000200000013") + b'{"containerId":"foo"}'[:19])
        frame = await client.frame()
        assert frame.error
        payload = b'{"containerId":"foo"}'
        await client.send(bytes.fromhex("0002030000000002000000") + bytes([len(payload)]) + payload)
        raw = await client.stream.receive()
        expected = b'{"msg":"unknown containerID: foo"}'
        assert raw == bytes.fromhex("000203000000110200000022") + expected
        async with agent_running(short_tmp) as agent:
            tokens = await register(client, "pod", agent, 1)
            ping = b'{"hyperName":"ping","tokens":null}'
            assert len(ping) == 0x22
            await client.send(bytes.fromhex("000203000000000300000022") + ping)
            assert await client.stream.receive() == bytes.fromhex("000203000000010300000000")
            assert agent.commands[-1].code == Code.PING
            shim = await proxy.connect()
            assert await shim.call(Command.CONNECT_SHIM, {"token": tokens[0]}) == (True, b"")
            ok, _ = await client.call(
                Command.HYPER, hyper("execcmd", {"container": "c", "process": {}}, tokens)
            )
            assert ok
            await shim.send(bytes.fromhex("000203000000020000000000"))  # stdin EOF
            (eof,) = await agent.wait_stdin(1)
            assert (eof.seq, eof.data) == (3, b"")
            await agent.output(3, b"")
            await agent.output(3, bytes([42]))
            assert await shim.stream.receive() == bytes.fromhex("00020300000003000000000" + "12a")


async def test_unknown_command_does_not_wedge(anyio_backend: object, short_tmp: Path) -> None:
    """The reference answers ``unknown command 'nosuchcmd'`` and then wedges the VM: every
    later Hyper on it, from any connection, hangs forever. We answer and stay healthy."""
    async with proxied(short_tmp, *CC) as proxy, agent_running(short_tmp) as agent:
        client = await proxy.connect()
        await register(client, "e1", agent)
        assert await client.call(Command.HYPER, hyper("nosuchcmd")) == (
            False,
            "unknown command 'nosuchcmd'",
        )
        assert await client.call(Command.HYPER, hyper("ping")) == (True, b"")
        other = await proxy.connect()
        assert (await other.call(Command.ATTACH_VM, {"containerId": "e1"}))[0]
        assert await other.call(Command.HYPER, hyper("ping")) == (True, b"")
        assert [c.code for c in agent.commands] == [Code.PING, Code.PING]


async def test_message_too_long_does_not_wedge(anyio_backend: object, short_tmp: Path) -> None:
    """A Hyper whose ctl frame would exceed 10240 bytes: the reference's text
    (``message too long <frame length>``), nothing sent to the agent, and -- unlike the
    reference, which wedges the VM -- the next command works."""
    async with proxied(short_tmp, *CC) as proxy, agent_running(short_tmp) as agent:
        client = await proxy.connect()
        await register(client, "e2", agent)
        data = {"hostname": "e2", "dns": [f"10.0.{i // 256}.{i % 256}" for i in range(900)]}
        import msgspec

        size = len(msgspec.json.encode(data)) + 8
        assert size > 10240
        assert await client.call(Command.HYPER, hyper("startpod", data)) == (
            False,
            f"message too long {size}",
        )
        assert await client.call(Command.HYPER, hyper("ping")) == (True, b"")
        assert [c.code for c in agent.commands] == [Code.PING]


async def test_transcript_oversized_startpod_text(anyio_backend: object, short_tmp: Path) -> None:
    """The errors transcript's oversized startpod: the same text, ``message too long 11318``."""
    from tests.proxy.replay import load

    transcript = load("errors")
    frame, _ping = [
        f
        for f in transcript["frames"]
        if f["channel"] == "runtime-e2" and f["dir"] == "c2p" and f["kind"] == "ccproxy"
        and f["header"]["opcode"] == Command.HYPER
    ]  # fmt: skip
    async with proxied(short_tmp, *CC) as proxy, agent_running(short_tmp) as agent:
        client = await proxy.connect()
        await register(client, "e2", agent)
        await client.send(bytes.fromhex(frame["raw_hex"]))
        response = await client.frame()
        assert response.error and response.payload == b'{"msg":"message too long 11318"}'


async def test_split_header_is_accepted(anyio_backend: object, short_tmp: Path) -> None:
    """The reference reads a header with one read() and closes the connection when the 12
    bytes arrive in two pieces (errors transcript, split-header). A stream socket may split
    anywhere, so we accept it."""
    async with proxied(short_tmp, *CC) as proxy:
        client = await proxy.connect()
        frame = bytes.fromhex("000203000000000300000022") + b'{"hyperName":"ping","tokens":null}'
        await client.send(frame[:6])
        await anyio.sleep(0.05)
        await client.send(frame[6:])
        assert await client.frame() == await _expected_not_attached()


async def _expected_not_attached() -> object:
    from protocol.ccproxy import Frame

    return Frame(FrameType.RESPONSE, Command.HYPER, b'{"msg":"client not attached to a vm"}', True)


@pytest.mark.parametrize("words", [0, 1, 2])
async def test_short_header_length_closes_only_that_client(
    anyio_backend: object, short_tmp: Path, words: int
) -> None:
    """A header length below 3 words crashes the whole reference proxy process. We close that
    connection only; other clients and the proxy carry on."""
    async with proxied(short_tmp, *CC) as proxy:
        bystander = await proxy.connect()
        bad = await proxy.connect()
        await bad.send(struct.pack(">HBxxxBBI", 2, words, 0, Command.HYPER, 0))
        await bad.expect_eof()
        ok, msg = await bystander.call(Command.ATTACH_VM, {"containerId": "x"})
        assert (ok, msg) == (False, "unknown containerID: x")
        assert proxy.proc.poll() is None


@pytest.mark.parametrize(
    "raw",
    [
        "0001030000000003000000227b2268797065724e616d65223a2270696e67222c22746f6b656e73223a6e756c6c7d",
        "000303000000000300000000",  # version 3
        "000203000000010300000000",  # a response from a client
        "00020300000003000000000100",  # a notification from a client
        "0002030000000007000000027b7d",  # command opcode 7
        "000203000000040000000000",  # frame type 4
        "00020300000002010000000178",  # stdout stream from a client
        "00020300000002000000000178",  # stdin on a non-shim connection
        "00020300000002030000002c7b22736f75726365223a226b65726e656c222c226c6576656c223a22696e666f222c226d7367223a2278227d",
    ],
)
async def test_protocol_violations_close_without_answer(
    anyio_backend: object, short_tmp: Path, raw: str
) -> None:
    """errors transcript steps 74-82: no error frame, the connection is closed."""
    async with proxied(short_tmp, *CC) as proxy:
        client = await proxy.connect()
        await client.send(bytes.fromhex(raw))
        await client.expect_eof()


async def test_log_entries(anyio_backend: object, short_tmp: Path) -> None:
    """A valid log entry keeps the connection; each invalid one (source, level, empty msg,
    bad JSON) closes it, as the reference."""
    entries = [
        b'{"source":"runtime","level":"debug","msg":""}',
        b'{"source":"shim","level":"fatal","msg":"x"}',
        b'{"source":"kernel","level":"info","msg":"x"}',
        b'{"source":"shim","level":"info","msg":"x"',
    ]
    async with proxied(short_tmp, *CC) as proxy:
        client = await proxy.connect()
        await client.stream_frame(
            Stream.LOG, b'{"source":"shim","containerId":"c","level":"warn","msg":"hello"}'
        )
        assert (await client.call(Command.ATTACH_VM, {"containerId": "x"}))[0] is False
        for entry in entries:
            bad = await proxy.connect()
            await bad.stream_frame(Stream.LOG, entry)
            await bad.expect_eof()


@pytest.mark.parametrize(
    ("command", "payload", "message"),
    [
        (Command.ATTACH_VM, b'{"containerId":', "unexpected end of JSON input"),
        (
            Command.ATTACH_VM,
            b'{"containerId":42}',
            UNMARSHAL + "number into Go struct field AttachVM.containerId of type string",
        ),
        (
            Command.HYPER,
            b'{"hyperName":"ping","tokens":null,"data":{not json}}',
            "invalid character 'n' looking for beginning of object key string",
        ),
        (Command.REGISTER_VM, b"", "unexpected end of JSON input"),
        (Command.REGISTER_VM, b'{"containerId":"a"}', "malformed RegisterVM command"),
        (Command.UNREGISTER_VM, b'{"ContainerID":"zz"}', "unknown containerID: zz"),
        (
            Command.SIGNAL,
            b'{"signalNumber":"x"}',
            UNMARSHAL + "string into Go struct field Signal.signalNumber of type int",
        ),
        (Command.CONNECT_SHIM, b"[]", UNMARSHAL + "array into Go value of type api.ConnectShim"),
        (
            Command.HYPER,
            b'{"hyperName":"ping","tokens":[1]}',
            UNMARSHAL + "number into Go struct field Hyper.tokens of type string",
        ),
    ],
)
async def test_decode_errors_use_go_texts(
    anyio_backend: object, short_tmp: Path, command: Command, payload: bytes, message: str
) -> None:
    """Payloads the reference cannot decode are answered with Go's encoding/json texts; keys
    match case-insensitively as in Go."""
    async with proxied(short_tmp, *CC) as proxy:
        client = await proxy.connect()
        assert await client.call(command, payload) == (False, message)


async def test_malformed_register_registers_nothing(anyio_backend: object, short_tmp: Path) -> None:
    """RegisterVM without containerId: the reference answers ``malformed RegisterVM command``
    but still registers the VM under "" and connects to it. We answer the same and register
    nothing (AttachVM "" fails)."""
    async with proxied(short_tmp, *CC) as proxy, agent_running(short_tmp) as agent:
        client = await proxy.connect()
        payload = {"ctlSerial": agent.ctl_path, "ioSerial": agent.tty_path}
        assert await client.call(Command.REGISTER_VM, payload) == (
            False,
            "malformed RegisterVM command",
        )
        assert await client.call(Command.ATTACH_VM, {"containerId": ""}) == (
            False,
            "unknown containerID: ",
        )
        assert not agent.connected.is_set()


async def test_failed_register_frees_everything(anyio_backend: object, short_tmp: Path) -> None:
    """A RegisterVM that cannot dial answers Go's dial error; the reference keeps the tokens it
    allocated (a leak). Nothing of it remains here: the id can be registered again and the
    tokens of the successful registration start again at seq 3."""
    async with proxied(short_tmp, *CC) as proxy:
        client = await proxy.connect()
        missing = str(short_tmp / "nope.ctl")
        ok, msg = await client.call(
            Command.REGISTER_VM,
            {"containerId": "p", "ctlSerial": missing, "ioSerial": missing, "numIOStreams": 3},
        )
        assert (ok, msg) == (False, f"dial unix {missing}: connect: no such file or directory")
        assert await client.call(Command.ATTACH_VM, {"containerId": "p"}) == (
            False,
            "unknown containerID: p",
        )
        async with agent_running(short_tmp) as agent:
            tokens = await register(client, "p", agent, 1)
            shim = await proxy.connect()
            assert (await shim.call(Command.CONNECT_SHIM, {"token": tokens[0]}))[0]
            ok, _ = await client.call(
                Command.HYPER, hyper("execcmd", {"container": "c", "process": {}}, tokens)
            )
            assert ok
            assert b'"stdio":3,"stderr":4' in agent.commands[-1].payload


async def test_ready_timeout(anyio_backend: object, short_tmp: Path) -> None:
    """The reference waits for READY forever, blocking the client. We give up after
    --ready-timeout (2 s here) with an error and free the VM."""
    async with (
        proxied(short_tmp, *CC) as proxy,
        agent_running(short_tmp, send_ready=False) as agent,
    ):
        client = await proxy.connect()
        payload = {"containerId": "slow", "ctlSerial": agent.ctl_path, "ioSerial": agent.tty_path}
        with anyio.fail_after(4):
            ok, msg = await client.call(Command.REGISTER_VM, payload)
        assert (ok, msg) == (False, "timeout waiting for the VM agent's READY")
        assert (await client.call(Command.ATTACH_VM, {"containerId": "slow"}))[0] is False


async def test_agent_error_before_ready(anyio_backend: object, short_tmp: Path) -> None:
    """The first reply-class message must be READY; an ERROR gets the CC library's text."""
    async with (
        proxied(short_tmp, *CC) as proxy,
        agent_running(short_tmp, send_ready=False) as agent,
    ):
        client = await proxy.connect()
        payload = {"containerId": "bad", "ctlSerial": agent.ctl_path, "ioSerial": agent.tty_path}
        await client.command(Command.REGISTER_VM, payload)
        with anyio.fail_after(4):
            await agent.connected.wait()
        await agent.reply(Code.ERROR, b"not now")
        frame = await client.frame()
        assert frame.payload == (
            b'{"msg":"ERROR received from VM agent, control msg received : not now"}'
        )


async def test_agent_error_reply(anyio_backend: object, short_tmp: Path) -> None:
    """An agent ERROR: the CC library's text with the payload as text."""

    async def refuse(agent: Agent, frame: object) -> None:
        await agent.reply(Code.ERROR, b"Pod not started, impossible to run a new container")

    async with proxied(short_tmp, *CC) as proxy, agent_running(short_tmp) as agent:
        agent.answers[Code.REMOVECONTAINER] = refuse
        client = await proxy.connect()
        await register(client, "p", agent)
        assert await client.call(Command.HYPER, hyper("removecontainer", {"container": "c"})) == (
            False,
            "ERROR received from VM agent, control msg received :"
            " Pod not started, impossible to run a new container",
        )
        assert await client.call(Command.HYPER, hyper("ping")) == (True, b"")


async def test_unsolicited_ack_is_dropped(anyio_backend: object, short_tmp: Path) -> None:
    """The reference hands an unsolicited ACK to the next command (README item 6) and its
    reply queue stays out of step for the life of the VM. With one command outstanding we
    recognise it and drop it: every later command gets its own reply."""

    async def version(agent: Agent, frame: object) -> None:
        await agent.reply(Code.ACK, b"v1")

    async with proxied(short_tmp, *CC) as proxy, agent_running(short_tmp) as agent:
        agent.answers[Code.VERSION] = version
        client = await proxy.connect()
        await register(client, "p", agent)
        await agent.reply(Code.ACK, b"stray")
        await anyio.sleep(0.1)
        assert await client.call(Command.HYPER, hyper("version")) == (True, b"v1")
        assert await client.call(Command.HYPER, hyper("ping")) == (True, b"")


async def test_agent_reply_timeout(anyio_backend: object, short_tmp: Path) -> None:
    """The reference waits for an agent reply forever. With --agent-timeout the command fails;
    its late reply is matched to it and discarded, so the next command gets its own."""
    late: list[Agent] = []

    async def silent(agent: Agent, frame: object) -> None:
        late.append(agent)

    async with (
        proxied(short_tmp, *CC, "--agent-timeout", "0.3") as proxy,
        agent_running(short_tmp) as agent,
    ):
        agent.answers[Code.DESTROYPOD] = silent
        client = await proxy.connect()
        await register(client, "p", agent)
        assert await client.call(Command.HYPER, hyper("destroypod")) == (
            False,
            "timeout waiting for the VM agent's reply to destroypod (0.3 s)",
        )
        await agent.reply(Code.ACK, b"late")
        assert await client.call(Command.HYPER, hyper("ping")) == (True, b"")


async def test_data_and_header_leniency(anyio_backend: object, short_tmp: Path) -> None:
    """Conformance README item 7: ``data`` reaches the agent verbatim (``null`` as 4 bytes,
    strings with their quotes, whitespace kept); ``tokens: []`` and a missing ``tokens`` work;
    keys match case-insensitively; a 24-byte header is accepted (the response has 12);
    reserved bytes and the E flag on a command are ignored."""
    async with proxied(short_tmp, *CC) as proxy, agent_running(short_tmp) as agent:
        client = await proxy.connect()
        await register(client, "p", agent)
        bodies = [
            b'{"hyperName":"ping","tokens":null,"data":null}',
            b'{"hyperName":"ping","tokens":[],"data":"str"}',
            b'{"hyperName":"ping","data":42}',
            b'{"HyperName":"ping","TOKENS":null,"Data":[1, 2 ,3]}',
        ]
        for body in bodies:
            assert await client.call(Command.HYPER, body) == (True, b"")
        assert [c.payload for c in agent.commands] == [b"null", b'"str"', b"42", b"[1, 2 ,3]"]
        ping = b'{"hyperName":"ping","tokens":null}'
        long_header = struct.pack(">HBxxxBBI", 2, 6, 0, Command.HYPER, len(ping)) + bytes(12)
        await client.send(long_header + ping)
        assert await client.stream.receive() == bytes.fromhex("000203000000010300000000")
        odd = bytearray(struct.pack(">HBxxxBBI", 2, 3, 0x10, Command.HYPER, len(ping)))
        odd[3:6] = b"\x01\x02\x03"
        await client.send(bytes(odd) + ping)
        assert await client.stream.receive() == bytes.fromhex("000203000000010300000000")
        assert len(agent.commands) == 6


async def test_random_input_never_hurts_the_proxy(anyio_backend: object, short_tmp: Path) -> None:
    """Random bytes, random payloads behind valid headers and JSON of the wrong shapes, each
    on its own connection: every one is answered or closed, the proxy keeps serving a VM, and
    logs no traceback (no handler bug)."""
    import random

    import msgspec

    rng = random.Random(20261127)
    shapes: list[object] = [None, 1, -1, 2**70, 1.5, "x", [], {}, [1, "a"], {"a": None}, True]
    keys = ["containerId", "ctlSerial", "ioSerial", "numIOStreams", "hyperName", "tokens"]
    keys += ["data", "token", "signalNumber", "columns", "rows", "source", "level", "msg"]
    inputs: list[bytes] = []
    for _ in range(200):
        kind = rng.randrange(3)
        if kind == 0:
            inputs.append(rng.randbytes(rng.randrange(1, 64)))
            continue
        if kind == 1:
            payload = rng.randbytes(rng.randrange(0, 40))
        else:
            obj = {rng.choice(keys): rng.choice(shapes) for _ in range(rng.randrange(4))}
            if rng.random() < 0.5:
                obj["hyperName"] = rng.choice(["ping", "newcontainer", "execcmd", "x", 5])
            payload = msgspec.json.encode(obj)
        frame_type = rng.choice([0, 0, 0, 2])
        opcode = rng.randrange(7) if frame_type == 0 else rng.choice([0, 3])
        inputs.append(struct.pack(">HBxxxBBI", 2, 3, frame_type, opcode, len(payload)) + payload)
    async with proxied(short_tmp, *CC) as proxy, agent_running(short_tmp) as agent:
        runtime = await proxy.connect()
        tokens = await register(runtime, "p", agent, 2)
        for data in inputs:
            client = await proxy.connect()
            await client.send(data)
            await client.stream.send_eof()
            with contextlib.suppress(EOFError):  # answered or not, the proxy closes it
                while True:
                    await client.frame(deadline=5)
        assert await runtime.call(Command.HYPER, hyper("ping")) == (True, b"")
        shim = await proxy.connect()
        assert await shim.call(Command.CONNECT_SHIM, {"token": tokens[1]}) == (True, b"")
        assert proxy.process.stop() == 0
        assert proxy.proc.stderr is not None
        assert b"Traceback" not in proxy.proc.stderr.read()
