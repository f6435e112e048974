"""Pods in rows of the state store: a pod's own fields, one row per container, one per exec.

A save writes, in one transaction, the rows whose content changed since they were last written
(hyperd keeps the bytes of every row it wrote, so an unchanged row costs an encode and no
write). ``save(pod, c)`` looks at the pod's row and ``c``'s only: a change of one container never
rewrites the other containers of the pod, whatever their number. ``save(pod)`` looks at every row
of the pod (pod-wide changes: start, stop, adoption).

Keys: ``pods/<pod>``, ``containers/<pod>/<container>``, ``execs/<pod>/<exec>``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import msgspec

from hyperd.daemon.model import ContainerRecord, ExecRecord, PodRecord
from hyperd.store import StateStore

log = logging.getLogger(__name__)

POD_KIND = "pods"
CONTAINER_KIND = "containers"
EXEC_KIND = "execs"

Row = tuple[str, str]  # (kind, key)
Member = ContainerRecord | ExecRecord


def _row_of(pod: PodRecord, record: Member) -> Row:
    kind = CONTAINER_KIND if isinstance(record, ContainerRecord) else EXEC_KIND
    return kind, f"{pod.id}/{record.id}"


def _members(pod: PodRecord) -> list[Member]:
    return [*pod.containers.values(), *pod.execs.values()]


def _present(pod: PodRecord, record: Member) -> bool:
    if isinstance(record, ContainerRecord):
        return pod.containers.get(record.id) is record
    return pod.execs.get(record.id) is record


class PodPersistence:
    """Saves, forgets and loads :class:`PodRecord`\\ s through a :class:`StateStore`."""

    def __init__(self, store: StateStore) -> None:
        self.store = store
        self._written: dict[str, dict[Row, bytes]] = {}  # pod id -> rows as last written
        self.saves = 0
        self.rows_written = 0

    def _pod_row(self, pod: PodRecord) -> bytes:
        return self.store.encode(msgspec.structs.replace(pod, containers={}, execs={}))

    def save(self, pod: PodRecord, records: Sequence[Member] | None = None) -> None:
        """Write the rows that changed: with ``records``, theirs only (an operation on a
        container or exec changes no field of the pod itself); without, ``pod``'s and every
        container's and exec's of it. The row of a record no longer in the pod is deleted. One
        transaction; raises :class:`hyperd.store.StoreError` with every row as it was."""
        written = self._written.get(pod.id, {})
        puts: list[tuple[str, str, bytes]] = []
        deletes: list[Row] = []

        def put(row: Row, data: bytes) -> None:
            if written.get(row) != data:
                puts.append((row[0], row[1], data))

        if records is None:
            put((POD_KIND, pod.id), self._pod_row(pod))
            present: set[Row] = {(POD_KIND, pod.id)}
            for member in _members(pod):
                row = _row_of(pod, member)
                present.add(row)
                put(row, self.store.encode(member))
            deletes = [row for row in written if row not in present]
        else:
            for member in records:
                row = _row_of(pod, member)
                if _present(pod, member):
                    put(row, self.store.encode(member))
                else:
                    deletes.append(row)
        if not puts and not deletes:
            return
        self.store.commit(puts=puts, deletes=deletes)
        self.saves += 1
        self.rows_written += len(puts)
        written = self._written.setdefault(pod.id, {})
        for kind, key, data in puts:
            written[(kind, key)] = data
        for row in deletes:
            written.pop(row, None)

    def forget(self, pod: PodRecord) -> None:
        """Delete every row of ``pod`` (one transaction); raises ``StoreError``."""
        self.store.commit(
            deletes=[(POD_KIND, pod.id)],
            delete_trees=[(CONTAINER_KIND, pod.id), (EXEC_KIND, pod.id)],
        )
        self._written.pop(pod.id, None)

    def load(self) -> tuple[dict[str, PodRecord], list[str]]:
        """Every persisted pod with its containers and execs, and the problems met (bad rows
        are quarantined by the store). Pods left by an earlier version as JSON files are
        imported (written as rows, then their files removed)."""
        problems = list(self.store.problems)
        pods_r = self.store.load_all(POD_KIND, PodRecord)
        containers_r = self.store.load_all(CONTAINER_KIND, ContainerRecord)
        execs_r = self.store.load_all(EXEC_KIND, ExecRecord)
        problems += pods_r.problems + containers_r.problems + execs_r.problems
        pods = pods_r.records
        for key, c in sorted(containers_r.records.items(), key=lambda kv: kv[1].created_at):
            problem = self._attach(pods, key, c, CONTAINER_KIND)
            if problem is None:
                pods[key.split("/")[0]].containers[c.id] = c
            else:
                problems.append(problem)
        for key, e in sorted(execs_r.records.items(), key=lambda kv: kv[1].created_at):
            problem = self._attach(pods, key, e, EXEC_KIND)
            if problem is None:
                pods[key.split("/")[0]].execs[e.id] = e
            else:
                problems.append(problem)
        for pod in pods.values():
            self._remember(pod)
        legacy = self.store.load_legacy(POD_KIND, PodRecord)
        problems += legacy.problems
        for pid, pod in legacy.records.items():
            if pid not in pods:  # (else: imported already, the crash came before the removal)
                self.save(pod)
                pods[pid] = pod
                log.info("imported the state file of an earlier version", extra={"pod": pid})
            self.store.remove_legacy(POD_KIND, pid)
        return pods, problems

    def _attach(
        self, pods: dict[str, PodRecord], key: str, record: Member, kind: str
    ) -> str | None:
        """Why the row ``kind/key`` cannot join its pod (then it is quarantined), or None."""
        pod_id, _, member_id = key.partition("/")
        if pod_id not in pods:
            problem = f"{kind}/{key}: its pod {pod_id!r} has no record"
        elif member_id != record.id:
            problem = f"{kind}/{key}: the record names {record.id!r}"
        else:
            return None
        log.error("state: %s; moved to quarantine", problem)
        self.store.quarantine(kind, key, problem)
        return problem

    def _remember(self, pod: PodRecord) -> None:
        written = self._written.setdefault(pod.id, {})
        written[(POD_KIND, pod.id)] = self._pod_row(pod)
        for member in _members(pod):
            written[_row_of(pod, member)] = self.store.encode(member)
