"""The allowlist holds until the mount: a group member who can write inside an allowed directory
swaps its rootfs for a symlink to a root-only directory between container.create (where the
path was checked) and container.start. The start is refused; nothing outside is mounted."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
import pytest

from hyperd.cli.client import RPCClient, RPCError, ShimClient
from tests.conftest import make_busybox_rootfs
from tests.e2e.conftest import Hyperd, mounts_under
from tests.e2e.test_access_model import CHILD_DEADLINE, _ids, _rpc_error, run_as

pytestmark = [pytest.mark.e2e, pytest.mark.root]


def swap_flow(sock: str, allowed: str, secret: str) -> dict[str, Any]:
    """As a member: create a container on an allowed rootfs, swap the rootfs for a symlink to
    ``secret``, then start it."""

    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {}
        with anyio.fail_after(CHILD_DEADLINE):
            async with await RPCClient.connect(sock) as client:
                await client.call("pod.create", {"id": "swap"})
                await client.call("pod.start", {"id": "swap"})
                rootfs = os.path.join(allowed, "rootfs")
                created = await client.call(
                    "container.create",
                    {
                        "pod": "swap",
                        "id": "c1",
                        "rootfs": {"path": rootfs},
                        "process": {"args": ["cat", "/SECRET"]},
                    },
                )
                os.rename(rootfs, os.path.join(allowed, "real"))
                os.symlink(secret, rootfs)
                shim = await ShimClient.connect(created["proxy_url"], created["token"])
                try:
                    await shim.wait_connected()
                    try:
                        await client.call("container.start", {"pod": "swap", "id": "c1"})
                        out["refused"] = None
                        out["stdout"] = bytearray()
                        await shim.pump(out["stdout"].extend, lambda _data: None)
                        out["stdout"] = out["stdout"].decode()
                    except RPCError as exc:
                        out["refused"] = _rpc_error(exc)
                finally:
                    await shim.aclose()
        return out

    return anyio.run(main)


def test_a_symlink_swapped_in_after_the_check_is_not_mounted(
    hyperd_factory: Hyperd, short_tmp: Path
) -> None:
    group, member, _ = _ids()
    os.chmod(short_tmp, 0o755)
    allowed = short_tmp / "allowed"
    make_busybox_rootfs(allowed / "rootfs")
    os.chown(allowed, member, member)  # the member may rename and link inside it
    secret = make_busybox_rootfs(short_tmp / "secret")
    (secret / "SECRET").write_text("root only\n")
    os.chmod(secret, 0o700)
    config = short_tmp / "hyperd.toml"
    config.write_text(f'[rpc]\ngroup = {group}\nallowed_host_paths = ["{allowed}"]\n')
    hyperd_factory.args = ["--config", str(config)]
    hyperd_factory.start()

    got = run_as(
        member, [group], lambda: swap_flow(hyperd_factory.socket, str(allowed), str(secret))
    )
    assert got["refused"] is not None, f"the swapped rootfs was mounted: {got}"
    assert got["refused"]["kind"] == "invalid_params", got
    assert "symlink" in got["refused"]["message"], got
    assert mounts_under(str(hyperd_factory.base / "shared")) == []
