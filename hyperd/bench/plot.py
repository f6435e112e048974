"""``--plot FILE.png``: throughput vs concurrency, with the baselines as horizontal lines.

matplotlib is an optional extra: when it cannot be imported, :func:`plot` returns a message
and the run is otherwise unaffected.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from hyperd.bench.stats import Section

HYPERD_PREFIX = "hyperd"
BASELINES = (
    ("A", "A seed pattern"),
    ("B", "B one at a time"),
    ("raw", "raw limit"),
    ("agent", "agent alone"),
)


def plot(sections: Sequence[Section], path: str) -> str | None:
    """Write the plot to ``path``; returns why it could not, or None."""
    try:
        matplotlib: Any = importlib.import_module("matplotlib")
        matplotlib.use("Agg")
        plt: Any = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    sec = next((s for s in sections if s.title.startswith("1.")), None)
    if sec is None:
        return "no plot: scenario 1 did not run"
    points = sorted(
        (int(key[len(HYPERD_PREFIX) :]), row.value)
        for key, row in sec.rows.items()
        if key.startswith(HYPERD_PREFIX) and key[len(HYPERD_PREFIX) :].isdigit()
    )
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label="hyperd VMSession")
    for key, label in BASELINES:
        if key in sec.rows:
            ax.axhline(
                sec.value(key),
                linestyle="--",
                linewidth=1,
                label=label,
                color=f"C{1 + BASELINES.index((key, label))}",
            )
    ax.set_xscale("log", base=2)
    ax.set_xticks([p[0] for p in points], [str(p[0]) for p in points])
    ax.set_xlabel("concurrent callers")
    ax.set_ylabel("commands/s (median)")
    ax.set_title("Hyper ping throughput on one VM")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None
