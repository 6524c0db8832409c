"""Replay nonces (RFC 8555 6.5) that cost no durable write per request.

A nonce is ``generation || expiry || random || HMAC``: handing one out costs nothing but
the HMAC, and any process holding the same key-encryption key can tell a nonce it (or a
sibling) made from a forged one. Single use is enforced by a *nonce book* shared by every
process that may receive the nonce: spending inserts it into a set whose primary key turns
a replay into a conflict. The book is deliberately not durable (no fsync, no WAL):

* SQLite store (one host): a SQLite file beside the store, ``synchronous=OFF``, named
  for the running kernel's boot (``/proc/sys/kernel/random/boot_id``). What
  ``synchronous=OFF`` can lose is what the OS had not yet written, so it is lost only when
  the OS itself stops (power, kernel crash); a process crash loses nothing, since the
  kernel still holds the pages. The next boot has another boot id, so another, empty file.
* PostgreSQL (several hosts): UNLOGGED tables, whose writes skip the WAL (the commit that
  spends a nonce is not flushed). PostgreSQL empties every unlogged table as a whole
  when it recovers from a crash, and a promoted replica has them empty.

Why losing the book is safe: a nonce is accepted only when its *generation* is the book's
live generation, and that record lives in the book itself, so it is lost together with
the spends it guards (as a whole: a new SQLite file, an emptied set of tables; never a
part). Generations come from a counter in the durable store, bumped with a normal durable
commit, so one is never handed out twice. After a loss the book has no live generation;
the first process to notice bumps the counter and installs the new one, and every nonce of
an earlier generation, spent or not, is refused as ``badNonce`` (the client retries with
the fresh Replay-Nonce of that answer, as RFC 8555 6.5 expects). A nonce spent before the
loss therefore can never be accepted again.

A start of ``pkigate serve`` installs a new generation too (:meth:`Nonces.start`): the
durable write happens once per start, not per request, and nonces handed out before a
restart are refused after it. Worker processes adopt the live generation; a process that
minted with an older one (another host restarted) learns the new one when a spend says its
generation is stale, or at most :data:`GENERATION_RECHECK` later. Nonces are
redeemable in any process of any host sharing the book: no routing by prefix is needed.
The spent set holds only the live generation's unexpired nonces (maintenance drops the
rest), which bounds it by the request rate times :data:`NONCE_LIFETIME`.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import logging
import os
import sqlite3
import struct
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from sqlalchemy import text

from pkigate.core.errors import StorageFullError
from pkigate.core.keys import KeyEncryptionKey
from pkigate.core.store import Store
from pkigate.core.store import acme as acme_store
from pkigate.core.store.engine import storage_full_as_error
from pkigate.core.store.writelock import WriterLock

log = logging.getLogger("pkigate.acme")
NONCE_LIFETIME = timedelta(minutes=30)
GENERATION_RECHECK = 2.0  # seconds a process trusts its idea of the live generation
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
NONCE_BOOK_PREFIX = "acme-nonces-"
_LEGACY_SPENT_NONCES = "acme-spent-nonces.sqlite3"  # before 0012: durable, one fsync a spend
_MAC_BYTES = 16
_RANDOM_BYTES = 16
_HEAD = struct.Struct(">QQ")  # generation, expiry (Unix seconds)
_NONCE_BYTES = _HEAD.size + _RANDOM_BYTES + _MAC_BYTES
_NONCE_CHARS = (_NONCE_BYTES * 4 + 2) // 3  # base64url without padding


@dataclass(frozen=True)
class NonceTicket:
    """A genuine, unexpired nonce, not yet spent."""

    nonce: str
    generation: int
    expires_at: datetime


class NonceMinter:
    def __init__(self, kek: KeyEncryptionKey, lifetime: timedelta = NONCE_LIFETIME) -> None:
        self._key = kek.derive(b"pkigate acme nonce v2")
        self.lifetime = lifetime

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()[:_MAC_BYTES]

    def mint(self, now: datetime, generation: int) -> str:
        expires = int((now + self.lifetime).timestamp())
        body = _HEAD.pack(generation, expires) + os.urandom(_RANDOM_BYTES)
        return _encode(body + self._mac(body))

    def open(self, nonce: str, now: datetime) -> NonceTicket | None:
        """The ticket of a genuine, unexpired nonce; None for anything else."""
        if len(nonce) != _NONCE_CHARS:
            return None
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except (binascii.Error, ValueError):
            return None
        # Two spellings of one nonce (the unused low bits of the last character) would be
        # two keys in the spent set: only the canonical one is accepted.
        if len(raw) != _NONCE_BYTES or _encode(raw) != nonce:
            return None
        body, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(body)):
            return None
        generation, expiry = _HEAD.unpack(body[: _HEAD.size])
        expires = datetime.fromtimestamp(expiry, UTC)
        return NonceTicket(nonce, generation, expires) if expires > now else None


def _encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class Spend(enum.Enum):
    SPENT = "spent"
    REPLAYED = "replayed"  # spent before
    STALE = "stale"  # not of the live generation (a restart or a lost book since)


class NonceBook(Protocol):
    """The shared, non-durable record of the live generation and of spent nonces."""

    def live_generation(self) -> int | None: ...

    def install(self, generation: int, *, replace: bool) -> int:
        """Make ``generation`` live (only where none is, unless ``replace``); the live one."""
        ...

    def spend(self, ticket: NonceTicket) -> Spend: ...

    def purge(self, now: datetime) -> int:
        """Forget expired nonces and every nonce of another generation."""
        ...


def nonce_book(store: Store, data_dir: Path) -> NonceBook:
    if store.engine.dialect.name == "sqlite":
        return LocalNonceBook(data_dir)
    return UnloggedNonceBook(store)


class Nonces:
    """Minting and spending nonces for one process (see the module's docstring)."""

    def __init__(self, kek: KeyEncryptionKey, store: Store, book: NonceBook) -> None:
        self.minter = NonceMinter(kek)
        self.book = book
        self._store = store
        self._lock = threading.Lock()
        self._generation: int | None = None
        self._checked = 0.0

    def start(self) -> int:
        """A new live generation: once per start of the service, never per request."""
        with self._lock:
            generation = self.book.install(self._next_generation(), replace=True)
            self._generation, self._checked = generation, time.monotonic()
        return generation

    def generation(self) -> int:
        """The live generation, re-read from the book at most every GENERATION_RECHECK."""
        now = time.monotonic()
        generation = self._generation
        if generation is not None and now - self._checked < GENERATION_RECHECK:
            return generation
        with self._lock:
            live = self.book.live_generation()
            if live is None:  # a new book (first use, a reboot, a PostgreSQL crash)
                live = self.book.install(self._next_generation(), replace=False)
            self._generation, self._checked = live, time.monotonic()
        return live

    def mint(self, now: datetime) -> str:
        return self.minter.mint(now, self.generation())

    def open(self, nonce: str, now: datetime) -> NonceTicket | None:
        return self.minter.open(nonce, now)

    def spend(self, ticket: NonceTicket) -> Spend:
        result = self.book.spend(ticket)
        if result is Spend.STALE:
            self._checked = 0.0  # the next nonce minted here is of the live generation
        return result

    def purge(self, now: datetime) -> int:
        return self.book.purge(now)

    def _next_generation(self) -> int:
        with self._store.write() as conn:
            return acme_store.next_nonce_generation(conn)


def boot_id() -> str:
    """The running kernel's boot (changes at every boot); a constant where there is none,
    which leaves a reboot to the generation installed at each start."""
    try:
        return BOOT_ID.read_text().strip().replace("-", "")[:32] or "unknown"
    except OSError:
        return "unknown"


class LocalNonceBook:
    """The book in a SQLite file of this boot beside a SQLite store, shared by every process
    of the host; one connection per thread and process (gunicorn forks after loading)."""

    _SCHEMA = (
        "CREATE TABLE IF NOT EXISTS live_generation (id INTEGER PRIMARY KEY CHECK (id = 1),"
        " generation INTEGER NOT NULL)",
        "CREATE TABLE IF NOT EXISTS spent_nonces (nonce TEXT PRIMARY KEY,"
        " generation INTEGER NOT NULL, expires_at INTEGER NOT NULL) WITHOUT ROWID",
    )

    def __init__(self, data_dir: Path, boot: str | None = None) -> None:
        boot = boot or boot_id()
        self.path = data_dir / f"{NONCE_BOOK_PREFIX}{boot}.sqlite3"
        self._local = threading.local()
        self._writer = WriterLock(data_dir / f"{NONCE_BOOK_PREFIX}writer.lock")
        for stale in data_dir.glob(f"{NONCE_BOOK_PREFIX}*.sqlite3*"):
            if not stale.name.startswith(self.path.name):
                stale.unlink(missing_ok=True)  # an earlier boot's: nothing in it counts
        for legacy in data_dir.glob(f"{_LEGACY_SPENT_NONCES}*"):
            legacy.unlink(missing_ok=True)  # spent nonces of the old format, refused anyway
        self._schema_ready = False
        try:
            self._create_schema()
        except StorageFullError as exc:
            # A process starting on a full disk (the file's -wal and -shm cannot be made):
            # it starts all the same, and ACME requests are refused until there is room.
            log.warning("ACME nonce book not opened yet: %s", exc.message)

    def _create_schema(self) -> None:
        # Without the writer lock (a spend that finds no schema yet holds it already):
        # the statements are idempotent and SQLite serializes them across processes.
        conn = self._open()
        try:
            with storage_full_as_error():
                for statement in self._SCHEMA:
                    conn.execute(statement)
        finally:
            conn.close()
        self._schema_ready = True

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        try:
            with storage_full_as_error():
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=OFF")  # see the module's docstring
            # As the store's (engine.py): no memory map, no SIGBUS on a full disk.
            conn.execute("PRAGMA mmap_size=0")
        except BaseException:
            conn.close()
            raise
        return conn

    def _conn(self) -> sqlite3.Connection:
        held: tuple[int, sqlite3.Connection] | None = getattr(self._local, "held", None)
        if held is not None and held[0] == os.getpid():
            return held[1]
        if not self._schema_ready:
            self._create_schema()
        conn = self._open()
        self._local.held = (os.getpid(), conn)
        return conn

    def live_generation(self) -> int | None:
        row = self._conn().execute("SELECT generation FROM live_generation").fetchone()
        return int(row[0]) if row else None

    def install(self, generation: int, *, replace: bool) -> int:
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        with storage_full_as_error(), self._writer.held():
            conn = self._conn()
            conn.execute(
                f"{verb} INTO live_generation (id, generation) VALUES (1, ?)", (generation,)
            )
            row = conn.execute("SELECT generation FROM live_generation").fetchone()
        return int(row[0])

    def spend(self, ticket: NonceTicket) -> Spend:
        with storage_full_as_error(), self._writer.held():
            conn = self._conn()
            inserted = conn.execute(
                "INSERT OR IGNORE INTO spent_nonces (nonce, generation, expires_at)"
                " SELECT ?, ?, ? WHERE EXISTS"
                " (SELECT 1 FROM live_generation WHERE generation = ?)",
                (
                    ticket.nonce,
                    ticket.generation,
                    int(ticket.expires_at.timestamp()),
                    ticket.generation,
                ),
            ).rowcount
            if inserted:
                return Spend.SPENT
            live = conn.execute("SELECT generation FROM live_generation").fetchone()
        return Spend.REPLAYED if live and live[0] == ticket.generation else Spend.STALE

    def purge(self, now: datetime) -> int:
        with storage_full_as_error(), self._writer.held():
            cursor = self._conn().execute(
                "DELETE FROM spent_nonces WHERE expires_at < ? OR generation <>"
                " (SELECT generation FROM live_generation)",
                (int(now.timestamp()),),
            )
        return cursor.rowcount


class UnloggedNonceBook:
    """The book in the store's UNLOGGED tables ``acme_nonce_epoch`` and
    ``acme_spent_nonces`` (PostgreSQL), shared by every process of every host."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def live_generation(self) -> int | None:
        with self._store.read() as conn:
            return acme_store.live_nonce_generation(conn)

    def install(self, generation: int, *, replace: bool) -> int:
        with self._store.write() as conn:
            return acme_store.install_nonce_generation(conn, generation, replace=replace)

    def spend(self, ticket: NonceTicket) -> Spend:
        with self._store.write() as conn:
            # Only unlogged tables are written: nothing for the commit to flush; said
            # outright so that a logged table added here later cannot make it wait.
            conn.execute(text("SET LOCAL synchronous_commit = off"))
            if acme_store.spend_nonce(conn, ticket.nonce, ticket.generation, ticket.expires_at):
                return Spend.SPENT
            live = acme_store.live_nonce_generation(conn)
        return Spend.REPLAYED if live == ticket.generation else Spend.STALE

    def purge(self, now: datetime) -> int:
        with self._store.write() as conn:
            return acme_store.purge_spent_nonces(conn, now)
