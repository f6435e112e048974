"""Ping throughput through hyperd-proxy versus the raw agent round trip.

    python -m tests.proxy.bench_ping [--count N] [--dialect cc|hyper]

Starts ``python -m hyperd.sim`` and measures, with blocking sockets on the client side:
- ``raw``: PING straight on the agent's ctl socket, one at a time;
- ``proxy-seq``: Hyper ping through ``python -m hyperd.proxy``, one at a time;
- ``proxy-pipe``: the same N pings written in one go, then the N responses read.
Prints the median per-ping time of each (and the proxy's own cost, proxy-seq - raw).
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from protocol.ccproxy import Command, Frame, FrameDecoder, FrameType, encode_frame
from protocol.hyperstart import Code, CtlDecoder, encode_ctl

PING = encode_frame(Frame(FrameType.COMMAND, Command.HYPER, b'{"hyperName":"ping","tokens":null}'))


def _spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen(
        [*argv, "--ready-fd", str(write_fd)], pass_fds=(write_fd,), stderr=subprocess.DEVNULL
    )
    os.close(write_fd)
    ready, _, _ = select.select([read_fd], [], [], 10)
    assert ready and os.read(read_fd, 64) == b"ready\n", argv
    os.close(read_fd)
    return proc


def _sim(base: Path, dialect: str) -> subprocess.Popen[bytes]:
    (base / "share").mkdir()
    return _spawn([
        sys.executable, "-m", "hyperd.sim", "--ctl", str(base / "ctl"), "--tty",
        str(base / "tty"), "--share", str(base / "share"), "--dialect", dialect,
        "--log-level", "WARNING",
    ])  # fmt: skip


def _ctl_reply(sock: socket.socket, decoder: CtlDecoder) -> int:
    while True:
        frame = decoder.next_frame()
        if frame is not None and frame.code != Code.NEXT:
            return frame.code
        if frame is None:
            decoder.feed(sock.recv(65536))


def raw(base: Path, count: int) -> list[float]:
    ctl = socket.socket(socket.AF_UNIX)
    ctl.connect(str(base / "ctl"))
    tty = socket.socket(socket.AF_UNIX)
    tty.connect(str(base / "tty"))
    decoder = CtlDecoder()
    assert _ctl_reply(ctl, decoder) == Code.READY
    ping = encode_ctl(Code.PING)
    times = []
    for _ in range(count):
        start = time.perf_counter()
        ctl.sendall(ping)
        assert _ctl_reply(ctl, decoder) == Code.ACK
        times.append(time.perf_counter() - start)
    ctl.close()
    tty.close()
    return times


def _response(sock: socket.socket, decoder: FrameDecoder) -> Frame:
    while True:
        frame = decoder.next_frame()
        if frame is not None:
            return frame
        decoder.feed(sock.recv(65536))


def through_proxy(base: Path, count: int) -> tuple[list[float], float]:
    client = socket.socket(socket.AF_UNIX)
    client.connect(str(base / "proxy.sock"))
    decoder = FrameDecoder()
    payload = b'{"containerId":"bench","ctlSerial":"%s","ioSerial":"%s"}' % (
        str(base / "ctl").encode(),
        str(base / "tty").encode(),
    )
    client.sendall(encode_frame(Frame(FrameType.COMMAND, Command.REGISTER_VM, payload)))
    assert not _response(client, decoder).error
    times = []
    for _ in range(count):
        start = time.perf_counter()
        client.sendall(PING)
        frame = _response(client, decoder)
        times.append(time.perf_counter() - start)
        assert not frame.error, frame
    start = time.perf_counter()
    client.sendall(PING * count)
    for _ in range(count):
        assert not _response(client, decoder).error
    pipelined = (time.perf_counter() - start) / count
    client.close()
    return times, pipelined


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--dialect", default="cc")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hd-", dir="/tmp") as tmp:
        base = Path(tmp)
        sim = _sim(base, args.dialect)
        try:
            direct = raw(base, args.count)
        finally:
            sim.terminate()
            sim.wait()
        shutil.rmtree(base / "share")
        sim = _sim(base, args.dialect)
        proxy = _spawn([
            sys.executable, "-m", "hyperd.proxy", "--socket", str(base / "proxy.sock"),
            "--agent-dialect", args.dialect,
        ])  # fmt: skip
        try:
            seq, pipelined = through_proxy(base, args.count)
        finally:
            proxy.terminate()
            proxy.wait()
            sim.terminate()
            sim.wait()
    raw_us = statistics.median(direct) * 1e6
    seq_us = statistics.median(seq) * 1e6
    print(f"raw agent ping      median {raw_us:7.1f} us")
    print(f"via proxy (seq)     median {seq_us:7.1f} us   proxy cost {seq_us - raw_us:6.1f} us")
    print(f"via proxy (pipe)    mean   {pipelined * 1e6:7.1f} us")


if __name__ == "__main__":
    main()


__all__ = ["main", "raw", "through_proxy"]
