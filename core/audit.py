"""The audit log: append-only events chained by an HMAC, and reports.

Each event's MAC covers its own fields and the previous event's MAC, keyed by a subkey of
the operator's key-encryption key, so someone with write access to the database alone can
neither edit, insert nor delete an event without :meth:`AuditLog.verify` saying which.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import hmac
import io
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection

from pkigate.core.anchor import (
    HOST_JOURNAL_NAME,
    AnchorCorruptError,
    AnchoredEvent,
    AuditAnchor,
    HostJournal,
    anchor_path,
    certificate_row,
    event_row,
)
from pkigate.core.errors import (
    AnchorWriteError,
    BadRequestError,
    PkigateError,
    StoreIntegrityError,
    StoreUnavailableError,
)
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
    # The row of the certificate this event issued: the anchor keeps it, so that a store
    # that lost it can be given it back.
    certificate: Mapping[str, Any] | None = None


log = logging.getLogger("pkigate.audit")
HEAD_GUARD = Actor("system:audit", "core")
HEAD_TAMPERED = "audit.head_tampered"
HEAD_SIGNED = "audit.head_signed"
# Recorded when an anchor file is started: a store that has it and no anchor file lost
# the file (an upgrade from before anchors has neither).
ANCHOR_STARTED = "audit.anchor_started"
RECOVERED = "audit.recover"
REANCHORED = "audit.reanchor"


@dataclass(frozen=True)
class AnchorStatus:
    """How the store compares with its audit anchor.

    ``state``: ``none`` (no anchor: in-memory SQLite), ``unanchored`` (no anchor yet: started at
    the next write), ``ok``, ``anchor-behind`` (a crash between the store's commit and the
    anchor's write: caught up at the next write), and the states in which the store is not
    trusted, each with its ``message``: ``store-behind``, ``diverged``, ``missing``,
    ``corrupt``. PostgreSQL, compared with this host's journal: ``ok``, ``store-behind``
    (events this host committed are past the store's head), ``diverged`` (other events
    took their numbers), ``corrupt``."""

    state: str
    message: str | None = None
    detail: str | None = None  # the one line `audit verify` prints
    lost_from: int = 0
    lost_to: int = 0
    certificates: int = 0

    @property
    def trusted(self) -> bool:
        return self.message is None


@dataclass(frozen=True)
class RecoveryResult:
    events: int
    certificates: int
    revocations: int
    first_seq: int = 0
    last_seq: int = 0
    not_restored: tuple[str, ...] = ()
    # PostgreSQL: lost events of this host that could not go back at their numbers (another
    # host's lost event came first, or other events took them): their certificates did.
    outside_chain: tuple[int, ...] = ()


@dataclass(frozen=True)
class _AnchorPlan:
    start: bool  # a new anchor file begins with this transaction's events
    catch_up: list[bytes]  # lines for events committed but not anchored (a crash between)


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


def time_ordered_event_id() -> str:
    """A UUID version 7 (RFC 9562 5.7): 48 bits of Unix milliseconds, then 74 random bits.

    Event ids are unique by an index; random (version 4) ids land on a random leaf of
    it, so with a million events every append dirties a page of its own that the next
    commit must write again (measured by bench/store_scale.py). Ids that grow with time
    land on the index's last page, as the sequence numbers do."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    value = value & ~(0xF << 76) | 0x7 << 76  # version 7
    value = value & ~(0x3 << 62) | 0x2 << 62  # the RFC 9562 variant
    return str(uuid.UUID(int=value))


class AuditLog:
    def __init__(self, store: Store, kek: KeyEncryptionKey, data_dir: Path | None = None) -> None:
        self._store = store
        self._key = kek.derive(b"pkigate audit chain v1")
        anchor_key = kek.derive(b"pkigate audit anchor v1")
        path = anchor_path(store.sqlite_database)
        self._anchor = AuditAnchor(path, anchor_key) if path is not None else None
        # PostgreSQL: written from several hosts with no file system in common, each
        # keeping the events its own processes committed (see anchor.py).
        self._journal = (
            HostJournal(data_dir / HOST_JOURNAL_NAME, anchor_key)
            if data_dir is not None and store.dialect == "postgresql"
            else None
        )
        self._sign_unsigned_head()

    @property
    def anchor(self) -> AuditAnchor | None:
        """The SQLite anchor, or the PostgreSQL store's journal of this host."""
        return self._anchor or self._journal

    def close(self) -> None:
        if self._anchor is not None:
            self._anchor.close()
        if self._journal is not None:
            self._journal.close()

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
            if not self._anchor_allows(conn, head[0], head[1]):
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

    def record_many(
        self,
        conn: Connection,
        entries: Sequence[AuditEntry],
        *,
        settle_anchor: bool = False,
        new_anchor: bool = False,
        past_journal: bool = False,
    ) -> list[str]:
        """Append events in order, in the caller's write transaction; returns their ids.

        Once the transaction commits they are appended to the anchor, before the writer
        lock is released. ``settle_anchor`` writes even without entries when the anchor
        must be started or caught up; ``new_anchor`` starts a new anchor file although
        the store had one (``reanchor``). On PostgreSQL, a store behind this host's
        journal is not written, but by a recovery (``past_journal``) that gives up putting
        the rest back in the chain."""
        if not entries and not settle_anchor:
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
        plan = None
        if self._anchor is not None:
            plan = self._anchor_plan(conn, head_seq, head_mac, new_anchor)
            if plan.start:
                started = AuditEntry(
                    HEAD_GUARD,
                    ANCHOR_STARTED,
                    "audit",
                    entries[0].at if entries else datetime.now(UTC),
                    parameters={"anchor": self._anchor.path.name, "first_seq": head_seq + 1},
                )
                entries = [started, *entries]
            if not entries and not plan.catch_up:
                return []
        if self._journal is not None and not past_journal:
            self._check_journal(conn, head_seq, head_mac)
        rows = []
        for entry in entries:
            head_seq += 1
            event_id = time_ordered_event_id()
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
        if rows:
            self._store.append_audit_events(conn, rows, self._head_mac(head_seq, head_mac))
        if plan is not None and self._anchor is not None:
            anchor = self._anchor
            lines = plan.catch_up + [
                anchor.encode(row, entry.certificate)
                for row, entry in zip(rows, entries, strict=True)
            ]
            start = plan.start
            self._store.after_commit(conn, lambda: self._write_anchor(lines, start))
        if self._journal is not None and rows:
            journal = self._journal
            entered = [
                journal.encode(row, entry.certificate)
                for row, entry in zip(rows, entries, strict=True)
            ]
            self._store.after_commit(conn, lambda: self._write_journal(entered))
        return [str(row["event_id"]) for row in rows]

    # -- the anchor ---------------------------------------------------------------------

    def _anchor_plan(
        self, conn: Connection, head_seq: int, head_mac: str, new_anchor: bool
    ) -> _AnchorPlan:
        """Compare the locked head with the anchor's last line: refuse to extend a store
        that is behind its anchor (new events would take the lost events' numbers)."""
        assert self._anchor is not None
        try:
            exists, last = self._anchor.last_for_append()
        except AnchorCorruptError as exc:
            raise StoreIntegrityError(exc.message + _REANCHOR_HINT) from None
        if last is None:
            if not new_anchor and self._anchored(conn):
                raise StoreIntegrityError(self._missing_message())
            if exists:
                # Created by a process that died before its first line: start it again.
                self._anchor.path.unlink()
                self._anchor.close()
            return _AnchorPlan(True, [])
        if last.mac == head_mac:
            return _AnchorPlan(False, [])
        if last.seq < head_seq:
            stored = self._store.audit_event(conn, last.seq)
            if stored is not None and stored.mac == last.mac:
                return _AnchorPlan(False, self._lines_from_store(conn, last.seq))
        raise StoreIntegrityError(self.anchor_status().message or "the store and its anchor differ")

    def _anchor_allows(self, conn: Connection, head_seq: int, head_mac: str) -> bool:
        """Whether the store may be written as the anchor sees it; when not, opening the
        store still works (`audit verify` and `audit recover` must), the write does not."""
        if self._anchor is None:
            return True
        try:
            self._anchor_plan(conn, head_seq, head_mac, False)
        except StoreIntegrityError as exc:
            log.error("%s", exc.message)
            return False
        return True

    def _anchored(self, conn: Connection) -> bool:
        return self._store.audit_action_recorded(conn, ANCHOR_STARTED, HEAD_GUARD.principal)

    def _write_anchor(self, lines: list[bytes], start: bool) -> None:
        assert self._anchor is not None
        try:
            self._anchor.append(lines, create=start)
        except OSError as exc:
            log.error("the audit anchor %s cannot be written: %s", self._anchor.path, exc)
            raise AnchorWriteError(
                f"stored, but the audit anchor cannot be written ({exc.strerror or exc}); "
                "the answer is withheld"
            ) from None

    def _write_journal(self, lines: list[bytes]) -> None:
        assert self._journal is not None
        try:
            self._journal.append(lines)
        except OSError as exc:
            log.error("the audit journal %s cannot be written: %s", self._journal.path, exc)
            raise AnchorWriteError(
                f"stored, but this host's audit journal cannot be written "
                f"({exc.strerror or exc}); the answer is withheld"
            ) from None

    def _check_journal(self, conn: Connection, head_seq: int, head_mac: str) -> None:
        """Refuse to write a store that lost events this host committed: new events would
        take their numbers, or bury the ones that already did (the alarm would be gone)."""
        assert self._journal is not None
        try:
            highest = self._journal.highest()
        except AnchorCorruptError as exc:
            raise StoreIntegrityError(exc.message + _REJOURNAL_HINT) from None
        if highest is None or (highest.seq == head_seq and highest.mac == head_mac):
            return
        if highest.seq < head_seq:
            stored = self._store.audit_event(conn, highest.seq)
            if stored is None or stored.mac == highest.mac:
                return
        raise StoreIntegrityError(
            self.anchor_status().message or "the store lost events this host committed"
        )

    def _lines_from_store(self, conn: Connection, after_seq: int) -> list[bytes]:
        """Anchor lines for the store's events after ``after_seq``, with their certificates."""
        assert self._anchor is not None
        lines = []
        for event in self._store.iter_audit_events(conn, after=after_seq):
            certificate = None
            if event.action == "certificate.issue" and event.result == "success":
                serial = json.loads(event.parameters).get("serial")
                record = self._store.get_certificate(
                    conn, event.resource.removeprefix("ca/"), str(serial)
                )
                if record is not None:
                    certificate = _certificate_row(record)
            lines.append(self._anchor.encode(_event_row(event), certificate))
        return lines

    def settle_anchor(self) -> None:
        """At start: begin the anchor (a new store, or one from before anchors: audited) or
        catch it up after a crash between a commit and its anchor write."""
        if self._anchor is None:
            return
        with self._store.write() as conn:
            self.record_many(conn, [], settle_anchor=True)

    def anchor_status(self) -> AnchorStatus:
        """Compare the store's chain head with the anchor's last line (no lock taken).

        The anchor is read first: its lines are written after their commit, so a head read
        after it is never behind it unless the store lost events."""
        if self._journal is not None:
            return self._journal_status()
        anchor = self._anchor
        if anchor is None:
            return AnchorStatus("none")
        for _attempt in range(2):
            try:
                last = anchor.tail() if anchor.exists() else None
            except (AnchorCorruptError, FileNotFoundError) as exc:
                message = getattr(exc, "message", str(exc))
                return AnchorStatus("corrupt", message + _REANCHOR_HINT, message)
            with self._store.read() as conn:
                head = self._store.audit_head(conn)
                head_seq, head_mac = (0, GENESIS) if head is None else head[:2]
                if last is None:
                    if not self._anchored(conn):
                        return AnchorStatus("unanchored")
                    if anchor.exists() and _attempt == 0:
                        continue  # created meanwhile by the writer that recorded the start
                    message = self._missing_message()
                    gone = f"the audit anchor {anchor.path} is gone"
                    return AnchorStatus("missing", message, gone)
                if last.mac == head_mac:
                    return AnchorStatus("ok")
                if last.seq < head_seq:
                    stored = self._store.audit_event(conn, last.seq)
                    if stored is not None and stored.mac == last.mac:
                        return AnchorStatus("anchor-behind")
            return self._store_behind_status(head_seq, head_mac, last)
        raise AssertionError("unreachable: the second attempt returns")

    def _store_behind_status(
        self, head_seq: int, head_mac: str, last: AnchoredEvent
    ) -> AnchorStatus:
        anchor = self._anchor
        assert anchor is not None
        database = self._store.sqlite_database
        at_head: AnchoredEvent | None = None
        first: AnchoredEvent | None = None
        certificates = 0
        try:
            for event in anchor.events():
                first = first or event
                if event.seq == head_seq:
                    at_head = event
                elif event.seq > head_seq and event.issued_certificate:
                    certificates += 1
        except AnchorCorruptError as exc:
            return AnchorStatus("corrupt", exc.message + _REANCHOR_HINT, exc.message)
        starts_after = first is not None and first.seq > head_seq + 1
        prefix = (at_head is not None and at_head.mac == head_mac) or (
            first is not None and first.seq == head_seq + 1 and first.event["prev_mac"] == head_mac
        )
        if last.seq > head_seq and (prefix or starts_after):
            lost = f"audit events {head_seq + 1}..{last.seq}"
            detail = (
                f"{lost} ({certificates} issued certificates among them) are in the audit "
                f"anchor {anchor.path.name} but missing from the store"
            )
            if starts_after:
                assert first is not None
                how = (
                    f"The anchor starts at event {first.seq}, so events {head_seq + 1}.."
                    f"{first.seq - 1} are in neither: put back a newer copy of the database "
                    "if there is one; otherwise run `pkigate audit recover` to restore what "
                    "the anchor holds, or `pkigate audit reanchor` to give it up (audited)."
                )
            else:
                how = (
                    "Run `pkigate audit recover` to put those events and certificates back "
                    "(audited), then start again. If an older copy of the database was put "
                    "back on purpose and what came after it is to be given up, run `pkigate "
                    "audit reanchor` instead (audited; the old anchor file is kept)."
                )
            message = (
                f"The store {database} is behind its audit anchor: {detail}. The database "
                "lost its latest writes (a cut-off write-ahead log, a failing disk) or an "
                "older copy of it was put back; pkigate does not serve or write from it. " + how
            )
            return AnchorStatus(
                "store-behind", message, detail, head_seq + 1, last.seq, certificates
            )
        detail = (
            f"the store's audit chain (head at event {head_seq}) and its audit anchor "
            f"{anchor.path.name} (last event {last.seq}) are different histories"
        )
        message = (
            f"The store {database} does not match its audit anchor: {detail}. The database "
            "was replaced by another one or written by something other than pkigate; "
            "pkigate does not serve or write from it. Put back the database this anchor "
            "belongs to, or run `pkigate audit reanchor` to start a new anchor from this "
            "store (audited; the old anchor file is kept)."
        )
        return AnchorStatus("diverged", message, detail, head_seq + 1, last.seq)

    def _journal_status(self) -> AnchorStatus:
        """PostgreSQL: compare this host's highest journaled event with the store's event
        at that number (journal read first: its lines follow their commits). The store's
        lost events are a suffix of its sequence, so if it holds that one as journaled,
        it lost nothing this host wrote."""
        journal = self._journal
        assert journal is not None
        try:
            highest = journal.highest()
        except AnchorCorruptError as exc:
            return AnchorStatus("corrupt", exc.message + _REJOURNAL_HINT, exc.message)
        if highest is None:
            return AnchorStatus("ok")
        with self._store.read() as conn:
            head = self._store.audit_head(conn)
            head_seq = 0 if head is None else head[0]
            if head is not None and head[1] == highest.mac:
                return AnchorStatus("ok")  # as for SQLite: the chain names what is below
            try:
                lost = self._journal_lost(conn, head_seq, [highest])
                if lost:
                    lost = self._journal_lost(conn, head_seq)
            except AnchorCorruptError as exc:
                return AnchorStatus("corrupt", exc.message + _REJOURNAL_HINT, exc.message)
        if not lost:
            return AnchorStatus("ok")
        last = lost[-1].seq
        certificates = sum(1 for event in lost if event.issued_certificate)
        held = f"this host's journal {journal.path.name} holds {len(lost)} of them"
        if lost[0].seq > head_seq:
            detail = (
                f"audit events {head_seq + 1}..{last} ({certificates} issued certificates "
                f"among them) are missing from the store; {held}"
            )
            message = (
                f"The store is behind this host's audit journal: {detail}. The database "
                "lost its latest writes (a failover to a replica that lagged, an older "
                "backup restored); pkigate does not serve or write from it here. Run "
                "`pkigate audit recover` on this host to put back what its journal holds "
                "(audited), and on every other host that wrote to this database: events "
                "only other hosts wrote are in their journals, not in this one."
            )
            return AnchorStatus("store-behind", message, detail, head_seq + 1, last, certificates)
        detail = (
            f"{len(lost)} audit events this host committed, {lost[0].seq}..{last} "
            f"({certificates} issued certificates among them), are not the store's: it "
            "lost them and other events took their numbers"
        )
        message = (
            f"The store does not match this host's audit journal {journal.path.name}: "
            f"{detail}. pkigate does not serve or write from it here. Run `pkigate audit "
            "recover` on this host to put back their certificates and revocations (audited; "
            "the events stay in the journal), and on every other host that wrote to this "
            "database."
        )
        return AnchorStatus("diverged", message, detail, lost[0].seq, last, certificates)

    def _journal_lost(
        self, conn: Connection, head_seq: int, events: Iterable[AnchoredEvent] | None = None
    ) -> list[AnchoredEvent]:
        """The journaled events (``events``: every one) the store lost, in order: from the
        highest down, as long as the store ends before it or holds another event at its
        number (what was lost is a suffix of the store's sequence). An event missing
        below the head was deleted, not lost: the chain's verification names that."""
        journaled = {e.seq: e for e in events} if events is not None else self._journaled()
        lost: list[AnchoredEvent] = []
        for seq in sorted(journaled, reverse=True):
            if seq <= head_seq:
                stored = self._store.audit_event(conn, seq)
                if stored is None or stored.mac == journaled[seq].mac:
                    break
            lost.append(journaled[seq])
        lost.reverse()
        return lost

    def _journaled(self) -> dict[int, AnchoredEvent]:
        assert self._journal is not None
        return {event.seq: event for event in self._journal.events()}

    def _missing_message(self) -> str:
        assert self._anchor is not None
        return (
            f"The audit anchor {self._anchor.path} is missing, but the store "
            f"{self._store.sqlite_database} was anchored: without the anchor a lost tail of "
            "the store cannot be detected; pkigate does not serve or write from it. Put "
            "the anchor file back from a backup, or run `pkigate audit reanchor` to start "
            "a new one from the store's current head (audited)."
        )

    def recover(self, actor: Actor, now: datetime) -> RecoveryResult:
        """Put back into the store what its anchor holds and it lost: the audit events
        (unchanged, so the chain verifies), the certificates issued and revocations among
        them; then audit the recovery. Nothing to do is not an error (idempotent)."""
        if self._journal is not None:
            return self._recover_from_journal(actor, now)
        anchor = self._anchor
        if anchor is None:
            raise BadRequestError("an in-memory store has no audit anchor to recover from")
        if not anchor.exists():
            raise StoreIntegrityError(f"there is no audit anchor {anchor.path} to recover from")
        status = self.anchor_status()
        if status.message is not None and status.state != "store-behind":
            raise StoreIntegrityError(status.message)  # nothing in the anchor fits this store
        with self._store.write() as conn:
            locked = self._store.lock_audit_head(conn, GENESIS)
            head_seq, head_mac = (0, GENESIS) if locked is None else locked[:2]
            lost = [e for e in anchor.events() if e.seq > head_seq]
            if not lost:
                return RecoveryResult(0, 0, 0)
            expected = head_seq + 1
            previous = head_mac
            rows = []
            for event in lost:
                row = event_row(event.event)
                if event.seq != expected or row["prev_mac"] != previous:
                    raise StoreIntegrityError(
                        f"the audit anchor does not continue the store's chain at event "
                        f"{expected}; nothing was recovered" + _REANCHOR_HINT
                    )
                record = AuditEventRecord(**row)
                if not self._mac_ok(record, record.seq):
                    raise StoreIntegrityError(
                        f"event {event.seq} in the audit anchor does not verify under the "
                        "audit key; nothing was recovered"
                    )
                rows.append(row)
                expected, previous = event.seq + 1, event.mac
            self._store.append_audit_events(conn, rows, self._head_mac(lost[-1].seq, previous))
            certificates, revocations, not_restored = self._restore_certificates(conn, lost)
            self.record(
                conn,
                actor,
                RECOVERED,
                "audit",
                at=now,
                parameters={
                    "first_seq": lost[0].seq,
                    "last_seq": lost[-1].seq,
                    "certificates": certificates,
                    "revocations": revocations,
                    "not_restored": list(not_restored),
                },
            )
        return RecoveryResult(
            len(rows), certificates, revocations, lost[0].seq, lost[-1].seq, not_restored
        )

    def _recover_from_journal(self, actor: Actor, now: datetime) -> RecoveryResult:
        """PostgreSQL: put back the events this host committed and the store lost. Those
        that continue the store's chain from its head go back at their numbers; the others
        (another host's lost event comes first, or other events took their numbers) stay
        in the journal, which is then kept under another name (a new one starts with the
        recovery), and their certificates and revocations are put back. Audited."""
        journal = self._journal
        assert journal is not None
        status = self.anchor_status()
        if status.state not in ("store-behind", "diverged"):
            if status.message is not None:
                raise StoreIntegrityError(status.message)
            return RecoveryResult(0, 0, 0)
        with self._store.write() as conn:
            locked = self._store.lock_audit_head(conn, GENESIS)
            head_seq, head_mac = (0, GENESIS) if locked is None else locked[:2]
            lost = self._journal_lost(conn, head_seq)
            if not lost:
                return RecoveryResult(0, 0, 0)  # recovered meanwhile by another process
            rows, run = self._chain_run(lost, head_seq, head_mac)
            if rows:
                self._store.append_audit_events(
                    conn, rows, self._head_mac(run[-1].seq, run[-1].mac)
                )
            certificates, revocations, not_restored = self._restore_certificates(conn, lost)
            outside = lost[len(run) :]
            kept = None
            if outside:
                kept = journal.path.with_name(
                    f"{journal.path.name}.superseded-{now.strftime('%Y%m%dT%H%M%S%fZ')}"
                )
                superseded = kept
                # Renamed once committed, before the recovery's own line starts a new one.
                self._store.after_commit(conn, lambda: _rename(journal.path, superseded))
            recovered = AuditEntry(
                actor,
                RECOVERED,
                "audit",
                now,
                parameters={
                    "first_seq": run[0].seq if run else None,
                    "last_seq": run[-1].seq if run else None,
                    "certificates": certificates,
                    "revocations": revocations,
                    "not_restored": list(not_restored),
                    "journal": journal.path.name,
                    "superseded": kept.name if kept else None,
                    # Still only in the journal: (number, event id) of each.
                    "outside_chain": [[e.seq, e.event["event_id"]] for e in outside],
                },
            )
            self.record_many(conn, [recovered], past_journal=True)
        return RecoveryResult(
            len(rows),
            certificates,
            revocations,
            run[0].seq if run else 0,
            run[-1].seq if run else 0,
            not_restored,
            tuple(event.seq for event in outside),
        )

    def _chain_run(
        self, lost: Sequence[AnchoredEvent], head_seq: int, head_mac: str
    ) -> tuple[list[dict[str, Any]], list[AnchoredEvent]]:
        """The first lost events that continue the store's chain from its head, as rows
        (each checked under the audit key)."""
        rows: list[dict[str, Any]] = []
        run: list[AnchoredEvent] = []
        seq, previous = head_seq + 1, head_mac
        for event in lost:
            row = event_row(event.event)
            if event.seq != seq or row["prev_mac"] != previous:
                break
            if not self._mac_ok(AuditEventRecord(**row), seq):
                raise StoreIntegrityError(
                    f"event {seq} in this host's audit journal does not verify under the "
                    "audit key; nothing was recovered"
                )
            rows.append(row)
            run.append(event)
            seq, previous = seq + 1, event.mac
        return rows, run

    def _restore_certificates(
        self, conn: Connection, lost: Sequence[AnchoredEvent]
    ) -> tuple[int, int, tuple[str, ...]]:
        restored, revoked, missing_ca = 0, 0, []
        for event in lost:
            if event.issued_certificate:
                assert event.certificate is not None
                row = certificate_row(event.certificate)
                if self._store.get_certificate(conn, row["ca_id"], row["serial"]) is not None:
                    continue
                if self._store.get_ca(conn, row["ca_id"]) is None:
                    # Its CA was created in the lost range too: its key is not in the anchor.
                    missing_ca.append(f"{row['ca_id']}/{row['serial']}")
                    continue
                self._store.insert_certificate(conn, **{**row, "sans": json.loads(row["sans"])})
                restored += 1
            elif (
                event.event["action"] == "certificate.revoke" and event.event["result"] == "success"
            ):
                parameters = json.loads(event.event["parameters"])
                ca_id = str(event.event["resource"]).removeprefix("ca/")
                record = self._store.get_certificate(conn, ca_id, str(parameters.get("serial")))
                if record is not None and record.status != "REVOKED":
                    self._store.revoke_certificate(
                        conn,
                        record,
                        datetime.fromisoformat(event.event["at"]),
                        parameters.get("reason"),
                    )
                    revoked += 1
        return restored, revoked, tuple(missing_ca)

    def reanchor(self, actor: Actor, now: datetime) -> AnchorStatus:
        """Give up what the anchor holds beyond the store: the old anchor file is kept
        beside it under another name, and a new one starts from the store's head."""
        anchor = self._anchor or self._journal
        if anchor is None:
            raise BadRequestError("an in-memory store has no audit anchor")
        status = self.anchor_status()
        with self._store.write() as conn:
            kept = None
            if anchor.exists():
                kept = anchor.path.with_name(
                    f"{anchor.path.name}.superseded-{now.strftime('%Y%m%dT%H%M%S%fZ')}"
                )
                anchor.path.rename(kept)
            self.record_many(
                conn,
                [
                    AuditEntry(
                        actor,
                        REANCHORED,
                        "audit",
                        now,
                        parameters={
                            "previous_state": status.state,
                            "superseded": kept.name if kept else None,
                            "given_up_from": status.lost_from or None,
                            "given_up_to": status.lost_to or None,
                            "certificates": status.certificates,
                        },
                    )
                ],
                new_anchor=True,
            )
        return status

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
        except StoreUnavailableError:
            # Nothing was done and there is no room to say so: the front-end answers
            # "try again later" and logs it (a signature that was made and then discarded
            # has its own record, written in the storage reserve).
            raise
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

    def verify_chain(self) -> VerificationResult:
        """Walk the chain alone (not its anchor: a backup being restored has none yet) and
        say which events were edited, inserted or deleted."""
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

    def verify(self) -> VerificationResult:
        """Walk the chain and say which events were edited, inserted or deleted, then
        compare it with its audit anchor (events the store lost)."""
        chain = self.verify_chain()
        problems = list(chain.problems)
        anchored = self.anchor_status()
        anchor = self.anchor
        if anchored.trusted and anchor is not None and anchor.exists():
            try:
                for _line in anchor.events():  # every line, not only the last
                    pass
            except AnchorCorruptError as exc:
                anchored = AnchorStatus("corrupt", exc.message, exc.message)
        if not anchored.trusted:
            kinds = {"store-behind": "truncated", "diverged": "edited"}
            kind = kinds.get(anchored.state, "deleted")
            hint = {
                "store-behind": "run `pkigate audit recover` to restore them",
                "diverged": "see `pkigate serve` or /readyz for how to proceed",
            }.get(anchored.state, "restore it, or run `pkigate audit reanchor`")
            problems.append(
                VerificationProblem(anchored.lost_from, kind, f"{anchored.detail}; {hint}")
            )
        return VerificationResult(chain.events, tuple(problems))

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


def _rename(path: Path, to: Path) -> None:
    path.rename(to)


_REJOURNAL_HINT = (
    "; run `pkigate audit reanchor --yes` on this host to start a new journal (audited; the "
    "damaged one is kept beside it)"
)
_REANCHOR_HINT = (
    "; put back the anchor from a backup, or run `pkigate audit reanchor` to start a new one "
    "from the store's head (audited)"
)


def _event_row(event: AuditEventRecord) -> dict[str, Any]:
    return dataclasses.asdict(event)


def _certificate_row(record: CertificateRecord) -> dict[str, Any]:
    row = dataclasses.asdict(record)
    del row["id"]
    row["sans"] = json.dumps(list(record.sans))
    return row


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
