"""Settling a container a crash caught in the middle of ``container.stop`` (its intent saved,
nothing after): the daemon's own settle step against an agent that no longer has it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from hyperd.config import default_config
from hyperd.daemon.adoption import _settle
from hyperd.daemon.model import (
    ContainerRecord,
    ContainerState,
    ExecRecord,
    ExecState,
    PodRecord,
    PodState,
)
from hyperd.daemon.service import Daemon, PodRuntime
from hyperd.errors import AgentError
from hyperd.rpc.pending import Pending
from hyperd.spec import ProcessSpec, RootfsSpec
from hyperd.store import StateStore

pytestmark = pytest.mark.anyio


class _AgentWithoutContainers:
    """An agent link whose agent knows no container: every command is answered ERROR."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    @property
    def proxy_url(self) -> str:
        return "unix:///nowhere"

    async def hyper(
        self, name: str, data: bytes | None = None, *, tokens: Sequence[str] = ()
    ) -> bytes:
        self.sent.append(name)
        raise AgentError("ERROR received from VM agent")

    def send(self, name: str, data: bytes | None = None) -> Pending[bytes]:
        self.sent.append(name)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        future.set_exception(AgentError("ERROR received from VM agent"))
        return Pending(future, lambda done: done.result())

    async def new_tokens(self, count: int) -> list[str]:
        raise AssertionError("no token is needed to settle a container")

    def statistics(self) -> dict[str, Any]:
        return {}

    def mark_unreachable(self, reason: str) -> None:
        pass

    @property
    def exit_notifications(self) -> bool:
        return True


async def test_an_interrupted_stop_ends_the_containers_execs(tmp_path: Path) -> None:
    share = tmp_path / "shared" / "p"
    (share / "c" / "rootfs").mkdir(parents=True)
    c = ContainerRecord(
        id="c",
        rootfs=RootfsSpec(path="/"),
        process=ProcessSpec(args=["sleep", "1"]),
        token="t1",
        state=ContainerState.RUNNING,
        intent="stop",
    )
    e = ExecRecord(id="e", container="c", process=ProcessSpec(args=["sh"]), token="t2")
    e.state = ExecState.RUNNING
    pod = PodRecord(
        id="p", share_dir=str(share), state=PodState.RUNNING, containers={"c": c}, execs={"e": e}
    )
    store = StateStore(tmp_path / "state")
    try:
        async with anyio.create_task_group() as tg:
            d = Daemon(default_config(str(tmp_path)), store, tg)
            d.pods["p"] = pod
            d.runtime["p"] = PodRuntime()
            link = _AgentWithoutContainers()
            await _settle(d, pod, c, link)
        assert link.sent == ["killcontainer"]  # the probe: the agent has it no more
        assert (c.state, c.intent, c.mounts_made) == (ContainerState.STOPPED, "", [])
        assert e.state == ExecState.EXITED  # as container.stop leaves them
        assert not (share / "c").exists()
    finally:
        store.close()
