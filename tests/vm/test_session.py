"""VMSession against a real peer on a unix socket: registration, liveness, reconnection."""

from __future__ import annotations

from pathlib import Path
from time import monotonic
from typing import Any

import anyio
import msgspec
import pytest

from hyperd.errors import ConnectionLost, InvalidParams, ProxyError, Timeout, VMUnavailable
from hyperd.vm import VMConfig, VMSession
from protocol.ccproxy import Command, Hyper, RegisterVM, decode_payload, encode_payload
from tests.vm.fakeproxy import AGENT_ERROR, FakeProxy
from tests.vm.helpers import VM, EventLog, serving

pytestmark = pytest.mark.anyio

FAST = VMConfig(
    command_timeout=5.0,
    connect_timeout=1.0,
    ping_interval=0.1,
    ping_timeout=0.2,
    reconnect_backoff_max=0.1,
    ready_timeout=5.0,
)
SLACK = 5.0
"""Scheduling allowance on top of a liveness deadline: generous, a busy CI machine can hold a
process off the CPU for seconds; still far below the 30 s a command would wait without liveness."""
FAIL_FAST = 10.0
"""A call to an unreachable VM fails at once, not after its 30 s deadline; 10 s leaves room for
a busy machine."""
QUIET = VMConfig(ping_interval=60.0)
"""No liveness ping during a short test, so the proxy sees only the test's commands."""


def session(proxy: FakeProxy, events: EventLog | None = None, **kwargs: Any) -> VMSession:
    kwargs.setdefault("ctl", "/run/vm/ctl.sock")
    kwargs.setdefault("tty", "/run/vm/tty.sock")
    kwargs.setdefault("config", FAST)
    return VMSession(VM, proxy.url, on_event=events, **kwargs)


class Point(msgspec.Struct):
    x: int
    y: int


async def test_register_then_commands(anyio_backend: Any, short_tmp: Path) -> None:
    async with serving(short_tmp) as proxy, anyio.create_task_group() as tg:
        s = session(proxy, console="/run/vm/console.sock", config=QUIET)
        await tg.start(s.run)
        assert s.reachable
        assert proxy.names() == ["REGISTER_VM"]
        reg = decode_payload(RegisterVM, proxy.received[0].payload)
        assert reg == RegisterVM(VM, "/run/vm/ctl.sock", "/run/vm/tty.sock", "/run/vm/console.sock")
        assert s.proxy_url == proxy.url
        assert await s.hyper("echo", {"a": [1, 2]}) == b'{"a":[1,2]}'
        assert await s.hyper("echo", b'{ "raw" : true }') == b'{ "raw" : true }'
        assert await s.hyper("echo", Point(1, 2)) == b'{"x":1,"y":2}'
        assert await s.hyper("echo") == b""
        assert await s.hyper("ping") == b""
        stats = s.statistics()
        assert stats.reachable and stats.sent == 6 and stats.failed == 0
        assert (stats.queued, stats.in_flight, stats.reconnects) == (0, 0, 0)
        await s.close()
        assert not s.statistics().reachable
        with pytest.raises(VMUnavailable, match="session closed"):
            await s.hyper("ping")


async def test_already_registered_falls_back_to_attach(anyio_backend: Any, short_tmp: Path) -> None:
    async with serving(short_tmp) as proxy, anyio.create_task_group() as tg:
        proxy.registered.add(VM)
        s = session(proxy)
        await tg.start(s.run)
        assert proxy.names()[:3] == ["REGISTER_VM", "ATTACH_VM", "ping"]
        await s.close()


async def test_attach_mode_and_reregistration(anyio_backend: Any, short_tmp: Path) -> None:
    async with serving(short_tmp) as proxy, anyio.create_task_group() as tg:
        proxy.registered.add(VM)
        s = session(proxy, register=False, config=QUIET)
        await tg.start(s.run)
        assert proxy.names() == ["ATTACH_VM", "ping"]
        await s.close()
        # A proxy that forgot the VM (restarted): attach falls back to RegisterVM.
        proxy.registered.clear()
        proxy.received.clear()
        s2 = session(proxy, register=False, config=QUIET)
        await tg.start(s2.run)
        assert proxy.names() == ["ATTACH_VM", "REGISTER_VM"]
        await s2.close()


async def test_attach_to_unknown_vm_fails_start(anyio_backend: Any, short_tmp: Path) -> None:
    async with serving(short_tmp) as proxy, anyio.create_task_group() as tg:
        s = VMSession(VM, proxy.url, register=False, config=FAST)
        with pytest.raises(VMUnavailable, match="unknown containerID"):
            await tg.start(s.run)
        assert not s.reachable


async def test_no_proxy_fails_start_after_connect_timeout(
    anyio_backend: Any, short_tmp: Path
) -> None:
    cfg = VMConfig(connect_timeout=0.3)
    s = VMSession(VM, f"unix://{short_tmp}/none.sock", ctl="/c", tty="/t", config=cfg)
    started = monotonic()
    async with anyio.create_task_group() as tg:
        with pytest.raises(VMUnavailable, match="cannot connect to proxy"):
            await tg.start(s.run)
    assert 0.3 <= monotonic() - started < 0.3 + SLACK


async def test_connect_retries_until_the_proxy_listens(anyio_backend: Any, short_tmp: Path) -> None:
    proxy = FakeProxy(str(short_tmp / "p.sock"))
    s = session(proxy)
    async with anyio.create_task_group() as tg:

        async def late_proxy() -> None:
            await anyio.sleep(0.2)
            await tg.start(proxy.serve)

        tg.start_soon(late_proxy)
        await tg.start(s.run)
        assert s.reachable and proxy.names()[0] == "REGISTER_VM"
        await s.close()
        tg.cancel_scope.cancel()


async def test_close_before_registration_completes(anyio_backend: Any, short_tmp: Path) -> None:
    async with serving(short_tmp) as proxy, anyio.create_task_group() as tg:
        proxy.hold()  # RegisterVM waits for READY
        s = session(proxy)

        async def closer() -> None:
            await proxy.wait_for(lambda: len(proxy.received) == 1)
            await s.close()

        tg.start_soon(closer)
        with pytest.raises(VMUnavailable):
            await tg.start(s.run)
        proxy.release()


async def test_idle_connection_is_pinged(anyio_backend: Any, short_tmp: Path) -> None:
    async with serving(short_tmp) as proxy, anyio.create_task_group() as tg:
        s = session(proxy)
        await tg.start(s.run)
        await proxy.wait_for(lambda: proxy.names().count("ping") >= 3, within=2)
        assert s.reachable and s.statistics().last_rtt is not None
        await s.close()


async def test_connection_loss_then_reconnect_and_attach(
    anyio_backend: Any, short_tmp: Path
) -> None:
    events = EventLog()
    async with serving(short_tmp) as proxy, anyio.create_task_group() as tg:
        s = session(proxy, events, config=QUIET)
        await tg.start(s.run)
        proxy.hold()
        errors: list[Exception] = []

        async def call() -> None:
            try:
                await s.hyper("echo", 1)
            except VMUnavailable as exc:
                errors.append(exc)

        async with anyio.create_task_group() as callers:
            for _ in range(3):
                callers.start_soon(call)
            await proxy.wait_for(lambda: len(proxy.received) == 4)
            await proxy.drop_connections()
        assert len(errors) == 3 and all(isinstance(e, ConnectionLost) for e in errors)
        assert "connection to proxy lost" in str(errors[0])
        assert "outcome of echo unknown" in str(errors[0])
        assert "vm-test" in str(errors[0])
        proxy.release()
        await events.wait("reachable")
        assert events.kinds() == ["unreachable", "reconnected", "reachable"]
        second = [r.command for r in proxy.received if r.connection == 2]
        assert second[:2] == [Command.ATTACH_VM, Command.HYPER]
        assert await s.hyper("echo", 2) == b"2"
        stats = s.statistics()
        assert stats.reconnects == 1 and stats.reachable and stats.failed == 3
        await s.close()


async def test_silent_proxy_is_unreachable_within_the_liveness_deadline(
    anyio_backend: Any, short_tmp: Path
) -> None:
    events = EventLog()
    async with serving(short_tmp) as proxy, anyio.create_task_group() as tg:
        s = session(proxy, events)
        await tg.start(s.run)
        proxy.go_silent()
        silent_at = monotonic()
        await events.wait("unreachable", within=FAST.ping_interval + FAST.ping_timeout + SLACK)
        assert monotonic() - silent_at <= FAST.ping_interval + FAST.ping_timeout + SLACK
        assert "ping" in events.events[0].reason
        assert not s.reachable
        with anyio.fail_after(FAIL_FAST), pytest.raises(VMUnavailable, match="unreachable"):
            await s.hyper("echo", 1)
        proxy.wake()
        await events.wait("reachable")
        assert await s.hyper("echo", 3) == b"3"
        await s.close()


async def test_stalled_command_makes_the_vm_unreachable(
    anyio_backend: Any, short_tmp: Path
) -> None:
    events = EventLog()
    async with serving(short_tmp) as proxy, anyio.create_task_group() as tg:
        s = session(proxy, events, config=VMConfig(ping_interval=60.0, ping_timeout=0.2))
        await tg.start(s.run)
        proxy.go_silent()
        sent_at = monotonic()
        with pytest.raises(Timeout):
            await s.hyper("echo", 1, timeout=0.1)
        await events.wait("unreachable", within=0.1 + 0.2 + SLACK)
        assert monotonic() - sent_at <= 0.1 + 0.2 + SLACK
        assert "past its deadline" in events.events[0].reason
        proxy.wake()
        await s.close()


async def test_mark_unreachable(anyio_backend: Any, short_tmp: Path) -> None:
    events = EventLog()
    async with serving(short_tmp) as proxy, anyio.create_task_group() as tg:
        s = session(proxy, events, config=QUIET)
        await tg.start(s.run)
        proxy.hold()
        errors: list[Exception] = []

        async def call() -> None:
            try:
                await s.hyper("echo", 1)
            except VMUnavailable as exc:
                errors.append(exc)

        async with anyio.create_task_group() as callers:
            callers.start_soon(call)
            await proxy.wait_for(lambda: len(proxy.received) == 2)
            s.mark_unreachable("qemu exited")
            # new commands fail at once, before any reconnect can happen
            with pytest.raises(VMUnavailable, match="qemu exited"):
                await s.hyper("echo", 2)
        assert len(errors) == 1 and isinstance(errors[0], ConnectionLost)
        assert "qemu exited" in str(errors[0])
        assert events.events[0].kind == "unreachable" and events.events[0].reason == "qemu exited"
        proxy.release()
        await events.wait("reachable")
        assert s.reachable
        await s.close()


async def test_new_tokens(anyio_backend: Any, short_tmp: Path) -> None:
    async with serving(short_tmp) as proxy, anyio.create_task_group() as tg:
        s = session(proxy)
        await tg.start(s.run)
        tokens = await s.new_tokens(3)
        assert len(tokens) == 3 and len(set(tokens)) == 3
        assert all(len(t) == 44 and t.endswith("=") for t in tokens)
        assert await s.new_tokens() != tokens[:1]
        assert s.proxy_url == proxy.url
        await s.close()


async def test_unregister(anyio_backend: Any, short_tmp: Path) -> None:
    async with serving(short_tmp) as proxy, anyio.create_task_group() as tg:
        s = session(proxy)
        await tg.start(s.run)
        await s.unregister()
        assert VM not in proxy.registered
        assert not s.reachable
        with pytest.raises(VMUnavailable, match="session closed"):
            await s.hyper("ping")


async def test_dead_vm_unreachable_then_unregister(anyio_backend: Any, short_tmp: Path) -> None:
    events = EventLog()
    async with serving(short_tmp) as proxy, anyio.create_task_group() as tg:
        s = session(proxy, events)
        await tg.start(s.run)
        proxy.ping_error = "No multicast available for CTL channel"
        await events.wait("unreachable", within=FAST.ping_interval + SLACK)
        assert "No multicast" in events.events[0].reason
        with pytest.raises(VMUnavailable):
            await s.hyper("ping")
        # reconnect attempts keep failing on the ping; unregister still reaches the proxy
        await proxy.wait_for(lambda: proxy.accepted >= 3)
        await s.unregister()
        assert VM not in proxy.registered
        assert "reachable" not in events.kinds()


async def test_unregister_unknown_vm_is_done(anyio_backend: Any, short_tmp: Path) -> None:
    async with serving(short_tmp) as proxy, anyio.create_task_group() as tg:
        s = session(proxy)
        await tg.start(s.run)
        proxy.registered.clear()
        await s.unregister()


async def test_proxy_error_on_tokens(anyio_backend: Any, short_tmp: Path) -> None:
    async with serving(short_tmp) as proxy, anyio.create_task_group() as tg:
        s = session(proxy, config=QUIET)
        await tg.start(s.run)
        proxy.registered.clear()
        with pytest.raises(ProxyError, match="unknown containerID"):
            await s.new_tokens(1)
        assert s.reachable  # a proxy error is an answer: the VM stays reachable
        await s.close()


async def test_liveness_resumes_after_a_busy_period(anyio_backend: Any, short_tmp: Path) -> None:
    events = EventLog()
    async with serving(short_tmp) as proxy, anyio.create_task_group() as tg:
        s = session(proxy, events)
        await tg.start(s.run)
        # A command with a long deadline is in flight when liveness first looks ...
        assert await s.hyper("echo", 1, timeout=30) == b"1"
        # ... the VM then dies: detection must not wait for that long deadline.
        proxy.ping_error = "No multicast available for CTL channel"
        dead_at = monotonic()
        await events.wait("unreachable", within=2 * FAST.ping_interval + SLACK)
        assert monotonic() - dead_at <= 2 * FAST.ping_interval + SLACK
        await s.close()


async def test_vm_gone_answer_fails_callers_then_liveness_marks_unreachable(
    anyio_backend: Any, short_tmp: Path
) -> None:
    events = EventLog()
    async with serving(short_tmp) as proxy, anyio.create_task_group() as tg:
        s = session(proxy, events)
        await tg.start(s.run)
        proxy.ping_error = "No multicast available for CTL channel"
        with pytest.raises(VMUnavailable, match="the VM is gone") as gone:
            await s.hyper("echo", 1)
        assert not isinstance(gone.value, ConnectionLost)
        assert gone.value.data["proxy_message"] == proxy.ping_error
        await events.wait("unreachable", within=FAST.ping_interval + SLACK)
        assert not s.reachable
        with pytest.raises(VMUnavailable, match="unreachable"):
            await s.hyper("echo", 2)
        proxy.ping_error = None
        await events.wait("reachable")
        assert await s.hyper("echo", 3) == b"3"
        await s.close()


async def test_agent_error_to_ping_keeps_the_vm_reachable(
    anyio_backend: Any, short_tmp: Path
) -> None:
    events = EventLog()
    async with serving(short_tmp) as proxy, anyio.create_task_group() as tg:
        s = session(proxy, events)
        await tg.start(s.run)
        proxy.ping_error = AGENT_ERROR  # the agent answers, if with ERROR: it is alive
        await proxy.wait_for(lambda: proxy.names().count("ping") >= 3, within=2)
        assert s.reachable and events.kinds() == []
        await s.close()


async def test_reconnects_when_the_proxy_comes_back(anyio_backend: Any, short_tmp: Path) -> None:
    events = EventLog()
    cfg = VMConfig(ping_interval=60.0, reconnect_backoff_max=0.2, ping_timeout=0.5)
    async with anyio.create_task_group() as tg:
        async with serving(short_tmp) as proxy:
            s = session(proxy, events, config=cfg)
            await tg.start(s.run)
            await proxy.drop_connections()
        # the proxy is gone: reconnect attempts fail (refused / no socket), capped backoff
        await events.wait("unreachable")
        await anyio.sleep(1.0)
        with pytest.raises(VMUnavailable, match="unreachable"):
            await s.hyper("ping")
        async with serving(short_tmp) as proxy2:  # a restarted proxy that forgot the VM
            back = monotonic()
            await events.wait("reachable", within=cfg.reconnect_backoff_max + SLACK)
            assert monotonic() - back <= cfg.reconnect_backoff_max + SLACK
            assert proxy2.names()[:2] == ["ATTACH_VM", "REGISTER_VM"]  # READY proved the VM
            assert events.kinds() == ["unreachable", "reconnected", "reachable"]
            assert s.statistics().reconnects == 1
            assert await s.hyper("echo", 5) == b"5"
            await s.close()


async def test_unregister_without_running_the_session(anyio_backend: Any, short_tmp: Path) -> None:
    async with serving(short_tmp) as proxy:
        proxy.registered.add(VM)
        s = VMSession(VM, proxy.url, register=False, config=FAST)
        await s.unregister()  # e.g. deleting a pod whose VM was never re-adopted
        assert VM not in proxy.registered
        assert proxy.names() == ["UNREGISTER_VM"]
        with pytest.raises(RuntimeError):
            await s.run()  # a closed session does not start again


async def test_unregister_without_proxy_fails_clearly(anyio_backend: Any, short_tmp: Path) -> None:
    s = VMSession(VM, f"unix://{short_tmp}/none.sock", register=False, config=FAST)
    with pytest.raises(VMUnavailable, match="cannot connect to proxy"):
        await s.unregister()


async def test_data_less_commands_payloads_and_timeouts(
    anyio_backend: Any, short_tmp: Path
) -> None:
    """The cached payload of a data-less command is the encoding of ``Hyper(name)``; a name
    that cannot be encoded is refused before anything is sent; deadlines and cancellation act
    on the cached path as on the general one."""
    async with serving(short_tmp, delays={"slow": 0.3}) as proxy, anyio.create_task_group() as tg:
        s = session(proxy, config=QUIET)
        await tg.start(s.run)
        for _ in range(2):  # the second call uses the cached payload
            assert await s.hyper("ping") == b""
            assert proxy.received[-1].payload == encode_payload(Hyper("ping"))
        sent = len(proxy.received)
        with pytest.raises(InvalidParams, match="cannot encode Hyper"):
            await s.hyper("bad\ud800name")
        with pytest.raises(Timeout, match=r"slow: no reply from the proxy within 0\.05s"):
            await s.hyper("slow", timeout=0.05)
        with anyio.move_on_after(0.05) as scope:
            await s.hyper("slow")
        assert scope.cancelled_caught
        assert await s.hyper("ping") == b""  # both late replies were discarded, in step
        assert proxy.names()[sent:] == ["slow", "slow", "ping"]
        stats = s.statistics()
        assert (stats.timed_out, stats.in_flight) == (1, 0)
        await s.close()


async def test_encoded_data_payloads_are_the_encoding_of_hyper(
    anyio_backend: Any, short_tmp: Path
) -> None:
    """A command with data already encoded (the daemon's) is sent as ``encode_payload`` writes
    ``Hyper(name, data=Raw(data))`` (the head from the per-name cache, the data verbatim,
    escaped names too), through ``hyper`` and its synchronous half ``send`` alike; an empty
    ``data`` is no data."""
    async with serving(short_tmp) as proxy, anyio.create_task_group() as tg:
        s = session(proxy, config=QUIET)
        await tg.start(s.run)
        cases = [
            ("echo", b'{"container":"c1","signal":18}'),
            ("echo", b'[1, "<&>"]'),
            ("e<c>h&o", b'"x"'),
        ]
        for name, data in cases:
            expected = encode_payload(Hyper(name, data=msgspec.Raw(data)))
            for call in (s.hyper, s.send):
                try:
                    assert await call(name, data) == data  # echo
                except ProxyError:
                    assert name != "echo"  # an unknown command, refused after it was read
                assert proxy.received[-1].payload == expected
        assert await s.send("echo", b"") == b""
        assert proxy.received[-1].payload == encode_payload(Hyper("echo"))
        with pytest.raises(InvalidParams, match="cannot encode Hyper"):
            s.send("bad\ud800name", b"{}")
        await s.close()
        with pytest.raises(VMUnavailable, match="session closed"):
            s.send("echo", b"{}")
