"""Commands are answered one at a time and in order, whether answered at once or in a task.

PING, READY, GETVERSION and unknown codes are answered inside the ctl protocol's
``data_received``; STARTPOD and friends (and every command under ``--delay``) run in a task while
the connection stops reading. A host that sends without reading is slowed down, not buffered
without bound.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from protocol.hyperstart import HYPER, Code, NextAck, Pod, Reply, encode_ctl, encode_message
from tests.sim.hostclient import HostClient, start_sim

FLOOD_PINGS = 131072  # 1 MiB of PING frames: far more than the socket buffers hold
SMALL_SNDBUF = 16384
IDLE_SAMPLE = 0.1  # seconds between CPU time samples of the sim
IDLE_SAMPLES = 3  # this many unchanged samples in a row: the sim is idle
IDLE_TIMEOUT = 20.0


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _wait_idle(pid: int) -> None:
    """Wait until the process stops using CPU (it waits for something)."""
    deadline = time.monotonic() + IDLE_TIMEOUT
    last, same = _cpu_ticks(pid), 0
    while same < IDLE_SAMPLES:
        assert time.monotonic() < deadline, "the sim never went idle"
        time.sleep(IDLE_SAMPLE)
        now = _cpu_ticks(pid)
        same = same + 1 if now == last else 0
        last = now


def _kinds(c: HostClient) -> list[str]:
    kinds = []
    for ev in c.ctl_log:
        if isinstance(ev, NextAck):
            kinds.append(f"NEXT({ev.count})")
        elif isinstance(ev, Reply):
            kinds.append(f"{ev.command}:{'ACK' if ev.ok else 'ERROR'}")
    return kinds


def test_hyper_fast_and_slow_commands_in_one_write_keep_their_order(short_tmp: Path) -> None:
    with start_sim(short_tmp, dialect=HYPER) as s, s.client() as c:
        c.wait_ready()
        body = encode_message(Pod(hostname="ordered", share_dir="share_dir"), HYPER)
        c.ctl_sock.sendall(
            c.ctl.send_command(Code.PING)
            + c.ctl.send_command(Code.STARTPOD, body)  # handled in a task
            + c.ctl.send_command(99)
            + c.ctl.send_command(Code.VERSION)
            + c.ctl.send_command(Code.STARTPOD, body)  # second STARTPOD: ERROR
            + c.ctl.send_command(Code.PING)
        )
        c.wait_for(lambda: len(c.replies) == 6, what="six replies")
        assert _kinds(c) == [
            "NEXT(8)", "12:ACK",
            "NEXT(8)", f"NEXT({len(body)})", "1:ACK",
            "NEXT(8)", "99:ERROR",
            "NEXT(8)", "0:ACK",
            "NEXT(8)", f"NEXT({len(body)})", "1:ERROR",
            "NEXT(8)", "12:ACK",
        ]  # fmt: skip
        assert [r["code"] for r in s.recorded()] == [12, 1, 99, 0, 1, 12]
        assert c.command(Code.PING).ok  # still reading after the task-handled commands


def test_delayed_commands_in_one_write_are_answered_in_order(short_tmp: Path) -> None:
    with start_sim(short_tmp, "--delay", "0.2") as s, s.client() as c:
        c.wait_ready()
        t0 = time.monotonic()
        c.ctl_sock.sendall(
            c.ctl.send_command(Code.PING) + c.ctl.send_command(99) + c.ctl.send_command(Code.READY)
        )
        c.wait_for(lambda: len(c.replies) == 3, what="three replies")
        assert time.monotonic() - t0 >= 0.6  # one at a time, each after the delay
        assert [(r.command, r.ok) for r in c.replies] == [
            (Code.PING, True),
            (99, False),
            (Code.READY, True),
        ]
        assert len(s.recorded()) == 3


def test_a_host_that_does_not_read_is_slowed_down(short_tmp: Path) -> None:
    with start_sim(short_tmp) as s, s.client() as c:
        c.wait_ready()
        c.ctl_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_SNDBUF)
        flood = encode_ctl(Code.PING) * FLOOD_PINGS
        sender = threading.Thread(target=c.ctl_sock.sendall, args=(flood,), daemon=True)
        sender.start()
        _wait_idle(s.proc.pid)
        assert sender.is_alive(), "the sim kept reading although its replies were not read"
        expected = encode_ctl(Code.ACK) * FLOOD_PINGS
        got = bytearray()
        c.ctl_sock.settimeout(10)
        while len(got) < len(expected):
            data = c.ctl_sock.recv(1 << 20)
            assert data, "ctl closed"
            got += data
        sender.join(10)
        assert not sender.is_alive()
        assert got == expected
        assert s.proc.poll() is None
