"""Revocation: revoking certificates and publishing CRLs (complete or partitioned).

A revocation commits together with the CRL regeneration job it triggers and with the
removal of any cached OCSP response for that certificate, so relying parties never see a
stale "good" after the revocation is acknowledged (beyond the regeneration delay for CRLs).

CRLs are built in one pass: every entry is handed to the builder at construction, since
appending entries one by one is quadratic in ``cryptography``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtensionOID

from pkigate.core import crl as crl_der
from pkigate.core.audit import Actor, AuditLog
from pkigate.core.authorities import (
    AuthorityService,
    CASettings,
    SigningMaterial,
    effective_status,
)
from pkigate.core.errors import (
    BadRequestError,
    CANotActiveError,
    ConflictError,
    InvalidStateError,
    NotFoundError,
    StoreUnavailableError,
)
from pkigate.core.events import Event, EventLog, EventType
from pkigate.core.jobs import JobHandler, JobQueue
from pkigate.core.model import CAStatus, CertificateStatus, RevocationReason
from pkigate.core.signing import builder_key
from pkigate.core.store import CertificateRecord, CRLRecord, IntegrityError, Store
from pkigate.core.store import ocsp as ocsp_store

log = logging.getLogger("pkigate.revocation")
CRL_JOB = "crl.generate"
MAX_CRL_PARTITION = 2**31 - 1  # the partition column's range
CRL_CACHE_BYTES = 128 * 2**20  # published CRLs kept per process (a million entries: ~40 MiB)
# A disabled CA issues nothing, and an expired one can issue nothing valid, but what they
# issued can still be revoked: their CRLs go on (as their OCSP answers do).
_PUBLISHING = (CAStatus.ACTIVE, CAStatus.DISABLED, CAStatus.EXPIRED)
SYSTEM = Actor("system:revocation", "core")


def parse_reason(value: str) -> RevocationReason:
    try:
        return RevocationReason(value)
    except ValueError:
        allowed = ", ".join(r.value for r in RevocationReason)
        raise BadRequestError(
            f"unknown revocation reason {value!r}; use one of {allowed}"
        ) from None


# A CRL as published: the store's record of it.
PublishedCRL = CRLRecord


class RevocationService:
    def __init__(
        self,
        store: Store,
        authorities: AuthorityService,
        audit: AuditLog,
        jobs: JobQueue,
        clock: Callable[[], datetime],
        events: EventLog,
    ) -> None:
        self._store = store
        self._authorities = authorities
        self._audit = audit
        self._jobs = jobs
        self._clock = clock
        self._events = events
        self._crl_cache: dict[tuple[str, int], PublishedCRL] = {}
        self._crl_cache_lock = threading.Lock()

    # -- revoke --------------------------------------------------------------------------

    def revoke(
        self, ca_id: str, serial: str, reason: RevocationReason, actor: Actor
    ) -> CertificateRecord:
        now = self._clock()
        with self._audit.refusals(
            actor, "certificate.revoke", f"ca/{ca_id}", now, serial=serial, reason=reason.value
        ):
            return self._revoke(ca_id, serial, reason, actor, now)

    def _revoke(
        self, ca_id: str, serial: str, reason: RevocationReason, actor: Actor, now: datetime
    ) -> CertificateRecord:
        ca = self._authorities.get(ca_id)
        settings = CASettings.from_json(ca.settings)
        status = effective_status(ca, now)
        if status not in _PUBLISHING:
            raise CANotActiveError(
                f"CA {ca_id} is {status.value}: it publishes no CRL or OCSP answer that could "
                "carry the revocation"
            )
        if (
            ca.certificate_der is not None
            and format(x509.load_der_x509_certificate(ca.certificate_der).serial_number, "x")
            == serial
            and ca.type == "ROOT"
        ):
            raise InvalidStateError("a root's own certificate cannot be revoked")
        with self._store.write() as conn:
            record = self._store.get_certificate(conn, ca_id, serial)
            if record is None:
                raise NotFoundError(f"CA {ca_id} has issued no certificate with serial {serial}")
            if record.status == CertificateStatus.REVOKED.value:
                raise ConflictError(
                    f"certificate {serial} was already revoked at "
                    f"{record.revoked_at.isoformat() if record.revoked_at else '?'} "
                    f"({record.revocation_reason})"
                )
            self._store.revoke_certificate(conn, record, now, reason.value)
            self._store.delete_ocsp_response(conn, ca_id, serial)
            self._retire_revoked_signer(conn, ca_id, record, reason, actor, now)
            if settings.crl_enabled:
                partition = record.crl_partition if settings.partitioned else 0
                self.schedule_crl(
                    ca_id,
                    partition or 0,
                    now + timedelta(seconds=settings.crl_regenerate_delay_seconds),
                    conn=conn,
                )
            self._audit.record(
                conn,
                actor,
                "certificate.revoke",
                f"ca/{ca_id}",
                at=now,
                parameters={"serial": serial, "reason": reason.value, "subject": record.subject},
            )
            self._events.emit(
                conn,
                [
                    Event(
                        EventType.CERTIFICATE_REVOKED,
                        now,
                        ca_id=ca_id,
                        serial=serial,
                        template=record.template,
                        data={
                            "subject": record.subject,
                            "sans": list(record.sans),
                            "reason": reason.value,
                            "revoked_by": actor.principal,
                            "requester": record.requester,
                            "not_after": record.not_after,
                        },
                    )
                ],
            )
            updated = self._store.get_certificate(conn, ca_id, serial)
        assert updated is not None
        return updated

    def _retire_revoked_signer(
        self,
        conn: Any,
        ca_id: str,
        record: CertificateRecord,
        reason: RevocationReason,
        actor: Actor,
        now: datetime,
    ) -> None:
        """A revoked certificate that signs here stops signing: a CA below certified by it
        is DISABLED (and stays so while it is revoked, see ``update_status``), and a
        revoked OCSP responder certificate is replaced at the next request (it carries
        id-pkix-ocsp-nocheck, so no client could ever notice its revocation). The CA's
        cached responses, signed by that responder, are dropped with it."""
        for below in self._store.list_cas(conn):
            if below.certificate_der != record.der:
                continue
            values: dict[str, Any] = {"updated_at": now}
            if below.status == CAStatus.ACTIVE.value:
                values["status"] = CAStatus.DISABLED.value
            self._store.update_ca(conn, below.id, **values)
            self._audit.record(
                conn,
                actor,
                "ca.update",
                f"ca/{below.id}",
                at=now,
                parameters={
                    "status": values.get("status", below.status),
                    "from": below.status,
                    "why": "its certificate was revoked",
                    "issuer": ca_id,
                    "serial": record.serial,
                    "reason": reason.value,
                },
            )
        if ocsp_store.is_responder_certificate(conn, ca_id, record.der):
            # A new version of the CA makes every process look its responder up again.
            self._store.update_ca(conn, ca_id, updated_at=now)
            ocsp_store.delete_cached_responses(conn, ca_id)

    # -- CRLs ----------------------------------------------------------------------------

    def schedule_crl(self, ca_id: str, partition: int, run_at: datetime, conn: Any = None) -> None:
        self._jobs.enqueue(
            CRL_JOB,
            {"ca_id": ca_id, "partition": partition},
            run_at=run_at,
            dedupe_key=f"crl:{ca_id}:{partition}",
            conn=conn,
        )

    def job_handlers(self) -> dict[str, JobHandler]:
        return {CRL_JOB: self._crl_job}

    def _crl_job(self, payload: dict[str, Any]) -> None:
        ca_id, partition = str(payload["ca_id"]), int(payload["partition"])
        try:
            self.generate_crl(ca_id, partition)
        except Exception as exc:
            # Nothing was stored for the CRL: the event stands alone. The job is retried.
            self._events.emit_alone(
                Event(
                    EventType.CRL_PUBLISH_FAILED,
                    self._clock(),
                    ca_id=ca_id,
                    data={"partition": partition, "error": str(exc)[:500]},
                )
            )
            raise

    def partitions(self, ca_id: str) -> list[int]:
        """The partitions a CA has CRLs for: [0] when complete, [1..n] when partitioned."""
        settings = CASettings.from_json(self._authorities.get(ca_id).settings)
        if not settings.partitioned:
            return [0]
        with self._store.read() as conn:
            current = self._store.current_crl_partition(conn, ca_id)
        return list(range(1, (current or 1) + 1))

    def generate_crl(
        self, ca_id: str, partition: int = 0, *, reuse_fresh: bool = False
    ) -> PublishedCRL:
        """Build, sign, store and audit the next CRL for one partition (0: complete).

        With ``reuse_fresh``, a CRL that another process published meanwhile and that has
        not lapsed is returned instead of building on it (concurrent first requests)."""
        now = self._clock()
        status = effective_status(self._authorities.get(ca_id), now)
        if status not in _PUBLISHING:
            raise CANotActiveError(f"CA {ca_id} is {status.value}: it publishes no CRLs")
        material = self._authorities.signing_material(ca_id, now, require_active=False)
        settings = material.settings
        if not settings.crl_enabled:
            raise InvalidStateError(f"CA {ca_id} does not publish CRLs")
        if settings.partitioned and partition < 1:
            raise BadRequestError("a PARTITIONED CA's CRLs are numbered from 1")
        if not settings.partitioned and partition != 0:
            raise BadRequestError("this CA publishes one complete CRL (partition 0)")
        # Read and sign outside the write transaction (a million-entry CRL takes seconds
        # and SQLite has one writer); the number is re-checked when the CRL is stored.
        for _attempt in range(3):
            with self._store.read() as conn:
                previous = self._store.latest_crl_numbering(conn, ca_id, partition)
                fresh = reuse_fresh and previous is not None and previous.next_update > now
                if not fresh:
                    # An entry stays until one CRL has been published after its certificate
                    # expired.
                    keep_after = previous.this_update if previous else None
                    entries, joined = self._store.crl_entries(
                        conn, ca_id, partition if settings.partitioned else None, keep_after
                    )
            if fresh:
                served = self.latest_crl(ca_id, partition)
                if served is not None:
                    return served
                continue  # gone meanwhile (its CA purged): the next attempt finds out
            number = (previous.number + 1) if previous else 1
            this_update = now.replace(microsecond=0)
            next_update = this_update + timedelta(days=settings.crl_validity_days)
            # A CRL the store cannot keep is a use of the CA key with no record: not signed.
            self._store.space.check_before_signing()
            der = sign_crl(material, settings, partition, number, this_update, next_update, joined)
            try:
                with self._store.write() as conn:
                    latest = self._store.latest_crl_number(conn, ca_id, partition)
                    if (latest or 0) != number - 1:
                        continue  # another process published meanwhile: build on its CRL
                    self._store.insert_crl(
                        conn,
                        ca_id=ca_id,
                        crl_partition=partition,
                        crl_number=number,
                        this_update=this_update,
                        next_update=next_update,
                        entries=entries,
                        der=der,
                    )
                    self._audit.record(
                        conn,
                        SYSTEM,
                        "crl.sign",
                        f"ca/{ca_id}",
                        at=now,
                        parameters={
                            "partition": partition,
                            "crl_number": number,
                            "entries": entries,
                            "next_update": next_update,
                            "key_id": material.key_id,
                        },
                    )
                    # Regenerate well before nextUpdate even if nothing is revoked meanwhile.
                    self.schedule_crl(
                        ca_id, partition, this_update + (next_update - this_update) / 2, conn=conn
                    )
            except IntegrityError:
                # Another process stored this number first (PostgreSQL takes no write
                # lock up front, so both saw the same latest CRL): build on its CRL.
                continue
            published = PublishedCRL(
                ca_id, partition, number, this_update, next_update, entries, der
            )
            self._remember(published)
            return published
        raise ConflictError(f"CRL for CA {ca_id} partition {partition} keeps changing")

    def latest_crl(self, ca_id: str, partition: int = 0) -> PublishedCRL | None:
        """The latest CRL; its DER (tens of MiB for a million entries) is read from the
        store once per process and CRL number, since a number's CRL never changes."""
        key = (ca_id, partition)
        with self._store.read() as conn:
            number = self._store.latest_crl_number(conn, ca_id, partition)
            if number is None:
                return None
            with self._crl_cache_lock:
                cached = self._crl_cache.get(key)
            if cached is not None and cached.number == number:
                return cached
            latest = self._store.latest_crl(conn, ca_id, partition)
        if latest is not None:
            self._remember(latest)
        return latest

    def _remember(self, published: PublishedCRL) -> None:
        key = (published.ca_id, published.partition)
        with self._crl_cache_lock:
            current = self._crl_cache.pop(key, None)
            if current is not None and current.number > published.number:
                published = current  # a newer one arrived meanwhile
            total = sum(len(c.der) for c in self._crl_cache.values())
            while self._crl_cache and total + len(published.der) > CRL_CACHE_BYTES:
                evicted = self._crl_cache.pop(next(iter(self._crl_cache)))
                total -= len(evicted.der)
            if len(published.der) <= CRL_CACHE_BYTES:
                self._crl_cache[key] = published

    def current_crl(self, ca_id: str, partition: int = 0) -> PublishedCRL:
        """The CRL to serve: the latest, generated now if there is none or it has lapsed.
        Only partitions that exist are served (an anonymous request for partition 777 of a
        partitioned CA must not make the CA key sign a CRL for it)."""
        if not 0 <= partition <= MAX_CRL_PARTITION:
            raise NotFoundError(f"CA {ca_id} has no CRL partition {partition}")
        latest = self.latest_crl(ca_id, partition)
        if latest is not None and latest.next_update > self._clock():
            return latest  # only a partition that exists has CRLs
        if partition not in self.partitions(ca_id):
            raise NotFoundError(f"CA {ca_id} has no CRL partition {partition}")
        try:
            return self.generate_crl(ca_id, partition, reuse_fresh=True)
        except StoreUnavailableError:
            if latest is None:
                raise
            # The next CRL cannot be stored now: the last one is still what the CA says
            # (relying parties judge its nextUpdate themselves).
            log.warning("serving a lapsed CRL: the store is full", extra={"ca_id": ca_id})
            return latest


def sign_crl(
    material: SigningMaterial,
    settings: CASettings,
    partition: int,
    number: int,
    this_update: datetime,
    next_update: datetime,
    entries: bytes,
) -> bytes:
    """The signed CRL's DER listing ``entries`` (revokedCertificates elements joined, as
    :meth:`Store.crl_entries` reads them; see :mod:`pkigate.core.crl` for why they are
    encoded by hand, and when)."""
    extensions = [
        x509.Extension(ExtensionOID.CRL_NUMBER, False, x509.CRLNumber(number)),
        next(
            e for e in material.issued_extensions if e.oid == ExtensionOID.AUTHORITY_KEY_IDENTIFIER
        ),
    ]
    if settings.partitioned:
        url = settings.crl_distribution_url(partition)
        extensions.append(
            x509.Extension(
                ExtensionOID.ISSUING_DISTRIBUTION_POINT,
                True,
                x509.IssuingDistributionPoint(
                    full_name=[x509.UniformResourceIdentifier(url)] if url else None,
                    relative_name=None,
                    only_contains_user_certs=False,
                    only_contains_ca_certs=False,
                    only_some_reasons=None,
                    indirect_crl=False,
                    only_contains_attribute_certs=False,
                ),
            )
        )
    hash_algorithm = material.signing_algorithm.hash_algorithm()
    template = x509.CertificateRevocationListBuilder(
        issuer_name=material.certificate.subject,
        last_update=this_update,
        next_update=next_update,
        extensions=extensions,
    ).sign(builder_key(material.private_key), hash_algorithm)
    tbs, algorithm = crl_der.splice_entries(
        template.public_bytes(serialization.Encoding.DER), entries
    )
    return crl_der.sign_tbs(tbs, algorithm, material.private_key, hash_algorithm)
