"""Medians, percentiles and the result table.

A :class:`Results` collects, per scenario, rows of named measurements (one sample per
repetition); the table shows the median of each, and ratios are computed from those medians,
all measured in the same run.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples) if samples else math.nan


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q`` (0..100) percentile, nearest-rank (no interpolation: p99 of 100 is the max)."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class Row:
    """One measured line of the table: a median over repetitions, in ``unit``."""

    label: str
    unit: str
    samples: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def value(self) -> float:
        return median(self.samples)


@dataclass
class Section:
    """One scenario's rows, ratios and notes."""

    title: str
    rows: dict[str, Row] = field(default_factory=dict)
    ratios: list[tuple[str, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, key: str, label: str, unit: str, sample: float, note: str = "") -> None:
        row = self.rows.get(key)
        if row is None:
            row = self.rows[key] = Row(label, unit, note=note)
        row.samples.append(sample)

    def value(self, key: str) -> float:
        row = self.rows.get(key)
        return row.value if row is not None else math.nan

    def ratio(self, label: str, numerator: str, denominator: str) -> float:
        den = self.value(denominator)
        value = self.value(numerator) / den if den and not math.isnan(den) else math.nan
        self.ratios.append((label, value))
        return value


def fmt(value: float, unit: str = "") -> str:
    if math.isnan(value):
        return "n/a"
    if unit in ("x",):
        return f"{value:.2f}x"
    if abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".rstrip()


def render(sections: Sequence[Section], header: Sequence[str] = ()) -> str:
    """The table as plain text: per section, label / median / repetitions / note."""
    lines = list(header)
    for sec in sections:
        lines.append("")
        lines.append(f"== {sec.title}")
        width = max(
            [len(r.label) for r in sec.rows.values()] + [len(x) for x, _ in sec.ratios] + [24]
        )
        for row in sec.rows.values():
            reps = f"n={len(row.samples)}"
            note = f"  {row.note}" if row.note else ""
            lines.append(f"  {row.label:<{width}}  {fmt(row.value, row.unit):>16}  {reps}{note}")
        for label, value in sec.ratios:
            lines.append(f"  {label:<{width}}  {fmt(value, 'x'):>16}")
        for note in sec.notes:
            lines.append(f"  note: {note}")
    return "\n".join(lines)
