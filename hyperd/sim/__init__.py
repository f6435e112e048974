"""hyperd-sim: a simulated VM speaking the agent side of the hyperstart protocol.

It listens on the two unix sockets where QEMU would put the ctl and tty virtio-serial chardevs
and runs each container process as a real host process (chrooted into ``<share>/<image>/<rootfs>``
when root). It is the test peer of hyperd-proxy and the daemon's default VM backend.

Run it as ``python -m hyperd.sim --ctl PATH --tty PATH --share DIR ...`` (see :mod:`.cli`), or
embed :class:`Simulator` with a :class:`SimConfig` in an anyio program.
"""

from hyperd.sim.server import CRASH_EXIT_STATUS, SimConfig, Simulator

__all__ = ["CRASH_EXIT_STATUS", "SimConfig", "Simulator"]
