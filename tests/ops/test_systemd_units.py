"""The systemd units pass ``systemd-analyze verify`` and carry the settings operations rely on.

``verify`` needs the ExecStart binaries to exist, so the units are checked inside a temporary
root that holds the host's system units, the unit files unchanged, and stand-in executables at
the ExecStart paths. Any line ``verify`` prints (it warns about unknown keys but still exits 0)
fails the test.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

UNITS = Path(__file__).resolve().parents[2] / "systemd"
NAMES = ["hyperd.service", "hyperd.socket", "hyperd-proxy.service", "hyperd-proxy.socket"]


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / name)
    return parser


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/lib/systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "usr/bin").mkdir(parents=True)
    for exe in ("hyperd", "hyperd-proxy"):
        (root / "usr/bin" / exe).write_text("#!/bin/sh\n")
        (root / "usr/bin" / exe).chmod(0o755)
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True)
    for name in NAMES:
        shutil.copy(UNITS / name, unit_dir / name)
    out = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", *(str(unit_dir / n) for n in NAMES)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "" and out.stderr.strip() == "", out.stdout + out.stderr


def test_service_settings() -> None:
    svc = _unit("hyperd.service")["Service"]
    assert svc["Type"] == "notify"
    assert svc["NotifyAccess"] == "main"
    assert svc["KillMode"] == "process"  # VMs and proxies survive a daemon restart
    assert svc["Restart"] == "on-failure"
    assert svc["WatchdogSec"]
    assert int(svc["LimitNOFILE"]) >= 65536
    assert "PrivateMounts" not in svc  # bind mounts must be visible outside the daemon


def test_socket_settings() -> None:
    sock = _unit("hyperd.socket")["Socket"]
    assert sock["SocketMode"] == "0660"
    assert sock["SocketGroup"]
    assert sock["ListenStream"] == "/run/hyperd/hyperd.sock"
    psock = _unit("hyperd-proxy.socket")["Socket"]
    assert psock["SocketMode"] == "0660"
