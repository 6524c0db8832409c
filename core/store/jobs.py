"""The SQL behind the background job queue (:mod:`pkigate.core.jobs` holds the policy).

Every function takes the caller's :class:`~sqlalchemy.Connection`, so a job can be queued
in the same transaction as the change that calls for it. Claiming relies on the database
to hand each job to one worker only: ``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL,
and on SQLite the write transaction itself, which starts with ``BEGIN IMMEDIATE`` and so
excludes every other writer, in this process or another.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Select,
    and_,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite

from pkigate.core.store import schema

__all__ = [
    "LEASE_EXPIRED_ON_LAST_ATTEMPT",
    "JobRecord",
    "JobStatus",
    "claim_due",
    "count_by_status",
    "find_by_dedupe_key",
    "get_job",
    "has_due",
    "held_job",
    "insert_job",
    "mark_done",
    "mark_failed",
    "move_run_at_earlier",
    "purge_finished",
    "release_dedupe_key",
    "reschedule",
]

LEASE_EXPIRED_ON_LAST_ATTEMPT = (
    "the worker's lease expired on the last attempt (it crashed, or the handler ran longer "
    "than the lease)"
)

_jobs = schema.jobs
_c = schema.jobs.c


class JobStatus(StrEnum):
    """Where a job is in its life; ``done`` and ``failed`` are final."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class JobRecord:
    """One row of the ``jobs`` table, timestamps in UTC."""

    id: int
    kind: str
    payload: Mapping[str, Any]
    #: Set while the job is pending or running; released (NULL) once it finishes.
    dedupe_key: str | None
    status: JobStatus
    #: When the job is (or was) next due.
    run_at: datetime
    #: Attempts started so far, counting one in progress.
    attempts: int
    max_attempts: int
    #: The worker holding the lease while running.
    locked_by: str | None
    locked_until: datetime | None
    last_error: str | None
    created_at: datetime
    finished_at: datetime | None


def _utc(moment: datetime) -> datetime:
    # SQLite keeps DateTime columns as text without an offset, so every value bound or
    # read must be UTC for comparisons between them to mean anything.
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _utc_or_none(moment: datetime | None) -> datetime | None:
    return None if moment is None else _utc(moment)


def _record(row: Any) -> JobRecord:
    values = row._mapping
    return JobRecord(
        id=int(values["id"]),
        kind=values["kind"],
        payload=json.loads(values["payload"]),
        dedupe_key=values["dedupe_key"],
        status=JobStatus(values["status"]),
        run_at=_utc(values["run_at"]),
        attempts=int(values["attempts"]),
        max_attempts=int(values["max_attempts"]),
        locked_by=values["locked_by"],
        locked_until=_utc_or_none(values["locked_until"]),
        last_error=values["last_error"],
        created_at=_utc(values["created_at"]),
        finished_at=_utc_or_none(values["finished_at"]),
    )


def _is_postgresql(conn: Connection) -> bool:
    return conn.dialect.name == "postgresql"


def insert_job(
    conn: Connection,
    *,
    kind: str,
    payload: Mapping[str, Any],
    run_at: datetime,
    dedupe_key: str | None,
    max_attempts: int,
    now: datetime,
) -> int | None:
    """Insert a pending job; ``None`` when another job already holds ``dedupe_key``.

    The conflict is absorbed rather than raised so that it never aborts the caller's
    transaction (PostgreSQL would refuse every later statement in it). On PostgreSQL a
    conflicting insert by a transaction still in progress is waited for, so afterwards
    :func:`find_by_dedupe_key` sees the winner.
    """
    values = {
        "kind": kind,
        "payload": json.dumps(dict(payload), sort_keys=True, separators=(",", ":")),
        "dedupe_key": dedupe_key,
        "status": JobStatus.PENDING.value,
        "run_at": _utc(run_at),
        "attempts": 0,
        "max_attempts": max_attempts,
        "created_at": _utc(now),
    }
    if dedupe_key is None:
        key = conn.execute(insert(_jobs).values(**values)).inserted_primary_key
        assert key is not None
        return int(key[0])
    dialect_insert = postgresql.insert if _is_postgresql(conn) else sqlite.insert
    statement = (
        dialect_insert(_jobs)
        .values(**values)
        .on_conflict_do_nothing(index_elements=[_c.dedupe_key])
        .returning(_c.id)
    )
    job_id = conn.execute(statement).scalar_one_or_none()
    return None if job_id is None else int(job_id)


def find_by_dedupe_key(conn: Connection, dedupe_key: str) -> JobRecord | None:
    """The job holding ``dedupe_key``, locked until the transaction ends (PostgreSQL)."""
    query = select(_jobs).where(_c.dedupe_key == dedupe_key)
    if _is_postgresql(conn):
        query = query.with_for_update()
    row = conn.execute(query).first()
    return None if row is None else _record(row)


def move_run_at_earlier(conn: Connection, job_id: int, run_at: datetime) -> None:
    run_at = _utc(run_at)
    conn.execute(
        update(_jobs)
        .where(and_(_c.id == job_id, _c.status == JobStatus.PENDING.value, _c.run_at > run_at))
        .values(run_at=run_at)
    )


def release_dedupe_key(conn: Connection, job_id: int) -> None:
    conn.execute(update(_jobs).where(_c.id == job_id).values(dedupe_key=None))


def _due(kinds: Collection[str]) -> ColumnElement[bool]:
    """Jobs of ``kinds`` due at the bound parameter ``now``."""
    now = bindparam("now", type_=_c.run_at.type)
    return and_(
        _c.kind.in_(list(kinds)),
        or_(
            and_(_c.status == JobStatus.PENDING.value, _c.run_at <= now),
            and_(_c.status == JobStatus.RUNNING.value, _c.locked_until <= now),
        ),
    )


# A runner asks with the same kinds every time: its statements are built once (SQLAlchemy
# then finds them compiled in its cache without rebuilding their cache keys).
@functools.lru_cache(maxsize=64)
def _has_due_query(kinds: tuple[str, ...]) -> Select[Any]:
    return select(_c.id).where(_due(kinds)).limit(1)


@functools.lru_cache(maxsize=64)
def _candidates_query(kinds: tuple[str, ...], limit: int, for_update: bool) -> Select[Any]:
    query = (
        select(_c.id, _c.status, _c.attempts, _c.max_attempts)
        .where(_due(kinds))
        .order_by(_c.run_at, _c.id)
        .limit(limit)
    )
    if for_update:
        # Rows another claimer has locked are skipped, not waited for; a row it has
        # already claimed and committed is re-checked against `due` and left out.
        query = query.with_for_update(skip_locked=True)
    return query


def has_due(conn: Connection, kinds: Collection[str], now: datetime) -> bool:
    """Whether any job of ``kinds`` is due; a read, so it takes no write lock."""
    if not kinds:
        return False
    query = _has_due_query(tuple(sorted(kinds)))
    return conn.execute(query, {"now": _utc(now)}).first() is not None


def claim_due(
    conn: Connection,
    *,
    worker_id: str,
    kinds: Collection[str],
    limit: int,
    now: datetime,
    locked_until: datetime,
) -> list[JobRecord]:
    """Lease up to ``limit`` due jobs of ``kinds`` to ``worker_id``, oldest due first.

    Due means pending with ``run_at`` reached, or running under a lease that has expired
    (its worker died or overran). An expired job that has no attempts left is marked
    failed here instead of being handed out again.
    """
    if not kinds or limit <= 0:
        return []
    now = _utc(now)
    query = _candidates_query(tuple(sorted(kinds)), limit, _is_postgresql(conn))
    while True:
        candidates = conn.execute(query, {"now": now}).all()
        if not candidates:
            return []
        exhausted = [
            row.id
            for row in candidates
            if row.status == JobStatus.RUNNING.value and row.attempts >= row.max_attempts
        ]
        if exhausted:
            conn.execute(
                update(_jobs)
                .where(_c.id.in_(exhausted))
                .values(_finished(JobStatus.FAILED, now, LEASE_EXPIRED_ON_LAST_ATTEMPT))
            )
        claimed = [row.id for row in candidates if row.id not in exhausted]
        if claimed:
            break
    conn.execute(
        update(_jobs)
        .where(_c.id.in_(claimed))
        .values(
            status=JobStatus.RUNNING.value,
            locked_by=worker_id,
            locked_until=_utc(locked_until),
            attempts=_c.attempts + 1,
        )
    )
    rows = conn.execute(select(_jobs).where(_c.id.in_(claimed)).order_by(_c.run_at, _c.id))
    return [_record(row) for row in rows]


def held_job(conn: Connection, job_id: int, worker_id: str) -> JobRecord | None:
    """The job if ``worker_id`` still holds its lease, locked until the transaction ends.

    A worker whose lease expired keeps the job until another worker claims it.
    """
    query = select(_jobs).where(
        and_(
            _c.id == job_id,
            _c.status == JobStatus.RUNNING.value,
            _c.locked_by == worker_id,
        )
    )
    if _is_postgresql(conn):
        query = query.with_for_update()
    row = conn.execute(query).first()
    return None if row is None else _record(row)


def _finished(status: JobStatus, now: datetime, error: str | None) -> dict[str, Any]:
    # A finished job gives up its dedupe key so that new work for the same key can queue.
    return {
        "status": status.value,
        "finished_at": _utc(now),
        "last_error": error,
        "dedupe_key": None,
        "locked_by": None,
        "locked_until": None,
    }


def mark_done(conn: Connection, job_id: int, now: datetime) -> None:
    conn.execute(update(_jobs).where(_c.id == job_id).values(_finished(JobStatus.DONE, now, None)))


def mark_done_if_held(conn: Connection, job_id: int, worker_id: str, now: datetime) -> bool:
    """:func:`mark_done` if ``worker_id`` still holds the job's lease (:func:`held_job`), in
    one statement; whether it did."""
    changed = conn.execute(
        update(_jobs)
        .where(
            _c.id == job_id,
            _c.status == JobStatus.RUNNING.value,
            _c.locked_by == worker_id,
        )
        .values(_finished(JobStatus.DONE, now, None))
    )
    return changed.rowcount == 1


def mark_failed(conn: Connection, job_id: int, now: datetime, error: str) -> None:
    conn.execute(
        update(_jobs).where(_c.id == job_id).values(_finished(JobStatus.FAILED, now, error))
    )


def reschedule(conn: Connection, job_id: int, run_at: datetime, error: str) -> None:
    """Put a failed attempt back in the queue for another try at ``run_at``."""
    conn.execute(
        update(_jobs)
        .where(_c.id == job_id)
        .values(
            status=JobStatus.PENDING.value,
            run_at=_utc(run_at),
            last_error=error,
            locked_by=None,
            locked_until=None,
        )
    )


def get_job(conn: Connection, job_id: int) -> JobRecord | None:
    row = conn.execute(select(_jobs).where(_c.id == job_id)).first()
    return None if row is None else _record(row)


def count_by_status(conn: Connection) -> dict[JobStatus, int]:
    rows = conn.execute(select(_c.status, func.count()).group_by(_c.status))
    counts = dict.fromkeys(JobStatus, 0)
    for status, count in rows:
        counts[JobStatus(status)] = int(count)
    return counts


def purge_finished(conn: Connection, finished_before: datetime) -> int:
    """Delete done and failed jobs that finished before ``finished_before``; how many."""
    result = conn.execute(
        delete(_jobs).where(
            and_(
                _c.status.in_([JobStatus.DONE.value, JobStatus.FAILED.value]),
                _c.finished_at < _utc(finished_before),
            )
        )
    )
    return int(result.rowcount)
