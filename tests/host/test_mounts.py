"""Real bind mounts into a shared dir (root): rootfs, volumes, read-only, cleanup, traversal."""

from __future__ import annotations

import errno
import gc
import os
import re
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperd.errors import AlreadyExists, InvalidParams
from hyperd.host.mounts import SharedDir, is_system_mount
from hyperd.host.mountsys import read_mountinfo
from hyperd.spec import DirRootfs, MountSpec

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for mount(2)"),
]


def open_fds() -> set[str]:
    """This process's open fds, once garbage left by earlier tests is collected (quietly: its
    ResourceWarnings are not this test's business)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    return set(os.listdir("/proc/self/fd"))


def mounts_under(path: Path) -> list[str]:
    top = str(path)
    return [
        m.mount_point
        for m in read_mountinfo()
        if m.mount_point == top or m.mount_point.startswith(top + "/")
    ]


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[SharedDir]:
    """A SharedDir under tmp_path; whatever is still mounted below tmp_path is detached after
    the test, whatever happened (independently of the code under test)."""
    yield SharedDir(tmp_path / "shared")
    for point in sorted(mounts_under(tmp_path), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    assert mounts_under(tmp_path) == []


def test_mount_rootfs_read_write(shared: SharedDir, busybox_rootfs: Path) -> None:
    target = shared.mount_rootfs("p1", "c1", str(busybox_rootfs))
    assert target == str(shared.root / "p1" / "c1" / "rootfs")
    assert mounts_under(shared.root) == [target]
    assert (Path(target) / "bin" / "busybox").is_file()
    (Path(target) / "tmp" / "hello").write_text("hi")
    assert (busybox_rootfs / "tmp" / "hello").read_text() == "hi"
    assert shared.mounted("p1") == [target]


def test_mount_rootfs_read_only_is_enforced(shared: SharedDir, busybox_rootfs: Path) -> None:
    target = Path(shared.mount_rootfs("p1", "c1", str(busybox_rootfs), readonly=True))
    with pytest.raises(OSError) as info:
        (target / "tmp" / "x").write_text("no")
    assert info.value.errno == errno.EROFS
    (busybox_rootfs / "tmp" / "y").write_text("source stays writable")
    assert (target / "tmp" / "y").read_text() == "source stays writable"


def test_rootfs_source_symlink_is_resolved(
    shared: SharedDir, busybox_rootfs: Path, tmp_path: Path
) -> None:
    link = tmp_path / "link"
    link.symlink_to(busybox_rootfs)
    target = Path(shared.mount_rootfs("p1", "c1", str(link)))
    assert (target / "bin" / "sh").exists()
    assert not target.is_symlink()


def test_rootfs_missing_source(shared: SharedDir, tmp_path: Path) -> None:
    with pytest.raises(InvalidParams, match="does not exist") as info:
        shared.mount_rootfs("p1", "c1", str(tmp_path / "nope"))
    assert info.value.data == {"field": "rootfs.path"}
    assert mounts_under(shared.root) == []


def test_rootfs_mounted_twice(shared: SharedDir, busybox_rootfs: Path) -> None:
    shared.mount_rootfs("p1", "c1", str(busybox_rootfs))
    with pytest.raises(AlreadyExists):
        shared.mount_rootfs("p1", "c1", str(busybox_rootfs))
    assert len(mounts_under(shared.root)) == 1


VOLUME_NAME = re.compile(r"c1-[0-9a-f]{16}-(.+)")


def test_mount_volumes(shared: SharedDir, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("data")
    conf = tmp_path / "app.conf"
    conf.write_text("conf")
    mounts = [
        MountSpec(source=str(data), destination="/srv/data"),
        MountSpec(source=str(conf), destination="/etc/app.conf", options=["rbind", "ro"]),
        MountSpec(source="tmpfs", destination="/run", type="tmpfs"),
        MountSpec(source=str(data), destination="/proc/x"),
        MountSpec(source=str(data), destination="/sys"),
        MountSpec(source=str(data), destination="/dev/shm"),
        MountSpec(source=str(data), destination="/my data/"),
    ]
    made = shared.mount_volumes("p1", "c1", mounts)
    assert [(m.destination, m.read_only) for m in made] == [
        ("/srv/data", False),
        ("/etc/app.conf", True),
        ("/my data/", False),
    ]
    bases = []
    for m in made:
        match = VOLUME_NAME.fullmatch(m.source)
        assert match, m.source
        bases.append(match.group(1))
        assert m.host_path == str(shared.root / "p1" / m.source)
    assert bases == ["data", "app.conf", "my data"]
    assert sorted(mounts_under(shared.root)) == sorted(m.host_path for m in made)
    dir_vol, file_vol, spaced = (Path(m.host_path) for m in made)
    assert (dir_vol / "f").read_text() == "data"
    (dir_vol / "g").write_text("rw")
    assert (data / "g").read_text() == "rw"
    assert file_vol.read_text() == "conf"
    with pytest.raises(OSError) as info:
        file_vol.write_text("x")
    assert info.value.errno == errno.EROFS
    assert (spaced / "f").exists()
    # the space in the mount point comes back from mountinfo unescaped, so cleanup finds it
    shared.cleanup_pod("p1")
    assert mounts_under(shared.root) == []
    assert not (shared.root / "p1").exists()
    assert (data / "f").read_text() == "data"


def test_volume_failure_undoes_the_earlier_ones(shared: SharedDir, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    mounts = [
        MountSpec(source=str(data), destination="/a"),
        MountSpec(source=str(tmp_path / "missing"), destination="/b"),
    ]
    with pytest.raises(InvalidParams, match="source"):
        shared.mount_volumes("p1", "c1", mounts)
    assert mounts_under(shared.root) == []
    assert list((shared.root / "p1").iterdir()) == []


def test_mount_container_is_all_or_nothing(
    shared: SharedDir, busybox_rootfs: Path, tmp_path: Path
) -> None:
    bad = [MountSpec(source=str(tmp_path / "missing"), destination="/b")]
    with pytest.raises(InvalidParams):
        shared.mount_container("p1", "c1", DirRootfs(path=str(busybox_rootfs)), bad)
    assert mounts_under(shared.root) == []
    assert not (shared.root / "p1" / "c1").exists()
    data = tmp_path / "data"
    data.mkdir()
    good = [MountSpec(source=str(data), destination="/d")]
    made = shared.mount_container("p1", "c1", DirRootfs(path=str(busybox_rootfs)), good)
    assert made.rootfs == str(shared.rootfs_path("p1", "c1"))
    assert len(made.volumes) == 1
    block = shared.mount_container("p1", "c2", None, good)
    assert block.rootfs is None
    assert len(mounts_under(shared.root)) == 3


def test_unmount_container_leaves_the_others(
    shared: SharedDir, busybox_rootfs: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    vols = [MountSpec(source=str(data), destination="/d")]
    c1 = shared.mount_container("p1", "c1", DirRootfs(path=str(busybox_rootfs)), vols)
    c12 = shared.mount_container("p1", "c1-x", DirRootfs(path=str(busybox_rootfs)), vols)
    shared.unmount_container("p1", "c1")
    remaining = sorted(mounts_under(shared.root))
    assert c12.rootfs is not None
    assert remaining == sorted([c12.rootfs, c12.volumes[0].host_path])
    assert not (shared.root / "p1" / "c1").exists()
    assert not Path(c1.volumes[0].host_path).exists()
    shared.unmount_container("p1", "c1")  # idempotent
    shared.unmount_container("p1", "c1-x")
    assert mounts_under(shared.root) == []
    assert list((shared.root / "p1").iterdir()) == []
    assert (busybox_rootfs / "bin" / "busybox").exists()


def test_cleanup_pod_handles_stacked_and_busy_mounts(
    shared: SharedDir, busybox_rootfs: Path, tmp_path: Path
) -> None:
    target = Path(shared.mount_rootfs("p1", "c1", str(busybox_rootfs)))
    # a crash left an extra mount stacked on the same point and one nested below it
    other = tmp_path / "other"
    other.mkdir()
    subprocess.run(["mount", "--bind", str(other), str(target)], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)], check=True)
    (target / "sub").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target / "sub")], check=True)
    assert len(mounts_under(shared.root)) == 4
    busy = os.open(target / "sub", os.O_RDONLY)  # keeps the nested mount busy
    try:
        SharedDir(shared.root).cleanup_pod("p1")  # a fresh object: nothing recorded
    finally:
        os.close(busy)
    assert mounts_under(shared.root) == []
    assert not (shared.root / "p1").exists()
    assert (busybox_rootfs / "bin" / "busybox").exists()
    shared.cleanup_pod("p1")  # idempotent


def test_create_pod(shared: SharedDir) -> None:
    path = shared.create_pod("p1")
    assert path == shared.root / "p1"
    assert path.is_dir()
    assert shared.create_pod("p1") == path


@pytest.mark.parametrize(
    ("pod", "cid"), [("..", "c1"), ("p1", ".."), ("p1", "a/b"), ("../p", "c"), ("p1", "")]
)
def test_traversal_ids_refused(
    shared: SharedDir, busybox_rootfs: Path, tmp_path: Path, pod: str, cid: str
) -> None:
    with pytest.raises(InvalidParams, match="_id"):
        shared.mount_rootfs(pod, cid, str(busybox_rootfs))
    with pytest.raises(InvalidParams):
        shared.mount_volumes(pod, cid, [MountSpec(source=str(busybox_rootfs), destination="/x")])
    with pytest.raises(InvalidParams):
        shared.unmount_container(pod, cid)
    assert mounts_under(tmp_path) == []


def test_cleanup_pod_refuses_bad_ids(shared: SharedDir) -> None:
    for pod in ("..", ".", "", "a/b"):
        with pytest.raises(InvalidParams):
            shared.cleanup_pod(pod)


def test_planted_symlink_in_the_share_is_not_followed(
    shared: SharedDir, busybox_rootfs: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    pod_dir = shared.create_pod("p1")
    (pod_dir / "c1").symlink_to(elsewhere)
    with pytest.raises(InvalidParams, match="symlink"):
        shared.mount_rootfs("p1", "c1", str(busybox_rootfs))
    assert mounts_under(tmp_path) == []
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize(
    ("dest", "system"),
    [
        ("/proc", True),
        ("/proc/sys", True),
        ("/sys/fs/cgroup", True),
        ("/dev", True),
        ("/dev/shm", True),
        ("/devices", False),
        ("/procfs", False),
        ("/data", False),
    ],
)
def test_is_system_mount(dest: str, system: bool) -> None:
    assert is_system_mount(dest) is system


def test_sources_inside_the_shared_root_are_refused(
    shared: SharedDir, busybox_rootfs: Path
) -> None:
    target = shared.mount_rootfs("p1", "c1", str(busybox_rootfs))
    with pytest.raises(InvalidParams, match="inside the shared root"):
        shared.mount_rootfs("p2", "c1", target)
    with pytest.raises(InvalidParams, match="inside the shared root"):
        shared.mount_volumes("p2", "c1", [MountSpec(source=target, destination="/x")])
    assert mounts_under(shared.root) == [target]


def test_no_file_descriptor_leaks(shared: SharedDir, busybox_rootfs: Path, tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    conf.write_text("x")
    vols = [MountSpec(source=str(conf), destination="/etc/conf", options=["ro"])]
    shared.create_pod("p0")
    before = open_fds()
    for i in range(3):
        shared.mount_container(
            "p1", f"c{i}", DirRootfs(path=str(busybox_rootfs), readonly=True), vols
        )
    (shared.root / "p1" / "evil").symlink_to(tmp_path)
    with pytest.raises(InvalidParams):
        shared.mount_rootfs("p1", "evil", str(busybox_rootfs))
    with pytest.raises(InvalidParams):
        shared.mount_volumes("p1", "c9", [MountSpec(source="/nonexistent", destination="/x")])
    shared.unmount_container("p1", "c0")
    shared.cleanup_pod("p1")
    assert open_fds() - before == set()
    assert mounts_under(shared.root) == []
