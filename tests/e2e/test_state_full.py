"""A full state filesystem: saves fail as RPC errors, nothing is reported that was not saved,
and a restart finds exactly what was reported (the pod whose VM runs is not forgotten)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from hyperd.cli.client import RPCError
from tests.e2e.conftest import Hyperd, create_and_start, rpc, start_pod

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.root]

STATE_FS_SIZE = "1m"  # as in the report: 2,000 creates on a 1 MiB tmpfs
CREATES = 2000
ENV_BYTES = 2000  # makes each container's row about 2 KB: the filesystem fills within CREATES


@pytest.fixture
def small_state_dir(short_tmp: Path) -> Iterator[Path]:
    where = short_tmp / "st"
    where.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={STATE_FS_SIZE},mode=0700", "tmpfs", str(where)],
        check=True,
    )
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


async def test_full_state_filesystem(
    hyperd_factory: Hyperd, small_state_dir: Path, busybox_rootfs: Path
) -> None:
    hyperd_factory.args = ["--state-dir", str(small_state_dir)]
    hyperd_factory.start(stop_pods_on_exit=False)
    created: list[str] = []
    with anyio.fail_after(300):
        async with rpc(hyperd_factory.socket) as c:
            pod = await start_pod(c, "p")
            ran = await create_and_start(c, "p", "first", busybox_rootfs, ["sleep", "1000"])
            process = {"args": ["true"], "env": [f"PAD={'x' * ENV_BYTES}"]}
            failure: RPCError | None = None
            for n in range(CREATES):
                params = {"pod": "p", "id": f"c{n}", "rootfs": {"path": str(busybox_rootfs)}}
                try:
                    await c.call("container.create", {**params, "process": process})
                except RPCError as exc:
                    failure = exc
                    break
                created.append(f"c{n}")
            assert failure is not None, "the filesystem never filled up"
            assert failure.kind == "state_error", failure
            assert "full" in failure.message, failure.message
            listed = {x["id"] for x in (await c.call("container.list", {"pod": "p"}))["containers"]}
            assert listed == {"first", *created}  # the refused one is not there
            health = await c.call("hyperd.health")
            assert health["status"] == "degraded" and health["state"]["save_failures"] >= 1
            # a start whose intent cannot be saved is refused before anything is mounted
            with pytest.raises(RPCError) as err:
                await c.call("container.start", {"pod": "p", "id": created[-1]})
            assert err.value.kind == "state_error"
            assert [m for m in hyperd_factory.mounts_under_base() if f"/{created[-1]}/" in m] == []
        await ran.shim.aclose()
        assert hyperd_factory.stop() == 0  # pods stay running

        hyperd_factory.start(stop_pods_on_exit=False)
        async with rpc(hyperd_factory.socket) as c:
            info = await c.call("pod.inspect", {"id": "p"})
            assert info["state"] == "running" and info["vm_pid"] == pod["vm_pid"]
            states = {x["id"]: x["state"] for x in info["containers"]}
            assert states == {"first": "running", **dict.fromkeys(created, "created")}
    # (the filesystem is still full: stopping the pod is done by the fixture's clean-up)
