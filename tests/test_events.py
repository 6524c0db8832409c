"""Events in the outbox: written with the change that causes them, never without it."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

import pytest
from helpers import ACTOR, Clock, create_root, create_sub, make_csr

from pkigate.core import CASettings, Core, IssuanceRequest, Requester, Validity
from pkigate.core.errors import BadRequestError
from pkigate.core.events import EventType
from pkigate.core.model import CAStatus, RevocationReason
from pkigate.core.revocation import CRL_JOB


def _types(core: Core) -> list[str]:
    return [stored.event.type.value for stored in core.events.list(limit=10_000)]


def _issue(core: Core, ca_id: str, validity: str = "30d", record_with=None):  # type: ignore[no-untyped-def]
    return core.issue(
        IssuanceRequest(
            ca_id,
            make_csr(),
            Validity.parse(validity),
            Requester("alice", "api"),
            record_with=record_with,
        )
    )


def test_issuance_revocation_and_status_changes_are_events(core: Core) -> None:
    root = create_root(core)
    issued = _issue(core, root.record.id)
    core.revocation.revoke(root.record.id, issued.serial, RevocationReason.keyCompromise, ACTOR)
    core.authorities.update_status(root.record.id, CAStatus.DISABLED, ACTOR)
    events = [s.event for s in core.events.list()]
    assert [e.type for e in events] == [
        EventType.CERTIFICATE_ISSUED,
        EventType.CERTIFICATE_REVOKED,
        EventType.CA_STATUS_CHANGED,
    ]
    payload = events[0].payload()
    assert payload["version"] == 1
    assert (payload["ca_id"], payload["serial"]) == (root.record.id, issued.serial)
    assert payload["template"] == "EndEntityCertificate/V1"
    assert payload["data"]["subject"] == "CN=host.example.test"
    assert (payload["data"]["requester"], payload["data"]["connector"]) == ("alice", "api")
    assert events[1].data["reason"] == "keyCompromise"
    assert (events[2].data["from"], events[2].data["to"]) == ("ACTIVE", "DISABLED")
    assert len({e.event_id for e in events}) == 3


def test_a_rolled_back_issuance_emits_nothing(sqlite_core: Core) -> None:
    root = create_root(sqlite_core)
    before = _types(sqlite_core)

    def refuse(_conn, _issued):  # type: ignore[no-untyped-def]
        raise RuntimeError("the front-end could not record its side")

    with pytest.raises(RuntimeError):
        _issue(sqlite_core, root.record.id, record_with=refuse)
    assert _types(sqlite_core) == before
    with sqlite_core.store.read() as conn:
        assert sqlite_core.store.count_certificates(conn, root.record.id) == 0


def test_each_lead_time_is_emitted_once_as_time_passes(sqlite_core: Core, clock: Clock) -> None:
    """A 50-day certificate crosses 45, 30, 7 and 1 days, then expires; a template of its
    own lead times overrides the CA's, and scanning again (or twice) adds nothing."""
    core = sqlite_core
    root = create_root(core, validity=Validity.parse("3650d"))
    ca = create_sub(
        core,
        root,
        settings=CASettings(
            expiry_notice_days=(45, 30, 7, 1),
            expiry_notice_days_by_template={"EndEntityServerAuthCertificate/V1": (10,)},
        ),
    )
    ca_id = ca.record.id
    default = _issue(core, ca_id, "50d")
    server = core.issue(
        IssuanceRequest(
            ca_id,
            make_csr(),
            Validity.parse("50d"),
            Requester("bob"),
            template="EndEntityServerAuthCertificate/V1",
        )
    )
    short = _issue(core, ca_id, "10d")  # never 30 or 45 days from expiry
    seen: Counter[tuple[str, str, int]] = Counter()

    def scan() -> None:
        core.expiry.scan()
        core.expiry.scan()  # a second worker looking at the same moment
        for stored in core.events.list(limit=10_000):
            event = stored.event
            if event.type in (EventType.CERTIFICATE_EXPIRING, EventType.CERTIFICATE_EXPIRED):
                key = (event.type.value, event.serial or "", int(event.data["days_before"]))
                seen[key] = 1

    scan()
    for _day in range(1, 52):
        clock.advance(timedelta(days=1))
        scan()
    expiring, expired = EventType.CERTIFICATE_EXPIRING.value, EventType.CERTIFICATE_EXPIRED.value
    assert set(seen) == {
        *((expiring, default.serial, lead) for lead in (45, 30, 7, 1)),
        (expiring, server.serial, 10),
        *((expiring, short.serial, lead) for lead in (7, 1)),
        (expired, default.serial, 0),
        (expired, server.serial, 0),
        (expired, short.serial, 0),
    }
    types = Counter(_types(core))
    assert types[expiring] == 7 and types[expired] == 3


def test_a_ca_is_told_to_expire_at_each_lead_time_once_then_expired(
    sqlite_core: Core, clock: Clock
) -> None:
    """A 40-day root crosses 30, 7 and 1 days (it starts inside the 45-day window: that
    one is said at once), then expires; scanning twice at each moment adds nothing."""
    core = sqlite_core
    ca_id = create_root(core, validity=Validity.parse("40d")).record.id
    seen: Counter[tuple[str, int]] = Counter()
    for _day in range(42):
        core.expiry.scan()
        core.expiry.scan()  # a second worker looking at the same moment
        clock.advance(timedelta(days=1))
    for stored in core.events.list(limit=10_000):
        event = stored.event
        if event.type in (EventType.CA_EXPIRING, EventType.CA_EXPIRED):
            assert event.ca_id == ca_id
            seen[event.type.value, int(event.data["days_before"])] += 1
    expiring, expired = EventType.CA_EXPIRING.value, EventType.CA_EXPIRED.value
    assert seen == Counter({(expiring, 45): 1, (expiring, 30): 1, (expiring, 7): 1,
                            (expiring, 1): 1, (expired, 0): 1})  # fmt: skip


def test_a_revoked_certificate_is_not_told_to_expire(sqlite_core: Core, clock: Clock) -> None:
    root = create_root(sqlite_core)
    issued = _issue(sqlite_core, root.record.id, "40d")
    sqlite_core.revocation.revoke(root.record.id, issued.serial, RevocationReason.superseded, ACTOR)
    clock.advance(timedelta(days=20))
    assert sqlite_core.expiry.scan() == 0


def test_a_crl_job_that_fails_emits_crl_publish_failed(sqlite_core: Core) -> None:
    root = create_root(sqlite_core, settings=CASettings(crl_url="http://pki.test/root.crl"))
    job = sqlite_core.revocation.job_handlers()[CRL_JOB]
    with pytest.raises(BadRequestError):  # a COMPLETE CA has no partition 3
        job({"ca_id": root.record.id, "partition": 3})
    (failed,) = [s.event for s in sqlite_core.events.list(types=["crl.publish_failed"])]
    assert failed.ca_id == root.record.id and failed.data["partition"] == 3
    assert "one complete CRL" in failed.data["error"]
