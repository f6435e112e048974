"""Crash-safe state: atomic transactions, failures that leave the previous rows, quarantine of
bad rows and files, keys checked, records of the earlier file-per-record format imported."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from hyperd.errors import StateError
from hyperd.store import DB_NAME, STATE_VERSION, StateStore, StoreError


class Rec(msgspec.Struct):
    id: str
    n: int = 0
    tags: list[str] = []


def _raw(tmp_path: Path) -> sqlite3.Connection:
    """A second connection to a closed store's database (as a person would look at it)."""
    return sqlite3.connect(tmp_path / DB_NAME)


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
    s.close()
    with contextlib.closing(_raw(tmp_path)) as db:
        rows = db.execute("SELECT kind, key, version, data FROM records").fetchall()
    assert rows == [("pods", "b", STATE_VERSION, b'{"id":"b","n":2,"tags":["x"]}')]


def test_files_are_private(tmp_path: Path) -> None:
    s = StateStore(tmp_path / "state")
    s.save("pods", "a", Rec("a"))
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    for name in os.listdir(tmp_path / "state"):
        assert (tmp_path / "state" / name).stat().st_mode & 0o077 == 0, name
    s.close()


def test_commit_is_all_or_nothing(tmp_path: Path) -> None:
    s = StateStore(tmp_path)
    s.commit(puts=[("pods", "p", s.encode(Rec("p"))), ("containers", "p/c1", s.encode(Rec("c1")))])
    s.commit(puts=[("containers", "p/c2", s.encode(Rec("c2")))])
    with pytest.raises(StoreError, match="invalid key"):
        # a bad key anywhere in a commit: nothing of it is written
        s.commit(puts=[("pods", "p", s.encode(Rec("p", 9))), ("containers", "p/../x", b"{}")])
    assert s.load_all("pods", Rec).records == {"p": Rec("p")}
    s.commit(deletes=[("pods", "p")], delete_trees=[("containers", "p")])
    assert s.load_all("containers", Rec).records == {}
    s.close()


def test_delete_tree_stays_below_its_prefix(tmp_path: Path) -> None:
    s = StateStore(tmp_path)
    for key in ("p/a", "p/b", "p2/a", "p-x/a", "p.y/a", "q/a"):
        s.save("containers", key, Rec(key))
    s.commit(delete_trees=[("containers", "p")])
    assert sorted(s.load_all("containers", Rec).records) == ["p-x/a", "p.y/a", "p2/a", "q/a"]
    s.close()


def test_store_error_is_a_state_error_for_callers(tmp_path: Path) -> None:
    with pytest.raises(StateError) as err:
        StateStore(tmp_path).save("pods", "../x", Rec("x"))
    assert err.value.kind == "state_error"


@pytest.mark.parametrize(
    ("data", "version", "problem"),
    [
        (b'{"id":"bad","n":', STATE_VERSION, "unreadable"),
        (b"not json at all", STATE_VERSION, "unreadable"),
        (b'{"id":"bad"}', 99, "state version 99"),
        (b'{"id":7}', STATE_VERSION, "unreadable"),
    ],
)
def test_bad_row_is_quarantined_not_fatal(
    tmp_path: Path, data: bytes, version: int, problem: str
) -> None:
    s = StateStore(tmp_path)
    s.save("pods", "good", Rec("good"))
    s.close()
    with contextlib.closing(_raw(tmp_path)) as db:
        db.execute("INSERT INTO records VALUES ('pods', 'bad', ?, ?)", (version, data))
        db.commit()
    s = StateStore(tmp_path)
    res = s.load_all("pods", Rec)
    assert res.records == {"good": Rec("good")}
    assert len(res.problems) == 1 and problem in res.problems[0] and "pods/bad" in res.problems[0]
    assert [(k, key) for k, key, _ in s.quarantined()] == [("pods", "bad")]
    assert s.load_all("pods", Rec).problems == []  # moved: reported once
    s.close()
    with contextlib.closing(_raw(tmp_path)) as db:
        assert db.execute("SELECT data FROM quarantine").fetchall() == [(data,)]


def test_unreadable_database_is_set_aside(tmp_path: Path) -> None:
    (tmp_path / DB_NAME).write_bytes(b"this is not an SQLite database, just bytes" * 100)
    s = StateStore(tmp_path)
    assert len(s.problems) == 1 and "unreadable state database" in s.problems[0]
    assert s.load_all("pods", Rec).records == {}
    s.save("pods", "a", Rec("a"))  # and the fresh database works
    s.close()
    quarantined = os.listdir(tmp_path / "quarantine")
    assert len(quarantined) == 1 and quarantined[0].startswith(f"{tmp_path.name}-{DB_NAME}")


def test_second_store_on_the_same_dir_is_refused(tmp_path: Path) -> None:
    s = StateStore(tmp_path)
    s.save("pods", "a", Rec("a"))  # the exclusive lock is taken with the first write
    db = sqlite3.connect(tmp_path / DB_NAME, timeout=0)
    with contextlib.closing(db), pytest.raises(sqlite3.OperationalError, match="locked"):
        db.execute("SELECT * FROM records").fetchall()
    s.close()


@pytest.mark.parametrize("key", ["../x", "", "a//b", ".hidden", "x" * 200, "a/b/c/d/e", "a\x00"])
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
    # each record is one writer's whole save, never a mix of two
    assert all(r.n == 49 and r.tags == [r.tags[0]] * 20 for r in res.records.values())
    s.close()


# ---- records of the earlier file-per-record format -------------------------------------------


def _legacy(tmp_path: Path, key: str, content: bytes) -> Path:
    d = tmp_path / "pods"
    d.mkdir(exist_ok=True)
    (d / f"{key}.json").write_bytes(content)
    return d / f"{key}.json"


def test_legacy_records_load_and_go(tmp_path: Path) -> None:
    env = {"version": 1, "kind": "pods", "key": "old", "record": {"id": "old", "n": 4}}
    path = _legacy(tmp_path, "old", json.dumps(env).encode())
    (tmp_path / "pods" / ".old.1.tmp").write_bytes(b"{")  # an interrupted save of that format
    s = StateStore(tmp_path)
    res = s.load_legacy("pods", Rec)
    assert res.records == {"old": Rec("old", 4)} and res.problems == []
    assert not (tmp_path / "pods" / ".old.1.tmp").exists()
    s.remove_legacy("pods", "old")
    assert not path.exists() and not (tmp_path / "pods").exists()
    s.close()


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b'{"version":1,"kind":"pods","key":"bad","record":{"id":"bad","n":', "unreadable"),
        (b'{"version":99,"kind":"pods","key":"bad","record":{"id":"bad"}}', "state version 99"),
        (b'{"version":1,"kind":"pods","key":"other","record":{"id":"x"}}', "names pods/other"),
    ],
)
def test_bad_legacy_file_is_quarantined(tmp_path: Path, content: bytes, problem: str) -> None:
    _legacy(tmp_path, "bad", content)
    s = StateStore(tmp_path)
    res = s.load_legacy("pods", Rec)
    assert res.records == {}
    assert len(res.problems) == 1 and problem in res.problems[0] and "bad.json" in res.problems[0]
    quarantined = list((tmp_path / "quarantine").iterdir())
    assert len(quarantined) == 1 and quarantined[0].read_bytes() == content
    assert quarantined[0].name.startswith("pods-bad.json")
    s.close()


# ---- a full filesystem: errors, the previous rows intact -----------------------------------


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 512 KiB tmpfs of our own (needs root: CI runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


@pytest.mark.root
def test_full_filesystem_fails_saves_and_keeps_rows(small_tmpfs: Path) -> None:
    s = StateStore(small_tmpfs / "state")
    s.save("pods", "p", Rec("p", 1))
    big = ["x" * 1000] * 16
    failures = 0
    saved = 0
    for n in range(2000):  # far more than fits: saves start failing, none claims success
        try:
            s.save("containers", f"p/c{n}", Rec(f"c{n}", n, big))
            saved += 1
        except StoreError as exc:
            failures += 1
            assert "full" in str(exc) or "I/O" in str(exc) or "disk" in str(exc), exc
            with pytest.raises(StoreError):
                s.save("pods", "p", Rec("p", 2, big * 4))  # a change of an old row fails too
    assert failures > 0 and saved > 0
    assert s.load_all("pods", Rec).records == {"p": Rec("p", 1)}
    assert len(s.load_all("containers", Rec).records) == saved  # exactly what succeeded
    s.close()
    # a restart reads every row that was reported saved
    s = StateStore(small_tmpfs / "state")
    records = s.load_all("containers", Rec).records
    assert len(records) == saved
    assert all(r.tags == big and records[f"p/{r.id}"] is r for r in records.values())
    s.close()
