"""The rename-exchange race of container.start, through a real hyperd: a loop swaps the attacker's
rootfs directory with a symlink into another pod's share while containers start. Every start is
refused or mounts the attacker's own directory: 0 foreign mounts in 120 starts."""

from __future__ import annotations

import ctypes
import os
import shutil
import threading
from pathlib import Path

import anyio
import pytest

from hyperd.cli.client import RPCError, ShimClient
from tests.e2e.conftest import Hyperd, rpc, start_pod

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.root]

RACE_STARTS = 120
RENAME_EXCHANGE = 2  # <linux/fs.h>
DEADLINE = 900.0  # 120 full lifecycles on a busy 2-core machine, with a margin
_libc = ctypes.CDLL(None, use_errno=True)


def _swap_until(stop: threading.Event, directory: Path, counter: list[int]) -> None:
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
    try:
        while not stop.is_set():
            if _libc.renameat2(fd, b"src", fd, b"alt", RENAME_EXCHANGE) != 0:
                raise OSError(ctypes.get_errno(), "renameat2")
            counter[0] += 1
            if counter[0] % 7 == 0:
                os.sched_yield()
    finally:
        os.close(fd)


async def test_rename_exchange_race_mounts_no_foreign_volume(
    hyperd: Hyperd, busybox_rootfs: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "victim-data"
    shutil.copytree(busybox_rootfs, secret, symlinks=True)
    (secret / "VICTIM").write_text("victim's data\n")
    attacker = tmp_path / "attacker"
    attacker.mkdir()
    shutil.copytree(busybox_rootfs, attacker / "src", symlinks=True)
    (attacker / "src" / "ATTACKER").write_text("mine\n")
    shared = hyperd.base / "shared"
    with anyio.fail_after(DEADLINE):
        async with rpc(hyperd.socket) as c:
            await start_pod(c, "victim")
            await start_pod(c, "evil")
            # the victim's running container, with its data as a volume in its share
            created = await c.call(
                "container.create",
                {
                    "pod": "victim",
                    "id": "v",
                    "rootfs": {"path": str(busybox_rootfs)},
                    "process": {"args": ["sleep", "300"]},
                    "mounts": [{"source": str(secret), "destination": "/data"}],
                },
            )
            victim_shim = await ShimClient.connect(created["proxy_url"], created["token"])
            await victim_shim.wait_connected()
            await c.call("container.start", {"pod": "victim", "id": "v"})
            (volume,) = [p for p in (shared / "victim").iterdir() if p.name.startswith("v-")]
            assert (volume / "VICTIM").exists()
            (attacker / "alt").symlink_to(volume)

            stop = threading.Event()
            swaps = [0]
            swapper = threading.Thread(target=_swap_until, args=(stop, attacker, swaps))
            swapper.start()
            mounted = refused = foreign = 0
            try:
                for i in range(RACE_STARTS):
                    cid = f"c{i}"
                    created = await c.call(
                        "container.create",
                        {
                            "pod": "evil",
                            "id": cid,
                            "rootfs": {"path": str(attacker / "src")},
                            "process": {"args": ["true"]},
                        },
                    )
                    shim = await ShimClient.connect(created["proxy_url"], created["token"])
                    try:
                        await shim.wait_connected()
                        try:
                            await c.call("container.start", {"pod": "evil", "id": cid})
                        except RPCError as exc:
                            assert "inside the shared root" in str(exc), exc
                            refused += 1
                        else:
                            mounted += 1
                            names = set(os.listdir(shared / "evil" / cid / "rootfs"))
                            if "VICTIM" in names or "ATTACKER" not in names:
                                foreign += 1
                            await shim.pump(lambda _: None, lambda _: None)
                            await c.call("container.stop", {"pod": "evil", "id": cid})
                    finally:
                        await shim.aclose()
                    await c.call("container.delete", {"pod": "evil", "id": cid})
            finally:
                stop.set()
                swapper.join()
            await c.call("pod.stop", {"id": "evil"})
            await victim_shim.aclose()
    assert swaps[0] > 0
    assert foreign == 0, (mounted, refused, foreign)
    assert mounted + refused == RACE_STARTS
    # the probe hit both sides of the race: starts from the directory and from the symlink
    assert mounted > 0 and refused > 0, (mounted, refused)
