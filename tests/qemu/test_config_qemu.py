"""The ``[vm.qemu]`` table: defaults, overrides, errors naming the key, and rendering."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from hyperd.config import ConfigError, default_config, parse_config, render_toml


def test_qemu_table_defaults_and_overrides() -> None:
    q = default_config("/tmp/hyperd-cfg").vm.qemu
    assert (q.binary, q.kernel, q.initrd, q.accel, q.memory_mib, q.cpus) == (
        "qemu-system-x86_64",
        "",
        "",
        "auto",
        512,
        1,
    )
    c = parse_config('[vm]\nbackend = "qemu"\n[vm.qemu]\nmemory_mib = 256\naccel = "tcg"\n')
    assert c.vm.backend == "qemu"
    assert (c.vm.qemu.memory_mib, c.vm.qemu.accel) == (256, "tcg")


def test_rendered_config_with_the_qemu_table_loads_back() -> None:
    c = parse_config('base_dir = "/tmp/hyperd-cfg"\n[vm.qemu]\nkernel = "/k"\ncpus = 2\n')
    text = render_toml(c)
    assert "[vm.qemu]" in text
    assert parse_config(text) == c


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[vm.qemu]\ncpus = 0\n", "vm.qemu.cpus: must be 1..255"),
        ("[vm.qemu]\nmemory_mib = 8\n", "vm.qemu.memory_mib: must be 64"),
        ('[vm.qemu]\naccel = "hvf"\n', "vm.qemu.accel"),
        ("[vm.qemu]\nfoo = 1\n", "unknown key in [vm.qemu]: foo"),
    ],
)
def test_qemu_table_errors_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        parse_config(text)


def test_vm_sockets_are_for_their_owner_only(short_tmp: Path) -> None:
    """ctl, tty and QMP sockets are 0600 whatever the umask (the run dir is open to the group)."""
    from hyperd.vm.qemu import listen

    old = os.umask(0)
    try:
        sock = listen(str(short_tmp / "ctl.sock"))
    finally:
        os.umask(old)
    with sock:
        assert stat.S_IMODE(os.lstat(short_tmp / "ctl.sock").st_mode) == 0o600
