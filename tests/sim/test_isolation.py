"""A simulated container does not get the host: its own namespaces and root, no host devices,
bounded capabilities (hyperd-sim as root, real processes over its real sockets)."""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from hyperd.sim.isolation import DEFAULT_CAPABILITIES, DEVICES, capability_mask
from protocol.hyperstart import Capabilities, Code, ExecCommand, FsmapDescriptor
from tests.sim.hostclient import HostClient, Output, Sim, container, process, start_pod

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="isolation needs the simulator to run as root"),
]

AddRootfs = Callable[[Sim, str], Path]
APPLETS = ("mknod", "mount", "grep", "hostname", "readlink", "stat")
CAP_SYS_ADMIN = 21


@pytest.fixture
def client(sim: Sim) -> Iterator[HostClient]:
    with sim.client() as c:
        yield c


@pytest.fixture
def rootfs(sim: Sim, add_rootfs: AddRootfs) -> Path:
    root = add_rootfs(sim, "c1")
    for applet in APPLETS:
        link = root / "bin" / applet
        if not link.exists():
            link.symlink_to("busybox")
    return root


def run(client: HostClient, script: str, *, seq: int = 3, **kw: Any) -> Output:
    """Start container c1 running ``sh -c script``; its output once it has exited."""
    start_pod(client)
    client.ok(Code.NEWCONTAINER, container("c1", process(["sh", "-c", script], seq, seq + 1, **kw)))
    return client.wait_exit(seq)


def text(client: HostClient, out: Output, seq: int = 3) -> str:
    return bytes(out.data).decode() + bytes(client.output(seq + 1).data).decode()


def cap_sets(status: str) -> dict[str, int]:
    return {
        line.split(":")[0]: int(line.split()[1], 16)
        for line in status.splitlines()
        if line.startswith("Cap")
    }


def test_a_host_file_outside_the_rootfs_cannot_be_read(
    client: HostClient, rootfs: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("host secret\n")
    # the path as the host sees it, through / and through /proc/1/root (the namespace's init)
    script = f"cat {secret}; cat /proc/1/root{secret}; ls /; echo done"
    out = run(client, script)
    seen = text(client, out)
    assert "host secret" not in seen
    assert "No such file" in seen
    listing = bytes(out.data).decode().split()
    assert "bin" in listing and "etc" in listing and "busybox" not in listing
    assert listing[-1] == "done"


def test_no_host_devices_and_no_kmsg(client: HostClient, rootfs: Path) -> None:
    assert Path("/dev/kmsg").exists()  # the host has what the container must not reach
    script = (
        "ls /dev; echo ---;"
        " [ -c /dev/kmsg ] && echo KMSG-DEVICE;"
        " mknod /tmp/kmsg c 1 11 && echo x > /tmp/kmsg && echo MKNOD-KMSG-WRITTEN;"
        " mknod /tmp/vda b 254 0 && cat /tmp/vda > /dev/null && echo MKNOD-VDA-READ;"
        " echo zero: $(head -c 3 /dev/zero | wc -c 2>/dev/null); echo > /dev/null && echo null-ok"
    )
    out = run(client, script)
    listing, _, rest = bytes(out.data).decode().partition("---\n")
    assert set(listing.split()) == {
        *DEVICES,
        "pts",
        "shm",
        "ptmx",
        "fd",
        "stdin",
        "stdout",
        "stderr",
    }
    seen = text(client, out)
    assert "KMSG-DEVICE" not in seen and "MKNOD-KMSG-WRITTEN" not in seen
    assert "MKNOD-VDA-READ" not in seen
    assert "null-ok" in rest
    assert "Permission denied" in seen  # a node made with mknod does not open (nodev)


def test_capabilities_are_dockers_default_set(client: HostClient, rootfs: Path) -> None:
    out = run(client, "cat /proc/self/status; mount -t tmpfs none /tmp && echo MOUNTED")
    caps = cap_sets(bytes(out.data).decode())
    default = capability_mask(DEFAULT_CAPABILITIES)
    assert caps["CapEff"] == caps["CapPrm"] == caps["CapBnd"] == default
    assert not caps["CapEff"] & (1 << CAP_SYS_ADMIN)
    assert caps["CapAmb"] == caps["CapInh"] == 0
    assert "MOUNTED" not in text(client, out)


def test_capabilities_of_the_spec_and_of_a_non_root_user(client: HostClient, rootfs: Path) -> None:
    start_pod(client)
    caps = Capabilities(bounding=["CAP_CHOWN", "CAP_KILL"])
    proc = process(["cat", "/proc/self/status"], 3, 4, capabilities=caps)
    client.ok(Code.NEWCONTAINER, container("c1", proc))
    sets = cap_sets(bytes(client.wait_exit(3).data).decode())
    assert sets["CapBnd"] == sets["CapEff"] == capability_mask(["CAP_CHOWN", "CAP_KILL"])
    client.ok(Code.REMOVECONTAINER, msgspec.json.encode({"container": "c1"}))
    nobody = process(["cat", "/proc/self/status"], 5, 6, user="nobody")
    client.ok(Code.NEWCONTAINER, container("c1", nobody))
    sets = cap_sets(bytes(client.wait_exit(5).data).decode())
    assert sets["CapEff"] == sets["CapPrm"] == 0
    unknown = process(["true"], 7, 8, capabilities=Capabilities(bounding=["CAP_NOPE"]))
    client.ok(Code.REMOVECONTAINER, msgspec.json.encode({"container": "c1"}))
    refused = client.command(Code.NEWCONTAINER, container("c1", unknown))
    assert not refused.ok and b"CAP_NOPE" in refused.payload


def test_own_pid_uts_and_mount_namespaces_shared_with_execs(
    client: HostClient, rootfs: Path
) -> None:
    start_pod(client, hostname="isolated-pod")
    client.ok(
        Code.NEWCONTAINER,
        container("c1", process(["sh", "-c", "echo $$; hostname; exec sleep 30"], 3, 4)),
    )
    client.wait_for(lambda: bytes(client.output(3).data).count(b"\n") == 2, what="init output")
    assert bytes(client.output(3).data).decode().split() == ["2", "isolated-pod"]
    assert socket.gethostname() != "isolated-pod"
    exec_script = (
        "echo $$; hostname; ls /proc | grep -c '^[0-9]'; readlink /proc/1/exe || echo NO-PEEK"
    )
    client.ok(
        Code.EXECCMD,
        ExecCommand(container="c1", process=process(["sh", "-c", exec_script], 5, 6)),
    )
    out = client.wait_exit(5)
    pid, hostname, count, peek = bytes(out.data).decode().split()
    assert peek == "NO-PEEK"  # the namespace's init has more capabilities: not inspectable
    assert int(pid) > 2 and hostname == "isolated-pod"
    # the init, sleep, this sh, ls and grep: none of the host's processes
    assert int(count) <= 5
    assert out.status == 0


def test_a_symlinked_mount_point_stays_inside_the_rootfs(
    sim: Sim, client: HostClient, rootfs: Path, tmp_path: Path
) -> None:
    """A rootfs link ``mnt2 -> <host dir>`` and an fsmap at ``/mnt2/X``: X is made in
    ``<rootfs>/<host dir>`` (the link resolved inside the root), never in the host dir."""
    host_dir = tmp_path / "host-dir"
    host_dir.mkdir()
    (rootfs / "mnt2").symlink_to(host_dir)
    (rootfs / str(host_dir).lstrip("/")).mkdir(parents=True)
    vol = sim.share / "vol1"
    vol.mkdir()
    (vol / "data.txt").write_text("volume\n")
    spec = container("c1", process(["cat", "/mnt2/X/data.txt"], 3, 4))
    spec.fsmap.append(FsmapDescriptor(source="vol1", path="/mnt2/X"))
    start_pod(client)
    client.ok(Code.NEWCONTAINER, spec)
    out = client.wait_exit(3)
    assert bytes(out.data) == b"volume\n"
    assert list(host_dir.iterdir()) == []  # nothing made in the host directory
    assert (rootfs / str(host_dir).lstrip("/") / "X").is_dir()


def test_a_dangling_symlink_mount_point_is_refused(
    sim: Sim, client: HostClient, rootfs: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "not-there"
    (rootfs / "mnt3").symlink_to(outside)
    (sim.share / "vol1").mkdir()
    spec = container("c1", process(["true"], 3, 4))
    spec.fsmap.append(FsmapDescriptor(source="vol1", path="/mnt3"))
    start_pod(client)
    refused = client.command(Code.NEWCONTAINER, spec)
    assert not refused.ok and b"mount point" in refused.payload
    assert not outside.exists()


def test_a_terminal_is_the_containers_own(client: HostClient, rootfs: Path) -> None:
    """A terminal process gets a pty of the container's own devpts (made inside and its master
    sent back): ``tty`` names it, and the host's ptys are not there."""
    (rootfs / "bin" / "tty").symlink_to("busybox")
    start_pod(client)
    script = "tty; ls /dev/pts; exec sh -c 'tty'"
    client.ok(Code.NEWCONTAINER, container("c1", process(["sh", "-c", script], 3, terminal=True)))
    out = client.wait_exit(3)
    lines = bytes(out.data).decode().split()
    assert lines[0] == "/dev/pts/0", lines
    assert set(lines[1:-1]) == {"0", "ptmx"}, lines  # only its own pty
    assert out.status == 0


def test_channels_are_for_their_owner_only(sim: Sim) -> None:
    """The ctl and tty sockets are 0600 whatever the umask: the pod's run dir is open to
    hyperd's RPC group, the agent's channels are for the proxy alone."""
    for path in (sim.ctl, sim.tty):
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600, path
