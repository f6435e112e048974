"""hyperd-sim in the CC dialect (cc-agent behaviour), driven over its real unix sockets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest

from protocol.hyperstart import (
    Code,
    ExecCommand,
    FsmapDescriptor,
    IPAddress,
    KillCommand,
    NetworkIface,
    Pod,
    PsCommand,
    RemoveCommand,
    Route,
    WindowSize,
    encode_tty,
)
from tests.sim.hostclient import HostClient, Sim, container, process, start_pod, start_sim

PS = 23  # CC PSCONTAINER
AddRootfs = Callable[[Sim, str], Path]


@pytest.fixture
def client(sim: Sim) -> Iterator[HostClient]:
    with sim.client() as c:
        yield c


def _pids(c: HostClient, cid: str) -> list[int]:
    payload = c.ok(PS, PsCommand(container=cid, format="json"))
    pids = msgspec.json.decode(payload)
    assert isinstance(pids, list)
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False


def test_ready_ping_version(client: HostClient) -> None:
    client.wait_ready()
    assert client.ctl_log and type(client.ctl_log[0]).__name__ == "Ready"
    assert client.command(Code.PING).ok
    assert client.command(Code.READY).ok  # READY from the host: a no-op ACK
    version = client.command(Code.VERSION)
    assert not version.ok and b"version" in version.payload
    unknown = client.command(99)
    assert not unknown.ok and b"99" in unknown.payload
    assert client.nexts == []  # cc-agent never sends NEXT


def test_startpod_is_recorded(sim: Sim, client: HostClient) -> None:
    client.wait_ready()
    pod = Pod(
        hostname="pod1",
        interfaces=[
            NetworkIface(
                new_device_name="eth0",
                ip_addresses=[IPAddress(ip_address="172.17.0.2", net_mask="16")],
                mtu=1500,
                mac_addr="02:42:ac:11:00:02",
            )
        ],
        routes=[Route(dest="default", gateway="172.17.0.1", device="eth0")],
        share_dir="hyperShared",
    )
    client.ok(Code.STARTPOD, pod)
    again = client.command(Code.STARTPOD, pod)
    assert not again.ok and b"already started" in again.payload
    rec = sim.recorded()
    assert rec[0] == {"code": 1, "name": "startpod", "payload": rec[0]["payload"]}
    payload = rec[0]["payload"]
    assert payload["hostname"] == "pod1"
    assert payload["interfaces"][0]["ipAddresses"] == [{"ipAddress": "172.17.0.2", "netMask": "16"}]
    assert payload["routes"] == [{"dest": "default", "gateway": "172.17.0.1", "device": "eth0"}]


def test_container_output_eof_and_status(
    sim: Sim, client: HostClient, add_rootfs: AddRootfs
) -> None:
    add_rootfs(sim, "c1")
    start_pod(client)
    script = "echo out; echo err >&2; exit 3"
    client.ok(Code.NEWCONTAINER, container("c1", process(["sh", "-c", script], 3, 4)))
    out = client.wait_exit(3)
    assert bytes(out.data) == b"out\n"
    assert out.status == 3
    client.wait_for(lambda: bytes(client.output(4).data) == b"err\n", what="stderr")
    client.settle(0.1)
    assert not client.output(4).eof  # no EOF on the stderr seq
    # the stopped container can be removed, once
    client.ok(Code.REMOVECONTAINER, RemoveCommand(container="c1"))
    gone = client.command(Code.REMOVECONTAINER, RemoveCommand(container="c1"))
    assert not gone.ok and b"c1" in gone.payload


def test_stdin_reaches_cat_and_eof_ends_it(
    sim: Sim, client: HostClient, add_rootfs: AddRootfs
) -> None:
    add_rootfs(sim, "c1")
    start_pod(client)
    client.ok(Code.NEWCONTAINER, container("c1", process(["cat"], 5, 6)))
    client.stdin(5, b"ping\n")
    client.wait_for(lambda: bytes(client.output(5).data) == b"ping\n", what="echo")
    client.stdin(77, b"nobody")  # unknown seq: dropped silently by cc-agent
    client.stdin(5, b"")  # EOF
    out = client.wait_exit(5)
    assert out.status == 0
    assert 77 not in client.outputs


def test_user_env_workdir_in_chroot(sim: Sim, client: HostClient, add_rootfs: AddRootfs) -> None:
    add_rootfs(sim, "c1")
    start_pod(client)
    proc = process(["sh", "-c", "id -u; id -g; pwd; echo $FOO; ls /"], 3, 4, user="nobody")
    proc.envs.append(msgspec.structs.replace(proc.envs[0], env="FOO", value="bar"))
    proc = msgspec.structs.replace(proc, workdir="/tmp", additional_groups=["root"])
    client.ok(Code.NEWCONTAINER, container("c1", proc))
    out = client.wait_exit(3)
    lines = bytes(out.data).decode().split("\n")
    assert lines[:4] == ["65534", "65534", "/tmp", "bar"]
    assert "busybox" not in lines  # ls / shows the container root (bin, etc...), not /bin
    assert "bin" in lines and "etc" in lines
    assert out.status == 0


def test_exec_kill_and_ps(sim: Sim, client: HostClient, add_rootfs: AddRootfs) -> None:
    add_rootfs(sim, "c1")
    start_pod(client)
    client.ok(Code.NEWCONTAINER, container("c1", process(["sleep", "30"], 3, 4, pid="init")))
    client.ok(Code.EXECCMD, ExecCommand(container="c1", process=process(["echo", "ex"], 5, 6)))
    assert bytes(client.wait_exit(5).data) == b"ex\n"
    client.ok(Code.EXECCMD, ExecCommand(container="c1", process=process(["sleep", "31"], 7, 8)))
    table = client.ok(PS, PsCommand(container="c1", format="table")).decode()
    lines = table.splitlines()
    assert lines[0].split() == ["UID", "PID", "PPID", "STAT", "TIME", "CMD"]
    assert any(line.endswith("sleep 30") for line in lines[1:])
    assert any(line.endswith("sleep 31") for line in lines[1:])
    assert len(_pids(client, "c1")) == 2
    bad = client.command(PS, PsCommand(container="c1", format="yaml"))
    assert not bad.ok and bad.payload == b"invalid format option"
    dup = client.command(Code.EXECCMD, ExecCommand(container="c1", process=process(["true"], 7, 8)))
    assert not dup.ok and b"7" in dup.payload  # seq still in use
    running = client.command(Code.REMOVECONTAINER, RemoveCommand(container="c1"))
    assert not running.ok and b"running" in running.payload
    client.ok(Code.KILLCONTAINER, KillCommand(container="c1", signal=signal.SIGTERM))
    assert client.wait_exit(3).status == 128 + signal.SIGTERM
    assert client.wait_exit(7).status == 128 + signal.SIGKILL  # dies with its container's init
    client.ok(Code.KILLCONTAINER, KillCommand(container="c1", signal=9))  # stopped: no-op
    stopped = client.command(
        Code.EXECCMD, ExecCommand(container="c1", process=process(["true"], 9, 10))
    )
    assert not stopped.ok and b"not running" in stopped.payload


def test_kill_all_processes(sim: Sim, client: HostClient, add_rootfs: AddRootfs) -> None:
    add_rootfs(sim, "c1")
    start_pod(client)
    trap = "trap '' TERM; while :; do sleep 1; done"  # init ignores SIGTERM
    client.ok(Code.NEWCONTAINER, container("c1", process(["sh", "-c", trap], 3, 4)))
    client.ok(Code.EXECCMD, ExecCommand(container="c1", process=process(["sleep", "30"], 5, 6)))
    client.ok(Code.KILLCONTAINER, KillCommand(container="c1", signal=15, all_processes=True))
    assert client.wait_exit(5).status == 128 + signal.SIGTERM
    client.ok(Code.KILLCONTAINER, KillCommand(container="c1", signal=9, all_processes=True))
    assert client.wait_exit(3).status == 128 + signal.SIGKILL
    bad = client.command(Code.KILLCONTAINER, KillCommand(container="c1", signal=999))
    assert not bad.ok and b"invalid signal" in bad.payload


def test_winsize_on_terminal(sim: Sim, client: HostClient, add_rootfs: AddRootfs) -> None:
    add_rootfs(sim, "c1")
    start_pod(client)
    script = "read x; stty size; echo to-stderr >&2; exit 5"
    client.ok(Code.NEWCONTAINER, container("c1", process(["sh", "-c", script], 3, terminal=True)))
    client.ok(Code.WINSIZE, WindowSize(seq=3, row=33, column=111))
    client.ok(Code.WINSIZE, WindowSize(seq=99, row=1, column=1))  # unknown seq: silent ACK
    client.stdin(3, b"")  # ignored on a terminal
    client.stdin(3, b"go\n")
    out = client.wait_exit(3)
    assert b"33 111\r\n" in out.data and b"to-stderr\r\n" in out.data  # one seq for all output
    assert out.status == 5
    assert 0 not in client.outputs


def test_errors_have_messages(sim: Sim, client: HostClient, add_rootfs: AddRootfs) -> None:
    client.wait_ready()
    early = client.command(Code.NEWCONTAINER, container("c1", process(["true"], 3, 4)))
    assert not early.ok and b"Pod not started" in early.payload
    start_pod(client)
    missing = client.command(Code.NEWCONTAINER, container("c1", process(["true"], 3, 4)))
    assert not missing.ok and b"rootfs" in missing.payload
    add_rootfs(sim, "c1")
    bad_json = client.command(Code.NEWCONTAINER, b'{"id": "c1", ')
    assert not bad_json.ok and b"malformed" in bad_json.payload
    no_exe = client.command(Code.NEWCONTAINER, container("c1", process(["nonexistent"], 3, 4)))
    assert not no_exe.ok and b"No such file" in no_exe.payload
    fsmap = container("c1", process(["true"], 3, 4))
    fsmap.fsmap.append(FsmapDescriptor(source="absent", path="/mnt"))
    bad_map = client.command(Code.NEWCONTAINER, fsmap)
    assert not bad_map.ok and b"absent" in bad_map.payload
    bad_user = client.command(
        Code.NEWCONTAINER, container("c1", process(["true"], 3, 4, user="nosuchuser"))
    )
    assert not bad_user.ok and b"nosuchuser" in bad_user.payload
    client.ok(Code.NEWCONTAINER, container("c1", process(["sleep", "30"], 3, 4)))
    dup = client.command(Code.NEWCONTAINER, container("c1", process(["true"], 5, 6)))
    assert not dup.ok and b"already exists" in dup.payload
    for code, body in (
        (Code.EXECCMD, ExecCommand(container="c9", process=process(["true"], 7, 8))),
        (Code.KILLCONTAINER, KillCommand(container="c9", signal=9)),
        (Code.REMOVECONTAINER, RemoveCommand(container="c9")),
        (PS, PsCommand(container="c9", format="table")),
    ):
        r = client.command(code, body)
        assert not r.ok and b"c9" in r.payload and b"not found" in r.payload
    assert client.command(Code.PING).ok  # still answering


def test_destroypod_kills_everything(sim: Sim, client: HostClient, add_rootfs: AddRootfs) -> None:
    add_rootfs(sim, "c1")
    start_pod(client)
    client.ok(Code.NEWCONTAINER, container("c1", process(["sleep", "30"], 3, 4)))
    pids = _pids(client, "c1")
    client.ok(Code.DESTROYPOD)
    assert client.wait_exit(3).status == 128 + signal.SIGKILL
    assert not any(_alive(p) for p in pids)
    start_pod(client)  # cc-agent stays up: a new pod may start


def test_reconnect_gets_no_ready(sim: Sim, client: HostClient) -> None:
    client.wait_ready()
    client.close()
    with sim.client() as again:
        again.ok(Code.PING)
        again.settle(0.1)
        assert not again.ready


def test_framing_fault_closes_only_that_connection(sim: Sim, client: HostClient) -> None:
    client.wait_ready()
    client.ctl_sock.sendall(b"\x00\x00\x00\x0c\x00\x00\x00\x04")  # PING with length 4 < 8
    client.wait_for(lambda: client.ctl_closed, what="ctl closed")
    client.tty_sock.sendall(b"\x00" * 8 + b"\x00\x00\x00\x01")  # tty length 1 < 12
    client.wait_for(lambda: client.tty_closed, what="tty closed")
    assert sim.proc.poll() is None
    with sim.client() as again:
        assert again.command(Code.PING).ok


def test_sigterm_kills_processes_and_removes_sockets(
    sim: Sim, client: HostClient, add_rootfs: AddRootfs
) -> None:
    add_rootfs(sim, "c1")
    start_pod(client)
    client.ok(
        Code.NEWCONTAINER,
        container("c1", process(["sh", "-c", "sleep 30 & sleep 31 & wait"], 3, 4)),
    )
    client.wait_for(lambda: len(_pids(client, "c1")) == 3, what="three processes")
    pids = _pids(client, "c1")
    assert sim.stop() == 0
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(_alive(p) for p in pids)
    assert not sim.ctl.exists() and not sim.tty.exists()


def test_netns(short_tmp: Path, add_rootfs: AddRootfs) -> None:
    name = f"hdsim{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        ns = Path("/run/netns") / name
        with start_sim(short_tmp, "--netns", str(ns)) as s, s.client() as c:
            add_rootfs(s, "c1")
            start_pod(c)
            c.ok(Code.NEWCONTAINER, container("c1", process(["sleep", "30"], 3, 4)))
            (pid,) = _pids(c, "c1")
            assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(ns).st_ino
            assert os.stat(f"/proc/{pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


def test_record_lines_for_every_command(sim: Sim, client: HostClient) -> None:
    client.wait_ready()
    client.ctl_sock.sendall(
        client.ctl.send_command(Code.PING) + client.ctl.send_command(42, b"not json")
    )  # two commands in one write
    assert client.reply().ok
    assert not client.reply().ok
    assert sim.recorded() == [
        {"code": 12, "name": "ping", "payload": None},
        {"code": 42, "name": "unknown(42)", "payload": None},
    ]
    assert json.loads(sim.record.read_text().splitlines()[0])["code"] == 12
    client.tty_sock.sendall(encode_tty(5, b"x"))  # stdin for nobody: no effect


def test_container_dies_with_its_init(sim: Sim, client: HostClient, add_rootfs: AddRootfs) -> None:
    add_rootfs(sim, "c1")
    start_pod(client)
    t0 = time.monotonic()
    # a unique argument finds the orphan on the host: the pid it prints is its container's
    seconds = str(100_000 + os.getpid() % 100_000)
    client.ok(
        Code.NEWCONTAINER,
        container("c1", process(["sh", "-c", f"sleep {seconds} & echo $!"], 3, 4)),
    )
    out = client.wait_exit(3)
    assert time.monotonic() - t0 < 0.9  # the orphan holding stdout was killed, no drain wait
    assert int(bytes(out.data)) > 0
    deadline = time.monotonic() + 5
    while _running(["sleep", seconds]) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _running(["sleep", seconds])


def _running(argv: list[str]) -> list[int]:
    """Host pids of the live processes whose command line is ``argv``."""
    wanted = "\0".join(argv).encode() + b"\0"
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if f.read() == wanted and _alive(int(name)):
                        found.append(int(name))
            except OSError:
                continue
    return found


def test_processes_die_with_a_killed_sim(short_tmp: Path, add_rootfs: AddRootfs) -> None:
    with start_sim(short_tmp) as s, s.client() as c:
        add_rootfs(s, "c1")
        start_pod(c)
        c.ok(Code.NEWCONTAINER, container("c1", process(["sleep", "30"], 3, 4, user="nobody")))
        (pid,) = _pids(c, "c1")
        s.proc.kill()  # SIGKILL: no clean-up code runs in the simulator
        s.proc.wait()
        deadline = time.monotonic() + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _alive(pid)


def test_no_fd_leak_over_many_processes(
    sim: Sim, client: HostClient, add_rootfs: AddRootfs
) -> None:
    add_rootfs(sim, "c1")
    start_pod(client)
    client.ok(Code.NEWCONTAINER, container("c1", process(["sleep", "30"], 3, 4)))
    fds = f"/proc/{sim.proc.pid}/fd"

    def batch(first_seq: int) -> None:
        for i in range(10):
            seq = first_seq + 2 * i
            term = i % 2 == 0
            proc = process(["echo", str(i)], seq, 0 if term else seq + 1, terminal=term)
            client.ok(Code.EXECCMD, ExecCommand(container="c1", process=proc))
        for i in range(10):
            client.wait_exit(first_seq + 2 * i)

    batch(100)
    before = len(os.listdir(fds))
    batch(200)
    batch(300)
    assert len(os.listdir(fds)) == before


def test_fsmap_is_mounted_in_the_container(
    sim: Sim, client: HostClient, add_rootfs: AddRootfs
) -> None:
    root = add_rootfs(sim, "c1")
    vol = sim.share / "vol1"
    vol.mkdir()
    (vol / "data.txt").write_text("shared\n")
    (sim.share / "one.txt").write_text("file\n")
    script = "cat /data/data.txt /ro/data.txt /etc/one.txt; echo w > /data/new; echo w > /ro/new"
    spec = container("c1", process(["sh", "-c", script], 3, 4))
    spec.fsmap.extend(
        [
            FsmapDescriptor(source="vol1", path="/data"),
            FsmapDescriptor(source=str(vol), path="/ro", read_only=True, absolute_path=True),
            FsmapDescriptor(source="one.txt", path="/etc/one.txt"),
        ]
    )
    start_pod(client)
    client.ok(Code.NEWCONTAINER, spec)
    out = client.wait_exit(3)
    assert bytes(out.data) == b"shared\nshared\nfile\n"
    assert out.status != 0  # the read-only mount refused the write
    assert b"Read-only file system" in client.output(4).data
    assert (vol / "new").read_text() == "w\n"
    assert (root / "data").is_dir() and not (root / "data" / "data.txt").exists()  # host view
    client.ok(Code.REMOVECONTAINER, RemoveCommand(container="c1"))
    outside = container("c1", process(["true"], 5, 6))
    outside.fsmap.append(FsmapDescriptor(source="vol1", path="/../../x"))
    refused = client.command(Code.NEWCONTAINER, outside)
    assert not refused.ok and b"not inside the container" in refused.payload
