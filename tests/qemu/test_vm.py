"""Real VMs: hyperd launches QEMU with the guest image; hyperd's agent runs inside the guest.

One VM per test; each test checks several things on its VM (a TCG boot costs seconds).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.e2e.conftest import (
    Hyperd,
    create_and_start,
    exec_and_start,
    mounts_under,
    process_alive,
    rpc,
    start_pod,
)

# a hang guard well above the named deadlines below (each test boots one VM under TCG)
pytestmark = [
    pytest.mark.anyio,
    pytest.mark.qemu,
    pytest.mark.root,
    pytest.mark.timeout(600),
]

BOOT_DEADLINE = 180.0  # QEMU start to READY under TCG on a loaded 2-core machine (~6-15 s idle)
STEP_DEADLINE = 60.0  # one container or exec round trip through the guest (chroot on 9p)
STOP_DEADLINE = 60.0  # pod.stop: DESTROYPOD, the guest's poweroff, QEMU's exit


def _netns_name(path: str) -> str:
    return os.path.basename(path)


def _cmdline(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


def _host_kernel() -> bytes:
    return Path("/proc/version").read_bytes()


def _peer_of(netns: str) -> str:
    """The host side of the netns's veth (the fixture names it vh<hex>)."""
    out = subprocess.run(
        ["ip", "-o", "link", "show", "type", "veth"], check=True, capture_output=True, text=True
    ).stdout
    for line in out.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith("vh"):
            idx = subprocess.run(
                ["ip", "-n", _netns_name(netns), "-o", "link", "show", "eth0"],
                capture_output=True,
                text=True,
            ).stdout
            peer_index = line.split(":")[0]
            if f"@if{peer_index}:" in idx:
                return name
    raise AssertionError(f"no veth peer of {netns}")


async def test_qemu_pod_runs_containers_and_powers_off(
    qemu_hyperd: Hyperd, netns: str, busybox_rootfs: Path
) -> None:
    (busybox_rootfs / "marker").write_text("from the host rootfs\n")
    qemu_hyperd.start()
    async with rpc(qemu_hyperd.socket) as c:
        with anyio.fail_after(BOOT_DEADLINE):
            pod = await start_pod(c, "vm1", netns=netns, vm={"backend": "qemu"})
        assert pod["state"] == "running"
        assert pod["vm_accel"].split()[0] in ("kvm", "tcg")
        qemu_pid = pod["vm_pid"]
        assert any(b"qemu-system" in arg for arg in _cmdline(qemu_pid))

        with anyio.fail_after(STEP_DEADLINE):
            # output and exit status reach the shim; the container sees its rootfs on the share
            first = await create_and_start(
                c,
                "vm1",
                "c1",
                busybox_rootfs,
                ["sh", "-c", "cat /marker; echo err >&2; echo from the guest > /written; exit 3"],
            )
            assert await first.wait() == 3
            assert first.stderr == b"err\n"
            assert first.stdout == b"from the host rootfs\n"
            # written in the guest through 9p, visible in the host's rootfs
            assert (busybox_rootfs / "written").read_text() == "from the guest\n"

        with anyio.fail_after(STEP_DEADLINE):
            long = await create_and_start(
                c, "vm1", "c2", busybox_rootfs, ["sh", "-c", "echo up; exec sleep 1000"]
            )
            ex = await exec_and_start(c, "vm1", "c2", ["sh", "-c", "echo hello; exit 5"])
            assert await ex.wait() == 5
            assert ex.stdout == b"hello\n"
            # a guest kernel, not the host's: hyperd's agent runs inside the VM
            uname = await exec_and_start(c, "vm1", "c2", ["cat", "/proc/version"])
            assert await uname.wait() == 0
            assert uname.stdout != _host_kernel()
            await c.call("container.kill", {"pod": "vm1", "id": "c2", "signal": signal.SIGKILL})
            assert await long.wait() == 128 + signal.SIGKILL
            assert long.stdout == b"up\n"

        # the guest's interface carries the veth's address: the netns's peer pings the guest
        peer = _peer_of(netns)
        await anyio.run_process(["ip", "addr", "add", "10.200.7.1/24", "dev", peer])
        await anyio.run_process(["ip", "link", "set", peer, "up"])
        ping = await anyio.run_process(
            ["busybox", "ping", "-c", "1", "-W", "20", "-I", peer, "10.200.7.2"], check=False
        )
        assert ping.returncode == 0, ping.stdout.decode() + ping.stderr.decode()

        with anyio.fail_after(STOP_DEADLINE):
            stopped = await c.call("pod.stop", {"id": "vm1"})
        assert stopped["state"] == "stopped"
        assert not process_alive(qemu_pid)
        console = await anyio.Path(qemu_hyperd.base / "run" / "vm1" / "console.log").read_text()
        assert "Power down" in console  # the guest powered itself off after DESTROYPOD
        links = await anyio.run_process(["ip", "-n", _netns_name(netns), "link", "show"])
        assert b"tap" not in links.stdout
        qdiscs = await anyio.run_process(
            ["ip", "netns", "exec", _netns_name(netns), "tc", "qdisc", "show", "dev", "eth0"]
        )
        assert b"ingress" not in qdiscs.stdout  # the redirect to the tap is gone too
        assert mounts_under(str(qemu_hyperd.base)) == []


async def test_qemu_hyperhq_pod_readopted_after_restart_and_lost_on_kill(
    qemu_hyperd: Hyperd, busybox_rootfs: Path
) -> None:
    qemu_hyperd.start(stop_pods_on_exit=False)
    async with rpc(qemu_hyperd.socket) as c:
        with anyio.fail_after(BOOT_DEADLINE):
            # the guest agent speaks the hyperhq dialect here (the other test: CC)
            pod = await start_pod(c, "vm2", vm={"backend": "qemu", "dialect": "hyper"})
    assert pod["dialect"] == "hyper"
    qemu_pid = pod["vm_pid"]
    assert qemu_hyperd.stop() == 0
    assert process_alive(qemu_pid)  # hyperd left the VM running

    qemu_hyperd.start(stop_pods_on_exit=True)
    async with rpc(qemu_hyperd.socket) as c, rpc(qemu_hyperd.socket) as watcher:
        info: dict[str, Any] = await c.call("pod.inspect", {"id": "vm2"})
        assert info["state"] == "running", info
        assert info["vm_pid"] == qemu_pid
        with anyio.fail_after(STEP_DEADLINE):
            # (the process outlives NEWCONTAINER's reply: see test_hyperhq_dialect_pod)
            run = await create_and_start(
                c, "vm2", "c1", busybox_rootfs, ["sh", "-c", "sleep 1; echo adopted"]
            )
            assert await run.wait() == 0
            assert run.stdout == b"adopted\n"

        await watcher.call("events.subscribe")
        os.kill(qemu_pid, signal.SIGKILL)
        with anyio.fail_after(STEP_DEADLINE):  # hyperd watches the QEMU process: at once
            while True:
                event = (await watcher.next_notification())["params"]
                if (event["kind"], event["pod"], event["state"]) == ("pod", "vm2", "unreachable"):
                    break
        info = await c.call("pod.inspect", {"id": "vm2"})
        assert info["state"] == "unreachable"
        assert str(qemu_pid) in info["reason"]
        await c.call("pod.stop", {"id": "vm2"})
        await c.call("pod.delete", {"id": "vm2"})


async def test_qemu_pod_requests_are_checked(hyperd: Hyperd, short_tmp: Path) -> None:
    """Bad qemu specs are refused at pod.create; a missing image fails pod.start with the fix."""
    from hyperd.cli.client import RPCError

    async with rpc(hyperd.socket) as c:
        for vm, field in (
            ({"backend": "qemu", "memory_mib": 1}, "memory_mib"),
            ({"backend": "qemu", "cpus": 0}, "cpus"),
            ({"backend": "qemu", "kernel": "relative/vmlinux"}, "kernel"),
            ({"backend": "sim", "kernel": "/k"}, "qemu backend only"),
            ({"backend": "qemu", "accel": "hvf"}, "accel"),
        ):
            with pytest.raises(RPCError) as err:
                await c.call("pod.create", {"id": "bad", "vm": vm})
            assert err.value.kind == "invalid_params", vm
            assert field in err.value.message, (vm, err.value.message)
        missing = str(short_tmp / "no-such-vmlinux")
        await c.call("pod.create", {"id": "noimg", "vm": {"backend": "qemu", "kernel": missing}})
        with pytest.raises(RPCError) as err:
            await c.call("pod.start", {"id": "noimg"})
        assert err.value.kind == "vm_unavailable"
        assert missing in err.value.message and "vm.kernel" in err.value.message
        info = await c.call("pod.inspect", {"id": "noimg"})
        assert info["state"] == "created" and info["vm_pid"] is None
