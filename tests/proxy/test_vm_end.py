"""The end of a VM as the proxy sees it: both agent channels close right after the agent's
last answer, and the sockets are read in whatever order the event loop picks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from hyperd.proxy import texts
from hyperd.proxy.vm import AgentVM
from protocol.hyperstart import CC, Code, encode_ctl

pytestmark = pytest.mark.anyio

DEADLINE = 10.0


async def test_answer_read_in_the_same_round_as_the_end_of_the_other_channel(
    anyio_backend: object, short_tmp: Path
) -> None:
    """DESTROYPOD is ACKed, then the VM powers off: when the loop happens to see the tty
    channel's end before it reads the ACK from ctl, the command still gets its ACK (before,
    it was answered "No multicast available for CTL channel"); the VM is lost right after."""
    ctl_path, tty_path = str(short_tmp / "ctl"), str(short_tmp / "tty")
    lost: list[AgentVM] = []
    vm = AgentVM("vm", dialect=CC, agent_timeout=DEADLINE, on_lost=lost.append)
    async with (
        await anyio.create_unix_listener(ctl_path) as ctl_listener,
        await anyio.create_unix_listener(tty_path) as tty_listener,
    ):
        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tg:
                tg.start_soon(vm.connect, ctl_path, tty_path, DEADLINE)
                ctl = await ctl_listener.accept()
                tty = await tty_listener.accept()
                await ctl.send(encode_ctl(Code.READY))
            loop = asyncio.get_running_loop()
            call = loop.create_task(vm.commands.call("destroypod", Code.DESTROYPOD, b""))
            received = b""
            while len(received) < 8:  # the command reached the agent: it is in flight
                received += await ctl.receive()
            assert int.from_bytes(received[:4], "big") == Code.DESTROYPOD
            # one round of the loop: the tty channel's end first, then the ACK on ctl
            assert vm._tty_channel is not None and vm._ctl_channel is not None
            vm._tty_channel.eof_received()
            vm._ctl_channel.data_received(encode_ctl(Code.ACK))
            reply = await call
            assert reply.ok and reply.command == Code.DESTROYPOD
            await anyio.lowlevel.checkpoint()  # (the end is acted on after this round)
            assert vm.lost and lost == [vm]
            # a command after the end gets the reference's text
            with pytest.raises(texts.CommandError, match=texts.NO_CTL_CHANNEL):
                await vm.commands.call("ping", Code.PING, b"")
        await ctl.aclose()
        await tty.aclose()
