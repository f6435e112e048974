"""A full state filesystem: saves fail as RPC errors, nothing is reported that was not saved,
and a restart finds exactly what was reported (the pod whose VM runs is not forgotten)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from hyperd.cli.client import RPCError, ShimClient
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


def _fill(directory: Path) -> Path:
    """A file that takes every byte left on ``directory``'s filesystem."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for size in (65536, 4096, 1):  # then what is left, smaller and smaller
            try:
                while os.write(fd, b"\0" * size) == size:
                    pass
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


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
                    last = await c.call("container.create", {**params, "process": process})
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
            # a start whose intent cannot be saved is refused before the agent is told. The
            # filesystem is filled to the last byte first; SQLite may still find room in its
            # WAL (it reuses the file's pages after a checkpoint): then the save succeeds and
            # the start goes on, which is right too (its shim is connected for that case)
            shim = await ShimClient.connect(last["proxy_url"], last["token"])
            filler = _fill(small_state_dir)
            try:
                await shim.wait_connected()
                try:
                    await c.call("container.start", {"pod": "p", "id": created[-1]})
                    refused = None
                except RPCError as exc:
                    refused = exc
            finally:
                filler.unlink()
                await shim.aclose()
            inspected = await c.call("container.inspect", {"pod": "p", "id": created[-1]})
            if refused is not None:
                assert refused.kind == "state_error", refused
                assert inspected["state"] == "created", inspected
            else:
                assert inspected["state"] in ("running", "exited"), inspected
        await ran.shim.aclose()
        assert hyperd_factory.stop() == 0  # pods stay running

        hyperd_factory.start(stop_pods_on_exit=False)
        async with rpc(hyperd_factory.socket) as c:
            info = await c.call("pod.inspect", {"id": "p"})
            assert info["state"] == "running" and info["vm_pid"] == pod["vm_pid"]
            states = {x["id"]: x["state"] for x in info["containers"]}
            last_state = "created" if refused is not None else states.get(created[-1])
            assert last_state in ("created", "running", "exited"), states
            assert states == {
                "first": "running",
                **dict.fromkeys(created[:-1], "created"),
                created[-1]: last_state,
            }
    # (the filesystem is still full: stopping the pod is done by the fixture's clean-up)
