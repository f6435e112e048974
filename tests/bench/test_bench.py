"""Smoke test of the benchmark runner: ``python -m hyperd.bench --quick`` completes and prints
the table. No timing is asserted (CI machines vary); every scenario must have run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

QUICK_DEADLINE = 110  # seconds; the quick run takes well under a minute on 2 cores

SECTION_TITLES = (
    "== 1. command throughput",
    "== 2. RPC latency",
    "== 3. scale",
    "== 4. container lifecycle",
)


@pytest.mark.e2e
@pytest.mark.root
@pytest.mark.skipif(os.geteuid() != 0, reason="the daemon scenarios bind-mount rootfs dirs")
def test_quick_run_prints_the_table() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hyperd.bench", "--quick"],
        capture_output=True,
        text=True,
        timeout=QUICK_DEADLINE,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for title in SECTION_TITLES:
        assert title in out, out
    assert "FAILED" not in out
    for row in (
        "A  seed pattern",
        "raw limit",
        "hyperd VMSession, 64 callers",
        "/ raw",
        "hyperd overhead per agent command",
        "hyperd RSS growth per VM",
        "containers/s hyperd / seed",
    ):
        assert row in out, out


def test_bad_arguments_exit_2() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hyperd.bench", "--only", "9"],
        capture_output=True,
        text=True,
        timeout=QUICK_DEADLINE,
    )
    assert done.returncode == 2
    assert "unknown scenario" in done.stderr
