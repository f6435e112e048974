"""Fuzzing the RPC server of a live hyperd: random methods, params, batches and framing.

One hyperd serves the whole run. Each Hypothesis example opens a connection and sends a random
mix of requests (any method of API v1 or none, params shaped like the real ones or not),
notifications, batches, invalid JSON, lines over ``max_message`` and batches over
``max_batch``, cut into chunks at random points, while reading. Then:

- every request that carries an id is answered exactly once, with its id (or inside the
  answer to its batch); no answer carries an id that was not sent (no misrouted reply);
- hyperd is still running and answers a fresh connection;
- at the end, hyperd's RSS is within a bound of what it was after the first examples.

Params never carry ``shim_pid``: hyperd would signal whatever process that names (another
part of this issue takes that away), and this test must not signal the machine's processes.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.e2e.conftest import Hyperd
from tests.e2e.test_rpc_limits import rss

EXAMPLES = 60
ANSWER_DEADLINE = 60.0  # seconds for every answer of one example (pod.start on a busy machine)
RSS_BOUND = 100 << 20  # bytes of growth over the whole run
MAX_MESSAGE = 1 << 20
MAX_BATCH = 256

METHODS = [
    "hyperd.version",
    "hyperd.health",
    "hyperd.stats",
    "pod.create",
    "pod.start",
    "pod.stop",
    "pod.delete",
    "pod.list",
    "pod.inspect",
    "container.create",
    "container.start",
    "container.stop",
    "container.delete",
    "container.kill",
    "container.ps",
    "container.list",
    "container.inspect",
    "exec.create",
    "exec.start",
    "exec.inspect",
    "events.subscribe",
]

json_scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
ids = st.sampled_from(["fz0", "fz1", "", "../x", "a" * 200, "fz0/c"]) | st.text(max_size=10)
KEYS = {
    "id": ids,
    "pod": ids,
    "container": ids,
    "exec_id": ids,
    "hostname": st.text(max_size=70),
    "rootfs": st.fixed_dictionaries({"path": st.sampled_from(["/nonexistent", "rel", "/"])})
    | json_values,
    "process": st.fixed_dictionaries({"args": st.lists(st.text(max_size=8), max_size=3)})
    | json_values,
    "mounts": st.lists(
        st.fixed_dictionaries(
            {"source": st.sampled_from(["/nonexistent", "x"]), "destination": st.text(max_size=8)}
        ),
        max_size=2,
    )
    | json_values,
    "signal": st.sampled_from([0, 9, 15, "TERM", "SIGKILL", "NOPE", -1, 2**40]),
    "all": st.booleans(),
    "format": st.sampled_from(["table", "json", "x"]),
    "args": st.lists(st.text(max_size=5), max_size=3),
    "vm": json_values,
    "proxy": json_values,
    "share_tag": st.text(max_size=10),
}
params = (
    st.none()
    | st.dictionaries(st.sampled_from(sorted(KEYS)), json_values, max_size=4)
    | st.fixed_dictionaries({}, optional=KEYS)
    | st.lists(json_values, max_size=3)
    | json_scalars
)
methods = st.sampled_from(METHODS) | st.text(max_size=12)


@st.composite
def calls(draw: st.DrawFn) -> dict[str, Any]:
    """A request (id filled in later) or a notification."""
    call: dict[str, Any] = {"jsonrpc": "2.0", "method": draw(methods)}
    value = draw(params)
    if value is not None:
        call["params"] = value
    if draw(st.integers(0, 4)):
        call["id"] = None  # a request (numbered when sent); else a notification
    return call


frames = st.one_of(
    calls().map(lambda c: ("call", c)),
    st.lists(calls(), min_size=0, max_size=12).map(lambda b: ("batch", b)),
    st.binary(max_size=40).map(lambda b: ("raw", b.replace(b"\n", b" "))),
    st.sampled_from(
        [
            ("raw", b"{"),
            ("raw", b"[]"),
            ("raw", b'{"jsonrpc":"2.0"}'),
            ("raw", b"[1,2]"),
            # an invalid request whose id is readable is answered with that id (JSON-RPC 2.0
            # §5: null only when the id cannot be detected): numbered like the calls
            ("raw", b'{"jsonrpc":"1.0","method":"pod.list","id":ID}'),
            ("oversized", b""),
            ("too_many", b""),
        ]
    ),
)


class Numbering:
    """Unique ids over the whole run, so that a misrouted answer cannot go unnoticed."""

    def __init__(self) -> None:
        self.next = 0

    def take(self) -> int | str:
        self.next += 1
        return self.next if self.next % 2 else f"s{self.next}"


def encode(frames: list[tuple[str, Any]], numbering: Numbering) -> tuple[bytes, set[Any]]:
    """The bytes of ``frames`` and the ids that must be answered."""
    expected: set[Any] = set()
    out = bytearray()

    def number(call: dict[str, Any]) -> dict[str, Any]:
        if "id" in call:
            call = dict(call, id=numbering.take())
            expected.add(call["id"])
        return call

    for kind, body in frames:
        if kind == "call":
            out += msgspec.json.encode(number(body))
        elif kind == "batch":
            out += msgspec.json.encode([number(c) for c in body])
        elif kind == "raw" and b":ID}" in body:
            numbered = msgspec.json.encode(number({"id": None})["id"])
            out += body.replace(b":ID}", b":" + numbered + b"}")
        elif kind == "raw":
            out += body
        elif kind == "oversized":
            out += b"[" + b"0," * (MAX_MESSAGE // 2) + b"0]"
        else:  # a batch over max_batch: refused whole, its ids are never answered
            out += msgspec.json.encode(
                [
                    {"jsonrpc": "2.0", "method": "pod.list", "id": f"x{i}"}
                    for i in range(MAX_BATCH + 1)
                ]
            )
        out += b"\n"
    return bytes(out), expected


def chunks(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    start = 0
    for cut in sorted(c % (len(data) + 1) for c in cuts):
        yield data[start:cut]
        start = cut
    yield data[start:]


def exchange(path: str, data_chunks: list[bytes], expected: set[Any]) -> list[Any]:
    """Send the chunks while reading; return every answer id (batch elements flattened)."""
    seen: list[Any] = []
    buffer = b""
    pending = [c for c in data_chunks if c]
    outstanding = set(expected)
    deadline = time.monotonic() + ANSWER_DEADLINE
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        sock.setblocking(False)
        current = b""
        while pending or current or outstanding:
            left = deadline - time.monotonic()
            assert left > 0, f"unanswered: {sorted(map(str, outstanding))[:10]}"
            want_write = bool(pending or current)
            readable, writable, _ = select.select([sock], [sock] if want_write else [], [], left)
            if writable:
                current = current or pending.pop(0)
                try:
                    current = current[sock.send(current) :]
                except BlockingIOError:
                    pass
                if not current and not pending:
                    sock.shutdown(socket.SHUT_WR)  # half-close: hyperd still answers
            if readable:
                data = sock.recv(1 << 20)
                if not data:
                    break
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    answer = json.loads(line)
                    for item in answer if isinstance(answer, list) else [answer]:
                        seen.append(item["id"])
                        outstanding.discard(item["id"])
    assert not outstanding, f"unanswered: {sorted(map(str, outstanding))[:10]}"
    return seen


def version_works(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(ANSWER_DEADLINE)
        sock.connect(path)
        sock.sendall(b'{"jsonrpc":"2.0","method":"hyperd.version","id":1}\n')
        line = b""
        while not line.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                return False
            line += chunk
    return bool(json.loads(line)["result"]["api"] == 1)


def test_rpc_fuzz_against_a_live_daemon(hyperd: Hyperd, short_tmp: Path) -> None:
    assert hyperd.proc is not None
    numbering = Numbering()
    baseline: list[int] = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(frames, min_size=1, max_size=8), st.lists(st.integers(0, 1 << 21), max_size=6))
    def one_connection(sent_frames: list[tuple[str, Any]], cuts: list[int]) -> None:
        data, expected = encode(sent_frames, numbering)
        seen = exchange(hyperd.socket, list(chunks(data, cuts)), expected)
        assert sorted(map(str, seen)) == sorted(
            [str(i) for i in expected] + ["None"] * (len(seen) - len(expected))
        ), "an answer carried an id that was not sent, or an id was answered twice"
        assert hyperd.proc is not None and hyperd.proc.poll() is None, "hyperd died"
        assert version_works(hyperd.socket)
        if not baseline:
            baseline.append(rss(hyperd.proc.pid))

    one_connection()
    grown = rss(hyperd.proc.pid) - baseline[0]
    print(f"fuzz: {numbering.next} ids sent, hyperd RSS grew {grown >> 20} MiB")
    assert grown < RSS_BOUND
