"""The expiry scan: certificate.expiring / .expired and ca.expiring / .expired events.

A periodic job (any worker on any host may run it, several at once) looks for
certificates and CAs that crossed one of their lead times since. Each event has a
``once_key`` naming the certificate (or CA certificate) and the lead time, unique in the
store, so each lead time of each certificate is emitted exactly once whoever looks.

A certificate is notified at lead time L when its notAfter is less than L days away but
not yet less than the next shorter lead time: a scanner that was down for a week skips
the notices that are stale by now rather than sending them all at once. A certificate
that did not yet exist L days before its notAfter (a 10-day certificate and the 30-day
notice) is not notified at L.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from pkigate.core.authorities import CASettings
from pkigate.core.events import Event, EventLog, EventType
from pkigate.core.model import CAStatus
from pkigate.core.store import CARecord, CertificateRecord, Store
from pkigate.core.store import events as events_sql

log = logging.getLogger("pkigate.core.events")

EXPIRY_JOB = "events:expiry"
# certificate.expired is emitted for certificates that expired at most this long ago: a
# store that gains events holds years of expired certificates nobody needs told about.
EXPIRED_LOOKBACK = timedelta(days=30)
_SCANNED = frozenset({CAStatus.ACTIVE.value, CAStatus.DISABLED.value})


def _windows(days: Sequence[int]) -> list[tuple[int, int]]:
    """(lead, next shorter lead or 0) for lead times given longest first."""
    return list(zip(days, [*days[1:], 0], strict=True))


class ExpiryScanner:
    def __init__(self, store: Store, events: EventLog, clock: Callable[[], datetime]) -> None:
        self._store = store
        self._events = events
        self._clock = clock

    def scan(self) -> int:
        """Emit what is due now; returns how many events this call wrote."""
        now = self._clock()
        with self._store.read() as conn:
            cas = [ca for ca in self._store.list_cas(conn) if ca.status in _SCANNED]
        written = 0
        for ca in cas:
            settings = CASettings.from_json(ca.settings)
            written += self._scan_authority(ca, settings, now)
            by_template = settings.expiry_notice_days_by_template
            groups: list[tuple[str | None, tuple[int, ...]]] = [
                (None, settings.expiry_notice_days),
                *by_template.items(),
            ]
            for template, days in groups:
                other_than = tuple(by_template) if template is None else ()
                for lead, shorter in _windows(days):
                    written += self._scan_certificates(
                        ca.id,
                        (now + timedelta(days=shorter), now + timedelta(days=lead)),
                        lead,
                        template,
                        other_than,
                        now,
                    )
                written += self._scan_certificates(
                    ca.id, (now - EXPIRED_LOOKBACK, now), 0, template, other_than, now
                )
        return written

    def _scan_certificates(
        self,
        ca_id: str,
        window: tuple[datetime, datetime],
        lead: int,
        template: str | None,
        other_than: tuple[str, ...],
        now: datetime,
    ) -> int:
        """Events for one lead time (0: expired) of one CA's certificates of one template."""
        kind = EventType.CERTIFICATE_EXPIRING if lead else EventType.CERTIFICATE_EXPIRED
        prefix, suffix = f"{kind.value}:{ca_id}:", f":{lead}" if lead else ""
        written, after_id = 0, 0
        while True:
            with self._store.write() as conn:
                found = events_sql.unrevoked_expiring(
                    conn,
                    ca_id,
                    window,
                    once_prefix=prefix,
                    once_suffix=suffix,
                    template=template,
                    other_than=other_than,
                    after_id=after_id,
                )
                for record in found:
                    if lead and record.issued_at > record.not_after - timedelta(days=lead):
                        continue  # it was never this far from its expiry
                    event = _certificate_event(
                        kind, record, lead, now, prefix + record.serial + suffix
                    )
                    written += self._events.emit_once(conn, event)
            if len(found) < events_sql.EXPIRY_SCAN_BATCH:
                return written
            after_id = found[-1].id

    def _scan_authority(self, ca: CARecord, settings: CASettings, now: datetime) -> int:
        if ca.not_after is None:
            return 0
        remaining = ca.not_after - now
        due: tuple[EventType, int] | None = None
        if remaining <= timedelta(0):
            due = (EventType.CA_EXPIRED, 0) if -remaining <= EXPIRED_LOOKBACK else None
        else:
            for lead, shorter in _windows(settings.expiry_notice_days):
                if timedelta(days=shorter) < remaining <= timedelta(days=lead):
                    due = (EventType.CA_EXPIRING, lead)
        if due is None:
            return 0
        kind, lead = due
        event = Event(
            kind,
            now,
            ca_id=ca.id,
            data={"subject": ca.subject, "not_after": ca.not_after, "days_before": lead},
            once_key=f"{kind.value}:{ca.id}:{ca.not_after.isoformat()}:{lead}",
        )
        with self._store.write() as conn:
            return int(self._events.emit_once(conn, event))


def _certificate_event(
    kind: EventType, record: CertificateRecord, lead: int, now: datetime, once_key: str
) -> Event:
    return Event(
        kind,
        now,
        ca_id=record.ca_id,
        serial=record.serial,
        template=record.template,
        data={
            "subject": record.subject,
            "sans": list(record.sans),
            "not_after": record.not_after,
            "days_before": lead,
            "requester": record.requester,
            "connector": record.connector,
            "issued_at": record.issued_at,
        },
        once_key=once_key,
    )
