"""The web console's SQL: its sign-in sessions (gateways/console.py says how they are used).

Every function takes the caller's connection, so the caller decides what commits together.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, delete, insert, or_, select, update

from pkigate.core.store import as_utc, schema


@dataclass(frozen=True)
class SessionRecord:
    id_sha256: str
    token_id: str
    created_at: datetime
    last_seen_at: datetime


def insert_session(conn: Connection, id_sha256: str, token_id: str, now: datetime) -> None:
    conn.execute(
        insert(schema.console_sessions).values(
            id_sha256=id_sha256, token_id=token_id, created_at=now, last_seen_at=now
        )
    )


def get_session(conn: Connection, id_sha256: str) -> SessionRecord | None:
    c = schema.console_sessions.c
    row = conn.execute(select(schema.console_sessions).where(c.id_sha256 == id_sha256)).first()
    if row is None:
        return None
    values = dict(row._mapping)
    for name in ("created_at", "last_seen_at"):
        values[name] = as_utc(values[name])
    return SessionRecord(**values)


def touch_session(conn: Connection, id_sha256: str, now: datetime) -> None:
    c = schema.console_sessions.c
    conn.execute(
        update(schema.console_sessions).where(c.id_sha256 == id_sha256).values(last_seen_at=now)
    )


def delete_session(conn: Connection, id_sha256: str) -> bool:
    c = schema.console_sessions.c
    return bool(
        conn.execute(delete(schema.console_sessions).where(c.id_sha256 == id_sha256)).rowcount
    )


def delete_stale_sessions(conn: Connection, idle_before: datetime, created_before: datetime) -> int:
    """Forget sessions past either timeout (they are refused anyway; this keeps the table
    small)."""
    c = schema.console_sessions.c
    result = conn.execute(
        delete(schema.console_sessions).where(
            or_(c.last_seen_at < idle_before, c.created_at < created_before)
        )
    )
    return int(result.rowcount)
