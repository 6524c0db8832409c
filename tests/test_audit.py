"""The audit chain detects edited, inserted and deleted events; reports list certificates."""

from __future__ import annotations

import csv
import io
import json
import time
import uuid
from datetime import UTC, datetime

import pytest
from helpers import ACTOR, make_csr
from sqlalchemy import text

from pkigate.core import CAStatus, Core, IssuanceRequest, Requester, Validity
from pkigate.core.audit import render_report, report_rows
from pkigate.core.errors import StoreIntegrityError


@pytest.fixture
def busy_log(core: Core, issuing) -> Core:
    """A log with a dozen events: CA creation, issuances, an update."""
    for _ in range(6):
        core.issue(
            IssuanceRequest(
                issuing.record.id, make_csr(), Validity.parse("30d"), Requester("tester")
            )
        )
    core.authorities.update_status(issuing.record.id, CAStatus.DISABLED, ACTOR)
    core.authorities.update_status(issuing.record.id, CAStatus.ACTIVE, ACTOR)
    return core


def _sql(core: Core, statement: str, **params: object) -> None:
    with core.store.engine.begin() as conn:
        conn.execute(text(statement), params)


def _problems(core: Core) -> list[tuple[int, str]]:
    return [(p.seq, p.kind) for p in core.audit.verify().problems]


def test_untouched_log_verifies(busy_log: Core) -> None:
    result = busy_log.audit.verify()
    assert result.ok and result.events == len(busy_log.audit.events()) >= 12


def test_every_event_names_actor_action_resource_result_and_time(busy_log: Core) -> None:
    for event in busy_log.audit.events():
        assert event.actor and event.action and event.resource and event.result
        assert event.at.tzinfo is not None
        assert json.loads(event.parameters) is not None


def test_edited_event_is_detected_and_named(busy_log: Core) -> None:
    _sql(busy_log, "UPDATE audit_events SET actor = 'someone-else' WHERE seq = 5")
    assert _problems(busy_log) == [(5, "edited")]


def test_edited_parameters_are_detected(busy_log: Core) -> None:
    _sql(busy_log, "UPDATE audit_events SET parameters = '{}' WHERE seq = 7")
    assert _problems(busy_log) == [(7, "edited")]


def test_deleted_event_in_the_middle_is_detected(busy_log: Core) -> None:
    _sql(busy_log, "DELETE FROM audit_events WHERE seq = 6")
    assert _problems(busy_log) == [(6, "deleted")]


def test_deleted_event_with_the_rest_renumbered_is_detected(busy_log: Core) -> None:
    _sql(busy_log, "DELETE FROM audit_events WHERE seq = 4")
    _sql(busy_log, "UPDATE audit_events SET seq = seq - 1 WHERE seq > 4")
    _sql(busy_log, "UPDATE audit_head SET seq = seq - 1")
    problems = _problems(busy_log)
    assert problems == [(4, "deleted")], problems


def test_deleted_tail_is_detected_through_the_chain_head(busy_log: Core) -> None:
    last = len(busy_log.audit.events())
    _sql(busy_log, "DELETE FROM audit_events WHERE seq >= :s", s=last - 1)
    assert _problems(busy_log) == [(last - 1, "deleted")]


def test_a_tail_cut_off_with_the_head_moved_back_is_detected(busy_log: Core, issuing) -> None:
    """Found in review: with write access to the database but not the key, deleting the
    last event and pointing the head at the one before left a log that verified. The head
    is signed now; moving it needs the key. New events do not hide it either."""
    events = busy_log.audit.events()
    last, before_last = events[-1], events[-2]
    _sql(busy_log, "DELETE FROM audit_events WHERE seq = :s", s=last.seq)
    _sql(
        busy_log,
        "UPDATE audit_head SET seq = :s, mac = :m",
        s=before_last.seq,
        m=before_last.mac,
    )
    request = IssuanceRequest(
        issuing.record.id, make_csr(), Validity.parse("1d"), Requester("tester")
    )
    # The anchor outside the database (on PostgreSQL, this host's journal) names the lost
    # event, and nothing is written over it (a new event would take its number).
    assert _problems(busy_log) == [(before_last.seq, "deleted"), (last.seq, "truncated")]
    with pytest.raises(StoreIntegrityError, match=f"audit events {last.seq}..{last.seq}"):
        busy_log.issue(request)
    assert not busy_log.audit.verify().ok


def test_a_store_from_before_signed_heads_gets_its_head_signed(core: Core, issuing) -> None:
    """Schema 0008 adds the head's MAC as NULL; the core signs the head as it finds it."""
    from pkigate.core.audit import AuditLog

    _sql(core, "UPDATE audit_head SET head_mac = NULL")
    assert not core.audit.verify().ok  # an unsigned head is not taken on trust
    AuditLog(core.store, core.kek)  # what opening the store does
    assert core.audit.verify().ok
    assert core.audit.events()[-1].action == "audit.head_signed"
    # Once only (found in review): a head set to NULL again, over a cut-off tail, is not
    # signed at the next open.
    core.issue(
        IssuanceRequest(issuing.record.id, make_csr(), Validity.parse("1d"), Requester("tester"))
    )
    events = core.audit.events()
    _sql(core, "DELETE FROM audit_events WHERE seq = :s", s=events[-1].seq)
    _sql(
        core,
        "UPDATE audit_head SET seq = :s, mac = :m, head_mac = NULL",
        s=events[-2].seq,
        m=events[-2].mac,
    )
    AuditLog(core.store, core.kek)
    assert not core.audit.verify().ok


def test_inserted_event_is_detected(busy_log: Core) -> None:
    events = busy_log.audit.events()
    last = events[-1]
    _sql(
        busy_log,
        "INSERT INTO audit_events (seq, event_id, at, actor, connector, action, "
        "resource, parameters, result, request_id, prev_mac, mac) VALUES (:seq, 'forged', "
        ":at, 'mallory', 'cli', 'certificate.issue', 'ca/x', '{}', 'success', NULL, :prev, "
        ":mac)",
        seq=last.seq + 1,
        at=datetime.now(UTC),
        prev=last.mac,
        mac="0" * 64,
    )
    assert _problems(busy_log) == [(last.seq + 1, "inserted")]


def test_inserted_event_in_the_middle_with_renumbering_is_detected(busy_log: Core) -> None:
    events = busy_log.audit.events()
    _sql(busy_log, "UPDATE audit_events SET seq = seq + 1000 WHERE seq >= 5")
    _sql(busy_log, "UPDATE audit_events SET seq = seq - 999 WHERE seq >= 1005")
    _sql(
        busy_log,
        "INSERT INTO audit_events (seq, event_id, at, actor, connector, action, "
        "resource, parameters, result, request_id, prev_mac, mac) VALUES (5, 'forged', "
        ":at, 'mallory', 'cli', 'ca.update', 'ca/x', '{}', 'success', NULL, :prev, :mac)",
        at=datetime.now(UTC),
        prev=events[3].mac,
        mac="f" * 64,
    )
    _sql(busy_log, "UPDATE audit_head SET seq = seq + 1")
    assert _problems(busy_log) == [(5, "inserted")]


def test_new_events_after_a_detected_tampering_do_not_hide_it(busy_log: Core, issuing) -> None:
    _sql(busy_log, "UPDATE audit_events SET result = 'failure' WHERE seq = 3")
    busy_log.issue(
        IssuanceRequest(issuing.record.id, make_csr(), Validity.parse("1d"), Requester("tester"))
    )
    assert _problems(busy_log) == [(3, "edited")]


def test_report_lists_issued_and_revoked_certificates_in_json_and_csv(
    busy_log: Core, issuing
) -> None:
    with busy_log.store.write() as conn:
        record = busy_log.store.list_certificates(conn, ca_id=issuing.record.id)[0]
        busy_log.store.revoke_certificate(conn, record, datetime.now(UTC), "keyCompromise")
    with busy_log.store.read() as conn:
        rows = report_rows(busy_log.store.list_certificates(conn, ca_id=issuing.record.id))
    data = json.loads(render_report(rows, "json"))
    assert len(data) == 6
    revoked = next(r for r in data if r["serial"] == record.serial)
    assert revoked["revocationReason"] == "keyCompromise" and revoked["revokedAt"]
    assert {
        "serial",
        "subject",
        "notBefore",
        "notAfter",
        "issuedAt",
        "revokedAt",
        "revocationReason",
        "template",
        "requester",
    } <= set(revoked)
    parsed = list(csv.DictReader(io.StringIO(render_report(rows, "csv"))))
    assert [r["serial"] for r in parsed] == [r["serial"] for r in data]
    assert parsed[0]["template"] == "EndEntityCertificate/V1"


def test_event_ids_are_time_ordered_uuids_that_grow_with_the_chain(core: Core, issuing) -> None:
    """Ids unique by an index: ordered by time, each append lands on the index's last
    page instead of a random one (bench/store_scale.py measures the pages written)."""
    for _ in range(3):
        core.issue(
            IssuanceRequest(issuing.record.id, make_csr(), Validity.parse("30d"), Requester("t"))
        )
        time.sleep(0.002)  # the ids order by millisecond; within one they are random
    events = core.audit.events()
    ids = [uuid.UUID(event.event_id) for event in events]
    assert all(i.version == 7 and i.variant == uuid.RFC_4122 for i in ids)
    stamps = [i.int >> 80 for i in ids]
    assert stamps == sorted(stamps) and stamps[-1] > stamps[0]
    now_ms = time.time_ns() // 1_000_000
    assert now_ms - 60_000 < stamps[0] <= stamps[-1] <= now_ms
