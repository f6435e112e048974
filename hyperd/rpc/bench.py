"""Microbenchmark of the RPC server's hot path: ``python -m hyperd.rpc.bench``.

A server process (``RPCServer`` on the chosen event loop, a trivial method table) and a lean
client in this process, so that the figures are the server's cost plus a minimal client:

- ``sequential``: one connection on a blocking socket, N calls one after the other (no event loop
  on the client side); per-call round trip p50/p99 and calls/s;
- ``concurrent``: C connections (default 64) in one client process on an ``asyncio.Protocol``,
  each doing calls one after the other for a fixed time; aggregate calls/s and per-call p50/p99;
- ``connect``: a new connection per call, as ``hyperctl`` does (connect, credential check,
  call, close), one after the other; per-cycle p50/p99.

Methods: ``bench.version`` returns a small dict without awaiting (as ``hyperd.version``);
``bench.yield`` awaits once (``asyncio.sleep(0)``), so it cannot complete synchronously;
``bench.future`` awaits a future resolved on the next loop round (as an agent's reply), in a
task, and ``bench.pending`` returns the same future as a :class:`~hyperd.rpc.pending.Pending`
from a plain function, answered without a task (as ``container.kill``).
``--method`` picks one. ``--cpus 0`` pins the client and the server to one CPU: the figures
are then the CPU cost of a round trip; unpinned, an idle machine adds the latency of waking the
other CPU (tens of microseconds in a VM) to every call. To profile the server, attach
``py-spy`` or ``strace -c -f -p`` to the ``--serve`` process while a run is going on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any, Final

import msgspec

READY_TIMEOUT: Final = 10.0  # seconds for the server process to listen
DEFAULT_CALLS: Final = 20000  # sequential calls
WARMUP_CALLS: Final = 1000  # calls before measuring (imports, caches)
DEFAULT_CLIENTS: Final = 64  # connections of the concurrent run
DEFAULT_SECONDS: Final = 3.0  # duration of the concurrent run
CONNECT_FRACTION: Final = 10  # the connect run does calls / CONNECT_FRACTION cycles
WARMUP_SECONDS: Final = 0.3  # concurrent calls before measuring
RECEIVE_SIZE: Final = 65536
METHODS: Final = ("bench.version", "bench.yield", "bench.future", "bench.pending")

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


# -- server process ---------------------------------------------------------------------------


def _result(future: asyncio.Future[Any]) -> Any:
    return future.result()


def _serve(path: str, loop_name: str, ready_fd: int) -> None:
    import anyio

    from hyperd.rpc import CallContext, MethodTable, Pending, RPCServer, create_unix_listener

    methods = MethodTable()
    version = {"version": "0.0-bench", "api": 1, "dialects": ["cc", "hyper"]}

    async def bench_version(params: None, ctx: CallContext) -> dict[str, Any]:
        return version

    async def bench_yield(params: None, ctx: CallContext) -> dict[str, Any]:
        await asyncio.sleep(0)
        return version

    def resolved_soon() -> asyncio.Future[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        loop.call_soon(future.set_result, version)
        return future

    async def bench_future(params: None, ctx: CallContext) -> dict[str, Any]:
        return await resolved_soon()

    def bench_pending(params: None, ctx: CallContext) -> Pending[dict[str, Any]]:
        return Pending(resolved_soon(), _result)

    methods.register("bench.version", bench_version)
    methods.register("bench.yield", bench_yield)
    methods.register("bench.future", bench_future)
    methods.register("bench.pending", bench_pending)

    async def main() -> None:
        server = RPCServer(methods)
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            await tg.start(server.serve, await create_unix_listener(path))
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGTERM, stop.set)
            os.write(ready_fd, b"ready\n")
            os.close(ready_fd)
            await stop.wait()
            await server.shutdown()

    anyio.run(main, backend="asyncio", backend_options={"use_uvloop": loop_name == "uvloop"})


@contextlib.contextmanager
def server_process(loop_name: str) -> Iterator[tuple[str, int]]:
    """Start the server process; yields (socket path, pid)."""
    tmp = tempfile.mkdtemp(prefix="hd-bench-", dir="/tmp")
    path = os.path.join(tmp, "rpc.sock")
    read_fd, write_fd = os.pipe()
    cmd = [sys.executable, "-m", "hyperd.rpc.bench", "--serve", path, "--loop", loop_name]
    proc = subprocess.Popen([*cmd, "--ready-fd", str(write_fd)], pass_fds=(write_fd,))
    os.close(write_fd)
    try:
        with os.fdopen(read_fd, "rb") as ready:
            os.set_blocking(ready.fileno(), True)
            deadline = time.monotonic() + READY_TIMEOUT
            while time.monotonic() < deadline:
                if ready.readline() == b"ready\n":
                    break
            else:  # pragma: no cover - a broken server
                raise RuntimeError("the bench server did not get ready")
        yield path, proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(READY_TIMEOUT)
        except subprocess.TimeoutExpired:  # pragma: no cover
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


# -- clients -----------------------------------------------------------------------------------


def _request(method: str, request_id: int) -> bytes:
    return _encoder.encode({"jsonrpc": "2.0", "method": method, "id": request_id}) + b"\n"


def sequential(path: str, method: str, calls: int) -> list[float]:
    """Round trips (seconds) of ``calls`` calls one after the other on a blocking socket."""
    times: list[float] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        buffer = b""
        for i in range(WARMUP_CALLS + calls):
            request = _request(method, i)
            start = time.perf_counter()
            sock.sendall(request)
            while b"\n" not in buffer:
                data = sock.recv(RECEIVE_SIZE)
                if not data:
                    raise RuntimeError("the server closed the connection")
                buffer += data
            line, _, buffer = buffer.partition(b"\n")
            elapsed = time.perf_counter() - start
            answer = _decoder.decode(line)
            if answer.get("id") != i or "result" not in answer:
                raise RuntimeError(f"unexpected answer {answer!r}")
            if i >= WARMUP_CALLS:
                times.append(elapsed)
    return times


def connect_per_call(path: str, method: str, calls: int) -> list[float]:
    """Durations (seconds) of ``calls`` cycles of connect, one call, close."""
    times: list[float] = []
    for i in range(calls):
        start = time.perf_counter()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
            sock.sendall(_request(method, i))
            buffer = b""
            while not buffer.endswith(b"\n"):
                data = sock.recv(RECEIVE_SIZE)
                if not data:
                    raise RuntimeError("the server closed the connection")
                buffer += data
        times.append(time.perf_counter() - start)
    return times


class _Caller(asyncio.Protocol):
    """One connection doing calls one after the other, from :meth:`start` until ``stop_at``."""

    def __init__(self, method: str, times: list[float]) -> None:
        self.method = method
        self.times = times
        self.stop_at = 0.0
        self.done = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.next_id = 0
        self.sent_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def start(self, stop_at: float) -> None:
        self.stop_at = stop_at
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        self.next_id += 1
        self.sent_at = time.perf_counter()
        self.transport.write(_request(self.method, self.next_id))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            _line, _, self.buffer = self.buffer.partition(b"\n")
            now = time.perf_counter()
            self.times.append(now - self.sent_at)
            if now >= self.stop_at:
                if not self.done.done():
                    self.done.set_result(None)
                return
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(RuntimeError(f"the server closed a connection: {exc}"))


async def _run_callers(
    path: str, method: str, clients: int, seconds: float
) -> tuple[list[float], float]:
    loop = asyncio.get_running_loop()
    times: list[float] = []
    callers = [_Caller(method, times) for _ in range(clients)]
    transports = [
        (await loop.create_unix_connection(lambda c=c: c, path))[0]  # type: ignore[misc]
        for c in callers
    ]
    try:
        start = time.perf_counter()
        for caller in callers:
            caller.start(start + seconds)
        await asyncio.gather(*(c.done for c in callers))
        wall = time.perf_counter() - start
    finally:
        for transport in transports:
            transport.close()
    return times, wall


async def _concurrent(
    path: str, method: str, clients: int, seconds: float
) -> tuple[list[float], float]:
    await _run_callers(path, method, clients, WARMUP_SECONDS)
    return await _run_callers(path, method, clients, seconds)


def concurrent(path: str, method: str, clients: int, seconds: float) -> tuple[list[float], float]:
    """Per-call round trips of ``clients`` connections calling for ``seconds``; the wall time."""
    import uvloop

    result: tuple[list[float], float] = uvloop.run(_concurrent(path, method, clients, seconds))
    return result


def _report(label: str, times: list[float], wall: float | None = None) -> None:
    total = sum(times) if wall is None else wall
    qs = statistics.quantiles(times, n=100, method="inclusive")
    rate = len(times) / total
    print(
        f"{label:<44} {len(times):>8} calls  {rate:>9.0f} calls/s  "
        f"p50 {qs[49] * 1e6:7.1f} us  p99 {qs[98] * 1e6:7.1f} us"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hyperd.rpc.bench", description=__doc__)
    parser.add_argument("--loop", choices=("uvloop", "asyncio", "both"), default="both")
    parser.add_argument("--method", choices=(*METHODS, "all"), default="all")
    parser.add_argument("--calls", type=int, default=DEFAULT_CALLS)
    parser.add_argument("--clients", type=int, default=DEFAULT_CLIENTS)
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS)
    parser.add_argument(
        "--cpus", help="comma-separated CPUs to pin the client and the server to, e.g. 0"
    )
    parser.add_argument("--serve", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        _serve(args.serve, args.loop, args.ready_fd)
        return
    if args.cpus:
        os.sched_setaffinity(0, {int(cpu) for cpu in args.cpus.split(",")})  # inherited
    loops = ("uvloop", "asyncio") if args.loop == "both" else (args.loop,)
    methods = METHODS if args.method == "all" else (args.method,)
    for loop_name in loops:
        with server_process(loop_name) as (path, _pid):
            for method in methods:
                _report(f"{loop_name} {method} sequential", sequential(path, method, args.calls))
                times, wall = concurrent(path, method, args.clients, args.seconds)
                _report(f"{loop_name} {method} {args.clients} clients", times, wall)
            cycles = connect_per_call(path, methods[0], args.calls // CONNECT_FRACTION)
            _report(f"{loop_name} {methods[0]} connection per call", cycles)


if __name__ == "__main__":
    main()
