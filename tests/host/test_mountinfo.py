"""/proc/self/mountinfo filtering on a path prefix, with paths the kernel escapes.

``read_mountinfo(under)`` searches the file for the *escaped* form of ``under``; these tests check
it against a naive reference (every line parsed and unescaped, then filtered) with shared roots
whose names contain a space, a tab, a newline and a backslash, next to a sibling whose name is a
prefix of theirs.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hyperd.errors import AlreadyExists
from hyperd.host.mounts import MAX_UNMOUNT_ROUNDS, SharedDir
from hyperd.host.mountsys import (
    MOUNTINFO,
    MountInfo,
    escape_path,
    read_mountinfo,
    read_mountinfo_prefix,
    unescape_path,
)
from hyperd.spec import MountSpec

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for mount(2)")

ODD_NAMES = ["sh ared", "tab\there", "new\nline", "back\\slash", "\\040literal"]


def reference_mountinfo() -> list[MountInfo]:
    """Every line parsed and unescaped, char by char (independent of the code under test)."""

    def unescape(field: str) -> str:
        out, i = [], 0
        while i < len(field):
            code = field[i + 1 : i + 4]
            if field[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
                out.append(chr(int(code, 8)))
                i += 4
            else:
                out.append(field[i])
                i += 1
        return "".join(out)

    with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
        lines = f.read().split("\n")
    return [
        MountInfo(int(fields[0]), int(fields[1]), unescape(fields[4]))
        for line in lines
        if len(fields := line.split(" ")) >= 5
    ]


def reference_under(top: Path) -> list[MountInfo]:
    t = str(top)
    return [
        m for m in reference_mountinfo() if m.mount_point == t or m.mount_point.startswith(t + "/")
    ]


@given(st.text())
def test_escape_round_trip(path: str) -> None:
    escaped = escape_path(path)
    assert not any(c in escaped for c in " \t\n")
    assert unescape_path(escaped) == path


def test_escapes_are_the_kernels() -> None:
    assert escape_path("/a b\tc\nd\\e") == "/a\\040b\\011c\\012d\\134e"
    assert unescape_path("/x\\134040y") == "/x\\040y"  # an escaped backslash is not an escape


def test_unfiltered_read_matches_reference() -> None:
    assert read_mountinfo() == reference_mountinfo()
    assert read_mountinfo("/") == reference_mountinfo()


@pytest.fixture
def odd_roots(tmp_path: Path) -> Iterator[list[Path]]:
    """tmp_path/<odd name> directories, each with a bind mount of tmp_path/src on it and one on
    its subdirectory; plus tmp_path/"sh", a sibling whose name prefixes "sh ared", mounted too.
    Everything is detached afterwards."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    roots = [tmp_path / name for name in [*ODD_NAMES, "sh"]]
    for root in roots:
        root.mkdir()
        for point in (root, root / "sub"):
            subprocess.run(["mount", "--bind", str(src), str(point)], check=True)
    yield roots
    for m in sorted(reference_under(tmp_path), key=lambda m: len(m.mount_point), reverse=True):
        subprocess.run(["umount", "-l", m.mount_point], check=False, capture_output=True)
    assert reference_under(tmp_path) == []


@needs_root
def test_filtered_read_matches_reference(odd_roots: list[Path], tmp_path: Path) -> None:
    for root in odd_roots:
        expected = reference_under(root)
        assert [m.mount_point for m in expected] == [str(root), str(root / "sub")]
        assert read_mountinfo(root) == expected
        assert read_mountinfo(str(root / "sub")) == reference_under(root / "sub")
    # the sibling "sh" does not pick up "sh ared"'s mounts, nor the other way round
    assert {m.mount_point for m in read_mountinfo(tmp_path / "sh")} == {
        str(tmp_path / "sh"),
        str(tmp_path / "sh" / "sub"),
    }
    assert read_mountinfo(tmp_path / "s") == []
    # a string prefix matches inside names too: "sh" finds "sh" and "sh ared"
    for prefix in (str(tmp_path / "sh"), str(tmp_path / "s"), str(tmp_path / "back\\")):
        expected = [m for m in reference_mountinfo() if m.mount_point.startswith(prefix)]
        assert read_mountinfo_prefix(prefix) == expected
        assert expected
    assert read_mountinfo(tmp_path) == reference_under(tmp_path)


@needs_root
@pytest.mark.parametrize("name", ["sh ared", "back\\slash"])
def test_shared_dir_with_escaped_root(name: str, tmp_path: Path, busybox_rootfs: Path) -> None:
    """Every SharedDir operation gives the same result under a root the kernel escapes."""
    shared = SharedDir(tmp_path / name / "pods")
    sibling = SharedDir(tmp_path / name.split(" ")[0].split("\\")[0] / "pods")
    data = tmp_path / "my data"
    data.mkdir()
    volumes: dict[Path, str] = {}
    try:
        for s in (shared, sibling):
            target = s.mount_rootfs("p1", "c1", str(busybox_rootfs))
            with pytest.raises(AlreadyExists):
                s.mount_rootfs("p1", "c1", str(busybox_rootfs))
            (vol,) = s.mount_volumes("p1", "c1", [MountSpec(source=str(data), destination="/d")])
            volumes[s.root] = vol.host_path
            s.mount_rootfs("p1", "c2", str(busybox_rootfs))
            expected = [m.mount_point for m in reference_under(s.root / "p1")]
            assert sorted(s.mounted("p1")) == sorted(expected)
            assert sorted(expected) == sorted(
                [target, vol.host_path, str(s.rootfs_path("p1", "c2"))]
            )
        shared.unmount_container("p1", "c1")
        assert [m.mount_point for m in reference_under(shared.root)] == [
            str(shared.rootfs_path("p1", "c2"))
        ]
        assert not shared.container_dir("p1", "c1").exists()
        assert not Path(volumes[shared.root]).exists()
        assert len(reference_under(sibling.root)) == 3  # the sibling root is untouched
        shared.cleanup_pod("p1")
        assert reference_under(shared.root) == []
        assert not (shared.root / "p1").exists()
        assert len(reference_under(sibling.root)) == 3
        sibling.cleanup_pod("p1")
        assert reference_under(sibling.root) == []
    finally:
        for m in sorted(reference_under(tmp_path), key=lambda m: len(m.mount_point), reverse=True):
            subprocess.run(["umount", "-l", m.mount_point], check=False, capture_output=True)


@needs_root
def test_cleanup_of_more_mounts_than_unmount_rounds(tmp_path: Path) -> None:
    """A pod with more mounts than MAX_UNMOUNT_ROUNDS is cleaned up (each round detaches every
    mount one read of mountinfo shows, not one mount)."""
    shared = SharedDir(tmp_path / "sh ared")
    data = tmp_path / "data"
    data.mkdir()
    count = MAX_UNMOUNT_ROUNDS + 1
    try:
        specs = [MountSpec(source=str(data), destination=f"/v{i}") for i in range(count)]
        made = shared.mount_volumes("p1", "c1", specs)
        assert len(made) == count == len(reference_under(shared.root))
        shared.cleanup_pod("p1")
        assert reference_under(shared.root) == []
        assert not (shared.root / "p1").exists()
    finally:
        for m in sorted(reference_under(tmp_path), key=lambda m: len(m.mount_point), reverse=True):
            subprocess.run(["umount", "-l", m.mount_point], check=False, capture_output=True)
