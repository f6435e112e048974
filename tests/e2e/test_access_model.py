"""One access model, end to end: who may call hyperd may use the proxy sockets of its pods, and
nobody else can reach any socket, token or state file.

hyperd runs as root with ``rpc.group`` set to a fresh gid and ``rpc.allowed_host_paths`` set to
one directory. The callers are forked children of the test that drop to a non-root uid (real
kernel credentials: setgroups/setgid/setuid; no passwd entry is needed, SO_PEERCRED and the
file permission checks see numbers): a member of the group runs a container as a shim would
(pod.create, pod.start, container.create, ConnectShim with the token on the pod's proxy socket,
container.start, its output, its exit status) and is refused host paths outside the allowlist;
a user outside the group is refused at every socket and file.

The children are forks, not new interpreters: after dropping root they may not be able to read
the interpreter's files (a virtualenv under a 0700 home), so everything they run is imported
before the fork.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio._backends._asyncio
import pytest

from hyperd.cli.client import RPCClient, RPCError, ShimClient
from tests.conftest import make_busybox_rootfs
from tests.e2e.conftest import Hyperd

CHILD_DEADLINE = 60.0  # seconds for a child's whole flow: a pod start on a busy 2-core machine


def _free_id(taken: Callable[[int], object]) -> int:
    """A uid/gid in 40000-59999 that has no passwd/group entry (unique per test run)."""
    for candidate in range(40000 + os.getpid() % 10000, 60000):
        try:
            taken(candidate)
        except KeyError:
            return candidate
    raise AssertionError("no free id")


def _ids() -> tuple[int, int, int]:
    import grp
    import pwd

    group = _free_id(grp.getgrgid)
    member = _free_id(lambda n: pwd.getpwuid(n) if n != group else None)
    outsider = member + 1
    return group, member, outsider


def run_as(uid: int, groups: list[int], flow: Callable[[], Any]) -> Any:
    """Run ``flow()`` in a forked child with uid/gid ``uid`` and supplementary ``groups``;
    returns what it returned (JSON), or fails the test with the child's traceback."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 0
        try:
            os.close(read_fd)
            os.setgroups(groups)
            os.setgid(uid)
            os.setuid(uid)
            out = json.dumps({"result": flow()})
        except BaseException:
            out = json.dumps({"error": traceback.format_exc()})
            status = 1
        try:
            data = out.encode()
            while data:
                data = data[os.write(write_fd, data) :]
        finally:
            os._exit(status)
    os.close(write_fd)
    chunks = []
    with os.fdopen(read_fd, "rb") as pipe:
        while chunk := pipe.read(65536):
            chunks.append(chunk)
    os.waitpid(pid, 0)
    reply = json.loads(b"".join(chunks) or b'{"error": "the child wrote nothing"}')
    if "error" in reply:
        raise AssertionError(f"child (uid {uid}) failed:\n{reply['error']}")
    return reply["result"]


def _connect_errno(path: str) -> int:
    """0 if a unix socket connect to ``path`` succeeds, else its errno."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError as exc:
            return exc.errno or -1
    return 0


def _rpc_error(exc: RPCError) -> dict[str, Any]:
    return {"kind": exc.kind, "message": exc.message, "data": exc.data}


def member_flow(sock: str, pod: str, allowed_rootfs: str, allowed_vol: str, outside: str) -> Any:
    """As a group member: the whole life of a container, and the refusals of the allowlist."""

    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {}
        with anyio.fail_after(CHILD_DEADLINE):
            async with await RPCClient.connect(sock) as client:
                await client.call("pod.create", {"id": pod})
                started = await client.call("pod.start", {"id": pod})
                out["proxy_url"] = started.get("proxy_url")
                for field, params in (
                    ("rootfs", {"rootfs": {"path": outside}}),
                    (
                        "mount",
                        {
                            "rootfs": {"path": allowed_rootfs},
                            "mounts": [{"source": outside, "destination": "/data"}],
                        },
                    ),
                ):
                    try:
                        await client.call(
                            "container.create",
                            {"pod": pod, "id": f"bad-{field}", "process": {"args": ["true"]}}
                            | params,
                        )
                        out[f"refused_{field}"] = None
                    except RPCError as exc:
                        out[f"refused_{field}"] = _rpc_error(exc)
                created = await client.call(
                    "container.create",
                    {
                        "pod": pod,
                        "id": "c1",
                        "rootfs": {"path": allowed_rootfs},
                        "mounts": [
                            {"source": allowed_vol, "destination": "/vol", "options": ["ro"]}
                        ],
                        "process": {"args": ["sh", "-c", "cat /vol/note; echo member-ran"]},
                    },
                )
                shim = await ShimClient.connect(created["proxy_url"], created["token"])
                stdout = bytearray()
                try:
                    await shim.wait_connected()
                    await client.call("container.start", {"pod": pod, "id": "c1"})
                    out["status"] = await shim.pump(stdout.extend, lambda _data: None)
                finally:
                    await shim.aclose()
                out["stdout"] = stdout.decode()
                run_dir = os.path.dirname(created["proxy_url"].removeprefix("unix://"))
                out["ctl"] = _connect_errno(os.path.join(run_dir, "ctl.sock"))
        return out

    return anyio.run(main)


def member_call(sock: str, method: str, params: dict[str, Any]) -> Any:
    """One call as a group member: its result, or ``{"error": {kind, message, data}}``."""

    async def main() -> Any:
        with anyio.fail_after(CHILD_DEADLINE):
            async with await RPCClient.connect(sock) as client:
                try:
                    return await client.call(method, params)
                except RPCError as exc:
                    return {"error": _rpc_error(exc)}

    return anyio.run(main)


def member_start(sock: str, pod: str, cid: str, created: dict[str, Any]) -> dict[str, Any]:
    """As a group member: claim the created container's token, start it and collect its
    output; ``{"error": ...}`` if the start is refused."""

    async def main() -> dict[str, Any]:
        with anyio.fail_after(CHILD_DEADLINE):
            async with await RPCClient.connect(sock) as client:
                shim = await ShimClient.connect(created["proxy_url"], created["token"])
                stdout = bytearray()
                try:
                    await shim.wait_connected()
                    try:
                        await client.call("container.start", {"pod": pod, "id": cid})
                    except RPCError as exc:
                        return {"error": _rpc_error(exc)}
                    status = await shim.pump(stdout.extend, stdout.extend)
                finally:
                    await shim.aclose()
                return {"status": status, "stdout": stdout.decode(errors="replace")}

    return anyio.run(main)


def outsider_flow(sock: str, base: str, known: dict[str, str]) -> dict[str, Any]:
    """As a user outside the group: try the known sockets, then every socket, file and
    directory under the base dir."""
    reachable: list[str] = []
    refused = 0
    closed_dirs: list[str] = []

    def on_error(exc: OSError) -> None:
        if isinstance(exc, PermissionError) and exc.filename:
            closed_dirs.append(str(exc.filename))
        else:
            raise exc

    for root, _dirs, files in os.walk(base, onerror=on_error):
        for name in files:
            path = os.path.join(root, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISSOCK(mode):
                if _connect_errno(path) == 0:
                    reachable.append(path)
                else:
                    refused += 1
            elif stat.S_ISREG(mode):
                try:
                    with open(path, "rb"):
                        reachable.append(path)
                except PermissionError:
                    refused += 1
    return {
        "rpc": _connect_errno(sock),
        "known": {name: _connect_errno(path) for name, path in known.items()},
        "reachable": reachable,
        "refused": refused,
        "closed_dirs": sorted(closed_dirs),
    }


def _pod_sockets(hyperd: Hyperd, pod: str) -> dict[str, str]:
    run = hyperd.base / "run" / pod
    return {name: str(run / f"{name}.sock") for name in ("proxy", "ctl", "tty")}


def test_group_member_runs_a_container_and_outsiders_reach_nothing(
    hyperd_factory: Hyperd, short_tmp: Path
) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (it runs hyperd as root and drops to other uids)")
    group, member, outsider = _ids()
    os.chmod(short_tmp, 0o755)  # traversable: the callers reach the base dir through it
    allowed = short_tmp / "allowed"
    rootfs = make_busybox_rootfs(allowed / "rootfs")
    volume = allowed / "vol"
    volume.mkdir()
    (volume / "note").write_text("volume-ok\n")
    secret = short_tmp / "secret"
    secret.mkdir(mode=0o700)
    (secret / "file").write_text("root only\n")
    config = short_tmp / "hyperd.toml"
    config.write_text(f'[rpc]\ngroup = {group}\nallowed_host_paths = ["{allowed}"]\n')
    hyperd_factory.args = ["--config", str(config)]
    hyperd_factory.start()
    sock = hyperd_factory.socket
    assert os.stat(sock).st_gid == group

    got = run_as(
        member,
        [group],
        lambda: member_flow(sock, "mine", str(rootfs), str(volume), str(secret)),
    )
    assert got["status"] == 0, got
    assert got["stdout"] == "volume-ok\nmember-ran\n", got
    for field, path in (("rootfs", str(secret)), ("mount", str(secret))):
        refused = got[f"refused_{field}"]
        assert refused is not None, f"a {field} outside the allowlist was accepted"
        assert refused["kind"] == "invalid_params", refused
        assert path in refused["message"] and str(allowed) in refused["message"], refused
    assert got["ctl"] == errno.EACCES  # the VM's channels are hyperd's, not the callers'

    sockets = _pod_sockets(hyperd_factory, "mine")
    proxy = os.stat(sockets["proxy"])
    assert (proxy.st_gid, stat.S_IMODE(proxy.st_mode)) == (group, 0o660)
    run_dir = os.stat(os.path.dirname(sockets["proxy"]))
    assert (run_dir.st_gid, stat.S_IMODE(run_dir.st_mode)) == (group, 0o750)

    seen = run_as(
        outsider,
        [],
        lambda: outsider_flow(sock, str(hyperd_factory.base), sockets),
    )
    assert seen["rpc"] == errno.EACCES
    assert seen["known"] == {name: errno.EACCES for name in sockets}, seen
    assert seen["reachable"] == [], seen
    assert seen["refused"] >= 1, seen  # the RPC socket, found by the walk
    # the state (tokens), the pod's run dir (its sockets) and its share (the containers'
    # files and volumes) cannot even be listed
    assert seen["closed_dirs"] == sorted(
        [
            str(hyperd_factory.base / "state"),
            os.path.dirname(sockets["proxy"]),
            str(hyperd_factory.base / "shared" / "mine"),
        ]
    ), seen

    # a source checked at create and swapped for a symlink before it is mounted is not
    # followed. container.create begins mounting at once (in the background): whether the swap
    # comes before that mount (start is refused) or after it (the container sees the
    # directory that was checked), the secret never reaches the container
    swap = allowed / "swap"
    swap.mkdir()
    (swap / "note").write_text("swap-ok\n")
    created = run_as(
        member,
        [group],
        lambda: member_call(
            sock,
            "container.create",
            {
                "pod": "mine",
                "id": "swapped",
                "rootfs": {"path": str(rootfs)},
                "mounts": [{"source": str(swap), "destination": "/data"}],
                "process": {"args": ["sh", "-c", "cat /data/file /data/note; echo swapped-ran"]},
            },
        ),
    )
    assert "error" not in created, created
    swap.rename(allowed / "swap-old")
    swap.symlink_to(secret)
    ran = run_as(member, [group], lambda: member_start(sock, "mine", "swapped", created))
    assert "root only" not in ran.get("stdout", ""), ran
    if "error" in ran:
        assert ran["error"]["kind"] == "invalid_params", ran
        assert "symlink" in ran["error"]["message"], ran
    else:
        # (stdout and stderr arrive on their own streams: their order is not kept)
        assert "swap-ok\n" in ran["stdout"] and "swapped-ran\n" in ran["stdout"], ran
    run_as(
        member,
        [group],
        lambda: member_call(sock, "container.stop", {"pod": "mine", "id": "swapped"}),
    )
    run_as(
        member,
        [group],
        lambda: member_call(sock, "container.delete", {"pod": "mine", "id": "swapped"}),
    )
    # nothing of that container is left mounted
    swapped_mounts = [p for p in hyperd_factory.mounts_under_base() if "/swapped" in p]
    assert swapped_mounts == [], swapped_mounts

    # root is not restricted by the allowlist
    async def as_root() -> Any:
        async with await RPCClient.connect(sock) as client:
            return await client.call(
                "container.create",
                {
                    "pod": "mine",
                    "id": "root-c",
                    "rootfs": {"path": str(rootfs)},
                    "mounts": [{"source": str(secret), "destination": "/secret"}],
                    "process": {"args": ["true"]},
                },
            )

    assert anyio.run(as_root)["id"] == "root-c"
