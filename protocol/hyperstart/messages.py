"""JSON bodies of ctl messages (spec section 7) as msgspec Structs.

Attributes are snake_case; JSON keys are the exact Go/C keys. Field order is the Go declaration
order of containers/virtcontainers ``pkg/hyperstart/types.go`` (CC-VC), which fixes key order.

Go ``omitempty`` is reproduced with ``omit_defaults``: an omitempty field defaults to ``""``,
``0``, ``False`` or an empty list/dict and is left out when it holds that value. A field *without*
omitempty gets its default from a ``default_factory`` that is not a container type, which msgspec
never treats as "equal to the default", so its zero value is always emitted
(``"terminal":false``, ``"args":null``, ``"restartPolicy":""``...).

Two fields are extras of Kata / cc-agent / hyperhq and are omitted when empty so that CC bytes
equal what cc-proxy's vendored virtcontainers (c88890875e) emits:

- ``Process.id`` (last key): omitted when ``""`` (cc-agent then uses the decimal stdio seq);
- ``Constraints.cpu_shares`` (``CPUShares``, last key): omitted when ``0``.

Encoders and decoders live in :mod:`protocol.hyperstart.codec`.
"""

from __future__ import annotations

from typing import Annotated, Any, Final

from msgspec import Meta, Struct, field

__all__ = [
    "Capabilities",
    "Constraints",
    "Container",
    "EnvironmentVar",
    "ExecCommand",
    "FileCommand",
    "FsmapDescriptor",
    "IPAddress",
    "KillCommand",
    "NetworkIface",
    "Pod",
    "Process",
    "ProcessAsyncEvent",
    "PsCommand",
    "RemoveCommand",
    "Rlimit",
    "Route",
    "RouteList",
    "SignalCommand",
    "SystemMountsInfo",
    "VolumeDescriptor",
    "WindowSize",
    "WindowSizeMessage",
]

_MAX_U16: Final = 0xFFFF
_MIN_I64: Final = -(1 << 63)
_MAX_I64: Final = (1 << 63) - 1

U16 = Annotated[int, Meta(ge=0, le=_MAX_U16)]  # Go uint16 (terminal rows/columns)
_MAX_U64: Final = 0xFFFFFFFFFFFFFFFF
# Go uint64. msgspec cannot express the upper bound: the Structs holding U64 fields check it in
# __post_init__, which also runs when decoding (an error there becomes a ValidationError).
U64 = Annotated[int, Meta(ge=0)]
I64 = Annotated[int, Meta(ge=_MIN_I64, le=_MAX_I64)]  # Go int / int64 on 64-bit hosts


def _check_u64(struct: Struct, *names: str) -> None:
    """Raise ValueError if one of the ``names`` fields of ``struct`` is outside a Go uint64."""
    for name in names:
        value = getattr(struct, name)
        if not 0 <= value <= _MAX_U64:
            raise ValueError(f"{name} {value} does not fit in a u64")


def _emit(value: Any) -> Any:
    """Default ``value`` for a field without omitempty: always emitted, even when zero."""
    return field(default_factory=lambda: value)


class _Message(Struct, omit_defaults=True, rename="camel"):
    """Base of every JSON body: Go omitempty via omit_defaults, camelCase keys."""


class EnvironmentVar(_Message):
    """One environment variable of a process (§7.1)."""

    env: str = _emit("")
    value: str = _emit("")


class Rlimit(_Message):
    """One resource limit (§7.2; CC only)."""

    type: str = _emit("")
    hard: U64 = _emit(0)
    soft: U64 = _emit(0)

    def __post_init__(self) -> None:
        _check_u64(self, "hard", "soft")


class Capabilities(_Message):
    """Capability sets (§7.3; CC only). ``None`` encodes as ``null`` (no omitempty)."""

    bounding: list[str] | None = _emit(None)
    effective: list[str] | None = _emit(None)
    inheritable: list[str] | None = _emit(None)
    permitted: list[str] | None = _emit(None)
    ambient: list[str] | None = _emit(None)


class Process(_Message):
    """A process to start (§7.4), in CC-VC key order plus the cc-agent/hyperhq ``id`` last."""

    user: str = ""
    group: str = ""
    additional_groups: list[str] = field(default_factory=list)
    terminal: bool = _emit(False)
    stdio: U64 = 0
    stderr: U64 = 0
    args: list[str] | None = _emit(None)
    envs: list[EnvironmentVar] = field(default_factory=list)
    workdir: str = _emit("")
    rlimits: list[Rlimit] = field(default_factory=list)
    no_new_privileges: bool = _emit(False)
    capabilities: Capabilities = field(default_factory=Capabilities)
    id: str = ""

    def __post_init__(self) -> None:
        _check_u64(self, "stdio", "stderr")


class IPAddress(_Message):
    """One address of an interface (§7.5); ``net_mask`` is the prefix length as a string."""

    ip_address: str = _emit("")
    net_mask: str = _emit("")


class NetworkIface(_Message):
    """A network interface (§7.6). ``ip_addresses=None`` encodes as ``null``."""

    device: str = ""
    new_device_name: str = ""
    ip_addresses: list[IPAddress] | None = _emit(None)
    mtu: I64 = _emit(0)
    mac_addr: str = _emit("")


class Route(_Message):
    """One route (§7.7); ``dest`` is a CIDR or ``"default"``."""

    dest: str = _emit("")
    gateway: str = ""
    device: str = ""


class RouteList(_Message):
    """The SETUPROUTE payload ``{"routes":[...]}``."""

    routes: list[Route] | None = _emit(None)


class VolumeDescriptor(_Message):
    """A block-device volume of a container (§7.9)."""

    device: str = _emit("")
    addr: str = ""
    mount: str = _emit("")
    fstype: str = ""
    read_only: bool = _emit(False)
    docker_volume: bool = _emit(False)


class FsmapDescriptor(_Message):
    """A bind mount from the shared directory into a container (§7.9, CC-VC order)."""

    source: str = _emit("")
    path: str = _emit("")
    read_only: bool = _emit(False)
    docker_volume: bool = _emit(False)
    absolute_path: bool = _emit(False)
    scsi_addr: str = _emit("")


class SystemMountsInfo(_Message):
    """System mounts of a container (§7.9; CC only)."""

    bind_mount_dev: bool = _emit(False)
    dev_shm_size: I64 = _emit(0)


class Constraints(_Message):
    """CPU constraints (§7.9; CC only). Keys are Go field names (the Go struct has no tags)."""

    cpu_quota: I64 = field(default_factory=lambda: 0, name="CPUQuota")
    cpu_period: U64 = field(default_factory=lambda: 0, name="CPUPeriod")
    cpu_shares: U64 = field(default=0, name="CPUShares")  # Kata/cc-agent extra: omitted when 0

    def __post_init__(self) -> None:
        _check_u64(self, "cpu_period", "cpu_shares")


class Container(_Message):
    """A container (NEWCONTAINER payload, ``Pod.containers`` element; §7.8)."""

    id: str = _emit("")
    rootfs: str = _emit("")
    fstype: str = ""
    image: str = _emit("")
    scsi_addr: str = ""
    volumes: list[VolumeDescriptor] = field(default_factory=list)
    fsmap: list[FsmapDescriptor] = field(default_factory=list)
    sysctl: dict[str, str] = field(default_factory=dict)
    process: Process | None = _emit(None)
    restart_policy: str = _emit("")
    initialize: bool = _emit(False)
    system_mounts_info: SystemMountsInfo = field(default_factory=SystemMountsInfo)
    constraints: Constraints = field(default_factory=Constraints)


class Pod(_Message):
    """The STARTPOD payload (§7.13)."""

    hostname: str = _emit("")
    containers: list[Container] = field(default_factory=list)
    interfaces: list[NetworkIface] = field(default_factory=list)
    dns: list[str] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    share_dir: str = _emit("")


class ExecCommand(_Message):
    """The EXECCMD payload (§7.10)."""

    container: str = ""
    process: Process = field(default_factory=Process)


class KillCommand(_Message):
    """The KILLCONTAINER payload (§7.11); hyperhq knows only ``container`` and ``signal``."""

    container: str = _emit("")
    signal: I64 = _emit(0)
    all_processes: bool = _emit(False)


class RemoveCommand(_Message):
    """The REMOVECONTAINER payload (§7.11)."""

    container: str = _emit("")


class PsCommand(_Message):
    """The CC PSCONTAINER payload (§7.11); ``psargs=None`` encodes as ``null``."""

    container: str = _emit("")
    format: str = _emit("")
    psargs: list[str] | None = _emit(None)


class FileCommand(_Message):
    """The WRITEFILE/READFILE JSON header (§7.11)."""

    container: str = _emit("")
    file: str = _emit("")


class SignalCommand(_Message):
    """The hyperhq SIGNALPROCESS payload (§7.11; ``process`` is a process id, ``"init"``...)."""

    container: str = _emit("")
    process: str = _emit("")
    signal: I64 = _emit(0)


class WindowSize(_Message):
    """WINSIZE in the H07/CC form ``{"seq","row","column"}`` (§7.12), seq = the stdio seq."""

    seq: U64 = _emit(0)
    row: U16 = _emit(0)
    column: U16 = _emit(0)

    def __post_init__(self) -> None:
        _check_u64(self, "seq")


class WindowSizeMessage(_Message):
    """WINSIZE in the hyperhq form ``{"container","process","row","column"}`` (§7.12)."""

    container: str = _emit("")
    process: str = _emit("")
    row: U16 = _emit(0)
    column: U16 = _emit(0)


class ProcessAsyncEvent(_Message):
    """A process-finished event (§7.14). CC omits ``status`` 0; hyperhq always writes it."""

    container: str = _emit("")
    process: str = _emit("")
    event: str = _emit("")
    info: str = ""
    status: I64 = 0
