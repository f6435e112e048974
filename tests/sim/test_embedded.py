"""The simulator embedded in an anyio program (no subprocess), on asyncio and uvloop."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from hyperd.sim import SimConfig, Simulator
from protocol import NEED_DATA
from protocol.hyperstart import HYPER, Code, HostCtlConnection, NextAck, Ready, Reply

pytestmark = pytest.mark.anyio


async def _events(stream: anyio.abc.SocketStream, conn: HostCtlConnection, n: int) -> list[object]:
    events: list[object] = []
    with anyio.fail_after(5):
        while len(events) < n:
            conn.receive_data(await stream.receive())
            while (ev := conn.next_event()) is not NEED_DATA:
                events.append(ev)
    return events


async def test_embedded_simulator_serves_and_stops(anyio_backend: object, short_tmp: Path) -> None:
    config = SimConfig(ctl=short_tmp / "ctl", tty=short_tmp / "tty", share=short_tmp, dialect=HYPER)
    sim = Simulator(config)
    listening = anyio.Event()
    status: list[int] = []

    async def serve() -> None:
        status.append(await sim.run(listening.set, handle_signals=False))

    async with anyio.create_task_group() as tg:
        tg.start_soon(serve)
        await listening.wait()
        ctl = await anyio.connect_unix(config.ctl)
        tty = await anyio.connect_unix(config.tty)
        conn = HostCtlConnection(HYPER)
        assert await _events(ctl, conn, 1) == [Ready()]
        await ctl.send(conn.send_command(Code.VERSION))
        assert await _events(ctl, conn, 2) == [
            NextAck(8),
            Reply(Code.VERSION, True, (4244).to_bytes(4, "big")),
        ]
        sim.stop()
    await ctl.aclose()
    await tty.aclose()
    assert status == [0]
    assert not config.ctl.exists() and not config.tty.exists()
