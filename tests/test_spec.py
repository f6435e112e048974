"""RPC parameter specs: decoding, defaults and validation errors (all InvalidParams)."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from hyperd.errors import InvalidParams
from hyperd.spec import (
    BlockDevice,
    BlockRootfs,
    CapabilitiesSpec,
    DeviceSpec,
    DirRootfs,
    MountSpec,
    ProcessSpec,
    ResourcesSpec,
    RootfsSpec,
    check_absolute_path,
    parse,
    validate_id,
)


def test_process_defaults() -> None:
    p = parse(ProcessSpec, {"args": ["sh"]})
    assert p == ProcessSpec(args=["sh"])
    assert (p.env, p.cwd, p.user, p.group, p.additional_groups) == ([], "/", "", "", [])
    assert (p.terminal, p.no_new_privileges, p.capabilities) == (False, False, None)


def test_process_full_and_environment_split() -> None:
    p = parse(
        ProcessSpec,
        {
            "args": ["sh", "-c", "env"],
            "env": ["A=1", "B=x=y", "EMPTY="],
            "cwd": "/tmp",
            "user": "1000",
            "group": "100",
            "additional_groups": ["10", "20"],
            "terminal": True,
            "no_new_privileges": True,
            "capabilities": {"bounding": ["CAP_KILL"], "ambient": []},
        },
    )
    assert p.environment() == [("A", "1"), ("B", "x=y"), ("EMPTY", "")]
    assert p.capabilities == CapabilitiesSpec(bounding=["CAP_KILL"], ambient=[])
    assert p.capabilities.effective is None


def test_decoding_from_json_bytes() -> None:
    p = msgspec.json.decode(b'{"args":["true"],"cwd":"/x"}', type=ProcessSpec)
    assert p.cwd == "/x"


@pytest.mark.parametrize(
    ("cls", "params", "field"),
    [
        (ProcessSpec, {"args": []}, "args"),
        (ProcessSpec, {}, None),
        (ProcessSpec, {"args": [1]}, "args[0]"),
        (ProcessSpec, {"args": ["x"], "env": ["NOEQUALS"]}, "env"),
        (ProcessSpec, {"args": ["x"], "env": ["=v"]}, "env"),
        (ProcessSpec, {"args": ["x"], "cwd": "relative"}, "cwd"),
        (ProcessSpec, {"args": ["x"], "cwd": "/a\x00b"}, "cwd"),
        (ProcessSpec, {"args": ["x\x00"]}, "args"),
        (ProcessSpec, {"args": ["x"], "unknown": 1}, None),
        (ProcessSpec, {"args": ["x"], "capabilities": {"foo": []}}, "capabilities"),
        (MountSpec, {"source": "rel", "destination": "/d"}, "source"),
        (MountSpec, {"source": "/s", "destination": "d"}, "destination"),
        (DeviceSpec, {"guest_path": "vdb", "container_path": "/dev/xvdb"}, "guest_path"),
        (DeviceSpec, {"guest_path": "/dev/vdb", "container_path": "x"}, "container_path"),
        (
            DeviceSpec,
            {"guest_path": "/dev/sda", "container_path": "/dev/sda", "scsi_addr": "x"},
            "scsi_addr",
        ),
        (ResourcesSpec, {"cpu_quota": -2}, "cpu_quota"),
        (ResourcesSpec, {"cpu_period": -1}, "cpu_period"),
        (ResourcesSpec, {"cpu_shares": -1}, "cpu_shares"),
        (RootfsSpec, {}, "rootfs"),
        (RootfsSpec, {"path": "/r", "block": {"index": 0, "fstype": "ext4"}}, "rootfs"),
        (RootfsSpec, {"path": "r"}, "rootfs.path"),
        (
            RootfsSpec,
            {"block": {"index": 0, "fstype": "ext4"}, "readonly": True},
            "rootfs.readonly",
        ),
        (RootfsSpec, {"block": {"index": -1, "fstype": "ext4"}}, "block.index"),
        (RootfsSpec, {"block": {"index": 0, "fstype": ""}}, "block.fstype"),
        (RootfsSpec, {"block": {"index": 0, "fstype": "a/b"}}, "rootfs.block.fstype"),
        (RootfsSpec, {"block": {"index": 0, "fstype": "ext4", "driver": "ide"}}, "block.driver"),
        (DirRootfs, {"path": "rel"}, "rootfs.path"),
    ],
)
def test_invalid_params_name_the_field(cls: type[Any], params: Any, field: str | None) -> None:
    with pytest.raises(InvalidParams) as info:
        parse(cls, params)
    if field is not None:
        assert info.value.data.get("field", "").endswith(field)
        assert field.split(".")[-1].split("[")[0] in info.value.message
    assert info.value.kind == "invalid_params"


def test_direct_construction_validates_too() -> None:
    with pytest.raises(InvalidParams, match="cwd"):
        ProcessSpec(args=["x"], cwd="rel")


def test_mount_defaults_and_read_only() -> None:
    m = parse(MountSpec, {"source": "/s", "destination": "/d"})
    assert (m.type, m.options, m.read_only) == ("bind", [], False)
    ro = {"source": "/s", "destination": "/d", "options": ["rbind", "ro"]}
    assert parse(MountSpec, ro).read_only
    # non-bind mounts keep a free-form source (e.g. "tmpfs")
    tmpfs = {"source": "tmpfs", "destination": "/t", "type": "tmpfs"}
    assert parse(MountSpec, tmpfs).source == "tmpfs"


def test_rootfs_union() -> None:
    assert parse(RootfsSpec, {"path": "/r"}).resolve() == DirRootfs(path="/r")
    assert parse(RootfsSpec, {"path": "/r", "readonly": True}).resolve() == DirRootfs(
        path="/r", readonly=True
    )
    block = parse(RootfsSpec, {"block": {"index": 2, "fstype": "ext4", "driver": "virtio-scsi"}})
    assert block.resolve() == BlockRootfs(
        block=BlockDevice(index=2, fstype="ext4", driver="virtio-scsi")
    )
    assert parse(RootfsSpec, {"block": {"index": 0, "fstype": "xfs"}}).resolve() == BlockRootfs(
        block=BlockDevice(index=0, fstype="xfs", driver="virtio-blk")
    )


def test_resources() -> None:
    assert parse(ResourcesSpec, {}) == ResourcesSpec(0, 0, 0)
    assert parse(ResourcesSpec, {"cpu_quota": -1, "cpu_period": 100000}).cpu_quota == -1


@pytest.mark.parametrize("value", ["a", "A9", "pod-1", "c_1.x", "0", "a" * 128, "x." + "y" * 126])
def test_valid_ids(value: str) -> None:
    assert validate_id("pod_id", value) == value


@pytest.mark.parametrize(
    "value",
    ["", ".", "..", "../x", "a/b", "-a", "_a", ".a", "a\x00", "a b", "a" * 129, "é", 5, None],
)
def test_invalid_ids(value: object) -> None:
    with pytest.raises(InvalidParams) as info:
        validate_id("container_id", value)
    assert "container_id" in info.value.message
    assert repr(value) in info.value.message
    assert info.value.data == {"field": "container_id"}


@pytest.mark.parametrize("value", ["", "rel/x", "/a\x00", 3])
def test_check_absolute_path_refuses(value: object) -> None:
    with pytest.raises(InvalidParams, match="source"):
        check_absolute_path("source", value)


def test_check_absolute_path_accepts() -> None:
    assert check_absolute_path("source", "/a/../b") == "/a/../b"
