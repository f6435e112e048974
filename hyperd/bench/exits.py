"""Scenario 5: exit delivery, from the agent's exit frame to ``container.wait`` returning.

A CC-dialect agent runs inside the runner's own event loop, on the ctl and tty sockets of an
external VM (``pod.create {vm: {backend: "external"}}``) behind the per-pod hyperd-proxy that
hyperd starts. For each container: create, the shim claims the token, start (the agent learns
the process's stdio seq from NEWCONTAINER), one ``container.wait`` is sent and registered in
hyperd (``hyperd.stats`` says one waiter), then the agent writes the exit (EOF frame, then the
status frame) on its tty channel at ``t0`` and the runner notes when

- the shim receives ProcessExited from the proxy (the reference path: the baseline), and
- ``container.wait`` returns (agent → proxy → exit notification → hyperd records the exit,
  saves the pod durably, wakes the waiter → JSON-RPC answer).

Agent and runner share one process and ``time.monotonic()``, so the delays need no clock
correction. The ratio says how much later than the shim hyperd's caller hears of the exit.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from time import monotonic
from typing import Final, cast

import anyio
import msgspec

from hyperd.bench import wire
from hyperd.bench.daemon import start_daemon
from hyperd.bench.stats import Section, percentile
from hyperd.bench.topology import Workspace
from protocol import ProtocolError
from protocol.hyperstart import CC, AgentCtlConnection, Code, CtlFrame, encode_tty

POD: Final = "ex"
MS: Final = 1e3
EXIT_STATUS: Final = 7
NOT_IMPLEMENTED: Final = b"command not implemented"
REGISTERED_POLL: Final = 0.002
"""Seconds between ``hyperd.stats`` reads while the wait is being registered (not timed)."""


@dataclass(frozen=True)
class ExitSettings:
    containers: int = 40
    repetitions: int = 3
    warmup: int = 3


class _Process(msgspec.Struct):
    stdio: int = 0


class _Container(msgspec.Struct):
    id: str
    process: _Process = msgspec.field(default_factory=_Process)


_CONTAINER = msgspec.json.Decoder(_Container)


class BenchAgent:
    """A CC agent that ACKs every command and exits processes when told (see module doc)."""

    def __init__(self) -> None:
        self._ctl_conn = AgentCtlConnection(CC)
        self.ctl: asyncio.Transport | None = None
        self.tty: asyncio.Transport | None = None
        self._ready_sent = False
        self.seqs: dict[str, int] = {}  # container id -> stdio seq of its init
        self.started: dict[str, asyncio.Event] = {}

    def started_event(self, cid: str) -> asyncio.Event:
        return self.started.setdefault(cid, asyncio.Event())

    async def listen(self, ctl: str, tty: str) -> list[asyncio.Server]:
        loop = asyncio.get_running_loop()
        return [
            await loop.create_unix_server(lambda: _Port(self, "ctl"), ctl),
            await loop.create_unix_server(lambda: _Port(self, "tty"), tty),
        ]

    def connected(self, name: str, transport: asyncio.Transport) -> None:
        setattr(self, name, transport)
        if self.ctl is not None and self.tty is not None and not self._ready_sent:
            self._ready_sent = True
            self.ctl.write(self._ctl_conn.send_ready())

    def ctl_data(self, data: bytes) -> None:
        conn = self._ctl_conn
        conn.receive_data(data)
        out: list[bytes] = []
        try:
            while isinstance(frame := conn.next_event(), CtlFrame):
                if frame.code == Code.VERSION:
                    out.append(conn.send_error(NOT_IMPLEMENTED))
                    continue
                if frame.code == Code.NEWCONTAINER:
                    spec = _CONTAINER.decode(frame.payload)
                    self.seqs[spec.id] = spec.process.stdio
                    self.started_event(spec.id).set()
                out.append(conn.send_ack())
        except ProtocolError:
            if self.ctl is not None:
                self.ctl.close()
            return
        if out and self.ctl is not None:
            self.ctl.write(b"".join(out))

    def exit(self, cid: str, status: int) -> float:
        """Write the init's exit (EOF, then the status byte); returns when it was written."""
        assert self.tty is not None
        seq = self.seqs[cid]
        frames = encode_tty(seq, b"") + encode_tty(seq, bytes((status,)))
        now = monotonic()
        self.tty.write(frames)
        return now


class _Port(asyncio.Protocol):
    def __init__(self, agent: BenchAgent, name: str) -> None:
        self._agent = agent
        self._name = name

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport instances
        self._agent.connected(self._name, cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        if self._name == "ctl":
            self._agent.ctl_data(data)


async def _one(
    agent: BenchAgent, rpc: wire.RpcWire, waiter: wire.RpcWire, rootfs: str, cid: str
) -> tuple[float, float]:
    """Delays (ms) of the shim's ProcessExited and of container.wait after the exit frame."""
    ref = {"pod": POD, "id": cid}
    created = await rpc.call(
        "container.create", {**ref, "rootfs": {"path": rootfs}, "process": {"args": ["x"]}}
    )
    shim = await wire.ShimWire.connect(wire.unix_path(created["proxy_url"]), created["token"])
    try:
        await rpc.call("container.start", ref)
        await agent.started_event(cid).wait()
        times: dict[str, float] = {}

        async def wait() -> None:
            result = await waiter.call("container.wait", ref)
            times["wait"] = monotonic()
            assert result["exit_status"] == EXIT_STATUS, result

        async def shim_exit() -> None:
            assert await shim.wait_exit() == EXIT_STATUS
            times["shim"] = monotonic()

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait)
            tg.start_soon(shim_exit)
            while (await rpc.call("hyperd.stats"))["exits"]["waiting"] < 1:  # noqa: ASYNC110
                await anyio.sleep(REGISTERED_POLL)
            t0 = agent.exit(cid, EXIT_STATUS)
    finally:
        shim.close()
    await rpc.call("container.stop", ref)
    await rpc.call("container.delete", ref)
    return (times["shim"] - t0) * MS, (times["wait"] - t0) * MS


async def exit_delivery(ws: Workspace, s: ExitSettings) -> Section:
    sec = Section("5. exit delivery: agent's exit frame to container.wait returning")
    ctl, tty = ws.path("exv.ctl"), ws.path("exv.tty")
    rootfs = ws.path("exit-rootfs")
    os.makedirs(rootfs, exist_ok=True)
    agent = BenchAgent()
    servers = await agent.listen(ctl, tty)
    daemon = start_daemon(ws, "hyperd-exits")
    rpc = await wire.RpcWire.open(daemon.socket)
    waiter = await wire.RpcWire.open(daemon.socket)
    try:
        await rpc.call(
            "pod.create", {"id": POD, "vm": {"backend": "external", "ctl": ctl, "tty": tty}}
        )
        pod = await rpc.call("pod.start", {"id": POD})
        if not pod.get("exit_notifications"):
            raise wire.WireError("the pod's proxy does not send exit notifications")
        n = 0
        for _ in range(s.warmup):
            await _one(agent, rpc, waiter, rootfs, f"w{n}")
            n += 1
        for _ in range(s.repetitions):
            shim_ms: list[float] = []
            wait_ms: list[float] = []
            for _ in range(s.containers):
                shim_delay, wait_delay = await _one(agent, rpc, waiter, rootfs, f"c{n}")
                n += 1
                shim_ms.append(shim_delay)
                wait_ms.append(wait_delay)
            shim_label, wait_label = "exit -> shim's ProcessExited", "exit -> container.wait"
            sec.add("shim_p50", f"{shim_label} p50", "ms", percentile(shim_ms, 50))
            sec.add("shim_p99", f"{shim_label} p99", "ms", percentile(shim_ms, 99))
            sec.add("wait_p50", f"{wait_label} returns p50", "ms", percentile(wait_ms, 50))
            sec.add("wait_p99", f"{wait_label} returns p99", "ms", percentile(wait_ms, 99))
        await rpc.call("pod.stop", {"id": POD})
    finally:
        rpc.close()
        waiter.close()
        for server in servers:
            server.close()
        ws.procs.stop(daemon.proc)
    sec.ratio("container.wait p50 / shim p50", "wait_p50", "shim_p50")
    sec.notes.append(
        f"{s.containers} containers, one at a time, the wait registered before the exit; "
        "the agent runs in the runner's loop (same clock)"
    )
    return sec
