"""The closing lines of the table: the issue's targets, met or missed, from this run's medians."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final

from hyperd.bench.stats import Section, fmt

RAW_TARGET: Final = 0.8
"""hyperd's pipelined path should reach this fraction of the raw limit."""
REFERENCE_US: Final = {"raw": 84.0, "B": 138.0, "A": 256.0}
"""The reference cc-proxy (Go) with the virtcontainers mock agent on a 2-core machine, per ping:
50 pings in one write 4.2 ms, sequential 6.9 ms, connect+AttachVM+ping+close 12.8 ms (medians
of 10; conformance README, item 10)."""
HYPERD_PREFIX: Final = "hyperd"
OVERHEAD_TARGET_US: Final = 100.0
"""An agent command through hyperd's RPC costs at most this much more than sent straight to the
proxy (p50)."""
LIFECYCLE_TARGET: Final = 1.0
"""hyperd's container lifecycle p50 at least as fast as the seed pattern's."""


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
            n = best[len(HYPERD_PREFIX) :]
            raw, a, b = tp.value("raw"), tp.value("A"), tp.value("B")
            ratio = tp.value(best) / raw
            lines.append(
                f"hyperd ({n} callers) reaches {ratio:.3f}x of the raw limit "
                f"(target >= {RAW_TARGET}x): {_verdict(ratio >= RAW_TARGET)}"
            )
            lines.append(
                f"hyperd ({n} callers) vs seed pattern A: {fmt(tp.value(best) / a, 'x')}"
                f", vs one-at-a-time B: {fmt(tp.value(best) / b, 'x')}"
            )
            ours = {key: 1e6 / tp.value(key) for key in REFERENCE_US}
            if not any(math.isnan(v) for v in ours.values()):
                lines.append(
                    "per ping, hyperd-proxy + hyperd-sim vs the reference cc-proxy + Go mock "
                    f"agent: one write {fmt(ours['raw'], 'us')} vs {REFERENCE_US['raw']:.0f} us, "
                    f"sequential {fmt(ours['B'], 'us')} vs {REFERENCE_US['B']:.0f} us, "
                    f"connect per command {fmt(ours['A'], 'us')} vs {REFERENCE_US['A']:.0f} us"
                )
                if ours["raw"] <= REFERENCE_US["raw"]:
                    verdict = "met (with a slower, Python agent)"
                else:
                    verdict = (
                        "not decided by this figure: the reference's agent is Go, ours "
                        "Python; compare the proxy's share with the reference's total"
                    )
                lines.append(
                    f"of the one-write figure, the agent (hyperd-sim, Python) takes "
                    f"{fmt(tp.value('agent_us'), 'us')} and hyperd-proxy "
                    f"{fmt(tp.value('proxy_us'), 'us')}; proxy not slower than the reference: "
                    f"{verdict}"
                )
        many = sorted((int(k[4:]), k) for k in tp.rows if k.startswith("many") and k[4:].isdigit())
        if len(many) > 1:
            (one, one_key), (top, key) = many[0], many[-1]
            lines.append(
                f"{top} VMs behind one proxy: {fmt(tp.value(key), 'cmd/s')} through "
                f"hyperd, {fmt(tp.value(key) / tp.value(one_key), 'x')} of {one} VM, "
                f"{fmt(tp.value(key) / tp.value('manyraw'), 'x')} of the proxy's "
                "ceiling (raw limit of one ACK-only VM)"
            )
    lat = _find(sections, "2.")
    if lat is not None:
        overhead = lat.value("overhead")
        lines.append(
            f"hyperd's overhead per agent command over JSON-RPC: "
            f"{fmt(overhead, 'us')} at p50 (repetitions {fmt(lat.value('overhead_min'), 'us')}"
            f" to {fmt(lat.value('overhead_max'), 'us')}; paired "
            f"{fmt(lat.value('paired'), 'us')}; RPC round trip alone "
            f"{fmt(lat.value('version50'), 'us')}); target <= {OVERHEAD_TARGET_US:.0f} us: "
            f"{_verdict(overhead <= OVERHEAD_TARGET_US)}"
        )
        lines.append(
            f"  of which the hop itself (a relay process that does nothing) "
            f"{fmt(lat.value('hop'), 'us')}, hyperd's own work {fmt(lat.value('own'), 'us')}"
        )
    lc = _find(sections, "4.")
    if lc is not None:
        ratio = lc.value("seed_p50") / lc.value("hyperd_p50")
        lines.append(
            f"container lifecycle: hyperd {fmt(lc.value('hyperd_p50'), 'ms')} vs seed "
            f"pattern {fmt(lc.value('seed_p50'), 'ms')} at p50 ({fmt(ratio, 'x')}, target >= "
            f"{LIFECYCLE_TARGET:.1f}x: {_verdict(ratio >= LIFECYCLE_TARGET)}); hyperd's "
            f"saves cost {fmt(lc.value('saves'), 'ms')} of that"
        )
        for step in ("create+start", "stop"):
            key = step.replace("+", "_")
            mine, theirs = lc.value(f"hyperd_{key}"), lc.value(f"seed_{key}")
            lines.append(
                f"  {step} p50: hyperd {fmt(mine, 'ms')} vs seed {fmt(theirs, 'ms')}: "
                f"{'no slower' if mine <= theirs else 'SLOWER'}"
            )
    return lines
