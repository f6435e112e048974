"""The amplification probe against a real hyperd: clients that ask for far more than they send
and never read must not take the machine's memory, nor stop hyperd serving others.

Four connections each pipeline batches of ``pod.list`` (100 pods: each answer is a few kB, a
call is ~50 bytes) until the kernel's socket buffers are full, plus one 1 MiB batch of ~23,000
calls, and never read. hyperd must stop reading them (``hyperd.stats`` shows it), keep its RSS
within 100 MB of what it was idle, and go on answering another client.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from hyperd.cli.client import RPCClient
from tests.e2e.conftest import Hyperd, rpc

pytestmark = pytest.mark.anyio

PODS = 100
CONNECTIONS = 4
PROBE_BYTES = 4 << 20  # request bytes each connection tries to send (the kernel takes less)
RSS_BOUND = 100 << 20  # bytes over idle
DEADLINE = 60.0  # seconds for hyperd to stop reading every probe (a busy 2-core machine)
POLL = 0.1  # seconds between looks at hyperd.stats (counters have no event)
MAX_BATCH = 256  # the default rpc.max_batch
HUGE_BATCH = 20_000  # calls in one line just under 1 MiB (the probe: 23,291)

CALL = b'{"jsonrpc":"2.0","method":"pod.list","id":%d}'


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


async def rpc_stats_until(client: RPCClient, condition: Callable[[Any], bool]) -> Any:
    """Poll ``hyperd.stats`` (its counters have no event) until ``condition(stats["rpc"])``."""
    with anyio.fail_after(DEADLINE):
        while not condition(stats := (await client.call("hyperd.stats"))["rpc"]):  # noqa: ASYNC110
            await anyio.sleep(POLL)
    return stats


def batch(calls: int) -> bytes:
    return b"[" + b",".join(CALL % i for i in range(calls)) + b"]\n"


CUT_LINE_DEADLINE = 10.0  # seconds to send the rest of a cut line, while hyperd still reads


def flood(sock: socket.socket, lines: bytes) -> int:
    """Send as much of ``lines`` as the kernel takes without blocking, then the rest of the line
    that was cut (blocking, until hyperd stops reading: it may pause reading because this client
    does not read its answers, a partial line waiting); returns the bytes of the whole lines
    sent."""
    sock.setblocking(False)
    sent = 0
    while sent < len(lines):
        try:
            sent += sock.send(lines[sent : sent + 65536])
        except BlockingIOError:
            break
    end = lines.find(b"\n", sent - 1 if sent else 0)
    sock.settimeout(CUT_LINE_DEADLINE)
    try:
        sock.sendall(lines[sent : end + 1])
    except TimeoutError:  # hyperd paused reading first: the cut line is no request
        return lines.rfind(b"\n", 0, sent) + 1
    finally:
        sock.setblocking(True)
    return end + 1


async def test_amplification_probe_keeps_memory_bounded(hyperd: Hyperd) -> None:
    assert hyperd.proc is not None
    pid = hyperd.proc.pid
    async with rpc(hyperd.socket) as client:
        for i in range(PODS):
            await client.call("pod.create", {"id": f"pod-{i:03d}"})
        one = len(msgspec.json.encode(await client.call("pod.list")))
        idle = rss(pid)

        huge = batch(HUGE_BATCH)
        assert len(huge) < 1 << 20  # one line under max_message: refused for its calls
        normal = batch(MAX_BATCH)
        lines = normal * (PROBE_BYTES // len(normal))
        probes = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(CONNECTIONS)]
        try:
            asked = 0
            for probe in probes:
                probe.connect(hyperd.socket)
                probe.sendall(huge)
                sent = flood(probe, lines)
                asked += (HUGE_BATCH + sent // len(normal) * MAX_BATCH) * one
            # hyperd stops reading every probe, and answers this client meanwhile
            stats = await rpc_stats_until(client, lambda s: s["reading_paused"] == CONNECTIONS)
            grown = rss(pid) - idle
            assert grown < RSS_BOUND, (grown, stats)
            assert (await client.call("hyperd.version"))["api"] == 1
            assert len((await client.call("pod.list"))["pods"]) == PODS
            # an unbounded server would have had to hold far more than the bound
            assert asked > 4 * RSS_BOUND, asked
            assert stats["output_buffered"] < RSS_BOUND, stats
            print(
                f"probe: asked {asked >> 20} MiB of answers, hyperd holds "
                f"{stats['output_buffered'] >> 20} MiB of output, RSS +{grown >> 20} MiB"
            )
        finally:
            for probe in probes:
                probe.close()
        # closing the probes frees what was held for them
        await rpc_stats_until(client, lambda s: s["connections"] == 1)


async def test_oversized_batch_is_refused_and_the_connection_serves_on(hyperd: Hyperd) -> None:
    async with await RPCClient.connect(hyperd.socket) as client:
        await client.send_raw(batch(MAX_BATCH + 1))
        refused = await client.read_message()
        assert refused["error"]["data"] == {
            "kind": "batch_too_large",
            "calls": MAX_BATCH + 1,
            "max_batch": MAX_BATCH,
        }
        assert (await client.call("hyperd.version"))["api"] == 1
