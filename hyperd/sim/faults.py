"""Fault knobs of the simulated VM and the command recorder.

Commands are numbered from 1 in the order the simulator receives them (over all host
connections). With a knob set to N, commands 1..N are answered normally and the fault starts at
command N+1: ``silent`` answers nothing from then on, ``garbage`` answers with bytes that are no
valid ctl frame, ``crash`` closes both channels and exits nonzero.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import msgspec

from protocol import jsonerrors

__all__ = ["Action", "FaultPlan", "Recorder"]

log = logging.getLogger(__name__)

# A ctl header announcing a 4 GiB frame: every host decoder must reject it.
GARBAGE = b"\xff" * 16


class Action(enum.Enum):
    """What to do with one received command."""

    REPLY = "reply"
    SILENT = "silent"
    GARBAGE = "garbage"
    CRASH = "crash"


@dataclass
class FaultPlan:
    """Decides, per command number, whether the simulated agent misbehaves."""

    delay: float = 0.0
    silent_after: int | None = None
    crash_after: int | None = None
    garbage_after: int | None = None
    received: int = 0

    def next_command(self) -> Action:
        """Count one received command and return what to do with it (crash wins, then silent)."""
        self.received += 1
        n = self.received
        if self.crash_after is not None and n > self.crash_after:
            return Action.CRASH
        if self.silent_after is not None and n > self.silent_after:
            return Action.SILENT
        if self.garbage_after is not None and n > self.garbage_after:
            return Action.GARBAGE
        return Action.REPLY

    @property
    def silent(self) -> bool:
        """True once the agent has stopped talking on ctl (no NEXT, no events either)."""
        return self.silent_after is not None and self.received > self.silent_after


class Recorder:
    """Appends one JSON line per received ctl command: ``{"code", "name", "payload"}``.

    ``payload`` is the parsed JSON body, or null when the body is empty or not JSON.
    Each line is flushed so a test can read it while the simulator runs.
    """

    def __init__(self, path: Path | None) -> None:
        self._file: TextIO | None = path.open("a", encoding="utf-8") if path else None

    def record(self, code: int, name: str, payload: bytes) -> None:
        if self._file is None:
            return
        parsed: Any = None
        if payload:
            try:
                parsed = msgspec.json.decode(payload)
            except jsonerrors.DECODE_ERRORS:
                parsed = None
        line = msgspec.json.encode({"code": code, "name": name, "payload": parsed})
        self._file.write(line.decode() + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
