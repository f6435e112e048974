"""The guest side of the two virtio-serial ports, driven as asyncio transports.

A port is a character device (``/dev/virtio-ports/<name>``) that stays open for the guest's
whole life while the host side connects and disconnects (QEMU's chardev socket: a host program
connecting, going away, reconnecting). :class:`VirtioPort` turns each host connection into one
``connection_made`` … ``connection_lost`` of a fresh protocol from its factory, so the agent's
:class:`~hyperd.sim.links.Link` protocols serve a port exactly as they serve a unix socket.

What the virtio_console driver does, and how it is handled:

- With no host connected, ``poll`` reports POLLHUP continuously, ``read`` returns 0 and ``write``
  would block. Watching the fd then would spin, so the port stops watching it and waits for
  SIGIO, which the driver sends (``O_ASYNC``) when the host connects or disconnects (and when
  data arrives); each SIGIO re-checks the state with a zero-timeout ``poll``.
- Reads and writes are non-blocking; a partial write keeps the rest buffered and waits for
  POLLOUT. Above :data:`HIGH_WATER` buffered bytes the protocol's writing is paused.
- Output for a host that went away is dropped, as QEMU drops what arrives with nobody connected.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import select
from collections.abc import Callable
from typing import Any, cast

__all__ = ["HIGH_WATER", "VirtioPort"]

log = logging.getLogger(__name__)

READ_SIZE = 65536  # bytes per read: the driver hands out at most one buffer per read anyway
HIGH_WATER = 256 * 1024  # buffered output above which the protocol is asked to pause writing
LOW_WATER = 64 * 1024  # ... and below which it may write again


def host_connected(fd: int) -> bool:
    """Whether the host side of the port is connected now (no POLLHUP)."""
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLOUT)
    return not any(mask & select.POLLHUP for _, mask in p.poll(0))


class _PortTransport(asyncio.Transport):
    """One host connection of a port, as the transport its protocol sees."""

    def __init__(self, port: VirtioPort, protocol: asyncio.Protocol) -> None:
        super().__init__()
        self._port = port
        self._protocol = protocol
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self.closing:
            self._port._write(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        # a ctl framing fault: the port cannot hang up on the host, so it ignores the host
        # until it reconnects; what is buffered still goes out
        self._port._end(self, flush=True)

    def abort(self) -> None:
        self._port._end(self, flush=False)

    def pause_reading(self) -> None:
        self._port._set_reading(self, False)

    def resume_reading(self) -> None:
        self._port._set_reading(self, True)

    def is_reading(self) -> bool:
        return self._port._reading

    def get_write_buffer_size(self) -> int:
        return len(self._port._out)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._port.path if name == "peername" else default

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = cast(asyncio.Protocol, protocol)


class VirtioPort:
    """One virtio-serial port; ``factory()`` makes the protocol of each host connection.

    :meth:`open` opens the device and serves it on the running loop until :meth:`close`.
    ``close()`` and ``await wait_closed()`` mirror ``asyncio.Server`` for the simulator.
    """

    def __init__(self, path: str, factory: Callable[[], asyncio.Protocol]) -> None:
        self.path = path
        self._factory = factory
        self._loop = asyncio.get_running_loop()
        self._fd = -1
        self._transport: _PortTransport | None = None
        self._out = bytearray()
        self._reading = False
        self._writing = False
        self._paused = False  # the protocol was told to pause writing
        self._ignore_host = False  # closed by the protocol: wait for the host to reconnect
        self._closed = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()

    def open(self) -> None:
        """Open the device (``OSError`` if it is not there) and start serving it."""
        self._fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        fcntl.fcntl(self._fd, fcntl.F_SETOWN, os.getpid())
        flags = fcntl.fcntl(self._fd, fcntl.F_GETFL)
        fcntl.fcntl(self._fd, fcntl.F_SETFL, flags | os.O_ASYNC)
        self.check()

    def check(self) -> None:
        """Follow the host: start a connection when it connected, end it when it went away.

        Called on open and on every SIGIO.
        """
        if self._fd < 0:
            return
        connected = host_connected(self._fd)
        if not connected:
            self._ignore_host = False
            if self._transport is not None:
                self._end(self._transport, flush=False)
            return
        if self._transport is None and not self._ignore_host:
            protocol = self._factory()
            transport = self._transport = _PortTransport(self, protocol)
            log.debug("%s: host connected", self.path)
            protocol.connection_made(transport)
            if self._transport is transport and not self._reading:
                self._set_reading(transport, True)
        elif self._transport is not None and self._out and not self._writing:
            self._on_writable()

    def close(self) -> None:
        """End the current connection and close the device."""
        if self._transport is not None:
            self._end(self._transport, flush=False)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._closed.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # -- transport side ----------------------------------------------------------------------

    def _set_reading(self, transport: _PortTransport, on: bool) -> None:
        if transport is not self._transport or on == self._reading or self._fd < 0:
            return
        self._reading = on
        if on:
            self._loop.add_reader(self._fd, self._on_readable)
        else:
            self._loop.remove_reader(self._fd)

    def _on_readable(self) -> None:
        transport = self._transport
        try:
            data = os.read(self._fd, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning("%s: read failed: %s", self.path, exc)
            data = b""
        if transport is None:
            return
        if not data:  # the host went away (read returns 0 while it is not connected)
            self._end(transport, flush=False)
            return
        transport._protocol.data_received(data)

    def _write(self, data: bytes) -> None:
        if not self._out:
            try:
                written = os.write(self._fd, data)
            except BlockingIOError:
                written = 0
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.ENODEV):
                    log.warning("%s: write failed: %s", self.path, exc)
                return  # the host is gone: dropped, as QEMU drops it
            data = data[written:]
            if not data:
                return
        self._out += data
        self._drained.clear()
        if not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, self._on_writable)
        if not self._paused and len(self._out) > HIGH_WATER and self._transport is not None:
            self._paused = True
            self._transport._protocol.pause_writing()

    def _on_writable(self) -> None:
        try:
            written = os.write(self._fd, self._out)
        except BlockingIOError:
            written = 0
        except OSError:
            written = -1
        if written < 0 or (written == 0 and not host_connected(self._fd)):
            # POLLHUP woke us: the host went away; what it did not read is dropped
            if self._transport is not None:
                self._end(self._transport, flush=False)
            else:
                self._stop_writing()
            return
        del self._out[:written]
        if not self._out:
            self._stop_writing()
        if self._paused and len(self._out) <= LOW_WATER and self._transport is not None:
            self._paused = False
            self._transport._protocol.resume_writing()

    def _stop_writing(self) -> None:
        self._drained.set()
        if self._writing:
            self._writing = False
            if self._fd >= 0:
                self._loop.remove_writer(self._fd)

    def _end(self, transport: _PortTransport, *, flush: bool) -> None:
        """End ``transport``'s connection: stop reading, drop (or keep flushing) output."""
        if transport is not self._transport:
            return
        self._set_reading(transport, False)
        transport.closing = True
        self._transport = None
        if flush and self._out:
            self._ignore_host = True
        else:
            self._out.clear()
            self._stop_writing()
            self._ignore_host = flush  # closed by the protocol: ignore until a reconnect
        self._paused = False
        log.debug("%s: connection ended", self.path)
        self._loop.call_soon(transport._protocol.connection_lost, None)

    async def wait_flushed(self) -> None:
        """Return once every byte written so far went to the host (or was dropped)."""
        await self._drained.wait()
