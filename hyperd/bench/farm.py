"""Many lightweight agent endpoints in one process, for the 1000-VM scale scenario.

    python -m hyperd.bench.farm --dir DIR --count N [--ready-fd FD]

For each ``i`` in ``0..N-1`` it listens on ``DIR/v<i>.ctl`` and ``DIR/v<i>.tty`` as a VM's two
virtio-serial ports would, sends READY once both have a host connection, and answers every ctl
command in order as a CC-dialect agent that does nothing: ACK with an empty payload, ERROR for
GETVERSION (cc-agent does not implement it). tty bytes are read and dropped. One asyncio
protocol object per connection, no task per VM: a thousand VMs cost a few MB.

A real hyperd-sim is one Python process per VM (~25 MB RSS each, ~0.2 s of CPU to start); a
thousand of them would not fit the 2-core budget of the benchmark, so the scale scenario uses
this farm above a threshold and says so in its output. ``ready\\n`` is written to FD once every
socket listens; SIGTERM/SIGINT end it (sockets removed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import signal
import sys
from collections.abc import Sequence
from typing import Final, cast

from protocol import ProtocolError
from protocol.hyperstart import CC, AgentCtlConnection, Code, CtlFrame

LISTEN_BACKLOG: Final = 16
NOT_IMPLEMENTED: Final = b"command not implemented"


def socket_paths(directory: str, index: int) -> tuple[str, str]:
    """The ctl and tty socket paths of VM ``index``."""
    return os.path.join(directory, f"v{index}.ctl"), os.path.join(directory, f"v{index}.tty")


class _VM:
    """One simulated VM's state: which ports have a host, whether READY went out."""

    __slots__ = ("ctl", "ready_sent", "tty_connected")

    def __init__(self) -> None:
        self.ctl: _Ctl | None = None
        self.tty_connected = False
        self.ready_sent = False

    def maybe_ready(self) -> None:
        if self.ctl is not None and self.tty_connected and not self.ready_sent:
            self.ready_sent = True
            self.ctl.send_ready()


class _Ctl(asyncio.Protocol):
    def __init__(self, vm: _VM) -> None:
        self._vm = vm
        self._conn = AgentCtlConnection(CC)
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport instances: no isinstance check here
        transport = cast(asyncio.Transport, transport)
        if self._vm.ctl is not None and self._vm.ctl._transport is not None:
            self._vm.ctl._transport.close()  # a newer host connection replaces the older one
        self._transport = transport
        self._vm.ctl = self
        self._vm.maybe_ready()

    def send_ready(self) -> None:
        if self._transport is not None:
            self._transport.write(self._conn.send_ready())

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        self._conn.receive_data(data)
        out = []
        try:
            while isinstance(frame := self._conn.next_event(), CtlFrame):
                if frame.code == Code.VERSION:
                    out.append(self._conn.send_error(NOT_IMPLEMENTED))
                else:
                    out.append(self._conn.send_ack())
        except ProtocolError:
            self._transport.close()
            return
        if out:
            self._transport.write(b"".join(out))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._vm.ctl is self:
            self._vm.ctl = None
        self._transport = None


class _Tty(asyncio.Protocol):
    def __init__(self, vm: _VM) -> None:
        self._vm = vm

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._vm.tty_connected = True
        self._vm.maybe_ready()

    def data_received(self, data: bytes) -> None:
        pass  # stdin for processes that do not exist

    def connection_lost(self, exc: Exception | None) -> None:
        self._vm.tty_connected = False


async def serve(directory: str, count: int, ready_fd: int | None) -> None:
    loop = asyncio.get_running_loop()
    servers: list[asyncio.Server] = []
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        for i in range(count):
            vm = _VM()
            ctl, tty = socket_paths(directory, i)
            ctl_factory = functools.partial(_Ctl, vm)
            tty_factory = functools.partial(_Tty, vm)
            servers.append(await loop.create_unix_server(ctl_factory, ctl, backlog=LISTEN_BACKLOG))
            servers.append(await loop.create_unix_server(tty_factory, tty, backlog=LISTEN_BACKLOG))
        if ready_fd is not None:
            os.write(ready_fd, b"ready\n")
            os.close(ready_fd)
        await stop.wait()
    finally:
        for server in servers:
            server.close()
        for i in range(count):
            for path in socket_paths(directory, i):
                with contextlib.suppress(OSError):
                    os.unlink(path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hyperd.bench.farm", description=__doc__)
    p.add_argument("--dir", required=True, help="directory for the sockets")
    p.add_argument("--count", type=int, required=True, help="number of VMs")
    p.add_argument("--ready-fd", type=int, help="write 'ready\\n' here once listening")
    args = p.parse_args(argv)
    import uvloop

    uvloop.run(serve(args.dir, args.count, args.ready_fd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
