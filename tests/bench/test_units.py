"""The runner's own pieces: percentiles, the table, the agent farm, helper clean-up."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from hyperd.bench import farm
from hyperd.bench.procs import STOP_GRACE, Processes, descendants
from hyperd.bench.stats import Section, percentile, render
from protocol import NEED_DATA
from protocol.hyperstart import CC, Code, HostCtlConnection, Ready, Reply

IO_DEADLINE = 10.0


def test_percentile_is_nearest_rank() -> None:
    samples = [float(x) for x in range(1, 101)]
    assert percentile(samples, 50) == 50.0
    assert percentile(samples, 99) == 99.0
    assert percentile(samples, 100) == 100.0
    assert percentile([7.0], 99) == 7.0
    assert percentile(list(reversed(samples)), 1) == 1.0


def test_section_medians_and_ratios_render() -> None:
    sec = Section("1. demo")
    for value in (1.0, 3.0, 2.0):
        sec.add("a", "variant a", "cmd/s", value)
    for value in (4.0, 4.0, 10.0):
        sec.add("b", "variant b", "cmd/s", value)
    assert sec.value("a") == 2.0
    assert sec.ratio("b / a", "b", "a") == 2.0
    text = render([sec], ["header"])
    assert "== 1. demo" in text
    assert "variant a" in text and "n=3" in text
    assert "b / a" in text and "2.00x" in text


def _events(conn: HostCtlConnection, sock: socket.socket) -> object:
    while (event := conn.next_event()) is NEED_DATA:
        data = sock.recv(4096)
        assert data, "farm closed the ctl channel"
        conn.receive_data(data)
    return event


def test_farm_answers_as_many_agents(short_tmp: Path) -> None:
    count = 3
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hyperd.bench.farm",
            "--dir",
            str(short_tmp),
            "--count",
            str(count),
            "--ready-fd",
            str(write_fd),
        ],
        pass_fds=(write_fd,),
    )
    os.close(write_fd)
    try:
        with os.fdopen(read_fd, "rb") as ready:
            assert ready.readline() == b"ready\n"
        for i in range(count):
            ctl_path, tty_path = farm.socket_paths(str(short_tmp), i)
            with socket.socket(socket.AF_UNIX) as ctl, socket.socket(socket.AF_UNIX) as tty:
                ctl.settimeout(IO_DEADLINE)
                ctl.connect(ctl_path)
                tty.connect(tty_path)
                conn = HostCtlConnection(CC)
                assert isinstance(_events(conn, ctl), Ready)
                # two commands in one write: answered in order
                ctl.sendall(conn.send_command(Code.PING) + conn.send_command(Code.VERSION))
                ping = _events(conn, ctl)
                version = _events(conn, ctl)
                assert isinstance(ping, Reply) and ping.ok and ping.command == Code.PING
                assert isinstance(version, Reply) and not version.ok
    finally:
        proc.terminate()
        assert proc.wait(IO_DEADLINE) == 0
    assert not any(short_tmp.iterdir()), "the farm leaves its sockets behind"


def test_stop_reaches_grandchildren() -> None:
    procs = Processes()
    # a helper that starts a grandchild in a session of its own, as the daemon does
    script = (
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
        " start_new_session=True)\n"
        "time.sleep(60)\n"
    )
    proc = procs.spawn([sys.executable, "-c", script], what="tree", ready=False)
    deadline = time.monotonic() + IO_DEADLINE
    while not descendants(proc.pid):
        assert time.monotonic() < deadline, "the grandchild did not start"
        time.sleep(0.02)
    grandchild = descendants(proc.pid)[0].pid
    started = time.monotonic()
    procs.stop_all()
    assert proc.returncode is not None
    assert len(procs) == 0
    assert not _alive(grandchild)
    assert time.monotonic() - started < STOP_GRACE, "the grandchild needed SIGKILL"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
