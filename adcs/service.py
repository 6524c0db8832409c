"""AD-style enrollment, free of HTTP: authenticate a directory principal, decide from its
template, issue through the core or hold for approval, and audit every refusal.

The SOAP endpoints (MS-XCEP, MS-WSTEP) and the JSON endpoint in
:mod:`pkigate.adcs.connector` are transports over this.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import Connection

from pkigate.adcs import soap
from pkigate.adcs.directory import DevDirectoryError, DirectoryState
from pkigate.adcs.ldapdir import (
    AuthenticationFailed,
    Directory,
    DirectoryError,
    DirectoryUnavailable,
    InvalidCredentials,
    PrincipalDisabled,
)
from pkigate.adcs.negotiate import KerberosSettings
from pkigate.adcs.policy import (
    Decision,
    EnrollmentRefused,
    RequestContext,
    choose_template,
    decide,
    sid_from_certificate,
)
from pkigate.adcs.principals import DirectorySearchFailed, Principal, PrincipalLookupError
from pkigate.adcs.security import enroll_rights
from pkigate.adcs.templates import KEY_USAGE_NAMES, CertificateTemplate
from pkigate.core import Actor, IssuedCertificate, Requester, Validity
from pkigate.core.access import RequestFacts, held_request_facts
from pkigate.core.errors import (
    BadCSRError,
    ConflictError,
    KeyBackendError,
    NotFoundError,
    PkigateError,
    StoreUnavailableError,
)
from pkigate.core.events import enrollment_pending
from pkigate.core.issuance import parse_csr
from pkigate.core.model import ValidityType
from pkigate.core.names import format_dn
from pkigate.core.store import adcs as adcs_store
from pkigate.gateways.connectors import ConnectorContext

log = logging.getLogger("pkigate.adcs")

ISSUING_TEMPLATE = "BlankEndEntityCertificate_APIPassthrough/V1"


@dataclass(frozen=True)
class AdcsSettings:
    directory_url: str
    base: str | None
    """None: the domain the directory's root DSE names (defaultNamingContext)."""
    bind_dn: str
    bind_password: str
    ca_name: str
    cache_ttl: float
    policy_id: str
    next_update_hours: int
    credentials_file: Path | None = None
    kerberos: KerberosSettings | None = None
    """Set when HTTP Negotiate (Kerberos) is accepted beside passwords and certificates."""


@dataclass(frozen=True)
class Outcome:
    """What a transport answers: a certificate and its chain, or a held request."""

    request_id: int
    status: str  # issued | pending
    certificate: x509.Certificate | None = None
    chain: tuple[x509.Certificate, ...] = ()
    message: str = ""


class AdcsService:
    def __init__(self, context: ConnectorContext, settings: AdcsSettings) -> None:
        self.context = context
        self.settings = settings
        self.name = context.name
        self.core = context.core
        self._directory: Directory | None = None

    @property
    def directory(self) -> Directory:
        """The directory, connected on first use: the development directory's credentials
        may appear after the gateway started (`pkigate adcs dev-directory`)."""
        if self._directory is None:
            bind_dn, password, base = self.settings.bind_dn, self.settings.bind_password, None
            if not bind_dn and self.settings.credentials_file is not None:
                try:
                    state = DirectoryState.from_json(self.settings.credentials_file.read_text())
                except (OSError, DevDirectoryError):
                    raise DirectoryUnavailable(
                        f"no directory credentials at {self.settings.credentials_file}; start "
                        "the development directory with `pkigate adcs dev-directory` or set "
                        "bind_dn and bind_password"
                    ) from None
                bind_dn, password, base = state.admin_dn, state.admin_password, state.base
            base = base or self.settings.base
            if base is None:
                self._directory = Directory.discover(
                    self.settings.directory_url,
                    bind_dn,
                    password,
                    cache_ttl=self.settings.cache_ttl,
                )
            else:
                self._directory = Directory(
                    self.settings.directory_url,
                    base,
                    bind_dn,
                    password,
                    cache_ttl=self.settings.cache_ttl,
                )
        return self._directory

    # -- who is asking ----------------------------------------------------------------------

    def authenticate_password(self, username: str, password: str, address: str) -> Principal:
        try:
            return self.directory.authenticate(username, password)
        except PrincipalDisabled:
            refusal = EnrollmentRefused("accountDisabled", f"account {username[:64]} is disabled")
            self.refuse_audit(f"adcs-client:{address}", "authenticate", refusal)
            raise refusal from None
        except InvalidCredentials:
            self.refuse_audit(
                f"adcs-client:{address}",
                "authenticate",
                EnrollmentRefused("badCredentials", f"wrong credentials for {username[:64]!r}"),
            )
            raise EnrollmentRefused(
                "badCredentials", "the user name or password is wrong", audited=True
            ) from None
        except AuthenticationFailed as exc:
            refusal = EnrollmentRefused("badCredentials", str(exc))
            self.refuse_audit(f"adcs-client:{address}", "authenticate", refusal)
            raise refusal from None

    def authenticate_kerberos(self, client_principal: str, address: str) -> Principal:
        """The account a Kerberos client principal names: ``name@REALM`` with REALM this
        directory's domain and name a sAMAccountName (``alice``, ``WS01$``). The directory
        is asked on every request: a ticket outlives the disabling of its account."""
        name, _, realm = client_principal.rpartition("@")
        domain = self.directory.dns_domain
        refusal: EnrollmentRefused | None = None
        principal: Principal | None = None
        if not name or "/" in name or "\\" in name or realm.casefold() != domain.casefold():
            refusal = EnrollmentRefused(
                "badCredentials",
                f"the Kerberos principal {client_principal[:128]} is not an account of "
                f"{domain.upper()}",
            )
        else:
            try:
                principal = self.directory.principal_by_name(name)
            except DirectorySearchFailed as exc:
                raise DirectoryUnavailable(str(exc)) from None
            except PrincipalLookupError as exc:
                refusal = EnrollmentRefused("badCredentials", str(exc))
            if principal is None and refusal is None:
                refusal = EnrollmentRefused(
                    "badCredentials", f"no account {name[:64]} in the directory"
                )
            elif principal is not None and principal.disabled:
                refusal = EnrollmentRefused(
                    "accountDisabled", f"account {principal.sam_account_name} is disabled"
                )
        if refusal is not None:
            self.refuse_audit(
                f"adcs-client:{address}",
                "authenticate",
                refusal,
                kerberos_principal=client_principal[:128],
            )
            raise refusal
        assert principal is not None
        return principal

    def authenticate_certificate(self, certificate: x509.Certificate, address: str) -> Principal:
        """A TLS client certificate this CA issued, mapped to its principal by the SID in
        its security extension; revoked or expired ones, and disabled principals, refused."""
        serial = format(certificate.serial_number, "x")
        der = certificate.public_bytes(serialization.Encoding.DER)
        with self.core.store.read() as conn:
            record = self.core.store.get_certificate(conn, self.context.ca_id, serial)
        now = self.core.clock()
        refusal: EnrollmentRefused | None = None
        if record is None or record.der != der:
            refusal = EnrollmentRefused(
                "badCertificate", "the client certificate was not issued by this CA"
            )
        elif not self._logs_in(record.ca_id, serial):
            # Only certificates this connector issued with names from the directory name a
            # principal: a SID extension that another way of issuing carried (an API
            # caller's passthrough), or one on a certificate whose subject the request
            # supplied (a kiosk certificate an administrator requested), is not evidence
            # of who holds the key.
            refusal = EnrollmentRefused(
                "badCertificate",
                f"the client certificate was not issued by AD-style enrollment ({self.name}) "
                "with names from the directory",
            )
        elif record.status != "ISSUED":
            refusal = EnrollmentRefused("badCertificate", "the client certificate is revoked")
        elif not record.not_before <= now <= record.not_after:
            refusal = EnrollmentRefused("badCertificate", "the client certificate has expired")
        sid = sid_from_certificate(certificate)
        if refusal is None and sid is None:
            refusal = EnrollmentRefused(
                "badCertificate", "the client certificate carries no SID security extension"
            )
        principal: Principal | None = None
        if refusal is None and sid is not None:
            principal = self._principal_by_sid(sid)
            if principal is None:
                refusal = EnrollmentRefused(
                    "badCertificate", "the certificate's principal no longer exists"
                )
            elif principal.disabled:
                refusal = EnrollmentRefused(
                    "accountDisabled", f"account {principal.sam_account_name} is disabled"
                )
        if refusal is not None:
            self.refuse_audit(f"adcs-client:{address}", "authenticate", refusal, serial=serial)
            raise refusal
        assert principal is not None
        return principal

    def _logs_in(self, ca_id: str, serial: str) -> bool:
        with self.core.store.read() as conn:
            request = adcs_store.issued_request(conn, self.name, ca_id, serial)
        if request is None:
            return False
        if request.names_from_directory is None:
            # Settled before this was recorded: decided by the template as it is now.
            templates = {n.lower(): t for n, t in self.directory.templates().items()}
            template = templates.get(request.template.lower())
            return template is not None and not template.enrollee_supplies_subject
        return request.names_from_directory

    def _principal_by_sid(self, sid: str) -> Principal | None:
        try:
            return self.directory.principal_by_sid(sid)
        except DirectoryError as exc:
            raise DirectoryUnavailable(str(exc)) from None

    # -- templates ----------------------------------------------------------------------------

    def published_templates(self) -> tuple[dict[str, CertificateTemplate], tuple[str, ...]]:
        service = self.directory.enrollment_service(self.settings.ca_name)
        if service is None:
            raise EnrollmentRefused(
                "caNotPublished",
                f"no pKIEnrollmentService {self.settings.ca_name!r} in the directory; run "
                "`pkigate adcs publish`",
            )
        return self.directory.templates(), tuple(service.certificate_templates)

    def templates_for(self, principal: Principal) -> list[tuple[CertificateTemplate, bool, bool]]:
        """(template, may enroll, may autoenroll) for every published template the
        principal holds Enroll on (MS-XCEP: a policy lists what the caller may use)."""
        templates, published = self.published_templates()
        wanted = {p.lower() for p in published}
        found = []
        for template in templates.values():
            if template.name.lower() not in wanted:
                continue
            rights = enroll_rights(template.security_descriptor, principal.token_sids)
            if rights.enroll:
                found.append((template, rights.enroll, rights.autoenroll))
        return sorted(found, key=lambda item: item[0].name)

    def policy_response(
        self, principal: Principal, *, relates_to: str, ces_urls: Mapping[int, str]
    ) -> bytes:
        """MS-XCEP GetPoliciesResponse: the templates this principal may enroll in, and
        this CA with its enrollment URIs."""
        ca_der = self._ca_certificate_der()
        oids: list[soap.PolicyOid] = []
        policy_templates: list[soap.PolicyTemplate] = []
        for template, enroll, autoenroll in self.templates_for(principal):
            # A schema 1 template has no OID of its own: one derived from its name, the same
            # in every process (hash() is salted per process).
            oid = template.oid or _name_oid(template.name)
            reference = len(oids) + 1
            oids.append(
                soap.PolicyOid(
                    value=oid,
                    group=soap.OidGroup.ENROLLMENT_OBJECT,
                    oid_reference_id=reference,
                    default_name=template.display_name or template.name,
                )
            )
            policy_templates.append(
                soap.PolicyTemplate(
                    common_name=template.name,
                    display_name=template.display_name or template.name,
                    template_oid=oid,
                    oid_reference=reference,
                    schema_version=max(1, min(4, template.schema_version)),
                    major_revision=max(1, template.revision),
                    minor_revision=template.minor_revision,
                    validity_seconds=max(1, int(template.validity.total_seconds())),
                    renewal_seconds=max(1, int(template.overlap.total_seconds())),
                    key_spec=1,
                    minimal_key_size=max(1, template.minimal_key_size),
                    key_usage=_key_usage_bits(template.key_usage),
                    enrollment_flags=int(template.enrollment_flags) & 0xFFFFFFFF,
                    name_flags=int(template.name_flags) & 0xFFFFFFFF,
                    private_key_flags=int(template.private_key_flags) & 0xFFFFFFFF,
                    general_flags=int(template.general_flags) & 0xFFFFFFFF,
                    ra_signatures=template.ra_signatures,
                    ekus=template.issued_ekus,
                    permission_enroll=enroll,
                    permission_autoenroll=autoenroll,
                    ca_references=(0,),
                )
            )
        ca = soap.PolicyCA(
            uris=tuple(
                soap.CaUri(url, kind, priority, False)
                for priority, (kind, url) in enumerate(sorted(ces_urls.items()), start=1)
            ),
            certificate_der=ca_der,
            enroll_permission=True,
            ca_reference_id=0,
        )
        return soap.build_get_policies_response(
            relates_to=relates_to,
            policy_id=self.settings.policy_id,
            policy_friendly_name=f"pkigate {self.name}",
            next_update_hours=self.settings.next_update_hours,
            policies_not_changed=False,
            templates=policy_templates,
            cas=[ca],
            oids=oids,
        )

    def _ca_certificate_der(self) -> bytes:
        ca = self.core.authorities.get(self.context.ca_id)
        assert ca.certificate_der is not None
        return bytes(ca.certificate_der)

    def enroll_refused_on_behalf(self, principal: Principal, context: RequestContext) -> Outcome:
        """A CMS-wrapped request (signed by an enrollment agent or a previous certificate).
        pkigate verifies no enrollment-agent signatures, so every template refuses it."""
        refusal = EnrollmentRefused(
            "onBehalfOfRefused",
            "requests signed on behalf of another principal need a template that requires "
            "enrollment agent signatures, and signatures that verify; send a plain PKCS#10",
            attack="ESC3",
        )
        self.refuse_audit(
            f"adcs:{principal.sam_account_name}", "enroll", refusal, template=context.template_name
        )
        raise refusal

    def directory_problem(self) -> str | None:
        """Why the directory cannot be used right now, or None."""
        try:
            self.directory.templates()
        except DirectoryError as exc:
            return str(exc)
        return None

    # -- enrollment ---------------------------------------------------------------------------

    def enroll(
        self,
        principal: Principal,
        csr_der: bytes,
        context: RequestContext,
        address: str,
        *,
        autoenroll: bool = False,
    ) -> Outcome:
        actor = f"adcs:{principal.sam_account_name}"
        try:
            try:
                # The core's own parsing and self-signature check, with its typed refusals
                # (an unknown key algorithm or version field is a refusal, not a crash).
                csr = parse_csr(csr_der)
            except BadCSRError as exc:
                raise EnrollmentRefused("badRequest", f"the PKCS#10: {exc.message}") from None
            templates, published = self.published_templates()
            template = choose_template(csr, context, templates, published)
            decision = decide(template, principal, csr, context, autoenroll=autoenroll)
        except EnrollmentRefused as refusal:
            self.refuse_audit(actor, "enroll", refusal, template=context.template_name)
            raise
        now = self.core.clock()
        with self.core.store.write() as conn:
            request_id = adcs_store.insert_request(
                conn,
                connector=self.name,
                template=template.name,
                principal_sid=principal.sid,
                principal_name=principal.sam_account_name,
                csr_der=csr_der,
                attributes=context.attributes,
                status=adcs_store.PENDING,
                now=now,
            )
            if decision.pending:
                self.core.audit.record(
                    conn,
                    Actor(actor, self.name),
                    "adcs.request.hold",
                    f"connector/{self.name}/request/{request_id}",
                    at=now,
                    parameters={**decision.evidence, "address": address},
                )
                pending = enrollment_pending(
                    now,
                    connector=self.name,
                    request=str(request_id),
                    ca_id=self.context.ca_id,
                    template=template.name,
                    subject=format_dn(csr.subject),
                    requester=principal.sam_account_name,
                )
                self.core.events.emit(conn, [pending])
        if decision.pending:
            log.info(
                "AD-style request held for approval",
                extra={"connector": self.name, "request": request_id, "template": template.name},
            )
            return Outcome(request_id, "pending", message="the request is pending approval")
        return self._issue(request_id, csr, decision, principal, address)

    def _issue(
        self,
        request_id: int,
        csr: x509.CertificateSigningRequest,
        decision: Decision,
        principal: Principal,
        address: str,
        decided_by: str | None = None,
    ) -> Outcome:
        days = max(1, decision.template.validity.days)

        def record(conn: Connection, issued: IssuedCertificate) -> None:
            # In the core's transaction: the request is ISSUED exactly when its
            # certificate is stored.
            if not adcs_store.settle_request(
                conn,
                request_id,
                self.core.clock(),
                status=adcs_store.ISSUED,
                expected_status=adcs_store.PENDING,
                ca_id=self.context.ca_id,
                serial=issued.serial,
                decided_by=decided_by,
                names_from_directory=not decision.template.enrollee_supplies_subject,
            ):
                raise ConflictError(f"request {request_id} was decided meanwhile")

        try:
            issued = self.context.issue(
                csr,
                Requester(
                    f"adcs:{principal.sam_account_name}",
                    self.name,
                    evidence={**decision.evidence, "address": address, "request": str(request_id)},
                ),
                api_passthrough=decision.passthrough,
                correlation_id=f"adcs-request:{request_id}",
                template=ISSUING_TEMPLATE,
                validity=Validity(ValidityType.DAYS, days),
                idempotency_token=f"adcs-request-{self.name}-{request_id}",
                record_with=record,
            )
        except StoreUnavailableError:
            # Nothing issued: the request is settled FAILED if that can still be written
            # (the client asks again later, as a new request).
            with contextlib.suppress(StoreUnavailableError), self.core.store.write() as conn:
                adcs_store.settle_request(
                    conn,
                    request_id,
                    self.core.clock(),
                    status=adcs_store.FAILED,
                    expected_status=adcs_store.PENDING,
                    reason="the CA's storage was full",
                    decided_by=decided_by,
                )
            raise
        except PkigateError as exc:
            # An unreachable CA key (its token away) is the server's problem, retried later.
            code = "keyUnavailable" if isinstance(exc, KeyBackendError) else "issuanceFailed"
            with self.core.store.write() as conn:
                adcs_store.settle_request(
                    conn,
                    request_id,
                    self.core.clock(),
                    status=adcs_store.FAILED,
                    expected_status=adcs_store.PENDING,
                    reason=exc.message,
                    decided_by=decided_by,
                )
            # The core audited its refusal.
            raise EnrollmentRefused(code, exc.message, audited=True) from exc
        log.info(
            "AD-style certificate issued",
            extra={
                "connector": self.name,
                "request": request_id,
                "template": decision.template.name,
                "principal": principal.sam_account_name,
                "serial": issued.serial,
            },
        )
        return Outcome(request_id, "issued", issued.certificate, issued.chain, message="Issued")

    def status(self, principal: Principal, request_id: int) -> Outcome:
        """A request's state, for the principal that made it (QueryTokenStatus)."""
        record = self._stored_request(request_id)
        if record is None or record.principal_sid != principal.sid:
            raise EnrollmentRefused("unknownRequest", f"no request {request_id} of yours")
        if record.status == adcs_store.PENDING:
            return Outcome(record.id, "pending", message="the request is pending approval")
        if record.status != adcs_store.ISSUED or record.serial is None or record.ca_id is None:
            raise EnrollmentRefused(
                "requestDenied", f"request {request_id} was {record.status}: {record.reason or ''}"
            )
        with self.core.store.read() as conn:
            stored = self.core.store.get_certificate(conn, record.ca_id, record.serial)
        assert stored is not None
        certificate = x509.load_der_x509_certificate(stored.der)
        return Outcome(record.id, "issued", certificate, self.chain(record.ca_id), "Issued")

    def chain(self, ca_id: str) -> tuple[x509.Certificate, ...]:
        ca_pem, above = self.core.authorities.certificate_pem(ca_id)
        return tuple(x509.load_pem_x509_certificates((ca_pem + above).encode()))

    # -- approvals ----------------------------------------------------------------------------

    def pending(self) -> list[adcs_store.RequestRecord]:
        with self.core.store.read() as conn:
            return adcs_store.requests_with_status(conn, self.name, adcs_store.PENDING)

    def approve(self, request_id: int, who: Actor) -> Outcome:
        """Issue a held request, deciding again from the directory as it is now (the
        account may have been disabled, or lost its rights, since it asked)."""
        record = self._pending_record(request_id)
        csr = x509.load_der_x509_csr(record.csr_der)
        try:
            principal, decision = self._judge(record, csr)
        except EnrollmentRefused as refusal:
            self._settle(record, adcs_store.REJECTED, who, refusal.message)
            self.refuse_audit(who.principal, "approve", refusal, request=str(request_id))
            raise
        with self.core.store.write() as conn:
            self.core.audit.record(
                conn,
                who,
                "adcs.request.approve",
                f"connector/{self.name}/request/{request_id}",
                at=self.core.clock(),
                parameters={"principal": record.principal_name, "template": record.template},
            )
        return self._issue(
            request_id,
            csr,
            decision,
            principal,
            "approval",
            decided_by=who.principal,
        )

    def _judge(
        self, record: adcs_store.RequestRecord, csr: x509.CertificateSigningRequest
    ) -> tuple[Principal, Decision]:
        """The held request decided again from the directory as it is now."""
        principal = self._principal_by_sid(record.principal_sid)
        if principal is None:
            raise EnrollmentRefused("unknownPrincipal", "the requester no longer exists")
        templates, published = self.published_templates()
        template = choose_template(
            csr,
            RequestContext(template_name=record.template, attributes=record.attributes),
            templates,
            published,
        )
        return principal, decide(
            template, principal, csr, RequestContext(attributes=record.attributes)
        )

    def held_facts(self, request_id: int) -> RequestFacts:
        """What deciding on the held request is about (core/access.py): its template and
        the names and validity its certificate would carry (from the directory for a
        template that does not take the enrollee's names). A request the directory now
        refuses is judged on its CSR's names: approving it fails anyway."""
        record = self._pending_record(request_id)
        csr = x509.load_der_x509_csr(record.csr_der)
        try:
            _, decision = self._judge(record, csr)
        except EnrollmentRefused:
            return held_request_facts(csr, template=record.template, connector=self.name)
        return held_request_facts(
            csr,
            template=record.template,
            connector=self.name,
            validity=timedelta(days=max(1, decision.template.validity.days)),
            subject=decision.passthrough.subject,
            sans=decision.passthrough.sans,
        )

    def reject(self, request_id: int, who: Actor, reason: str) -> adcs_store.RequestRecord:
        record = self._pending_record(request_id)
        self._settle(record, adcs_store.REJECTED, who, reason)
        with self.core.store.read() as conn:
            updated = adcs_store.get_request(conn, self.name, request_id)
        assert updated is not None
        return updated

    def _stored_request(self, request_id: int) -> adcs_store.RequestRecord | None:
        if not 0 < request_id <= adcs_store.MAX_REQUEST_ID:
            return None  # no stored id is that large (the driver would overflow)
        with self.core.store.read() as conn:
            return adcs_store.get_request(conn, self.name, request_id)

    def _pending_record(self, request_id: int) -> adcs_store.RequestRecord:
        record = self._stored_request(request_id)
        if record is None or record.status != adcs_store.PENDING:
            raise NotFoundError(f"no pending request {request_id} on connector {self.name}")
        return record

    def _settle(
        self, record: adcs_store.RequestRecord, status: str, who: Actor, reason: str
    ) -> None:
        now = self.core.clock()
        with self.core.store.write() as conn:
            if not adcs_store.settle_request(
                conn,
                record.id,
                now,
                status=status,
                expected_status=adcs_store.PENDING,
                reason=reason,
                decided_by=who.principal,
            ):
                raise NotFoundError(f"request {record.id} was decided meanwhile")
            self.core.audit.record(
                conn,
                who,
                f"adcs.request.{status}",
                f"connector/{self.name}/request/{record.id}",
                at=now,
                parameters={"reason": reason[:500], "principal": record.principal_name},
            )

    # -- audit -------------------------------------------------------------------------------

    def refuse_audit(
        self, principal: str, operation: str, refusal: EnrollmentRefused, **extra: Any
    ) -> None:
        parameters: dict[str, Any] = {
            "code": refusal.code,
            "reason": refusal.message[:500],
            **{k: v for k, v in extra.items() if v is not None},
        }
        if refusal.attack:
            parameters["attack"] = refusal.attack
        self.core.audit.record_alone(
            Actor(principal, self.name),
            f"adcs.{operation}",
            f"connector/{self.name}",
            result="failure",
            parameters=parameters,
            at=self.core.clock(),
        )
        refusal.audited = True
        log.warning(
            "AD-style request refused",
            extra={
                "connector": self.name,
                "principal": principal,
                "code": refusal.code,
                "attack": refusal.attack,
                "reason": refusal.message[:300],
            },
        )


def load_settings(settings: Mapping[str, Any], context: ConnectorContext) -> AdcsSettings:
    from pkigate.adcs.directory import CREDENTIALS_FILE
    from pkigate.adcs.seed import DEFAULT_BASE
    from pkigate.gateways.connectors import ConnectorSettingsError, unknown_setting

    known = {
        "directory_url",
        "base",
        "bind_dn",
        "bind_password",
        "bind_password_file",
        "credentials_file",
        "ca_name",
        "cache_ttl_seconds",
        "policy_id",
        "next_update_hours",
        "kerberos_keytab",
        "kerberos_service_principal",
    }
    for key in settings:
        if key not in known:
            raise unknown_setting(key, known)

    def text(key: str, default: str | None = None) -> str | None:
        value = settings.get(key, default)
        if value is not None and (not isinstance(value, str) or not value):
            raise ConnectorSettingsError(key, "expected a non-empty string")
        return value

    url = text("directory_url", "ldap://127.0.0.1:1389")
    assert url is not None
    if not url.startswith(("ldap://", "ldaps://")):
        raise ConnectorSettingsError("directory_url", "expected an ldap:// or ldaps:// URL")
    bind_dn = text("bind_dn")
    password = text("bind_password")
    password_file = text("bind_password_file")
    credentials_file: Path | None = None
    base = text("base")
    if password_file is not None:
        try:
            password = Path(password_file).read_text().strip()
        except OSError as exc:
            raise ConnectorSettingsError("bind_password_file", str(exc)) from None
    if bind_dn is None:
        # The development directory (`pkigate adcs dev-directory`) keeps its admin
        # credentials beside its database; by default that is in our data directory.
        credentials_file = Path(
            text("credentials_file")
            or str(context.core.data_dir / "dev-directory" / CREDENTIALS_FILE)
        )
        bind_dn, password = "", ""  # read from the file when the directory is first used
    elif password is None:
        raise ConnectorSettingsError("bind_password", "give bind_password or bind_password_file")
    ttl = settings.get("cache_ttl_seconds", 30)
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 <= ttl <= 3600:
        raise ConnectorSettingsError("cache_ttl_seconds", "expected 0 to 3600")
    hours = settings.get("next_update_hours", 8)
    if isinstance(hours, bool) or not isinstance(hours, int) or not 1 <= hours <= 720:
        raise ConnectorSettingsError("next_update_hours", "expected 1 to 720")
    keytab = text("kerberos_keytab")
    service_principal = text("kerberos_service_principal")
    if (keytab is None) != (service_principal is None):
        raise ConnectorSettingsError(
            "kerberos_keytab" if keytab is None else "kerberos_service_principal",
            "give kerberos_keytab and kerberos_service_principal together",
        )
    return AdcsSettings(
        directory_url=url,
        # The development directory's credentials file names its base; a directory of one's
        # own (bind_dn) names it in its root DSE unless base says otherwise.
        base=base or (None if credentials_file is None else DEFAULT_BASE),
        bind_dn=bind_dn or "",
        bind_password=password or "",
        ca_name=text("ca_name", context.name) or context.name,
        cache_ttl=float(ttl),
        policy_id=text("policy_id", "{" + _uuid_for(context.name) + "}") or "",
        next_update_hours=hours,
        credentials_file=credentials_file,
        kerberos=(
            KerberosSettings(Path(keytab), service_principal)
            if keytab is not None and service_principal is not None
            else None
        ),
    )


def _name_oid(name: str) -> str:
    digest = hashlib.sha256(name.encode()).digest()
    return f"1.3.6.1.4.1.311.21.8.{int.from_bytes(digest[:4], 'big')}"


def _key_usage_bits(names: frozenset[str]) -> int:
    bits = 0
    for bit, name in KEY_USAGE_NAMES.items():
        if name in names:
            bits |= int(bit)
    return bits


def _uuid_for(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"pkigate-adcs-policy:{name}")).upper()


def attributes_from(value: object) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if isinstance(value, Mapping):
        return tuple((str(k), str(v)) for k, v in value.items())
    if isinstance(value, Sequence) and not isinstance(value, str):
        pairs = []
        for item in value:
            if not (isinstance(item, Sequence) and len(item) == 2):
                raise EnrollmentRefused("badRequest", "attributes are [name, value] pairs")
            pairs.append((str(item[0]), str(item[1])))
        return tuple(pairs)
    raise EnrollmentRefused("badRequest", "attributes are an object or [name, value] pairs")
