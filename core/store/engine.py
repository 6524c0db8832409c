"""Database engine set-up: SQLite (WAL, durable commits) by default, PostgreSQL by URL."""

from __future__ import annotations

import errno
import functools
import sqlite3
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, make_url, text
from sqlalchemy.exc import DBAPIError

from pkigate.core.errors import SchemaOutdatedError, StorageFullError
from pkigate.core.store.space import release_reserve
from pkigate.core.store.writelock import WriterLock

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# The newest revision in migrations/versions (a test holds it to alembic's own view). A
# store already there is opened without importing alembic: ~12 MiB and ~0.15 s less for
# every worker process and CLI command.
SCHEMA_HEAD = "0019"
SQLITE_BUSY_TIMEOUT_MS = 30_000
# The largest position (row id, audit sequence) a store holds, a signed 64-bit integer in
# SQL: a driver cannot even convert a larger one to compare with (OverflowError).
MAX_POSITION = 2**63 - 1
_WRITE = "pkigate_write"
_AFTER_COMMIT = "pkigate_after_commit"
# The WriterLock of each SQLite engine (see writelock.py); PostgreSQL engines have none.
_WRITER_LOCKS: weakref.WeakKeyDictionary[Engine, WriterLock] = weakref.WeakKeyDictionary()


# SQLite's result codes for a full disk: SQLITE_FULL (an ENOSPC while writing the database
# or its WAL), and SQLITE_IOERR_SHMSIZE (the WAL index could not grow).
_SQLITE_FULL_CODES = frozenset({13, 4874})
_POSTGRES_DISK_FULL = "53100"
_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
STORAGE_FULL_MESSAGE = "the CA's storage is full; nothing was changed; try again later"


def storage_full(exc: BaseException) -> StorageFullError | None:
    """The typed error for an exception that means "the disk is full", else None: SQLite's
    and PostgreSQL's own errors (bare or wrapped by SQLAlchemy) and an OSError ENOSPC."""
    if isinstance(exc, StorageFullError):
        return exc
    cause = exc.orig if isinstance(exc, DBAPIError) else exc
    if isinstance(cause, sqlite3.Error):
        full = getattr(cause, "sqlite_errorcode", None) in _SQLITE_FULL_CODES
    elif isinstance(cause, OSError):
        full = cause.errno in _NO_SPACE_ERRNOS
    else:
        full = getattr(cause, "sqlstate", None) == _POSTGRES_DISK_FULL
    return StorageFullError(STORAGE_FULL_MESSAGE) if full else None


@contextmanager
def storage_full_as_error() -> Iterator[None]:
    """Raise :class:`StorageFullError` for whatever inside means "the disk is full"."""
    try:
        yield
    except Exception as exc:
        full = storage_full(exc)
        if full is None or full is exc:
            raise
        raise full from exc


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def printable_url(url: str) -> str:
    """The URL as it may be shown: its password masked."""
    return make_url(url).render_as_string(hide_password=True)


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL (None for PostgreSQL and in-memory SQLite)."""
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    return Path(database)


def writer_lock_path(database: Path) -> Path:
    """The lock file beside a SQLite database that its writers take turns on."""
    return Path(f"{database}-writer.lock")


def create_store_engine(url: str) -> Engine:
    """An engine whose write transactions serialize correctly across processes.

    On SQLite every write transaction starts with ``BEGIN IMMEDIATE``, so two processes
    never both read the audit chain head and then race to extend it; readers use deferred
    transactions and, with WAL, never block the writer. ``synchronous=FULL`` makes a commit
    durable before it returns.
    """
    if url.startswith("sqlite"):
        engine = create_engine(url, pool_size=8, max_overflow=24)
        database = engine.url.database
        on_disk = Path(database) if database and database != ":memory:" else None
        event.listen(engine, "connect", functools.partial(_sqlite_connect, on_disk))
        event.listen(engine, "begin", _sqlite_begin)
        if on_disk is not None:
            _WRITER_LOCKS[engine] = WriterLock(writer_lock_path(on_disk))
        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return create_engine(url, pool_size=8, max_overflow=16, pool_pre_ping=True)


def _sqlite_connect(
    database: Path | None, dbapi_connection: sqlite3.Connection, _record: Any
) -> None:
    # Let SQLAlchemy's begin event, not the driver, decide how transactions start.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    try:
        cursor.execute("PRAGMA journal_mode = WAL")
    except sqlite3.OperationalError as exc:
        # The last connection to close deletes the -wal and -shm files; on a full disk the
        # next one to open cannot make them again, and then nothing can even be read. The
        # storage reserve (space.py) gives up its room for them.
        if database is None or storage_full(exc) is None or not release_reserve(database):
            raise
        cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA synchronous = FULL")
    cursor.execute("PRAGMA foreign_keys = ON")
    # Reads through write(2)/read(2), never a memory map of the database: a page mapped
    # from a file that cannot be allocated (a full tmpfs, a truncated file) is a SIGBUS
    # that kills the process. This is SQLite's default; a build may change it.
    cursor.execute("PRAGMA mmap_size = 0")
    cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    write = connection.get_execution_options().get(_WRITE, False)
    # On the driver connection: this runs for every transaction, and SQLAlchemy's
    # statement execution costs more than the BEGIN itself.
    driver = connection.connection.driver_connection
    assert driver is not None  # a connection in use has its driver connection
    driver.execute("BEGIN IMMEDIATE" if write else "BEGIN")


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that may write; serialized against other writers on SQLite."""
    lock = _WRITER_LOCKS.get(engine)
    with (
        storage_full_as_error(),
        lock.held() if lock is not None else nullcontext(),
        engine.connect() as conn,
    ):
        conn = conn.execution_options(**{_WRITE: True})
        try:
            with conn.begin():
                yield conn
            # Still under the writer lock: what follows a commit happens in commit order.
            for callback in conn.info.pop(_AFTER_COMMIT, ()):
                callback()
        finally:
            conn.info.pop(_AFTER_COMMIT, None)


def after_commit(conn: Connection, callback: Callable[[], None]) -> None:
    """Run ``callback`` once this write transaction has committed, before its writer lock
    is released (not at all if it rolls back). An error it raises reaches the caller."""
    conn.info.setdefault(_AFTER_COMMIT, []).append(callback)


@contextmanager
def read_transaction(engine: Engine) -> Iterator[Connection]:
    # A reader can meet a full disk too: the first connection to a WAL database creates
    # its index (-shm) file.
    with storage_full_as_error(), engine.connect() as conn, conn.begin():
        yield conn


def writer_lock(engine: Engine) -> WriterLock | None:
    """The lock that serializes this SQLite engine's writers across processes (None for
    PostgreSQL)."""
    return _WRITER_LOCKS.get(engine)


def _alembic_config(conn: Connection) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = conn
    return config


def schema_revisions(conn: Connection) -> list[str]:
    """The revisions alembic has recorded in this database (none when it is new)."""
    if not inspect(conn).has_table("alembic_version"):
        return []
    return [str(v) for v in conn.execute(text("SELECT version_num FROM alembic_version")).scalars()]


def read_revisions(url: str) -> list[str]:
    """The schema revisions of the store at ``url`` (none when it is new), without
    creating its tables or migrating it (`pkigate db current`)."""
    engine = create_store_engine(url)
    try:
        with engine.connect() as conn:
            return schema_revisions(conn)
    finally:
        engine.dispose()


def known_revision(revision: str) -> bool:
    """Whether ``revision`` is one of this pkigate's migrations (not one from a newer
    release)."""
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    try:
        return ScriptDirectory(str(MIGRATIONS_DIR)).get_revision(revision) is not None
    except CommandError:
        return False


def schema_problem(revisions: list[str], where: str) -> str | None:
    """Why a store at ``revisions`` cannot be used without an explicit migration (None for
    a new, empty store or one at the newest revision). ``where`` names the store."""
    if not revisions or revisions == [SCHEMA_HEAD]:
        return None
    found = ", ".join(revisions)
    if all(known_revision(r) for r in revisions):
        return (
            f"the store {where} is at schema revision {found} and this pkigate needs "
            f"{SCHEMA_HEAD}: back it up (`pkigate db backup`), then run `pkigate db upgrade` "
            "(or start with `pkigate serve --migrate`)"
        )
    return (
        f"the store {where} is at schema revision {found}, which this pkigate does not know "
        f"(its newest is {SCHEMA_HEAD}): it was written by a newer pkigate; run that version"
    )


def migrate(engine: Engine, *, upgrade: bool = False) -> None:
    """Create a new, empty store at the newest revision; bring an older one there only
    with ``upgrade`` (`pkigate db upgrade`, `serve --migrate`): otherwise raise
    SchemaOutdatedError with the command to run, so that no command changes the schema
    behind the operator's back (it wants a backup first, and every host's pkigate
    upgraded). A schema newer than this pkigate's is never touched."""
    with engine.connect() as conn:
        revisions = schema_revisions(conn)
    problem = schema_problem(revisions, engine.url.render_as_string(hide_password=True))
    if problem is not None and not (upgrade and all(known_revision(r) for r in revisions)):
        raise SchemaOutdatedError(problem)
    if revisions == [SCHEMA_HEAD]:
        return
    from alembic import command

    with write_transaction(engine) as conn:
        if engine.dialect.name == "postgresql":
            # Two processes starting at once: one migrates, the other waits and finds it done.
            conn.execute(text("SELECT pg_advisory_xact_lock(7268351)"))
        command.upgrade(_alembic_config(conn), "head")
