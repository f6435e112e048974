"""Bad input on the RPC socket gets the right error, and the daemon keeps serving."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from hyperd.cli.client import RPCClient, RPCError
from tests.e2e.conftest import Hyperd, rpc

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.root]

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
OVERSIZED = 2 * 1024 * 1024  # larger than the 1 MiB message cap


async def _raw(client: RPCClient, data: bytes) -> Any:
    await client.send_raw(data)
    return await client.read_message()


async def test_protocol_faults(hyperd: Hyperd) -> None:
    with anyio.fail_after(30):
        async with rpc(hyperd.socket) as c:
            reply = await _raw(c, b'{"jsonrpc": "2.0", "id": 1, "method": \n')
            assert reply["error"]["code"] == PARSE_ERROR and reply["id"] is None

            reply = await _raw(c, b'{"jsonrpc": "2.0", "id": 2}\n')
            assert reply["error"]["code"] == INVALID_REQUEST

            reply = await _raw(c, b'{"jsonrpc": "2.0", "id": 3, "method": "pod.explode"}\n')
            assert reply["error"]["code"] == METHOD_NOT_FOUND and reply["id"] == 3

            big = b'{"jsonrpc": "2.0", "id": 4, "method": "pod.list", "params": {"x": "'
            reply = await _raw(c, big + b"a" * OVERSIZED + b'"}}\n')
            assert reply["error"]["code"] == INVALID_REQUEST
            assert "large" in reply["error"]["message"].lower()

            batch = [
                {"jsonrpc": "2.0", "id": 5, "method": "hyperd.version"},
                {"jsonrpc": "2.0", "id": 6, "method": "nope"},
            ]
            replies = await _raw(c, msgspec.json.encode(batch) + b"\n")
            by_id = {r["id"]: r for r in replies}
            assert by_id[5]["result"]["api"] == 1
            assert by_id[6]["error"]["code"] == METHOD_NOT_FOUND

            # the same connection still works
            assert (await c.call("hyperd.version"))["api"] == 1


@pytest.mark.parametrize(
    ("method", "params", "field"),
    [
        ("pod.create", {"id": 5}, "id"),
        ("pod.create", {"id": "p", "vm": {"backend": "qemu-but-not-really"}}, "vm"),
        ("pod.create", {"id": "p", "bogus": 1}, "bogus"),
        ("pod.start", {}, "id"),
        ("container.kill", {"pod": "p", "id": "c", "signal": [9]}, "signal"),
        (
            "container.create",
            {"pod": "p", "id": "c", "rootfs": {"path": "rel/dir"}, "process": {"args": ["true"]}},
            "rootfs",
        ),
        (
            "container.create",
            {"pod": "p", "id": "c", "rootfs": {"path": "/"}, "process": {"args": []}},
            "args",
        ),
    ],
)
async def test_wrong_params(
    hyperd: Hyperd, method: str, params: dict[str, Any], field: str
) -> None:
    async with rpc(hyperd.socket) as c:
        if method.startswith("container"):
            await c.call("pod.create", {"id": "p"})
        with pytest.raises(RPCError) as err:
            await c.call(method, params)
        assert err.value.code == INVALID_PARAMS, err.value
        assert err.value.kind == "invalid_params"
        assert field in err.value.message
        assert (await c.call("hyperd.health"))["status"] == "ok"


@pytest.mark.parametrize("bad_id", ["../etc", "..", "a/b", "", ".hidden", "x" * 200, "p\x00"])
async def test_path_traversal_ids(hyperd: Hyperd, bad_id: str, busybox_rootfs: Path) -> None:
    async with rpc(hyperd.socket) as c:
        for method, params in [
            ("pod.create", {"id": bad_id}),
            ("pod.inspect", {"id": bad_id}),
            ("container.inspect", {"pod": bad_id, "id": "c"}),
        ]:
            with pytest.raises(RPCError) as err:
                await c.call(method, params)
            assert err.value.kind == "invalid_params", (method, err.value)
        await c.call("pod.create", {"id": "ok"})
        await c.call("pod.start", {"id": "ok"})
        with pytest.raises(RPCError) as err:
            await c.call(
                "container.create",
                {
                    "pod": "ok",
                    "id": bad_id,
                    "rootfs": {"path": str(busybox_rootfs)},
                    "process": {"args": ["true"]},
                },
            )
        assert err.value.kind == "invalid_params"
        with pytest.raises(RPCError) as err:
            await c.call("pod.create", {"id": "sneaky", "share_dir": "/etc"})
        assert err.value.kind == "invalid_params"
        assert [p["id"] for p in (await c.call("pod.list"))["pods"]] == ["ok"]
    assert not (hyperd.base.parent / "etc").exists()


async def test_errors_name_the_object(hyperd: Hyperd) -> None:
    async with rpc(hyperd.socket) as c:
        with pytest.raises(RPCError) as err:
            await c.call("pod.start", {"id": "ghost"})
        assert err.value.kind == "not_found" and "ghost" in err.value.message
        await c.call("pod.create", {"id": "p"})
        with pytest.raises(RPCError) as err:
            await c.call("pod.create", {"id": "p"})
        assert err.value.kind == "already_exists" and "'p'" in err.value.message
        with pytest.raises(RPCError) as err:
            await c.call("pod.stop", {"id": "p"})
        assert err.value.kind == "invalid_state" and "created" in err.value.message
        with pytest.raises(RPCError) as err:
            await c.call(
                "container.create",
                {"pod": "p", "id": "c", "rootfs": {"path": "/"}, "process": {"args": ["true"]}},
            )
        assert err.value.kind == "invalid_state" and "'p'" in err.value.message


async def test_container_delete(hyperd: Hyperd, busybox_rootfs: Path) -> None:
    async with rpc(hyperd.socket) as c:
        await c.call("pod.create", {"id": "p"})
        await c.call("pod.start", {"id": "p"})
        spec = {"rootfs": {"path": str(busybox_rootfs)}, "process": {"args": ["true"]}}
        await c.call("container.create", {"pod": "p", "id": "c", **spec})
        assert (await c.call("container.delete", {"pod": "p", "id": "c"}))["state"] == "deleted"
        with pytest.raises(RPCError) as err:
            await c.call("container.inspect", {"pod": "p", "id": "c"})
        assert err.value.kind == "not_found"
        await c.call("container.create", {"pod": "p", "id": "c", **spec})  # the id is free again
        await c.call("pod.stop", {"id": "p"})
        await c.call("container.delete", {"pod": "p", "id": "c"})
        assert (await c.call("container.list", {"pod": "p"}))["containers"] == []


def test_non_root_peer_outside_the_group_is_refused(hyperd_factory: Hyperd) -> None:
    import os
    import shutil
    import subprocess

    # the client runs as nobody: a python outside root's home (only the stdlib is needed)
    system_python = shutil.which("python3", path="/usr/bin:/bin") or "/usr/bin/python3"
    config = hyperd_factory.base.parent / "hyperd.toml"
    config.write_text(f'base_dir = "{hyperd_factory.base}"\n[rpc]\nmode = "0666"\n')
    hyperd_factory.args = ["--config", str(config)]
    hyperd_factory.base.parent.chmod(0o755)  # let the unprivileged client reach the socket
    hyperd_factory.start()
    # the refusal comes at once; sending nothing keeps the close clean (unread data would
    # make the server's close a reset that can discard the refusal on its way)
    client = "\n".join(
        [
            "import socket, sys",
            "s = socket.socket(socket.AF_UNIX)",
            "s.connect(sys.argv[1])",
            "data = b''",
            "while not data.endswith(b'\\n'):",
            "    chunk = s.recv(4096)",
            "    if not chunk:",
            "        break",
            "    data += chunk",
            "print(data.decode())",
        ]
    )
    nobody = 65534
    r = subprocess.run(
        [system_python, "-c", client, hyperd_factory.socket],
        capture_output=True,
        timeout=30,
        check=False,
        user=nobody,
        group=nobody,
        extra_groups=[],
        env={"PATH": os.environ.get("PATH", "")},
    )
    reply = msgspec.json.decode(r.stdout)
    assert reply["error"]["data"]["kind"] == "unauthorized", r
    assert "uid 65534" in reply["error"]["message"]
    assert "refused" in hyperd_factory.log.read_text()


async def test_share_dirs_are_never_shared(hyperd: Hyperd) -> None:
    shared = hyperd.base / "shared"
    async with rpc(hyperd.socket) as c:
        await c.call("pod.create", {"id": "a", "share_dir": str(shared / "custom")})
        for params in (
            {"id": "b", "share_dir": str(shared / "custom")},  # a's share
            {"id": "c", "share_dir": str(shared / "a" / "deeper")},  # not directly in the root
            {"id": "d", "share_dir": str(shared)},  # the root itself
            {"id": "e", "share_dir": str(shared / ".." / "escape")},
        ):
            with pytest.raises(RPCError) as err:
                await c.call("pod.create", params)
            assert err.value.kind == "invalid_params", params
        with pytest.raises(RPCError) as err:  # its default share would be a's custom one
            await c.call("pod.create", {"id": "custom"})
        assert err.value.kind == "invalid_params" and "'a'" in err.value.message
