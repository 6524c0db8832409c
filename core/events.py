"""Events: what happened to certificates and CAs, kept in an outbox for notifications.

An event is written in the same transaction as the change it reports (the certificate's
row, the revocation, the CA's new status), so a committed change always has its event
and a rolled-back one never does. Events found by a periodic look at the store (a
certificate 30 days from expiry) carry a ``once_key`` that the store keeps unique: however
many workers on however many hosts look at the same moment, one event is written.

Delivery to webhooks and mail is not the core's business (gateways/notifications.py):
it reads the outbox and keeps, per destination, each event's delivery state.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Connection

from pkigate.core.audit import time_ordered_event_id
from pkigate.core.store import Store
from pkigate.core.store import events as events_sql
from pkigate.core.store.events import DeliveryRow

#: The version of the JSON an event is delivered as (documented in the OpenAPI document).
PAYLOAD_VERSION = 1
DEFAULT_EXPIRY_NOTICE_DAYS = (45, 30, 7, 1)
_DATA_JSON = json.JSONEncoder(sort_keys=True, default=str, separators=(",", ":"))


class EventType(StrEnum):
    CERTIFICATE_ISSUED = "certificate.issued"
    CERTIFICATE_REVOKED = "certificate.revoked"
    CERTIFICATE_EXPIRING = "certificate.expiring"
    CERTIFICATE_EXPIRED = "certificate.expired"
    CA_EXPIRING = "ca.expiring"
    CA_EXPIRED = "ca.expired"
    CA_STATUS_CHANGED = "ca.status_changed"
    CRL_PUBLISH_FAILED = "crl.publish_failed"
    OCSP_RESPONDER_RENEWED = "ocsp.responder_renewed"
    ENROLLMENT_PENDING = "enrollment.pending"
    #: Sent by `pkigate notifications test NAME`; never written to the outbox.
    NOTIFICATION_TEST = "notification.test"


@dataclass(frozen=True)
class Event:
    """One thing that happened, as delivered (see :meth:`payload`)."""

    type: EventType
    occurred_at: datetime
    ca_id: str | None = None
    serial: str | None = None
    template: str | None = None
    #: What a receiver needs to act: subject, names, notAfter, requester, connector, ...
    data: Mapping[str, Any] = field(default_factory=dict)
    #: Unique, time-ordered (UUIDv7): receivers de-duplicate at-least-once deliveries by it.
    event_id: str = field(default_factory=time_ordered_event_id)
    #: For events a periodic job finds: at most one event per key is ever written.
    once_key: str | None = None

    def row(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "type": self.type.value,
            "occurred_at": self.occurred_at,
            "ca_id": self.ca_id,
            "serial": self.serial,
            "template": self.template,
            "once_key": self.once_key,
            "data": _DATA_JSON.encode(dict(self.data)),
        }

    def payload(self) -> dict[str, Any]:
        """The versioned JSON object a destination receives."""
        return {
            "version": PAYLOAD_VERSION,
            "id": self.event_id,
            "type": self.type.value,
            "occurred_at": self.occurred_at.isoformat(),
            "ca_id": self.ca_id,
            "serial": self.serial,
            "template": self.template,
            "data": json.loads(_DATA_JSON.encode(dict(self.data))),
        }

    @classmethod
    def from_row(cls, row: events_sql.EventRow) -> Event:
        return cls(
            EventType(row.type),
            row.occurred_at,
            row.ca_id,
            row.serial,
            row.template,
            row.data,
            row.event_id,
        )


def enrollment_pending(
    at: datetime,
    *,
    connector: str,
    request: str,
    ca_id: str,
    template: str,
    subject: str,
    requester: str,
) -> Event:
    """A request a connector holds for an administrator's approval (SCEP, AD-style)."""
    return Event(
        EventType.ENROLLMENT_PENDING,
        at,
        ca_id=ca_id,
        template=template,
        data={
            "connector": connector,
            "request": request,
            "subject": subject,
            "requester": requester,
        },
    )


@dataclass(frozen=True)
class StoredEvent:
    """An event from the outbox with its position and its delivery to each destination."""

    id: int
    event: Event
    deliveries: tuple[DeliveryRow, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            **self.event.payload(),
            "position": self.id,
            "deliveries": [
                {
                    "destination": d.destination,
                    "status": d.status,
                    "attempts": d.attempts,
                    "last_error": d.last_error,
                    "updated_at": d.updated_at.isoformat(),
                }
                for d in self.deliveries
            ],
        }


class EventLog:
    """Writes events into the caller's transaction and reads the outbox."""

    def __init__(self, store: Store, clock: Callable[[], datetime]) -> None:
        self._store = store
        self._clock = clock

    def emit(self, conn: Connection, events: Sequence[Event]) -> None:
        """Write events in the caller's write transaction (one round trip)."""
        events_sql.insert_events(conn, [event.row() for event in events])

    def emit_once(self, conn: Connection, event: Event) -> bool:
        """Write an event with a ``once_key`` unless one with that key exists (whoever
        wrote it); True if this call wrote it."""
        assert event.once_key is not None
        return events_sql.insert_event_once(conn, event.row())

    def emit_alone(self, event: Event) -> None:
        """An event about something that changed nothing in the store (a CRL that could
        not be published), in a transaction of its own."""
        with self._store.write() as conn:
            self.emit(conn, [event])

    def list(
        self,
        *,
        after: int = 0,
        types: Collection[str] = (),
        ca_id: str | None = None,
        ca_ids: Collection[str] | None = None,
        limit: int = 100,
    ) -> list[StoredEvent]:
        """Events after position ``after``, oldest first, with their delivery states;
        ``ca_ids``: only those about these CAs."""
        with self._store.read() as conn:
            rows = events_sql.list_events(
                conn, after_id=after, types=types, ca_id=ca_id, ca_ids=ca_ids, limit=limit
            )
            deliveries = events_sql.deliveries_of(conn, [row.event_id for row in rows])
        by_event: dict[str, list[DeliveryRow]] = {}
        for delivery in deliveries:
            by_event.setdefault(delivery.event_id, []).append(delivery)
        return [
            StoredEvent(row.id, Event.from_row(row), tuple(by_event.get(row.event_id, ())))
            for row in rows
        ]
