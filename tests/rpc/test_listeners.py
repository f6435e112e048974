"""Listener helpers: fresh sockets (mode, group, stale files) and socket activation."""

from __future__ import annotations

import errno
import socket
import stat
from pathlib import Path

import anyio
import pytest

from hyperd.rpc import RPCClient, RPCServer, create_unix_listener, listener_from_socket
from tests.rpc.support import State, make_methods

pytestmark = pytest.mark.anyio

API_GID = 4242


async def test_creates_parent_sets_mode_and_group(short_tmp: Path) -> None:
    path = short_tmp / "run" / "hyperd" / "hyperd.sock"
    async with await create_unix_listener(path, gid=API_GID):
        st = path.stat()
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == API_GID
    async with await create_unix_listener(short_tmp / "x.sock", mode=0o600):
        assert stat.S_IMODE((short_tmp / "x.sock").stat().st_mode) == 0o600


async def test_stale_socket_is_replaced(short_tmp: Path) -> None:
    path = short_tmp / "s.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))  # bound, never listening, then closed: a leftover file
    assert path.exists()
    async with (
        await create_unix_listener(path) as listener,
        await anyio.connect_unix(path),
        await listener.accept(),
    ):
        pass


async def test_live_socket_is_not_stolen(short_tmp: Path) -> None:
    path = short_tmp / "s.sock"
    async with await create_unix_listener(path):
        with pytest.raises(OSError) as err:
            await create_unix_listener(path)
        assert err.value.errno == errno.EADDRINUSE
        assert stat.S_ISSOCK(path.stat().st_mode)


async def test_regular_file_is_not_removed(short_tmp: Path) -> None:
    path = short_tmp / "s.sock"
    path.write_text("precious")
    with pytest.raises(FileExistsError):
        await create_unix_listener(path)
    assert path.read_text() == "precious"


@pytest.mark.parametrize("listening", [True, False], ids=["listening", "bound-only"])
async def test_socket_activation(short_tmp: Path, listening: bool) -> None:
    path = short_tmp / "act.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    if listening:
        sock.listen()
    fd = sock.detach()  # as systemd passes it: a bare descriptor
    listener = await listener_from_socket(fd)
    server = RPCServer(make_methods(State()))
    async with anyio.create_task_group() as tg:
        await tg.start(server.serve, listener)
        async with RPCClient.connect(path) as client:
            assert await client.call("ping") == "pong"
        await server.shutdown()


async def test_activation_rejects_wrong_socket_kind() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dgram, pytest.raises(ValueError):
        await listener_from_socket(dgram)
