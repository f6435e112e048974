"""Peer credentials: SO_PEERCRED, supplementary groups, refusing other users."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import anyio
import pytest

from hyperd.errors import Unauthorized
from hyperd.rpc import AccessPolicy, PeerCredentials, peer_credentials
from hyperd.rpc.access import read_supplementary_groups
from tests.rpc.support import DEADLINE, running_server

API_GID = 4242
NOBODY = 65534

# Runs as another user, so only the system interpreter (readable by everybody) and the stdlib.
# Prints {"first": <first message>, "eof": <whether the server then closed the connection>}.
CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
try:
    s.sendall(b'{"jsonrpc": "2.0", "method": "whoami", "id": 1}\\n')
except OSError:
    pass
data = b""
while b"\\n" not in data:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
first, _, rest = data.partition(b"\\n")
eof = False
if sys.argv[2] == "wait-eof":
    try:
        eof = not rest and s.recv(65536) == b""
    except ConnectionResetError:
        eof = True
print(json.dumps({"first": json.loads(first), "eof": eof}))
"""


def system_python() -> str:
    python = shutil.which("python3", path="/usr/bin:/bin")
    assert python is not None, "a system python3 is needed to run a client as another user"
    return python


async def run_as(setpriv_args: list[str], path: Path, mode: str) -> dict[str, Any]:
    """Run the client under ``setpriv`` and return what it saw."""
    cmd = ["setpriv", *setpriv_args, "--", system_python(), "-I", "-c", CLIENT, str(path), mode]
    with anyio.fail_after(DEADLINE):
        result = await anyio.run_process(cmd)
    return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.fixture
def shared_dir(short_tmp: Path) -> Path:
    short_tmp.chmod(0o755)  # let the other user reach the socket
    return short_tmp


@pytest.mark.anyio
async def test_other_user_refused(shared_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = shared_dir / "rpc.sock"
    async with running_server(path, access=AccessPolicy(group_gid=API_GID)) as server:
        path.chmod(0o666)  # the kernel lets them in; the credential check must not
        with caplog.at_level(logging.WARNING, logger="hyperd.rpc"):
            seen = await run_as(
                [f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"], path, "wait-eof"
            )
        refusal = seen["first"]
        assert seen["eof"] is True
        assert refusal["id"] is None and "result" not in refusal
        error = refusal["error"]
        assert error["code"] == Unauthorized.code
        assert f"uid {NOBODY}" in error["message"] and str(API_GID) in error["message"]
        assert error["data"]["kind"] == "unauthorized"
        assert error["data"]["uid"] == NOBODY
        assert any("refused" in r.getMessage() for r in caplog.records)
        assert server.statistics().refused == 1


@pytest.mark.anyio
async def test_no_group_configured_refuses_non_root(shared_dir: Path) -> None:
    path = shared_dir / "rpc.sock"
    async with running_server(path, access=AccessPolicy()):
        path.chmod(0o666)
        seen = await run_as(
            [f"--reuid={NOBODY}", f"--regid={API_GID}", "--clear-groups"], path, "wait-eof"
        )
        assert seen["first"]["error"]["code"] == Unauthorized.code
        assert "root required" in seen["first"]["error"]["message"]
        assert seen["eof"] is True


@pytest.mark.anyio
@pytest.mark.parametrize(
    "setpriv_args",
    [
        [f"--reuid={NOBODY}", f"--regid={NOBODY}", f"--groups={API_GID}"],
        [f"--reuid={NOBODY}", f"--regid={API_GID}", "--clear-groups"],
    ],
    ids=["supplementary-group", "primary-group"],
)
async def test_group_member_allowed(shared_dir: Path, setpriv_args: list[str]) -> None:
    path = shared_dir / "rpc.sock"
    async with running_server(path, access=AccessPolicy(group_gid=API_GID)) as server:
        path.chmod(0o666)
        seen = await run_as(setpriv_args, path, "one-line")
        assert seen["first"]["id"] == 1
        assert seen["first"]["result"]["uid"] == NOBODY
        assert server.statistics().refused == 0


def test_access_policy_table() -> None:
    policy = AccessPolicy(group_gid=API_GID, server_uid=1000)
    assert policy.allows(PeerCredentials(pid=1, uid=0, gid=0))
    assert policy.allows(PeerCredentials(pid=1, uid=1000, gid=1000))
    assert policy.allows(PeerCredentials(pid=1, uid=7, gid=API_GID))
    assert policy.allows(PeerCredentials(pid=1, uid=7, gid=7, groups=frozenset({1, API_GID})))
    assert not policy.allows(PeerCredentials(pid=1, uid=7, gid=7, groups=frozenset({1, 2})))
    no_group = AccessPolicy(group_gid=None, server_uid=1000)
    assert not no_group.allows(PeerCredentials(pid=1, uid=7, gid=API_GID))
    err = policy.refusal(PeerCredentials(pid=9, uid=7, gid=7))
    assert isinstance(err, Unauthorized)
    assert err.to_error_data() == {
        "kind": "unauthorized",
        "uid": 7,
        "pid": 9,
        "required": f"gid {API_GID}",
    }


def test_peer_credentials_of_a_socketpair() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        peer = peer_credentials(a)
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.geteuid(), os.getegid())
    assert peer.groups == frozenset(os.getgroups())
    assert read_supplementary_groups(os.getpid()) == frozenset(os.getgroups())
    assert read_supplementary_groups(2**22 + 12345) == frozenset()  # no such process
