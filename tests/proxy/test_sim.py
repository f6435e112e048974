"""hyperd-proxy in front of the real simulated VM (``python -m hyperd.sim``), in both dialects,
with real container processes: the dialect is detected, stdin/stdout/stderr and the exit
status travel end to end, a dying VM answers its in-flight command, and a pod-mode proxy
exits once the VM is unregistered and gone."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from protocol.ccproxy import Command, Frame, FrameType, Stream
from tests.conftest import make_busybox_rootfs
from tests.procs import spawn_ready, stop
from tests.proxy.harness import RawClient, hyper, proxied, spawn_proxy

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

READY_DEADLINE = 20.0
POD = {"hostname": "pod1", "shareDir": "hyperShared"}


def _container(cid: str, args: list[str], **process: Any) -> dict[str, Any]:
    return {
        "id": cid,
        "rootfs": "rootfs",
        "image": cid,
        "process": {
            "args": args,
            "envs": [{"env": "PATH", "value": "/bin"}],
            "workdir": "/",
            **process,
        },
    }


@contextlib.contextmanager
def sim(base: Path, dialect: str, *extra: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A simulated VM with a busybox rootfs for containers c1 and c2; yields (process, base)."""
    share = base / "share"
    for cid in ("c1", "c2"):
        make_busybox_rootfs(share / cid / "rootfs")
    argv = [
        sys.executable, "-m", "hyperd.sim", "--ctl", str(base / "vm.ctl"), "--tty",
        str(base / "vm.tty"), "--share", str(share), "--dialect", dialect,
        "--record", str(base / "record.jsonl"), *extra,
    ]  # fmt: skip
    proc = spawn_ready(argv, stderr=subprocess.DEVNULL, deadline=READY_DEADLINE)
    try:
        yield proc, base
    finally:
        stop(proc)
        shutil.rmtree(share, ignore_errors=True)


def recorded(base: Path) -> list[dict[str, Any]]:
    lines = (base / "record.jsonl").read_text().splitlines()
    return [msgspec.json.decode(line) for line in lines]


async def register(client: RawClient, base: Path, streams: int = 0) -> list[str]:
    payload = {
        "containerId": "pod1",
        "ctlSerial": str(base / "vm.ctl"),
        "ioSerial": str(base / "vm.tty"),
        "numIOStreams": streams,
    }
    ok, body = await client.call(Command.REGISTER_VM, payload)
    assert ok, body
    return list(body["io"]["tokens"] or [])


async def collect(shim: RawClient) -> tuple[bytes, bytes, int]:
    """stdout, stderr and the exit status of the shim's process."""
    out, err = bytearray(), bytearray()
    while True:
        frame = await shim.frame(deadline=10)
        if frame.type is FrameType.NOTIFICATION:
            return bytes(out), bytes(err), frame.payload[0]
        (out if frame.opcode == Stream.STDOUT else err).extend(frame.payload)


@pytest.mark.parametrize("dialect", ["cc", "hyper"])
async def test_container_end_to_end(anyio_backend: object, short_tmp: Path, dialect: str) -> None:
    with sim(short_tmp, dialect) as (_, base):
        async with proxied(short_tmp) as proxy:
            runtime = await proxy.connect()
            tokens = await register(runtime, base, 1)
            assert await runtime.call(Command.HYPER, hyper("startpod", POD)) == (True, b"")
            shim = await proxy.connect()
            assert await shim.call(Command.CONNECT_SHIM, {"token": tokens[0]}) == (True, b"")
            script = "read x; echo got $x; echo err >&2; exit 3"
            data = _container("c1", ["sh", "-c", script])
            assert await runtime.call(Command.HYPER, hyper("newcontainer", data, tokens)) == (
                True,
                b"",
            )
            await shim.stream_frame(Stream.STDIN, b"hi\n")
            await shim.stream_frame(Stream.STDIN, b"")
            assert await collect(shim) == (b"got hi\n", b"err\n", 3)
            await shim.command(Command.DISCONNECT_SHIM)
            await shim.expect_eof()
            assert await runtime.call(Command.HYPER, hyper("destroypod")) == (True, b"")
        names = [r["name"] for r in recorded(base)]
        assert names[:3] == ["version", "startpod", "newcontainer"]
        process = recorded(base)[2]["payload"]["process"]
        assert (process["stdio"], process["stderr"]) == (3, 4)
        assert ("id" in process) == (dialect == "hyper")


@pytest.mark.parametrize("dialect", ["cc", "hyper"])
async def test_signal_and_exec(anyio_backend: object, short_tmp: Path, dialect: str) -> None:
    """A shim's SIGTERM reaches the container init; an exec'd process gets its own seqs."""
    with sim(short_tmp, dialect) as (_, base):
        async with proxied(short_tmp) as proxy:
            runtime = await proxy.connect()
            tokens = await register(runtime, base, 2)
            assert (await runtime.call(Command.HYPER, hyper("startpod", POD)))[0]
            init, ex = await proxy.connect(), await proxy.connect()
            assert (await init.call(Command.CONNECT_SHIM, {"token": tokens[0]}))[0]
            assert (await ex.call(Command.CONNECT_SHIM, {"token": tokens[1]}))[0]
            data = _container("c1", ["sleep", "30"])
            assert (await runtime.call(Command.HYPER, hyper("newcontainer", data, tokens[:1])))[0]
            exec_data = {"container": "c1", "process": {"args": ["echo", "exec"], "workdir": "/"}}
            ok, msg = await runtime.call(Command.HYPER, hyper("execcmd", exec_data, tokens[1:]))
            assert ok, msg
            assert await collect(ex) == (b"exec\n", b"", 0)
            assert await init.call(Command.SIGNAL, {"signalNumber": 15}) == (True, b"")
            _, _, status = await collect(init)
            assert status in (0, 128 + 15)


async def test_vm_crash_answers_in_flight(anyio_backend: object, short_tmp: Path) -> None:
    """The VM stops answering, then dies: the reference leaves the in-flight command without
    a response forever; we answer it and close the shims."""
    with sim(short_tmp, "cc", "--silent-after", "2") as (proc, base):
        async with proxied(short_tmp) as proxy:
            runtime = await proxy.connect()
            tokens = await register(runtime, base, 1)  # GETVERSION is command 1
            assert (await runtime.call(Command.HYPER, hyper("startpod", POD)))[0]
            shim = await proxy.connect()
            assert (await shim.call(Command.CONNECT_SHIM, {"token": tokens[0]}))[0]
            await runtime.command(Command.HYPER, hyper("ping"))
            await anyio.sleep(0.2)
            proc.kill()
            frame = await runtime.frame()
            assert frame == Frame(
                FrameType.RESPONSE,
                Command.HYPER,
                b'{"msg":"No multicast available for CTL channel"}',
                True,
            )
            await shim.expect_eof()


async def test_pod_mode_with_sim(anyio_backend: object, short_tmp: Path) -> None:
    """Kata's sequence against a pod-mode proxy: register, startsandbox, destroysandbox,
    UnregisterVM; the proxy exits once the VM is gone."""
    with sim(short_tmp, "cc") as (proc, base):
        sock = short_tmp / "pod.sock"
        process = spawn_proxy(sock, pod=True)
        try:
            runtime = await RawClient.connect(str(sock))
            await register(runtime, base)
            assert await runtime.call(Command.HYPER, hyper("startsandbox", POD)) == (True, b"")
            assert await runtime.call(Command.HYPER, hyper("destroysandbox")) == (True, b"")
            assert await runtime.call(Command.UNREGISTER_VM, {"containerId": "pod1"}) == (
                True,
                b"",
            )
            await runtime.aclose()
            assert process.proc.poll() is None
            proc.send_signal(signal.SIGTERM)
            assert await anyio.to_thread.run_sync(process.proc.wait, 10) == 0
        finally:
            process.stop()
            assert process.proc.stderr is not None
            process.proc.stderr.close()
