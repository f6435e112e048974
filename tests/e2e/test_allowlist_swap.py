"""The allowlist holds until the mount: a group member who can write inside an allowed directory
swaps its rootfs for a symlink to a root-only directory right after container.create (where the
path was checked, and which begins mounting it at once, in the background). Whichever comes
first, nothing outside is mounted: the swap before the mount makes the start refuse; the mount
before the swap is of the directory that was checked."""

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
                        stdout, stderr = bytearray(), bytearray()
                        out["status"] = await shim.pump(stdout.extend, stderr.extend)
                        out["stdout"], out["stderr"] = stdout.decode(), stderr.decode()
                    except RPCError as exc:
                        out["refused"] = _rpc_error(exc)
                finally:
                    await shim.aclose()
                await client.call("container.stop", {"pod": "swap", "id": "c1"})
                await client.call("container.delete", {"pod": "swap", "id": "c1"})
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
    if got["refused"] is not None:  # the swap came before the mount
        assert got["refused"]["kind"] == "invalid_params", got
        assert "symlink" in got["refused"]["message"], got
    else:  # the mount came first: of the rootfs as checked, which has no /SECRET
        assert got["stdout"] == "" and "SECRET" in got["stderr"], got
        assert got["status"] != 0, got
    assert mounts_under(str(hyperd_factory.base / "shared")) == []
