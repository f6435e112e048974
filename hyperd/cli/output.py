"""hyperctl's human-readable output: aligned tables for lists, ``key: value`` for objects."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any


def cell(value: Any, key: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(cell(v) for v in value) or "-"
    if isinstance(value, float):
        if key.endswith("_at") or key == "time":
            return time.strftime("%H:%M:%S", time.localtime(value))
        return f"{value:.4g}"
    return str(value)


def table(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as an aligned text table with upper-case headers."""
    cells = [[c.upper() for c in columns]] + [[cell(r.get(c), c) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )


def show(result: Any, *, as_json: bool) -> None:
    """Print an RPC result: raw JSON with ``as_json``, else tables and ``key: value`` lines."""
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return
    if isinstance(result, dict) and "pods" in result and isinstance(result["pods"], list):
        print(
            table(
                result["pods"],
                ["id", "state", "backend", "proxy_mode", "dialect", "containers", "created_at"],
            )
        )
    elif (
        isinstance(result, dict)
        and isinstance(result.get("containers"), list)
        and ("id" not in result)
    ):
        print(table(result["containers"], ["pod", "id", "state", "args", "exit_status"]))
    elif isinstance(result, dict) and "output" in result and len(result) == 1:
        sys.stdout.write(str(result["output"]))
    elif isinstance(result, dict) and "vms" in result:
        rows = [{"pod": k, **v} for k, v in sorted(result["vms"].items())]
        print(
            table(
                rows,
                [
                    "pod",
                    "reachable",
                    "queued",
                    "in_flight",
                    "sent",
                    "failed",
                    "timed_out",
                    "reconnects",
                    "last_rtt",
                ],
            )
        )
        for key in ("rpc", "events"):
            if isinstance(result.get(key), dict):
                fields = " ".join(f"{k}={cell(v, k)}" for k, v in sorted(result[key].items()))
                print(f"{key}: {fields}")
    elif isinstance(result, dict):
        nested = {
            k: v
            for k, v in result.items()
            if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)
        }
        for key in sorted(result):
            if key in nested:
                continue
            value = result[key]
            if isinstance(value, list | dict) and value:
                value = json.dumps(value, sort_keys=True)
            print(f"{key}: {cell(value, key)}")
        for key, rows in sorted(nested.items()):
            columns = [
                c
                for c in ("id", "exec_id", "container", "state", "args", "exit_status")
                if any(c in r for r in rows)
            ]
            print(f"\n{key}:")
            print(table(rows, columns))
    else:
        print(json.dumps(result))
