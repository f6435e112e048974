"""A pod's whole life through the RPC socket, with real hyperd, hyperd-proxy and hyperd-sim."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from hyperd.cli.client import RPCError, ShimClient
from tests.e2e.conftest import (
    Hyperd,
    Started,
    create_and_start,
    exec_and_start,
    mounts_under,
    process_alive,
    rpc,
    spawn,
    start_pod,
)

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.root]

DEADLINE = 30.0


async def test_pod_container_exec_ps_kill_stop_delete(
    hyperd: Hyperd, netns: str, busybox_rootfs: Path
) -> None:
    with anyio.fail_after(DEADLINE * 2):
        async with rpc(hyperd.socket) as c:
            pod = await start_pod(c, "p1", netns=netns, hostname="h" * 70)
            assert pod["state"] == "running"
            assert pod["dialect"] == "cc"

            # what STARTPOD carried: IPv4 only, the default route as "default", hostname cut
            startpod = [r for r in hyperd.records("p1") if r["name"] == "startpod"]
            assert len(startpod) == 1
            payload = startpod[0]["payload"]
            assert payload["hostname"] == "h" * 64
            assert payload["shareDir"] == "hyperShared"
            (iface,) = payload["interfaces"]
            assert iface["newDeviceName"] == "eth0"
            assert iface["ipAddresses"] == [{"ipAddress": "10.200.7.2", "netMask": "24"}]
            assert iface["mtu"] == 1400
            assert "fd00" not in str(payload)
            assert {"dest": "default", "gateway": "10.200.7.1", "device": "eth0"} in payload[
                "routes"
            ]
            assert all(":" not in r["dest"] for r in payload["routes"])

            # a short-lived container: output and exit status through the proxy
            short = await create_and_start(
                c, "p1", "c1", busybox_rootfs, ["sh", "-c", "echo out; echo err >&2; exit 3"]
            )
            assert await short.wait() == 3
            assert short.stdout == b"out\n"
            assert short.stderr == b"err\n"
            rootfs_mount = str(hyperd.base / "shared" / "p1" / "c1" / "rootfs")
            assert rootfs_mount in mounts_under(str(hyperd.base))

            # a long-running one: exec, ps, kill
            long = await create_and_start(
                c, "p1", "c2", busybox_rootfs, ["sh", "-c", "echo up; exec sleep 1000"]
            )
            with pytest.raises(RPCError) as err:
                await c.call("container.start", {"pod": "p1", "id": "c2"})
            assert err.value.kind == "invalid_state"
            assert "c2" in err.value.message

            ex = await exec_and_start(c, "p1", "c2", ["sh", "-c", "echo hello; exit 5"])
            assert await ex.wait() == 5
            assert ex.stdout == b"hello\n"

            ps = await c.call("container.ps", {"pod": "p1", "id": "c2"})
            assert "sleep" in ps["output"]

            listed = await c.call("container.list", {"pod": "p1"})
            assert {x["id"] for x in listed["containers"]} == {"c1", "c2"}

            await c.call("container.kill", {"pod": "p1", "id": "c2", "signal": "KILL"})
            with anyio.fail_after(10):
                status = await long.wait()
            assert status is not None
            assert long.stdout.startswith(b"up\n")

            for cid in ("c1", "c2"):
                stopped = await c.call("container.stop", {"pod": "p1", "id": cid})
                assert stopped["state"] == "stopped"
            assert not [m for m in mounts_under(str(hyperd.base)) if "/c1" in m or "/c2" in m]

            with pytest.raises(RPCError) as err:
                await c.call("pod.delete", {"id": "p1"})
            assert err.value.kind == "invalid_state"

            stopped_pod = await c.call("pod.stop", {"id": "p1"})
            assert stopped_pod["state"] == "stopped"
            assert stopped_pod["vm_pid"] is None and stopped_pod["proxy_pid"] is None
            pod_pids = [pod["vm_pid"], pod["proxy_pid"]]
            assert not [p for p in pod_pids if process_alive(p)]
            assert mounts_under(str(hyperd.base)) == []

            await c.call("pod.delete", {"id": "p1"})
            assert (await c.call("pod.list"))["pods"] == []
            with pytest.raises(RPCError) as err:
                await c.call("pod.inspect", {"id": "p1"})
            assert err.value.kind == "not_found"


async def test_kill_before_start_signals_the_shim_pid(hyperd: Hyperd, busybox_rootfs: Path) -> None:
    with anyio.fail_after(DEADLINE):
        async with rpc(hyperd.socket) as c:
            await start_pod(c, "p2")
            fake_shim = spawn(["sleep", "100"])
            try:
                await c.call(
                    "container.create",
                    {
                        "pod": "p2",
                        "id": "c",
                        "rootfs": {"path": str(busybox_rootfs)},
                        "process": {"args": ["true"]},
                        "shim_pid": fake_shim.pid,
                    },
                )
                result = await c.call("container.kill", {"pod": "p2", "id": "c", "signal": 15})
                assert result["target"] == "shim"
                assert await anyio.to_thread.run_sync(fake_shim.wait) == -15
            finally:
                fake_shim.kill()
                fake_shim.wait()
            await c.call("pod.stop", {"id": "p2"})


async def test_hyperhq_dialect_pod(hyperd: Hyperd, busybox_rootfs: Path) -> None:
    """A sim speaking the hyperhq dialect: detected via GETVERSION, strict messages, process ids,
    and a container freed by its init's exit can still be stopped."""
    with anyio.fail_after(DEADLINE):
        async with rpc(hyperd.socket) as c:
            pod = await start_pod(c, "hq", vm={"backend": "sim", "dialect": "hyper"})
            assert pod["dialect"] == "hyper"
            with pytest.raises(RPCError) as err:  # hyperhq's parser knows no capabilities
                await c.call(
                    "container.create",
                    {
                        "pod": "hq",
                        "id": "caps",
                        "rootfs": {"path": str(busybox_rootfs)},
                        "process": {"args": ["true"], "capabilities": {"bounding": []}},
                    },
                )
            assert err.value.kind == "invalid_params" and "capabilities" in err.value.message
            # (processes here outlive their NEWCONTAINER/EXECCMD reply by a moment: hyperd-proxy
            # indexes a hyperhq process for its exit event only after the reply's coroutine
            # resumes, and drops an exit event that the same ctl read delivered; reported)
            short = await create_and_start(
                c, "hq", "c1", busybox_rootfs, ["sh", "-c", "sleep 0.2; echo hq; exit 2"]
            )
            assert await short.wait() == 2
            assert short.stdout == b"hq\n"
            long = await create_and_start(c, "hq", "c2", busybox_rootfs, ["sleep", "1000"])
            ex = await exec_and_start(c, "hq", "c2", ["sh", "-c", "sleep 0.2; echo in-exec"])
            assert await ex.wait() == 0
            assert ex.stdout == b"in-exec\n"
            with pytest.raises(RPCError) as err:
                await c.call("container.ps", {"pod": "hq", "id": "c2"})
            assert err.value.kind == "invalid_state" and "hyperhq" in err.value.message
            newcontainers = [r for r in hyperd.records("hq") if r["name"] == "newcontainer"]
            assert [r["payload"]["process"]["id"] for r in newcontainers] == ["init", "init"]
            assert all("systemMountsInfo" not in r["payload"] for r in newcontainers)
            for cid in ("c1", "c2"):  # c1 was freed by its exit, c2 still runs
                assert (await c.call("container.stop", {"pod": "hq", "id": cid}))[
                    "state"
                ] == "stopped"
            await long.wait()
            await c.call("pod.stop", {"id": "hq"})
            await c.call("pod.start", {"id": "hq"})  # a stopped pod starts again
            assert (await c.call("pod.inspect", {"id": "hq"}))["state"] == "running"
            await c.call("pod.stop", {"id": "hq"})
            await c.call("pod.delete", {"id": "hq"})
        assert hyperd.mounts_under_base() == []


async def test_volumes_env_and_resources(
    hyperd: Hyperd, busybox_rootfs: Path, tmp_path: Path
) -> None:
    """Bind volumes reach the container through the share (read-only honoured), the process
    gets its env and cwd, NEWCONTAINER carries the constraints; every mount is undone."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.txt").write_text("from the host\n")
    out = tmp_path / "out"
    out.mkdir()
    with anyio.fail_after(DEADLINE):
        async with rpc(hyperd.socket) as c:
            await start_pod(c, "vol")
            created = await c.call(
                "container.create",
                {
                    "pod": "vol",
                    "id": "c",
                    "rootfs": {"path": str(busybox_rootfs)},
                    "process": {
                        "args": [
                            "sh",
                            "-c",
                            'cat /data/in.txt; echo "$GREETING from $(pwd)" > /out/result; '
                            "touch /data/nope 2>/dev/null && echo writable || echo read-only",
                        ],
                        "env": ["GREETING=hello"],
                        "cwd": "/tmp",
                    },
                    "mounts": [
                        {"source": str(data), "destination": "/data", "options": ["ro"]},
                        {"source": str(out), "destination": "/out"},
                        {"source": "proc", "destination": "/proc", "type": "proc"},
                    ],
                    "resources": {"cpu_quota": 50000, "cpu_period": 100000, "cpu_shares": 512},
                },
            )
            shim = await ShimClient.connect(created["proxy_url"], created["token"])
            started = Started(shim)
            await shim.wait_connected()
            info = await c.call("container.start", {"pod": "vol", "id": "c"})
            assert len(info["mounts"]) == 3  # rootfs and two volumes
            assert await started.wait() == 0
            assert started.stdout == b"from the host\nread-only\n"
            assert (out / "result").read_text() == "hello from /tmp\n"

            (record,) = [r for r in hyperd.records("vol") if r["name"] == "newcontainer"]
            payload = record["payload"]
            assert payload["image"] == "c" and payload["rootfs"] == "rootfs"
            # (the proxy re-encodes NEWCONTAINER as cc-proxy 3.0.23 does: CPUShares is dropped)
            assert payload["constraints"] == {"CPUQuota": 50000, "CPUPeriod": 100000}
            fsmap = {m["path"]: m for m in payload["fsmap"]}
            assert set(fsmap) == {"/data", "/out"}  # the proc mount is not carried
            assert fsmap["/data"]["readOnly"] is True and fsmap["/out"]["readOnly"] is False
            assert fsmap["/data"]["source"].startswith("c-")
            assert {"env": "GREETING", "value": "hello"} in payload["process"]["envs"]

            await c.call("container.stop", {"pod": "vol", "id": "c"})
            assert [m for m in hyperd.mounts_under_base() if "/vol/" in m] == []
            assert (data / "in.txt").read_text() == "from the host\n"  # untouched
            await c.call("pod.stop", {"id": "vol"})
        assert hyperd.mounts_under_base() == []


async def test_block_rootfs_and_devices_reach_the_agent(hyperd: Hyperd) -> None:
    """A block-device rootfs is not mounted on the host: NEWCONTAINER names the drive."""
    with anyio.fail_after(DEADLINE):
        async with rpc(hyperd.socket) as c:
            await start_pod(c, "blk")
            created = await c.call(
                "container.create",
                {
                    "pod": "blk",
                    "id": "c",
                    "rootfs": {"block": {"index": 27, "fstype": "ext4"}},
                    "process": {"args": ["true"]},
                    "devices": [{"guest_path": "/dev/vdc", "container_path": "/dev/disk1"}],
                    "bind_mount_dev": True,
                },
            )
            shim = await ShimClient.connect(created["proxy_url"], created["token"])
            try:
                await shim.wait_connected()
                try:
                    await c.call("container.start", {"pod": "blk", "id": "c"})
                except RPCError as exc:  # the simulator has no block devices to mount
                    assert exc.kind == "agent_error", exc
            finally:
                await shim.aclose()
            (record,) = [r for r in hyperd.records("blk") if r["name"] == "newcontainer"]
            payload = record["payload"]
            assert (payload["image"], payload["fstype"]) == ("vdab", "ext4")
            assert payload["systemMountsInfo"]["bindMountDev"] is True
            assert payload["fsmap"] == [
                {
                    "source": "/dev/vdc",
                    "path": "/dev/disk1",
                    "readOnly": False,
                    "dockerVolume": False,
                    "absolutePath": True,
                    "scsiAddr": "",
                }
            ]
            assert hyperd.mounts_under_base() == []
            await c.call("pod.stop", {"id": "blk"})


@pytest.mark.parametrize(
    ("level", "sim", "proxy"), [("error", "ERROR", "error"), ("warning", "WARNING", "warn")]
)
async def test_helpers_log_at_the_daemons_level(
    hyperd_factory: Hyperd, level: str, sim: str, proxy: str
) -> None:
    """The sim and proxy hyperd starts get its log level, in their own names (a quiet daemon
    has quiet helpers: hyperd-sim logs every container at INFO by default)."""
    hyperd_factory.args = ["--log-level", level]  # (after the fixture's own: the last one wins)
    hyperd_factory.start()
    async with rpc(hyperd_factory.socket) as c:
        pod = await start_pod(c, "p")
        for pid, wanted in ((pod["vm_pid"], sim), (pod["proxy_pid"], proxy)):
            argv = (await anyio.Path(f"/proc/{pid}/cmdline").read_bytes()).split(b"\0")
            assert argv[argv.index(b"--log-level") + 1] == wanted.encode(), argv
        await c.call("pod.stop", {"id": "p"})
