"""hyperd's agent in guest mode: the simulator's agent on the VM's virtio-serial ports.

The command handling is :class:`hyperd.sim.agent.Agent` (both dialects, real processes,
chrooted into their rootfs on the 9p share, exits reported the same way); guest mode adds what
only a VM has:

- the transport: the ports ``/dev/virtio-ports/sh.hyper.channel.0`` (ctl) and ``.1`` (tty),
  served by :class:`~hyperd.guest.ports.VirtioPort` (host connections come and go; SIGIO says
  when);
- STARTPOD applies the pod's hostname, interfaces and routes to the guest (pyroute2);
- DESTROYPOD ends the agent once its ACK went out; ``/init`` then powers the VM off.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

import anyio

from hyperd.guest.net import NetworkError, apply_network
from hyperd.guest.ports import VirtioPort
from hyperd.sim.agent import Agent
from hyperd.sim.server import SimConfig, Simulator
from protocol.hyperstart import Pod

__all__ = ["GuestAgent", "GuestSimulator"]

log = logging.getLogger(__name__)


class GuestAgent(Agent):
    """The agent with STARTPOD's network applied and DESTROYPOD ending the guest."""

    destroyed: anyio.Event | None = None  # set by GuestSimulator before commands arrive

    async def _startpod(self, payload: bytes) -> bytes:
        if self.pod is None:
            pod = self._decode(Pod, payload)
            if pod.hostname:
                try:
                    socket.sethostname(pod.hostname[:64])
                except OSError as exc:
                    self._refuse(f"cannot set hostname {pod.hostname!r}: {exc}")
            try:
                await anyio.to_thread.run_sync(apply_network, pod.interfaces, pod.routes)
            except NetworkError as exc:
                self._refuse(f"network: {exc}")
        return await super()._startpod(payload)

    async def _destroypod(self, payload: bytes) -> bytes:
        answer = await super()._destroypod(payload)
        if self.destroyed is not None:
            self.destroyed.set()
        return answer


class GuestSimulator(Simulator):
    """Serves :class:`GuestAgent` on the virtio-serial ports named by ``config.ctl``/``tty``."""

    agent_class = GuestAgent

    def __init__(self, config: SimConfig) -> None:
        super().__init__(config)
        self._ports: list[VirtioPort] = []
        self._destroyed = anyio.Event()

    async def _open_ports(
        self, loop: asyncio.AbstractEventLoop, servers: list[asyncio.AbstractServer]
    ) -> None:
        assert isinstance(self.agent, GuestAgent)
        self.agent.destroyed = self._destroyed
        ctl = VirtioPort(str(self.config.ctl), self._ctl_link)
        tty = VirtioPort(str(self.config.tty), self._tty_link)
        self._ports = [ctl, tty]
        # SIGIO: a host connected or went away (or data arrived): every port re-checks
        loop.add_signal_handler(signal.SIGIO, self._check_ports)
        for port in self._ports:
            port.open()
            servers.append(port)  # type: ignore[arg-type]  # close() + wait_closed() suffice
        self._task_group().start_soon(self._power_off_after_destroy, ctl)

    def _check_ports(self) -> None:
        for port in self._ports:
            port.check()

    async def _power_off_after_destroy(self, ctl: VirtioPort) -> None:
        await self._destroyed.wait()
        await ctl.wait_flushed()  # DESTROYPOD's ACK is out before the VM goes away
        log.info("pod destroyed: ending the agent (the guest powers off)")
        self.stop(0)
