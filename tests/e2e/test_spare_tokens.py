"""Spare I/O tokens: ``container.create`` and ``exec.create`` take a token allocated ahead, so
they send nothing to the proxy once the spares are there, and every spare token works: the
proxy routes its process's I/O and exit to the shim that claims it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from hyperd.cli.client import RPCClient, ShimClient
from hyperd.daemon.vmadapter import SPARE_MAX, SPARE_MIN, spare_target
from tests.e2e.conftest import Hyperd, Started, rpc, start_pod

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.root]

DEADLINE = 120.0  # seconds for the whole test on a busy machine
POLL = 0.01  # seconds between two looks at hyperd.stats while a refill is under way


async def _vm_stats(c: RPCClient) -> dict[str, Any]:
    stats: dict[str, Any] = (await c.call("hyperd.stats"))["vms"]["p"]
    return stats


async def _spares_refilled(c: RPCClient) -> dict[str, Any]:
    """hyperd.stats once the background refill has filled the spares (hyperd publishes no
    event for it: looked up until then, within the test's deadline)."""
    while True:
        stats = await _vm_stats(c)
        if stats["spare_tokens"] == stats["spare_target"] and stats["in_flight"] == 0:
            return stats
        await anyio.sleep(POLL)


async def _run(c: RPCClient, created: dict[str, Any], cid: str) -> Started:
    shim = await ShimClient.connect(created["proxy_url"], created["token"])
    await shim.wait_connected()
    await c.call("container.start", {"pod": "p", "id": cid})
    return Started(shim)


async def test_creates_take_spare_tokens_that_work(hyperd: Hyperd, busybox_rootfs: Path) -> None:
    rootfs = {"path": str(busybox_rootfs)}
    with anyio.fail_after(DEADLINE):
        async with rpc(hyperd.socket) as c:
            await start_pod(c, "p")
            first = await c.call(
                "container.create",
                {"pod": "p", "id": "c0", "rootfs": rootfs, "process": {"args": ["echo", "c0"]}},
            )
            before = await _spares_refilled(c)
            assert before["spare_tokens"] == SPARE_MIN  # a pod's first spares
            # as many creates as leave half of them: none of them sends a command
            ids = [f"c{n}" for n in range(1, SPARE_MIN - SPARE_MIN // 2 + 1)]
            created = {}
            for cid in ids:
                created[cid] = await c.call(
                    "container.create",
                    {"pod": "p", "id": cid, "rootfs": rootfs, "process": {"args": ["echo", cid]}},
                )
            after = await _vm_stats(c)
            assert after["sent"] == before["sent"], (before, after)
            assert after["spare_tokens"] == SPARE_MIN // 2
            assert after["spare_tokens_used"] - before["spare_tokens_used"] == len(ids)
            tokens = [first["token"], *(x["token"] for x in created.values())]
            assert len(set(tokens)) == len(tokens)
            for cid, result in [("c0", first), *created.items()]:
                ran = await _run(c, result, cid)
                assert await ran.wait() == 0
                assert ran.stdout == f"{cid}\n".encode()
            # the take that leaves fewer than SPARE_LOW refills them, in the background
            mid = await _vm_stats(c)
            await c.call(
                "container.create",
                {"pod": "p", "id": "last", "rootfs": rootfs, "process": {"args": ["true"]}},
            )
            refilled = await _spares_refilled(c)
            assert refilled["spare_tokens_used"] == mid["spare_tokens_used"] + 1
            assert refilled["sent"] == mid["sent"] + 1  # one AttachVM for all of them
            # the pod keeps using them: it is kept more (twice what it took, at most SPARE_MAX)
            assert refilled["spare_tokens"] == spare_target(len(ids) + 1) > SPARE_MIN
            # where the time went, per step (hyperd.stats → timings)
            timings = (await c.call("hyperd.stats"))["timings"]
            for key, count in (
                ("rpc.container.create", len(ids) + 2),
                ("rpc.container.start", len(ids) + 1),
                ("agent.newcontainer", len(ids) + 1),
                ("mount.ahead", len(ids) + 2),
            ):
                assert timings[key]["count"] == count, (key, timings[key])
                assert 0 < timings[key]["p50_us"] <= timings[key]["p99_us"], (key, timings[key])
            assert timings["state.save"]["count"] >= 2 * len(ids)


def test_spare_target_follows_the_pods_use() -> None:
    assert [spare_target(used) for used in (0, 1, 2, 3, 4, 7, 8, 100)] == [
        SPARE_MIN, SPARE_MIN, SPARE_MIN, 6, 8, 14, SPARE_MAX, SPARE_MAX
    ]  # fmt: skip
