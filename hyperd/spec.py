"""Typed RPC parameters for processes, mounts, devices, resources and rootfs.

These ``msgspec.Struct`` types are what hyperd decodes from JSON-RPC ``params``. They are values
(frozen), reject unknown keys, and check themselves when built: every check that fails raises
:class:`hyperd.errors.InvalidParams` whose message names the field and the bad value (with
``data["field"]`` set). Type errors found by msgspec itself surface as ``msgspec.ValidationError``
(its message names the JSON path); :func:`parse` turns both into ``InvalidParams``.

The rootfs is one of two shapes, :class:`DirRootfs` (a host directory bind-mounted into the
shared dir) or :class:`BlockRootfs` (a block device attached to the VM). msgspec only decodes a
union of Structs when it is tagged, and a tag would make callers write ``{"type": ...}``; instead
the wire shape is :class:`RootfsSpec`, with ``path`` *or* ``block`` set (exactly one), and
:meth:`RootfsSpec.resolve` gives the concrete variant.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from hyperd.errors import InvalidParams

__all__ = [
    "ID_PATTERN",
    "BlockDevice",
    "BlockRootfs",
    "CapabilitiesSpec",
    "DeviceSpec",
    "DirRootfs",
    "MountSpec",
    "ProcessSpec",
    "ResourcesSpec",
    "RootfsSpec",
    "check_absolute_path",
    "parse",
    "validate_id",
]

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
"""Pod, container and exec ids: safe as one path component, at most 128 characters."""

BlockDriver = Literal["virtio-blk", "virtio-scsi"]

_T = TypeVar("_T")
_JSON_PATH = re.compile(r" - at `\$\.?([^`]*)`$")  # msgspec's "... - at `$.a.b[0]`" suffix


def _invalid(field: str, value: object, why: str) -> InvalidParams:
    return InvalidParams(f"invalid {field} {value!r}: {why}", field=field)


def validate_id(kind: str, value: object) -> str:
    """Return ``value`` if it is a valid id; raise ``InvalidParams`` naming ``kind`` otherwise.

    ``kind`` is the field's name as the caller knows it (``"pod_id"``, ``"container_id"``…).
    A valid id matches ``^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$``: it cannot be ``.``/``..``, contain a
    slash or NUL, or be empty, so it is safe as a single path component.
    """
    if not isinstance(value, str):
        raise _invalid(kind, value, "must be a string")
    if ID_PATTERN.fullmatch(value) is None:
        raise _invalid(
            kind, value, f"must match ^{ID_PATTERN.pattern}$ (letters, digits, '_', '.', '-')"
        )
    return value


def check_absolute_path(field: str, value: object) -> str:
    """Return ``value`` if it is an absolute path without NUL bytes; raise ``InvalidParams``."""
    if not isinstance(value, str):
        raise _invalid(field, value, "must be a string")
    if "\x00" in value:
        raise _invalid(field, value, "must not contain a NUL byte")
    if not value.startswith("/"):
        raise _invalid(field, value, "must be an absolute path")
    return value


def _check_strings(field: str, values: list[str] | None) -> None:
    for v in values or ():
        if "\x00" in v:
            raise _invalid(field, v, "must not contain a NUL byte")


class CapabilitiesSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Capability sets of a process (``CAP_…`` names). ``None`` leaves the set to the agent."""

    bounding: list[str] | None = None
    effective: list[str] | None = None
    inheritable: list[str] | None = None
    permitted: list[str] | None = None
    ambient: list[str] | None = None


class ProcessSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A process to run in a container: argv, ``KEY=VALUE`` environment, identity, terminal."""

    args: Annotated[list[str], msgspec.Meta(min_length=1)]
    env: list[str] = []
    cwd: str = "/"
    user: str = ""
    group: str = ""
    additional_groups: list[str] = []
    terminal: bool = False
    no_new_privileges: bool = False
    capabilities: CapabilitiesSpec | None = None

    def __post_init__(self) -> None:
        if not self.args:
            raise _invalid("args", self.args, "must not be empty")
        _check_strings("args", self.args)
        for entry in self.env:
            key, sep, _ = entry.partition("=")
            if not sep or not key:
                raise _invalid("env", entry, "must be KEY=VALUE with a non-empty KEY")
            if "\x00" in entry:
                raise _invalid("env", entry, "must not contain a NUL byte")
        check_absolute_path("cwd", self.cwd)
        _check_strings("user", [self.user])
        _check_strings("group", [self.group])
        _check_strings("additional_groups", self.additional_groups)

    def environment(self) -> list[tuple[str, str]]:
        """The environment as ``(key, value)`` pairs, split at the first ``=``, in order."""
        pairs = []
        for entry in self.env:
            key, _, value = entry.partition("=")
            pairs.append((key, value))
        return pairs


class MountSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A container mount (OCI style). Only ``bind`` mounts are carried into the VM; for them the
    ``source`` is a host path. ``options`` containing ``"ro"`` makes the mount read-only."""

    source: str
    destination: str
    type: str = "bind"
    options: list[str] = []

    def __post_init__(self) -> None:
        check_absolute_path("destination", self.destination)
        if self.type == "bind":
            check_absolute_path("source", self.source)
        else:
            _check_strings("source", [self.source])
        _check_strings("options", self.options)

    @property
    def read_only(self) -> bool:
        """Whether the options ask for a read-only mount."""
        return "ro" in self.options


class DeviceSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A block device attached to the VM and exposed in the container.

    ``guest_path`` is the device's path inside the VM (``/dev/vdb``), ``container_path`` where the
    container sees it, ``scsi_addr`` (``"<id>:<lun>"``) when it sits on the virtio-scsi bus.
    """

    guest_path: str
    container_path: str
    scsi_addr: str | None = None

    def __post_init__(self) -> None:
        check_absolute_path("guest_path", self.guest_path)
        check_absolute_path("container_path", self.container_path)
        if self.scsi_addr is not None and re.fullmatch(r"\d+:\d+", self.scsi_addr) is None:
            raise _invalid("scsi_addr", self.scsi_addr, "must be '<id>:<lun>'")


class ResourcesSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """CPU limits. 0 means unset; the quota is applied only when quota and period are both set."""

    cpu_quota: Annotated[int, msgspec.Meta(ge=-1)] = 0
    cpu_period: Annotated[int, msgspec.Meta(ge=0)] = 0
    cpu_shares: Annotated[int, msgspec.Meta(ge=0)] = 0

    def __post_init__(self) -> None:
        if self.cpu_quota < -1:
            raise _invalid("cpu_quota", self.cpu_quota, "must be >= -1")
        if self.cpu_period < 0:
            raise _invalid("cpu_period", self.cpu_period, "must be >= 0")
        if self.cpu_shares < 0:
            raise _invalid("cpu_shares", self.cpu_shares, "must be >= 0")


class DirRootfs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A rootfs directory on the host, bind-mounted into the pod's shared dir."""

    path: str
    readonly: bool = False

    def __post_init__(self) -> None:
        check_absolute_path("rootfs.path", self.path)


class BlockDevice(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A block device holding the rootfs: its drive index on the VM's bus, its filesystem type
    and the bus driver (virtio-blk: named ``vd…``; virtio-scsi: addressed ``<id>:<lun>``)."""

    index: Annotated[int, msgspec.Meta(ge=0)]
    fstype: Annotated[str, msgspec.Meta(min_length=1)]
    driver: BlockDriver = "virtio-blk"

    def __post_init__(self) -> None:
        if self.index < 0:
            raise _invalid("rootfs.block.index", self.index, "must be >= 0")
        if not self.fstype or re.fullmatch(r"[A-Za-z0-9_.-]+", self.fstype) is None:
            raise _invalid("rootfs.block.fstype", self.fstype, "must be a filesystem type name")
        if self.driver not in ("virtio-blk", "virtio-scsi"):
            raise _invalid("rootfs.block.driver", self.driver, "must be virtio-blk or virtio-scsi")


class BlockRootfs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A rootfs on a block device attached to the VM."""

    block: BlockDevice


class RootfsSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Wire form of a rootfs: ``{"path": ..., "readonly": ...}`` or ``{"block": {...}}``.

    Exactly one of ``path`` and ``block`` must be given; :meth:`resolve` returns the variant.
    """

    path: str | None = None
    readonly: bool = False
    block: BlockDevice | None = None

    def __post_init__(self) -> None:
        if (self.path is None) == (self.block is None):
            raise InvalidParams(
                "invalid rootfs: give exactly one of 'path' and 'block'", field="rootfs"
            )
        if self.block is not None and self.readonly:
            raise _invalid("rootfs.readonly", self.readonly, "only applies to a 'path' rootfs")
        if self.path is not None:
            check_absolute_path("rootfs.path", self.path)

    def resolve(self) -> DirRootfs | BlockRootfs:
        """The concrete rootfs variant."""
        if self.block is not None:
            return BlockRootfs(block=self.block)
        assert self.path is not None  # guaranteed by __post_init__
        return DirRootfs(path=self.path, readonly=self.readonly)


def parse(cls: type[_T], params: Any) -> _T:
    """Convert already-decoded JSON (``dict``/``list``…) into ``cls``.

    Raises ``InvalidParams`` for every problem: msgspec's type errors (message with the JSON path,
    e.g. ``Expected `str`, got `int` - at `$.args[0]```) and the semantic checks above.
    """
    try:
        return msgspec.convert(params, cls)
    except msgspec.ValidationError as exc:
        text = str(exc)
        where = _JSON_PATH.search(text)
        data = {"field": where.group(1)} if where else {}
        raise InvalidParams(f"invalid params: {text}", **data) from None
