"""The proxy against the byte streams of the real hyperhq/hyperstart (v1.1.0, API 4244).

The agent side of the recorded ``pod_container_echo`` run is replayed: after each command the
proxy sends, the agent answers with exactly what the real hyperstart answered (NEXTs, ACK or
an empty ERROR, tty output, the EOF, the PROCESSASYNCEVENT, and at the end both channels
closing as the VM powers off). The recorded run used seqs 1/2; the proxy hands out 3/4, so
tty seqs are renumbered. What the proxy sends must be what hyperstart accepted.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from protocol.ccproxy import Command, Frame, FrameType, Stream
from protocol.hyperstart import Code, CtlDecoder, TtyDecoder
from tests.paths import HYPERSTART_TRANSCRIPTS
from tests.proxy.harness import IO_DEADLINE, Pipe, PipeListener, RawClient, hyper, proxied

pytestmark = pytest.mark.anyio

SEQS = {1: 3, 2: 4}  # recorded seq -> the proxy's
# what hyperstart answers to GETVERSION (boot_version_ping): NEXT(8), then ACK carrying 4244
VERSION_REPLY = bytes.fromhex("0000000e0000000c00000008000000090000000c00001094")


Segment = tuple[dict[str, Any], list[tuple[str, Any]]]


def _script(
    scenario: str,
    skip_seqs: tuple[int, ...] = (),
    seqs: dict[int, int] = SEQS,
    until: str | None = None,
) -> tuple[list[bytes], list[Segment]]:
    """The recorded run as (prelude, segments): each segment is one frame the host sent (ctl
    or tty) and what the agent sent after it, up to the host's next frame. Segments for stdin
    to ``skip_seqs`` (which a proxy never sends) are left out; tty seqs are renumbered by
    ``seqs``; the script ends at the recorder's note starting with ``until``."""
    run = json.loads((HYPERSTART_TRANSCRIPTS / f"{scenario}.json").read_text())["runs"][0]
    prelude: list[bytes] = []
    segments: list[Segment] = []
    skipping = False
    for rec in run["records"]:
        if until is not None and rec["kind"] == "note" and rec["text"].startswith(until):
            break
        if rec["kind"] == "frame" and rec["dir"] == "h2a":
            skipping = rec["ch"] == "tty" and rec["seq"] in skip_seqs
            if not skipping:
                segments.append((rec, []))
            continue
        if skipping:
            continue
        if rec["kind"] == "close" and rec["dir"] == "a2h":
            segments[-1][1].append(("close", rec["ch"]))
            continue
        if rec["kind"] != "frame":
            continue
        raw = bytearray.fromhex(rec["header_hex"] + rec["payload_hex"])
        if rec["ch"] == "tty":
            struct.pack_into(">Q", raw, 0, seqs.get(rec["seq"], rec["seq"]))
        if segments:
            segments[-1][1].append((rec["ch"], bytes(raw)))
        else:
            prelude.append(bytes(raw))
    return prelude, segments


async def _read(pipe: Pipe, decoder: CtlDecoder | TtyDecoder) -> Any:
    with anyio.fail_after(IO_DEADLINE):
        while (frame := decoder.next_frame()) is None:
            decoder.feed(await pipe.receive())
    return frame


async def _agent(
    ctl_listener: PipeListener,
    tty_listener: PipeListener,
    script: tuple[list[bytes], list[Segment]],
    seen: list[Any],
    hold: anyio.Event | None = None,
) -> None:
    """Play the recorded agent: wait for each host frame, answer as hyperstart did. At the end
    of the script the channels close (the VM is gone), once ``hold`` is set if given: a script
    cut short must not close them while the proxy still delivers its last answers."""
    prelude, segments = script
    ctl = await ctl_listener.accept()
    tty = await tty_listener.accept()
    try:
        await _play(ctl, tty, prelude, segments, seen)
        if hold is not None:
            await hold.wait()
    finally:
        with anyio.CancelScope(shield=True):
            await ctl.aclose()
            await tty.aclose()


async def _play(
    ctl: Pipe, tty: Pipe, prelude: list[bytes], segments: list[Segment], seen: list[Any]
) -> None:
    for raw in prelude:
        await ctl.send(raw)
    ctl_decoder, tty_decoder = CtlDecoder(), TtyDecoder()
    for recorded, answers in segments:
        if recorded["ch"] == "ctl":
            frame = await _read(ctl, ctl_decoder)
            if frame.code == Code.VERSION:  # auto-detection, not part of these recordings
                await ctl.send(VERSION_REPLY)
                frame = await _read(ctl, ctl_decoder)
        else:
            frame = await _read(tty, tty_decoder)
        seen.append((recorded, frame))
        for kind, data in answers:
            if kind == "close":
                await (ctl if data == "ctl" else tty).aclose()
            else:
                await (ctl if kind == "ctl" else tty).send(data)


async def _register(runtime: RawClient, directory: Path) -> str:
    payload = {
        "containerId": "hs",
        "ctlSerial": str(directory / "vm.ctl"),
        "ioSerial": str(directory / "vm.tty"),
        "numIOStreams": 1,
    }
    ok, body = await runtime.call(Command.REGISTER_VM, payload)
    assert ok, body
    return str(body["io"]["tokens"][0])


def _check_sent(seen: list[Any], segments: list[Segment], seqs: dict[int, int] = SEQS) -> None:
    """Every frame the proxy sent is the one the real hyperstart accepted (seqs renumbered)."""
    assert len(seen) == len(segments)
    for recorded, frame in seen:
        if recorded["ch"] == "tty":
            assert frame.seq == seqs[recorded["seq"]]
            assert frame.data == bytes.fromhex(recorded["payload_hex"])
            continue
        assert frame.code == recorded["code"]
        expected = recorded.get("payload_json")
        if expected is not None and recorded["code"] in (Code.NEWCONTAINER, Code.EXECCMD):
            process = expected["process"]
            process["stdio"] = seqs[process["stdio"]]
            if "stderr" in process:
                process["stderr"] = seqs[process["stderr"]]
            assert msgspec.json.decode(frame.payload) == expected
        else:
            assert frame.payload == bytes.fromhex(recorded["payload_hex"])


async def test_pod_container_echo(anyio_backend: object, short_tmp: Path) -> None:
    seen: list[Any] = []
    script = _script("pod_container_echo")
    segments = script[1]
    startpod = segments[0][0]["payload_json"]
    container = segments[1][0]["payload_json"]
    process = {k: v for k, v in container["process"].items() if k not in ("stdio", "stderr")}
    ctl_listener = await PipeListener.create(str(short_tmp / "vm.ctl"))
    tty_listener = await PipeListener.create(str(short_tmp / "vm.tty"))
    try:
        async with proxied(short_tmp) as proxy, anyio.create_task_group() as tg:
            tg.start_soon(_agent, ctl_listener, tty_listener, script, seen)
            runtime = await proxy.connect()
            token = await _register(runtime, short_tmp)
            shim = await proxy.connect()
            assert await shim.call(Command.CONNECT_SHIM, {"token": token}) == (True, b"")
            assert await runtime.call(Command.HYPER, hyper("startpod", startpod)) == (True, b"")
            data = {**container, "process": process}
            assert await runtime.call(Command.HYPER, hyper("newcontainer", data, [token])) == (
                True,
                b"",
            )
            frames = [await shim.frame() for _ in range(3)]
            assert frames == [
                Frame(FrameType.STREAM, Stream.STDOUT, b"out\n"),
                Frame(FrameType.STREAM, Stream.STDERR, b"err\n"),
                Frame(FrameType.NOTIFICATION, 0, bytes([3])),
            ]
            assert await runtime.call(
                Command.HYPER, hyper("removecontainer", {"container": "c1"})
            ) == (False, "ERROR received from VM agent, control msg received : ")
            assert await runtime.call(Command.HYPER, hyper("destroypod")) == (True, b"")
            await shim.expect_eof()  # the VM powered off
            assert await runtime.call(Command.HYPER, hyper("ping")) == (
                False,
                "No multicast available for CTL channel",
            )
    finally:
        await ctl_listener.aclose()
        await tty_listener.aclose()
    _check_sent(seen, segments)


async def test_stdin_cat(anyio_backend: object, short_tmp: Path) -> None:
    """stdin to cat and its echo, stdin EOF (an empty frame for a pipe), the exit event, and
    stdin after the exit (hyperstart answers it with an EOF, which changes nothing)."""
    seen: list[Any] = []
    script = _script("stdin_cat", skip_seqs=(77,))
    segments = script[1]
    container = segments[1][0]["payload_json"]
    process = {k: v for k, v in container["process"].items() if k not in ("stdio", "stderr")}
    ctl_listener = await PipeListener.create(str(short_tmp / "vm.ctl"))
    tty_listener = await PipeListener.create(str(short_tmp / "vm.tty"))
    try:
        async with proxied(short_tmp) as proxy, anyio.create_task_group() as tg:
            tg.start_soon(_agent, ctl_listener, tty_listener, script, seen)
            runtime = await proxy.connect()
            token = await _register(runtime, short_tmp)
            shim = await proxy.connect()
            assert await shim.call(Command.CONNECT_SHIM, {"token": token}) == (True, b"")
            startpod = segments[0][0]["payload_json"]
            assert (await runtime.call(Command.HYPER, hyper("startpod", startpod)))[0]
            data = {**container, "process": process}
            assert (await runtime.call(Command.HYPER, hyper("newcontainer", data, [token])))[0]
            await shim.stream_frame(Stream.STDIN, b"ping\n")
            assert await shim.frame() == Frame(FrameType.STREAM, Stream.STDOUT, b"ping\n")
            await shim.stream_frame(Stream.STDIN, b"")
            assert await shim.frame() == Frame(FrameType.NOTIFICATION, 0, bytes([0]))
            await shim.stream_frame(Stream.STDIN, b"late\n")
            assert await runtime.call(Command.HYPER, hyper("destroypod")) == (True, b"")
            await shim.expect_eof()
    finally:
        await ctl_listener.aclose()
        await tty_listener.aclose()
    _check_sent(seen, segments)


EXEC_SEQS = {1: 3, 2: 4, 3: 5, 4: 6, 5: 7, 6: 8, 7: 9}  # init, ex1, ex2, ex3 (terminal)


def _without_seqs(process: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in process.items() if k not in ("stdio", "stderr")}


async def test_exec_signal_winsize(anyio_backend: object, short_tmp: Path) -> None:
    """execcmd with output and exit event; a shim's SIGTERM to an exec'd process as
    SIGNALPROCESS; a terminal process: WINSIZE in the hyperhq form, stdin, output with echo,
    exit status 5 from the event. (The recording goes on with cases a proxy never produces.)"""
    seen: list[Any] = []
    script = _script("exec_and_signals", seqs=EXEC_SEQS, until="EXECCMD ex4")
    segments = script[1]
    data: list[Any] = [rec.get("payload_json") for rec, _ in segments]
    ctl_listener = await PipeListener.create(str(short_tmp / "vm.ctl"))
    tty_listener = await PipeListener.create(str(short_tmp / "vm.tty"))
    done = anyio.Event()  # the recording is cut after EXECCMD ex4: the VM stays until then
    try:
        async with proxied(short_tmp) as proxy, anyio.create_task_group() as tg:
            tg.start_soon(_agent, ctl_listener, tty_listener, script, seen, done)
            runtime = await proxy.connect()
            payload = {
                "containerId": "hs",
                "ctlSerial": str(short_tmp / "vm.ctl"),
                "ioSerial": str(short_tmp / "vm.tty"),
                "numIOStreams": 4,
            }
            ok, body = await runtime.call(Command.REGISTER_VM, payload)
            assert ok, body
            tokens = body["io"]["tokens"]
            shims = []
            for token in tokens:
                shim = await proxy.connect()
                assert await shim.call(Command.CONNECT_SHIM, {"token": token}) == (True, b"")
                shims.append(shim)
            _, ex1, ex2, ex3 = shims

            async def run(name: str, body: dict[str, Any], token: str) -> None:
                body = {**body, "process": _without_seqs(body["process"])}
                ok, msg = await runtime.call(Command.HYPER, hyper(name, body, [token]))
                assert ok, msg

            assert (await runtime.call(Command.HYPER, hyper("startpod", data[0])))[0]
            await run("newcontainer", data[1], tokens[0])
            await run("execcmd", data[2], tokens[1])
            assert await ex1.frame() == Frame(FrameType.STREAM, Stream.STDOUT, b"ex\n")
            assert await ex1.frame() == Frame(FrameType.NOTIFICATION, 0, bytes([0]))
            await run("execcmd", data[3], tokens[2])
            assert await ex2.call(Command.SIGNAL, {"signalNumber": 15}) == (True, b"")
            assert await ex2.frame() == Frame(FrameType.NOTIFICATION, 0, bytes([0]))
            await run("execcmd", data[5], tokens[3])
            winch = {"signalNumber": 28, "columns": 111, "rows": 33}
            assert await ex3.call(Command.SIGNAL, winch) == (True, b"")
            await ex3.stream_frame(Stream.STDIN, b"go\n")
            out = b""
            while True:
                frame = await ex3.frame()
                if frame.type is FrameType.NOTIFICATION:
                    break
                assert frame.opcode == Stream.STDOUT  # a terminal: one seq for all output
                out += frame.payload
            assert frame.payload == bytes([5])
            assert out == b"go\r\n33 111\r\nto-stderr\r\n"
            done.set()
    finally:
        await ctl_listener.aclose()
        await tty_listener.aclose()
    _check_sent(seen, segments, EXEC_SEQS)
