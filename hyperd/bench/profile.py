"""``--profile DIR``: sample every helper process with py-spy while the scenarios run.

Each helper the run starts (proxy, simulated VM, daemon — with ``--subprocesses`` for the
daemon, so the proxies and VMs it starts are sampled too) gets a ``py-spy record`` in raw
(collapsed stacks) format; py-spy writes its file when the process it samples exits. After the
run, :func:`summarize` turns each file into the functions with the most samples, by own time
and including callees, written next to it as ``<name>.top.txt``. The runner itself (which hosts
hyperd.vm's client side in scenario 1) is profiled with cProfile: ``runner-scenario<N>.top.txt``.

py-spy is optional (``pip install py-spy``); without it the run says so and goes on.
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import os
import pstats
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Final

SAMPLE_RATE: Final = 500
TOP: Final = 25
PROCESS_FRAME: Final = "process "
WAIT: Final = 20.0
"""Seconds to wait for py-spy to write its file once its target is gone."""


def find_py_spy() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


class Profiler:
    """py-spy samplers attached to helper processes; :meth:`finish` waits for their files."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.binary = find_py_spy()
        self._samplers: list[tuple[subprocess.Popen[bytes], Path]] = []

    @property
    def available(self) -> bool:
        return self.binary is not None

    def attach(self, pid: int, name: str, *, subprocesses: bool = False) -> None:
        if self.binary is None:
            return
        out = self.directory / f"{len(self._samplers) + 1:03d}-{name}-{pid}.raw"
        argv = [
            self.binary,
            "record",
            "--pid",
            str(pid),
            "--rate",
            str(SAMPLE_RATE),
            "--format",
            "raw",
            "--output",
            str(out),
            "--nonblocking",
        ]
        if subprocesses:
            argv.append("--subprocesses")
        self._samplers.append(
            (
                subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                ),
                out,
            )
        )

    def finish(self) -> list[Path]:
        """Wait for every sampler (they end with their target), then write the summaries."""
        summaries = []
        for proc, out in self._samplers:
            try:
                proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT too
                try:
                    proc.wait(WAIT)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            if out.exists():
                top = out.with_suffix(".top.txt")
                top.write_text(summarize(out))
                summaries.append(top)
        self._samplers.clear()
        return summaries

    def write_own(self, name: str, profile: cProfile.Profile) -> Path:
        """The runner's own cProfile (it hosts hyperd.vm's client side): top functions."""
        out = self.directory / f"{name}.top.txt"
        text = io.StringIO()
        stats = pstats.Stats(profile, stream=text)
        stats.sort_stats("tottime").print_stats(TOP)
        stats.sort_stats("cumulative").print_stats(TOP)
        out.write_text(text.getvalue())
        return out

    def stop_all(self) -> None:
        """Kill every sampler still running (error paths)."""
        for proc, _ in self._samplers:
            with contextlib.suppress(OSError):
                proc.kill()
            proc.wait()
        self._samplers.clear()


def summarize(raw: Path, top: int = TOP) -> str:
    """The functions with the most samples in a py-spy raw file, per process sampled (a
    ``--subprocesses`` file roots each stack at ``process <pid>:"<command line>"``): own time,
    then including callees."""
    stacks: dict[str, list[tuple[list[str], int]]] = {}
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        marks = [i for i, f in enumerate(frames) if f.startswith(PROCESS_FRAME)]
        process = frames[marks[-1]] if marks else ""  # children nest under their parent
        if marks:
            frames = frames[marks[-1] + 1 :] or [process]
        stacks.setdefault(process, []).append((frames, int(count)))
    out = [f"{raw.name}: py-spy at {SAMPLE_RATE} Hz (samples while running, not idle)"]
    for process, entries in sorted(stacks.items(), key=lambda kv: -sum(n for _, n in kv[1])):
        own: Counter[str] = Counter()
        inclusive: Counter[str] = Counter()
        total = 0
        for frames, n in entries:
            total += n
            own[frames[-1]] += n
            for frame in set(frames):
                inclusive[frame] += n
        out += ["", f"== {process or 'process'}: {total} samples", "own time:"]
        out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
        out += ["including callees:"]
        out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top)]
    return "\n".join(out) + os.linesep
