"""The storage authority: every read and write of pkigate's state goes through here.

SQLAlchemy stays inside this package. Callers open a transaction with :meth:`Store.write`
or :meth:`Store.read` and pass the connection to the typed methods, so one business
operation (sign, store the certificate, append the audit event) commits or rolls back as
a whole.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import (
    Connection,
    Engine,
    and_,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DatabaseError, IntegrityError

from pkigate.core import crl as crl_der
from pkigate.core.store import schema
from pkigate.core.store.engine import (
    after_commit,
    create_store_engine,
    migrate,
    read_transaction,
    sqlite_url,
    write_transaction,
)
from pkigate.core.store.fastpath import FastInsert, FastQuery, FastSelect
from pkigate.core.store.space import SpaceGuard

__all__ = [
    "ApiTokenRecord",
    "AuditEventRecord",
    "CARecord",
    "CRLNumbering",
    "CRLRecord",
    "CertificateRecord",
    "IntegrityError",
    "PolicyRecord",
    "Store",
    "TeamRecord",
    "sqlite_url",
]


def as_utc(moment: datetime | None) -> datetime | None:
    """SQLite hands timestamps back naive; everything pkigate stores is UTC."""
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _utc(moment: datetime | None) -> datetime:
    value = as_utc(moment)
    assert value is not None
    return value


@dataclass(frozen=True)
class CARecord:
    id: str
    type: str
    status: str
    status_before_delete: str | None
    key_id: str
    key_algorithm: str
    signing_algorithm: str
    usage_mode: str
    subject: str
    subject_der: bytes
    parent_id: str | None
    certificate_der: bytes | None
    chain_pem: str | None
    csr_der: bytes | None
    not_before: datetime | None
    not_after: datetime | None
    settings: Mapping[str, Any]
    failure_reason: str | None
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None
    restore_until: datetime | None
    team: str = "default"
    policy_version: int = 0  # 0: no policy


@dataclass(frozen=True)
class CertificateRecord:
    id: int
    ca_id: str
    serial: str
    subject: str
    sans: Sequence[str]
    not_before: datetime
    not_after: datetime
    issued_at: datetime
    template: str
    requester: str
    connector: str
    correlation_id: str | None
    status: str
    revoked_at: datetime | None
    revocation_reason: str | None
    fingerprint_sha256: str
    der: bytes
    crl_partition: int | None = None
    team: str | None = None  # None: the CA owner's


@dataclass(frozen=True)
class CRLNumbering:
    """What the next CRL of a partition is built on: the latest one's number and times
    (its DER, tens of MiB for a million entries, is not read for that)."""

    number: int
    this_update: datetime
    next_update: datetime


@dataclass(frozen=True)
class CRLRecord:
    ca_id: str
    partition: int  # 0: the complete CRL
    number: int
    this_update: datetime
    next_update: datetime
    entries: int
    der: bytes


@dataclass(frozen=True)
class CertificateScope:
    """The certificates a team other than the default sees: every one of the CAs it owns,
    and its own of the CAs shared with it."""

    team: str
    owned: frozenset[str]  # CA ids
    shared: frozenset[str]

    def clause(self) -> Any:
        c = schema.certificates.c
        return or_(
            c.ca_id.in_(sorted(self.owned)),
            and_(c.ca_id.in_(sorted(self.shared)), c.team == self.team),
        )


@dataclass(frozen=True)
class AuditScope:
    """What a team other than the default sees of the audit log: records about these
    resources (its readable CAs, ``ca/ID``) or made by these actors (its tokens)."""

    resources: frozenset[str]
    actors: frozenset[str]


@dataclass(frozen=True)
class AuditEventRecord:
    seq: int
    event_id: str
    at: datetime
    actor: str
    connector: str
    action: str
    resource: str
    parameters: str
    result: str
    request_id: str | None
    prev_mac: str
    mac: str


@dataclass(frozen=True)
class ApiTokenRecord:
    id: str
    name: str
    roles: tuple[str, ...]
    secret_sha256: str
    created_at: datetime
    created_by: str
    revoked_at: datetime | None
    expires_at: datetime | None
    last_used_at: datetime | None
    allow_from: tuple[str, ...]  # client networks (CIDRs); empty: from anywhere
    previous_secret_sha256: str | None  # the secret a rotation replaced
    previous_secret_until: datetime | None  # ... which works until then
    team: str = "default"


@dataclass(frozen=True)
class TeamRecord:
    name: str
    created_at: datetime
    created_by: str


@dataclass(frozen=True)
class PolicyRecord:
    ca_id: str
    version: int
    document: str  # canonical JSON
    sha256: str
    created_at: datetime
    created_by: str


def _api_token(row: Any) -> ApiTokenRecord:
    values = row._asdict()  # a SQLAlchemy Row or a FastSelect row
    values["created_at"] = _utc(values["created_at"])
    for name in ("revoked_at", "expires_at", "last_used_at", "previous_secret_until"):
        values[name] = as_utc(values[name])
    values["roles"] = tuple(values["roles"].split())
    values["allow_from"] = tuple((values["allow_from"] or "").split())
    return ApiTokenRecord(**values)


def _ca(row: Any) -> CARecord:
    values = row._asdict()  # a SQLAlchemy Row or a FastSelect row
    values["settings"] = json.loads(values["settings"] or "{}")
    for name in (
        "not_before",
        "not_after",
        "created_at",
        "updated_at",
        "deleted_at",
        "restore_until",
    ):
        values[name] = as_utc(values[name])
    return CARecord(**values)


def _certificate(row: Any) -> CertificateRecord:
    values = dict(row._mapping)
    values.pop("crl_entry", None)  # the CRL's business (crl_entries), not the record's
    values["sans"] = json.loads(values["sans"])
    for name in ("not_before", "not_after", "issued_at", "revoked_at"):
        values[name] = as_utc(values[name])
    return CertificateRecord(**values)


_CA_BY_ID = FastSelect(select(schema.authorities).where(schema.authorities.c.id == bindparam("id")))


def _crl_entries_query(dialect: Dialect, by_partition: bool, kept_after: bool) -> FastQuery:
    """How many entries, and their DER joined, in one row: the database joins them (a
    million-entry CRL makes no Python object per entry), reading only the covering index
    ``ix_certificates_crl_entries`` (named on SQLite, whose planner might otherwise take
    ``ix_certificates_ca_status`` and visit every row). Both databases cap a value at
    1 GB, some 20 million entries: far past what one CRL should hold (partition it)."""
    c = schema.certificates.c
    if dialect.name == "sqlite":
        # group_concat joins text: a blob is taken as its bytes (NULs included, the
        # database being UTF-8) and the result cast back to a blob, byte for byte.
        joined = "CAST(group_concat(crl_entry, x'') AS BLOB)"
        source = "certificates INDEXED BY ix_certificates_crl_entries"
    else:
        joined, source = "string_agg(crl_entry, ''::bytea)", "certificates"
    # Table, column and index names from here and schema.py, never from input.
    sql = f"SELECT count(*), {joined} FROM {source} WHERE ca_id = ?"  # noqa: S608
    sql += " AND crl_entry IS NOT NULL"  # what the index holds (its WHERE)
    parameters = [c.ca_id]
    if by_partition:
        sql += " AND crl_partition = ?"
        parameters.append(c.crl_partition)
    if kept_after:
        sql += " AND not_after > ?"
        parameters.append(c.not_after)
    return FastQuery(sql, dialect, parameters=parameters, results=[c.id, c.crl_entry])


def _with_crl_entry(row: Mapping[str, Any]) -> Mapping[str, Any]:
    """A certificate row with its ``crl_entry`` (a revoked row's entry, else None) when
    the writer left it out (bulk loads, restores): no revoked row is stored without one."""
    if "crl_entry" in row:
        return row
    entry = None
    if row["status"] == "REVOKED":
        entry = crl_der.entry(row["serial"], row["revoked_at"], row["revocation_reason"])
    return {**row, "crl_entry": entry}


# Read on every management API request (bearer token authentication).
_API_TOKEN_BY_ID = FastSelect(
    select(schema.api_tokens).where(schema.api_tokens.c.id == bindparam("id"))
)
_IDEMPOTENCY_ENTRY = FastSelect(
    select(schema.idempotency.c.request_hash, schema.idempotency.c.result_ref).where(
        schema.idempotency.c.scope == bindparam("scope"),
        schema.idempotency.c.token == bindparam("token"),
        schema.idempotency.c.created_at > bindparam("newer_than"),
    )
)


class Store:
    """pkigate's state in one SQL database (SQLite file by default, PostgreSQL by URL)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        dialect = engine.dialect
        database = engine.url.database if dialect.name == "sqlite" else None
        self.space = SpaceGuard(Path(database) if database and database != ":memory:" else None)
        a, h, c = schema.authorities.c, schema.audit_head.c, schema.certificates
        self._fast_certificates = FastInsert(c, dialect, generated="id")
        self._fast_audit_events = FastInsert(schema.audit_events, dialect)
        head = "SELECT seq, mac, head_mac FROM audit_head WHERE id = 1"
        if dialect.name == "postgresql":
            head += " FOR UPDATE"
        self._fast_head = FastQuery(head, dialect, results=[h.seq, h.mac, h.head_mac])
        self._fast_move_head = FastQuery(
            "UPDATE audit_head SET seq = ?, mac = ?, head_mac = ? WHERE id = 1",
            dialect,
            parameters=[h.seq, h.mac, h.head_mac],
        )
        self._crl_entries = {
            (p, k): _crl_entries_query(dialect, p, k) for p in (False, True) for k in (False, True)
        }
        self._fast_ca_state = FastQuery(
            "SELECT status, updated_at FROM authorities WHERE id = ?",
            dialect,
            parameters=[a.id],
            results=[a.status, a.updated_at],
        )

    @classmethod
    def open(cls, url: str, *, upgrade_schema: bool = False) -> Store:
        """Open the store: a new, empty one is created at the newest schema; an older one
        is migrated only with ``upgrade_schema``, else SchemaOutdatedError (engine.migrate)."""
        engine = create_store_engine(url)
        try:
            migrate(engine, upgrade=upgrade_schema)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def write(self) -> Iterator[Connection]:
        with write_transaction(self.engine) as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with read_transaction(self.engine) as conn:
            yield conn

    def ping(self) -> None:
        with self.read() as conn:
            conn.execute(select(1))

    @property
    def sqlite_database(self) -> str | None:
        """The SQLite database file's path (None for PostgreSQL and in-memory SQLite)."""
        database = self.engine.url.database
        if self.dialect != "sqlite" or not database or database == ":memory:":
            return None
        return database

    def after_commit(self, conn: Connection, callback: Callable[[], None]) -> None:
        """Run ``callback`` once this write transaction has committed, still under its
        writer lock; an error it raises reaches the writer's caller."""
        after_commit(conn, callback)

    def integrity_problem(self) -> str | None:
        """What the database's own consistency check says is wrong, or None.

        SQLite: ``PRAGMA quick_check`` (every page and index structure, without matching
        index entries to rows: seconds for gigabytes). PostgreSQL checks a page's checksum
        whenever it reads the page (clusters initialised with data checksums) and has no
        cheap whole-database check (amcheck is an extension needing privileges): None."""
        if self.dialect != "sqlite":
            return None
        try:
            with self.engine.connect() as conn:
                rows = [str(r[0]) for r in conn.execute(text("PRAGMA quick_check(5)"))]
        except DatabaseError as exc:  # too damaged for the check to walk it
            return str(exc.orig or exc)
        return None if rows == ["ok"] else "; ".join(rows)

    # -- CA keys -------------------------------------------------------------------------

    def insert_key(
        self,
        conn: Connection,
        key_id: str,
        backend: str,
        algorithm: str,
        blob: bytes | None,
        now: datetime,
    ) -> None:
        conn.execute(
            insert(schema.ca_keys).values(
                id=key_id, backend=backend, algorithm=algorithm, blob=blob, created_at=now
            )
        )

    def set_key_blob(self, conn: Connection, key_id: str, blob: bytes) -> None:
        conn.execute(update(schema.ca_keys).where(schema.ca_keys.c.id == key_id).values(blob=blob))

    def key_blob(self, conn: Connection, key_id: str) -> bytes | None:
        return conn.execute(
            select(schema.ca_keys.c.blob).where(schema.ca_keys.c.id == key_id)
        ).scalar_one_or_none()

    def key_entry(self, conn: Connection, key_id: str) -> tuple[str, bytes | None] | None:
        """(backend, blob) of a key: its blob is None once destroyed."""
        row = conn.execute(
            select(schema.ca_keys.c.backend, schema.ca_keys.c.blob).where(
                schema.ca_keys.c.id == key_id
            )
        ).one_or_none()
        return None if row is None else (row[0], row[1])

    def any_key_blob(self, conn: Connection) -> bytes | None:
        """One live sealed key, to check the key-encryption key against at start-up (a
        token key's reference is not sealed)."""
        keys = schema.ca_keys.c
        return conn.execute(
            select(keys.blob).where(keys.blob.is_not(None), keys.backend != "pkcs11").limit(1)
        ).scalar_one_or_none()

    def live_keys(self, conn: Connection, backend: str) -> list[tuple[str, bytes]]:
        """Every live key of one key backend, as (key id, blob): a restore checks that the
        key-encryption key opens them all."""
        k = schema.ca_keys.c
        rows = conn.execute(
            select(k.id, k.blob).where(k.backend == backend, k.blob.is_not(None)).order_by(k.id)
        )
        return [(str(key_id), bytes(blob)) for key_id, blob in rows]

    def responder_key_ids(self, conn: Connection, ca_id: str) -> list[str]:
        """Keys of a CA's delegated OCSP responders (destroyed with the CA's own key)."""
        r = schema.ocsp_responders.c
        return list(conn.execute(select(r.key_id).where(r.ca_id == ca_id)).scalars())

    def destroy_key(self, conn: Connection, key_id: str, now: datetime) -> None:
        conn.execute(
            update(schema.ca_keys)
            .where(schema.ca_keys.c.id == key_id)
            .values(blob=None, destroyed_at=now)
        )

    # -- Authorities ---------------------------------------------------------------------

    def insert_ca(self, conn: Connection, **values: Any) -> None:
        values["settings"] = json.dumps(values.get("settings") or {}, sort_keys=True)
        conn.execute(insert(schema.authorities).values(**values))

    def update_ca(self, conn: Connection, ca_id: str, **values: Any) -> None:
        if "settings" in values:
            values["settings"] = json.dumps(values["settings"], sort_keys=True)
        conn.execute(
            update(schema.authorities).where(schema.authorities.c.id == ca_id).values(**values)
        )

    def get_ca(self, conn: Connection, ca_id: str) -> CARecord | None:
        if "\x00" in ca_id:  # from a URL; PostgreSQL text cannot hold NUL (a DataError)
            return None
        row = _CA_BY_ID.first(conn, id=ca_id)
        return _ca(row) if row is not None else None

    def list_cas(self, conn: Connection, status: str | None = None) -> list[CARecord]:
        query = select(schema.authorities).order_by(schema.authorities.c.created_at)
        if status:
            query = query.where(schema.authorities.c.status == status)
        return [_ca(row) for row in conn.execute(query)]

    def children_of(self, conn: Connection, ca_id: str) -> list[str]:
        return list(
            conn.execute(
                select(schema.authorities.c.id).where(schema.authorities.c.parent_id == ca_id)
            ).scalars()
        )

    # -- Tags ----------------------------------------------------------------------------

    def set_tags(self, conn: Connection, resource_id: str, new_tags: Mapping[str, str]) -> None:
        if not new_tags:
            return
        conn.execute(
            delete(schema.tags).where(
                and_(
                    schema.tags.c.resource_id == resource_id, schema.tags.c.key.in_(list(new_tags))
                )
            )
        )
        conn.execute(
            insert(schema.tags),
            [{"resource_id": resource_id, "key": k, "value": v} for k, v in new_tags.items()],
        )

    def remove_tags(self, conn: Connection, resource_id: str, keys: Sequence[str]) -> None:
        conn.execute(
            delete(schema.tags).where(
                and_(schema.tags.c.resource_id == resource_id, schema.tags.c.key.in_(list(keys)))
            )
        )

    def tags_of(self, conn: Connection, resource_id: str) -> dict[str, str]:
        rows = conn.execute(
            select(schema.tags.c.key, schema.tags.c.value)
            .where(schema.tags.c.resource_id == resource_id)
            .order_by(schema.tags.c.key)
        )
        return {key: value for key, value in rows}

    # -- Certificates --------------------------------------------------------------------

    def insert_certificate(self, conn: Connection, *, sans: Sequence[str], **values: Any) -> int:
        result = conn.execute(
            insert(schema.certificates).values(
                sans=json.dumps(list(sans)), **_with_crl_entry(values)
            )
        )
        key = result.inserted_primary_key
        assert key is not None
        return int(key[0])

    def get_certificate(
        self, conn: Connection, ca_id: str, serial: str
    ) -> CertificateRecord | None:
        row = conn.execute(
            select(schema.certificates).where(
                and_(schema.certificates.c.ca_id == ca_id, schema.certificates.c.serial == serial)
            )
        ).first()
        return _certificate(row) if row is not None else None

    def get_certificate_by_id(self, conn: Connection, row_id: int) -> CertificateRecord | None:
        row = conn.execute(
            select(schema.certificates).where(schema.certificates.c.id == row_id)
        ).first()
        return _certificate(row) if row is not None else None

    def list_certificates(
        self,
        conn: Connection,
        *,
        ca_id: str | None = None,
        status: str | None = None,
        expiring_before: datetime | None = None,
        not_expired_at: datetime | None = None,
        limit: int | None = None,
        after_id: int = 0,
        text: str | None = None,
        serial: str | None = None,
        template: str | None = None,
        requester: str | None = None,
        team: str | None = None,
        within: CertificateScope | None = None,
    ) -> list[CertificateRecord]:
        """Certificates by id; ``text`` is found in the subject or a SAN, ``requester`` in
        the requester or the connector (both case-insensitive substrings); ``team``: only
        those that team's tokens asked for; ``within``: only those the scope shows (in the
        query, so that a page limit counts only what is shown)."""
        c = schema.certificates.c
        query = select(schema.certificates).where(c.id > after_id).order_by(c.id)
        if team is not None:
            query = query.where(c.team == team)
        if within is not None:
            query = query.where(within.clause())
        if ca_id:
            query = query.where(c.ca_id == ca_id)
        if status:
            query = query.where(c.status == status)
        if text:
            query = query.where(
                or_(
                    c.subject.icontains(text, autoescape=True),
                    c.sans.icontains(text, autoescape=True),
                )
            )
        if serial:
            query = query.where(c.serial == serial)
        if template:
            query = query.where(c.template == template)
        if requester:
            query = query.where(
                or_(
                    c.requester.icontains(requester, autoescape=True),
                    c.connector.icontains(requester, autoescape=True),
                )
            )
        if expiring_before is not None:
            query = query.where(c.not_after <= expiring_before)
        if not_expired_at is not None:
            query = query.where(c.not_after > not_expired_at)
        if limit:
            query = query.limit(limit)
        return [_certificate(row) for row in conn.execute(query)]

    def count_certificates(
        self,
        conn: Connection,
        ca_id: str | None = None,
        *,
        status: str | None = None,
        not_expired_at: datetime | None = None,
        expiring_before: datetime | None = None,
        within: CertificateScope | None = None,
    ) -> int:
        c = schema.certificates.c
        query = select(func.count()).select_from(schema.certificates)
        if within is not None:
            query = query.where(within.clause())
        if ca_id:
            query = query.where(c.ca_id == ca_id)
        if status:
            query = query.where(c.status == status)
        if not_expired_at is not None:
            query = query.where(c.not_after > not_expired_at)
        if expiring_before is not None:
            query = query.where(c.not_after <= expiring_before)
        return int(conn.execute(query).scalar_one())

    def issued_per_day(
        self, conn: Connection, since: datetime, within: CertificateScope | None = None
    ) -> dict[str, int]:
        """Certificates issued on each UTC day (YYYY-MM-DD) since ``since``; days without
        any are absent."""
        c = schema.certificates.c
        stamp: Any = c.issued_at  # SQLite: UTC text; PostgreSQL: in the session's zone
        day = func.date(stamp if self.dialect == "sqlite" else func.timezone("UTC", stamp))
        query = select(day, func.count()).where(c.issued_at >= since)
        if within is not None:
            query = query.where(within.clause())
        rows = conn.execute(query.group_by(day)).all()
        return {str(found): int(count) for found, count in rows}

    def insert_certificates(self, conn: Connection, rows: Sequence[Mapping[str, Any]]) -> list[int]:
        """Insert many certificate rows in one round trip; ids in the order given."""
        if not rows:
            return []
        return self._fast_certificates.execute(conn, [_with_crl_entry(r) for r in rows])

    def ca_states(self, conn: Connection, ca_ids: Sequence[str]) -> dict[str, tuple[str, datetime]]:
        """Status and last change of these CAs, read inside the caller's transaction."""
        states = {}
        for ca_id in ca_ids:
            for status, updated_at in self._fast_ca_state.rows(conn, ca_id):
                states[ca_id] = (str(status), _utc(updated_at))
        return states

    def reserve_crl_partition(self, conn: Connection, ca_id: str, size: int) -> int:
        """The partition (1, 2, ...) for a PARTITIONED CA's next certificate."""
        p = schema.crl_partitions.c
        row = conn.execute(
            select(p.current, p.fill).where(p.ca_id == ca_id).with_for_update()
        ).first()
        if row is None:
            conn.execute(insert(schema.crl_partitions).values(ca_id=ca_id, current=1, fill=1))
            return 1
        current, fill = int(row[0]), int(row[1])
        if fill >= size:
            current, fill = current + 1, 0
        conn.execute(
            update(schema.crl_partitions)
            .where(p.ca_id == ca_id)
            .values(current=current, fill=fill + 1)
        )
        return current

    def current_crl_partition(self, conn: Connection, ca_id: str) -> int | None:
        p = schema.crl_partitions.c
        return conn.execute(select(p.current).where(p.ca_id == ca_id)).scalar_one_or_none()

    def crl_entries(
        self,
        conn: Connection,
        ca_id: str,
        partition: int | None,
        expired_before_kept_after: datetime | None,
    ) -> tuple[int, bytes]:
        """How many certificates of a CA (of one ``partition``, if not None) a CRL lists,
        and their revokedCertificates entries joined (DER, in no particular order).

        Certificates that expired before ``expired_before_kept_after`` (the previous CRL's
        thisUpdate) are left out: they were listed once after expiring.
        """
        query = self._crl_entries[(partition is not None, expired_before_kept_after is not None)]
        values: list[Any] = [ca_id]
        if partition is not None:
            values.append(partition)
        if expired_before_kept_after is not None:
            values.append(expired_before_kept_after)
        ((count, joined),) = query.rows(conn, *values)
        return int(count), bytes(joined or b"")

    def insert_crl(self, conn: Connection, **values: Any) -> None:
        conn.execute(insert(schema.crls).values(**values))

    def latest_crl_number(self, conn: Connection, ca_id: str, partition: int) -> int | None:
        c = schema.crls.c
        return conn.execute(
            select(func.max(c.crl_number)).where(c.ca_id == ca_id, c.crl_partition == partition)
        ).scalar_one_or_none()

    def latest_crl_numbering(
        self, conn: Connection, ca_id: str, partition: int
    ) -> CRLNumbering | None:
        c = schema.crls.c
        row = conn.execute(
            select(c.crl_number, c.this_update, c.next_update)
            .where(c.ca_id == ca_id, c.crl_partition == partition)
            .order_by(c.crl_number.desc())
            .limit(1)
        ).first()
        return CRLNumbering(int(row[0]), _utc(row[1]), _utc(row[2])) if row is not None else None

    def latest_crl(self, conn: Connection, ca_id: str, partition: int) -> CRLRecord | None:
        c = schema.crls.c
        row = conn.execute(
            select(
                c.ca_id,
                c.crl_partition,
                c.crl_number,
                c.this_update,
                c.next_update,
                c.entries,
                c.der,
            )
            .where(c.ca_id == ca_id, c.crl_partition == partition)
            .order_by(c.crl_number.desc())
            .limit(1)
        ).first()
        if row is None:
            return None
        return CRLRecord(
            str(row[0]),
            int(row[1]),
            int(row[2]),
            _utc(row[3]),
            _utc(row[4]),
            int(row[5]),
            bytes(row[6]),
        )

    def delete_ocsp_response(self, conn: Connection, ca_id: str, serial: str) -> None:
        o = schema.ocsp_responses.c
        conn.execute(delete(schema.ocsp_responses).where(o.ca_id == ca_id, o.serial == serial))

    def revoke_certificate(
        self,
        conn: Connection,
        record: CertificateRecord,
        revoked_at: datetime,
        reason: str | None,
    ) -> None:
        """Mark ``record`` revoked, with its CRL entry (what the next CRL lists for it)."""
        self.update_certificate(
            conn,
            record.id,
            status="REVOKED",
            revoked_at=revoked_at,
            revocation_reason=reason,
            crl_entry=crl_der.entry(record.serial, revoked_at, reason),
        )

    def update_certificate(self, conn: Connection, row_id: int, **values: Any) -> None:
        # A CRL lists exactly the rows with an entry: one is written with every revocation,
        # and any other status takes it off the next CRL.
        if values.get("status") == "REVOKED" and "crl_entry" not in values:
            raise ValueError("a revoked certificate needs its CRL entry: use revoke_certificate")
        if values.get("status", "REVOKED") != "REVOKED":
            values["crl_entry"] = None
        conn.execute(
            update(schema.certificates).where(schema.certificates.c.id == row_id).values(**values)
        )

    # -- Idempotency ---------------------------------------------------------------------

    def idempotency_entry(
        self, conn: Connection, scope: str, token: str, newer_than: datetime
    ) -> tuple[str, str] | None:
        # Asked on every issuance that carries a token (every SCEP and ACME one).
        row = _IDEMPOTENCY_ENTRY.first(conn, scope=scope, token=token, newer_than=newer_than)
        return (row.request_hash, row.result_ref) if row is not None else None

    def put_idempotency_entry(
        self,
        conn: Connection,
        scope: str,
        token: str,
        request_hash: str,
        result_ref: str,
        now: datetime,
        older_than: datetime,
    ) -> None:
        t = schema.idempotency.c
        # An expired entry for the same token is simply replaced.
        conn.execute(
            delete(schema.idempotency).where(
                and_(t.scope == scope, t.token == token, t.created_at <= older_than)
            )
        )
        conn.execute(
            insert(schema.idempotency).values(
                scope=scope,
                token=token,
                request_hash=request_hash,
                result_ref=result_ref,
                created_at=now,
            )
        )

    # -- API tokens ----------------------------------------------------------------------

    def insert_api_token(self, conn: Connection, **values: Any) -> None:
        conn.execute(insert(schema.api_tokens).values(**values))

    def get_api_token(self, conn: Connection, token_id: str) -> ApiTokenRecord | None:
        row = _API_TOKEN_BY_ID.first(conn, id=token_id)
        return _api_token(row) if row is not None else None

    def list_api_tokens(self, conn: Connection) -> list[ApiTokenRecord]:
        rows = conn.execute(select(schema.api_tokens).order_by(schema.api_tokens.c.created_at))
        return [_api_token(row) for row in rows]

    def update_api_token(self, conn: Connection, token_id: str, **values: Any) -> bool:
        """Change an active (not revoked) token's columns; False if there is none."""
        t = schema.api_tokens
        result = conn.execute(
            update(t).where(t.c.id == token_id, t.c.revoked_at.is_(None)).values(**values)
        )
        return bool(result.rowcount)

    def touch_api_token(self, conn: Connection, token_id: str, now: datetime) -> None:
        """Record a use, unless another worker recorded a later one meanwhile."""
        t = schema.api_tokens
        conn.execute(
            update(t)
            .where(t.c.id == token_id, or_(t.c.last_used_at.is_(None), t.c.last_used_at < now))
            .values(last_used_at=now)
        )

    def revoke_api_token(self, conn: Connection, token_id: str, now: datetime) -> bool:
        return self.update_api_token(conn, token_id, revoked_at=now)

    # -- Teams and CA policies -------------------------------------------------------------

    def insert_team(self, conn: Connection, name: str, created_at: datetime, by: str) -> None:
        conn.execute(insert(schema.teams).values(name=name, created_at=created_at, created_by=by))

    def get_team(
        self, conn: Connection, name: str, lock: Literal["share", "update"] | None = None
    ) -> TeamRecord | None:
        """The team named ``name``. ``lock``, on PostgreSQL (SQLite has one writer at a
        time): "share" for a write that will name the team (a token, a CA, a policy),
        "update" to delete it. The two wait for each other, so that a team is never deleted
        while something naming it is being written: under READ COMMITTED both would see
        the other's change absent and commit."""
        query = select(schema.teams).where(schema.teams.c.name == name)
        if lock is not None:
            query = query.with_for_update(read=lock == "share")
        row = conn.execute(query).first()
        return None if row is None else TeamRecord(row.name, _utc(row.created_at), row.created_by)

    def list_teams(self, conn: Connection) -> list[TeamRecord]:
        rows = conn.execute(select(schema.teams).order_by(schema.teams.c.name))
        return [TeamRecord(r.name, _utc(r.created_at), r.created_by) for r in rows]

    def delete_team(self, conn: Connection, name: str) -> bool:
        result = conn.execute(delete(schema.teams).where(schema.teams.c.name == name))
        return bool(result.rowcount)

    def team_has_certificates(self, conn: Connection, name: str) -> bool:
        """Whether certificates are recorded as ``name``'s (asked for by its tokens)."""
        c = schema.certificates.c
        return conn.execute(select(c.serial).where(c.team == name).limit(1)).first() is not None

    def insert_ca_policy(self, conn: Connection, **values: Any) -> None:
        conn.execute(insert(schema.ca_policies).values(**values))

    def ca_policies(
        self, conn: Connection, ca_id: str, version: int | None = None
    ) -> list[PolicyRecord]:
        """A CA's policy versions, oldest first (only ``version``, when given)."""
        p = schema.ca_policies.c
        query = select(schema.ca_policies).where(p.ca_id == ca_id).order_by(p.version)
        if version is not None:
            query = query.where(p.version == version)
        return [
            PolicyRecord(**{**row._asdict(), "created_at": _utc(row.created_at)})
            for row in conn.execute(query)
        ]

    # -- Audit ---------------------------------------------------------------------------

    def lock_audit_head(
        self, conn: Connection, genesis_mac: str
    ) -> tuple[int, str, str | None] | None:
        """The chain head (seq, mac, head_mac), locked until the transaction ends; None
        when there was none (it is created, at the genesis MAC, for the first event)."""
        found = self._fast_head.rows(conn)
        row = found[0] if found else None
        if row is None:
            conn.execute(insert(schema.audit_head).values(id=1, seq=0, mac=genesis_mac))
            return None
        return int(row[0]), str(row[1]), None if row[2] is None else str(row[2])

    def audit_head(self, conn: Connection) -> tuple[int, str, str | None] | None:
        """(seq, mac, head_mac) of the chain head, or None before the first event."""
        h = schema.audit_head.c
        row = conn.execute(select(h.seq, h.mac, h.head_mac)).first()
        if row is None:
            return None
        return int(row[0]), str(row[1]), None if row[2] is None else str(row[2])

    def append_audit_events(
        self, conn: Connection, rows: Sequence[Mapping[str, Any]], head_mac: str
    ) -> None:
        """Insert chained events (after lock_audit_head) and move the head to the last,
        with ``head_mac`` signing the new head."""
        self._fast_audit_events.execute(conn, rows)
        self._fast_move_head.rows(conn, rows[-1]["seq"], rows[-1]["mac"], head_mac)

    def audit_action_recorded(self, conn: Connection, action: str, actor: str) -> bool:
        c = schema.audit_events.c
        found = conn.execute(
            select(c.seq).where(c.action == action, c.actor == actor).limit(1)
        ).first()
        return found is not None

    def sign_audit_head(self, conn: Connection, seq: int, mac: str, head_mac: str) -> bool:
        """Sign a head left unsigned (a store from before the head was signed)."""
        h = schema.audit_head.c
        result = conn.execute(
            update(schema.audit_head)
            .where(h.id == 1, h.seq == seq, h.mac == mac, h.head_mac.is_(None))
            .values(head_mac=head_mac)
        )
        return bool(result.rowcount)

    def audit_event(self, conn: Connection, seq: int) -> AuditEventRecord | None:
        c = schema.audit_events.c
        row = conn.execute(select(schema.audit_events).where(c.seq == seq)).first()
        if row is None:
            return None
        values = dict(row._mapping)
        values["at"] = _utc(values["at"])
        return AuditEventRecord(**values)

    def find_audit_events(
        self,
        conn: Connection,
        *,
        actor: str | None = None,
        action: str | None = None,
        resource: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        request_id: str | None = None,
        before_seq: int | None = None,
        limit: int = 100,
        within: AuditScope | None = None,
    ) -> list[AuditEventRecord]:
        """Events newest first: ``actor`` and ``resource`` are case-insensitive substrings,
        ``action`` an exact action or a prefix ending in "." (``certificate.``), the time
        range [since, until); ``within``: only those of that scope."""
        c = schema.audit_events.c
        query = select(schema.audit_events).order_by(c.seq.desc()).limit(limit)
        if within is not None:
            query = query.where(
                or_(c.resource.in_(sorted(within.resources)), c.actor.in_(sorted(within.actors)))
            )
        if actor:
            query = query.where(c.actor.icontains(actor, autoescape=True))
        if action:
            query = query.where(
                c.action.startswith(action, autoescape=True)
                if action.endswith(".")
                else c.action == action
            )
        if resource:
            query = query.where(c.resource.icontains(resource, autoescape=True))
        if since is not None:
            query = query.where(c.at >= since)
        if until is not None:
            query = query.where(c.at < until)
        if request_id:
            query = query.where(c.request_id == request_id)
        if before_seq is not None:
            query = query.where(c.seq < before_seq)
        found = []
        for row in conn.execute(query):
            values = dict(row._mapping)
            values["at"] = _utc(values["at"])
            found.append(AuditEventRecord(**values))
        return found

    def iter_audit_events(
        self, conn: Connection, batch: int = 5000, after: int = -1
    ) -> Iterator[AuditEventRecord]:
        last = after
        c = schema.audit_events.c
        while True:
            rows = conn.execute(
                select(schema.audit_events).where(c.seq > last).order_by(c.seq).limit(batch)
            ).all()
            for row in rows:
                values = dict(row._mapping)
                values["at"] = _utc(values["at"])
                yield AuditEventRecord(**values)
            if len(rows) < batch:
                return
            last = rows[-1].seq
