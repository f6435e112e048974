"""hyperctl against a real daemon; events; restart adoption."""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.e2e.conftest import (
    Hyperd,
    create_and_start,
    exec_and_start,
    process_alive,
    rpc,
    start_pod,
)

pytestmark = [pytest.mark.e2e, pytest.mark.root]

CLI_TIMEOUT = 60


def hyperctl(hyperd: Hyperd, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "hyperd.cli.ctl", "--socket", hyperd.socket, *args],
        input=stdin,
        capture_output=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


def test_hyperctl_run_and_tables(hyperd: Hyperd, busybox_rootfs: Path) -> None:
    r = hyperctl(
        hyperd,
        "run",
        "demo",
        "--rootfs",
        str(busybox_rootfs),
        "--",
        "sh",
        "-c",
        "echo hi; cat; echo oops >&2; exit 7",
        stdin=b"from stdin\n",
    )
    assert r.returncode == 7, r.stderr
    assert r.stdout == b"hi\nfrom stdin\n"
    assert r.stderr == b"oops\n"

    # the default rootfs: built from the host's busybox under the base dir
    r = hyperctl(
        hyperd,
        "run",
        "demo",
        "--no-stdin",
        "--keep",
        "--name",
        "kept",
        "--",
        "sh",
        "-c",
        "echo default",
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"default\n"
    assert (hyperd.base / "rootfs" / "busybox" / "bin" / "busybox").exists()

    r = hyperctl(hyperd, "pod", "list")
    assert r.returncode == 0
    header, row = r.stdout.decode().splitlines()
    assert header.split()[:3] == ["ID", "STATE", "BACKEND"]
    assert row.split()[:3] == ["demo", "running", "sim"]

    r = hyperctl(hyperd, "container", "list", "demo")
    assert r.returncode == 0
    lines = r.stdout.decode().splitlines()
    assert lines[0].split()[:3] == ["POD", "ID", "STATE"]
    # the first run's container was stopped and deleted; the second was kept
    assert [line.split()[:2] for line in lines[1:]] == [["demo", "kept"]]

    r = hyperctl(hyperd, "--json", "pod", "inspect", "demo")
    assert r.returncode == 0 and b'"state": "running"' in r.stdout

    r = hyperctl(hyperd, "pod", "delete", "demo")
    assert r.returncode == 1
    assert b"running" in r.stderr and b"[invalid_state]" in r.stderr

    assert hyperctl(hyperd, "pod", "stop", "demo").returncode == 0
    assert hyperctl(hyperd, "pod", "delete", "demo").returncode == 0
    assert hyperctl(hyperd, "version").returncode == 0


@pytest.mark.anyio
async def test_events_are_pushed(hyperd: Hyperd, busybox_rootfs: Path) -> None:
    with anyio.fail_after(30):
        async with rpc(hyperd.socket) as watcher, rpc(hyperd.socket) as c:
            assert await watcher.call("events.subscribe", {}) == {"subscribed": True}
            await start_pod(c, "ev")
            started = await create_and_start(c, "ev", "c", busybox_rootfs, ["true"])
            await started.wait()
            seen = []
            while ("container", "running") not in seen:
                note = await watcher.next_notification()
                assert note["method"] == "event"
                event = note["params"]
                assert event["pod"] == "ev"
                seen.append((event["kind"], event["state"]))
            assert seen[:3] == [("pod", "created"), ("pod", "running"), ("container", "created")]


@pytest.mark.anyio
async def test_restart_leaves_pods_running(hyperd_factory: Hyperd, busybox_rootfs: Path) -> None:
    """SIGTERM leaves pods running; the restarted daemon re-adopts them: same pods, same
    containers, same processes (never restarted), exec and ps work."""
    hyperd_factory.start(stop_pods_on_exit=False)
    pods = ("keep1", "keep2")
    with anyio.fail_after(60):
        before: dict[str, dict[str, Any]] = {}
        shims = []
        async with rpc(hyperd_factory.socket) as c:
            for name in pods:
                before[name] = await start_pod(c, name)
                shims.append(
                    await create_and_start(c, name, "c", busybox_rootfs, ["sleep", "1000"])
                )
                ps = await c.call("container.ps", {"pod": name, "id": "c", "format": "json"})
                assert json.loads(ps["output"])  # the container's pids
                before[name]["ps"] = ps["output"]
        assert hyperd_factory.stop() == 0
        for info in before.values():
            for pid in (info["vm_pid"], info["proxy_pid"]):
                assert process_alive(pid), "a helper process died with the daemon"

        hyperd_factory.start()  # this time stop the pods on exit (cleanup)
        async with rpc(hyperd_factory.socket) as c:
            listed = (await c.call("pod.list"))["pods"]
            assert [(p["id"], p["state"]) for p in listed] == [(n, "running") for n in pods]
            for name, info in before.items():
                now = await c.call("pod.inspect", {"id": name})
                assert (now["vm_pid"], now["proxy_pid"]) == (info["vm_pid"], info["proxy_pid"])
                container = await c.call("container.inspect", {"pod": name, "id": "c"})
                assert container["state"] == "running"
                ps = await c.call("container.ps", {"pod": name, "id": "c", "format": "json"})
                assert ps["output"] == info["ps"]  # same processes: never restarted
                ex = await exec_and_start(c, name, "c", ["echo", "still here"])
                assert await ex.wait() == 0
                assert ex.stdout == b"still here\n"
            for name in pods:
                await c.call("pod.stop", {"id": name})
        for started in shims:
            await started.shim.aclose()
    for info in before.values():
        assert not process_alive(info["vm_pid"]) and not process_alive(info["proxy_pid"])


def test_hyperd_config_commands(tmp_path: Path) -> None:
    from hyperd.config import parse_config

    out = subprocess.run(
        [sys.executable, "-m", "hyperd", "config", "default"],
        capture_output=True,
        check=True,
        timeout=CLI_TIMEOUT,
    ).stdout.decode()
    assert parse_config(out).vm.backend == "sim"
    bad = tmp_path / "bad.toml"
    bad.write_text("[timeouts]\nping_interval = -1\n")
    r = subprocess.run(
        [sys.executable, "-m", "hyperd", "config", "check", str(bad)],
        capture_output=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert r.returncode == 78
    assert b"timeouts.ping_interval" in r.stderr
    good = tmp_path / "good.toml"
    good.write_text(out)
    r = subprocess.run(
        [sys.executable, "-m", "hyperd", "config", "check", str(good)],
        capture_output=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert r.returncode == 0, r.stderr


def test_hyperctl_without_a_daemon(short_tmp: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "hyperd.cli.ctl",
            "--socket",
            str(short_tmp / "none"),
            "pod",
            "list",
        ],
        capture_output=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert r.returncode == 1
    assert b"cannot connect to hyperd" in r.stderr


def test_hyperctl_run_forwards_signals(hyperd: Hyperd, busybox_rootfs: Path) -> None:
    script = 'trap "echo got TERM; exit 42" TERM; echo ready; while true; do sleep 0.1; done'
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hyperd.cli.ctl",
            "--socket",
            hyperd.socket,
            "run",
            "sig",
            "--rootfs",
            str(busybox_rootfs),
            "--no-stdin",
            "--",
            "sh",
            "-c",
            script,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGTERM)  # hyperctl passes it on, as the C shim does
        out, err = proc.communicate(timeout=CLI_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 42, err
    assert out == b"got TERM\n"


@pytest.mark.anyio
async def test_hyperctl_exec_run_and_ps(hyperd: Hyperd, busybox_rootfs: Path) -> None:
    with anyio.fail_after(60):
        async with rpc(hyperd.socket) as c:
            await start_pod(c, "ex")
            long = await create_and_start(c, "ex", "c", busybox_rootfs, ["sleep", "1000"])
            try:
                r = await anyio.to_thread.run_sync(
                    lambda: hyperctl(
                        hyperd,
                        "exec",
                        "run",
                        "ex",
                        "c",
                        "--",
                        "sh",
                        "-c",
                        "read x; echo got $x",
                        stdin=b"it\n",
                    )
                )
                assert (r.returncode, r.stdout) == (0, b"got it\n"), r.stderr
                r = await anyio.to_thread.run_sync(
                    lambda: hyperctl(hyperd, "container", "ps", "ex", "c")
                )
                assert r.returncode == 0 and b"sleep" in r.stdout
            finally:
                await long.shim.aclose()
            await c.call("pod.stop", {"id": "ex"})


def test_hyperctl_stats_and_health(hyperd: Hyperd) -> None:
    r = hyperctl(hyperd, "stats")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0].split()[:2] == ["POD", "REACHABLE"]
    assert any(line.startswith("rpc: accepted=") for line in lines)
    assert any(line.startswith("events: published=") for line in lines)
    r = hyperctl(hyperd, "health")
    assert r.returncode == 0 and b"status: ok" in r.stdout


@pytest.mark.anyio
async def test_serve_socket_and_state_dir_options(hyperd_factory: Hyperd) -> None:
    sock = hyperd_factory.base.parent / "api.sock"
    state = hyperd_factory.base.parent / "st"
    hyperd_factory.args = ["--socket", str(sock), "--state-dir", str(state)]
    hyperd_factory.start()
    assert not (hyperd_factory.base / "hyperd.sock").exists()
    async with rpc(str(sock)) as c:
        await c.call("pod.create", {"id": "where"})
    assert (state / "state.db").is_file()  # (its rows: tests/ops/test_store.py)
    assert oct((sock).stat().st_mode & 0o777) == oct(0o660)


@pytest.mark.anyio
async def test_a_second_daemon_on_the_same_state_refuses(hyperd: Hyperd) -> None:
    async with rpc(hyperd.socket) as c:
        pod = await start_pod(c, "mine")
        r = await anyio.to_thread.run_sync(
            lambda: subprocess.run(
                [sys.executable, "-m", "hyperd", "serve", "--base-dir", str(hyperd.base)],
                capture_output=True,
                timeout=CLI_TIMEOUT,
                check=False,
            )
        )
        assert r.returncode == 1
        assert b"another hyperd uses the state dir" in r.stderr
        info = await c.call("pod.inspect", {"id": "mine"})
        assert info["state"] == "running" and info["vm_pid"] == pod["vm_pid"]
        assert process_alive(pod["vm_pid"])


@pytest.mark.anyio
async def test_hyperctl_events(hyperd: Hyperd) -> None:
    proc = await anyio.open_process(
        [sys.executable, "-m", "hyperd.cli.ctl", "--socket", hyperd.socket, "--json", "events"]
    )
    try:
        with anyio.fail_after(30):
            assert proc.stdout is not None
            buffered = b""
            async with rpc(hyperd.socket) as c:
                while b"\n" not in buffered:
                    # events only reach subscribers: create pods until the first one is seen
                    await c.call("pod.create", {"id": f"e{len(buffered)}-{secrets.token_hex(2)}"})
                    with anyio.move_on_after(0.5):
                        buffered += await proc.stdout.receive()
            event = json.loads(buffered.split(b"\n")[0])
            assert (event["kind"], event["state"]) == ("pod", "created")
    finally:
        proc.terminate()
        await proc.wait()
        await proc.aclose()


def _run_on_a_terminal(
    hyperd: Hyperd, args: list[str], script: list[tuple[bytes, bytes]]
) -> tuple[int, bytes]:
    """Run hyperctl with a pty as its stdin/stdout/stderr; for each ``(seen, typed)`` of
    ``script``, type ``typed`` once the output so far contains ``seen`` (events, not quiet
    moments: on a busy machine a pause in the output says nothing). Returns its exit status and
    everything it printed."""
    import os
    import pty
    import select
    import time

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "hyperd.cli.ctl", "--socket", hyperd.socket, *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    output = b""
    deadline = time.monotonic() + CLI_TIMEOUT
    pending = list(script)
    try:
        while time.monotonic() < deadline:
            while pending and pending[0][0] in output:
                os.write(master, pending.pop(0)[1])
            # the wait is bounded by the test's deadline, not used to decide anything
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every holder of the pty's slave side has gone
                break
            output += chunk
        return proc.wait(timeout=max(0.0, deadline - time.monotonic())), output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_hyperctl_run_with_a_terminal(hyperd: Hyperd, busybox_rootfs: Path) -> None:
    """``run -t`` on a real terminal: input reaches the process through its pty (echoed), ^D
    ends it, and hyperctl exits with its status instead of waiting for more keyboard input."""
    command = ["sh", "-c", "echo started; cat; exit 6"]
    status, output = _run_on_a_terminal(
        hyperd,
        ["run", "-t", "tty1", "--rootfs", str(busybox_rootfs), "--", *command],
        [(b"started", b"typed line\r"), (b"typed line", b"\x04")],
    )
    assert status == 6, output
    assert output.count(b"typed line") == 2, output  # the pty's echo, then cat's copy

    status, output = _run_on_a_terminal(
        hyperd,
        ["run", "-t", "tty1", "--rootfs", str(busybox_rootfs), "--", "sh", "-c", "echo quick"],
        [],
    )
    assert status == 0, output
    assert b"quick" in output
