"""The SQL behind the events outbox (:mod:`pkigate.core.events` holds the model).

Every function takes the caller's connection: an event is written in the transaction of
the change it reports, and a delivery's state with the job that settles it.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, exists, func, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite

from pkigate.core.store import CertificateRecord, _certificate, _utc, schema
from pkigate.core.store.fastpath import FastInsert

_events = schema.events
_deliveries = schema.event_deliveries
_cursors = schema.event_cursors
# Expiring certificates are read and their events written this many at a time: no
# transaction of the expiry scan grows with the store.
EXPIRY_SCAN_BATCH = 1000


@dataclass(frozen=True)
class EventRow:
    id: int
    event_id: str
    type: str
    occurred_at: datetime
    ca_id: str | None
    serial: str | None
    template: str | None
    data: Mapping[str, Any]


@dataclass(frozen=True)
class DeliveryRow:
    id: int
    event_id: str
    destination: str
    status: str
    attempts: int
    last_error: str | None
    updated_at: datetime


def _event(row: Any) -> EventRow:
    data = json.loads(row.data)
    return EventRow(
        row.id,
        row.event_id,
        row.type,
        _utc(row.occurred_at),
        row.ca_id,
        row.serial,
        row.template,
        data,
    )


def _delivery(row: Any) -> DeliveryRow:
    when = _utc(row.updated_at)
    return DeliveryRow(
        row.id, row.event_id, row.destination, row.status, row.attempts, row.last_error, when
    )


def _dialect_insert(conn: Connection, table: Any) -> Any:
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)


def insert_events(conn: Connection, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert events in one round trip (issuance writes one per certificate, batched), on
    the driver's cursor: every issuance does it."""
    if rows:
        dialect = conn.dialect
        fast = _INSERT_EVENTS.get(dialect.name)
        if fast is None:
            fast = _INSERT_EVENTS[dialect.name] = FastInsert(
                _events, dialect, generated="id", returns_ids=False
            )
        fast.execute(conn, rows)


_INSERT_EVENTS: dict[str, FastInsert] = {}


def insert_event_once(conn: Connection, row: Mapping[str, Any]) -> bool:
    """Insert an event unless one with its ``once_key`` exists; True if this one was."""
    statement = (
        _dialect_insert(conn, _events)
        .values(**row)
        .on_conflict_do_nothing(index_elements=[_events.c.once_key])
    )
    return bool(conn.execute(statement).rowcount == 1)


def existing_once_keys(conn: Connection, keys: Collection[str]) -> set[str]:
    found: set[str] = set()
    ordered = sorted(keys)
    for start in range(0, len(ordered), 500):
        chunk = ordered[start : start + 500]
        found.update(
            conn.execute(select(_events.c.once_key).where(_events.c.once_key.in_(chunk))).scalars()
        )
    return found


def unrevoked_expiring(
    conn: Connection,
    ca_id: str,
    window: tuple[datetime, datetime],
    *,
    once_prefix: str,
    once_suffix: str,
    template: str | None = None,
    other_than: Collection[str] = (),
    after_id: int = 0,
) -> list[CertificateRecord]:
    """ISSUED certificates of ``ca_id`` whose notAfter is in ``window`` (after, until],
    of ``template`` (or of none of ``other_than``), with no event keyed
    ``once_prefix + serial + once_suffix`` yet: at most EXPIRY_SCAN_BATCH, by row id
    after ``after_id``, so the events written already never hide the ones still due."""
    c = schema.certificates.c
    once_key = literal(once_prefix) + c.serial + literal(once_suffix)
    query = select(schema.certificates).where(
        c.ca_id == ca_id,
        c.status == "ISSUED",
        c.not_after > window[0],
        c.not_after <= window[1],
        c.id > after_id,
        ~exists().where(_events.c.once_key == once_key),
    )
    if template is not None:
        query = query.where(c.template == template)
    if other_than:
        query = query.where(c.template.not_in(sorted(other_than)))
    rows = conn.execute(query.order_by(c.id).limit(EXPIRY_SCAN_BATCH))
    return [_certificate(row) for row in rows]


def list_events(
    conn: Connection,
    *,
    after_id: int = 0,
    until_id: int | None = None,
    types: Collection[str] = (),
    ca_id: str | None = None,
    ca_ids: Collection[str] | None = None,
    limit: int = 100,
) -> list[EventRow]:
    """``ca_ids``: only events about these CAs (None: any, or none)."""
    query = select(_events).where(_events.c.id > after_id)
    if until_id is not None:
        query = query.where(_events.c.id <= until_id)
    if types:
        query = query.where(_events.c.type.in_(sorted(types)))
    if ca_id is not None:
        query = query.where(_events.c.ca_id == ca_id)
    if ca_ids is not None:
        query = query.where(_events.c.ca_id.in_(sorted(ca_ids)))
    return [_event(row) for row in conn.execute(query.order_by(_events.c.id).limit(limit))]


def get_event(conn: Connection, event_id: str) -> EventRow | None:
    row = conn.execute(select(_events).where(_events.c.event_id == event_id)).first()
    return None if row is None else _event(row)


def deliveries_of(conn: Connection, event_ids: Collection[str]) -> list[DeliveryRow]:
    if not event_ids:
        return []
    query = select(_deliveries).where(_deliveries.c.event_id.in_(sorted(event_ids)))
    return [_delivery(row) for row in conn.execute(query.order_by(_deliveries.c.id))]


def cursor(conn: Connection, destination: str) -> int:
    value = conn.execute(
        select(_cursors.c.last_id).where(_cursors.c.destination == destination)
    ).scalar()
    return int(value or 0)


def move_cursor(conn: Connection, destination: str, last_id: int) -> None:
    statement = _dialect_insert(conn, _cursors).values(destination=destination, last_id=last_id)
    conn.execute(
        statement.on_conflict_do_update(
            index_elements=[_cursors.c.destination], set_={"last_id": last_id}
        )
    )


def last_event_position(conn: Connection) -> int:
    return int(conn.execute(select(func.max(_events.c.id))).scalar() or 0)


def forget_destination(conn: Connection, destination: str, now: datetime) -> None:
    """A deleted destination: its cursor goes (a new one of that name starts at the
    head) and its pending deliveries are cancelled (never sent, never counted as dead)."""
    conn.execute(delete(_cursors).where(_cursors.c.destination == destination))
    conn.execute(
        update(_deliveries)
        .where(_deliveries.c.destination == destination, _deliveries.c.status == "pending")
        .values(status="cancelled", last_error="the destination was deleted", updated_at=now)
    )


def insert_delivery(conn: Connection, event_id: str, destination: str, now: datetime) -> int | None:
    """A pending delivery of the event to the destination; None if there is one already."""
    statement = (
        _dialect_insert(conn, _deliveries)
        .values(
            event_id=event_id, destination=destination, status="pending", attempts=0, updated_at=now
        )
        .on_conflict_do_nothing(index_elements=[_deliveries.c.event_id, _deliveries.c.destination])
        .returning(_deliveries.c.id)
    )
    value = conn.execute(statement).scalar_one_or_none()
    return None if value is None else int(value)


def get_delivery(conn: Connection, delivery_id: int) -> DeliveryRow | None:
    row = conn.execute(select(_deliveries).where(_deliveries.c.id == delivery_id)).first()
    return None if row is None else _delivery(row)


def settle_delivery(
    conn: Connection,
    delivery_id: int,
    *,
    status: str,
    attempts: int,
    last_error: str | None,
    now: datetime,
) -> None:
    conn.execute(
        update(_deliveries)
        .where(_deliveries.c.id == delivery_id)
        .values(status=status, attempts=attempts, last_error=last_error, updated_at=now)
    )


def count_deliveries(
    conn: Connection, statuses: Collection[str] = ()
) -> dict[tuple[str, str], int]:
    """Deliveries by (destination, status); only of ``statuses`` when given (the few
    pending and dead ones, read through the status index: /metrics never counts them all)."""
    query = select(_deliveries.c.destination, _deliveries.c.status, func.count()).group_by(
        _deliveries.c.destination, _deliveries.c.status
    )
    if statuses:
        query = query.where(_deliveries.c.status.in_(sorted(statuses)))
    return {(row[0], row[1]): int(row[2]) for row in conn.execute(query)}
