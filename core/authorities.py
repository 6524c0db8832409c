"""Certificate authorities: creation, lifecycle, bring-your-own-parent, signing material."""

from __future__ import annotations

import hashlib
import logging
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtensionOID
from sqlalchemy import Connection

from pkigate.core.access import DEFAULT_TEAM
from pkigate.core.audit import Actor, AuditLog
from pkigate.core.errors import (
    BadRequestError,
    CANotActiveError,
    IdempotencyConflictError,
    InvalidCertificateError,
    InvalidStateError,
    InvalidValidityError,
    KeyBackendError,
    NotFoundError,
    PkigateError,
    PolicyViolationError,
)
from pkigate.core.events import DEFAULT_EXPIRY_NOTICE_DAYS, Event, EventLog, EventType
from pkigate.core.keys import KeyBackends, KeyStorage
from pkigate.core.model import (
    CAStatus,
    CAType,
    CertificateStatus,
    KeyAlgorithm,
    SigningAlgorithm,
    UsageMode,
    Validity,
    ValidityType,
)
from pkigate.core.names import NamePolicy, check_dn, format_dn
from pkigate.core.signing import CASigningKey, sign_certificate, sign_csr
from pkigate.core.store import CARecord, CertificateRecord, Store
from pkigate.core.templates import key_usage_extension

log = logging.getLogger(__name__)

MAX_HIERARCHY_DEPTH = 5
RESTORE_DAYS_MIN, RESTORE_DAYS_MAX = 7, 30
DEFAULT_ROOT_VALIDITY = Validity(ValidityType.YEARS, 10)
DEFAULT_SUBORDINATE_VALIDITY = Validity(ValidityType.YEARS, 5)
IDEMPOTENCY_WINDOW = timedelta(minutes=5)
MAX_TAGS = 50
INTERRUPTED_CREATION_AFTER = timedelta(minutes=10)
MAX_IDEMPOTENCY_TOKEN = 128  # the idempotency table's column


@dataclass(frozen=True)
class CASettings:
    """Per-CA settings that shape what it issues and how it publishes revocation.

    URLs go into issued certificates when set; ``name_constraints`` is enforced on every
    request (and also read from the CA certificate's own nameConstraints extension).
    CRLs are generated when ``crl_enabled`` (by default: when ``crl_url`` is set); in
    PARTITIONED mode ``crl_url`` must contain ``{partition}``, and each certificate's CRL
    distribution point names the partition its serial was assigned to.
    """

    crl_url: str | None = None
    ocsp_url: str | None = None
    ca_issuers_url: str | None = None
    name_constraints: NamePolicy | None = None
    backdate_seconds: int = 300
    truncate_validity: bool = False
    crl_enabled: bool = None  # type: ignore[assignment]  # None: enabled when crl_url is set
    crl_mode: str = "COMPLETE"
    crl_validity_days: int = 7
    crl_partition_size: int = 100_000
    crl_regenerate_delay_seconds: int = 10
    ocsp_enabled: bool = False
    ocsp_response_validity_seconds: int = 3600
    # certificate.expiring and ca.expiring are emitted this many days before notAfter;
    # a template named here has lead times of its own for what this CA issues with it.
    expiry_notice_days: tuple[int, ...] = DEFAULT_EXPIRY_NOTICE_DAYS
    expiry_notice_days_by_template: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    _KEYS = (
        "crl_url",
        "ocsp_url",
        "ca_issuers_url",
        "name_constraints",
        "backdate_seconds",
        "truncate_validity",
        "crl_enabled",
        "crl_mode",
        "crl_validity_days",
        "crl_partition_size",
        "crl_regenerate_delay_seconds",
        "ocsp_enabled",
        "ocsp_response_validity_seconds",
        "expiry_notice_days",
        "expiry_notice_days_by_template",
    )
    _BOUNDS = {
        "backdate_seconds": (0, 86400),
        "crl_validity_days": (1, 365),
        "crl_partition_size": (1, 10_000_000),
        "crl_regenerate_delay_seconds": (0, 86400),
        "ocsp_response_validity_seconds": (60, 7 * 86400),
    }

    def __post_init__(self) -> None:
        if self.crl_enabled is None:
            object.__setattr__(self, "crl_enabled", bool(self.crl_url))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CASettings:
        unknown = set(data) - set(cls._KEYS)
        if unknown:
            raise BadRequestError(f"unknown CA setting(s): {', '.join(sorted(unknown))}")
        for key in ("crl_url", "ocsp_url", "ca_issuers_url"):
            value = data.get(key)
            if value is not None and (
                not isinstance(value, str)
                or not value.startswith(("http://", "https://", "ldap://"))
            ):
                raise BadRequestError(f"{key} must be an http(s) or ldap URL")
        numbers: dict[str, int] = {}
        for key, (low, high) in cls._BOUNDS.items():
            value = data.get(key)
            if value is None:
                value = getattr(cls, key)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise BadRequestError(f"{key} must be an integer between {low} and {high}")
            numbers[key] = value
        mode = data.get("crl_mode") or "COMPLETE"
        if mode not in ("COMPLETE", "PARTITIONED"):
            raise BadRequestError("crl_mode must be COMPLETE or PARTITIONED")
        crl_url = data.get("crl_url")
        if mode == "PARTITIONED" and crl_url and "{partition}" not in crl_url:
            raise BadRequestError("a PARTITIONED CA's crl_url must contain {partition}")
        if mode == "COMPLETE" and crl_url and "{partition}" in crl_url:
            raise BadRequestError("{partition} in crl_url needs crl_mode PARTITIONED")
        crl_enabled = data.get("crl_enabled")
        constraints = data.get("name_constraints")
        return cls(
            crl_url=crl_url,
            ocsp_url=data.get("ocsp_url"),
            ca_issuers_url=data.get("ca_issuers_url"),
            name_constraints=NamePolicy.from_settings(constraints, "the CA's name constraints")
            if constraints
            else None,
            truncate_validity=bool(data.get("truncate_validity")),
            crl_enabled=bool(crl_url) if crl_enabled is None else bool(crl_enabled),
            crl_mode=mode,
            ocsp_enabled=bool(data.get("ocsp_enabled")),
            expiry_notice_days=_notice_days(
                data.get("expiry_notice_days", DEFAULT_EXPIRY_NOTICE_DAYS), "expiry_notice_days"
            ),
            expiry_notice_days_by_template=_notice_days_by_template(
                data.get("expiry_notice_days_by_template") or {}
            ),
            **numbers,
        )

    def notice_days(self, template: str | None) -> tuple[int, ...]:
        """Lead times in days, longest first, for a certificate of ``template``."""
        if template is not None and template in self.expiry_notice_days_by_template:
            return self.expiry_notice_days_by_template[template]
        return self.expiry_notice_days

    def to_json(self) -> dict[str, Any]:
        return {
            "crl_url": self.crl_url,
            "ocsp_url": self.ocsp_url,
            "ca_issuers_url": self.ca_issuers_url,
            "name_constraints": self.name_constraints.to_settings()
            if self.name_constraints
            else None,
            "backdate_seconds": self.backdate_seconds,
            "truncate_validity": self.truncate_validity,
            "crl_enabled": self.crl_enabled,
            "crl_mode": self.crl_mode,
            "crl_validity_days": self.crl_validity_days,
            "crl_partition_size": self.crl_partition_size,
            "crl_regenerate_delay_seconds": self.crl_regenerate_delay_seconds,
            "ocsp_enabled": self.ocsp_enabled,
            "ocsp_response_validity_seconds": self.ocsp_response_validity_seconds,
            "expiry_notice_days": list(self.expiry_notice_days),
            "expiry_notice_days_by_template": {
                name: list(days) for name, days in self.expiry_notice_days_by_template.items()
            },
        }

    @property
    def partitioned(self) -> bool:
        return self.crl_enabled and self.crl_mode == "PARTITIONED"

    def crl_distribution_url(self, partition: int | None) -> str | None:
        if not self.crl_url or not self.crl_enabled:
            return None
        return (
            self.crl_url.replace("{partition}", str(partition))
            if self.partitioned
            else self.crl_url
        )


_MAX_NOTICE_DAYS = 3650


def _notice_days(value: Any, key: str) -> tuple[int, ...]:
    """A list of distinct lead times (1 to 3650 days), kept longest first."""
    if not isinstance(value, list | tuple) or len(value) > 16:
        raise BadRequestError(f"{key} must be a list of at most 16 numbers of days")
    for day in value:
        if isinstance(day, bool) or not isinstance(day, int) or not 1 <= day <= _MAX_NOTICE_DAYS:
            raise BadRequestError(f"{key}: each lead time is 1 to {_MAX_NOTICE_DAYS} days")
    return tuple(sorted(set(value), reverse=True))


def _notice_days_by_template(value: Any) -> dict[str, tuple[int, ...]]:
    if not isinstance(value, Mapping):
        raise BadRequestError("expiry_notice_days_by_template maps template names to lists")
    return {
        str(name): _notice_days(days, f"expiry_notice_days_by_template[{name}]")
        for name, days in value.items()
    }


@dataclass(frozen=True)
class CASpec:
    """What an operator asks for when creating a CA."""

    type: CAType
    subject: x509.Name
    key_algorithm: KeyAlgorithm = KeyAlgorithm.EC_prime256v1
    signing_algorithm: SigningAlgorithm | None = None
    usage_mode: UsageMode = UsageMode.GENERAL_PURPOSE
    validity: Validity | None = None
    parent_ca_id: str | None = None
    path_length: int | None = None
    settings: CASettings = field(default_factory=CASettings)
    tags: Mapping[str, str] = field(default_factory=dict)
    key_storage: KeyStorage = KeyStorage.SOFTWARE
    team: str = DEFAULT_TEAM  # the owner (core/access.py)

    def fingerprint(self) -> str:
        return hashlib.sha256(
            repr(
                (
                    self.type,
                    format_dn(self.subject),
                    self.key_algorithm,
                    self.signing_algorithm,
                    self.usage_mode,
                    self.validity,
                    self.parent_ca_id,
                    self.path_length,
                    self.settings,
                    sorted(self.tags.items()),
                    self.key_storage,
                    self.team,
                )
            ).encode()
        ).hexdigest()


@dataclass(frozen=True)
class CAView:
    """A CA as the CLI and API show it: the stored record, its tags, its effective status."""

    record: CARecord
    tags: Mapping[str, str]
    status: CAStatus
    key_storage: str = KeyStorage.SOFTWARE.value
    # Where on the token the key is (token_label, label, id): PKCS#11 keys only.
    token_key: Mapping[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        r = self.record

        def iso(moment: datetime | None) -> str | None:
            return moment.isoformat() if moment else None

        return {
            "id": r.id,
            "type": r.type,
            "status": self.status.value,
            "subject": r.subject,
            "key_algorithm": r.key_algorithm,
            "signing_algorithm": r.signing_algorithm,
            "usage_mode": r.usage_mode,
            "parent_id": r.parent_id,
            "not_before": iso(r.not_before),
            "not_after": iso(r.not_after),
            "created_at": iso(r.created_at),
            "updated_at": iso(r.updated_at),
            "restore_until": iso(r.restore_until),
            "failure_reason": r.failure_reason,
            "settings": dict(r.settings),
            "serial": format(x509.load_der_x509_certificate(r.certificate_der).serial_number, "x")
            if r.certificate_der
            else None,
            "tags": dict(self.tags),
            "key_storage": self.key_storage,
            "team": r.team,
            "token_key": dict(self.token_key) if self.token_key else None,
        }


@dataclass(frozen=True)
class SigningMaterial:
    """Everything needed to sign as one ACTIVE CA, parsed once and cached per CA version."""

    ca_id: str
    key_id: str
    key_algorithm: KeyAlgorithm
    signing_algorithm: SigningAlgorithm
    usage_mode: UsageMode
    private_key: CASigningKey  # a software key, or a handle on a token key
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # this CA first, then its issuers up to the root
    path_length: int | None
    name_policies: tuple[NamePolicy, ...]
    backdate: timedelta
    truncate_validity: bool
    issued_extensions: tuple[x509.Extension[x509.ExtensionType], ...]
    # The CA row's updated_at this was built from: issuance re-checks it when it commits.
    version: datetime
    settings: CASettings
    # The owner and policy version (core/access.py): a policy change moves ``version`` too.
    team: str = DEFAULT_TEAM
    policy_version: int = 0


# The core hands a subordinate's CSR to its parent through this (wired by pkigate.core.Core),
# so that the parent's issuance is stored and audited like any other.
SubordinateSigner = Callable[[str, bytes, int, Validity, Actor], tuple[bytes, str]]


def effective_status(record: CARecord, now: datetime) -> CAStatus:
    status = CAStatus(record.status)
    if (
        status in (CAStatus.ACTIVE, CAStatus.DISABLED)
        and record.not_after
        and record.not_after <= now
    ):
        return CAStatus.EXPIRED
    return status


def load_certificates(data: bytes | str | None) -> list[x509.Certificate]:
    """PEM bundle or a single DER certificate."""
    if not data:
        return []
    raw = data.encode() if isinstance(data, str) else data
    try:
        if b"-----BEGIN" in raw:
            return x509.load_pem_x509_certificates(raw)
        return [x509.load_der_x509_certificate(raw)]
    except (ValueError, x509.InvalidVersion) as exc:
        raise InvalidCertificateError(f"cannot parse certificate: {exc}") from None


def _pem(certificates: Sequence[x509.Certificate]) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certificates)


def _public_der(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _path_length(certificate: x509.Certificate) -> tuple[bool, int | None]:
    try:
        bc = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False, None
    return bc.ca, bc.path_length


def _can_sign_certificates(certificate: x509.Certificate) -> bool:
    try:
        ku = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return ku.key_cert_sign


def validate_ca_chain(
    certificate: x509.Certificate, chain: Sequence[x509.Certificate], now: datetime
) -> None:
    """Check that ``certificate`` (a CA's) chains through ``chain`` to a self-signed root.

    ``chain`` runs issuer first. Signatures, CA flags, key usage, validity and every
    issuer's path length are checked, the last counting the CA being imported.
    """
    path = [certificate, *chain]
    if len(path) > MAX_HIERARCHY_DEPTH:
        raise InvalidCertificateError(
            f"a hierarchy has at most {MAX_HIERARCHY_DEPTH} levels; this certificate would "
            f"be at level {len(path)}"
        )
    for index, cert in enumerate(path):
        if not (cert.not_valid_before_utc <= now <= cert.not_valid_after_utc):
            raise InvalidCertificateError(
                f"certificate {format_dn(cert.subject)!r} is not valid now "
                f"({cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d})"
            )
        is_ca, path_length = _path_length(cert)
        if not is_ca or not _can_sign_certificates(cert):
            raise InvalidCertificateError(f"{format_dn(cert.subject)!r} is not a CA certificate")
        # Certificates below this one that are CAs: those between it and the imported CA,
        # plus the imported CA itself.
        if index > 0 and path_length is not None and path_length < index:
            raise InvalidCertificateError(
                f"path length {path_length} of {format_dn(cert.subject)!r} does not allow "
                f"{index} CA certificate(s) below it"
            )
        issuer = path[index + 1] if index + 1 < len(path) else cert
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature):
            what = (
                "is not self-signed"
                if issuer is cert
                else f"is not signed by {format_dn(issuer.subject)!r}"
            )
            raise InvalidCertificateError(
                f"chain does not validate: {format_dn(cert.subject)!r} {what}"
            ) from None


def check_tags(tags: Mapping[str, str]) -> None:
    for key, value in tags.items():
        if not key or len(key) > 128 or len(value) > 256:
            raise BadRequestError("tag keys are 1-128 characters, values at most 256")


def check_idempotency_token(token: str | None) -> None:
    if token is not None and not 1 <= len(token) <= MAX_IDEMPOTENCY_TOKEN:
        raise BadRequestError(f"an idempotency token is 1 to {MAX_IDEMPOTENCY_TOKEN} characters")


class AuthorityService:
    def __init__(
        self,
        store: Store,
        keys: KeyBackends,
        audit: AuditLog,
        clock: Callable[[], datetime],
        events: EventLog,
    ) -> None:
        self._store = store
        self._keys = keys
        self._audit = audit
        self._clock = clock
        self._events = events
        self._cache: dict[str, tuple[datetime, SigningMaterial]] = {}
        self._cache_lock = threading.Lock()
        self.subordinate_signer: SubordinateSigner | None = None

    # -- reading -------------------------------------------------------------------------

    def get(self, ca_id: str) -> CARecord:
        with self._store.read() as conn:
            record = self._store.get_ca(conn, ca_id)
        if record is None:
            raise NotFoundError(f"no CA with id {ca_id}")
        return record

    def describe(self, ca_id: str) -> CAView:
        with self._store.read() as conn:
            record = self._store.get_ca(conn, ca_id)
            if record is None:
                raise NotFoundError(f"no CA with id {ca_id}")
            tags = self._store.tags_of(conn, ca_id)
            return self._view(conn, record, tags, self._clock())

    def _view(
        self, conn: Connection, record: CARecord, tags: Mapping[str, str], now: datetime
    ) -> CAView:
        entry = self._store.key_entry(conn, record.key_id)
        backend, blob = entry if entry is not None else (KeyStorage.SOFTWARE.value, None)
        reference = self._keys.reference(blob)
        return CAView(
            record,
            tags,
            effective_status(record, now),
            key_storage=backend,
            token_key=reference.to_json() if reference else None,
        )

    def list_cas(self, status: CAStatus | None = None) -> list[CAView]:
        now = self._clock()
        with self._store.read() as conn:
            views = [
                self._view(conn, r, self._store.tags_of(conn, r.id), now)
                for r in self._store.list_cas(conn)
            ]
        return [v for v in views if status is None or v.status == status]

    def csr_pem(self, ca_id: str) -> str:
        record = self.get(ca_id)
        if record.csr_der is None:
            raise InvalidStateError(f"CA {ca_id} has no CSR (ROOT CAs are self-signed)")
        csr = x509.load_der_x509_csr(record.csr_der)
        return csr.public_bytes(serialization.Encoding.PEM).decode()

    def certificate_pem(self, ca_id: str) -> tuple[str, str]:
        """The CA's certificate and its chain above it (issuer first), both PEM."""
        record = self.get(ca_id)
        if record.certificate_der is None:
            raise InvalidStateError(f"CA {ca_id} has no certificate yet ({record.status})")
        certificate = x509.load_der_x509_certificate(record.certificate_der)
        return _pem([certificate]), record.chain_pem or ""

    # -- creation ------------------------------------------------------------------------

    def create(self, spec: CASpec, actor: Actor, idempotency_token: str | None = None) -> CAView:
        now = self._clock()
        with self._audit.refusals(actor, "ca.create", "ca/-", now, subject=format_dn(spec.subject)):
            check_idempotency_token(idempotency_token)
            if idempotency_token:
                earlier = self._idempotent_ca(idempotency_token, spec, now)
                if earlier is not None:
                    return self.describe(earlier)
            ca_id = self._create(spec, actor, idempotency_token, now)
        return self.describe(ca_id)

    def _validate_spec(self, spec: CASpec, now: datetime) -> SigningAlgorithm:
        signing = spec.signing_algorithm or SigningAlgorithm.default_for(spec.key_algorithm)
        signing.check_key(spec.key_algorithm)
        self._keys.check_storage(spec.key_storage)
        if not len(spec.subject):
            raise BadRequestError("a CA needs a subject with at least one attribute")
        check_dn(spec.subject)
        if spec.type == CAType.ROOT and spec.parent_ca_id:
            raise BadRequestError("a ROOT CA has no parent")
        if spec.path_length is not None and not 0 <= spec.path_length <= 3:
            raise BadRequestError("path_length must be 0..3 (the catalogue's CA templates)")
        if spec.validity is not None and spec.validity.not_after(now) <= now:
            raise InvalidValidityError("the CA's validity would end before it begins")
        if len(spec.tags) > MAX_TAGS:
            raise BadRequestError(f"at most {MAX_TAGS} tags")
        check_tags(spec.tags)
        return signing

    def _create(self, spec: CASpec, actor: Actor, token: str | None, now: datetime) -> str:
        signing = self._validate_spec(spec, now)
        parent: SigningMaterial | None = None
        if spec.parent_ca_id:
            parent = self.signing_material(spec.parent_ca_id, now)
            self._check_room_below(parent, spec, now)
        ca_id, key_id = str(uuid.uuid4()), uuid.uuid4().hex
        subject_der = spec.subject.public_bytes()
        with self._store.write() as conn:
            if self._store.get_team(conn, spec.team, lock="share") is None:
                raise NotFoundError(f"no team named {spec.team}")
            if token:
                self._claim_token(conn, token, spec, ca_id, now)
            self._store.insert_key(
                conn, key_id, spec.key_storage.value, spec.key_algorithm.value, None, now
            )
            self._store.insert_ca(
                conn,
                id=ca_id,
                type=spec.type.value,
                status=CAStatus.CREATING.value,
                key_id=key_id,
                key_algorithm=spec.key_algorithm.value,
                signing_algorithm=signing.value,
                usage_mode=spec.usage_mode.value,
                subject=format_dn(spec.subject),
                subject_der=subject_der,
                parent_id=spec.parent_ca_id,
                settings=spec.settings.to_json(),
                created_at=now,
                updated_at=now,
                team=spec.team,
            )
            self._store.set_tags(conn, ca_id, spec.tags)
        try:
            blob = self._keys.generate(
                key_id,
                spec.key_algorithm,
                spec.key_storage,
                f"pkigate CA {format_dn(spec.subject)}",
            )
            key = self._keys.load(key_id, blob)
            with self._store.write() as conn:
                self._store.set_key_blob(conn, key_id, blob)
            if spec.type == CAType.ROOT:
                self._self_sign(ca_id, key_id, spec, signing, key, actor, now)
            else:
                csr = self._make_csr(spec, signing, key)
                with self._store.write() as conn:
                    self._store.update_ca(
                        conn,
                        ca_id,
                        status=CAStatus.PENDING_CERTIFICATE.value,
                        csr_der=csr,
                        updated_at=now,
                    )
                    self._audit.record(
                        conn,
                        actor,
                        "ca.create",
                        f"ca/{ca_id}",
                        at=now,
                        parameters=self._create_params(spec, signing, key_id, "csr"),
                    )
                if parent is not None:
                    self._sign_by_parent(ca_id, spec, parent, csr, actor, now)
        except PkigateError as exc:
            self._fail(ca_id, exc.message, now)
            raise
        except Exception as exc:
            self._fail(ca_id, f"{type(exc).__name__}: {exc}", now)
            raise
        return ca_id

    def _create_params(
        self, spec: CASpec, signing: SigningAlgorithm, key_id: str, key_use: str
    ) -> dict[str, Any]:
        return {
            "type": spec.type.value,
            "subject": format_dn(spec.subject),
            "key_algorithm": spec.key_algorithm.value,
            "signing_algorithm": signing.value,
            "usage_mode": spec.usage_mode.value,
            "parent": spec.parent_ca_id,
            "key_id": key_id,
            "key_storage": spec.key_storage.value,
            "key_use": key_use,
            "tags": dict(spec.tags),
            "team": spec.team,
        }

    def _fail(self, ca_id: str, reason: str, now: datetime) -> None:
        with self._store.write() as conn:
            record = self._store.get_ca(conn, ca_id)
            if record is not None and record.status in (
                CAStatus.CREATING.value,
                CAStatus.PENDING_CERTIFICATE.value,
            ):
                self._store.update_ca(
                    conn,
                    ca_id,
                    status=CAStatus.FAILED.value,
                    failure_reason=reason[:1000],
                    updated_at=now,
                )

    def _check_room_below(self, parent: SigningMaterial, spec: CASpec, now: datetime) -> None:
        """What the parent would refuse to sign, refused before anything is stored."""
        self._check_depth_below(parent)
        wanted = spec.path_length if spec.path_length is not None else 0
        if parent.path_length is not None and wanted >= parent.path_length:
            raise PolicyViolationError(
                f"the parent CA's path length {parent.path_length} allows at most "
                f"{parent.path_length - 1} below the new CA"
            )
        if spec.validity is not None and not parent.truncate_validity:
            ends = spec.validity.not_after(now)
            parent_ends = min(c.not_valid_after_utc for c in parent.chain)
            if ends > parent_ends:
                raise InvalidValidityError(
                    f"the new CA would outlive its parent (until {parent_ends:%Y-%m-%d}); "
                    "ask for a shorter validity"
                )

    def _check_depth_below(self, parent: SigningMaterial) -> None:
        if len(parent.chain) + 1 > MAX_HIERARCHY_DEPTH:
            raise PolicyViolationError(
                f"a hierarchy has at most {MAX_HIERARCHY_DEPTH} levels; the parent is at "
                f"level {len(parent.chain)}"
            )
        if parent.path_length == 0:
            raise PolicyViolationError("the parent CA has path length 0: it cannot certify CAs")

    def _self_sign(
        self,
        ca_id: str,
        key_id: str,
        spec: CASpec,
        signing: SigningAlgorithm,
        key: CASigningKey,
        actor: Actor,
        now: datetime,
    ) -> None:
        validity = spec.validity or DEFAULT_ROOT_VALIDITY
        not_after = validity.not_after(now).replace(microsecond=0)
        not_before = (now - timedelta(seconds=spec.settings.backdate_seconds)).replace(
            microsecond=0
        )
        public_key = key.public_key()
        ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
        serial = x509.random_serial_number()
        builder = (
            x509.CertificateBuilder(
                issuer_name=spec.subject,
                subject_name=spec.subject,
                public_key=public_key,
                serial_number=serial,
                not_valid_before=not_before,
                not_valid_after=not_after,
            )
            .add_extension(x509.BasicConstraints(ca=True, path_length=spec.path_length), True)
            .add_extension(
                key_usage_extension({"digitalSignature", "keyCertSign", "cRLSign"}), True
            )
            .add_extension(ski, False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False
            )
        )
        certificate = sign_certificate(builder, key, signing.hash_algorithm())
        with self._store.write() as conn:
            self._store.update_ca(
                conn,
                ca_id,
                status=CAStatus.ACTIVE.value,
                certificate_der=certificate.public_bytes(serialization.Encoding.DER),
                chain_pem="",
                not_before=certificate.not_valid_before_utc,
                not_after=certificate.not_valid_after_utc,
                updated_at=now,
            )
            self._audit.record(
                conn,
                actor,
                "ca.create",
                f"ca/{ca_id}",
                at=now,
                parameters={
                    **self._create_params(spec, signing, key_id, "self-signed certificate"),
                    "serial": format(serial, "x"),
                    "not_after": not_after,
                },
            )

    def _make_csr(self, spec: CASpec, signing: SigningAlgorithm, key: CASigningKey) -> bytes:
        builder = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(spec.subject)
            .add_extension(
                x509.BasicConstraints(ca=True, path_length=spec.path_length), critical=True
            )
        )
        csr = sign_csr(builder, key, signing.hash_algorithm())
        return csr.public_bytes(serialization.Encoding.DER)

    def _sign_by_parent(
        self,
        ca_id: str,
        spec: CASpec,
        parent: SigningMaterial,
        csr: bytes,
        actor: Actor,
        now: datetime,
    ) -> None:
        if self.subordinate_signer is None:
            raise InvalidStateError("no subordinate signer is wired into this core")
        # _check_room_below refused what the parent could not sign before anything was stored.
        wanted = spec.path_length if spec.path_length is not None else 0
        validity = spec.validity
        if validity is None:
            # The default lifetime, but never past the parent's own notAfter.
            limit = min(
                DEFAULT_SUBORDINATE_VALIDITY.not_after(now), parent.certificate.not_valid_after_utc
            )
            validity = Validity(ValidityType.ABSOLUTE, int(limit.timestamp()))
        der, chain_pem = self.subordinate_signer(parent.ca_id, csr, wanted, validity, actor)
        self.import_certificate(ca_id, der, chain_pem.encode(), actor)

    # -- bring your own parent -----------------------------------------------------------

    def import_certificate(
        self, ca_id: str, certificate_data: bytes, chain_data: bytes | None, actor: Actor
    ) -> CAView:
        now = self._clock()
        with self._audit.refusals(actor, "ca.import_certificate", f"ca/{ca_id}", now):
            self._import(ca_id, certificate_data, chain_data, actor, now)
        return self.describe(ca_id)

    def _import(
        self,
        ca_id: str,
        certificate_data: bytes,
        chain_data: bytes | None,
        actor: Actor,
        now: datetime,
    ) -> None:
        record = self.get(ca_id)
        if record.status not in (
            CAStatus.PENDING_CERTIFICATE.value,
            CAStatus.ACTIVE.value,
            CAStatus.DISABLED.value,
        ):
            raise InvalidStateError(f"CA {ca_id} is {record.status}; cannot import a certificate")
        certificates = load_certificates(certificate_data)
        if len(certificates) != 1:
            raise InvalidCertificateError("give exactly one CA certificate (the chain separately)")
        certificate = certificates[0]
        chain = load_certificates(chain_data)
        key = self._load_key(record)
        if _public_der(certificate.public_key()) != _public_der(key.public_key()):
            raise InvalidCertificateError("the certificate's public key is not this CA's key")
        self_signed = certificate.issuer == certificate.subject and not chain
        if record.type == CAType.SUBORDINATE.value and self_signed:
            raise InvalidCertificateError("a SUBORDINATE CA needs a certificate from a parent")
        if not self_signed and not chain:
            raise InvalidCertificateError("the chain up to the root is required")
        validate_ca_chain(certificate, chain, now)
        with self._store.write() as conn:
            self._store.update_ca(
                conn,
                ca_id,
                status=CAStatus.ACTIVE.value
                if record.status == CAStatus.PENDING_CERTIFICATE.value
                else record.status,
                certificate_der=certificate.public_bytes(serialization.Encoding.DER),
                chain_pem=_pem(chain),
                subject=format_dn(certificate.subject),
                subject_der=certificate.subject.public_bytes(),
                not_before=certificate.not_valid_before_utc,
                not_after=certificate.not_valid_after_utc,
                updated_at=now,
            )
            self._audit.record(
                conn,
                actor,
                "ca.import_certificate",
                f"ca/{ca_id}",
                at=now,
                parameters={
                    "serial": format(certificate.serial_number, "x"),
                    "issuer": format_dn(certificate.issuer),
                    "not_after": certificate.not_valid_after_utc,
                },
            )

    def import_token_ca(
        self,
        certificate_data: bytes,
        chain_data: bytes | None,
        token_label: str | None,
        token_id: bytes | None,
        actor: Actor,
        tags: Mapping[str, str] | None = None,
    ) -> CAView:
        """A CA whose certificate was made elsewhere and whose key already sits on the
        configured token (found by CKA_LABEL or CKA_ID): bring your own root, say, whose
        key lives in an HSM. The key must sign what the certificate's public key verifies;
        the store keeps only the reference."""
        now = self._clock()
        tags = dict(tags or {})
        with self._audit.refusals(actor, "ca.import", "ca/-", now):
            check_tags(tags)
            certificates = load_certificates(certificate_data)
            if len(certificates) != 1:
                raise InvalidCertificateError("give exactly one CA certificate (the chain apart)")
            certificate = certificates[0]
            chain = load_certificates(chain_data)
            self_signed = certificate.issuer == certificate.subject and not chain
            if not self_signed and not chain:
                raise InvalidCertificateError("the chain up to the root is required")
            validate_ca_chain(certificate, chain, now)
            key_algorithm = KeyAlgorithm.of_key(certificate.public_key())
            blob = self._keys.adopt(certificate, token_label, token_id)
            ca_id, key_id = str(uuid.uuid4()), uuid.uuid4().hex
            signing = SigningAlgorithm.default_for(key_algorithm)
            with self._store.write() as conn:
                self._store.insert_key(
                    conn, key_id, KeyStorage.PKCS11.value, key_algorithm.value, blob, now
                )
                self._store.insert_ca(
                    conn,
                    id=ca_id,
                    type=(CAType.ROOT if self_signed else CAType.SUBORDINATE).value,
                    status=CAStatus.ACTIVE.value,
                    key_id=key_id,
                    key_algorithm=key_algorithm.value,
                    signing_algorithm=signing.value,
                    usage_mode=UsageMode.GENERAL_PURPOSE.value,
                    subject=format_dn(certificate.subject),
                    subject_der=certificate.subject.public_bytes(),
                    parent_id=None,
                    settings=CASettings().to_json(),
                    certificate_der=certificate.public_bytes(serialization.Encoding.DER),
                    chain_pem=_pem(chain),
                    not_before=certificate.not_valid_before_utc,
                    not_after=certificate.not_valid_after_utc,
                    created_at=now,
                    updated_at=now,
                )
                self._store.set_tags(conn, ca_id, tags)
                reference = self._keys.reference(blob)
                assert reference is not None
                self._audit.record(
                    conn,
                    actor,
                    "ca.import",
                    f"ca/{ca_id}",
                    at=now,
                    parameters={
                        "subject": format_dn(certificate.subject),
                        "serial": format(certificate.serial_number, "x"),
                        "key_id": key_id,
                        "key_storage": KeyStorage.PKCS11.value,
                        "token_key": reference.to_json(),
                    },
                )
        return self.describe(ca_id)

    # -- lifecycle -----------------------------------------------------------------------

    def update_status(self, ca_id: str, status: CAStatus, actor: Actor) -> CAView:
        now = self._clock()

        def change(record: CARecord, conn: Connection) -> dict[str, Any]:
            current = effective_status(record, now)
            allowed = {
                (CAStatus.ACTIVE, CAStatus.DISABLED),
                (CAStatus.DISABLED, CAStatus.ACTIVE),
                (CAStatus.ACTIVE, CAStatus.ACTIVE),
                (CAStatus.DISABLED, CAStatus.DISABLED),
            }
            if (current, status) not in allowed:
                raise InvalidStateError(
                    f"CA {ca_id} is {current.value}; status can only change between ACTIVE "
                    "and DISABLED"
                )
            if status == CAStatus.ACTIVE and record.certificate_der is not None:
                own = self._own_certificate_here(conn, record.certificate_der)
                if own is not None and own.status == CertificateStatus.REVOKED.value:
                    raise InvalidStateError(
                        f"the certificate of CA {ca_id} was revoked ({own.revocation_reason}) "
                        "by its issuer; import a new certificate before enabling it"
                    )
            return {"status": status.value}

        self._change(ca_id, actor, "ca.update", change, {"status": status.value}, now)
        return self.describe(ca_id)

    def _own_certificate_here(self, conn: Connection, der: bytes) -> CertificateRecord | None:
        """The store's record of a CA certificate, when a CA here issued it (looked up
        under the CAs named like its issuer, by serial: both indexed)."""
        certificate = x509.load_der_x509_certificate(der)
        issuer, serial = certificate.issuer.public_bytes(), format(certificate.serial_number, "x")
        for candidate in self._store.list_cas(conn):
            if candidate.subject_der != issuer:
                continue
            found = self._store.get_certificate(conn, candidate.id, serial)
            if found is not None and found.der == der:
                return found
        return None

    def update_settings(self, ca_id: str, settings: CASettings, actor: Actor) -> CAView:
        now = self._clock()

        def change(record: CARecord, conn: Connection) -> dict[str, Any]:
            before = CASettings.from_json(record.settings)
            if before.partitioned != settings.partitioned and self._store.count_certificates(
                conn, ca_id
            ):
                # The certificates already issued name the CRL of the old mode in their
                # distribution points: the new mode's CRLs would leave their revocations out.
                raise InvalidStateError(
                    f"CA {ca_id} has issued certificates under crl_mode {before.crl_mode}; "
                    "the CRL mode is chosen before the first certificate"
                )
            return {"settings": settings.to_json()}

        self._change(ca_id, actor, "ca.update", change, {"settings": settings.to_json()}, now)
        return self.describe(ca_id)

    def delete(self, ca_id: str, restore_days: int, actor: Actor) -> CAView:
        now = self._clock()

        def change(record: CARecord, conn: Connection) -> dict[str, Any]:
            if not RESTORE_DAYS_MIN <= restore_days <= RESTORE_DAYS_MAX:
                raise BadRequestError(
                    f"restore window must be {RESTORE_DAYS_MIN}-{RESTORE_DAYS_MAX} days"
                )
            current = effective_status(record, now)
            if current == CAStatus.ACTIVE:
                raise InvalidStateError(f"CA {ca_id} is ACTIVE; disable it before deleting")
            below = [
                child
                for child in (
                    self._store.get_ca(conn, i) for i in self._store.children_of(conn, ca_id)
                )
                if child is not None and child.status != CAStatus.DELETED.value
            ]
            if below:
                raise InvalidStateError(
                    f"CA {ca_id} has CAs below it ({', '.join(c.id for c in below)}): delete "
                    "them first, or nothing could sign their CRLs once this key is destroyed"
                )
            if current == CAStatus.DELETED:
                raise InvalidStateError(f"CA {ca_id} is already deleted")
            return {
                "status": CAStatus.DELETED.value,
                "status_before_delete": record.status,
                "deleted_at": now,
                "restore_until": now + timedelta(days=restore_days),
            }

        self._change(ca_id, actor, "ca.delete", change, {"restore_days": restore_days}, now)
        return self.describe(ca_id)

    def restore(self, ca_id: str, actor: Actor) -> CAView:
        now = self._clock()

        def change(record: CARecord, conn: Connection) -> dict[str, Any]:
            if record.status != CAStatus.DELETED.value:
                raise InvalidStateError(f"CA {ca_id} is {record.status}, not DELETED")
            if record.restore_until is None or record.restore_until <= now:
                raise InvalidStateError(
                    f"the restore window of CA {ca_id} has ended; its key is destroyed"
                )
            return {
                "status": record.status_before_delete or CAStatus.DISABLED.value,
                "status_before_delete": None,
                "deleted_at": None,
                "restore_until": None,
            }

        self._change(ca_id, actor, "ca.restore", change, {}, now)
        return self.describe(ca_id)

    def tag(
        self, ca_id: str, add: Mapping[str, str], remove: Sequence[str], actor: Actor
    ) -> CAView:
        now = self._clock()
        check_tags(add)
        with self._audit.refusals(actor, "ca.tag", f"ca/{ca_id}", now), self._store.write() as conn:
            if self._store.get_ca(conn, ca_id) is None:
                raise NotFoundError(f"no CA with id {ca_id}")
            self._store.set_tags(conn, ca_id, add)
            self._store.remove_tags(conn, ca_id, remove)
            if len(self._store.tags_of(conn, ca_id)) > MAX_TAGS:
                raise BadRequestError(f"at most {MAX_TAGS} tags")
            self._audit.record(
                conn,
                actor,
                "ca.tag",
                f"ca/{ca_id}",
                at=now,
                parameters={"add": dict(add), "remove": list(remove)},
            )
        return self.describe(ca_id)

    def _change(
        self,
        ca_id: str,
        actor: Actor,
        action: str,
        change: Callable[[CARecord, Connection], dict[str, Any]],
        parameters: Mapping[str, Any],
        now: datetime,
    ) -> None:
        """Read, decide and write in one serialized transaction, audited either way."""
        with (
            self._audit.refusals(actor, action, f"ca/{ca_id}", now, **parameters),
            self._store.write() as conn,
        ):
            record = self._store.get_ca(conn, ca_id)
            if record is None:
                raise NotFoundError(f"no CA with id {ca_id}")
            values = change(record, conn)
            self._store.update_ca(conn, ca_id, updated_at=now, **values)
            if values.get("status", record.status) != record.status:
                self._events.emit(
                    conn,
                    [
                        Event(
                            EventType.CA_STATUS_CHANGED,
                            now,
                            ca_id=ca_id,
                            data={
                                "from": record.status,
                                "to": values["status"],
                                "subject": record.subject,
                                "by": actor.principal,
                            },
                        )
                    ],
                )
            self._audit.record(
                conn,
                actor,
                action,
                f"ca/{ca_id}",
                at=now,
                parameters={**parameters, "from": record.status},
            )

    def settle_interrupted_creations(
        self, actor: Actor, older_than: timedelta = INTERRUPTED_CREATION_AFTER
    ) -> list[str]:
        """CAs left CREATING by a process that died mid-creation become FAILED, audited
        (a creation takes seconds: one still CREATING after ``older_than`` is orphaned)."""
        now = self._clock()
        settled: list[str] = []
        with self._store.read() as conn:  # the common case: nothing to settle, no write
            if not any(
                r.created_at <= now - older_than
                for r in self._store.list_cas(conn, status=CAStatus.CREATING.value)
            ):
                return settled
        with self._store.write() as conn:
            for record in self._store.list_cas(conn, status=CAStatus.CREATING.value):
                if record.created_at > now - older_than:
                    continue
                reason = "the creation was interrupted (the process creating it stopped)"
                self._store.update_ca(
                    conn,
                    record.id,
                    status=CAStatus.FAILED.value,
                    failure_reason=reason,
                    updated_at=now,
                )
                self._audit.record(
                    conn,
                    actor,
                    "ca.create",
                    f"ca/{record.id}",
                    at=now,
                    result="failure",
                    parameters={"subject": record.subject, "message": reason},
                )
                settled.append(record.id)
        return settled

    def purge_expired_deletions(self, actor: Actor) -> list[str]:
        """Destroy the keys of CAs whose restore window has ended; returns their ids.

        A key on a token is destroyed there first; while the token cannot be reached (or
        this process has none configured) the CA waits for a later purge, its reference
        kept, so that no token object is left behind unaccounted for."""
        now = self._clock()
        purged = []
        with self._store.write() as conn:
            for record in self._store.list_cas(conn, status=CAStatus.DELETED.value):
                if record.restore_until is None or record.restore_until > now:
                    continue
                blob = self._store.key_blob(conn, record.key_id)
                if blob is None:
                    continue
                try:
                    on_token = self._keys.destroy(record.key_id, blob)
                except KeyBackendError as exc:
                    log.warning(
                        "cannot destroy a deleted CA's key yet",
                        extra={"ca_id": record.id, "reason": exc.message},
                    )
                    continue
                key_ids = [record.key_id, *self._store.responder_key_ids(conn, record.id)]
                for key_id in key_ids:
                    self._store.destroy_key(conn, key_id, now)
                parameters: dict[str, Any] = {"key_ids": key_ids}
                if on_token is not None:
                    parameters["token_key"] = on_token.to_json()
                self._audit.record(
                    conn, actor, "ca.key.destroy", f"ca/{record.id}", at=now, parameters=parameters
                )
                purged.append(record.id)
        for record_id in purged:
            with self._cache_lock:
                self._cache.pop(record_id, None)
        return purged

    # -- idempotency ---------------------------------------------------------------------

    def _idempotent_ca(self, token: str, spec: CASpec, now: datetime) -> str | None:
        with self._store.read() as conn:
            entry = self._store.idempotency_entry(
                conn, "ca.create", token, now - IDEMPOTENCY_WINDOW
            )
        if entry is None:
            return None
        if entry[0] != spec.fingerprint():
            raise IdempotencyConflictError(
                "this idempotency token was used in the last 5 minutes with different input"
            )
        return entry[1]

    def _claim_token(self, conn: Any, token: str, spec: CASpec, ca_id: str, now: datetime) -> None:
        if self._store.idempotency_entry(conn, "ca.create", token, now - IDEMPOTENCY_WINDOW):
            raise IdempotencyConflictError("this idempotency token is being used right now")
        self._store.put_idempotency_entry(
            conn, "ca.create", token, spec.fingerprint(), ca_id, now, now - IDEMPOTENCY_WINDOW
        )

    # -- signing -------------------------------------------------------------------------

    def _load_key(self, record: CARecord) -> CASigningKey:
        with self._store.read() as conn:
            blob = self._store.key_blob(conn, record.key_id)
        if not blob:
            raise KeyBackendError(f"the key of CA {record.id} has been destroyed")
        return self._keys.load(record.key_id, blob)

    def signing_material(
        self, ca_id: str, now: datetime, require_active: bool = True
    ) -> SigningMaterial:
        with self._store.read() as conn:
            record = self._store.get_ca(conn, ca_id)
        if record is None:
            raise NotFoundError(f"no CA with id {ca_id}")
        status = effective_status(record, now)
        if require_active and status != CAStatus.ACTIVE:
            raise CANotActiveError(f"CA {ca_id} is {status.value}, not ACTIVE")
        if record.certificate_der is None:
            raise CANotActiveError(f"CA {ca_id} has no certificate")
        cached = self._cache.get(ca_id)
        if cached is not None and cached[0] == record.updated_at:
            return cached[1]
        material = self._build_material(record)
        with self._cache_lock:
            self._cache[ca_id] = (record.updated_at, material)
        return material

    def cached_signing_material(self, ca_id: str, now: datetime) -> SigningMaterial:
        """The material last seen ACTIVE, without a database read.

        For the issuance hot path only: the issuer re-checks the CA's status and version
        inside its write transaction and calls :meth:`forget` when they changed.
        """
        cached = self._cache.get(ca_id)
        if cached is None or cached[1].certificate.not_valid_after_utc <= now:
            return self.signing_material(ca_id, now)
        return cached[1]

    def forget(self, ca_id: str) -> None:
        with self._cache_lock:
            self._cache.pop(ca_id, None)

    def _build_material(self, record: CARecord) -> SigningMaterial:
        assert record.certificate_der is not None
        certificate = x509.load_der_x509_certificate(record.certificate_der)
        chain = (certificate, *load_certificates(record.chain_pem))
        settings = CASettings.from_json(record.settings)
        policies = [settings.name_constraints] if settings.name_constraints else []
        for index, cert in enumerate(chain):
            try:
                ext = cert.extensions.get_extension_for_class(x509.NameConstraints).value
            except x509.ExtensionNotFound:
                continue
            policies.append(
                NamePolicy.from_extension(
                    ext, f"the name constraints of {'this CA' if index == 0 else 'its issuer'}"
                )
            )
        _, path_length = _path_length(certificate)
        return SigningMaterial(
            ca_id=record.id,
            key_id=record.key_id,
            key_algorithm=KeyAlgorithm(record.key_algorithm),
            signing_algorithm=SigningAlgorithm(record.signing_algorithm),
            usage_mode=UsageMode(record.usage_mode),
            private_key=self._load_key(record),
            certificate=certificate,
            chain=chain,
            path_length=path_length,
            name_policies=tuple(policies),
            backdate=timedelta(seconds=settings.backdate_seconds),
            truncate_validity=settings.truncate_validity,
            issued_extensions=tuple(_issued_extensions(certificate, settings)),
            version=record.updated_at,
            settings=settings,
            team=record.team,
            policy_version=record.policy_version,
        )


def _issued_extensions(
    ca_certificate: x509.Certificate, settings: CASettings
) -> list[x509.Extension[x509.ExtensionType]]:
    """AKI, CRL distribution point and AIA that go into everything this CA issues."""
    try:
        ski = ca_certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_certificate.public_key())  # type: ignore[arg-type]
    extensions: list[x509.Extension[x509.ExtensionType]] = [
        x509.Extension(ExtensionOID.AUTHORITY_KEY_IDENTIFIER, False, aki)
    ]
    if settings.crl_enabled and settings.crl_url and not settings.partitioned:
        extensions.append(
            x509.Extension(
                ExtensionOID.CRL_DISTRIBUTION_POINTS,
                False,
                x509.CRLDistributionPoints(
                    [
                        x509.DistributionPoint(
                            [x509.UniformResourceIdentifier(settings.crl_url)], None, None, None
                        )
                    ]
                ),
            )
        )
    access = []
    if settings.ocsp_url:
        access.append(
            x509.AccessDescription(
                AuthorityInformationAccessOID.OCSP,
                x509.UniformResourceIdentifier(settings.ocsp_url),
            )
        )
    if settings.ca_issuers_url:
        access.append(
            x509.AccessDescription(
                AuthorityInformationAccessOID.CA_ISSUERS,
                x509.UniformResourceIdentifier(settings.ca_issuers_url),
            )
        )
    if access:
        extensions.append(
            x509.Extension(
                ExtensionOID.AUTHORITY_INFORMATION_ACCESS,
                False,
                x509.AuthorityInformationAccess(access),
            )
        )
    return extensions
