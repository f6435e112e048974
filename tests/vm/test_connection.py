"""VMConnection against a real peer on a unix socket: pipelining, FIFO matching, deadlines."""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from hyperd.errors import AgentError, ConnectionLost, ProxyError, Timeout, VMUnavailable
from hyperd.vm import VMConnection
from protocol import NEED_DATA
from protocol.ccproxy import Command, CommandReceived, Hyper, ServerConnection
from tests.vm.fakeproxy import AGENT_ERROR
from tests.vm.helpers import VM, connected, serving

pytestmark = pytest.mark.anyio


def echo(value: object) -> Hyper:
    return Hyper(hyperName="echo", data=msgspec.Raw(msgspec.json.encode(value)))


async def test_commands_are_pipelined_before_the_first_reply(
    anyio_backend: Any, short_tmp: Path
) -> None:
    async with serving(short_tmp) as proxy, connected(proxy) as conn:
        proxy.hold()
        results: dict[int, bytes] = {}

        async def call(i: int) -> None:
            results[i] = await conn.command(Command.HYPER, echo(i), timeout=5)

        async with anyio.create_task_group() as tg:
            for i in range(5):
                tg.start_soon(call, i)
            # Every command is on the wire while no reply has been sent: pipelined.
            await proxy.wait_for(lambda: len(proxy.received) == 5)
            assert proxy.replies == 0
            stats = conn.statistics()
            assert (stats.queued, stats.in_flight, stats.sent) == (0, 5, 5)
            proxy.release()
        assert results == {i: str(i).encode() for i in range(5)}


async def test_frames_queued_together_go_out_in_one_write(
    anyio_backend: Any, short_tmp: Path
) -> None:
    async with serving(short_tmp) as proxy, connected(proxy) as conn:
        transport = conn._transport
        assert transport is not None
        write = transport.write
        writes: list[int] = []

        class CountingTransport:
            def write(self, data: bytes) -> None:
                writes.append(len(data))
                write(data)

            def __getattr__(self, name: str) -> Any:
                return getattr(transport, name)

        conn._transport = CountingTransport()  # type: ignore[assignment]
        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(partial(conn.command, Command.HYPER, echo(i), timeout=5))
        # the first, on an idle connection, is written at once; the 49 queued behind it in the
        # same loop iteration go out together
        assert len(writes) == 2
        assert proxy.replies == 50
        # alone on an idle connection: written before submit returns, no loop iteration later
        future = conn.submit(Command.HYPER, echo("alone"), timeout=5)
        assert len(writes) == 3
        assert msgspec.json.decode(await future) == "alone"


async def test_fifo_matching_under_200_concurrent_callers(
    anyio_backend: Any, short_tmp: Path
) -> None:
    async with serving(short_tmp) as proxy, connected(proxy) as conn:
        got: dict[int, object] = {}

        async def call(i: int) -> None:
            await anyio.sleep(random.random() * 0.01)  # arrivals spread over several iterations
            reply = await conn.command(Command.HYPER, echo({"caller": i}), timeout=10)
            got[i] = msgspec.json.decode(reply)

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(call, i)
        assert got == {i: {"caller": i} for i in range(200)}
        stats = conn.statistics()
        assert (stats.sent, stats.failed, stats.timed_out, stats.in_flight) == (200, 0, 0, 0)
        assert stats.last_rtt is not None and stats.last_rtt > 0


async def test_timed_out_caller_keeps_its_slot_and_late_reply_is_discarded(
    anyio_backend: Any, short_tmp: Path
) -> None:
    async with serving(short_tmp) as proxy, connected(proxy) as conn:
        proxy.delays["slow"] = 0.3
        proxy.delays["echo"] = 0.0
        results: dict[str, object] = {}

        async def slow() -> None:
            try:
                await conn.command(
                    Command.HYPER, Hyper(hyperName="slow"), timeout=0.05, label="slow"
                )
            except Timeout as exc:
                results["slow"] = exc

        async def follower() -> None:
            await proxy.wait_for(lambda: len(proxy.received) == 1)
            results["next"] = await conn.command(Command.HYPER, echo("mine"), timeout=5)

        async with anyio.create_task_group() as tg:
            tg.start_soon(slow)
            tg.start_soon(follower)
        assert isinstance(results["slow"], Timeout)
        assert "vm-test" in str(results["slow"]) and "slow" in str(results["slow"])
        assert results["next"] == b'"mine"'
        stats = conn.statistics()
        assert (stats.timed_out, stats.discarded, stats.in_flight) == (1, 1, 0)


async def test_cancelled_caller_reply_is_discarded(anyio_backend: Any, short_tmp: Path) -> None:
    async with serving(short_tmp) as proxy, connected(proxy) as conn:
        proxy.hold()
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(conn.command, Command.HYPER, echo("cancelled"), timeout=5))
            await proxy.wait_for(lambda: len(proxy.received) == 1)
            tg.cancel_scope.cancel()
        proxy.release()
        assert await conn.command(Command.HYPER, echo("second"), timeout=5) == b'"second"'
        assert conn.statistics().discarded == 1


async def test_error_replies_map_to_agent_and_proxy_errors(
    anyio_backend: Any, short_tmp: Path
) -> None:
    async with serving(short_tmp) as proxy, connected(proxy) as conn:
        with pytest.raises(AgentError) as agent:
            await conn.command(Command.HYPER, Hyper(hyperName="agentfail"), timeout=5, label="x1")
        assert agent.value.data["proxy_message"] == AGENT_ERROR
        assert "vm-test" in str(agent.value) and "x1" in str(agent.value)
        with pytest.raises(ProxyError) as proxy_err:
            await conn.command(Command.HYPER, Hyper(hyperName="nope"), timeout=5, label="nope")
        assert not isinstance(proxy_err.value, AgentError)
        assert "unknown command 'nope'" in str(proxy_err.value)
        # the connection is still in step after errors
        assert await conn.command(Command.HYPER, echo(1), timeout=5) == b"1"
        assert conn.statistics().failed == 2


async def test_connection_loss_fails_in_flight_callers(anyio_backend: Any, short_tmp: Path) -> None:
    async with serving(short_tmp) as proxy, connected(proxy) as conn:
        proxy.hold()
        errors: list[Exception] = []

        async def call(i: int) -> None:
            try:
                await conn.command(Command.HYPER, echo(i), timeout=5, label=f"cmd{i}")
            except VMUnavailable as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(call, i)
            await proxy.wait_for(lambda: len(proxy.received) == 3)
            await proxy.drop_connections()
        assert len(errors) == 3
        assert all(isinstance(e, ConnectionLost) for e in errors)
        assert all("connection to proxy lost" in str(e) and "unknown" in str(e) for e in errors)
        assert conn.closed
        with pytest.raises(VMUnavailable, match="not sent"):
            await conn.command(Command.HYPER, echo(9), timeout=5)


async def test_close_fails_queued_and_in_flight(anyio_backend: Any, short_tmp: Path) -> None:
    async with serving(short_tmp) as proxy:
        conn = await VMConnection.connect(proxy.path, vm_id=VM)
        proxy.hold()
        errors: list[Exception] = []

        async def call() -> None:
            try:
                await conn.command(Command.HYPER, echo(0), timeout=5)
            except VMUnavailable as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(conn.run)
            tg.start_soon(call)
            await proxy.wait_for(lambda: len(proxy.received) == 1)
            conn.close("closed by the test")
        assert len(errors) == 1 and isinstance(errors[0], ConnectionLost)
        assert "closed by the test" in str(errors[0])


async def test_each_caller_has_its_own_deadline(anyio_backend: Any, short_tmp: Path) -> None:
    async with serving(short_tmp) as proxy, connected(proxy) as conn:
        proxy.hold()
        ended: dict[float, float] = {}
        start = anyio.current_time()

        async def call(limit: float) -> None:
            with pytest.raises(Timeout, match=f"within {limit:g}s"):
                await conn.command(Command.HYPER, echo(limit), timeout=limit)
            ended[limit] = anyio.current_time() - start

        async with anyio.create_task_group() as tg:
            for timeout in (0.4, 0.1, 0.3, 0.2):  # a later command may have an earlier deadline
                tg.start_soon(call, timeout)
        assert sorted(ended, key=ended.__getitem__) == [0.1, 0.2, 0.3, 0.4]
        for timeout, elapsed in ended.items():
            assert timeout <= elapsed + 0.01 < timeout + 0.2
        proxy.release()
        # the four late replies are discarded; the next caller still gets its own
        assert await conn.command(Command.HYPER, echo("own"), timeout=5) == b'"own"'
        assert conn.statistics().discarded == 4


async def test_no_reply_reaches_the_wrong_caller_under_timeouts_and_cancellations(
    anyio_backend: Any, short_tmp: Path
) -> None:
    async with serving(short_tmp, jitter=0.002) as proxy, connected(proxy) as conn:
        outcomes: dict[str, int] = {"ok": 0, "timeout": 0, "cancelled": 0}
        rng = random.Random(7)

        async def call(i: int, limit: float, cancel_after: float | None) -> None:
            with anyio.CancelScope() as scope:
                if cancel_after is not None:
                    scope.deadline = anyio.current_time() + cancel_after
                try:
                    reply = await conn.command(Command.HYPER, echo(i), timeout=limit)
                except Timeout:
                    outcomes["timeout"] += 1
                    return
                assert reply == str(i).encode()  # its own reply, never a neighbour's
                outcomes["ok"] += 1
            if scope.cancelled_caught:
                outcomes["cancelled"] += 1

        async with anyio.create_task_group() as tg:
            for i in range(300):
                limit = rng.choice((0.01, 0.05, 5.0))
                cancel_after = rng.choice((None, None, 0.02))
                tg.start_soon(call, i, limit, cancel_after)
                if i % 10 == 0:
                    await anyio.sleep(0.001)
        assert sum(outcomes.values()) == 300
        assert outcomes["ok"] and outcomes["timeout"] and outcomes["cancelled"]
        # the connection is still in step: every owed reply was consumed or discarded
        assert await conn.command(Command.HYPER, echo("last"), timeout=5) == b'"last"'
        stats = conn.statistics()
        assert stats.in_flight == 0 and stats.timed_out == outcomes["timeout"]
        # a cancellation can land just after its reply was delivered: then nothing is discarded
        assert outcomes["timeout"] <= stats.discarded <= outcomes["timeout"] + outcomes["cancelled"]


async def test_deadline_bookkeeping_stays_bounded(anyio_backend: Any, short_tmp: Path) -> None:
    async with serving(short_tmp) as proxy, connected(proxy) as conn:
        for i in range(500):
            assert await conn.command(Command.HYPER, echo(i), timeout=30) == str(i).encode()
        # answered commands with far deadlines do not pile up in the deadline heap
        assert len(conn._deadlines) <= 2 * conn.owed + 64 + 1


async def test_large_frames_interleaved_with_small_ones(
    anyio_backend: Any, short_tmp: Path
) -> None:
    async with serving(short_tmp) as proxy, connected(proxy) as conn:
        big = "x" * (2 * 1024 * 1024)  # far beyond a socket buffer: written in many pieces
        got: dict[int, bytes] = {}

        async def call(i: int, value: object) -> None:
            got[i] = await conn.command(Command.HYPER, echo(value), timeout=20)

        async with anyio.create_task_group() as tg:
            tg.start_soon(call, 0, big)
            tg.start_soon(call, 1, "small")
            tg.start_soon(call, 2, [big])
            tg.start_soon(call, 3, 3)
        assert got == {
            0: msgspec.json.encode(big),
            1: b'"small"',
            2: msgspec.json.encode([big]),
            3: b"3",
        }


async def test_callers_woken_by_one_read_send_their_next_frames_in_one_write(
    anyio_backend: Any, short_tmp: Path
) -> None:
    """Ten replies arrive in one write; the ten follow-up commands go out in one write too."""
    path = str(short_tmp / "batch.sock")
    callers = 10
    follow_up_chunks: list[int] = []

    async def peer(stream: anyio.abc.SocketStream) -> None:
        async with stream:
            await answer(stream)

    async def answer(stream: anyio.abc.SocketStream) -> None:
        server = ServerConnection()
        for round_ in range(2):
            got: list[Command] = []
            while len(got) < callers:
                server.receive_data(await stream.receive())
                if round_ == 1:
                    follow_up_chunks.append(len(got))
                while (event := server.next_event()) is not NEED_DATA:
                    assert isinstance(event, CommandReceived)
                    got.append(event.command)
            await stream.send(b"".join(server.send_response(c, b"ok") for c in got))

    async with await anyio.create_unix_listener(path) as listener, anyio.create_task_group() as tg:
        tg.start_soon(partial(listener.serve, peer, task_group=tg))
        conn = await VMConnection.connect(path, vm_id=VM)
        tg.start_soon(conn.run)
        transport = conn._transport
        assert transport is not None
        write = transport.write
        writes: list[int] = []

        class CountingTransport:
            def write(self, data: bytes) -> None:
                writes.append(len(data))
                write(data)

            def __getattr__(self, name: str) -> Any:
                return getattr(transport, name)

        conn._transport = CountingTransport()  # type: ignore[assignment]

        async def caller() -> None:
            for _ in range(2):
                assert await conn.command(Command.HYPER, Hyper("ping"), timeout=5) == b"ok"

        async with anyio.create_task_group() as callers_tg:
            for _ in range(callers):
                callers_tg.start_soon(caller)
        conn.close("test done")
        tg.cancel_scope.cancel()
    # the first command on the idle connection at once, the nine queued behind it together,
    # then the ten follow-ups (their callers woken by one read) together
    assert len(writes) == 3
    assert follow_up_chunks == [0]  # the peer read the follow-ups in one piece
