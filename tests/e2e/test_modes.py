"""VM backends and proxy modes beyond the embedded default, and a VM that stops answering."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from hyperd.cli.client import RPCError, ShimClient
from tests.e2e.conftest import Hyperd, create_and_start, process_alive, rpc, start_pod
from tests.procs import spawn_ready

pytestmark = [pytest.mark.anyio, pytest.mark.e2e, pytest.mark.root]

READY_DEADLINE = 20.0


def _launch(argv: list[str]) -> subprocess.Popen[bytes]:
    """Start one of our programs with --ready-fd and wait for its ``ready`` line."""
    return spawn_ready(argv, deadline=READY_DEADLINE)


@pytest.fixture
def external_vm_and_proxy(hyperd: Hyperd) -> Iterator[tuple[str, str, str, int, int]]:
    """A sim and a system-mode proxy started by the test (not by hyperd), for pod ``ext``.

    Yields (ctl, tty, proxy_url, sim pid, proxy pid)."""
    run = hyperd.base.parent / "ext"
    run.mkdir()
    share = hyperd.base / "shared" / "ext"
    share.mkdir(parents=True)
    ctl, tty, sock = str(run / "ctl"), str(run / "tty"), str(run / "proxy")
    sim = _launch(
        [sys.executable, "-m", "hyperd.sim", "--ctl", ctl, "--tty", tty, "--share", str(share)]
    )
    proxy = _launch([sys.executable, "-m", "hyperd.proxy", "--socket", sock])
    try:
        yield ctl, tty, f"unix://{sock}", sim.pid, proxy.pid
    finally:
        for p in (proxy, sim):
            p.send_signal(signal.SIGTERM)
            p.wait(10)


@pytest.mark.parametrize("proxy_mode", ["system", "pod"])
async def test_external_vm(
    hyperd: Hyperd,
    external_vm_and_proxy: tuple[str, str, str, int, int],
    busybox_rootfs: Path,
    proxy_mode: str,
) -> None:
    """An external VM (its sockets given), behind the system proxy or a per-pod proxy."""
    ctl, tty, url, sim_pid, proxy_pid = external_vm_and_proxy
    proxy = {"mode": "system", "url": url} if proxy_mode == "system" else {"mode": "pod"}
    with anyio.fail_after(30):
        async with rpc(hyperd.socket) as c:
            pod = await start_pod(
                c, "ext", vm={"backend": "external", "ctl": ctl, "tty": tty}, proxy=proxy
            )
            assert pod["vm_pid"] is None
            if proxy_mode == "system":
                assert pod["proxy_pid"] is None and pod["proxy_url"] == url
            else:
                own_proxy = pod["proxy_pid"]
                assert process_alive(own_proxy)
            ran = await create_and_start(c, "ext", "c", busybox_rootfs, ["echo", "external"])
            assert await ran.wait() == 0
            assert ran.stdout == b"external\n"
            await c.call("container.stop", {"pod": "ext", "id": "c"})
            await c.call("pod.stop", {"id": "ext"})
            await c.call("pod.delete", {"id": "ext"})
        # hyperd did not start them, so it left them running (and stopped its own proxy)
        assert process_alive(sim_pid) and process_alive(proxy_pid)
        if proxy_mode == "pod":
            assert not process_alive(own_proxy)


async def test_silent_vm_is_declared_unreachable(
    hyperd_factory: Hyperd, busybox_rootfs: Path
) -> None:
    """A VM whose process lives but stops answering: the caller waiting on it gets its deadline
    error, the VM is declared unreachable one liveness deadline later, and from then on callers
    get vm_unavailable at once; other pods are unaffected."""
    config = hyperd_factory.base.parent / "hyperd.toml"
    config.write_text(
        f'base_dir = "{hyperd_factory.base}"\n'
        "[timeouts]\nping_interval = 3.0\nping_timeout = 1.0\ncommand = 2.0\n"
    )
    hyperd_factory.args = ["--config", str(config)]
    # the sim answers STARTPOD, then nothing more (its process stays alive)
    sim_args = {"mute": ["--silent-after", "1"]}
    hyperd_factory.start(env={"HYPERD_TEST_SIM_ARGS": json.dumps(sim_args)})
    with anyio.fail_after(60):
        async with rpc(hyperd_factory.socket) as c, rpc(hyperd_factory.socket) as watcher:
            await watcher.call("events.subscribe")
            await start_pod(c, "fine")
            await start_pod(c, "mute", agent_dialect="cc")
            created = await c.call(
                "container.create",
                {
                    "pod": "mute",
                    "id": "c",
                    "rootfs": {"path": str(busybox_rootfs)},
                    "process": {"args": ["true"]},
                },
            )
            shim = await ShimClient.connect(created["proxy_url"], created["token"])
            try:
                await shim.wait_connected()
                began = time.monotonic()
                with pytest.raises(RPCError) as err:
                    await c.call("container.start", {"pod": "mute", "id": "c"})
                assert time.monotonic() - began < 4.0
            finally:
                await shim.aclose()
            assert err.value.kind in ("timeout", "vm_unavailable"), err.value
            assert "mute" in err.value.message
            # mounts made for the container were undone
            assert not [m for m in hyperd_factory.mounts_under_base() if "/mute/" in m]
            while True:
                event = (await watcher.next_notification())["params"]
                if (event["kind"], event["pod"], event["state"]) == ("pod", "mute", "unreachable"):
                    break
            assert time.monotonic() - began < 8.0
            with pytest.raises(RPCError) as err:
                await c.call("container.start", {"pod": "mute", "id": "c"})
            assert err.value.kind == "vm_unavailable"
            info = await c.call("pod.inspect", {"id": "mute"})
            assert info["state"] == "unreachable"
            assert process_alive(info["vm_pid"])
            ok = await create_and_start(c, "fine", "c", busybox_rootfs, ["echo", "ok"])
            assert await ok.wait() == 0 and ok.stdout == b"ok\n"
            await c.call("pod.stop", {"id": "mute"})
            assert not process_alive(info["vm_pid"])


async def test_configured_proxy_binary(hyperd_factory: Hyperd, busybox_rootfs: Path) -> None:
    """proxy.command names a cc-proxy-like binary: started per pod with ``-uri`` and no
    readiness handshake (the VM session retries connecting, as the seed does)."""
    config = hyperd_factory.base.parent / "hyperd.toml"
    config.write_text(
        f'base_dir = "{hyperd_factory.base}"\n'
        f'[proxy]\nmode = "pod"\ncommand = ["{sys.executable}", "-m", "hyperd.proxy"]\n'
    )
    hyperd_factory.args = ["--config", str(config)]
    hyperd_factory.start()
    with anyio.fail_after(30):
        async with rpc(hyperd_factory.socket) as c:
            pod = await start_pod(c, "bin")
            assert process_alive(pod["proxy_pid"])
            ran = await create_and_start(c, "bin", "c", busybox_rootfs, ["echo", "via -uri"])
            assert await ran.wait() == 0 and ran.stdout == b"via -uri\n"
            await c.call("pod.stop", {"id": "bin"})
            assert not process_alive(pod["proxy_pid"])
