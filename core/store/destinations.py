"""The SQL behind notification destinations created through the API
(:mod:`pkigate.gateways.destinations` holds the rules). Every function takes the caller's
connection; secrets arrive and leave sealed."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, insert, select, update

from pkigate.core.store import _utc, schema

_table = schema.notification_destinations


@dataclass(frozen=True)
class DestinationRow:
    name: str
    type: str
    settings: Mapping[str, Any]
    filters: Mapping[str, Any]
    sealed_secret: bytes | None
    version: int
    created_at: datetime
    created_by: str
    updated_at: datetime
    updated_by: str


def _row(row: Any) -> DestinationRow:
    return DestinationRow(
        row.name,
        row.type,
        json.loads(row.settings),
        json.loads(row.filters),
        None if row.sealed_secret is None else bytes(row.sealed_secret),
        row.version,
        _utc(row.created_at),
        row.created_by,
        _utc(row.updated_at),
        row.updated_by,
    )


def _json(value: Mapping[str, Any]) -> str:
    return json.dumps(dict(value), sort_keys=True, separators=(",", ":"))


def versions(conn: Connection) -> dict[str, tuple[int, datetime]]:
    """Each destination's (version, updated_at): what a worker compares to its copy (a
    name deleted and made again starts at version 1, with a later updated_at)."""
    c = _table.c
    return {
        row.name: (row.version, _utc(row.updated_at))
        for row in conn.execute(select(c.name, c.version, c.updated_at))
    }


def any_exist(conn: Connection) -> bool:
    """Whether any destination is stored (what an idle worker looks at, cheaply)."""
    return conn.execute(select(_table.c.name).limit(1)).first() is not None


def get(conn: Connection, name: str) -> DestinationRow | None:
    row = conn.execute(select(_table).where(_table.c.name == name)).first()
    return None if row is None else _row(row)


def list_all(conn: Connection) -> list[DestinationRow]:
    return [_row(row) for row in conn.execute(select(_table).order_by(_table.c.name))]


def _state(
    settings: Mapping[str, Any],
    filters: Mapping[str, Any],
    sealed_secret: bytes | None,
    at: datetime,
    by: str,
) -> dict[str, Any]:
    """The columns a creation and an update both write."""
    return {
        "settings": _json(settings),
        "filters": _json(filters),
        "sealed_secret": sealed_secret,
        "updated_at": at,
        "updated_by": by,
    }


def insert_row(
    conn: Connection,
    *,
    name: str,
    kind: str,
    settings: Mapping[str, Any],
    filters: Mapping[str, Any],
    sealed_secret: bytes | None,
    at: datetime,
    by: str,
) -> None:
    state = _state(settings, filters, sealed_secret, at, by)
    conn.execute(
        insert(_table).values(
            name=name, type=kind, version=1, created_at=at, created_by=by, **state
        )
    )


def update_row(
    conn: Connection,
    name: str,
    *,
    version: int,
    settings: Mapping[str, Any],
    filters: Mapping[str, Any],
    sealed_secret: bytes | None,
    at: datetime,
    by: str,
) -> bool:
    """Write the new state if the row is still at ``version`` (no lost update between
    two administrators); True if it was."""
    state = _state(settings, filters, sealed_secret, at, by)
    result = conn.execute(
        update(_table)
        .where(_table.c.name == name, _table.c.version == version)
        .values(version=version + 1, **state)
    )
    return bool(result.rowcount == 1)


def delete_row(conn: Connection, name: str) -> bool:
    return bool(conn.execute(delete(_table).where(_table.c.name == name)).rowcount == 1)
