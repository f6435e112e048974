"""hyperd's configuration: a TOML file decoded into msgspec Structs.

``load_config(path)`` reads ``/etc/hyperd/hyperd.toml`` (or ``--config FILE``); every key is
optional and defaults to the embedded default of :func:`default_config`: simulated VMs behind a
hyperd-proxy that hyperd starts per pod, with sockets and state under one base directory that
hyperd creates. Unknown keys and ill-typed values are errors that name the table, the key and
the value (:class:`ConfigError`).

``render_toml(config)`` prints a config as TOML that loads back to the same config
(``hyperd config default``); ``check_config(path)`` lists the problems of a file
(``hyperd config check FILE``).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

DEFAULT_CONFIG_PATH = "/etc/hyperd/hyperd.toml"
ROOT_BASE_DIR = "/run/hyperd"  # where a root daemon keeps sockets, state and the shared root


class ConfigError(Exception):
    """The configuration file cannot be used; the message names the key and the cause."""


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class RPCConfig(_Section):
    """The JSON-RPC socket: ``mode`` octal string ("0660") or int; ``group`` name or gid.

    The limits bound what one client connection can make hyperd hold (see
    :mod:`hyperd.rpc.connection`). ``allowed_host_paths``: the host directories (and what is
    below them) that callers other than root may use as rootfs or bind-mount sources; unset,
    any path (membership of ``group`` is then root-equivalent).
    """

    socket: str = ""
    mode: str | int = "0660"
    group: str | int | None = None
    max_message: int = 1 << 20  # bytes of one request line (a batch is one line)
    max_batch: int = 256  # calls in one batch; a longer batch is refused whole
    max_in_flight: int = 64  # calls running (or answered, not yet written) per connection
    max_output: int = 256 * 1024  # bytes buffered for a client before its requests stop being read
    notify_queue: int = 1024  # notifications queued for a slow subscriber before it is dropped
    allowed_host_paths: list[str] | None = None

    def file_mode(self) -> int:
        """The socket's permission bits as an int."""
        if isinstance(self.mode, int):
            return self.mode
        return int(self.mode, 8)


class QemuSection(_Section):
    """``[vm.qemu]``: defaults of the qemu backend (``pod.create``'s ``vm`` may override them).

    Empty ``kernel``/``initrd``: the image ``hyperd image build`` made in its cache dir.
    """

    binary: str = "qemu-system-x86_64"
    kernel: str = ""
    initrd: str = ""
    memory_mib: int = 512
    cpus: int = 1
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    machine: str = "q35"
    kernel_args: str = ""


class VMSection(_Section):
    """Where VMs come from by default: ``sim`` (hyperd starts hyperd-sim), ``qemu`` (hyperd
    starts QEMU with the guest image) or ``external``."""

    backend: Literal["sim", "qemu", "external"] = "sim"
    sim_command: list[str] = []
    qemu: QemuSection = msgspec.field(default_factory=QemuSection)


class ProxySection(_Section):
    """How hyperd reaches VMs: a per-``pod`` proxy it starts, or one ``system`` proxy at ``url``."""

    mode: Literal["pod", "system"] = "pod"
    url: str = ""
    command: list[str] = []


class Timeouts(_Section):
    """Deadlines in seconds."""

    command: float = 30.0
    connect: float = 5.0
    ready: float = 35.0
    ping_interval: float = 5.0
    ping_timeout: float = 3.0
    process_start: float = 10.0


class LogSection(_Section):
    """Log level and line format (``journal``: ``<N>`` priority prefixes; ``json``; ``text``)."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "journal", "json", "text"] = "auto"


class Config(_Section):
    """The whole configuration. Empty paths are filled in from ``base_dir`` by :func:`resolve`."""

    base_dir: str = ""
    state_dir: str = ""
    run_dir: str = ""
    shared_root: str = ""
    stop_pods_on_exit: bool = False
    rpc: RPCConfig = msgspec.field(default_factory=RPCConfig)
    vm: VMSection = msgspec.field(default_factory=VMSection)
    proxy: ProxySection = msgspec.field(default_factory=ProxySection)
    timeouts: Timeouts = msgspec.field(default_factory=Timeouts)
    log: LogSection = msgspec.field(default_factory=LogSection)


def default_base_dir() -> str:
    """``/run/hyperd`` for root, else ``$XDG_RUNTIME_DIR/hyperd`` or ``/tmp/hyperd-<uid>``."""
    if os.geteuid() == 0:
        return ROOT_BASE_DIR
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "hyperd")
    return f"/tmp/hyperd-{os.geteuid()}"


def resolve(config: Config) -> Config:
    """Fill every empty path of ``config`` from its base dir; validate cross-field rules."""
    base = config.base_dir or default_base_dir()
    if not os.path.isabs(base):
        raise ConfigError(f"base_dir: must be an absolute path, got {base!r}")
    state_dir = config.state_dir or os.path.join(base, "state")
    run_dir = config.run_dir or os.path.join(base, "run")
    shared_root = config.shared_root or os.path.join(base, "shared")
    rpc = config.rpc
    if not rpc.socket:
        rpc = msgspec.structs.replace(rpc, socket=os.path.join(base, "hyperd.sock"))
    for name, value in (
        ("state_dir", state_dir),
        ("run_dir", run_dir),
        ("shared_root", shared_root),
        ("rpc.socket", rpc.socket),
    ):
        if not os.path.isabs(value):
            raise ConfigError(f"{name}: must be an absolute path, got {value!r}")
    try:
        mode = rpc.file_mode()
    except ValueError:
        raise ConfigError(f"rpc.mode: not an octal file mode: {rpc.mode!r}") from None
    if not 0 <= mode <= 0o777:
        raise ConfigError(f"rpc.mode: out of range: {rpc.mode!r}")
    for name in ("max_message", "max_batch", "max_in_flight", "max_output", "notify_queue"):
        value = getattr(rpc, name)
        if value <= 0:
            raise ConfigError(f"rpc.{name}: must be positive, got {value!r}")
    for path in rpc.allowed_host_paths or ():
        if not os.path.isabs(path) or "\x00" in path:
            raise ConfigError(f"rpc.allowed_host_paths: must be absolute paths, got {path!r}")
    if config.proxy.mode == "system" and not config.proxy.url.startswith("unix://"):
        raise ConfigError(
            "proxy.url: system mode needs the unix:// URL of a running proxy, "
            f"got {config.proxy.url!r}"
        )
    q = config.vm.qemu
    if not 64 <= q.memory_mib <= 1 << 20:
        raise ConfigError(f"vm.qemu.memory_mib: must be 64..1048576, got {q.memory_mib!r}")
    if not 1 <= q.cpus <= 255:
        raise ConfigError(f"vm.qemu.cpus: must be 1..255, got {q.cpus!r}")
    t = config.timeouts
    for field in msgspec.structs.fields(Timeouts):
        value = getattr(t, field.name)
        if value <= 0:
            raise ConfigError(f"timeouts.{field.name}: must be positive, got {value!r}")
    return msgspec.structs.replace(
        config,
        base_dir=base,
        state_dir=state_dir,
        run_dir=run_dir,
        shared_root=shared_root,
        rpc=rpc,
    )


def default_config(base_dir: str | None = None) -> Config:
    """The embedded default, resolved under ``base_dir`` (see :func:`default_base_dir`)."""
    return resolve(Config(base_dir=base_dir or ""))


def parse_config(text: str, *, source: str = "<config>") -> Config:
    """Decode TOML text into a resolved :class:`Config`; raises :class:`ConfigError`."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    try:
        config = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{source}: {_explain(exc)}") from None
    try:
        return resolve(config)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and decode the file at ``path``; raises :class:`ConfigError` naming what is wrong."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    return parse_config(text, source=str(p))


def check_config(path: str | os.PathLike[str]) -> list[str]:
    """The problems of the file at ``path`` (empty when it is usable)."""
    try:
        load_config(path)
    except ConfigError as exc:
        return [str(exc)]
    return []


def _explain(exc: msgspec.ValidationError) -> str:
    """msgspec's message with its ``$.a.b`` path turned into the TOML key ``a.b``."""
    text = str(exc)
    marker = " - at `$."
    if marker in text:
        message, _, where = text.partition(marker)
        key = where.rstrip("`")
        if message.startswith("Object contains unknown field"):
            return f"unknown key in [{key}]: {message.split('`')[1]}" if "`" in message else message
        return f"{key}: {message}"
    if text.startswith("Object contains unknown field"):
        return f"unknown key at top level: {text.split('`')[1]}"
    return text


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {value!r} as TOML")


def render_toml(config: Config) -> str:
    """``config`` as TOML text that :func:`parse_config` loads back to the same config."""
    data = msgspec.to_builtins(config)
    lines = ["# hyperd configuration (hyperd config default)"]
    tables: list[tuple[str, dict[str, Any]]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    while tables:
        name, table = tables.pop(0)
        lines.append("")
        lines.append(f"[{name}]")
        for key, value in table.items():
            if isinstance(value, dict):
                tables.append((f"{name}.{key}", value))
            elif value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
