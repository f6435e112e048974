"""Crash-safe, versioned state: one SQLite database per daemon, one row per record.

What it must survive is a crash of the *daemon* (kill -9 at any point): the state directory is
under ``/run`` by default, which does not outlive a reboot, and neither do the VMs the records
describe. The database is ``<state_dir>/state.db`` in WAL mode with ``synchronous=NORMAL`` and
an exclusive lock:

- a save is one transaction (one or several rows, e.g. a pod and the one container that changed):
  after a crash at any point the database holds either all of it or none of it. A commit appends
  to the WAL without ``fsync`` (a commit is in the kernel once ``write`` returned, which is all a
  process crash needs); the WAL is ``fsync``'d only at checkpoints, so on a disk even a power
  loss leaves a consistent database (the last transactions may be missing), never a torn one;
- a failed write (``ENOSPC``, ``EIO``, a short write: SQLite checks every one) rolls the
  transaction back and raises :class:`StoreError`: the previous rows stay as they were;
- ``locking_mode=EXCLUSIVE``: no other process can open the database while the daemon has it,
  and no shared-memory index file is needed.

Rows are ``(kind, key) -> (version, JSON)``; a key is one name or several joined by ``/`` (e.g.
``pod/container``), each matching the id rule. Loading never fails as a whole: a row that does
not decode, has an unknown version or names another record is reported in
:attr:`LoadResult.problems`, logged, and moved to the ``quarantine`` table, so that the other
records still load and the bad one is kept for a person to read. A database file that SQLite
cannot open at all is moved to ``<state_dir>/quarantine/`` and the problem reported.

Records written by earlier versions (one JSON file per record, ``<state_dir>/<kind>/<key>.json``)
are read by :meth:`StateStore.load_legacy`, so an upgrade keeps the pods it finds.
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import msgspec

from hyperd.errors import StateError
from protocol import jsonerrors

STATE_VERSION = 1  # bump when a record's shape changes incompatibly
DB_NAME = "state.db"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # same rule as pod/container ids
_MAX_KEY_PARTS = 4  # kind/pod/container/exec at most
_TMP_SUFFIX = ".tmp"  # legacy per-file saves
BUSY_TIMEOUT = 5.0  # seconds; only the daemon itself uses the database (exclusive lock)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    kind TEXT NOT NULL, key TEXT NOT NULL, version INTEGER NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (kind, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quarantine (
    kind TEXT NOT NULL, key TEXT NOT NULL, version INTEGER, data BLOB,
    problem TEXT NOT NULL, at REAL NOT NULL
);
"""

log = logging.getLogger(__name__)

T = TypeVar("T", bound=msgspec.Struct)


class StoreError(StateError):
    """A record cannot be saved, deleted or read (bad key, disk full, I/O error).

    The message names the record and the database file; the rows are as before the call.
    """


class _Envelope(msgspec.Struct, Generic[T]):
    version: int
    kind: str
    key: str
    record: T


@dataclass
class LoadResult(Generic[T]):
    """Records that loaded, by key, and one line per record that did not (now quarantined)."""

    records: dict[str, T] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def check_key(key: str) -> str:
    """``key`` if it is one id or up to four ids joined by ``/``; raises StoreError."""
    parts = key.split("/")
    if len(parts) > _MAX_KEY_PARTS or not all(_NAME.match(p) for p in parts):
        raise StoreError(f"invalid key {key!r}: must be ids ({_NAME.pattern}) joined by '/'")
    return key


def _check_kind(kind: str) -> str:
    if not _NAME.match(kind):
        raise StoreError(f"invalid kind {kind!r}: must match {_NAME.pattern}")
    return kind


def _prefix_bounds(prefix: str) -> tuple[str, str]:
    """Keys below ``prefix/``: ``prefix/ <= key < prefix0`` ('0' follows '/' in ASCII)."""
    return prefix + "/", prefix + "0"


class StateStore:
    """Records of several kinds in one database; safe to use from several threads.

    Opening creates the directory (mode 0700) and the database (mode 0600); raises
    :class:`StoreError` if the directory cannot be used. :attr:`problems` lists what opening had
    to set aside (a database SQLite could not read, moved to ``quarantine/``).
    """

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.root = Path(state_dir)
        self.path = self.root / DB_NAME
        self.problems: list[str] = []
        self._lock = threading.Lock()
        self._encoder = msgspec.json.Encoder()
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StoreError(f"cannot create the state dir {self.root}: {exc.strerror}") from None
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as exc:
            problem = f"{self.path}: unreadable state database ({exc}); moved to quarantine"
            log.error("%s", problem)
            self.problems.append(problem)
            for suffix in ("", "-wal", "-journal"):
                self._quarantine_file(Path(f"{self.path}{suffix}"))
            try:
                self._db = self._open()
            except sqlite3.Error as exc2:
                raise StoreError(f"cannot open {self.path}: {exc2}") from None
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {self.path}: {exc}") from None

    def _open(self) -> sqlite3.Connection:
        # created here first so that its mode is 0600 (SQLite gives the WAL the same mode)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)
        db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT
        )
        try:
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            mode = db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.DatabaseError(f"cannot use WAL mode (journal mode {mode})")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            check = db.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise sqlite3.DatabaseError(f"integrity check: {check}")
        except BaseException:
            db.close()
            raise
        return db

    def close(self) -> None:
        """Close the database (checkpointing the WAL into it); the store is unusable after."""
        with self._lock:
            self._db.close()

    # ---- writing ----------------------------------------------------------------------------

    def encode(self, record: msgspec.Struct) -> bytes:
        """``record`` as stored (JSON)."""
        return self._encoder.encode(record)

    def commit(
        self,
        puts: Iterable[tuple[str, str, bytes]] = (),
        deletes: Iterable[tuple[str, str]] = (),
        delete_trees: Iterable[tuple[str, str]] = (),
    ) -> None:
        """One transaction: write each ``(kind, key, json)``, delete each ``(kind, key)`` and
        every ``(kind, key/…)`` below each of ``delete_trees``. All or nothing: on a failure the
        rows are as before and :class:`StoreError` says why."""
        puts = [(_check_kind(k), check_key(key), data) for k, key, data in puts]
        deletes = [(_check_kind(k), check_key(key)) for k, key in deletes]
        trees = [(_check_kind(k), *_prefix_bounds(check_key(key))) for k, key in delete_trees]
        with self._lock:
            db = self._db
            try:
                if len(puts) == 1 and not deletes and not trees:
                    # one statement is a transaction of its own (autocommit): the common save,
                    # one row, without the two statements around it
                    k, key, data = puts[0]
                    db.execute(
                        "INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?)",
                        (k, key, STATE_VERSION, data),
                    )
                    return
                db.execute("BEGIN IMMEDIATE")
                if puts:
                    db.executemany(
                        "INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?)",
                        [(k, key, STATE_VERSION, data) for k, key, data in puts],
                    )
                if deletes:
                    db.executemany("DELETE FROM records WHERE kind = ? AND key = ?", deletes)
                if trees:
                    db.executemany(
                        "DELETE FROM records WHERE kind = ? AND key >= ? AND key < ?", trees
                    )
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                what = ", ".join(f"{k}/{key}" for k, key, _ in puts[:3]) or "records"
                raise StoreError(f"cannot save {what} in {self.path}: {exc}") from None

    def _rollback(self) -> None:
        if self._db.in_transaction:
            try:
                self._db.execute("ROLLBACK")
            except sqlite3.Error as exc:  # SQLite rolled back itself (e.g. after SQLITE_FULL)
                log.debug("rollback: %s", exc)

    def save(self, kind: str, key: str, record: msgspec.Struct) -> None:
        """Replace the record ``kind/key`` with ``record`` (atomic); raises StoreError."""
        self.commit(puts=[(kind, key, self.encode(record))])

    def delete(self, kind: str, key: str) -> None:
        """Remove the record ``kind/key`` (no error if it does not exist)."""
        self.commit(deletes=[(kind, key)])

    # ---- reading ------------------------------------------------------------------------------

    def load_all(self, kind: str, type_: type[T]) -> LoadResult[T]:
        """Every record of ``kind``; bad rows are quarantined and listed in ``problems``."""
        _check_kind(kind)
        decoder = msgspec.json.Decoder(type_)
        result: LoadResult[T] = LoadResult()
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT key, version, data FROM records WHERE kind = ? ORDER BY key", (kind,)
                ).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read {kind} records from {self.path}: {exc}") from None
        bad: list[tuple[str, int, bytes, str]] = []
        for key, version, data in rows:
            problem = None
            if version != STATE_VERSION:
                problem = f"state version {version}, expected {STATE_VERSION}"
            else:
                try:
                    result.records[key] = decoder.decode(data)
                except jsonerrors.DECODE_ERRORS as exc:
                    problem = f"unreadable state record: {exc}"
            if problem is not None:
                bad.append((key, version, data, problem))
        for key, version, data, problem in bad:
            line = f"{self.path}: {kind}/{key}: {problem}"
            log.error("%s; moved to quarantine", line)
            result.problems.append(line)
            self._quarantine_row(kind, key, version, data, problem)
        return result

    def quarantine(self, kind: str, key: str, problem: str) -> None:
        """Move the row ``kind/key`` to the quarantine table (a record that loaded but cannot be
        used, e.g. a container whose pod has no record)."""
        with self._lock:
            row = self._db.execute(
                "SELECT version, data FROM records WHERE kind = ? AND key = ?", (kind, key)
            ).fetchone()
        if row is not None:
            self._quarantine_row(kind, key, row[0], row[1], problem)

    def _quarantine_row(self, kind: str, key: str, version: int, data: bytes, why: str) -> None:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute(
                    "INSERT INTO quarantine VALUES (?, ?, ?, ?, ?, ?)",
                    (kind, key, version, data, why, time.time()),
                )
                self._db.execute("DELETE FROM records WHERE kind = ? AND key = ?", (kind, key))
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                log.error("cannot quarantine %s/%s: %s", kind, key, exc)

    def quarantined(self) -> list[tuple[str, str, str]]:
        """``(kind, key, problem)`` of every quarantined row, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT kind, key, problem FROM quarantine ORDER BY at"
            ).fetchall()
        return [(str(k), str(key), str(p)) for k, key, p in rows]

    # ---- records of earlier versions (one JSON file each) ---------------------------------------

    def load_legacy(self, kind: str, type_: type[T]) -> LoadResult[T]:
        """Records left as ``<state_dir>/<kind>/<key>.json`` by an earlier version.

        Bad files are moved to ``<state_dir>/quarantine/`` and listed in ``problems``; a
        record that was imported is removed with :meth:`remove_legacy`.
        """
        directory = self.root / _check_kind(kind)
        result: LoadResult[T] = LoadResult()
        if not directory.is_dir():
            return result
        decoder = msgspec.json.Decoder(_Envelope[type_])  # type: ignore[valid-type]
        for path in sorted(directory.iterdir()):
            if path.name.endswith(_TMP_SUFFIX):
                # a save interrupted before its rename: the previous record is still in place
                path.unlink(missing_ok=True)
                continue
            if not path.name.endswith(".json"):
                continue
            key = path.name[: -len(".json")]
            problem = None
            try:
                env: Any = decoder.decode(path.read_bytes())
            except jsonerrors.DECODE_ERRORS as exc:
                problem = f"{path}: unreadable state record: {exc}"
            except OSError as exc:
                problem = f"{path}: cannot read: {exc.strerror}"
            else:
                if env.version != STATE_VERSION:
                    problem = f"{path}: state version {env.version}, expected {STATE_VERSION}"
                elif env.kind != kind or env.key != key:
                    problem = f"{path}: record names {env.kind}/{env.key}, not {kind}/{key}"
                else:
                    result.records[key] = env.record
            if problem is not None:
                log.error("%s; moved to quarantine", problem)
                result.problems.append(problem)
                self._quarantine_file(path)
        return result

    def remove_legacy(self, kind: str, key: str) -> None:
        """Remove the legacy file of ``kind/key`` (imported), and its directory once empty."""
        directory = self.root / _check_kind(kind)
        (directory / f"{check_key(key)}.json").unlink(missing_ok=True)
        try:
            directory.rmdir()
        except OSError:
            pass  # not empty yet

    def _quarantine_file(self, path: Path) -> None:
        if not path.exists():
            return
        qdir = self.root / "quarantine"
        qdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = qdir / f"{path.parent.name}-{path.name}.{stamp}.{os.getpid()}"
        try:
            os.rename(path, target)
        except OSError as exc:
            log.error("cannot quarantine %s: %s", path, exc.strerror)
