"""The OCSP responder's SQL: delegated responder certificates and cached responses.

Every function takes the caller's connection, so the caller decides what commits together.
The per-request lookup runs on a pooled driver connection (see ``single_read`` and
``fastpath``): it is the responder's hot path, and SQLAlchemy's transaction and statement
machinery would cost more than the query itself.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, Engine, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.pool import PoolProxiedConnection

from pkigate.core.store import as_utc, schema
from pkigate.core.store.fastpath import FastQuery
from pkigate.core.store.fastpath import _convert as convert


@dataclass(frozen=True)
class ResponderRecord:
    id: str
    ca_id: str
    key_id: str
    certificate_der: bytes
    not_before: datetime
    not_after: datetime
    created_at: datetime


@dataclass(frozen=True)
class CachedResponse:
    der: bytes
    this_update: datetime
    next_update: datetime


@dataclass(frozen=True)
class CertificateState:
    status: str  # ISSUED | REVOKED
    revoked_at: datetime | None
    revocation_reason: str | None


@dataclass(frozen=True)
class Lookup:
    """Everything one request needs from the store, read in one indexed round trip."""

    ca_version: datetime  # the CA row's updated_at: cached CA details are valid while equal
    cached: CachedResponse | None
    certificate: CertificateState | None  # None: this CA issued no such serial


_LOOKUPS: dict[str, FastQuery] = {}


def _lookup_query(dialect: Dialect) -> FastQuery:
    query = _LOOKUPS.get(dialect.name)
    if query is None:
        a, r, c = schema.authorities.c, schema.ocsp_responses.c, schema.certificates.c
        query = FastQuery(
            "SELECT a.updated_at, r.der, r.this_update, r.next_update,"
            " c.status, c.revoked_at, c.revocation_reason"
            " FROM authorities a"
            " LEFT JOIN ocsp_responses r ON r.ca_id = a.id AND r.serial = ?"
            " LEFT JOIN certificates c ON c.ca_id = a.id AND c.serial = ?"
            " WHERE a.id = ?",
            dialect,
            parameters=[r.serial, c.serial, a.id],
            results=[
                a.updated_at,
                r.der,
                r.this_update,
                r.next_update,
                c.status,
                c.revoked_at,
                c.revocation_reason,
            ],
        )
        _LOOKUPS[dialect.name] = query
    return query


@contextmanager
def single_read(engine: Engine) -> Iterator[PoolProxiedConnection]:
    """A pooled driver connection for one read-only statement.

    A single SELECT is consistent on its own, so it needs no transaction of SQLAlchemy's:
    SQLite runs it in autocommit mode, and whatever PostgreSQL's driver began is rolled
    back when the connection goes back to the pool. This saves most of the cost of
    ``Store.read()`` on the responder's hot path.
    """
    conn = engine.raw_connection()
    try:
        yield conn
    finally:
        conn.close()


def lookup(conn: PoolProxiedConnection, dialect: Dialect, ca_id: str, serial: str) -> Lookup | None:
    """The CA's version, the cached response and the certificate's state; None: no such CA."""
    query = _lookup_query(dialect)
    cursor = conn.cursor()
    try:
        cursor.execute(query.sql, convert((serial, serial, ca_id), query.parameters))
        row = cursor.fetchone()
    finally:
        cursor.close()
    if row is None:
        return None
    updated_at, der, this_update, next_update, status, revoked_at, reason = convert(
        row, query.results
    )
    version = as_utc(updated_at)
    assert version is not None
    cached = None
    if der is not None:
        start, end = as_utc(this_update), as_utc(next_update)
        assert start is not None and end is not None
        cached = CachedResponse(bytes(der), start, end)
    state = CertificateState(str(status), as_utc(revoked_at), reason) if status else None
    return Lookup(version, cached, state)


class MemoizedLookups:
    """:func:`lookup` on SQLite through one dedicated read connection, each answer
    remembered until any other connection, in any process, commits to the database.

    ``PRAGMA data_version`` on a connection changes exactly when another connection has
    committed since this one last asked (https://sqlite.org/pragma.html#pragma_data_version);
    this connection only reads, so every write (a revocation, a cached response, an
    issuance) counts. Checking it costs one statement without a table access, where the
    lookup costs a three-table read and its conversions. A commit between the check and
    the lookup changes the next check too, so a remembered answer is never older than the
    last check. Not thread-safe: the caller runs one lookup at a time.
    """

    MEMO_LIMIT = 100_000

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._connection: PoolProxiedConnection | None = None
        self._pid = 0
        self._version: object = None
        self._memo: dict[tuple[str, str], Lookup | None] = {}

    def lookup(self, ca_id: str, serial: str) -> Lookup | None:
        connection = self._connect()
        try:
            cursor = connection.cursor()
            try:
                cursor.execute("PRAGMA data_version")
                version = cursor.fetchone()
            finally:
                cursor.close()
            if version != self._version:
                self._memo.clear()
                self._version = version
            key = (ca_id, serial)
            if key in self._memo:
                return self._memo[key]
            found = lookup(connection, self._engine.dialect, ca_id, serial)
        except Exception:
            self.close()
            raise
        if len(self._memo) >= self.MEMO_LIMIT:
            self._memo.clear()
        self._memo[key] = found
        return found

    def close(self) -> None:
        connection, self._connection = self._connection, None
        self._memo.clear()
        self._version = None
        if connection is not None and self._pid == os.getpid():
            connection.close()

    def _connect(self) -> PoolProxiedConnection:
        # A connection opened before a fork belongs to the parent: never use it here.
        if self._connection is None or self._pid != os.getpid():
            self._connection = self._engine.raw_connection()
            self._pid = os.getpid()
            self._version = None
            self._memo.clear()
        return self._connection


def certificate_state(
    conn: Connection, ca_id: str, serial: str, *, lock: bool = False
) -> CertificateState | None:
    """A certificate's revocation state; ``lock`` holds its row until the transaction ends.

    The lock orders a cache write after any revocation of the same certificate that is in
    flight on PostgreSQL (SQLite serializes write transactions anyway).
    """
    c = schema.certificates.c
    query = select(c.status, c.revoked_at, c.revocation_reason).where(
        c.ca_id == ca_id, c.serial == serial
    )
    if lock:
        query = query.with_for_update()
    row = conn.execute(query).first()
    if row is None:
        return None
    return CertificateState(str(row[0]), as_utc(row[1]), row[2])


def put_response(
    conn: Connection,
    ca_id: str,
    serial: str,
    der: bytes,
    this_update: datetime,
    next_update: datetime,
) -> None:
    """Insert or replace the cached response for one certificate."""
    table = schema.ocsp_responses
    values = {"der": der, "this_update": this_update, "next_update": next_update}
    dialect_insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    statement = (
        dialect_insert(table)
        .values(ca_id=ca_id, serial=serial, **values)
        .on_conflict_do_update(index_elements=[table.c.ca_id, table.c.serial], set_=values)
    )
    conn.execute(statement)


# -- delegated responders -----------------------------------------------------------------


def latest_responder(conn: Connection, ca_id: str) -> ResponderRecord | None:
    """The CA's responder certificate that lasts longest."""
    o = schema.ocsp_responders.c
    row = conn.execute(
        select(schema.ocsp_responders)
        .where(o.ca_id == ca_id)
        .order_by(o.not_after.desc(), o.created_at.desc())
        .limit(1)
    ).first()
    if row is None:
        return None
    values = dict(row._mapping)
    for name in ("not_before", "not_after", "created_at"):
        values[name] = as_utc(values[name])
    values["certificate_der"] = bytes(values["certificate_der"])
    return ResponderRecord(**values)


def is_responder_certificate(conn: Connection, ca_id: str, certificate_der: bytes) -> bool:
    """Whether ``certificate_der`` is (or was) one of the CA's responder certificates."""
    o = schema.ocsp_responders.c
    return (
        conn.execute(
            select(o.id).where(o.ca_id == ca_id, o.certificate_der == certificate_der).limit(1)
        ).first()
        is not None
    )


def delete_cached_responses(conn: Connection, ca_id: str) -> None:
    """Forget every cached response of the CA (its responder changed)."""
    conn.execute(delete(schema.ocsp_responses).where(schema.ocsp_responses.c.ca_id == ca_id))


def count_responders(conn: Connection, ca_id: str) -> int:
    o = schema.ocsp_responders.c
    return int(
        conn.execute(
            select(func.count()).select_from(schema.ocsp_responders).where(o.ca_id == ca_id)
        ).scalar_one()
    )


def claim_key(
    conn: Connection,
    key_id: str,
    backend: str,
    algorithm: str,
    now: datetime,
    abandoned_before: datetime,
) -> bool:
    """Reserve ``key_id`` for a responder about to be created; False if someone holds it.

    The claim is a ``ca_keys`` row without a blob. A claim left behind by a process that
    died before completing it (still no blob, older than ``abandoned_before``) is taken
    over. On PostgreSQL a concurrent first claim surfaces as an IntegrityError on insert.
    """
    k = schema.ca_keys.c
    row = conn.execute(select(k.blob, k.created_at).where(k.id == key_id).with_for_update()).first()
    if row is None:
        conn.execute(
            insert(schema.ca_keys).values(
                id=key_id, backend=backend, algorithm=algorithm, blob=None, created_at=now
            )
        )
        return True
    blob, created_at = row
    created = as_utc(created_at)
    if blob is not None or created is None or created >= abandoned_before:
        return False
    taken = conn.execute(
        update(schema.ca_keys)
        .where(k.id == key_id, k.blob.is_(None), k.created_at == created_at)
        .values(created_at=now)
    )
    return bool(taken.rowcount)


def release_claim(conn: Connection, key_id: str, claimed_at: datetime) -> None:
    """Give up a claim made at ``claimed_at`` whose responder could not be created (its row
    has no blob); a claim another process has taken over since is left alone."""
    k = schema.ca_keys.c
    conn.execute(
        delete(schema.ca_keys).where(k.id == key_id, k.blob.is_(None), k.created_at == claimed_at)
    )


def complete_responder(
    conn: Connection,
    *,
    responder_id: str,
    ca_id: str,
    key_id: str,
    blob: bytes,
    certificate_der: bytes,
    not_before: datetime,
    not_after: datetime,
    claimed_at: datetime,
    now: datetime,
) -> bool:
    """Store the sealed key of ``key_id``, claimed at ``claimed_at``, and make its
    certificate current. False (and nothing written) if the claim is no longer ours:
    another process took it over as abandoned."""
    k = schema.ca_keys.c
    stored = conn.execute(
        update(schema.ca_keys)
        .where(k.id == key_id, k.blob.is_(None), k.created_at == claimed_at)
        .values(blob=blob)
    )
    if stored.rowcount != 1:
        return False
    conn.execute(
        insert(schema.ocsp_responders).values(
            id=responder_id,
            ca_id=ca_id,
            key_id=key_id,
            certificate_der=certificate_der,
            not_before=not_before,
            not_after=not_after,
            created_at=now,
        )
    )
    return True
