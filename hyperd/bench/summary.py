"""The closing lines of the table: the issue's targets, met or missed, from this run's medians."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

from hyperd.bench.stats import Section, fmt

RAW_TARGET: Final = 0.8
"""hyperd's pipelined path should reach this fraction of the raw limit."""
GO_PROXY_US: Final = 80.0
"""The reference cc-proxy's time per ping on a 2-core machine with a Go agent (issue 6)."""
HYPERD_PREFIX: Final = "hyperd"


def _find(sections: Sequence[Section], prefix: str) -> Section | None:
    return next((s for s in sections if s.title.startswith(prefix)), None)


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def summary(sections: Sequence[Section]) -> list[str]:
    """Lines that state each target with the figure that decides it."""
    lines: list[str] = []
    tp = _find(sections, "1.")
    if tp is not None:
        callers = [k for k in tp.rows if k.startswith(HYPERD_PREFIX) and k[6:].isdigit()]
        if callers:
            best = max(callers, key=tp.value)
            n = best[len(HYPERD_PREFIX):]
            raw, a, b = tp.value("raw"), tp.value("A"), tp.value("B")
            ratio = tp.value(best) / raw
            lines.append(f"hyperd ({n} callers) reaches {fmt(ratio, 'x')} of the raw limit "
                         f"(target >= {RAW_TARGET}x): {_verdict(ratio >= RAW_TARGET)}")
            lines.append(f"hyperd ({n} callers) vs seed pattern A: {fmt(tp.value(best) / a, 'x')}"
                         f", vs one-at-a-time B: {fmt(tp.value(best) / b, 'x')}")
            per_cmd = tp.value("raw_us")
            if not math.isnan(per_cmd):
                lines.append(f"hyperd-proxy + agent, time per command at the raw limit: "
                             f"{fmt(per_cmd, 'us')} (reference Go proxy + Go agent: ~"
                             f"{GO_PROXY_US:.0f} us): {_verdict(per_cmd <= GO_PROXY_US)}; "
                             f"agent round trip alone {fmt(tp.value('agent_us'), 'us')}, proxy's "
                             f"share {fmt(tp.value('proxy_us'), 'us')}")
    lat = _find(sections, "2.")
    if lat is not None:
        lines.append(f"hyperd's overhead per agent command over JSON-RPC: "
                     f"{fmt(lat.value('overhead'), 'us')} at p50 "
                     f"(RPC round trip alone {fmt(lat.value('version50'), 'us')})")
    lc = _find(sections, "4.")
    if lc is not None:
        lines.append(f"container lifecycle: hyperd {fmt(lc.value('hyperd_p50'), 'ms')} vs seed "
                     f"pattern {fmt(lc.value('seed_p50'), 'ms')} at p50; hyperd's 4 durable "
                     f"saves cost {fmt(lc.value('saves'), 'ms')} of that")
    return lines
