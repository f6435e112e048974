"""hyperd's exit-notification extension in hyperd-proxy, against the real simulated VM in both
dialects: every exit of the VM reaches the runtime connection that asked for it (also after
the shim has gone), exits nobody received are kept (bounded) and delivered on the next
AttachVM, and with the extension off the proxy behaves as the reference (no key, no frame)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest

from protocol.ccproxy import Command, Frame, FrameType, Notification, Stream
from tests.proxy.harness import RawClient, hyper, proxied
from tests.proxy.test_sim import POD, _container, collect, sim

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

EXIT_DEADLINE = 20.0  # a busy 2-core machine: a container's start and exit take well below this


async def reply(client: RawClient, command: Command, notices: list[dict[str, Any]]) -> Frame:
    """The response to ``command``; notifications read on the way are appended to ``notices``."""
    while True:
        frame = await client.frame(deadline=EXIT_DEADLINE)
        if frame.type is FrameType.NOTIFICATION:
            assert frame.opcode == Notification.VM_PROCESS_EXITED, frame
            notices.append(msgspec.json.decode(frame.payload))
            continue
        assert frame.type is FrameType.RESPONSE and frame.opcode == command, frame
        return frame


async def call(
    client: RawClient, command: Command, payload: dict[str, Any], notices: list[dict[str, Any]]
) -> Any:
    await client.command(command, payload)
    frame = await reply(client, command, notices)
    body = msgspec.json.decode(frame.payload) if frame.payload else None
    assert not frame.error, body
    return body


async def notice(client: RawClient) -> dict[str, Any]:
    frame = await client.frame(deadline=EXIT_DEADLINE)
    assert (frame.type, frame.opcode) == (FrameType.NOTIFICATION, 1), frame
    decoded: dict[str, Any] = msgspec.json.decode(frame.payload)
    return decoded


def register_payload(base: Path, streams: int, notify: bool = True) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "containerId": "pod1",
        "ctlSerial": str(base / "vm.ctl"),
        "ioSerial": str(base / "vm.tty"),
        "numIOStreams": streams,
    }
    if notify:
        payload["exitNotifications"] = True
    return payload


@pytest.mark.parametrize("dialect", ["cc", "hyper"])
async def test_runtime_gets_every_exit(
    anyio_backend: object, short_tmp: Path, dialect: str
) -> None:
    with sim(short_tmp, dialect) as (_, base):
        async with proxied(short_tmp) as proxy:
            runtime = await proxy.connect()
            notices: list[dict[str, Any]] = []
            body = await call(runtime, Command.REGISTER_VM, register_payload(base, 3), notices)
            assert body["exitNotifications"] is True
            tokens = body["io"]["tokens"]
            await call(runtime, Command.HYPER, hyper("startpod", POD), notices)
            # a container that exits with 3: the shim and the runtime both learn it
            shim = await proxy.connect()
            assert (await shim.call(Command.CONNECT_SHIM, {"token": tokens[0]}))[0]
            data = _container("c1", ["sh", "-c", "exit 3"])
            await call(runtime, Command.HYPER, hyper("newcontainer", data, tokens[:1]), notices)
            assert (await collect(shim))[2] == 3
            if not notices:
                notices.append(await notice(runtime))
            expected = {"containerId": "pod1", "token": tokens[0], "container": "c1", "status": 3}
            if dialect == "hyper":  # the proxy names the process after its seq when unnamed
                expected["process"] = "3"
            assert notices.pop() == expected
            # a shim that goes away before its process ends: the exit still reaches hyperd
            shim2 = await proxy.connect()
            assert (await shim2.call(Command.CONNECT_SHIM, {"token": tokens[1]}))[0]
            data = _container("c2", ["sh", "-c", "read x; exit 7"])
            await call(runtime, Command.HYPER, hyper("newcontainer", data, tokens[1:2]), notices)
            await shim2.command(Command.DISCONNECT_SHIM)
            await shim2.expect_eof()
            kill = {"container": "c2", "signal": 9}
            await call(runtime, Command.HYPER, hyper("killcontainer", kill), notices)
            while not notices:
                notices.append(await notice(runtime))
            (got,) = notices
            assert got["token"] == tokens[1] and got["container"] == "c2"
            assert got["status"] == (0 if dialect == "hyper" else 128 + 9)
            assert "backlog" not in got


@pytest.mark.parametrize("dialect", ["cc", "hyper"])
async def test_exits_kept_while_nobody_listens_are_delivered_on_attach(
    anyio_backend: object, short_tmp: Path, dialect: str
) -> None:
    with sim(short_tmp, dialect) as (_, base):
        async with proxied(short_tmp, "--max-undelivered-exits", "2") as proxy:
            runtime = await proxy.connect()
            notices: list[dict[str, Any]] = []
            body = await call(runtime, Command.REGISTER_VM, register_payload(base, 3), notices)
            tokens = body["io"]["tokens"]
            await call(runtime, Command.HYPER, hyper("startpod", POD), notices)
            shims = []
            for i, cid in enumerate(("c1", "c2")):
                shim = await proxy.connect()
                assert (await shim.call(Command.CONNECT_SHIM, {"token": tokens[i]}))[0]
                shims.append(shim)
                data = _container(cid, ["sh", "-c", f"read x; exit {10 + i}"])
                await call(
                    runtime, Command.HYPER, hyper("newcontainer", data, [tokens[i]]), notices
                )
            exec_shim = await proxy.connect()
            assert (await exec_shim.call(Command.CONNECT_SHIM, {"token": tokens[2]}))[0]
            exec_data = {"container": "c2", "process": {"args": ["sh", "-c", "read x; exit 12"]}}
            await call(runtime, Command.HYPER, hyper("execcmd", exec_data, tokens[2:]), notices)
            await runtime.aclose()  # hyperd goes away; its processes keep running
            # one after the other: an exec dies with its container's init
            for shim, status in ((exec_shim, 12), (shims[0], 10), (shims[1], 11)):
                await shim.stream_frame(Stream.STDIN, b"go\n")
                assert (await collect(shim))[2] == status
            # three exits, two kept (the oldest is dropped): they follow the AttachVM response
            again = await proxy.connect()
            attach = {"containerId": "pod1", "exitNotifications": True}
            await again.command(Command.ATTACH_VM, attach)
            frame = await again.frame(deadline=EXIT_DEADLINE)
            assert frame.type is FrameType.RESPONSE
            assert msgspec.json.decode(frame.payload)["exitNotifications"] is True
            got = [await notice(again), await notice(again)]
            assert [(n["token"], n["status"], n["backlog"]) for n in got] == [
                (tokens[0], 10, True),
                (tokens[1], 11, True),
            ]
            await again.no_frame()
            # a second attach finds nothing left
            third = await proxy.connect()
            body = await call(
                third, Command.ATTACH_VM, {"containerId": "pod1", "exitNotifications": True}, []
            )
            assert body["exitNotifications"] is True
            await third.no_frame()


async def test_extension_off_behaves_as_the_reference(
    anyio_backend: object, short_tmp: Path
) -> None:
    with sim(short_tmp, "cc") as (_, base):
        async with proxied(short_tmp, "--no-exit-notifications") as proxy:
            runtime = await proxy.connect()
            await runtime.command(Command.REGISTER_VM, register_payload(base, 1))
            frame = await runtime.frame(deadline=EXIT_DEADLINE)
            body = msgspec.json.decode(frame.payload)
            assert "exitNotifications" not in body
            tokens = body["io"]["tokens"]
            assert await runtime.call(Command.HYPER, hyper("startpod", POD)) == (True, b"")
            shim = await proxy.connect()
            assert (await shim.call(Command.CONNECT_SHIM, {"token": tokens[0]}))[0]
            data = _container("c1", ["sh", "-c", "exit 4"])
            assert await runtime.call(Command.HYPER, hyper("newcontainer", data, tokens)) == (
                True,
                b"",
            )
            assert (await collect(shim))[2] == 4
            await runtime.no_frame()
            # and nothing is kept for a later attach either
            again = await proxy.connect()
            ok, body = await again.call(
                Command.ATTACH_VM, {"containerId": "pod1", "exitNotifications": True}
            )
            assert ok and "exitNotifications" not in body
            await again.no_frame()
