"""Sealed secrets: generated values every gateway process and host must agree on.

The store keeps them sealed (see :mod:`pkigate.core.secrets`); this module only reads and
writes the opaque blobs. Every function takes the caller's connection.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from pkigate.core.store import schema


def sealed_secret(conn: Connection, name: str) -> bytes | None:
    c = schema.sealed_secrets.c
    value = conn.execute(select(c.sealed).where(c.name == name)).scalar()
    return None if value is None else bytes(value)


def insert_sealed_secret(conn: Connection, name: str, sealed: bytes, now: datetime) -> bool:
    """Keep ``sealed`` under ``name`` unless a value is there already (another process
    created it first: on PostgreSQL this waits for that process's transaction to end).
    True if this one was kept."""
    table = schema.sealed_secrets
    insert: Any = (
        postgresql_insert(table) if conn.dialect.name == "postgresql" else sqlite_insert(table)
    )
    result = conn.execute(
        insert.values(name=name, sealed=sealed, created_at=now).on_conflict_do_nothing(
            index_elements=[table.c.name]
        )
    )
    return bool(result.rowcount == 1)
