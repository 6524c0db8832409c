"""The independent check of every certificate a device receives.

Nothing here asks the server whether it did well; each check is what a relying party
would do with the certificate alone and the root it trusts:

* the chain: pyhanko-certvalidator builds and validates the path from the leaf to the
  trusted root (signatures, validity, basic constraints, path length, key usage and
  extended key usage for the intended use);
* the contents the template and the request promise: the device's own public key, the
  subject or exactly the DNS names asked for, exactly the template's EKUs, a lifetime
  no longer than configured;
* the status: an OCSP request (built with cryptography) POSTed to the certificate's AIA
  OCSP URL, the response's signature checked against the issuer or its delegated
  responder; and the CRL at the certificate's CRL distribution point, its signature
  checked with the issuer. A good certificate must be good in both; a revoked one must
  be revoked in both, with its reason.

The server regenerates CRLs in a background job some seconds after a revocation
(``crl_regenerate_delay_seconds``), so a revocation that is not yet on the CRL is watched:
:meth:`CertificateChecker.poll_crls` fetches each CRL again, and :meth:`settle` waits for
the rest until a deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import requests
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID
from pyhanko_certvalidator import CertificateValidator, ValidationContext

from pkigate.devsim.attempts import DeviceError, DeviceFailed, Recorder, attempt, check_http
from pkigate.devsim.events import CRL, OCSP, VERIFY

CLOCK_SKEW = timedelta(minutes=5)
OCSP_REQUEST_TYPE = "application/ocsp-request"


@dataclass(frozen=True)
class Expectation:
    """What a received certificate must be, from the template and the request."""

    public_key: CertificatePublicKeyTypes
    """The device's key: the certificate must certify exactly it."""
    key_usage: frozenset[str]
    """For pyhanko's usage check, in its names (``digital_signature``)."""
    extended_key_usage: frozenset[x509.ObjectIdentifier]
    """Exactly these EKUs."""
    subject_common_name: str | None = None
    """The subject's CN, when the request names the subject (SCEP)."""
    dns_names: frozenset[str] | None = None
    """Exactly these subjectAltNames, all DNS names (ACME); None: not checked."""
    max_lifetime: timedelta | None = None
    """notAfter - notBefore at most this (plus the server's backdating)."""


PYHANKO_EKU = {
    ExtendedKeyUsageOID.SERVER_AUTH: "server_auth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "client_auth",
    ExtendedKeyUsageOID.CODE_SIGNING: "code_signing",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "email_protection",
}


@dataclass
class _Watched:
    """A revoked certificate not yet seen on its CRL."""

    recorder: Recorder
    certificate: x509.Certificate
    issuer: x509.Certificate
    reason: x509.ReasonFlags | None
    url: str
    since: float


class CertificateChecker:
    """Checks certificates against ``root``; thread-safe (one per run)."""

    def __init__(
        self,
        root: x509.Certificate,
        session: Callable[[], requests.Session],
        *,
        crl_cache_seconds: float = 1.0,
    ) -> None:
        self.root = root
        self._session = session
        self._crl_cache_seconds = crl_cache_seconds
        self._crls: dict[str, tuple[float, x509.CertificateRevocationList]] = {}
        self._watched: list[_Watched] = []
        self._lock = threading.Lock()

    # -- issued certificates ---------------------------------------------------------------

    def check_issued(
        self,
        chain: Sequence[x509.Certificate],
        expected: Expectation,
        recorder: Recorder,
        deadline: float,
    ) -> x509.Certificate:
        """Check a freshly issued ``chain`` (leaf first) and record one ``verify`` event;
        returns the issuer certificate. Raises DeviceFailed when a check fails."""
        started = time.monotonic()
        leaf = chain[0]
        try:
            issuer = self._validate_path(chain, expected)
            _check_contents(leaf, expected)
            status = self._ocsp(leaf, issuer, recorder, deadline)
            if status.certificate_status is not ocsp.OCSPCertStatus.GOOD:
                raise DeviceError(
                    "verify:ocsp-status", f"OCSP says {status.certificate_status.name}"
                )
            crl = self._crl(leaf, issuer, recorder, deadline, fresh=False)
            if crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None:
                raise DeviceError("verify:crl-status", "a new certificate is on the CRL")
        except DeviceError as exc:
            recorder.event(VERIFY, "issued", started, (exc.error_type, exc.detail))
            raise DeviceFailed("verify", exc.error_type, exc.detail) from exc
        recorder.event(VERIFY, "issued", started)
        return issuer

    def _validate_path(
        self, chain: Sequence[x509.Certificate], expected: Expectation
    ) -> x509.Certificate:
        leaf, intermediates = chain[0], list(chain[1:])
        context = ValidationContext(
            trust_roots=[_asn1(self.root)],
            other_certs=[_asn1(c) for c in intermediates],
            allow_fetching=False,
            # Revocation is checked below, by our own OCSP and CRL requests.
            revocation_mode="soft-fail",
        )
        # async_validate_usage carries no annotations.
        validator: Any = CertificateValidator(_asn1(leaf), validation_context=context)
        extended = {PYHANKO_EKU.get(oid, oid.dotted_string) for oid in expected.extended_key_usage}
        try:
            path = asyncio.run(validator.async_validate_usage(set(expected.key_usage), extended))
        except Exception as exc:  # pyhanko raises several error types; each one fails
            raise DeviceError("verify:chain", f"{type(exc).__name__}: {exc}") from exc
        # The path runs from the root to the leaf; the certificate before it is the issuer.
        certificates = list(path.iter_certs(include_root=True))
        return x509.load_der_x509_certificate(certificates[-2].dump())

    # -- revoked certificates --------------------------------------------------------------

    def check_revoked(
        self,
        certificate: x509.Certificate,
        issuer: x509.Certificate,
        reason: x509.ReasonFlags | None,
        recorder: Recorder,
        deadline: float,
    ) -> bool:
        """OCSP must say revoked (with ``reason``) at once; the CRL once regenerated.
        True when both agree already (one ``verify`` event recorded); False when the CRL
        is watched until :meth:`settle`. Raises DeviceFailed when OCSP disagrees."""
        started = time.monotonic()
        try:
            status = self._ocsp(certificate, issuer, recorder, deadline)
            if status.certificate_status is not ocsp.OCSPCertStatus.REVOKED:
                raise DeviceError(
                    "verify:ocsp-not-revoked", f"OCSP says {status.certificate_status.name}"
                )
            if reason is not None and status.revocation_reason not in (reason, None):
                raise DeviceError(
                    "verify:ocsp-reason", f"OCSP gives the reason {status.revocation_reason}"
                )
            crl = self._crl(certificate, issuer, recorder, deadline, fresh=True)
        except DeviceError as exc:
            recorder.event(VERIFY, "revoked", started, (exc.error_type, exc.detail))
            raise DeviceFailed("verify", exc.error_type, exc.detail) from exc
        if _listed(crl, certificate, reason, recorder, started):
            return True
        with self._lock:
            self._watched.append(
                _Watched(recorder, certificate, issuer, reason, _crl_url(certificate), started)
            )
        return False

    def watched(self) -> int:
        with self._lock:
            return len(self._watched)

    def poll_crls(self, recorder: Recorder, deadline: float) -> None:
        """Fetch each watched CRL once and settle the revocations it lists."""
        with self._lock:
            watched, self._watched = self._watched, []
        remaining: list[_Watched] = []
        by_url: dict[str, list[_Watched]] = {}
        for item in watched:
            by_url.setdefault(item.url, []).append(item)
        for items in by_url.values():
            try:
                crl = self._crl(items[0].certificate, items[0].issuer, recorder, deadline, True)
            except (DeviceError, DeviceFailed):
                remaining += items  # tried again at the next poll
                continue
            for item in items:
                if not _listed(crl, item.certificate, item.reason, item.recorder, item.since):
                    remaining.append(item)
        with self._lock:
            self._watched = remaining + self._watched

    def settle(self, recorder: Recorder, timeout: float, interval: float = 1.0) -> int:
        """Poll until every watched revocation is on its CRL or ``timeout`` passes; the
        ones still missing are recorded as failures. Returns how many were missing."""
        deadline = time.monotonic() + timeout
        while self.watched() and time.monotonic() < deadline:
            self.poll_crls(recorder, deadline)
            if self.watched():
                time.sleep(interval)
        with self._lock:
            missing, self._watched = self._watched, []
        for item in missing:
            item.recorder.event(
                VERIFY,
                "revoked",
                item.since,
                (
                    "verify:crl-not-revoked",
                    f"serial {item.certificate.serial_number:x} not on {item.url} "
                    f"after {timeout:.0f}s",
                ),
            )
        return len(missing)

    # -- OCSP ------------------------------------------------------------------------------

    def _ocsp(
        self,
        certificate: x509.Certificate,
        issuer: x509.Certificate,
        recorder: Recorder,
        deadline: float,
    ) -> ocsp.OCSPResponse:
        url = _ocsp_url(certificate)
        request = (
            ocsp.OCSPRequestBuilder()
            .add_certificate(certificate, issuer, hashes.SHA1())  # noqa: S303 - RFC 5019 CertID
            .build()
            .public_bytes(serialization.Encoding.DER)
        )

        def ask() -> ocsp.OCSPResponse:
            response = self._session().post(
                url, data=request, headers={"Content-Type": OCSP_REQUEST_TYPE}, timeout=30
            )
            check_http(response, "OCSP")
            try:
                return ocsp.load_der_ocsp_response(response.content)
            except ValueError as exc:
                raise DeviceError("ocsp:unreadable", str(exc)) from exc

        answer = attempt(recorder, OCSP, "status", ask, deadline)
        _check_ocsp_response(answer, certificate, issuer)
        return answer

    # -- CRL -------------------------------------------------------------------------------

    def _crl(
        self,
        certificate: x509.Certificate,
        issuer: x509.Certificate,
        recorder: Recorder,
        deadline: float,
        fresh: bool,
    ) -> x509.CertificateRevocationList:
        url = _crl_url(certificate)
        with self._lock:
            cached = self._crls.get(url)
        if not fresh and cached is not None:
            fetched, crl = cached
            if time.monotonic() - fetched < self._crl_cache_seconds:
                return crl

        def fetch() -> x509.CertificateRevocationList:
            response = check_http(self._session().get(url, timeout=30), "CRL")
            try:
                return x509.load_der_x509_crl(response.content)
            except ValueError as exc:
                raise DeviceError("crl:unreadable", str(exc)) from exc

        crl = attempt(recorder, CRL, "fetch", fetch, deadline)
        _check_crl(crl, issuer)
        with self._lock:
            self._crls[url] = (time.monotonic(), crl)
        return crl


# -- checks ------------------------------------------------------------------------------------


def _check_contents(leaf: x509.Certificate, expected: Expectation) -> None:
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(der, spki) != expected.public_key.public_bytes(der, spki):
        raise DeviceError("verify:key", "the certificate certifies another key")
    try:
        eku = set(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        eku = set()
    if eku != set(expected.extended_key_usage):
        names = sorted(o.dotted_string for o in eku)
        raise DeviceError("verify:eku", f"EKU {names}, expected other usages")
    if expected.subject_common_name is not None:
        cns = [a.value for a in leaf.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)]
        if cns != [expected.subject_common_name]:
            raise DeviceError("verify:names", f"subject CN {cns}")
    if expected.dns_names is not None:
        try:
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound as exc:
            raise DeviceError("verify:names", "no subjectAltName") from exc
        dns = san.get_values_for_type(x509.DNSName)
        if set(dns) != expected.dns_names or len(dns) != len(list(san)):
            raise DeviceError("verify:names", f"subjectAltName {sorted(map(str, san))}")
    if expected.max_lifetime is not None:
        lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        if lifetime > expected.max_lifetime + CLOCK_SKEW + timedelta(minutes=5):
            raise DeviceError("verify:lifetime", f"a lifetime of {lifetime}")


def _check_ocsp_response(
    answer: ocsp.OCSPResponse, certificate: x509.Certificate, issuer: x509.Certificate
) -> None:
    if answer.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise DeviceError("verify:ocsp-response", answer.response_status.name)
    if answer.serial_number != certificate.serial_number:
        raise DeviceError("verify:ocsp-response", "the response is for another serial")
    key_hash = hashlib.sha1(_public_key_bits(issuer), usedforsecurity=False).digest()
    if answer.issuer_key_hash != key_hash:
        raise DeviceError("verify:ocsp-response", "the response is for another issuer")
    responder = issuer
    if answer.certificates:
        # A delegated responder (RFC 6960 4.2.2.2): issued by the CA, for OCSPSigning.
        responder = answer.certificates[0]
        try:
            responder.verify_directly_issued_by(issuer)
            usage = responder.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound) as exc:
            raise DeviceError("verify:ocsp-signature", f"responder: {exc}") from exc
        if ExtendedKeyUsageOID.OCSP_SIGNING not in usage:
            raise DeviceError("verify:ocsp-signature", "the responder lacks OCSPSigning")
    try:
        _verify_signature(
            responder.public_key(),
            answer.signature,
            answer.tbs_response_bytes,
            answer.signature_hash_algorithm,
        )
    except InvalidSignature as exc:
        raise DeviceError("verify:ocsp-signature", "the response's signature is wrong") from exc
    now = datetime.now(UTC)
    if answer.this_update_utc > now + CLOCK_SKEW:
        raise DeviceError("verify:ocsp-response", "thisUpdate is in the future")
    if answer.next_update_utc is not None and answer.next_update_utc < now - CLOCK_SKEW:
        raise DeviceError("verify:ocsp-response", "the response is stale")


def _check_crl(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> None:
    if crl.issuer != issuer.subject:
        raise DeviceError("verify:crl-issuer", f"CRL issued by {crl.issuer.rfc4514_string()}")
    if not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
        raise DeviceError("verify:crl-signature", "the CRL's signature is wrong")
    now = datetime.now(UTC)
    if crl.last_update_utc > now + CLOCK_SKEW:
        raise DeviceError("verify:crl-time", "thisUpdate is in the future")
    if crl.next_update_utc is not None and crl.next_update_utc < now - CLOCK_SKEW:
        raise DeviceError("verify:crl-time", "the CRL is past its nextUpdate")


def _listed(
    crl: x509.CertificateRevocationList,
    certificate: x509.Certificate,
    reason: x509.ReasonFlags | None,
    recorder: Recorder,
    since: float,
) -> bool:
    """Record the outcome if ``certificate`` is on ``crl``; False when it is not yet."""
    entry = crl.get_revoked_certificate_by_serial_number(certificate.serial_number)
    if entry is None:
        return False
    error = None
    if reason is not None:
        try:
            listed = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        except x509.ExtensionNotFound:
            listed = x509.ReasonFlags.unspecified
        if listed != reason:
            error = ("verify:crl-reason", f"the CRL gives the reason {listed.name}")
    recorder.event(VERIFY, "revoked", since, error)
    return True


def _ocsp_url(certificate: x509.Certificate) -> str:
    try:
        aia = certificate.extensions.get_extension_for_class(x509.AuthorityInformationAccess)
    except x509.ExtensionNotFound as exc:
        raise DeviceError("verify:no-ocsp-url", "no AIA extension") from exc
    for description in aia.value:
        if description.access_method == AuthorityInformationAccessOID.OCSP:
            return str(description.access_location.value)
    raise DeviceError("verify:no-ocsp-url", "no OCSP URL in the AIA")


def _crl_url(certificate: x509.Certificate) -> str:
    try:
        cdp = certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints)
    except x509.ExtensionNotFound as exc:
        raise DeviceError("verify:no-crl-url", "no CRL distribution point") from exc
    for point in cdp.value:
        for name in point.full_name or ():
            if isinstance(name, x509.UniformResourceIdentifier):
                return name.value
    raise DeviceError("verify:no-crl-url", "no URI in the CRL distribution points")


def _public_key_bits(certificate: x509.Certificate) -> bytes:
    """The subjectPublicKey BIT STRING's content (what OCSP's issuerKeyHash hashes)."""
    info = _asn1(certificate)["tbs_certificate"]["subject_public_key_info"]
    return bytes(info["public_key"].contents[1:])


def _verify_signature(
    key: CertificatePublicKeyTypes,
    signature: bytes,
    data: bytes,
    algorithm: hashes.HashAlgorithm | None,
) -> None:
    if isinstance(key, ed25519.Ed25519PublicKey):
        key.verify(signature, data)
        return
    if algorithm is None:
        raise InvalidSignature("no hash algorithm")
    if isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(signature, data, ec.ECDSA(algorithm))
    elif isinstance(key, rsa.RSAPublicKey):
        key.verify(signature, data, padding.PKCS1v15(), algorithm)
    else:
        raise InvalidSignature(f"unsupported responder key {type(key).__name__}")


def _asn1(certificate: x509.Certificate) -> asn1_x509.Certificate:
    return asn1_x509.Certificate.load(certificate.public_bytes(serialization.Encoding.DER))
