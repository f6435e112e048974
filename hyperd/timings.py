"""Where a daemon's time goes, kept while it runs: the last durations of each kind of step.

:class:`Timings` keeps, per key (``"rpc.container.start"``, ``"state.save"``,
``"agent.newcontainer"``, ``"mount.ahead"``…), the number of steps timed and the last
:data:`WINDOW` durations in a ring; :meth:`Timings.summary` gives their count, p50, p99 and mean
in microseconds (``hyperd.stats`` → ``timings``). Recording is a ``perf_counter()`` pair and a
deque append: cheap enough for every call. Memory is bounded: ``WINDOW`` floats per key, and the
keys are a fixed vocabulary (method names are registered ones; agent commands are the dialect's).
"""

from __future__ import annotations

from collections import deque
from time import perf_counter
from typing import Final

WINDOW: Final = 512
"""Durations kept per key (the summary is over these)."""
MAX_KEYS: Final = 256
"""Keys kept; a step of a key beyond them is counted under ``"other"``."""
US: Final = 1e6


class Timings:
    """Durations of the daemon's steps, per key (see the module's docstring)."""

    def __init__(self, window: int = WINDOW) -> None:
        self._window = window
        self._samples: dict[str, deque[float]] = {}
        self._counts: dict[str, int] = {}

    def record(self, key: str, seconds: float) -> None:
        samples = self._samples.get(key)
        if samples is None:
            if len(self._samples) >= MAX_KEYS:
                key = "other"
                samples = self._samples.get(key)
            if samples is None:
                samples = self._samples[key] = deque(maxlen=self._window)
                self._counts[key] = 0
        samples.append(seconds)
        self._counts[key] += 1

    def since(self, key: str, start: float) -> None:
        """Record the time from ``start`` (a ``perf_counter()``) to now under ``key``."""
        seconds = perf_counter() - start
        samples = self._samples.get(key)
        if samples is None:  # (a new key: record() makes its ring)
            self.record(key, seconds)
            return
        samples.append(seconds)
        self._counts[key] += 1

    def summary(self) -> dict[str, dict[str, float | int]]:
        """``{key: {count, p50_us, p99_us, mean_us}}`` over the last durations of each key."""
        out: dict[str, dict[str, float | int]] = {}
        for key in sorted(self._samples):
            ordered = sorted(self._samples[key])
            n = len(ordered)
            out[key] = {
                "count": self._counts[key],
                "p50_us": round(ordered[(n - 1) // 2] * US, 1),
                "p99_us": round(ordered[min(n - 1, (99 * n) // 100)] * US, 1),
                "mean_us": round(sum(ordered) / n * US, 1),
            }
        return out
