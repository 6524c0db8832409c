"""The one entry point every front-end uses: ``Issuer.issue(IssuanceRequest)``.

verify CSR -> check key -> resolve template (template > API > CSR) -> policy (names,
validity, structure) -> build -> sign -> store + audit in one transaction.
Refusals raise a typed error and are audited; nothing is stored for them.

The transaction is shared with other threads issuing at the same moment (group commit), and
it re-checks that the CA is still ACTIVE and unchanged: a certificate signed with material
that went stale is discarded (and that is audited) and signed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtensionOID
from sqlalchemy import Connection

from pkigate.core.access import (
    AccessDeniedError,
    Action,
    CAFacts,
    PrincipalFacts,
    RequestFacts,
    decide,
)
from pkigate.core.audit import Actor, AuditEntry, AuditLog
from pkigate.core.authorities import (
    MAX_HIERARCHY_DEPTH,
    AuthorityService,
    SigningMaterial,
    check_idempotency_token,
    effective_status,
)
from pkigate.core.errors import (
    AnchorWriteError,
    BadCSRError,
    CANotActiveError,
    IdempotencyConflictError,
    PkigateError,
    PolicyViolationError,
    StoreUnavailableError,
)
from pkigate.core.events import Event, EventLog, EventType
from pkigate.core.groupcommit import GroupCommit
from pkigate.core.model import CAStatus, CertificateStatus, SigningAlgorithm, Validity
from pkigate.core.names import NamePolicy, format_dn, format_general_name
from pkigate.core.passthrough import ApiPassthrough
from pkigate.core.policy import check_contents, check_public_key, compute_validity
from pkigate.core.readable import check_readable
from pkigate.core.signing import sign_certificate
from pkigate.core.store import CertificateRecord, Store
from pkigate.core.templates import Template, TemplateCatalogue, TemplateKind, resolve_contents
from pkigate.core.tenancy import AccessControl

log = logging.getLogger("pkigate.core")

MAX_CSR_BYTES = 32 * 1024
IDEMPOTENCY_WINDOW = timedelta(minutes=5)


@dataclass(frozen=True)
class Requester:
    """Who asks, through which connector, with what authorization evidence.

    ``evidence`` is recorded in the audit event: the ACME account and validated
    identifiers, the SCEP challenge id, the directory principal and its groups.
    """

    principal: str
    connector: str = "cli"
    evidence: Mapping[str, str] = field(default_factory=dict)
    request_id: str | None = None

    @property
    def actor(self) -> Actor:
        return Actor(self.principal, self.connector, self.request_id)


@dataclass(frozen=True)
class IssuanceRequest:
    """What a front-end hands the core.

    ``csr`` may be PEM or DER bytes or an already parsed request; the core verifies its
    signature either way. ``api_passthrough`` carries the names and extensions the
    authorizer vouches for (used only with a template that accepts them).

    ``record_with`` is called inside the transaction that stores the certificate and its
    audit event, with that transaction and the result: what the front-end keeps about
    this issuance (a SCEP transaction, say) commits with the certificate or not at all. If
    it raises, nothing of this issuance is stored and the error reaches the caller.
    """

    ca_id: str
    csr: bytes | x509.CertificateSigningRequest
    validity: Validity
    requester: Requester
    template: str = "EndEntityCertificate/V1"
    api_passthrough: ApiPassthrough | None = None
    signing_algorithm: SigningAlgorithm | None = None
    idempotency_token: str | None = None
    correlation_id: str | None = None
    allowed_names: NamePolicy | None = None
    record_with: Callable[[Connection, IssuedCertificate], None] | None = None
    # The core's own OCSP responder certificate: a DISABLED CA still answers for what it
    # issued, so it may certify its responder (and nothing else) while DISABLED.
    for_ocsp_responder: bool = False
    # The token (and its team) the request is made for: decided against the CA's owner and
    # policy (core/access.py). None: a device enrollment or the CA host's own CLI, which
    # act under the CA owner's authority within their connector's checks.
    principal: PrincipalFacts | None = None


OCSP_RESPONDER_TEMPLATE = "OCSPSigningCertificate/V1"


@dataclass(frozen=True)
class IssuedCertificate:
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # issuing CA first, root last
    record: CertificateRecord

    @property
    def serial(self) -> str:
        return self.record.serial

    def pem(self) -> str:
        return self.certificate.public_bytes(serialization.Encoding.PEM).decode()

    def chain_pem(self) -> str:
        return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in self.chain)


def parse_csr(data: bytes | x509.CertificateSigningRequest) -> x509.CertificateSigningRequest:
    """Parse (PEM or DER, at most 32 KiB) and verify the request's self-signature."""
    if isinstance(data, x509.CertificateSigningRequest):
        csr = data
    else:
        if len(data) > MAX_CSR_BYTES:
            raise BadCSRError(f"CSR is {len(data)} bytes; at most {MAX_CSR_BYTES} accepted")
        try:
            if data.lstrip().startswith(b"-----BEGIN"):
                if (blocks := data.count(b"-----BEGIN")) > 1:
                    # cryptography would read the first and ignore the others.
                    raise BadCSRError(f"{blocks} PEM blocks: send exactly one request")
                csr = x509.load_pem_x509_csr(data)
            else:
                csr = x509.load_der_x509_csr(data)
        except (ValueError, x509.InvalidVersion) as exc:
            raise BadCSRError(f"CSR cannot be parsed: {exc}") from None
    try:
        valid = csr.is_signature_valid
    except Exception as exc:  # unsupported signature algorithms raise from the backend
        raise BadCSRError(f"CSR signature cannot be checked: {exc}") from None
    if not valid:
        raise BadCSRError("CSR signature does not verify")
    check_readable(csr)
    return csr


def csr_der(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.DER)


@dataclass(frozen=True)
class _Prepared:
    """A signed certificate waiting for its transaction."""

    request: IssuanceRequest
    material: SigningMaterial
    certificate: x509.Certificate
    row: dict[str, Any]
    sans: list[str]  # the row's "sans", before JSON encoding
    audit: AuditEntry
    token_hash: str


@dataclass(frozen=True)
class _IssuerFacts:
    """What every certificate takes from the signing CA's certificate, parsed once."""

    material: SigningMaterial
    name: x509.Name
    not_before: datetime
    not_after: datetime


class _StaleAuthority(Exception):
    """The CA changed between signing and committing: sign again with fresh material."""


_RETRIES_ON_STALE = 2
_ISSUING = frozenset({CAStatus.ACTIVE.value})
_RESPONDER_STATES = frozenset({CAStatus.ACTIVE.value, CAStatus.DISABLED.value})


def _inherited_name_constraints(
    material: SigningMaterial, extensions: Sequence[x509.Extension[x509.ExtensionType]]
) -> list[x509.Extension[x509.ExtensionType]]:
    """A CA whose configured name constraints are enforced only by pkigate writes them into
    every CA certificate it issues (critical, RFC 5280 4.2.1.10): otherwise a CA below it,
    run here or elsewhere, could certify any name. Its certificate's own constraints, and
    its issuers', bind every CA below already; ``allow_wildcards`` has no place in the
    extension."""
    policy = material.settings.name_constraints
    constraints = policy.to_extension() if policy is not None else None
    if constraints is None:
        return []
    if any(ext.oid == ExtensionOID.NAME_CONSTRAINTS for ext in extensions):
        raise PolicyViolationError(
            "this CA's name constraints go into the CA certificates it issues; a request "
            "cannot bring nameConstraints of its own"
        )
    return [x509.Extension(constraints.oid, True, constraints)]


class Issuer:
    def __init__(
        self,
        store: Store,
        authorities: AuthorityService,
        templates: TemplateCatalogue,
        audit: AuditLog,
        clock: Callable[[], datetime],
        events: EventLog,
        access: AccessControl,
    ) -> None:
        self._store = store
        self._authorities = authorities
        self._templates = templates
        self._audit = audit
        self._events = events
        self._clock = clock
        self._access = access
        self._commits: GroupCommit[_Prepared, IssuedCertificate] = GroupCommit(self._commit_batch)
        self._issuers: dict[str, _IssuerFacts] = {}

    def _issuer_facts(self, material: SigningMaterial) -> _IssuerFacts:
        """The CA certificate's name and validity, parsed once per signing material."""
        facts = self._issuers.get(material.ca_id)
        if facts is None or facts.material is not material:
            certificate = material.certificate
            facts = _IssuerFacts(
                material,
                certificate.subject,
                certificate.not_valid_before_utc,
                # Nothing issued outlives any CA above it (an imported certificate may).
                min(c.not_valid_after_utc for c in material.chain),
            )
            self._issuers[material.ca_id] = facts
        return facts

    def issue(self, request: IssuanceRequest) -> IssuedCertificate:
        now = self._clock()
        with self._audit.refusals(
            request.requester.actor,
            "certificate.issue",
            f"ca/{request.ca_id}",
            now,
            **{
                **request.requester.evidence,
                "template": request.template,
                "correlation_id": request.correlation_id,
            },
        ):
            for _attempt in range(_RETRIES_ON_STALE):
                prepared = self._prepare(request, now)
                if isinstance(prepared, IssuedCertificate):
                    return prepared
                try:
                    return self._commits.submit(prepared)
                except _StaleAuthority:
                    self._authorities.forget(request.ca_id)
                except Exception as exc:
                    self._audit_discarded(prepared, exc)
                    raise
            raise CANotActiveError(f"CA {request.ca_id} keeps changing; try again")

    def _prepare(self, request: IssuanceRequest, now: datetime) -> _Prepared | IssuedCertificate:
        """Everything but the database: checks, contents, signature."""
        template = self._templates.get(request.template)
        csr = parse_csr(request.csr)
        public_key = csr.public_key()
        check_public_key(public_key)
        if request.for_ocsp_responder:
            if template.name != OCSP_RESPONDER_TEMPLATE:
                raise PolicyViolationError(f"an OCSP responder takes {OCSP_RESPONDER_TEMPLATE}")
            material = self._authorities.signing_material(request.ca_id, now, require_active=False)
            status = effective_status(self._authorities.get(request.ca_id), now)
            if status.value not in _RESPONDER_STATES:
                raise CANotActiveError(f"CA {request.ca_id} is {status.value}")
        else:
            material = self._authorities.cached_signing_material(request.ca_id, now)
        signing_algorithm = request.signing_algorithm or material.signing_algorithm
        signing_algorithm.check_key(material.key_algorithm)
        check_idempotency_token(request.idempotency_token)
        token_hash = _request_hash(request, csr) if request.idempotency_token else ""
        if request.idempotency_token:
            earlier = self._idempotent_result(request, token_hash, now)
            if earlier is not None:
                return earlier

        self._check_template_for_ca(template, material)
        contents = resolve_contents(template, csr, request.api_passthrough, public_key)
        for policy in (*material.name_policies, template.allowed_names, request.allowed_names):
            if policy is not None:
                policy.check(contents.subject, contents.sans)
        issuer = self._issuer_facts(material)
        window = compute_validity(
            request.validity,
            now=now,
            backdate=material.backdate,
            usage_mode=material.usage_mode,
            ca_not_before=issuer.not_before,
            ca_not_after=issuer.not_after,
            truncate_to_ca=material.truncate_validity,
        )
        access = self._decide(
            request,
            material,
            template,
            contents.subject,
            contents.sans,
            window.not_after - now,
            now,
        )
        extensions = list(contents.extensions)
        if contents.sans:
            # RFC 5280 4.2.1.6: with an empty subject the SAN extension must be critical.
            extensions.append(
                x509.Extension(
                    ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
                    not len(contents.subject),
                    x509.SubjectAlternativeName(contents.sans),
                )
            )
        check_contents(contents.subject, contents.sans, extensions)
        ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
        extensions.append(x509.Extension(ski.oid, False, ski))
        extensions += material.issued_extensions
        if template.kind == TemplateKind.SUBORDINATE_CA:
            extensions += _inherited_name_constraints(material, extensions)
        # The last moment to refuse without a trace: once the key signs, the certificate
        # must be stored, or its discard recorded (store/space.py).
        self._store.space.check_before_signing()
        partition = None
        if material.settings.partitioned:
            # The certificate names its CRL partition, so the slot is taken before signing.
            with self._store.write() as conn:
                partition = self._store.reserve_crl_partition(
                    conn, material.ca_id, material.settings.crl_partition_size
                )
            url = material.settings.crl_distribution_url(partition)
            if url:
                cdp = x509.CRLDistributionPoints(
                    [
                        x509.DistributionPoint(
                            [x509.UniformResourceIdentifier(url)], None, None, None
                        )
                    ]
                )
                extensions.append(x509.Extension(cdp.oid, False, cdp))
        if len({ext.oid for ext in extensions}) != len(extensions):
            # The builder's add_extension would refuse this; passing the list skips its check.
            raise PolicyViolationError("the certificate would carry an extension twice")
        # Built in one step from the extension list: add_extension copies the builder and
        # re-checks every extension each time, a cost per certificate for nothing.
        certificate = sign_certificate(
            x509.CertificateBuilder(
                issuer_name=issuer.name,
                subject_name=contents.subject,
                public_key=public_key,
                serial_number=x509.random_serial_number(),
                not_valid_before=window.not_before,
                not_valid_after=window.not_after,
                extensions=extensions,
            ),
            material.private_key,
            signing_algorithm.hash_algorithm(),
        )
        der = certificate.public_bytes(serialization.Encoding.DER)
        serial = format(certificate.serial_number, "x")
        subject = format_dn(contents.subject)
        sans = [format_general_name(n) for n in contents.sans]
        row: dict[str, Any] = {
            "ca_id": material.ca_id,
            "serial": serial,
            "subject": subject,
            "sans": json.dumps(sans),
            "not_before": window.not_before,
            "not_after": window.not_after,
            "issued_at": now,
            "template": template.name,
            "requester": request.requester.principal,
            "connector": request.requester.connector,
            "correlation_id": request.correlation_id,
            "status": CertificateStatus.ISSUED.value,
            "revoked_at": None,
            "revocation_reason": None,
            "fingerprint_sha256": hashlib.sha256(der).hexdigest(),
            "der": der,
            "crl_partition": partition,
            "team": request.principal.team if request.principal else None,
        }
        audit = AuditEntry(
            request.requester.actor,
            "certificate.issue",
            f"ca/{material.ca_id}",
            now,
            parameters={
                "serial": serial,
                "template": template.name,
                "subject": subject,
                "not_after": window.not_after,
                "key_id": material.key_id,
                "signing_algorithm": signing_algorithm.value,
                "correlation_id": request.correlation_id,
                **request.requester.evidence,
                **access,
            },
            certificate=row,
        )
        return _Prepared(request, material, certificate, row, sans, audit, token_hash)

    def _decide(
        self,
        request: IssuanceRequest,
        material: SigningMaterial,
        template: Template,
        subject: x509.Name,
        sans: Sequence[x509.GeneralName],
        validity: timedelta,
        now: datetime,
    ) -> dict[str, Any]:
        """The access decision for a token's request (refused: AccessDeniedError with the
        reason); what the audit event records about it. The policy comes from the cache by
        the material's policy version: no store read on this path."""
        if request.principal is None:
            return {}
        facts = RequestFacts(
            template=template.name,
            subject=subject,
            sans=sans,
            validity=validity,
            connector=request.requester.connector,
            has_names=True,
        )
        decision = decide(request.principal, Action.ISSUE, self._ca_facts(material), facts)
        if not decision.allowed:
            # The cached material may predate a policy change: a refusal is decided again on
            # the stored CA (an allowance made on a stale policy is caught at commit, where
            # the CA's version is checked).
            fresh = self._authorities.signing_material(request.ca_id, now)
            if fresh.version != material.version:
                decision = decide(request.principal, Action.ISSUE, self._ca_facts(fresh), facts)
        if not decision.allowed:
            raise AccessDeniedError(decision.reason)
        # The statement that allowed it, or "owner": the owning team's implicit authority.
        return {"team": request.principal.team, "access": decision.statement_id or "owner"}

    def _ca_facts(self, material: SigningMaterial) -> CAFacts:
        return self._access.facts_of(material.ca_id, material.team, material.policy_version)

    def _audit_discarded(self, prepared: _Prepared, exc: Exception) -> None:
        """The CA key signed, but storing failed (the front-end's ``record_with`` refused,
        or the store did): the signature is audited as discarded. Typed refusals are
        audited by the caller's refusal context already; a full store is not (it has no
        room for that), so its discard is recorded here, in the space of the storage
        reserve (store/space.py)."""
        out_of_space = isinstance(exc, StoreUnavailableError)
        if isinstance(exc, PkigateError) and not out_of_space:
            return
        event = replace(
            prepared.audit,
            result="failure",
            certificate=None,
            parameters={
                **(prepared.audit.parameters or {}),
                "error": exc.code if isinstance(exc, PkigateError) else type(exc).__name__,
                "message": "not stored; certificate discarded",
            },
        )
        try:
            with self._store.write() as conn:
                if out_of_space:
                    # Under the writer lock: no other writer of the store takes this space.
                    self._store.space.release_reserve()
                self._audit.record_many(conn, [event])
        except Exception:
            log.exception(
                "could not audit a discarded certificate",
                extra={"ca_id": prepared.material.ca_id, "serial": prepared.row["serial"]},
            )

    def _commit_batch(self, batch: Sequence[_Prepared]) -> list[IssuedCertificate | BaseException]:
        """Store and audit a batch in one transaction; isolate a failing item."""
        try:
            with self._store.write() as conn:
                return self._store_batch(conn, batch)
        except AnchorWriteError:
            raise  # committed: trying the items again would store them twice
        except Exception:
            if len(batch) == 1:
                raise
        outcomes: list[IssuedCertificate | BaseException] = []
        for prepared in batch:
            try:
                with self._store.write() as conn:
                    outcomes.extend(self._store_batch(conn, [prepared]))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

    def _store_batch(
        self, conn: Connection, batch: Sequence[_Prepared]
    ) -> list[IssuedCertificate | BaseException]:
        states = self._store.ca_states(conn, sorted({p.material.ca_id for p in batch}))
        outcomes: list[IssuedCertificate | BaseException | None] = [None] * len(batch)
        accepted: list[int] = []
        discarded: list[AuditEntry] = []
        for index, prepared in enumerate(batch):
            state = states.get(prepared.material.ca_id)
            allowed = _RESPONDER_STATES if prepared.request.for_ocsp_responder else _ISSUING
            if state is None or state[1] != prepared.material.version or state[0] not in allowed:
                # Signed with material that is no longer current: discard, say so, retry.
                outcomes[index] = _StaleAuthority()
                discarded.append(
                    replace(
                        prepared.audit,
                        result="failure",
                        certificate=None,
                        parameters={
                            **(prepared.audit.parameters or {}),
                            "error": "staleAuthority",
                            "message": "CA changed while signing; certificate discarded",
                        },
                    )
                )
                continue
            token = prepared.request.idempotency_token
            if token:
                earlier = self._store.idempotency_entry(
                    conn, _scope(prepared.request), token, prepared.audit.at - IDEMPOTENCY_WINDOW
                )
                if earlier is not None:
                    # Another request with this token won the race; ours is discarded.
                    outcomes[index] = _StaleAuthority()
                    discarded.append(
                        replace(
                            prepared.audit,
                            result="failure",
                            certificate=None,
                            parameters={
                                **(prepared.audit.parameters or {}),
                                "error": "duplicateToken",
                                "message": "idempotency token committed by a concurrent request; "
                                "certificate discarded",
                            },
                        )
                    )
                    continue
            accepted.append(index)
        ids = self._store.insert_certificates(conn, [batch[i].row for i in accepted])
        for index, record_id in zip(accepted, ids, strict=True):
            prepared = batch[index]
            token = prepared.request.idempotency_token
            if token:
                self._store.put_idempotency_entry(
                    conn,
                    _scope(prepared.request),
                    token,
                    prepared.token_hash,
                    str(record_id),
                    prepared.audit.at,
                    prepared.audit.at - IDEMPOTENCY_WINDOW,
                )
            record = CertificateRecord(id=record_id, **{**prepared.row, "sans": prepared.sans})
            issued = IssuedCertificate(prepared.certificate, prepared.material.chain, record)
            if prepared.request.record_with is not None:
                prepared.request.record_with(conn, issued)
            outcomes[index] = issued
        # One row per certificate, in the batch's transaction and one round trip.
        self._events.emit(conn, [_issued_event(batch[i]) for i in accepted])
        self._audit.record_many(conn, [*(batch[i].audit for i in accepted), *discarded])
        return [o for o in outcomes if o is not None]

    def _check_template_for_ca(self, template: Template, material: SigningMaterial) -> None:
        if template.kind == TemplateKind.ROOT_CA:
            raise PolicyViolationError(
                f"template {template.name} is for self-signed roots; create a ROOT CA instead"
            )
        if template.kind != TemplateKind.SUBORDINATE_CA:
            return
        if len(material.chain) >= MAX_HIERARCHY_DEPTH:
            raise PolicyViolationError(
                f"a hierarchy has at most {MAX_HIERARCHY_DEPTH} levels; this CA is at level "
                f"{len(material.chain)}"
            )
        ca_path_length = material.path_length
        if ca_path_length is not None and (
            template.path_length is None or template.path_length >= ca_path_length
        ):
            raise PolicyViolationError(
                f"this CA has path length {ca_path_length}; it cannot issue a CA certificate "
                f"with {template.name}"
            )

    def issued_under(
        self, conn: Connection, ca_id: str, token: str, since: datetime
    ) -> CertificateRecord | None:
        """The certificate stored under an idempotency token used since ``since``.

        Front-ends record their own outcome (an ACME order, a SCEP transaction) in a
        transaction after the core's: when their process dies between the two, this is how
        they find what the core issued."""
        entry = self._store.idempotency_entry(conn, _ca_scope(ca_id), token, since)
        return None if entry is None else self._store.get_certificate_by_id(conn, int(entry[1]))

    def _idempotent_result(
        self, request: IssuanceRequest, token_hash: str, now: datetime
    ) -> IssuedCertificate | None:
        assert request.idempotency_token is not None
        with self._store.read() as conn:
            entry = self._store.idempotency_entry(
                conn, _scope(request), request.idempotency_token, now - IDEMPOTENCY_WINDOW
            )
            if entry is None:
                return None
            stored_hash, ref = entry
            if stored_hash != token_hash:
                raise IdempotencyConflictError(
                    "this idempotency token was used in the last 5 minutes with different input"
                )
            record = self._store.get_certificate_by_id(conn, int(ref))
        assert record is not None
        material = self._authorities.signing_material(request.ca_id, now, require_active=False)
        return IssuedCertificate(x509.load_der_x509_certificate(record.der), material.chain, record)


def _issued_event(prepared: _Prepared) -> Event:
    row = prepared.row
    return Event(
        EventType.CERTIFICATE_ISSUED,
        row["issued_at"],
        ca_id=row["ca_id"],
        serial=row["serial"],
        template=row["template"],
        data={
            "subject": row["subject"],
            "sans": prepared.sans,
            "not_before": row["not_before"],
            "not_after": row["not_after"],
            "requester": row["requester"],
            "connector": row["connector"],
            "correlation_id": row["correlation_id"],
        },
    )


def _scope(request: IssuanceRequest) -> str:
    return _ca_scope(request.ca_id)


def _ca_scope(ca_id: str) -> str:
    return f"issue:{ca_id}"[:64]


def _request_hash(request: IssuanceRequest, csr: x509.CertificateSigningRequest) -> str:
    digest = hashlib.sha256()
    digest.update(csr_der(csr))
    digest.update(
        json.dumps(
            [
                request.template,
                request.validity.to_json(),
                repr(request.api_passthrough),
                request.signing_algorithm,
                request.requester.principal,
            ],
            default=str,
        ).encode()
    )
    return digest.hexdigest()
