"""hyperd.timings: the per-step durations hyperd.stats shows."""

from __future__ import annotations

import pytest

from hyperd import timings as timings_module
from hyperd.timings import Timings


def test_summary_over_the_last_window() -> None:
    t = Timings(window=4)
    for seconds in (9.0, 0.001, 0.002, 0.003, 0.004):  # the first falls out of the window
        t.record("state.save", seconds)
    s = t.summary()["state.save"]
    assert s["count"] == 5  # every step counted
    assert s["p50_us"] == 2000.0  # the lower median of 1, 2, 3, 4 ms
    assert s["p99_us"] == 4000.0
    assert s["mean_us"] == 2500.0


def test_keys_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timings_module, "MAX_KEYS", 3)
    t = Timings()
    for n in range(10):
        t.record(f"agent.k{n}", 0.001)
    s = t.summary()
    assert len(s) == 4  # three keys, and "other" for the rest
    assert s["other"]["count"] == 7


def test_since_measures_from_a_start() -> None:
    t = Timings()
    t.since("rpc.hyperd.version", 0.0)  # perf_counter() is far from 0: a large duration
    assert t.summary()["rpc.hyperd.version"]["p50_us"] > 0
