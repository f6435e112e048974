"""containerd's stdio FIFOs as the shim uses them: real FIFOs, opened before the client's ends."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

from hyperd.shim.stdio import Input, Output, StdioError

pytestmark = pytest.mark.anyio

DEADLINE = 30.0  # seconds; every wait here is on an event that comes at once


def fifo(tmp: Path, name: str) -> str:
    path = str(tmp / name)
    os.mkfifo(path)
    return path


async def test_stdin_waits_for_a_writer_then_reads_until_its_eof(tmp_path: Path) -> None:
    path = fifo(tmp_path, "stdin")
    stdin = Input(path)  # before any writer, as at Create: must not see a false EOF
    got: list[bytes] = []
    async with anyio.create_task_group() as tg:

        async def read_all() -> None:
            while chunk := await stdin.read():
                got.append(chunk)

        tg.start_soon(read_all)
        await anyio.wait_all_tasks_blocked()
        assert got == []  # nothing read, no EOF either
        writer = os.open(path, os.O_WRONLY)  # what containerd's client does (never blocks now)
        os.write(writer, b"hello ")
        os.write(writer, b"world")
        os.close(writer)  # EOF only now
    assert b"".join(got) == b"hello world"
    stdin.close()


async def test_stdin_close_ends_a_waiting_read(tmp_path: Path) -> None:
    stdin = Input(fifo(tmp_path, "stdin"))
    result: list[bytes] = []
    async with anyio.create_task_group() as tg:

        async def read() -> None:
            result.append(await stdin.read())

        tg.start_soon(read)
        await anyio.wait_all_tasks_blocked()
        stdin.close()
    assert result == [b""]


async def test_read_available_takes_what_is_there_without_waiting(tmp_path: Path) -> None:
    path = fifo(tmp_path, "stdin")
    stdin = Input(path)
    writer = os.open(path, os.O_WRONLY)
    os.write(writer, b"abc")
    assert stdin.read_available() == [b"abc"]
    assert stdin.read_available() == []  # the writer is still open: nothing, no wait
    os.close(writer)
    stdin.close()


async def test_output_writes_everything_past_the_pipe_buffer_in_order(tmp_path: Path) -> None:
    path = fifo(tmp_path, "stdout")
    out = Output(path)  # O_RDWR: opening never blocks, even with no reader yet
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    data = bytes(range(256)) * 2048  # 512 KiB: several times a pipe's buffer
    received = bytearray()
    with anyio.fail_after(DEADLINE):
        async with anyio.create_task_group() as tg:

            async def drain() -> None:
                while len(received) < len(data):
                    await anyio.wait_readable(reader)
                    received.extend(os.read(reader, 65536))

            tg.start_soon(drain)
            await out.write(data)
    assert bytes(received) == data
    out.close()
    assert os.read(reader, 1) == b""  # our end closed: the reader sees EOF
    os.close(reader)


async def test_no_stream_and_uris(tmp_path: Path) -> None:
    out, stdin = Output(""), Input("")
    await out.write(b"dropped")
    assert await stdin.read() == b""
    with pytest.raises(StdioError, match="unsupported stdio URI"):
        Output("file:///var/log/x")
    with pytest.raises(StdioError, match="cannot open"):
        Input(str(tmp_path / "missing"))
