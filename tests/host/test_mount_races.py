"""Mounts without a window: a source swapped for a symlink while it is mounted, unmounting what
was recorded without the mount table, and the pod share's mode (real mounts, root)."""

from __future__ import annotations

import ctypes
import os
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperd.errors import AlreadyExists, InvalidParams
from hyperd.host import mounts as mounts_module
from hyperd.host.mounts import POD_DIR_MODE, SharedDir
from hyperd.host.mountsys import MountInfo, read_mountinfo
from hyperd.spec import DirRootfs, MountSpec

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for mount(2)"),
]

RENAME_EXCHANGE = 2  # <linux/fs.h>: swap two names atomically
RACE_STARTS = 120  # the probe of the issue: 120 starts with the swap loop running
MAX_RACE_STARTS = 2000  # more starts, until both outcomes of the race were seen at least once
_libc = ctypes.CDLL(None, use_errno=True)


def mounts_under(path: Path) -> list[str]:
    top = str(path)
    return [
        m.mount_point
        for m in read_mountinfo()
        if m.mount_point == top or m.mount_point.startswith(top + "/")
    ]


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[SharedDir]:
    yield SharedDir(tmp_path / "shared")
    for point in sorted(mounts_under(tmp_path), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    assert mounts_under(tmp_path) == []


def exchange(directory: Path, a: str, b: str) -> None:
    fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
    try:
        rc = _libc.renameat2(fd, a.encode(), fd, b.encode(), RENAME_EXCHANGE)
        if rc != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def test_exchange_race_never_mounts_another_pods_volume(shared: SharedDir, tmp_path: Path) -> None:
    """The race probe: while container mounts run, a loop swaps the attacker's source directory
    with a symlink into another pod's share (renameat2 RENAME_EXCHANGE). Every mount either is
    refused or holds the attacker's own directory: 0 foreign mounts in 120 starts."""
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "VICTIM").write_text("victim data")
    victim = shared.mount_volumes("victim", "v", [MountSpec(source=str(secret), destination="/s")])
    attacker = tmp_path / "attacker"
    attacker.mkdir()
    (attacker / "src").mkdir()
    (attacker / "src" / "ATTACKER").write_text("mine")
    (attacker / "alt").symlink_to(victim[0].host_path)

    stop = threading.Event()
    swaps = 0

    def swap_loop() -> None:
        nonlocal swaps
        while not stop.is_set():
            exchange(attacker, "src", "alt")
            swaps += 1
            if swaps % 7 == 0:
                os.sched_yield()  # vary the interleaving with the mounting thread

    swapper = threading.Thread(target=swap_loop, daemon=True)
    swapper.start()
    foreign = mounted = refused = 0
    try:
        for i in range(MAX_RACE_STARTS):
            if i >= RACE_STARTS and mounted and refused:
                break
            cid = f"c{i}"
            vols = [MountSpec(source=str(attacker / "src"), destination="/data")]
            try:
                made = shared.mount_container(
                    "evil", cid, DirRootfs(path=str(attacker / "src")), vols
                )
            except InvalidParams:
                refused += 1
                continue
            mounted += 1
            assert made.rootfs is not None
            for point in [made.rootfs, *(v.host_path for v in made.volumes)]:
                names = set(os.listdir(point))
                if "VICTIM" in names or names != {"ATTACKER"}:
                    foreign += 1
            shared.unmount_recorded(
                "evil", cid, [made.rootfs, *(v.host_path for v in made.volumes)]
            )
    finally:
        stop.set()
        swapper.join()
    # the swap really raced the mounts: both outcomes were seen
    assert swaps > 0
    assert mounted > 0 and refused > 0, (mounted, refused)
    assert foreign == 0
    assert sorted(mounts_under(shared.root)) == [victim[0].host_path]


def test_unmount_recorded_reads_no_mount_table(
    shared: SharedDir, busybox_rootfs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    conf = tmp_path / "conf"
    conf.write_text("x")
    vols = [
        MountSpec(source=str(data), destination="/d"),
        MountSpec(source=str(conf), destination="/etc/conf", options=["ro"]),
    ]
    made = shared.mount_container("p1", "c1", DirRootfs(path=str(busybox_rootfs)), vols)
    other = shared.mount_container("p1", "c2", DirRootfs(path=str(busybox_rootfs)), vols)
    assert made.rootfs is not None
    targets = [made.rootfs, *(v.host_path for v in made.volumes)]

    def no_scan(*args: object) -> list[MountInfo]:
        raise AssertionError("the mount table was read")

    monkeypatch.setattr(mounts_module, "read_mountinfo", no_scan)
    monkeypatch.setattr(mounts_module, "read_mountinfo_prefix", no_scan)
    shared.unmount_recorded("p1", "c1", targets)
    shared.unmount_recorded("p1", "c1", targets)  # idempotent
    monkeypatch.undo()
    assert other.rootfs is not None
    assert sorted(mounts_under(shared.root)) == sorted(
        [other.rootfs, *(v.host_path for v in other.volumes)]
    )
    assert not (shared.root / "p1" / "c1").exists()
    assert not any(Path(t).exists() for t in targets[1:])
    assert (data.exists(), conf.read_text()) == (True, "x")  # the sources are untouched


def test_unmount_recorded_can_leave_the_directory_for_later(
    shared: SharedDir, busybox_rootfs: Path, tmp_path: Path
) -> None:
    """container.stop's way: the mounts go (volume mount points too), the container's
    directory stays until unmount_container (container.delete) removes it."""
    data = tmp_path / "data"
    data.mkdir()
    made = shared.mount_container(
        "p1",
        "c1",
        DirRootfs(path=str(busybox_rootfs)),
        [MountSpec(source=str(data), destination="/d")],
    )
    assert made.rootfs is not None
    targets = [made.rootfs, *(v.host_path for v in made.volumes)]
    shared.unmount_recorded("p1", "c1", targets, remove_dir=False)
    assert mounts_under(shared.root) == []
    assert Path(made.rootfs).is_dir()  # the empty mount point, left for later
    assert not any(Path(t).exists() for t in targets[1:])
    shared.unmount_container("p1", "c1")
    assert not (shared.root / "p1" / "c1").exists()


def test_unmount_recorded_falls_back_to_a_scan_for_unrecorded_mounts(
    shared: SharedDir, busybox_rootfs: Path, tmp_path: Path
) -> None:
    made = shared.mount_container("p1", "c1", DirRootfs(path=str(busybox_rootfs)), [])
    assert made.rootfs is not None
    # something the record does not know about: a tmpfs under the container's directory
    extra = shared.container_dir("p1", "c1") / "extra"
    extra.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(extra)], check=True)
    (extra / "file").write_text("on the tmpfs")
    shared.unmount_recorded("p1", "c1", [made.rootfs])
    assert mounts_under(shared.root) == []
    assert not (shared.root / "p1" / "c1").exists()
    assert (busybox_rootfs / "bin" / "busybox").exists()


def test_unmount_recorded_refuses_foreign_targets(shared: SharedDir, busybox_rootfs: Path) -> None:
    made = shared.mount_container("p1", "c1", DirRootfs(path=str(busybox_rootfs)), [])
    assert made.rootfs is not None
    for target in (str(busybox_rootfs), str(shared.root / "p1" / "c2" / "rootfs"), "/"):
        with pytest.raises(InvalidParams, match="not a mount point of container"):
            shared.unmount_recorded("p1", "c1", [target])
    assert mounts_under(shared.root) == [made.rootfs]


def test_same_filesystem_bind_is_seen_as_mounted(shared: SharedDir, busybox_rootfs: Path) -> None:
    """statx's mount-root bit sees a bind of a directory of the same filesystem (which
    os.path.ismount misses): the rootfs cannot be mounted twice."""
    target = shared.mount_rootfs("p1", "c1", str(busybox_rootfs))
    with pytest.raises(AlreadyExists):
        shared.mount_rootfs("p1", "c1", str(busybox_rootfs))
    assert mounts_under(shared.root) == [target]


def test_pod_share_is_private(shared: SharedDir, busybox_rootfs: Path, tmp_path: Path) -> None:
    pod = shared.create_pod("p1")
    assert stat.S_IMODE(pod.stat().st_mode) == POD_DIR_MODE
    pod.chmod(0o755)  # made by an older hyperd
    shared.mount_rootfs("p1", "c1", str(busybox_rootfs))
    assert stat.S_IMODE(pod.stat().st_mode) == POD_DIR_MODE
    assert not pod.stat().st_mode & (stat.S_IRWXO | stat.S_IRWXG)


def test_sources_without_symlinks_refuse_any_link(shared: SharedDir, tmp_path: Path) -> None:
    """For a source checked against an allowlist when the container was created: a symlink
    swapped into its path since is refused, not followed."""
    real = tmp_path / "allowed" / "rootfs"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "allowed")
    strict = SharedDir(shared.root, source_symlinks=False)
    with pytest.raises(InvalidParams, match="symlink"):
        strict.mount_rootfs("p1", "c1", str(tmp_path / "link" / "rootfs"))
    with pytest.raises(InvalidParams, match="symlink"):
        strict.mount_volumes(
            "p1", "c1", [MountSpec(source=str(tmp_path / "link"), destination="/d")]
        )
    assert mounts_under(shared.root) == []
    target = strict.mount_rootfs("p1", "c1", str(real))
    assert mounts_under(shared.root) == [target]
    # the default follows the links, once
    assert shared.mount_rootfs("p1", "c2", str(tmp_path / "link" / "rootfs"))
