"""The audit log: append-only events chained by an HMAC, and reports.

Each event's MAC covers its own fields and the previous event's MAC, keyed by a subkey of
the operator's key-encryption key, so someone with write access to the database alone can
neither edit, insert nor delete an event without :meth:`AuditLog.verify` saying which.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import logging
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection

from pkigate.core.errors import PkigateError
from pkigate.core.keys import KeyEncryptionKey
from pkigate.core.store import AuditEventRecord, CertificateRecord, Store

GENESIS = "0" * 64


@dataclass(frozen=True)
class Actor:
    """Who did something, through which connector (``cli``, ``api``, ``scep/mdm``, ...)."""

    principal: str
    connector: str = "cli"
    request_id: str | None = None


@dataclass(frozen=True)
class AuditEntry:
    """One event to append: who, what, on which resource, when, with what outcome."""

    actor: Actor
    action: str
    resource: str
    at: datetime
    result: str = "success"
    parameters: Mapping[str, Any] | None = None


log = logging.getLogger("pkigate.audit")
HEAD_GUARD = Actor("system:audit", "core")
HEAD_TAMPERED = "audit.head_tampered"
HEAD_SIGNED = "audit.head_signed"


@dataclass(frozen=True)
class VerificationProblem:
    seq: int
    kind: str  # "edited" | "inserted" | "deleted" | "truncated" | "reordered"
    detail: str


@dataclass(frozen=True)
class VerificationResult:
    events: int
    problems: tuple[VerificationProblem, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.problems


# One encoder each, built once: json.dumps would build them again for every event.
_CANONICAL_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_PARAMETERS_JSON = json.JSONEncoder(sort_keys=True, default=str, separators=(",", ":"))


def _canonical(
    seq: int,
    event_id: str,
    at: datetime,
    actor: str,
    connector: str,
    action: str,
    resource: str,
    parameters: str,
    result: str,
    request_id: str | None,
    prev_mac: str,
) -> bytes:
    return _CANONICAL_JSON.encode(
        [
            seq,
            event_id,
            at.isoformat(timespec="microseconds"),
            actor,
            connector,
            action,
            resource,
            parameters,
            result,
            request_id,
            prev_mac,
        ]
    ).encode()


class AuditLog:
    def __init__(self, store: Store, kek: KeyEncryptionKey) -> None:
        self._store = store
        self._key = kek.derive(b"pkigate audit chain v1")
        self._sign_unsigned_head()

    def _head_ok(self, head: tuple[int, str, str | None]) -> bool:
        seq, mac, signed = head
        return signed is not None and hmac.compare_digest(signed, self._head_mac(seq, mac))

    def _head_mac(self, seq: int, mac: str) -> str:
        # Three fields where an event has eleven: no head MAC is ever an event's.
        message = _CANONICAL_JSON.encode(["pkigate audit head", seq, mac]).encode()
        return hmac.digest(self._key, message, hashlib.sha256).hex()

    def _sign_unsigned_head(self) -> None:
        """A store written before heads were signed: sign the head as it is now, once,
        and say so in the log. A head unsigned again after that was altered without the
        key (setting it to NULL must not get it re-signed): left for verify to report."""
        with self._store.read() as conn:
            head = self._store.audit_head(conn)
        if head is None or head[2] is not None:
            return
        with self._store.write() as conn:
            if self._store.audit_action_recorded(conn, HEAD_SIGNED, HEAD_GUARD.principal):
                log.error("the audit chain head was unsigned outside pkigate; not re-signed")
                return
            signed = self._head_mac(head[0], head[1])
            if self._store.sign_audit_head(conn, head[0], head[1], signed):
                self.record(
                    conn,
                    HEAD_GUARD,
                    HEAD_SIGNED,
                    "audit",
                    parameters={"head_seq": head[0]},
                    at=datetime.now(UTC),
                )

    def _mac(self, *fields: Any) -> str:
        return hmac.digest(self._key, _canonical(*fields), hashlib.sha256).hex()

    def record(
        self,
        conn: Connection,
        actor: Actor,
        action: str,
        resource: str,
        *,
        result: str = "success",
        parameters: Mapping[str, Any] | None = None,
        at: datetime,
    ) -> str:
        """Append one event in the caller's write transaction; returns its id."""
        return self.record_many(
            conn, [AuditEntry(actor, action, resource, at, result, parameters)]
        )[0]

    def record_many(self, conn: Connection, entries: Sequence[AuditEntry]) -> list[str]:
        """Append events in order, in the caller's write transaction; returns their ids."""
        if not entries:
            return []
        locked = self._store.lock_audit_head(conn, GENESIS)
        head_seq, head_mac = (0, GENESIS) if locked is None else locked[:2]
        if locked is not None and not self._head_ok(locked):
            # The head was moved without the key (a cut-off tail): say so in the log
            # itself, so that the events appended from now on do not hide it.
            log.error("the audit chain head was altered outside pkigate (event %d)", head_seq)
            entries = [
                AuditEntry(
                    HEAD_GUARD,
                    HEAD_TAMPERED,
                    "audit",
                    entries[0].at,
                    "failure",
                    {"head_seq": head_seq},
                ),
                *entries,
            ]
        rows = []
        for entry in entries:
            head_seq += 1
            event_id = str(uuid.uuid4())
            params = _PARAMETERS_JSON.encode(dict(entry.parameters or {}))
            actor = entry.actor
            mac = self._mac(
                head_seq,
                event_id,
                entry.at,
                actor.principal,
                actor.connector,
                entry.action,
                entry.resource,
                params,
                entry.result,
                actor.request_id,
                head_mac,
            )
            rows.append(
                {
                    "seq": head_seq,
                    "event_id": event_id,
                    "at": entry.at,
                    "actor": actor.principal,
                    "connector": actor.connector,
                    "action": entry.action,
                    "resource": entry.resource,
                    "parameters": params,
                    "result": entry.result,
                    "request_id": actor.request_id,
                    "prev_mac": head_mac,
                    "mac": mac,
                }
            )
            head_mac = mac
        self._store.append_audit_events(conn, rows, self._head_mac(head_seq, head_mac))
        return [str(row["event_id"]) for row in rows]

    def record_alone(
        self,
        actor: Actor,
        action: str,
        resource: str,
        *,
        result: str,
        parameters: Mapping[str, Any] | None,
        at: datetime,
    ) -> None:
        """Record in a transaction of its own (refusals, after the work rolled back)."""
        with self._store.write() as conn:
            self.record(conn, actor, action, resource, result=result, parameters=parameters, at=at)

    @contextmanager
    def refusals(
        self, actor: Actor, action: str, resource: str, at: datetime, **parameters: Any
    ) -> Iterator[None]:
        """Audit a refusal: a typed error raised inside is recorded, then raised again."""
        try:
            yield
        except PkigateError as exc:
            self.record_alone(
                actor,
                action,
                resource,
                result="failure",
                at=at,
                parameters={**parameters, "error": exc.code, "message": exc.message},
            )
            raise

    def verify(self) -> VerificationResult:
        """Walk the chain and say which events were edited, inserted or deleted."""
        problems: list[VerificationProblem] = []
        count = 0
        shift = 0  # how far later events were renumbered to hide an insertion or deletion
        with self._store.read() as conn:
            head = self._store.audit_head(conn)
            previous: AuditEventRecord | None = None
            tampered: list[AuditEventRecord] = []
            for event, following in _pairs(self._store.iter_audit_events(conn)):
                count += 1
                if event.action == HEAD_TAMPERED and event.actor == HEAD_GUARD.principal:
                    tampered.append(event)
                expected_seq = previous.seq + 1 if previous else 1
                expected_prev = previous.mac if previous else GENESIS
                if event.seq > expected_seq:
                    problems.append(
                        VerificationProblem(
                            expected_seq,
                            "deleted",
                            f"events {expected_seq}..{event.seq - 1} are missing",
                        )
                    )
                if self._mac_ok(event, event.seq - shift):
                    if event.seq == expected_seq and event.prev_mac != expected_prev:
                        problems.append(
                            VerificationProblem(
                                event.seq,
                                "reordered",
                                f"event {event.seq} does not follow event {expected_seq - 1}",
                            )
                        )
                elif (moved := self._renumbered_by(event)) is not None:
                    if moved > 0 and shift == 0:
                        problems.append(
                            VerificationProblem(
                                event.seq,
                                "deleted",
                                f"{moved} event(s) before {event.seq} were deleted and the rest "
                                "renumbered",
                            )
                        )
                    shift = -moved
                elif following is not None and following.prev_mac == expected_prev:
                    problems.append(
                        VerificationProblem(
                            event.seq,
                            "inserted",
                            f"event {event.seq} ({event.action} on {event.resource}) is not part "
                            "of the chain",
                        )
                    )
                elif following is None and head is not None and head[0] < event.seq:
                    problems.append(
                        VerificationProblem(
                            event.seq,
                            "inserted",
                            f"event {event.seq} was added outside the audit log",
                        )
                    )
                else:
                    problems.append(
                        VerificationProblem(
                            event.seq,
                            "edited",
                            f"event {event.seq} ({event.action} on {event.resource}) was altered",
                        )
                    )
                previous = event
            last_seq = previous.seq if previous else 0
            reported = {p.seq for p in problems}
            for event in tampered:
                problems.append(
                    VerificationProblem(
                        event.seq,
                        "deleted",
                        f"before event {event.seq} the chain head had been moved without "
                        "the audit key: events at the end of the log may have been cut off",
                    )
                )
            if head is not None and not self._head_ok(head) and not problems:
                # Only said when nothing else explains it: the head moved back over a
                # deleted tail (the chain before it is intact, so nothing else shows).
                problems.append(
                    VerificationProblem(
                        head[0],
                        "deleted",
                        f"the chain head (event {head[0]}) was altered: events at the end of "
                        "the log may have been cut off",
                    )
                )
            elif (
                head is not None
                and head[0] == last_seq
                and previous is not None
                and previous.mac != head[1]
            ):
                problems.append(
                    VerificationProblem(
                        last_seq,
                        "edited",
                        f"the last event ({last_seq}) is not the one the head signed",
                    )
                )
            if head is not None and head[0] > last_seq:
                problems.append(
                    VerificationProblem(
                        last_seq + 1,
                        "deleted",
                        f"events {last_seq + 1}..{head[0]} at the end of the log are missing",
                    )
                )
            elif head is not None and head[0] < last_seq and head[0] + 1 not in reported:
                problems.append(
                    VerificationProblem(
                        head[0] + 1,
                        "inserted",
                        f"events after {head[0]} were added outside the audit log",
                    )
                )
        return VerificationResult(count, tuple(problems))

    def _mac_ok(self, event: AuditEventRecord, seq: int) -> bool:
        expected = self._mac(
            seq,
            event.event_id,
            event.at,
            event.actor,
            event.connector,
            event.action,
            event.resource,
            event.parameters,
            event.result,
            event.request_id,
            event.prev_mac,
        )
        return hmac.compare_digest(event.mac, expected)

    def _renumbered_by(self, event: AuditEventRecord, reach: int = 16) -> int | None:
        """If the event verifies under another sequence number, by how much it was moved."""
        for delta in range(1, reach + 1):
            if self._mac_ok(event, event.seq + delta):
                return delta
            if event.seq - delta > 0 and self._mac_ok(event, event.seq - delta):
                return -delta
        return None

    def events(self) -> list[AuditEventRecord]:
        with self._store.read() as conn:
            return list(self._store.iter_audit_events(conn))


def _pairs(
    events: Iterable[AuditEventRecord],
) -> Iterator[tuple[AuditEventRecord, AuditEventRecord | None]]:
    """Each event with the one after it (None for the last)."""
    iterator = iter(events)
    current = next(iterator, None)
    while current is not None:
        following = next(iterator, None)
        yield current, following
        current = following


REPORT_FIELDS = (
    "serial",
    "subject",
    "notBefore",
    "notAfter",
    "issuedAt",
    "revokedAt",
    "revocationReason",
    "template",
    "requester",
    "status",
)


def report_rows(certificates: Iterable[CertificateRecord]) -> list[dict[str, str | None]]:
    def iso(moment: datetime | None) -> str | None:
        return moment.isoformat() if moment else None

    return [
        {
            "serial": c.serial,
            "subject": c.subject,
            "notBefore": iso(c.not_before),
            "notAfter": iso(c.not_after),
            "issuedAt": iso(c.issued_at),
            "revokedAt": iso(c.revoked_at),
            "revocationReason": c.revocation_reason,
            "template": c.template,
            "requester": c.requester,
            "status": c.status,
        }
        for c in certificates
    ]


def render_report(rows: list[dict[str, str | None]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=REPORT_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
