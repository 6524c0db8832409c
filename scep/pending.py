"""Pending mode: SCEP requests that wait for an administrator's approval.

A connector with ``pending = true`` authorizes a PKCSReq as usual (by its challenge),
then holds it here and answers CertRep PENDING (RFC 8894 3.3.2); the client polls with
CertPoll. An issuer approves (the certificate is issued through the connector's context,
with the approver in the evidence) or rejects (recorded with the reason); every step is
audited. The queue lives in the ``scep_transactions`` table, so every gateway process and
the command line see the same requests.

Renewals (signed by a certificate this connector issued, for its subject and names) are
not held: the administrator decided when the certificate they renew was issued.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from sqlalchemy import Connection

from pkigate.core import Actor, Requester
from pkigate.core.access import RequestFacts, held_request_facts
from pkigate.core.errors import BadRequestError, ConflictError, NotFoundError, PkigateError
from pkigate.core.events import enrollment_pending
from pkigate.core.issuance import IssuedCertificate
from pkigate.core.store import scep as scep_store
from pkigate.gateways.connectors import ConnectorContext

ISSUED = "ISSUED"
PENDING = "PENDING"
REJECTED = "REJECTED"
# Claimed by one approver while the core issues: a second approver gets a conflict.
APPROVING = "APPROVING"
MAX_REASON_CHARS = 500
# Issuing takes milliseconds: an approval still claimed after this was interrupted.
APPROVAL_STALE = timedelta(seconds=15)


@dataclass(frozen=True)
class PendingRequest:
    """A request waiting for approval, as the API and the command line show it."""

    transaction_id: str
    subject: str
    received_at: datetime
    evidence: dict[str, Any]
    """How the client was authorized (challenge kind and id, client address)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "transaction_id": self.transaction_id,
            "subject": self.subject,
            "received_at": self.received_at.isoformat().replace("+00:00", "Z"),
            "evidence": self.evidence,
        }


class ApprovalQueue:
    """One connector's pending requests."""

    def __init__(self, context: ConnectorContext) -> None:
        self.context = context

    @property
    def _resource(self) -> str:
        return f"connector/{self.context.name}"

    def hold(
        self,
        *,
        transaction_id: str,
        csr_sha256: str,
        csr_der: bytes,
        subject: str,
        evidence: dict[str, Any],
        client: Actor,
        also: Callable[[Connection], None] | None = None,
    ) -> None:
        """Store an authorized request until someone decides on it; ``also`` runs in the
        same transaction (spending the request's one-time challenge)."""
        core = self.context.core
        now = core.clock()
        with core.store.write() as conn:
            if also is not None:
                also(conn)
            scep_store.record_transaction(
                conn,
                connector=self.context.name,
                transaction_id=transaction_id,
                csr_sha256=csr_sha256,
                csr_der=csr_der,
                evidence=json.dumps(evidence, sort_keys=True),
                subject=subject,
                status=PENDING,
                ca_id=None,
                serial=None,
                now=now,
            )
            core.audit.record(
                conn,
                client,
                "scep.pending",
                self._resource,
                result="success",
                parameters={"transaction_id": transaction_id, "subject": subject},
                at=now,
            )
            pending = enrollment_pending(
                now,
                connector=self.context.name,
                request=transaction_id,
                ca_id=self.context.ca_id,
                template=self.context.template,
                subject=subject,
                requester=client.principal,
            )
            core.events.emit(conn, [pending])

    def pending(self) -> list[PendingRequest]:
        with self.context.core.store.read() as conn:
            records = scep_store.transactions_with_status(conn, self.context.name, PENDING)
        return [
            PendingRequest(r.transaction_id, r.subject, r.created_at, json.loads(r.evidence))
            for r in records
        ]

    def held_facts(self, transaction_id: str) -> RequestFacts:
        """What deciding on the held request is about (core/access.py): the connector's
        template and validity, and the CSR's names, which its certificate carries."""
        core = self.context.core
        with core.store.read() as conn:
            record = scep_store.get_transaction(conn, self.context.name, transaction_id)
        if record is None:
            raise NotFoundError(f"no SCEP request {transaction_id!r} on {self.context.name}")
        now = core.clock()
        return held_request_facts(
            x509.load_der_x509_csr(record.csr_der),
            template=self.context.template,
            connector=self.context.name,
            validity=self.context.validity.not_after(now) - now,
        )

    def approve(self, transaction_id: str, approver: Actor) -> IssuedCertificate:
        """Issue the held request's certificate; the client collects it with CertPoll."""
        record = self._claim(transaction_id, APPROVING)
        evidence = {**json.loads(record.evidence), "approved_by": approver.principal}
        try:
            issued = self.context.issue(
                record.csr_der,
                Requester(
                    approver.principal,
                    self.context.name,
                    evidence={k: str(v) for k, v in evidence.items()},
                    request_id=approver.request_id,
                ),
                correlation_id=transaction_id,
                # A process that dies between issuing and recording leaves the request
                # APPROVING; recover_interrupted finds the certificate by this token.
                idempotency_token=self._token(transaction_id),
            )
        except PkigateError:
            self._settle(transaction_id, APPROVING, PENDING, record.evidence)
            raise
        self._settle(
            transaction_id,
            APPROVING,
            ISSUED,
            json.dumps(evidence, sort_keys=True),
            serial=issued.serial,
        )
        return issued

    def _token(self, transaction_id: str) -> str:
        digest = hashlib.sha256(f"{self.context.name}\0{transaction_id}".encode()).hexdigest()
        return f"scep-approve-{digest[:48]}"

    def recover_interrupted(
        self, record: scep_store.TransactionRecord
    ) -> scep_store.TransactionRecord:
        """An approval whose process died between issuing and recording the outcome: ISSUED
        with the certificate the core issued under the approval's idempotency token, or
        PENDING again (to be approved once more) if nothing was issued."""
        core = self.context.core
        now = core.clock()
        if (
            record.status != APPROVING
            or record.updated_at is None
            or now - record.updated_at < APPROVAL_STALE
        ):
            return record
        with core.store.write() as conn:
            issued = core.issuer.issued_under(
                conn,
                self.context.ca_id,
                self._token(record.transaction_id),
                record.created_at - timedelta(minutes=1),
            )
            scep_store.settle_transaction(
                conn,
                connector=self.context.name,
                transaction_id=record.transaction_id,
                from_status=APPROVING,
                status=ISSUED if issued is not None else PENDING,
                evidence=record.evidence,
                ca_id=issued.ca_id if issued is not None else None,
                serial=issued.serial if issued is not None else None,
                now=now,
            )
            recovered = scep_store.get_transaction(conn, self.context.name, record.transaction_id)
        assert recovered is not None
        return recovered

    def reject(self, transaction_id: str, approver: Actor, reason: str) -> PendingRequest:
        """Refuse the held request; the client's next CertPoll gets FAILURE badRequest."""
        reason = reason.strip()
        if not reason or len(reason) > MAX_REASON_CHARS:
            raise BadRequestError(f"a reason of 1 to {MAX_REASON_CHARS} characters is needed")
        record = self._claim(transaction_id, REJECTED)
        evidence = {
            **json.loads(record.evidence),
            "rejected_by": approver.principal,
            "rejection_reason": reason,
        }
        core = self.context.core
        now = core.clock()
        with core.store.write() as conn:
            scep_store.settle_transaction(
                conn,
                connector=self.context.name,
                transaction_id=transaction_id,
                from_status=REJECTED,
                status=REJECTED,
                evidence=json.dumps(evidence, sort_keys=True),
                ca_id=None,
                serial=None,
                now=now,
            )
            core.audit.record(
                conn,
                approver,
                "scep.reject",
                self._resource,
                result="success",
                parameters={
                    "transaction_id": transaction_id,
                    "subject": record.subject,
                    "reason": reason,
                },
                at=now,
            )
        return PendingRequest(transaction_id, record.subject, record.created_at, evidence)

    def _claim(self, transaction_id: str, status: str) -> scep_store.TransactionRecord:
        core = self.context.core
        with core.store.write() as conn:
            record = scep_store.get_transaction(conn, self.context.name, transaction_id)
            if record is None:
                raise NotFoundError(f"no SCEP request {transaction_id!r} on {self.context.name}")
            claimed = record.status == PENDING and scep_store.settle_transaction(
                conn,
                connector=self.context.name,
                transaction_id=transaction_id,
                from_status=PENDING,
                status=status,
                evidence=record.evidence,
                ca_id=None,
                serial=None,
                now=core.clock(),
            )
        if not claimed:
            raise ConflictError(
                f"SCEP request {transaction_id!r} is {record.status.lower()}, not pending"
            )
        return record

    def _settle(
        self,
        transaction_id: str,
        from_status: str,
        status: str,
        evidence: str,
        serial: str | None = None,
    ) -> None:
        core = self.context.core
        with core.store.write() as conn:
            scep_store.settle_transaction(
                conn,
                connector=self.context.name,
                transaction_id=transaction_id,
                from_status=from_status,
                status=status,
                evidence=evidence,
                ca_id=self.context.ca_id if serial else None,
                serial=serial,
                now=core.clock(),
            )
