"""containerd-shim-hyperd-v2 driven by Debian's real containerd 1.6 and ctr, end to end: ctr
→ containerd → ttrpc → the shim → hyperd's RPC → hyperd-proxy → hyperd-sim."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import mounts_under
from tests.shim.conftest import CTR_TIMEOUT, NAMESPACE, Containerd

pytestmark = [pytest.mark.containerd, pytest.mark.e2e, pytest.mark.root]

EVENT_TIMEOUT = 60.0  # seconds for an event to reach `ctr events` on a loaded machine


def hyperctl_json(c: Containerd, *args: str) -> Any:
    hyperctl = [sys.executable, "-m", "hyperd.cli.ctl", "--socket", c.hyperd.socket, "--json"]
    out = subprocess.run(
        [*hyperctl, *args], capture_output=True, check=True, timeout=CTR_TIMEOUT
    ).stdout
    return json.loads(out)


def hyperd_pods(c: Containerd) -> dict[str, dict[str, Any]]:
    return {p["id"]: p for p in hyperctl_json(c, "pod", "list")["pods"]}


def shims_of(c: Containerd, cid: str) -> list[int]:
    """Shim daemons started for task ``cid`` (the first task of their pod)."""
    found = []
    for pid in c.shim_pids():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cid.encode() in argv:
            found.append(pid)
    return found


def task_status(c: Containerd, cid: str) -> str | None:
    for line in c.ctr("task", "ls").stdout.decode().splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return fields[-1]
    return None


class Events:
    """``ctr events`` running in the background; wait for one topic of one container."""

    def __init__(self, c: Containerd) -> None:
        self.proc = subprocess.Popen(
            ["ctr", "-a", c.socket, "-n", NAMESPACE, "events"], stdout=subprocess.PIPE
        )
        self.buf = b""

    def wait(self, topic: str, cid: str) -> dict[str, Any]:
        """The next ``topic`` event of container ``cid``'s init process."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + EVENT_TIMEOUT
        fd = self.proc.stdout.fileno()
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                # "<date> <time> +0000 UTC <namespace> <topic> <json>"
                fields = line.decode().split(" ", 6)
                if len(fields) == 7 and fields[5] == topic:
                    body = json.loads(fields[6])
                    if body.get("container_id") == cid and body.get("id", cid) == cid:
                        return body  # type: ignore[no-any-return]
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(left, 0))
            if not ready:
                raise AssertionError(f"no {topic} event for {cid}")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError("ctr events exited")
            self.buf += chunk

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def events(containerd: Containerd) -> Iterator[Events]:
    ev = Events(containerd)
    try:
        yield ev
    finally:
        ev.close()


@pytest.fixture(autouse=True)
def clean_tasks(containerd: Containerd) -> Iterator[None]:
    """Whatever a test leaves (a failed one), the next starts from no task and no container."""
    yield
    for cid in containerd.ctr("container", "ls", "-q").stdout.decode().split():
        containerd.ctr("task", "delete", "--force", cid, check=False)
        containerd.ctr("container", "rm", cid, check=False)


def wait_exit(pid: int, timeout: float = EVENT_TIMEOUT) -> bool:
    """Wait for process ``pid`` to end (a pidfd turns readable); whether it did in time."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready)
    finally:
        os.close(fd)


def assert_gone(c: Containerd, cid: str, pod: str) -> None:
    """The task left nothing: no bundle, no shim, no hyperd pod, no mount."""
    assert not c.bundle(cid).exists()
    for pid in shims_of(c, cid):  # the shim exits right after answering Shutdown
        assert wait_exit(pid), f"shim {pid} of {cid} did not exit"
    assert pod not in hyperd_pods(c)
    # neither the bundle's rootfs nor hyperd's bind of it in the pod's shared dir is left
    assert [m for m in mounts_under(str(c.dir)) if f"/{cid}/" in m + "/"] == []


@pytest.mark.parametrize(
    ("cid", "script", "status", "out"),
    [
        ("rm0", "echo hello; exit 0", 0, b"hello\n"),
        ("rm3", "echo hi; exit 3", 3, b"hi\n"),
        ("rm137", "echo x; kill -9 $$", 137, b"x\n"),
    ],
)
def test_run_rm_output_and_exit_status(
    containerd: Containerd, cid: str, script: str, status: int, out: bytes
) -> None:
    result = containerd.run(cid, "sh", "-c", script, flags=("--rm",), check=False)
    assert result.returncode == status, result.stderr.decode()
    assert result.stdout == out
    assert_gone(containerd, cid, f"{NAMESPACE}.{cid}")


def test_run_rm_stdin_and_stderr(containerd: Containerd) -> None:
    result = containerd.run(
        "rmio", "sh", "-c", "cat; echo to-stderr >&2", flags=("--rm",), input=b"piped\n" * 1000
    )
    assert result.stdout == b"piped\n" * 1000
    assert b"to-stderr\n" in result.stderr


def test_detached_exec_ps_kill_delete(containerd: Containerd, events: Events) -> None:
    c = containerd
    c.run("d1", "sleep", "1000", flags=("-d",))
    assert task_status(c, "d1") == "RUNNING"
    ps = c.ctr("task", "ps", "d1").stdout.decode().splitlines()
    assert ps[0].split()[0] == "PID" and len(ps) >= 2 and ps[1].split()[0].isdigit()
    exec_ = c.ctr(
        "task", "exec", "--fifo-dir", str(c.dir / "fifo"), "--exec-id", "e1", "d1",
        "sh", "-c", "cat; echo done; exit 5", input=b"data\n", check=False,
    )  # fmt: skip
    assert exec_.returncode == 5, exec_.stderr.decode()
    assert exec_.stdout == b"data\ndone\n"
    # an unsupported method answers Unimplemented, not a hang
    paused = c.ctr("task", "pause", "d1", check=False)
    assert paused.returncode != 0 and b"not implemented" in paused.stderr
    c.ctr("task", "kill", "d1")  # SIGTERM
    exit_event = events.wait("/tasks/exit", "d1")
    assert exit_event["exit_status"] == 143
    assert task_status(c, "d1") == "STOPPED"
    again = c.ctr("task", "kill", "-s", "SIGKILL", "d1", check=False)
    assert again.returncode != 0 and b"not found" in again.stderr
    c.ctr("task", "delete", "d1")
    assert task_status(c, "d1") is None
    c.ctr("container", "rm", "d1")
    assert_gone(c, "d1", f"{NAMESPACE}.d1")


def test_two_tasks_share_one_pod_and_one_shim(containerd: Containerd, events: Events) -> None:
    c = containerd
    label = ("--label", "io.kubernetes.cri.sandbox-id=grp1")
    c.run("g1", "sleep", "1000", flags=("-d", *label))
    c.run("g2", "sleep", "1000", flags=("-d", *label))
    pod = hyperd_pods(c)[f"{NAMESPACE}.grp1"]
    assert pod["containers"] == 2 and pod["state"] == "running"
    assert (c.bundle("g1") / "address").read_text() == (c.bundle("g2") / "address").read_text()
    assert len(shims_of(c, "g1")) == 1 and shims_of(c, "g2") == []
    shim = shims_of(c, "g1")[0]
    for cid in ("g1", "g2"):  # hyperd knows the pod's shim as each container's shim
        assert (
            hyperctl_json(c, "container", "inspect", f"{NAMESPACE}.grp1", cid)["shim_pid"] == shim
        )
    hello = c.ctr("task", "exec", "--fifo-dir", str(c.dir / "fifo"), "--exec-id", "x", "g2",
                  "echo", "from-g2")  # fmt: skip
    assert hello.stdout == b"from-g2\n"
    # removing the first task keeps the pod and its shim for the second
    c.ctr("task", "kill", "-s", "SIGKILL", "g1")
    events.wait("/tasks/exit", "g1")
    c.ctr("task", "delete", "g1")
    c.ctr("container", "rm", "g1")
    assert hyperd_pods(c)[f"{NAMESPACE}.grp1"]["containers"] == 1
    assert shims_of(c, "g1") == [shim]
    assert task_status(c, "g2") == "RUNNING"
    c.ctr("task", "kill", "-s", "SIGKILL", "g2")
    events.wait("/tasks/exit", "g2")
    c.ctr("task", "delete", "g2")
    c.ctr("container", "rm", "g2")
    assert_gone(c, "g1", f"{NAMESPACE}.grp1")


def test_run_on_a_terminal(containerd: Containerd) -> None:
    c = containerd
    inner = (
        f"ctr -a {c.socket} -n {NAMESPACE} run -t --rm --fifo-dir {c.dir / 'fifo'} "
        f"--runtime io.containerd.hyperd.v2 docker.io/library/hdbusybox:1 tty1 "
        "sh -c 'tty; test -t 0 && echo is-a-tty; exit 4'"
    )
    # script(1) gives ctr a real terminal; -e passes on the exit status
    result = subprocess.run(
        ["script", "-qec", inner, "/dev/null"], capture_output=True, timeout=CTR_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 4, result.stdout.decode(errors="replace")
    assert b"/dev/pts/" in result.stdout and b"is-a-tty" in result.stdout
    assert_gone(c, "tty1", f"{NAMESPACE}.tty1")


def test_containerd_restart_keeps_the_task(containerd: Containerd) -> None:
    c = containerd
    c.run("r1", "sleep", "1000", flags=("-d",))
    shim = shims_of(c, "r1")
    c.stop()
    c.start()
    assert task_status(c, "r1") == "RUNNING"
    assert shims_of(c, "r1") == shim
    ev = Events(c)
    try:
        c.ctr("task", "kill", "-s", "SIGKILL", "r1")
        assert ev.wait("/tasks/exit", "r1")["exit_status"] == 137  # events reconnect too
    finally:
        ev.close()
    c.ctr("task", "delete", "r1")
    c.ctr("container", "rm", "r1")
    assert_gone(c, "r1", f"{NAMESPACE}.r1")


def test_hyperd_restart_leaves_the_shim_working(containerd: Containerd, events: Events) -> None:
    c = containerd
    c.run("hr1", "sleep", "1000", flags=("-d",))
    c.hyperd.stop()  # the pod keeps running (the session's hyperd does not stop pods)
    c.hyperd.start(stop_pods_on_exit=False)
    after = c.ctr("task", "exec", "--fifo-dir", str(c.dir / "fifo"), "--exec-id", "a", "hr1",
                  "echo", "after-restart")  # fmt: skip
    assert after.stdout == b"after-restart\n"
    c.ctr("task", "kill", "-s", "SIGKILL", "hr1")
    assert events.wait("/tasks/exit", "hr1")["exit_status"] == 137
    c.ctr("task", "delete", "hr1")
    c.ctr("container", "rm", "hr1")
    assert_gone(c, "hr1", f"{NAMESPACE}.hr1")


def test_dead_shim_is_cleaned_up_by_the_delete_action(
    containerd: Containerd, events: Events
) -> None:
    c = containerd
    c.run("k1", "sleep", "1000", flags=("-d",))
    assert f"{NAMESPACE}.k1" in hyperd_pods(c)
    (shim,) = shims_of(c, "k1")
    os.kill(shim, signal.SIGKILL)
    assert wait_exit(shim)
    # containerd sees the connection close, runs `delete` and reports the task's end itself
    assert events.wait("/tasks/exit", "k1")["exit_status"] == 137
    events.wait("/tasks/delete", "k1")
    assert task_status(c, "k1") is None
    c.ctr("container", "rm", "k1")
    assert_gone(c, "k1", f"{NAMESPACE}.k1")


def test_exec_on_a_terminal(containerd: Containerd) -> None:
    c = containerd
    c.run("te1", "sleep", "1000", flags=("-d",))
    inner = (
        f"ctr -a {c.socket} -n {NAMESPACE} task exec -t --fifo-dir {c.dir / 'fifo'} "
        "--exec-id tx te1 sh -c 'tty; stty size; exit 6'"
    )
    result = subprocess.run(
        ["script", "-qec", inner, "/dev/null"], capture_output=True, timeout=CTR_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert result.returncode == 6, result.stdout.decode(errors="replace")
    assert b"/dev/pts/" in result.stdout
    c.ctr("task", "delete", "--force", "te1")
    c.ctr("container", "rm", "te1")
    assert_gone(c, "te1", f"{NAMESPACE}.te1")


def test_dead_vm_turns_into_an_exit(containerd: Containerd, events: Events) -> None:
    """The pod's VM dies under a running task: the task ends (status 255, unknown), and
    delete still cleans everything up."""
    c = containerd
    c.run("vm1", "sleep", "1000", flags=("-d",))
    vm_pid = hyperctl_json(c, "pod", "inspect", f"{NAMESPACE}.vm1")["vm_pid"]
    os.kill(vm_pid, signal.SIGKILL)
    assert events.wait("/tasks/exit", "vm1")["exit_status"] == 255
    assert task_status(c, "vm1") == "STOPPED"
    c.ctr("task", "delete", "vm1")
    c.ctr("container", "rm", "vm1")
    assert_gone(c, "vm1", f"{NAMESPACE}.vm1")
