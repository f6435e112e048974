"""containerd's stdio FIFOs, opened and used without ever blocking the event loop.

- stdout/stderr are opened ``O_RDWR | O_NONBLOCK`` (never blocks on a FIFO, and output can be
  written before the client has attached: 64 KiB of pipe buffer, then the writer waits for room).
- stdin is opened ``O_RDONLY | O_NONBLOCK`` at Create, before containerd's client can have opened
  its writer (its blocking open waits for a reader), so Linux reports end of file only once that
  writer has come and gone. Reads wait for readability first: a read right after the open would
  return 0 before any writer connected.

Paths are ``""`` (no such stream) or a FIFO path; ``file://`` and ``binary://`` log URIs are
refused with a clear error.
"""

from __future__ import annotations

import contextlib
import os
from typing import Final

import anyio

STDIN_CHUNK: Final = 32768  # bytes per stdin frame to the proxy


class StdioError(Exception):
    """A stdio path the shim cannot use."""


def _open(path: str, flags: int) -> int | None:
    """Open the FIFO ``path`` without blocking (``None`` for ``""``: no such stream)."""
    if not path:
        return None
    if "://" in path:
        raise StdioError(f"unsupported stdio URI {path!r}: only FIFO paths are supported")
    try:
        return os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise StdioError(f"cannot open {path}: {exc.strerror}") from None


class Output:
    """One of the process's output FIFOs (or nothing, for ``""``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = _open(path, os.O_RDWR)

    async def write(self, data: bytes) -> None:
        """Write all of ``data``, waiting for room in the pipe (no-op without a FIFO)."""
        fd = self.fd
        view = memoryview(data)
        while view and fd is not None:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                try:
                    await anyio.wait_writable(fd)
                except anyio.ClosedResourceError:
                    return
            except OSError:
                return  # the reader is gone for good (EPIPE): drop the output
            fd = self.fd

    def close(self) -> None:
        """Close our end: the reader sees EOF once every writer is gone."""
        fd, self.fd = self.fd, None
        if fd is not None:
            anyio.notify_closing(fd)
            with contextlib.suppress(OSError):
                os.close(fd)


class Input:
    """The process's stdin FIFO, read on the event loop."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = _open(path, os.O_RDONLY)

    async def read(self) -> bytes:
        """The next chunk; ``b""`` at end of file, without a FIFO, or once closed."""
        while (fd := self.fd) is not None:
            try:
                await anyio.wait_readable(fd)
            except anyio.ClosedResourceError:
                break  # close() ran while we waited
            try:
                return os.read(fd, STDIN_CHUNK)
            except BlockingIOError:
                continue
            except OSError:
                break
        return b""

    def read_available(self) -> list[bytes]:
        """What can be read now without waiting (CloseIO forwards it before stdin's EOF)."""
        chunks = []
        while self.fd is not None:
            try:
                data = os.read(self.fd, STDIN_CHUNK)
            except (BlockingIOError, OSError):
                break
            if not data:
                break
            chunks.append(data)
        return chunks

    def close(self) -> None:
        """Close the FIFO; a :meth:`read` waiting on it returns ``b""``."""
        fd, self.fd = self.fd, None
        if fd is not None:
            anyio.notify_closing(fd)
            with contextlib.suppress(OSError):
                os.close(fd)
