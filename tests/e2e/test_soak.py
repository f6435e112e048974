"""A short run of the fault soak (``python -m hyperd.bench soak``), as CI's proof that it holds.

The soak starts its own hyperd, clients and fault task and checks its invariants (every call
answered or given a clear error, no misrouted reply, no leaked process, mount or fd); this test
runs it for half a minute and reads its JSON report. The README has the figures of a longer run.

Faults: kills of simulated VMs, of per-pod proxies and of hyperd itself, in turn.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SOAK_MINUTES = "0.5"
FAULTS = ("sim", "proxy", "hyperd")
SOAK_TIMEOUT = 300.0  # seconds: the load, the warm-up pod and the final cleanup on a busy machine


def test_short_soak_has_no_violations(short_tmp: Path) -> None:
    report_path = short_tmp / "soak.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "hyperd.bench",
            "soak",
            "--minutes",
            SOAK_MINUTES,
            "--clients",
            "4",
            "--faults",
            ",".join(FAULTS),
            "--json",
            str(report_path),
        ],
        capture_output=True,
        text=True,
        timeout=SOAK_TIMEOUT,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr[-5000:]
    report = json.loads(report_path.read_text())
    assert report["violations"] == {}, report
    assert report["leaks"] == [], report
    # the run did what it is for: load, and every kind of fault
    assert report["containers_run"] > 0, report
    assert set(report["faults"]) == set(FAULTS), report
