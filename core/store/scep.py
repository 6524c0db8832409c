"""The SCEP connector's SQL: RA certificates, one-time challenges, transactions, and
failed-attempt counters. Everything a request depends on lives here, so that every gateway
process (and host) sees the same state.

Every function takes the caller's connection, so the caller decides what commits together.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, bindparam, insert, select, update
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import IntegrityError

from pkigate.core.store import as_utc, schema
from pkigate.core.store.fastpath import FastInsert, FastQuery, FastSelect


def _utc(moment: datetime | None) -> datetime:
    value = as_utc(moment)
    assert value is not None
    return value


# -- RA certificates ---------------------------------------------------------------------


@dataclass(frozen=True)
class RARecord:
    id: str
    connector: str
    ca_id: str
    key_id: str
    certificate_der: bytes
    not_before: datetime
    not_after: datetime
    created_at: datetime


def ra_certificates(conn: Connection, connector: str, ca_id: str) -> list[RARecord]:
    """The connector's RA certificates for ``ca_id``, newest first."""
    c = schema.scep_ra_certificates.c
    rows = conn.execute(
        select(schema.scep_ra_certificates)
        .where(c.connector == connector, c.ca_id == ca_id)
        .order_by(c.created_at.desc(), c.id)
    ).all()
    return [
        RARecord(
            row.id,
            row.connector,
            row.ca_id,
            row.key_id,
            bytes(row.certificate_der),
            _utc(row.not_before),
            _utc(row.not_after),
            _utc(row.created_at),
        )
        for row in rows
    ]


def insert_ra_certificate(conn: Connection, record: RARecord) -> None:
    conn.execute(
        insert(schema.scep_ra_certificates).values(
            id=record.id,
            connector=record.connector,
            ca_id=record.ca_id,
            key_id=record.key_id,
            certificate_der=record.certificate_der,
            not_before=record.not_before,
            not_after=record.not_after,
            created_at=record.created_at,
        )
    )


# -- one-time challenges -----------------------------------------------------------------


@dataclass(frozen=True)
class ChallengeRecord:
    id: str
    connector: str
    subject: str | None
    device_id: str | None
    created_at: datetime
    created_by: str
    expires_at: datetime
    used_at: datetime | None
    sans: tuple[str, ...] | None = None


def insert_challenge(
    conn: Connection,
    *,
    challenge_id: str,
    connector: str,
    secret_sha256: str,
    subject: str | None,
    device_id: str | None,
    created_at: datetime,
    created_by: str,
    expires_at: datetime,
    sans: tuple[str, ...] | None = None,
) -> None:
    conn.execute(
        insert(schema.scep_challenges).values(
            id=challenge_id,
            connector=connector,
            secret_sha256=secret_sha256,
            subject=subject,
            device_id=device_id,
            created_at=created_at,
            created_by=created_by,
            expires_at=expires_at,
            sans=None if sans is None else json.dumps(list(sans)),
        )
    )


_CHALLENGE_BY_SECRET = FastSelect(
    select(schema.scep_challenges).where(
        schema.scep_challenges.c.connector == bindparam("connector"),
        schema.scep_challenges.c.secret_sha256 == bindparam("secret_sha256"),
    )
)


def challenge_by_secret(
    conn: Connection, connector: str, secret_sha256: str
) -> ChallengeRecord | None:
    # Asked for every enrollment whose connector takes one-time challenges.
    row = _CHALLENGE_BY_SECRET.first(conn, connector=connector, secret_sha256=secret_sha256)
    if row is None:
        return None
    return ChallengeRecord(
        row.id,
        row.connector,
        row.subject,
        row.device_id,
        _utc(row.created_at),
        row.created_by,
        _utc(row.expires_at),
        as_utc(row.used_at),
        None if row.sans is None else tuple(json.loads(row.sans)),
    )


def consume_challenge(conn: Connection, challenge_id: str, now: datetime) -> bool:
    """Mark the challenge used; False if another request used it first."""
    c = schema.scep_challenges.c
    result = conn.execute(
        update(schema.scep_challenges)
        .where(c.id == challenge_id, c.used_at.is_(None), c.expires_at > now)
        .values(used_at=now)
    )
    return result.rowcount == 1


# -- transactions ------------------------------------------------------------------------


@dataclass(frozen=True)
class TransactionRecord:
    connector: str
    transaction_id: str
    csr_sha256: str
    subject: str
    status: str  # ISSUED, PENDING (waiting for approval), APPROVING (being issued), REJECTED
    ca_id: str | None
    serial: str | None
    created_at: datetime
    evidence: str = "{}"
    """JSON: the authorization evidence, plus who approved or rejected and why."""
    csr_der: bytes = b""
    updated_at: datetime | None = None


_TRANSACTION = FastSelect(
    select(schema.scep_transactions).where(
        schema.scep_transactions.c.connector == bindparam("connector"),
        schema.scep_transactions.c.transaction_id == bindparam("transaction_id"),
    )
)


def get_transaction(
    conn: Connection, connector: str, transaction_id: str
) -> TransactionRecord | None:
    # Asked for every PKCSReq and RenewalReq (a retried transaction gets its first answer).
    row = _TRANSACTION.first(conn, connector=connector, transaction_id=transaction_id)
    return None if row is None else _transaction(row)


def _transaction(row: Any) -> TransactionRecord:
    return TransactionRecord(
        row.connector,
        row.transaction_id,
        row.csr_sha256,
        row.subject,
        row.status,
        row.ca_id,
        row.serial,
        _utc(row.created_at),
        row.evidence,
        bytes(row.csr_der),
        as_utc(row.updated_at),
    )


def transactions_with_status(
    conn: Connection, connector: str, status: str
) -> list[TransactionRecord]:
    """The connector's transactions in ``status``, oldest first."""
    c = schema.scep_transactions.c
    rows = conn.execute(
        select(schema.scep_transactions)
        .where(c.connector == connector, c.status == status)
        .order_by(c.created_at, c.transaction_id)
    ).all()
    return [_transaction(row) for row in rows]


def settle_transaction(
    conn: Connection,
    *,
    connector: str,
    transaction_id: str,
    from_status: str,
    status: str,
    evidence: str,
    ca_id: str | None,
    serial: str | None,
    now: datetime,
) -> bool:
    """Move a transaction out of ``from_status``; False if it was not (any more) in it, so
    that two approvers racing each other cannot both act."""
    c = schema.scep_transactions.c
    result = conn.execute(
        update(schema.scep_transactions)
        .where(
            c.connector == connector,
            c.transaction_id == transaction_id,
            c.status == from_status,
        )
        .values(status=status, evidence=evidence, ca_id=ca_id, serial=serial, updated_at=now)
    )
    return result.rowcount == 1


# Recorded for every enrollment, in the issuance transaction: on the driver cursor (see
# fastpath), since SQLAlchemy's statement building costs more than the two statements.
_TRANSACTION_VALUES = (
    "csr_sha256",
    "csr_der",
    "evidence",
    "subject",
    "status",
    "ca_id",
    "serial",
    "updated_at",
)
_UPDATE_TRANSACTION: dict[str, FastQuery] = {}
_INSERT_TRANSACTION: dict[str, FastInsert] = {}


def _transaction_writes(dialect: Dialect) -> tuple[FastQuery, FastInsert]:
    update_query = _UPDATE_TRANSACTION.get(dialect.name)
    insert_query = _INSERT_TRANSACTION.get(dialect.name)
    if update_query is None or insert_query is None:
        c = schema.scep_transactions.c
        assignments = ", ".join(f"{name} = ?" for name in _TRANSACTION_VALUES)
        update_query = _UPDATE_TRANSACTION[dialect.name] = FastQuery(
            f"UPDATE scep_transactions SET {assignments}"  # noqa: S608 - names from this module
            " WHERE connector = ? AND transaction_id = ?",
            dialect,
            parameters=[*(c[name] for name in _TRANSACTION_VALUES), c.connector, c.transaction_id],
        )
        insert_query = _INSERT_TRANSACTION[dialect.name] = FastInsert(
            schema.scep_transactions, dialect
        )
    return update_query, insert_query


def record_transaction(
    conn: Connection,
    *,
    connector: str,
    transaction_id: str,
    csr_sha256: str,
    csr_der: bytes,
    evidence: str,
    subject: str,
    status: str,
    ca_id: str | None,
    serial: str | None,
    now: datetime,
) -> None:
    """Insert the transaction, or update it (a renewal within the same transactionID).

    Not an upsert: two requests with one new transactionID racing on PostgreSQL must not
    both be recorded, so the second INSERT fails on the key (IntegrityError) and its
    caller answers with what the first recorded."""
    values = (csr_sha256, csr_der, evidence, subject, status, ca_id, serial, now)
    update_query, insert_query = _transaction_writes(conn.dialect)
    if update_query.changed(conn, *values, connector, transaction_id) == 0:
        row = dict(zip(_TRANSACTION_VALUES, values, strict=True))
        row.update(connector=connector, transaction_id=transaction_id, created_at=now)
        try:
            insert_query.execute(conn, [row])
        except conn.dialect.loaded_dbapi.IntegrityError as exc:
            # The driver's error, as SQLAlchemy would have raised it: what callers catch.
            raise IntegrityError(insert_query.sql, None, exc) from exc


# -- failed-attempt counters -------------------------------------------------------------


# Asked for every enrollment with a static challenge (and every failed one): on the driver
# cursor, since building the statement in SQLAlchemy costs several times what running it
# does. The same SQL on SQLite (3.35+) and PostgreSQL.
_COUNT_ATTEMPT_SQL = """
INSERT INTO scep_failures (connector, scope, value, count, window_start) VALUES (?, ?, ?, 1, ?)
ON CONFLICT (connector, scope, value) DO UPDATE SET
  count = CASE WHEN scep_failures.window_start <= ? THEN 1 ELSE scep_failures.count + 1 END,
  window_start = CASE WHEN scep_failures.window_start <= ? THEN ?
    ELSE scep_failures.window_start END
WHERE scep_failures.window_start <= ? OR scep_failures.count < ?
RETURNING window_start
"""
_COUNT_ATTEMPT: dict[str, FastQuery] = {}


def _count_attempt_query(dialect: Dialect) -> FastQuery:
    c = schema.scep_failures.c
    at = c.window_start
    return FastQuery(
        _COUNT_ATTEMPT_SQL,
        dialect,
        parameters=[c.connector, c.scope, c.value, at, at, at, at, at, c.count],
        results=[at],
    )


def count_attempt(
    conn: Connection,
    connector: str,
    scope: str,
    value: str,
    *,
    limit: int,
    now: datetime,
    window: timedelta,
) -> datetime | None:
    """Count one attempt against ``(scope, value)`` unless ``limit`` are already counted in
    its window (a window older than ``window`` starts over). Returns the window's start when
    counted, None when the limit is reached (nothing is changed then).

    One statement checks and counts, so that concurrent attempts cannot all pass the check
    before any of them is counted: on PostgreSQL the upsert takes the counter's row lock
    and holds it until the caller's transaction ends (attempts queue behind it, in every
    process and host); on SQLite the caller's write transaction holds the store's write
    lock. An attempt that turns out right is taken back by rolling the transaction back, or
    by :func:`uncount_attempt` once committed."""
    query = _COUNT_ATTEMPT.get(conn.dialect.name)
    if query is None:
        query = _COUNT_ATTEMPT[conn.dialect.name] = _count_attempt_query(conn.dialect)
    expired = now - window
    rows = query.rows(conn, connector, scope, value, now, expired, expired, now, expired, limit)
    row = rows[0] if rows else None
    return None if row is None else _utc(row[0])


def uncount_attempt(
    conn: Connection, connector: str, scope: str, value: str, window_start: datetime
) -> None:
    """Take back an attempt :func:`count_attempt` counted in the window that started at
    ``window_start`` (not in a later one, which it is no part of)."""
    c = schema.scep_failures.c
    conn.execute(
        update(schema.scep_failures)
        .where(
            c.connector == connector,
            c.scope == scope,
            c.value == value,
            c.window_start == window_start,
            c.count > 0,
        )
        .values(count=c.count - 1)
    )
