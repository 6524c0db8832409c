"""Backups of a SQLite store, and putting one back (`pkigate db backup | restore`).

A backup is one self-contained SQLite file made with SQLite's online backup API: the
database and its write-ahead log copied in one read transaction, so it is a consistent
snapshot while the server keeps issuing (in WAL mode a reader never blocks the writer).
The key-encryption key is not in it (it lives in the data directory's ``kek`` file or
``PKIGATE_KEK``): a backup alone opens no CA key, and the KEK is kept apart from it.

A restore checks the backup before anything is replaced: on a scratch copy (migrated to
this pkigate's schema when it is older) the KEK must open every sealed CA key and the
audit chain must verify. Only then is the data directory's database overwritten, through
the same backup API, under the store's writer lock.

The audit anchor (anchor.py) beside the database is handled so the restored store can be
served, or so the operator is told exactly what to decide:

- no anchor there (a new directory): a new anchor starts from the restored chain's head,
  recorded as an audited ``audit.reanchor`` (or ``audit.anchor_started`` for a store from
  before anchors);
- an anchor that matches the restored chain: kept;
- an anchor ahead of the restored chain (the backup is older than the last writes of this
  directory): kept, and the restore fails with the store's own message: `pkigate audit
  recover` puts back what was issued after the backup (the anchor holds those
  certificates), `pkigate audit reanchor` gives it up. pkigate never decides that alone.

PostgreSQL stores are backed up with pg_dump and put back with pg_restore (README,
"Running in production").
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pkigate.core.anchor import sync_directory
from pkigate.core.audit import Actor, AuditLog
from pkigate.core.errors import (
    BadRequestError,
    ConflictError,
    SchemaOutdatedError,
    StoreIntegrityError,
)
from pkigate.core.keys import KeyEncryptionKey, SoftwareKeyBackend
from pkigate.core.store import Store, sqlite_url
from pkigate.core.store.engine import (
    SCHEMA_HEAD,
    SQLITE_BUSY_TIMEOUT_MS,
    known_revision,
    writer_lock_path,
)
from pkigate.core.store.writelock import WriterLock

_BUSY_TIMEOUT_SECONDS = SQLITE_BUSY_TIMEOUT_MS / 1000


@dataclass(frozen=True)
class BackupSummary:
    """What a backup file holds: its schema revision and the audit chain's head."""

    path: Path
    revision: str
    audit_head: int


@dataclass(frozen=True)
class RestoreResult:
    backup: BackupSummary
    database: Path
    keys_checked: int
    events_verified: int
    anchor: str  # "kept", "started" (a new anchor from the restored head), "later"
    upgrade_needed: bool  # restored at an older schema: `pkigate db upgrade` comes next


def backup_sqlite(database: Path, out: Path) -> BackupSummary:
    """Copy a live SQLite store into ``out`` (a new file, mode 0600: it holds sealed keys
    and the audit log), made durable and checked before it takes its name."""
    if not database.is_file():
        raise BadRequestError(f"there is no store at {database}")
    if out.exists():
        raise BadRequestError(f"{out} exists: name a new file")
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        with (
            closing(sqlite3.connect(database, timeout=_BUSY_TIMEOUT_SECONDS)) as source,
            closing(sqlite3.connect(partial)) as copy,
        ):
            # pages=-1: one step, one read transaction on the source, so the copy is one
            # moment of the store however many writers commit meanwhile.
            source.backup(copy)
            # One file, without a -wal beside it that a copy to tape would miss.
            copy.execute("PRAGMA journal_mode = DELETE")
            summary = _summary(copy, out)
        with open(partial, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(partial, out)
        sync_directory(out.parent)
        return summary
    finally:
        partial.unlink(missing_ok=True)


def restore_sqlite(
    backup: Path, database: Path, data_dir: Path, *, force: bool, actor: Actor, now: datetime
) -> RestoreResult:
    """Replace ``database`` (the data directory's SQLite store) with ``backup``."""
    summary = read_backup(backup)
    if database.exists() and database.stat().st_size > 0 and not force:
        raise ConflictError(
            f"{database} holds a store; stop pkigate and pass --force to replace it "
            "(`pkigate db backup` it first if it may be wanted again)"
        )
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    keys_checked, events = _check_backup(backup, data_dir)
    with WriterLock(writer_lock_path(database)).held():
        _copy(backup, database)
    database.chmod(0o600)
    upgrade_needed = summary.revision != SCHEMA_HEAD
    anchor = "later" if upgrade_needed else _settle_anchor(database, data_dir, actor, now)
    return RestoreResult(summary, database, keys_checked, events, anchor, upgrade_needed)


def read_backup(backup: Path) -> BackupSummary:
    """The backup's summary, or a one-line reason it is not a pkigate backup."""
    if not backup.is_file():
        raise BadRequestError(f"there is no backup file {backup}")
    if Path(f"{backup}-wal").exists():
        # A copy of a live database: its last commits are in that -wal, which a backup
        # file must not need (and which this reader would not see).
        raise BadRequestError(
            f"{backup} has a -wal file beside it: it is a live database, not a backup; "
            "make one with `pkigate db backup`"
        )
    try:
        # immutable: nothing writes a backup file, and no -shm or lock is made beside it.
        with closing(sqlite3.connect(f"file:{backup}?immutable=1", uri=True)) as conn:
            check = [str(row[0]) for row in conn.execute("PRAGMA quick_check(5)")]
            if check != ["ok"]:
                raise StoreIntegrityError(f"the backup {backup} is damaged: {'; '.join(check)}")
            summary = _summary(conn, backup)
    except sqlite3.DatabaseError as exc:
        raise BadRequestError(f"{backup} is not a pkigate backup ({exc})") from None
    if not known_revision(summary.revision):
        raise SchemaOutdatedError(
            f"the backup {backup} is at schema revision {summary.revision}, which this "
            f"pkigate does not know (its newest is {SCHEMA_HEAD}): restore it with the "
            "pkigate that wrote it"
        )
    return summary


def _summary(conn: sqlite3.Connection, path: Path) -> BackupSummary:
    try:
        (revision,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
        head = conn.execute("SELECT seq FROM audit_head WHERE id = 1").fetchone()
    except (sqlite3.OperationalError, TypeError):
        raise BadRequestError(f"{path} is not a pkigate store (no schema revision)") from None
    return BackupSummary(path, str(revision), int(head[0]) if head else 0)


def _check_backup(backup: Path, data_dir: Path) -> tuple[int, int]:
    """On a scratch copy: the KEK opens every sealed key, the audit chain verifies.
    Returns (keys opened, events verified)."""
    with tempfile.TemporaryDirectory(prefix=".restore-", dir=data_dir) as scratch:
        copy = Path(scratch) / "pkigate.db"
        _copy(backup, copy)
        store = Store.open(sqlite_url(copy), upgrade_schema=True)
        try:
            with store.read() as conn:
                sealed = store.live_keys(conn, SoftwareKeyBackend.name)
            # The data directory's KEK (or PKIGATE_KEK): a store with keys and no KEK here
            # is refused with the file to put back; one without keys gets a new KEK.
            kek = KeyEncryptionKey.load_or_create(data_dir, create=not sealed)
            keys = SoftwareKeyBackend(kek)
            for key_id, blob in sealed:
                keys.load(key_id, blob)
            audit = AuditLog(store, kek)
            try:
                result = audit.verify_chain()
            finally:
                audit.close()
        finally:
            store.close()
    if not result.ok:
        first = result.problems[0]
        raise StoreIntegrityError(
            f"the backup {backup} fails its audit verification ({len(result.problems)} "
            f"problems; event {first.seq}: {first.kind}: {first.detail}); nothing was restored"
        )
    return len(sealed), result.events


def _copy(source: Path, destination: Path) -> None:
    """SQLite's backup API from file to file: the destination's own journal (an old WAL
    of a replaced store) is dealt with by SQLite, never left to replay over the copy."""
    with (
        closing(sqlite3.connect(f"file:{source}?immutable=1", uri=True)) as reader,
        closing(sqlite3.connect(destination, timeout=_BUSY_TIMEOUT_SECONDS)) as writer,
    ):
        reader.backup(writer)
        writer.execute("PRAGMA journal_mode = WAL")


def _settle_anchor(database: Path, data_dir: Path, actor: Actor, now: datetime) -> str:
    """Make the restored store servable with respect to its audit anchor (module doc)."""
    from pkigate.core.service import Core

    core = Core.open(data_dir, sqlite_url(database))
    try:
        status = core.audit.anchor_status()
        if status.state == "missing":
            core.audit.reanchor(actor, now)
            return "started"
        if status.state == "unanchored":  # a backup from before anchors: begin one (audited)
            core.audit.settle_anchor()
            return "started"
        if status.message is not None:
            raise StoreIntegrityError(
                f"the backup was restored into {database}, but it cannot be served yet: "
                + status.message
            )
        return "kept"
    finally:
        core.close()
