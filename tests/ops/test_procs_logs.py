"""Process identity (pid + start time) and the log line formats."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import time

import pytest

from hyperd import logs
from hyperd.procs import ProcessIdentity, identify, is_same_process, start_time, terminate


def test_identity_of_a_real_child() -> None:
    p = subprocess.Popen(["sleep", "30"])
    try:
        ident = identify(p.pid)
        assert ident is not None and ident.pid == p.pid
        assert is_same_process(ident)
        # the same pid with another start time is another process (a reused pid)
        assert not is_same_process(ProcessIdentity(p.pid, ident.start_time + 1))
        assert terminate(ident, timeout=5)
        assert not is_same_process(ident)
    finally:
        p.kill()
        p.wait()


def test_terminate_escalates_to_kill() -> None:
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('armed', flush=True); time.sleep(30)"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert p.stdout is not None and p.stdout.readline() == b"armed\n"
        ident = identify(p.pid)
        assert ident is not None
        started = time.monotonic()
        assert terminate(ident, timeout=0.3)
        assert time.monotonic() - started >= 0.3  # SIGTERM was ignored, SIGKILL was needed
        assert not is_same_process(ident)
    finally:
        p.kill()
        p.wait()
        if p.stdout is not None:
            p.stdout.close()


def test_terminate_spares_a_reused_pid() -> None:
    p = subprocess.Popen(["sleep", "30"])
    try:
        ident = identify(p.pid)
        assert ident is not None
        assert terminate(ProcessIdentity(p.pid, ident.start_time - 1), timeout=0.2)
        assert p.poll() is None  # never signalled: it is not the process we recorded
    finally:
        p.kill()
        p.wait()


def test_start_time_of_missing_pid() -> None:
    assert start_time(2**22 + 12345) is None
    assert identify(2**22 + 12345) is None


def _emit(fmt: str) -> str:
    handler = logs.setup_logging("debug", fmt)
    buf = io.StringIO()
    handler.setStream(buf)  # type: ignore[attr-defined]
    logging.getLogger("hyperd.test").warning(
        "pod started", extra={"pod": "p1", "vm": "v 1", "irrelevant": "x"}
    )
    return buf.getvalue()


@pytest.fixture(autouse=True)
def _restore_logging() -> object:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_journal_format() -> None:
    assert _emit("journal") == '<4>hyperd.test: pod started pod=p1 vm="v 1"\n'


def test_json_format() -> None:
    obj = json.loads(_emit("json"))
    assert obj["level"] == "warning" and obj["msg"] == "pod started"
    assert obj["pod"] == "p1" and obj["vm"] == "v 1" and "irrelevant" not in obj


def test_text_format() -> None:
    line = _emit("text")
    assert line.endswith(' WARNING hyperd.test: pod started pod=p1 vm="v 1"\n')


def test_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown log format"):
        logs.setup_logging("info", "xml")
