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
from protocol.hyperstart import Code, CtlDecoder
from tests.paths import HYPERSTART_TRANSCRIPTS
from tests.proxy.harness import IO_DEADLINE, Pipe, PipeListener, hyper, proxied

pytestmark = pytest.mark.anyio

SEQS = {1: 3, 2: 4}  # recorded seq -> the proxy's
# what hyperstart answers to GETVERSION (boot_version_ping): NEXT(8), then ACK carrying 4244
VERSION_REPLY = bytes.fromhex("0000000e0000000c00000008000000090000000c00001094")


def _script(scenario: str) -> tuple[list[bytes], list[tuple[dict[str, Any], list[Any]]]]:
    run = json.loads((HYPERSTART_TRANSCRIPTS / f"{scenario}.json").read_text())["runs"][0]
    prelude: list[bytes] = []
    segments: list[tuple[dict[str, Any], list[Any]]] = []
    for rec in run["records"]:
        if rec["kind"] == "frame" and rec["dir"] == "h2a":
            segments.append((rec, []))
            continue
        if rec["kind"] == "close" and rec["dir"] == "a2h":
            segments[-1][1].append(("close", rec["ch"]))
            continue
        if rec["kind"] != "frame":
            continue
        raw = bytearray.fromhex(rec["header_hex"] + rec["payload_hex"])
        if rec["ch"] == "tty":
            struct.pack_into(">Q", raw, 0, SEQS.get(rec["seq"], rec["seq"]))
        if segments:
            segments[-1][1].append((rec["ch"], bytes(raw)))
        else:
            prelude.append(bytes(raw))
    return prelude, segments


async def _read_ctl(pipe: Pipe, decoder: CtlDecoder) -> tuple[int, bytes]:
    with anyio.fail_after(IO_DEADLINE):
        while (frame := decoder.next_frame()) is None:
            decoder.feed(await pipe.receive())
    return frame.code, frame.payload


async def _agent(
    ctl_listener: PipeListener, tty_listener: PipeListener, scenario: str, seen: list[Any]
) -> None:
    prelude, segments = _script(scenario)
    ctl = await ctl_listener.accept()
    tty = await tty_listener.accept()
    for raw in prelude:
        await ctl.send(raw)
    decoder = CtlDecoder()
    for recorded, answers in segments:
        code, payload = await _read_ctl(ctl, decoder)
        if code == Code.VERSION:  # auto-detection, not part of this recording
            await ctl.send(VERSION_REPLY)
            code, payload = await _read_ctl(ctl, decoder)
        seen.append((recorded, code, payload))
        for kind, data in answers:
            if kind == "close":
                await (ctl if data == "ctl" else tty).aclose()
            else:
                await (ctl if kind == "ctl" else tty).send(data)


async def test_pod_container_echo(anyio_backend: object, short_tmp: Path) -> None:
    ctl_listener = await PipeListener.create(str(short_tmp / "vm.ctl"))
    tty_listener = await PipeListener.create(str(short_tmp / "vm.tty"))
    seen: list[Any] = []
    _, segments = _script("pod_container_echo")
    startpod = segments[0][0]["payload_json"]
    container = segments[1][0]["payload_json"]
    process = {k: v for k, v in container["process"].items() if k not in ("stdio", "stderr")}
    try:
        async with proxied(short_tmp) as proxy, anyio.create_task_group() as tg:
            tg.start_soon(_agent, ctl_listener, tty_listener, "pod_container_echo", seen)
            runtime = await proxy.connect()
            payload = {
                "containerId": "hs",
                "ctlSerial": str(short_tmp / "vm.ctl"),
                "ioSerial": str(short_tmp / "vm.tty"),
                "numIOStreams": 1,
            }
            ok, body = await runtime.call(Command.REGISTER_VM, payload)
            assert ok, body
            token = body["io"]["tokens"][0]
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
    # what went to the agent is what the real hyperstart accepted (seqs renumbered)
    (pod_rec, _, pod_sent), (nc_rec, _, nc_sent) = seen[0], seen[1]
    assert pod_sent == bytes.fromhex(pod_rec["payload_hex"])
    expected = nc_rec["payload_json"]
    expected["process"].update(stdio=3, stderr=4)
    assert msgspec.json.decode(nc_sent) == expected
    assert [code for _, code, _ in seen] == [rec["code"] for rec, _ in segments]
