"""prepare_container: mounts + NEWCONTAINER together, refused before mounting, undone on failure."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from hyperd.agent import build_process
from hyperd.errors import InvalidParams
from hyperd.host.container import binds_host_dev, prepare_container
from hyperd.host.mounts import SharedDir
from hyperd.host.mountsys import read_mountinfo
from hyperd.spec import BlockDevice, BlockRootfs, DeviceSpec, DirRootfs, MountSpec, ProcessSpec
from protocol.hyperstart import HYPER, FsmapDescriptor, encode_message

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for mount(2)"),
]

PROC = build_process(ProcessSpec(args=["/bin/sh"]))


def mounts_under(path: Path) -> list[str]:
    return [m.mount_point for m in read_mountinfo() if m.mount_point.startswith(str(path) + "/")]


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[SharedDir]:
    s = SharedDir(tmp_path / "shared")
    yield s
    s.cleanup_pod("p1")
    assert mounts_under(tmp_path) == []


def test_dir_rootfs_with_volumes(shared: SharedDir, busybox_rootfs: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    mounts = [
        MountSpec(source=str(data), destination="/data", options=["ro"]),
        MountSpec(source="/dev", destination="/dev"),
    ]
    container, made = prepare_container(
        shared, "p1", "c1", DirRootfs(path=str(busybox_rootfs)), PROC, mounts=mounts
    )
    assert made.rootfs == str(shared.rootfs_path("p1", "c1"))
    assert (Path(made.rootfs) / "bin" / "busybox").exists()
    assert len(made.volumes) == 1  # /dev is a system mount: not carried
    assert container.fsmap == [
        FsmapDescriptor(source=made.volumes[0].source, path="/data", read_only=True)
    ]
    assert (container.image, container.rootfs) == ("c1", "rootfs")
    assert container.system_mounts_info.bind_mount_dev is True
    assert sorted(mounts_under(shared.root)) == sorted([made.rootfs, made.volumes[0].host_path])


def test_block_rootfs_mounts_no_rootfs(shared: SharedDir) -> None:
    rootfs = BlockRootfs(block=BlockDevice(index=2, fstype="ext4"))
    devices = [DeviceSpec(guest_path="/dev/vdd", container_path="/dev/disk")]
    container, made = prepare_container(shared, "p1", "c1", rootfs, PROC, devices=devices)
    assert made.rootfs is None
    assert (container.image, container.fstype) == ("vdc", "ext4")
    assert container.fsmap[0].absolute_path
    assert mounts_under(shared.root) == []


def test_refused_before_anything_is_mounted(shared: SharedDir, busybox_rootfs: Path) -> None:
    hyper_proc = build_process(ProcessSpec(args=["/bin/sh"]), HYPER)
    devices = [DeviceSpec(guest_path="/dev/vdd", container_path="/dev/disk")]
    with pytest.raises(InvalidParams, match="hyperhq"):
        prepare_container(
            shared,
            "p1",
            "c1",
            DirRootfs(path=str(busybox_rootfs)),
            hyper_proc,
            devices=devices,
            dialect=HYPER,
        )
    assert mounts_under(shared.root) == []
    assert not shared.container_dir("p1", "c1").exists()


def test_volume_failure_undoes_the_rootfs(
    shared: SharedDir, busybox_rootfs: Path, tmp_path: Path
) -> None:
    mounts = [MountSpec(source=str(tmp_path / "missing"), destination="/m")]
    with pytest.raises(InvalidParams, match="does not exist"):
        prepare_container(
            shared, "p1", "c1", DirRootfs(path=str(busybox_rootfs)), PROC, mounts=mounts
        )
    assert mounts_under(shared.root) == []


def test_hyper_message_encodes(shared: SharedDir, busybox_rootfs: Path) -> None:
    proc = build_process(ProcessSpec(args=["/bin/sh"]), HYPER)
    container, _ = prepare_container(
        shared, "p1", "c1", DirRootfs(path=str(busybox_rootfs)), proc, dialect=HYPER
    )
    assert encode_message(container, HYPER).startswith(b'{"id":"c1","rootfs":"rootfs","image":"c1"')


@pytest.mark.parametrize(
    ("mounts", "expected"),
    [
        ([], False),
        ([MountSpec(source="/dev", destination="/dev")], True),
        ([MountSpec(source="/dev", destination="/dev", type="devtmpfs")], False),
        ([MountSpec(source="/srv/dev", destination="/dev")], False),
    ],
)
def test_binds_host_dev(mounts: list[MountSpec], expected: bool) -> None:
    assert binds_host_dev(mounts) is expected
