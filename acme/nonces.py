"""Replay nonces (RFC 8555 6.5) that any gateway process can check.

A nonce is ``expiry || random || HMAC``: handing one out costs no store write, and any
process holding the same key-encryption key can tell a nonce it (or a sibling) made from
a forged one. Single use is enforced by :class:`SpentNonces`: spending a nonce inserts it
into a table whose primary key turns a replay into a conflict in every process.

Every ACME request spends a nonce, reads (POST-as-GET) included, so where spent nonces
live decides whether a read costs a write. On PostgreSQL they are a table of the store,
spent in a short transaction of their own (PostgreSQL takes concurrent writers). With the
SQLite store they live in a SQLite file of their own beside it (:data:`SPENT_NONCES_FILE`):
a spend then never waits for the store's single write lock, which is held across the
commits of issuance, and a request that only reads takes no write transaction in the
store at all. The file is as durable as the store (WAL, ``synchronous=FULL``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import sqlite3
import struct
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

from pkigate.core.keys import KeyEncryptionKey
from pkigate.core.store import Store
from pkigate.core.store import acme as acme_store
from pkigate.core.store.writelock import WriterLock

NONCE_LIFETIME = timedelta(minutes=30)
SPENT_NONCES_FILE = "acme-spent-nonces.sqlite3"
_MAC_BYTES = 16
_RANDOM_BYTES = 16
_STAMP = struct.Struct(">Q")
_NONCE_BYTES = _STAMP.size + _RANDOM_BYTES + _MAC_BYTES
_NONCE_CHARS = (_NONCE_BYTES * 4 + 2) // 3  # base64url without padding


class NonceMinter:
    def __init__(self, kek: KeyEncryptionKey, lifetime: timedelta = NONCE_LIFETIME) -> None:
        self._key = kek.derive(b"pkigate acme nonce v1")
        self.lifetime = lifetime

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()[:_MAC_BYTES]

    def mint(self, now: datetime) -> str:
        expires = int((now + self.lifetime).timestamp())
        body = _STAMP.pack(expires) + os.urandom(_RANDOM_BYTES)
        return _encode(body + self._mac(body))

    def expiry(self, nonce: str, now: datetime) -> datetime | None:
        """When a genuine, unexpired nonce expires; None for anything else."""
        if len(nonce) != _NONCE_CHARS:
            return None
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except (binascii.Error, ValueError):
            return None
        # Two spellings of one nonce (the unused low bits of the last character) would be
        # two keys in the spent-nonce table: only the canonical one is accepted.
        if len(raw) != _NONCE_BYTES or _encode(raw) != nonce:
            return None
        body, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(body)):
            return None
        expires = datetime.fromtimestamp(_STAMP.unpack(body[: _STAMP.size])[0], UTC)
        return expires if expires > now else None


def _encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class SpentNonces(Protocol):
    def spend(self, nonce: str, expires_at: datetime) -> bool:
        """Record ``nonce`` as used, durably; False when it was used before (a replay)."""
        ...

    def purge(self, now: datetime) -> int:
        """Forget nonces expired before ``now`` (they are refused as expired anyway)."""
        ...


def spent_nonces(store: Store, data_dir: Path) -> SpentNonces:
    """The spent-nonce table that fits the store (see the module's docstring)."""
    if store.engine.dialect.name == "sqlite":
        return LocalSpentNonces(data_dir / SPENT_NONCES_FILE)
    return StoreSpentNonces(store)


class StoreSpentNonces:
    """Spent nonces in the store's ``acme_spent_nonces``, one short transaction each."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def spend(self, nonce: str, expires_at: datetime) -> bool:
        with self._store.write() as conn:
            return acme_store.spend_nonce(conn, nonce, expires_at)

    def purge(self, now: datetime) -> int:
        with self._store.write() as conn:
            return acme_store.purge_spent_nonces(conn, now)


class LocalSpentNonces:
    """Spent nonces in a SQLite file of their own, shared by every process of the host.

    One connection per thread and process (a SQLite connection must not cross a fork, and
    gunicorn forks its workers after the application is loaded); each spend is a single
    autocommitted INSERT."""

    _SCHEMA = (
        "CREATE TABLE IF NOT EXISTS spent_nonces ("
        " nonce TEXT PRIMARY KEY, expires_at INTEGER NOT NULL) WITHOUT ROWID"
    )

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._writer = WriterLock(path.with_name(path.name + "-writer.lock"))
        conn = self._open()
        try:
            conn.execute(self._SCHEMA)
            conn.execute(
                "CREATE INDEX IF NOT EXISTS spent_nonces_expiry ON spent_nonces (expires_at)"
            )
        finally:
            conn.close()

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def _conn(self) -> sqlite3.Connection:
        held: tuple[int, sqlite3.Connection] | None = getattr(self._local, "held", None)
        if held is not None and held[0] == os.getpid():
            return held[1]
        conn = self._open()
        self._local.held = (os.getpid(), conn)
        return conn

    def spend(self, nonce: str, expires_at: datetime) -> bool:
        try:
            with self._writer.held():
                self._conn().execute(
                    "INSERT INTO spent_nonces (nonce, expires_at) VALUES (?, ?)",
                    (nonce, int(expires_at.timestamp())),
                )
        except sqlite3.IntegrityError:
            return False
        return True

    def purge(self, now: datetime) -> int:
        with self._writer.held():
            cursor = self._conn().execute(
                "DELETE FROM spent_nonces WHERE expires_at < ?", (int(now.timestamp()),)
            )
        return cursor.rowcount
