"""Crash-safe state: atomic saves, quarantine of bad files, keys checked."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import msgspec
import pytest

from hyperd.store import STATE_VERSION, StateStore, StoreError


class Rec(msgspec.Struct):
    id: str
    n: int = 0
    tags: list[str] = []


def test_save_load_delete(tmp_path: Path) -> None:
    s = StateStore(tmp_path)
    s.save("pods", "a", Rec("a", 1))
    s.save("pods", "b", Rec("b", 2, ["x"]))
    s.save("pods", "a", Rec("a", 3))
    res = s.load_all("pods", Rec)
    assert res.records == {"a": Rec("a", 3), "b": Rec("b", 2, ["x"])}
    assert res.problems == []
    s.delete("pods", "a")
    s.delete("pods", "a")  # idempotent
    assert set(s.load_all("pods", Rec).records) == {"b"}
    env = json.loads((tmp_path / "pods" / "b.json").read_text())
    assert env["version"] == STATE_VERSION and env["kind"] == "pods" and env["key"] == "b"


def test_interrupted_save_keeps_previous_record(tmp_path: Path) -> None:
    s = StateStore(tmp_path)
    s.save("pods", "a", Rec("a", 1))
    # a crash after writing the temp file but before the rename leaves a stray temp file
    (tmp_path / "pods" / ".a.123.tmp").write_bytes(b'{"version":1,"kind":"pods","key":"a","rec')
    res = s.load_all("pods", Rec)
    assert res.records == {"a": Rec("a", 1)}
    assert res.problems == []
    assert not (tmp_path / "pods" / ".a.123.tmp").exists()


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b'{"version":1,"kind":"pods","key":"bad","record":{"id":"bad","n":', "unreadable"),
        (b"not json at all", "unreadable"),
        (b'{"version":99,"kind":"pods","key":"bad","record":{"id":"bad"}}', "state version 99"),
        (b'{"version":1,"kind":"pods","key":"bad","record":{"id":7}}', "unreadable"),
        (b'{"version":1,"kind":"pods","key":"other","record":{"id":"x"}}', "names pods/other"),
    ],
)
def test_bad_file_is_quarantined_not_fatal(tmp_path: Path, content: bytes, problem: str) -> None:
    s = StateStore(tmp_path)
    s.save("pods", "good", Rec("good"))
    (tmp_path / "pods" / "bad.json").write_bytes(content)
    res = s.load_all("pods", Rec)
    assert res.records == {"good": Rec("good")}
    assert len(res.problems) == 1 and problem in res.problems[0] and "bad.json" in res.problems[0]
    assert not (tmp_path / "pods" / "bad.json").exists()
    quarantined = list((tmp_path / "quarantine").iterdir())
    assert len(quarantined) == 1 and quarantined[0].read_bytes() == content


@pytest.mark.parametrize("key", ["../x", "", "a/b", ".hidden", "x" * 200])
def test_keys_cannot_escape(tmp_path: Path, key: str) -> None:
    with pytest.raises(StoreError, match="invalid key"):
        StateStore(tmp_path).save("pods", key, Rec("x"))


def test_concurrent_saves_never_mix(tmp_path: Path) -> None:
    s = StateStore(tmp_path)

    def writer(i: int) -> None:
        for n in range(50):
            s.save("pods", f"p{i % 3}", Rec(f"p{i % 3}", n, [str(i)] * 20))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    res = s.load_all("pods", Rec)
    assert res.problems == []
    assert set(res.records) == {"p0", "p1", "p2"}
    assert all(not n.endswith(".tmp") for n in os.listdir(tmp_path / "pods"))
