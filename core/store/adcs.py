"""The AD-style connector's SQL: enrollment requests (RequestIDs), pending or decided."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from sqlalchemy import Connection, insert, select, update

from pkigate.core.names import format_dn, format_general_name
from pkigate.core.store import as_utc, schema

MAX_REQUEST_ID = 2**63 - 1  # request ids are 64-bit integers in every dialect

PENDING = "pending"
ISSUED = "issued"
REJECTED = "rejected"
FAILED = "failed"


@dataclass(frozen=True)
class RequestRecord:
    id: int
    connector: str
    template: str
    principal_sid: str
    principal_name: str
    csr_der: bytes
    attributes: tuple[tuple[str, str], ...]
    status: str
    ca_id: str | None
    serial: str | None
    reason: str | None
    decided_by: str | None
    created_at: datetime
    updated_at: datetime
    names_from_directory: bool | None = None

    def to_json(self) -> dict[str, Any]:
        def stamp(moment: datetime) -> str:
            return moment.isoformat().replace("+00:00", "Z")

        return {
            "request_id": self.id,
            "template": self.template,
            "principal": self.principal_name,
            "sid": self.principal_sid,
            # What the request asks for, so that an approver sees it: the certificate
            # takes these only where the template lets the enrollee supply the subject.
            **_requested_names(self.csr_der),
            "status": self.status,
            "ca_id": self.ca_id,
            "serial": self.serial,
            "reason": self.reason,
            "decided_by": self.decided_by,
            "received_at": stamp(self.created_at),
            "updated_at": stamp(self.updated_at),
        }


def _requested_names(csr_der: bytes) -> dict[str, Any]:
    try:
        csr = x509.load_der_x509_csr(csr_der)
        subject = format_dn(csr.subject)
        try:
            sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            sans = x509.SubjectAlternativeName([])
        names = [format_general_name(n) for n in sans]
    except ValueError:  # stored requests were parsed when received; defensive only
        return {"requested_subject": None, "requested_sans": []}
    return {"requested_subject": subject, "requested_sans": names}


def _record(row: Any) -> RequestRecord:
    created = as_utc(row.created_at)
    updated = as_utc(row.updated_at)
    assert created is not None and updated is not None
    return RequestRecord(
        row.id,
        row.connector,
        row.template,
        row.principal_sid,
        row.principal_name,
        bytes(row.csr_der),
        tuple((str(k), str(v)) for k, v in json.loads(row.attributes)),
        row.status,
        row.ca_id,
        row.serial,
        row.reason,
        row.decided_by,
        created,
        updated,
        None if row.names_from_directory is None else bool(row.names_from_directory),
    )


def insert_request(
    conn: Connection,
    *,
    connector: str,
    template: str,
    principal_sid: str,
    principal_name: str,
    csr_der: bytes,
    attributes: Sequence[tuple[str, str]],
    status: str,
    now: datetime,
) -> int:
    result = conn.execute(
        insert(schema.adcs_requests)
        .values(
            connector=connector,
            template=template,
            principal_sid=principal_sid,
            principal_name=principal_name,
            csr_der=csr_der,
            attributes=json.dumps([list(a) for a in attributes]),
            status=status,
            created_at=now,
            updated_at=now,
        )
        .returning(schema.adcs_requests.c.id)
    )
    return int(result.scalar_one())


def get_request(conn: Connection, connector: str, request_id: int) -> RequestRecord | None:
    c = schema.adcs_requests.c
    row = conn.execute(
        select(schema.adcs_requests).where(c.id == request_id, c.connector == connector)
    ).first()
    return None if row is None else _record(row)


def requests_with_status(conn: Connection, connector: str, status: str) -> list[RequestRecord]:
    c = schema.adcs_requests.c
    rows = conn.execute(
        select(schema.adcs_requests)
        .where(c.connector == connector, c.status == status)
        .order_by(c.id)
    ).all()
    return [_record(row) for row in rows]


def settle_request(
    conn: Connection,
    request_id: int,
    now: datetime,
    *,
    status: str,
    expected_status: str,
    ca_id: str | None = None,
    serial: str | None = None,
    reason: str | None = None,
    decided_by: str | None = None,
    names_from_directory: bool = False,
) -> bool:
    """Move a request out of ``expected_status``; False when another decision came first."""
    c = schema.adcs_requests.c
    result = conn.execute(
        update(schema.adcs_requests)
        .where(c.id == request_id, c.status == expected_status)
        .values(
            status=status,
            ca_id=ca_id,
            serial=serial,
            reason=reason,
            decided_by=decided_by,
            updated_at=now,
            names_from_directory=names_from_directory,
        )
    )
    return result.rowcount == 1


def issued_request(
    conn: Connection, connector: str, ca_id: str, serial: str
) -> RequestRecord | None:
    """The request of ``connector`` that the certificate (``ca_id``, ``serial``) answered."""
    c = schema.adcs_requests.c
    row = conn.execute(
        select(schema.adcs_requests).where(
            c.connector == connector, c.ca_id == ca_id, c.serial == serial, c.status == ISSUED
        )
    ).first()
    return None if row is None else _record(row)
