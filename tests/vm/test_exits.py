"""VMSession's exit notifications against the real pair (``hyperd.sim`` behind
``hyperd.proxy``): each exit reaches ``on_exit`` with its token and status, exits that happened
while no session was attached arrive right after the next AttachVM, and a proxy without the
extension is reported as such."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream

from hyperd.cli.client import ShimClient
from hyperd.vm import ProcessExit, VMSession
from tests.conftest import make_busybox_rootfs
from tests.procs import stop
from tests.vm.helpers import VM
from tests.vm.test_real_pair import LIVENESS, spawn

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

EXIT_DEADLINE = 20.0  # a container's start and exit on a busy 2-core machine: far below this
POD = msgspec.json.encode({"hostname": "pod1", "shareDir": "hyperShared"})


class Pair:
    def __init__(self, tmp: Path, *proxy_args: str) -> None:
        self.ctl, self.tty = str(tmp / "ctl.sock"), str(tmp / "tty.sock")
        self.proxy_sock = str(tmp / "proxy.sock")
        self.share = tmp / "share"
        for cid in ("c1", "c2"):
            make_busybox_rootfs(self.share / cid / "rootfs")
        where = ("--ctl", self.ctl, "--tty", self.tty, "--share", str(self.share))
        self.sim = spawn("hyperd.sim", *where, log=tmp / "sim.log")
        self.proxy = spawn(
            "hyperd.proxy", "--socket", self.proxy_sock, *proxy_args, log=tmp / "proxy.log"
        )
        self.url = f"unix://{self.proxy_sock}"

    def session(self, **kwargs: Any) -> VMSession:
        return VMSession(VM, self.url, ctl=self.ctl, tty=self.tty, config=LIVENESS, **kwargs)


@contextlib.contextmanager
def pair(tmp: Path, *proxy_args: str) -> Iterator[Pair]:
    p = Pair(tmp, *proxy_args)
    try:
        yield p
    finally:
        stop(p.proxy)
        stop(p.sim)
        shutil.rmtree(p.share, ignore_errors=True)


def container(cid: str, script: str) -> bytes:
    return msgspec.json.encode(
        {
            "id": cid,
            "rootfs": "rootfs",
            "image": cid,
            "process": {"args": ["sh", "-c", script], "envs": [], "workdir": "/"},
        }
    )


@contextlib.asynccontextmanager
async def started(s: VMSession, cid: str, script: str) -> AsyncIterator[ShimClient]:
    """A container of ``s`` started with a fresh token, its shim connected."""
    (token,) = await s.new_tokens(1)
    shim = await ShimClient.connect(s.proxy_url, token)
    try:
        await shim.wait_connected()
        await s.hyper("newcontainer", container(cid, script), tokens=[token])
        shim.token = token  # type: ignore[attr-defined]
        yield shim
    finally:
        await shim.aclose()


async def next_exit(exits: MemoryObjectReceiveStream[ProcessExit]) -> ProcessExit:
    with anyio.fail_after(EXIT_DEADLINE):
        return await exits.receive()


async def test_exits_reach_on_exit_and_survive_a_detached_session(
    anyio_backend: Any, short_tmp: Path
) -> None:
    send, exits = anyio.create_memory_object_stream[ProcessExit](16)
    with pair(short_tmp) as p, send, exits:
        async with anyio.create_task_group() as tg:
            first = p.session(on_exit=send.send_nowait)
            await tg.start(first.run)
            assert first.exit_notifications
            await first.hyper("startpod", POD)
            async with started(first, "c1", "exit 3") as shim:
                got = await next_exit(exits)
                assert (got.vm_id, got.token, got.container, got.status) == (
                    VM,
                    shim.token,  # type: ignore[attr-defined]
                    "c1",
                    3,
                )
                assert not got.backlog
            async with started(first, "c2", "read x; exit 9") as shim:
                await first.close()  # the daemon goes away; the VM keeps running
                await shim.send_stdin(b"go\n")
                assert await shim.pump(lambda b: None, lambda b: None) == 9
                token = shim.token  # type: ignore[attr-defined]
            second = p.session(register=False, on_exit=send.send_nowait)
            await tg.start(second.run)
            got = await next_exit(exits)
            assert (got.token, got.container, got.status, got.backlog) == (token, "c2", 9, True)
            await second.unregister()


async def test_a_proxy_without_the_extension_is_reported(
    anyio_backend: Any, short_tmp: Path
) -> None:
    with pair(short_tmp, "--no-exit-notifications") as p:
        async with anyio.create_task_group() as tg:
            s = p.session(on_exit=lambda exit: None)
            await tg.start(s.run)
            assert not s.exit_notifications
            plain = p.session(register=False)  # never asks: never told
            await tg.start(plain.run)
            assert not plain.exit_notifications
            await plain.close()
            await s.unregister()
