"""``kill -9`` of hyperd in the middle of pod and container start: a clean state after restart.

The daemon is started with the test-only fault hook ``HYPERD_TEST_CRASH_AT`` naming a crash
point; it SIGKILLs itself there. The restarted daemon must show a consistent pod (no orphaned
mount, no helper process left behind, nothing that cannot be started again or deleted).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
from pathlib import Path
from typing import Any

import anyio
import pytest

from hyperd.cli.client import ConnectionClosed, RPCClient, RPCError, ShimClient
from hyperd.store import DB_NAME
from tests.e2e.conftest import (
    Hyperd,
    create_and_start,
    helper_pids,
    process_alive,
    rpc,
    start_pod,
)

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.root]

CRASH = "HYPERD_TEST_CRASH_AT"


def _wait_killed(hyperd: Hyperd) -> None:
    assert hyperd.proc is not None
    assert hyperd.proc.wait(30) == -signal.SIGKILL


@pytest.mark.parametrize("point", ["pod.start:vm-launched", "pod.start:registered"])
async def test_crash_during_pod_start(
    hyperd_factory: Hyperd, busybox_rootfs: Path, point: str
) -> None:
    hyperd_factory.start(env={CRASH: point})
    with anyio.fail_after(60):
        async with rpc(hyperd_factory.socket) as c:
            await c.call("pod.create", {"id": "half"})
            with pytest.raises((ConnectionClosed, RPCError)):
                await c.call("pod.start", {"id": "half"})
        await anyio.to_thread.run_sync(_wait_killed, hyperd_factory)
        assert helper_pids(hyperd_factory.base)  # the crash left helpers behind

        hyperd_factory.start()
        assert helper_pids(hyperd_factory.base) == set()
        assert hyperd_factory.mounts_under_base() == []
        async with rpc(hyperd_factory.socket) as c:
            info = await c.call("pod.inspect", {"id": "half"})
            assert info["state"] == "created"
            assert info["vm_pid"] is None and info["proxy_pid"] is None
            # the half-started pod starts cleanly now, runs a container, and goes away
            await c.call("pod.start", {"id": "half"})
            ran = await create_and_start(c, "half", "c", busybox_rootfs, ["echo", "ok"])
            assert await ran.wait() == 0 and ran.stdout == b"ok\n"
            await c.call("pod.stop", {"id": "half"})
            await c.call("pod.delete", {"id": "half"})
        assert hyperd_factory.mounts_under_base() == []


async def test_crash_during_container_start(hyperd_factory: Hyperd, busybox_rootfs: Path) -> None:
    hyperd_factory.start(env={CRASH: "container.start:mounted"}, stop_pods_on_exit=False)
    with anyio.fail_after(60):
        async with rpc(hyperd_factory.socket) as c:
            pod = await start_pod(c, "p")
            with pytest.raises((ConnectionClosed, RPCError, anyio.BrokenResourceError)):
                await create_and_start(c, "p", "c", busybox_rootfs, ["echo", "never"])
        await anyio.to_thread.run_sync(_wait_killed, hyperd_factory)
        rootfs_mount = str(hyperd_factory.base / "shared" / "p" / "c" / "rootfs")
        assert rootfs_mount in hyperd_factory.mounts_under_base()  # the crash left it mounted

        hyperd_factory.start()
        assert hyperd_factory.mounts_under_base() == []
        async with rpc(hyperd_factory.socket) as c:
            info = await c.call("pod.inspect", {"id": "p"})
            assert info["state"] == "running"
            assert info["vm_pid"] == pod["vm_pid"]  # the pod itself was re-adopted
            assert (await c.call("container.inspect", {"pod": "p", "id": "c"}))["state"] == (
                "created"
            )
            ran = await create_and_start(c, "p", "c2", busybox_rootfs, ["echo", "fine"])
            assert await ran.wait() == 0 and ran.stdout == b"fine\n"
            await c.call("pod.stop", {"id": "p"})
            await c.call("pod.delete", {"id": "p"})
        assert hyperd_factory.mounts_under_base() == []
        assert helper_pids(hyperd_factory.base) == set()


async def _start_until_the_crash(c: RPCClient, **params: Any) -> ShimClient:
    """container.create of "c" in pod "p" with ``params``, its shim claims the token, and
    container.start, in which the daemon SIGKILLs itself (crash point container.start:sent,
    right after NEWCONTAINER); the shim, still connected."""
    created = await c.call("container.create", {"pod": "p", "id": "c", **params})
    shim = await ShimClient.connect(created["proxy_url"], created["token"])
    await shim.wait_connected()
    with pytest.raises((ConnectionClosed, RPCError, anyio.BrokenResourceError)):
        await c.call("container.start", {"pod": "p", "id": "c"})
    return shim


async def test_crash_after_newcontainer_adopts_the_running_container(
    hyperd_factory: Hyperd, busybox_rootfs: Path
) -> None:
    """The agent started it; the record still says "created" (a start saves nothing): the
    restart asks the agent and adopts it as running, with the rootfs mounted ahead."""
    hyperd_factory.start(env={CRASH: "container.start:sent"}, stop_pods_on_exit=False)
    with anyio.fail_after(60):
        async with rpc(hyperd_factory.socket) as c:
            await start_pod(c, "p")
            shim = await _start_until_the_crash(
                c,
                rootfs={"path": str(busybox_rootfs)},
                process={"args": ["sh", "-c", "read line; echo got $line"]},
            )
        await anyio.to_thread.run_sync(_wait_killed, hyperd_factory)

        hyperd_factory.start()
        async with rpc(hyperd_factory.socket) as c:
            info = await c.call("container.inspect", {"pod": "p", "id": "c"})
            assert info["state"] == "running"
            assert info["mounts"] == [str(hyperd_factory.base / "shared" / "p" / "c" / "rootfs")]
            assert hyperd_factory.mounts_under_base() == info["mounts"]
            # the container really runs: the shim that claimed the token talks to it
            await shim.send_stdin(b"hello\n")
            out = bytearray()
            assert await shim.pump(out.extend, out.extend) == 0 and out == b"got hello\n"
            await shim.aclose()
            await c.call("container.stop", {"pod": "p", "id": "c"})
            await c.call("pod.stop", {"id": "p"})
        assert hyperd_factory.mounts_under_base() == []
        assert helper_pids(hyperd_factory.base) == set()


@pytest.mark.parametrize("dialect", ["cc", "hyper"])
async def test_crash_after_newcontainer_finds_the_mounts_and_the_exit(
    hyperd_factory: Hyperd, busybox_rootfs: Path, tmp_path: Path, dialect: str
) -> None:
    """container.start saves nothing before NEWCONTAINER: after a crash right after it, the
    restart learns that the container was started (the CC agent still has it; the hyperhq
    agent freed it when it exited, but the proxy kept its exit), records the rootfs and the
    volume mounted ahead by container.create (found in the mount table), and applies the exit
    that happened while hyperd was down (kept by the proxy, sent after the AttachVM)."""
    volume = tmp_path / "vol"
    volume.mkdir()
    hyperd_factory.start(env={CRASH: "container.start:sent"}, stop_pods_on_exit=False)
    with anyio.fail_after(60):
        async with rpc(hyperd_factory.socket) as c:
            await start_pod(c, "p", vm={"backend": "sim", "dialect": dialect})
            shim = await _start_until_the_crash(
                c,
                rootfs={"path": str(busybox_rootfs)},
                process={"args": ["sh", "-c", "read line; exit 7"]},
                mounts=[{"source": str(volume), "destination": "/data", "type": "bind"}],
            )
        await anyio.to_thread.run_sync(_wait_killed, hyperd_factory)
        mounted = hyperd_factory.mounts_under_base()
        rootfs = str(hyperd_factory.base / "shared" / "p" / "c" / "rootfs")
        assert rootfs in mounted and len(mounted) == 2  # the rootfs and the volume
        # the container ends while hyperd is down
        await shim.send_stdin(b"bye\n")
        assert await shim.pump(lambda _: None, lambda _: None) == 7
        await shim.aclose()

        hyperd_factory.start()
        async with rpc(hyperd_factory.socket) as c:
            info = await c.call("container.inspect", {"pod": "p", "id": "c"})
            assert info["state"] == "exited" and info["exit_status"] == 7, info
            assert sorted(info["mounts"]) == sorted(mounted)
            await c.call("container.stop", {"pod": "p", "id": "c"})
            assert hyperd_factory.mounts_under_base() == []
            await c.call("container.delete", {"pod": "p", "id": "c"})
            await c.call("pod.stop", {"id": "p"})
        assert helper_pids(hyperd_factory.base) == set()


async def test_crash_after_removecontainer_completes_the_stop(
    hyperd_factory: Hyperd, busybox_rootfs: Path
) -> None:
    hyperd_factory.start(env={CRASH: "container.stop:removed"}, stop_pods_on_exit=False)
    with anyio.fail_after(60):
        async with rpc(hyperd_factory.socket) as c:
            await start_pod(c, "p")
            ran = await create_and_start(c, "p", "c", busybox_rootfs, ["true"])
            assert await ran.wait() == 0
            with pytest.raises((ConnectionClosed, RPCError, anyio.BrokenResourceError)):
                await c.call("container.stop", {"pod": "p", "id": "c"})
        await anyio.to_thread.run_sync(_wait_killed, hyperd_factory)
        assert hyperd_factory.mounts_under_base() != []  # the crash left the rootfs mounted

        hyperd_factory.start()
        assert hyperd_factory.mounts_under_base() == []
        async with rpc(hyperd_factory.socket) as c:
            info = await c.call("container.inspect", {"pod": "p", "id": "c"})
            assert info["state"] == "stopped" and info["mounts"] == []
            await c.call("container.delete", {"pod": "p", "id": "c"})
            await c.call("pod.stop", {"id": "p"})
        assert helper_pids(hyperd_factory.base) == set()


async def test_stopped_container_stays_stopped_across_a_restart(
    hyperd_factory: Hyperd, busybox_rootfs: Path
) -> None:
    """container.stop saves its intent before REMOVECONTAINER and nothing after: the next
    start settles that intent to the state the stop answered."""
    hyperd_factory.start(stop_pods_on_exit=False)
    with anyio.fail_after(60):
        async with rpc(hyperd_factory.socket) as c:
            await start_pod(c, "p")
            ran = await create_and_start(c, "p", "c", busybox_rootfs, ["true"])
            assert await ran.wait() == 0
            stopped = await c.call("container.stop", {"pod": "p", "id": "c"})
            assert stopped["state"] == "stopped" and stopped["mounts"] == []
        assert hyperd_factory.stop() == 0

        hyperd_factory.start()
        async with rpc(hyperd_factory.socket) as c:
            info = await c.call("container.inspect", {"pod": "p", "id": "c"})
            assert (info["state"], info["exit_status"], info["mounts"]) == ("stopped", 0, [])
            await c.call("container.delete", {"pod": "p", "id": "c"})
            await c.call("pod.stop", {"id": "p"})
        assert hyperd_factory.mounts_under_base() == []
        assert helper_pids(hyperd_factory.base) == set()


async def test_corrupt_state_is_quarantined(hyperd_factory: Hyperd) -> None:
    hyperd_factory.start()
    async with rpc(hyperd_factory.socket) as c:
        await c.call("pod.create", {"id": "good"})
    assert hyperd_factory.stop() == 0
    state = hyperd_factory.base / "state"
    with contextlib.closing(sqlite3.connect(state / DB_NAME)) as db:
        (row,) = db.execute("SELECT data FROM records WHERE key = 'good'").fetchall()
        db.execute("INSERT INTO records VALUES ('pods', 'bad', 1, ?)", (b'{"id": "bad", "st',))
        db.commit()
    # state files of the earlier file-per-pod format: a good one is imported, a torn one set aside
    old = json.loads(row[0].replace(b"good", b"old"))
    (state / "pods").mkdir()
    envelope = {"version": 1, "kind": "pods", "key": "old", "record": old}
    (state / "pods" / "old.json").write_text(json.dumps(envelope))
    (state / "pods" / "torn.json").write_bytes(b'{"version": 1, "kind": "pods", "key": "to')
    hyperd_factory.start()
    async with rpc(hyperd_factory.socket) as c:
        assert [p["id"] for p in (await c.call("pod.list"))["pods"]] == ["good", "old"]
        health = await c.call("hyperd.health")
        assert health["status"] == "degraded"
        problems = health["state"]["load_problems"]
        assert len(problems) == 2 and "pods/bad" in problems[0] and "torn.json" in problems[1]
    assert hyperd_factory.stop() == 0
    quarantined = list((state / "quarantine").iterdir())
    assert [q.name.startswith("pods-torn.json") for q in quarantined] == [True]
    assert not (state / "pods").exists()  # imported, then removed
    with contextlib.closing(sqlite3.connect(state / DB_NAME)) as db:
        assert db.execute("SELECT kind, key FROM quarantine").fetchall() == [("pods", "bad")]
        keys = db.execute("SELECT key FROM records WHERE kind = 'pods'").fetchall()
        assert sorted(keys) == [("good",), ("old",)]


async def test_failed_pod_start_changes_nothing(hyperd_factory: Hyperd) -> None:
    sim_args = {"crashy": ["--crash-after", "0"]}  # the VM dies at its first command
    hyperd_factory.start(env={"HYPERD_TEST_SIM_ARGS": json.dumps(sim_args)})
    with anyio.fail_after(60):
        async with rpc(hyperd_factory.socket) as c:
            with pytest.raises(RPCError) as err:
                await c.call("pod.create", {"id": "nonet", "netns": "/var/run/netns/none-such"})
                await c.call("pod.start", {"id": "nonet"})
            assert err.value.kind == "invalid_params" and "none-such" in err.value.message
            await c.call("pod.create", {"id": "crashy", "agent_dialect": "cc"})
            with pytest.raises(RPCError) as err:
                await c.call("pod.start", {"id": "crashy"})
            assert err.value.kind == "vm_unavailable", err.value
            for pod in ("nonet", "crashy"):
                info = await c.call("pod.inspect", {"id": pod})
                assert info["state"] == "created"
                assert info["vm_pid"] is None and info["proxy_pid"] is None
                await c.call("pod.delete", {"id": pod})
    assert helper_pids(hyperd_factory.base) == set()
    assert hyperd_factory.mounts_under_base() == []


async def test_vm_died_while_hyperd_was_down(hyperd_factory: Hyperd, busybox_rootfs: Path) -> None:
    hyperd_factory.start(stop_pods_on_exit=False)
    with anyio.fail_after(60):
        async with rpc(hyperd_factory.socket) as c:
            pod = await start_pod(c, "gone")
            ran = await create_and_start(c, "gone", "c", busybox_rootfs, ["sleep", "1000"])
        await ran.shim.aclose()
        assert hyperd_factory.stop() == 0
        os.kill(pod["vm_pid"], signal.SIGKILL)

        hyperd_factory.start()
        async with rpc(hyperd_factory.socket) as c:
            info = await c.call("pod.inspect", {"id": "gone"})
            assert info["state"] == "stopped"
            assert "died while hyperd was down" in info["reason"]
            assert info["containers"][0]["state"] == "stopped"
            assert not process_alive(pod["proxy_pid"])  # its proxy was stopped too
            assert hyperd_factory.mounts_under_base() == []
            await c.call("pod.start", {"id": "gone"})  # and it can start again
            await c.call("pod.stop", {"id": "gone"})
            await c.call("pod.delete", {"id": "gone"})
