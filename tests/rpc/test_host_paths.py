"""HostPathPolicy: which host paths a caller other than root may have hyperd bind-mount.

Real directories and symlinks in a temporary tree; the policy resolves them as hyperd would.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hyperd.errors import InvalidParams
from hyperd.rpc.access import HostPathPolicy, PeerCredentials

USER = PeerCredentials(pid=1, uid=1000, gid=1000)
ROOT = PeerCredentials(pid=1, uid=0, gid=0)
SERVER_UID = 4242  # the daemon's own uid in these tests (not root, not USER)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "allowed" / "rootfs").mkdir(parents=True)
    (tmp_path / "allowed-not").mkdir()
    (tmp_path / "secret").mkdir()
    (tmp_path / "allowed" / "escape").symlink_to(tmp_path / "secret")
    (tmp_path / "link-in").symlink_to(tmp_path / "allowed" / "rootfs")
    return tmp_path


@pytest.mark.parametrize("path", ["allowed", "allowed/rootfs", "allowed/missing/x", "link-in"])
def test_paths_under_the_list_are_allowed(tree: Path, path: str) -> None:
    policy = HostPathPolicy([str(tree / "allowed")], server_uid=SERVER_UID)
    real = policy.check(USER, "rootfs.path", str(tree / path))
    assert real == os.path.realpath(tree / path)  # what is recorded, and mounted with no links


@pytest.mark.parametrize(
    ("path", "resolved"),
    [
        ("secret", None),
        ("allowed-not", None),  # a sibling sharing the prefix is not below it
        ("allowed/escape", "secret"),  # a link inside that leads out
        ("allowed/../secret", "secret"),
    ],
)
def test_paths_outside_are_refused_with_their_name(
    tree: Path, path: str, resolved: str | None
) -> None:
    policy = HostPathPolicy([str(tree / "allowed")], server_uid=SERVER_UID)
    with pytest.raises(InvalidParams) as err:
        policy.check(USER, "mounts[0].source", str(tree / path))
    message = err.value.message
    assert message.startswith(f"mounts[0].source '{tree / path}'")
    if resolved is not None:
        assert f"resolves to {tree / resolved}" in message
    assert "uid 1000" in message and str(tree / "allowed") in message
    assert err.value.to_error_data() == {
        "kind": "invalid_params",
        "field": "mounts[0].source",
        "path": str(tree / path),
    }


def test_root_and_the_server_uid_are_not_restricted(tree: Path) -> None:
    policy = HostPathPolicy([str(tree / "allowed")], server_uid=SERVER_UID)
    own = PeerCredentials(pid=1, uid=SERVER_UID, gid=SERVER_UID)
    for peer in (ROOT, own):
        assert not policy.restricts(peer)
        policy.check(peer, "rootfs.path", str(tree / "secret"))
    assert policy.restricts(USER)


def test_unset_list_allows_anything_and_an_empty_one_nothing(tree: Path) -> None:
    HostPathPolicy(None, server_uid=SERVER_UID).check(USER, "rootfs.path", "/")
    with pytest.raises(InvalidParams, match=r"rpc\.allowed_host_paths: none"):
        HostPathPolicy([], server_uid=SERVER_UID).check(USER, "rootfs.path", str(tree))


def test_a_listed_path_that_is_a_link_is_resolved_once(tree: Path) -> None:
    (tree / "srv").symlink_to(tree / "allowed")
    policy = HostPathPolicy([str(tree / "srv")], server_uid=SERVER_UID)
    policy.check(USER, "rootfs.path", str(tree / "allowed" / "rootfs"))
    assert policy.allowed == (os.path.realpath(tree / "allowed"),)
