"""hyperd-sim's fault knobs and its robustness against bad input."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from protocol import ProtocolError
from protocol.hyperstart import (
    CC,
    HYPER,
    Code,
    Dialect,
    PsCommand,
    encode_ctl,
)
from tests.sim.hostclient import (
    EXIT_TIMEOUT,
    HostClient,
    Sim,
    container,
    process,
    start_pod,
    start_sim,
)

CRASH_EXIT_STATUS = 3  # hyperd.sim.CRASH_EXIT_STATUS
AddRootfs = Callable[[Sim, str], Path]


def test_delay_before_each_reply(short_tmp: Path) -> None:
    with start_sim(short_tmp, "--delay", "0.3") as s, s.client() as c:
        c.wait_ready()
        t0 = time.monotonic()
        assert c.command(Code.PING).ok
        assert c.command(Code.PING).ok
        assert time.monotonic() - t0 >= 0.6


def test_silent_after(short_tmp: Path) -> None:
    with start_sim(short_tmp, "--silent-after", "2") as s, s.client() as c:
        c.wait_ready()
        assert c.command(Code.PING).ok
        assert c.command(Code.PING).ok
        c.send(Code.PING)
        c.settle(0.5)
        assert c.replies == [] and s.proc.poll() is None
        assert [r["code"] for r in s.recorded()] == [12, 12, 12]  # still read and recorded


def test_garbage_after(short_tmp: Path) -> None:
    with start_sim(short_tmp, "--garbage-after", "1") as s, s.client() as c:
        c.wait_ready()
        assert c.command(Code.PING).ok
        with pytest.raises(ProtocolError):
            c.command(Code.PING)
        assert s.proc.poll() is None


def test_crash_after_kills_processes_and_exits(short_tmp: Path, add_rootfs: AddRootfs) -> None:
    with start_sim(short_tmp, "--crash-after", "3") as s, s.client() as c:
        add_rootfs(s, "c1")
        start_pod(c)  # command 1
        c.ok(Code.NEWCONTAINER, container("c1", process(["sleep", "30"], 3, 4)))  # 2
        (pid,) = msgspec.json.decode(c.ok(23, PsCommand(container="c1", format="json")))  # 3
        c.send(Code.PING)  # 4: crash
        c.wait_for(lambda: c.ctl_closed and c.tty_closed, what="both channels closed")
        assert s.proc.wait(EXIT_TIMEOUT) == CRASH_EXIT_STATUS
        assert c.replies == []
        assert not os.path.exists(f"/proc/{pid}/stat") or _zombie(pid)
        assert not s.ctl.exists() and not s.tty.exists()


def _zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"


def test_host_hangup_is_not_an_exit(short_tmp: Path, add_rootfs: AddRootfs) -> None:
    with start_sim(short_tmp) as s:
        add_rootfs(s, "c1")
        with s.client() as c:
            start_pod(c)
            c.ok(Code.NEWCONTAINER, container("c1", process(["cat"], 3, 4)))
        with s.client() as c:  # reconnect: no READY, state kept
            pids = msgspec.json.decode(c.ok(23, PsCommand(container="c1", format="json")))
            assert len(pids) == 1
            c.stdin(3, b"again\n")
            c.wait_for(lambda: bytes(c.output(3).data) == b"again\n", what="echo")
            assert not c.ready


def test_newer_connection_replaces_older(sim: Sim) -> None:
    with sim.client() as first:
        first.wait_ready()
        with sim.client() as second:
            assert second.command(Code.PING).ok
            first.wait_for(lambda: first.ctl_closed and first.tty_closed, what="old closed")


@pytest.mark.parametrize(
    "body",
    [b"", b"null", b"[]", b"{", b'{"hostname":5,"id":5,"container":5,"seq":"x"}', b"\xff\xfe"],
)
def test_bad_bodies_get_error_replies(sim: Sim, body: bytes) -> None:
    with sim.client() as c:
        c.wait_ready()
        for code in (
            Code.STARTPOD,
            Code.NEWCONTAINER,
            Code.EXECCMD,
            Code.KILLCONTAINER,
            Code.REMOVECONTAINER,
            Code.WINSIZE,
            23,
        ):
            r = c.command(code, body)
            assert not r.ok and r.payload, (code, body, r)
        assert c.command(Code.PING).ok
    assert sim.proc.poll() is None


def test_oversized_frame_closes_ctl_only(sim: Sim) -> None:
    with sim.client() as c:
        c.wait_ready()
        c.ctl_sock.sendall(encode_ctl(Code.PING)[:4] + (1 << 30).to_bytes(4, "big"))
        c.wait_for(lambda: c.ctl_closed, what="ctl closed")
    with HostClient(sim.ctl, sim.tty, CC) as again:
        assert again.command(Code.PING).ok


def test_sigterm_right_after_ready_is_clean(short_tmp: Path) -> None:
    for i in range(3):
        base = short_tmp / str(i)
        base.mkdir()
        with start_sim(base) as s:
            assert s.stop() == 0
            assert not s.ctl.exists() and not s.tty.exists()


@pytest.mark.parametrize("dialect", [CC, HYPER], ids=["cc", "hyper"])
def test_random_input_never_kills_the_sim(short_tmp: Path, dialect: Dialect) -> None:
    rng = random.Random(20261127)
    keys = [b'"id"', b'"container"', b'"process"', b'"args"', b'"seq"', b'"signal"', b'"stdio"']
    values = [b"1", b'"c1"', b"null", b"[]", b"{}", b'["sh"]', b"-1", b"1e999", b'"\\u0000"']
    with start_sim(short_tmp, dialect=dialect) as s:
        with s.client() as c:
            c.wait_ready()
            for _ in range(200):
                code = rng.randrange(0, 30)
                fields = [rng.choice(keys) + b":" + rng.choice(values) for _ in range(3)]
                body = rng.choice([b"{" + b",".join(fields) + b"}", rng.randbytes(12), b""])
                c.send(code, body)
            c.wait_for(lambda: len(c.replies) == 200, what="200 replies")
            c.replies.clear()
            for _ in range(50):
                c.stdin(rng.randrange(0, 10), rng.randbytes(rng.randrange(0, 64)))
            assert c.command(Code.PING).ok
        for _ in range(5):  # raw garbage: at worst a logged close of that connection
            with s.client() as c:
                c.ctl_sock.sendall(rng.randbytes(64))
                c.tty_sock.sendall(rng.randbytes(64))
                c.settle(0.05)
        with s.client() as c:
            assert c.command(Code.PING).ok
        assert s.proc.poll() is None
