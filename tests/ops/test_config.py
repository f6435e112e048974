"""Configuration: defaults, round trip through TOML, errors that name the bad key."""

from __future__ import annotations

from pathlib import Path

import pytest

from hyperd.config import (
    ConfigError,
    check_config,
    default_config,
    load_config,
    parse_config,
    render_toml,
)


def test_default_is_embedded_sim_behind_pod_proxy(tmp_path: Path) -> None:
    c = default_config(str(tmp_path))
    assert c.vm.backend == "sim"
    assert c.proxy.mode == "pod"
    assert c.rpc.socket == str(tmp_path / "hyperd.sock")
    assert c.state_dir == str(tmp_path / "state")
    assert c.shared_root == str(tmp_path / "shared")
    assert c.rpc.file_mode() == 0o660


def test_render_loads_back(tmp_path: Path) -> None:
    c = default_config(str(tmp_path))
    assert parse_config(render_toml(c)) == c
    f = tmp_path / "h.toml"
    f.write_text(render_toml(c))
    assert load_config(f) == c
    assert check_config(f) == []


def test_partial_file_fills_defaults(tmp_path: Path) -> None:
    c = parse_config(
        f'base_dir = "{tmp_path}"\n[timeouts]\ncommand = 2.5\n[rpc]\nmode = 416\ngroup = "hyperd"\n'
    )
    assert c.timeouts.command == 2.5
    assert c.timeouts.connect == 5.0
    assert c.rpc.file_mode() == 0o640
    assert c.rpc.group == "hyperd"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("foo = 1", "unknown key at top level: foo"),
        ("[rpc]\nsock = 1", "unknown key in [rpc]: sock"),
        ('[timeouts]\ncommand = "x"', "timeouts.command: Expected `float`, got `str`"),
        ("[timeouts]\nping_timeout = 0", "timeouts.ping_timeout: must be positive"),
        ('[proxy]\nmode = "system"', "proxy.url: system mode needs the unix:// URL"),
        ('[log]\nlevel = "loud"', "log.level: Invalid enum value 'loud'"),
        ('[vm]\nbackend = "firecracker"', "vm.backend: Invalid enum value 'firecracker'"),
        ('[rpc]\nmode = "0999"', "rpc.mode: not an octal file mode"),
        ('state_dir = "relative"', "state_dir: must be an absolute path"),
        ("x = [", "not valid TOML"),
    ],
)
def test_errors_name_the_key(text: str, expected: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(f'base_dir = "{tmp_path}"\n' + text if "base_dir" not in text else text)
    assert expected in str(info.value)


def test_check_names_file_and_problem(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("[rpc]\nsocket = 3\n")
    problems = check_config(f)
    assert len(problems) == 1
    assert str(f) in problems[0] and "rpc.socket" in problems[0]
    assert "cannot read" in check_config(tmp_path / "missing.toml")[0]
    f.write_bytes(b"\xff\xfe")
    assert "not UTF-8" in check_config(f)[0]


def test_rpc_limits_and_allowlist_round_trip(tmp_path: Path) -> None:
    c = parse_config(
        f'base_dir = "{tmp_path}"\n[rpc]\nmax_batch = 10\nmax_output = 4096\n'
        'allowed_host_paths = ["/srv/a", "/srv/b"]\n'
    )
    assert (c.rpc.max_batch, c.rpc.max_output) == (10, 4096)
    assert c.rpc.allowed_host_paths == ["/srv/a", "/srv/b"]
    assert parse_config(render_toml(c)) == c
    assert default_config(str(tmp_path)).rpc.allowed_host_paths is None  # unrestricted


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[rpc]\nmax_batch = 0\n", "rpc.max_batch: must be positive, got 0"),
        ("[rpc]\nmax_output = -1\n", "rpc.max_output: must be positive, got -1"),
        ("[rpc]\nnotify_queue = 0\n", "rpc.notify_queue: must be positive"),
        ('[rpc]\nallowed_host_paths = ["srv"]\n', "rpc.allowed_host_paths: must be absolute"),
        ('[rpc]\nmax_in_flight = "many"\n', "rpc.max_in_flight"),
    ],
)
def test_rpc_limit_errors_name_the_key(text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.")):
        parse_config(text)
