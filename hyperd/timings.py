"""Where a daemon's time goes, kept while it runs: the last durations of each kind of step.

:class:`Timings` keeps, per key (``"rpc.container.start"``, ``"state.save"``,
``"agent.newcontainer"``, ``"mount.ahead"``…), the number of steps timed and the last
:data:`WINDOW` durations in a ring; :meth:`Timings.summary` gives their count, p50, p99 and mean
in microseconds (``hyperd.stats`` → ``timings``). Recording is a ``perf_counter()`` pair and a
store into a ring of doubles: cheap enough for every call. Memory is bounded: ``WINDOW`` doubles
per key, and the keys are a fixed vocabulary (method names are registered ones; agent commands
are the dialect's).
"""

from __future__ import annotations

from array import array
from time import perf_counter
from typing import Final

WINDOW: Final = 512
"""Durations kept per key (the summary is over these)."""
MAX_KEYS: Final = 256
"""Keys kept; a step of a key beyond them is counted under ``"other"``."""
US: Final = 1e6


class _Ring:
    """The last durations of one key, in a flat array of doubles (no float object kept per
    sample: recording touches 8 bytes, not a deque block and a freed float)."""

    __slots__ = ("count", "values")

    def __init__(self, window: int) -> None:
        self.values = array("d", bytes(8 * window))
        self.count = 0  # steps timed; the last min(count, window) are in values


class Timings:
    """Durations of the daemon's steps, per key (see the module's docstring)."""

    def __init__(self, window: int = WINDOW) -> None:
        self._window = window
        self._rings: dict[str, _Ring] = {}

    def _ring(self, key: str) -> _Ring:
        """The ring of ``key``, made on first use (``"other"``'s once :data:`MAX_KEYS` exist)."""
        ring = self._rings.get(key)
        if ring is None:
            if len(self._rings) >= MAX_KEYS:
                key = "other"
                ring = self._rings.get(key)
            if ring is None:
                ring = self._rings[key] = _Ring(self._window)
        return ring

    def record(self, key: str, seconds: float) -> None:
        ring = self._rings.get(key) or self._ring(key)
        ring.values[ring.count % self._window] = seconds
        ring.count += 1

    def since(self, key: str, start: float) -> None:
        """Record the time from ``start`` (a ``perf_counter()``) to now under ``key``."""
        seconds = perf_counter() - start
        ring = self._rings.get(key) or self._ring(key)
        ring.values[ring.count % self._window] = seconds
        ring.count += 1

    def summary(self) -> dict[str, dict[str, float | int]]:
        """``{key: {count, p50_us, p99_us, mean_us}}`` over the last durations of each key."""
        out: dict[str, dict[str, float | int]] = {}
        for key in sorted(self._rings):
            ring = self._rings[key]
            n = min(ring.count, self._window)
            if not n:
                continue
            ordered = sorted(ring.values[:n])
            out[key] = {
                "count": ring.count,
                "p50_us": round(ordered[(n - 1) // 2] * US, 1),
                "p99_us": round(ordered[min(n - 1, (99 * n) // 100)] * US, 1),
                "mean_us": round(sum(ordered) / n * US, 1),
            }
        return out
