"""After a run: what the server's store must say about what the devices received.

Read from the store itself (``Core.open`` on the server's data directory and database,
reading only), whatever the server said over HTTP:

* every certificate a device received is in the store, byte for byte, under its serial;
* each has exactly one successful ``certificate.issue`` audit event naming its serial;
* no serial appears twice in the store;
* those the devices revoked are REVOKED in the store;
* the audit chain verifies (``core.audit.verify()``): nothing was lost, edited or
  inserted, even when the server was killed in the middle of writing.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select

from pkigate.core import Core
from pkigate.core.store import schema, sqlite_url
from pkigate.devsim.events import ReceivedCertificate

ISSUE_ACTION = "certificate.issue"
CHUNK = 500


@dataclass(frozen=True)
class PostConditions:
    certificates_checked: int
    missing_from_store: tuple[str, ...]
    different_in_store: tuple[str, ...]
    """Serials whose stored DER is not what the device received."""
    without_issue_event: tuple[str, ...]
    with_several_issue_events: tuple[str, ...]
    duplicate_serials: tuple[str, ...]
    """Serials stored more than once (under different CAs), or received by two devices."""
    not_revoked_in_store: tuple[str, ...]
    audit_events: int
    audit_problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not (
            self.missing_from_store
            or self.different_in_store
            or self.without_issue_event
            or self.with_several_issue_events
            or self.duplicate_serials
            or self.not_revoked_in_store
            or self.audit_problems
        )

    def problems(self) -> list[str]:
        found = []
        for label, serials in (
            ("not in the store", self.missing_from_store),
            ("different in the store", self.different_in_store),
            ("without a certificate.issue event", self.without_issue_event),
            ("with several certificate.issue events", self.with_several_issue_events),
            ("serial appears twice", self.duplicate_serials),
            ("revoked by the device but not in the store", self.not_revoked_in_store),
        ):
            if serials:
                found.append(f"{len(serials)} {label}: {', '.join(serials[:5])}")
        found += [f"audit chain: {p}" for p in self.audit_problems]
        return found


def check_store(
    data_dir: Path,
    database_url: str | None,
    received: Mapping[str, ReceivedCertificate],
    duplicate_received: tuple[str, ...] = (),
) -> PostConditions:
    if database_url is None:
        # Named explicitly: PKIGATE_DATABASE_URL in our environment is not the server's.
        if not (data_dir / "pkigate.db").exists():
            raise FileNotFoundError(f"no pkigate store in {data_dir}")
        database_url = sqlite_url(data_dir / "pkigate.db")
    core = Core.open(data_dir, database_url)
    try:
        return _check(core, received, duplicate_received)
    finally:
        core.close()


def _check(
    core: Core, received: Mapping[str, ReceivedCertificate], duplicate_received: tuple[str, ...]
) -> PostConditions:
    table = schema.certificates
    stored: dict[str, list[tuple[bytes, str]]] = {}
    serials = sorted(received)
    with core.store.read() as conn:
        for start in range(0, len(serials), CHUNK):
            chunk = serials[start : start + CHUNK]
            rows = conn.execute(
                select(table.c.serial, table.c.der, table.c.status).where(table.c.serial.in_(chunk))
            ).all()
            for serial, der, status in rows:
                stored.setdefault(str(serial), []).append((bytes(der), str(status)))
        duplicates = conn.execute(
            select(table.c.serial).group_by(table.c.serial).having(func.count() > 1)
        ).scalars()
        duplicate_serials = sorted({str(s) for s in duplicates} | set(duplicate_received))
        issue_events: Counter[str] = Counter()
        audit_events = 0
        for event in core.store.iter_audit_events(conn):
            audit_events += 1
            if event.action == ISSUE_ACTION and event.result == "success":
                serial = json.loads(event.parameters or "{}").get("serial")
                if isinstance(serial, str):
                    issue_events[serial] += 1
    verification = core.audit.verify()
    missing, different, not_revoked = [], [], []
    for serial, certificate in received.items():
        copies = stored.get(serial, [])
        if not copies:
            missing.append(serial)
            continue
        if all(der != certificate.der for der, _ in copies):
            different.append(serial)
        if certificate.revoked and all(status != "REVOKED" for _, status in copies):
            not_revoked.append(serial)
    return PostConditions(
        certificates_checked=len(received),
        missing_from_store=tuple(missing),
        different_in_store=tuple(different),
        without_issue_event=tuple(s for s in received if issue_events[s] == 0),
        with_several_issue_events=tuple(s for s in received if issue_events[s] > 1),
        duplicate_serials=tuple(duplicate_serials),
        not_revoked_in_store=tuple(not_revoked),
        audit_events=audit_events,
        audit_problems=tuple(f"{p.kind} at {p.seq}: {p.detail}" for p in verification.problems),
    )
