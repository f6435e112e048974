"""``python -m hyperd.rpc.bench``: a short run of every method answers every call (no timing
is asserted: figures are for reading, see the README's Benchmarks)."""

from __future__ import annotations

import subprocess
import sys

from hyperd.rpc.bench import METHODS


def test_every_method_is_answered_in_a_short_run() -> None:
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "hyperd.rpc.bench",
            "--loop",
            "uvloop",
            "--calls",
            "300",
            "--clients",
            "4",
            "--seconds",
            "0.2",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    for method in METHODS:
        sequential = [line for line in lines if line.startswith(f"uvloop {method} sequential")]
        assert len(sequential) == 1 and " 300 calls " in sequential[0], run.stdout
        assert any(line.startswith(f"uvloop {method} 4 clients") for line in lines), run.stdout
