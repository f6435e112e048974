"""Structured logging: one line per event, journald-friendly.

Formats:

- ``journal``: ``<N>`` syslog priority prefix (journald reads it off stderr) then
  ``logger: message key=value…``; the default under systemd (``$JOURNAL_STREAM`` set);
- ``json``: one JSON object per line with ``ts``, ``level``, ``logger``, ``msg`` and the fields;
- ``text``: a timestamp, level, logger, message and ``key=value`` fields, for terminals.

Fields are passed as ``extra={"pod": ..., "container": ..., "vm": ...}``; only the names in
:data:`FIELDS` are rendered, so that arbitrary LogRecord attributes never leak into lines.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import msgspec

FIELDS = ("pod", "container", "exec_id", "vm", "pid", "peer", "method", "error", "reason")
_PRIORITY = {  # syslog priorities of sd-daemon(3)
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}
_json = msgspec.json.Encoder()


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: getattr(record, k) for k in FIELDS if getattr(record, k, None) is not None}


def _kv(fields: dict[str, Any]) -> str:
    parts = []
    for key, value in fields.items():
        text = str(value)
        if not text or any(c in text for c in ' "='):
            text = '"' + text.replace('"', '\\"') + '"'
        parts.append(f"{key}={text}")
    return (" " + " ".join(parts)) if parts else ""


class JournalFormatter(logging.Formatter):
    """``<N>logger: message key=value`` lines."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        line = f"<{prio}>{record.name}: {record.getMessage()}{_kv(_fields(record))}"
        if record.exc_info:
            line += " " + repr(self.formatException(record.exc_info))
        return line


class JSONFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return _json.encode(obj).decode()


class TextFormatter(logging.Formatter):
    """``2026-01-01T00:00:00.000Z INFO logger: message key=value`` lines."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        ms = int(record.msecs)
        line = (
            f"{ts}.{ms:03d}Z {record.levelname} {record.name}: "
            f"{record.getMessage()}{_kv(_fields(record))}"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(
    level: str = "info", fmt: str = "auto", *, under_systemd: bool | None = None
) -> logging.Handler:
    """Configure the root logger to write ``fmt`` lines to stderr at ``level``.

    ``fmt`` ``auto`` picks ``journal`` under systemd and ``text`` otherwise. Returns the handler.
    """
    if under_systemd is None:
        under_systemd = bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))
    if fmt == "auto":
        fmt = "journal" if under_systemd else "text"
    formatter: logging.Formatter
    if fmt == "journal":
        formatter = JournalFormatter()
    elif fmt == "json":
        formatter = JSONFormatter()
    elif fmt == "text":
        formatter = TextFormatter()
    else:
        raise ValueError(f"unknown log format {fmt!r}: expected auto, journal, json or text")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
