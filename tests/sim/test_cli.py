"""hyperd-sim's command line: start-up errors and the console-script entry point."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hyperd.sim.cli import USAGE_ERROR, parse_args


def _run(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "hyperd.sim", *args], capture_output=True, timeout=30
    )


def test_missing_share_dir_is_a_usage_error(short_tmp: Path) -> None:
    r = _run(
        "--ctl",
        str(short_tmp / "c"),
        "--tty",
        str(short_tmp / "t"),
        "--share",
        str(short_tmp / "absent"),
    )
    assert r.returncode == USAGE_ERROR
    assert b"absent" in r.stderr
    assert not (short_tmp / "c").exists()


def test_missing_netns_is_a_usage_error(short_tmp: Path) -> None:
    r = _run(
        "--ctl",
        str(short_tmp / "c"),
        "--tty",
        str(short_tmp / "t"),
        "--share",
        str(short_tmp),
        "--netns",
        "/run/netns/hd-absent",
    )
    assert r.returncode == USAGE_ERROR and b"hd-absent" in r.stderr


def test_bad_knob_values_are_rejected() -> None:
    r = _run("--ctl", "c", "--tty", "t", "--share", ".", "--silent-after", "-1")
    assert r.returncode == USAGE_ERROR and b"--silent-after" in r.stderr
    r = _run("--ctl", "c", "--tty", "t", "--share", ".", "--dialect", "kata")
    assert r.returncode == USAGE_ERROR


def test_defaults() -> None:
    args = parse_args(["--ctl", "c", "--tty", "t", "--share", "s"])
    assert args.dialect == "cc"
    assert args.delay == 0.0
    assert args.silent_after is None and args.crash_after is None and args.garbage_after is None


def test_bad_ready_fd_is_a_usage_error(short_tmp: Path) -> None:
    r = _run(
        "--ctl", str(short_tmp / "c"), "--tty", str(short_tmp / "t"),
        "--share", str(short_tmp), "--ready-fd", "99",
    )  # fmt: skip
    assert r.returncode == USAGE_ERROR and b"--ready-fd 99" in r.stderr
    assert not (short_tmp / "c").exists()
