"""Crash-safe, versioned state on disk.

Each record lives in its own file ``<state_dir>/<kind>/<key>.json`` inside an envelope
``{"version": 1, "kind": ..., "key": ..., "record": ...}``. A save writes a temp file in the same
directory, fsyncs it, renames it over the old file and fsyncs the directory, so after a crash at
any point a record is either the old one or the new one, never a mix.

Loading never fails as a whole: a corrupt, truncated or unknown-version file is reported in
:attr:`LoadResult.problems`, logged, and moved to ``<state_dir>/quarantine/`` so that the other
records still load and the bad file is kept for a person to read.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import msgspec

from protocol import jsonerrors

STATE_VERSION = 1  # bump when a record's shape changes incompatibly
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")  # same rule as pod/container ids
_TMP_SUFFIX = ".tmp"

log = logging.getLogger(__name__)

T = TypeVar("T", bound=msgspec.Struct)


class StoreError(Exception):
    """A record cannot be saved (bad key, disk error); the message names the file."""


class _Envelope(msgspec.Struct, Generic[T]):
    version: int
    kind: str
    key: str
    record: T


@dataclass
class LoadResult(Generic[T]):
    """Records that loaded, by key, and one line per file that did not (now quarantined)."""

    records: dict[str, T] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _check_name(what: str, name: str) -> None:
    if not _NAME.match(name):
        raise StoreError(f"invalid {what} {name!r}: must match {_NAME.pattern}")


class StateStore:
    """Records of several kinds under one directory; safe to use from several threads."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.root = Path(state_dir)
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._dirs: set[str] = set()
        self._encoder = msgspec.json.Encoder()

    def _lock(self, kind: str, key: str) -> threading.Lock:
        # one lock per record: saves of different pods run (and fsync) in parallel
        lock = self._locks.get((kind, key))
        if lock is None:
            with self._locks_guard:
                lock = self._locks.setdefault((kind, key), threading.Lock())
        return lock

    def _dir(self, kind: str) -> Path:
        d = self.root / kind
        if kind not in self._dirs:
            _check_name("kind", kind)
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._dirs.add(kind)
        return d

    def save(self, kind: str, key: str, record: msgspec.Struct) -> None:
        """Atomically replace the record ``kind/key`` with ``record``; raises StoreError."""
        _check_name("key", key)
        directory = self._dir(kind)
        data = self._encoder.encode(
            {"version": STATE_VERSION, "kind": kind, "key": key, "record": record}
        )
        path = directory / f"{key}.json"
        tmp = directory / f".{key}.{threading.get_ident()}{_TMP_SUFFIX}"
        with self._lock(kind, key):
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.rename(tmp, path)
                _fsync_dir(directory)
            except OSError as exc:
                tmp.unlink(missing_ok=True)
                raise StoreError(f"cannot save {path}: {exc.strerror}") from None

    def delete(self, kind: str, key: str) -> None:
        """Remove the record ``kind/key`` (no error if it does not exist)."""
        _check_name("key", key)
        directory = self._dir(kind)
        with self._lock(kind, key):
            try:
                (directory / f"{key}.json").unlink(missing_ok=True)
                _fsync_dir(directory)
            except OSError as exc:
                raise StoreError(f"cannot delete {kind}/{key}: {exc.strerror}") from None
        with self._locks_guard:  # forget the lock so that deleted records cost no memory
            self._locks.pop((kind, key), None)

    def load_all(self, kind: str, type_: type[T]) -> LoadResult[T]:
        """Every record of ``kind``; bad files are quarantined and listed in ``problems``."""
        directory = self._dir(kind)
        result: LoadResult[T] = LoadResult()
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
                self._quarantine(path)
        return result

    def _quarantine(self, path: Path) -> None:
        qdir = self.root / "quarantine"
        qdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = qdir / f"{path.parent.name}-{path.name}.{stamp}.{os.getpid()}"
        try:
            os.rename(path, target)
        except OSError as exc:
            log.error("cannot quarantine %s: %s", path, exc.strerror)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
