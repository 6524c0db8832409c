"""A SCEP client (RFC 8894) speaking the wire protocol over HTTP, as a phone's MDM agent.

GetCACaps and GetCACert over GET, PKIOperation over POST (``application/x-pki-message``):
PKCSReq with a challenge password, RenewalReq signed with the certificate being renewed,
CertPoll for a request waiting for approval. The messages are built and the replies read
by :mod:`pkigate.scep.messages` (its client half); only signatures by the RA or CA that
GetCACert gave are trusted.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import AttributeOID

from pkigate.devsim.attempts import DeviceError, check_http
from pkigate.scep.cms import CmsError, embedded_certificates, load_content_info
from pkigate.scep.messages import (
    CertRep,
    MessageType,
    PkiStatus,
    ScepError,
    build_pki_message,
    encode_issuer_and_subject,
    parse_cert_rep,
)

PKI_MESSAGE_TYPE = "application/x-pki-message"
RSA_KEY_BITS = 2048


def new_key() -> rsa.RSAPrivateKey:
    """A device key: RSA, because a SCEP reply is encrypted to the requester's key."""
    return rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)


def new_transaction_id() -> str:
    return uuid.uuid4().hex


def self_signed(key: rsa.RSAPrivateKey, subject: x509.Name) -> x509.Certificate:
    """The throwaway certificate that signs a first PKCSReq (RFC 8894 2.3)."""
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def certificate_request(key: rsa.RSAPrivateKey, subject: x509.Name, challenge: str | None) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if challenge is not None:
        builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, challenge.encode())
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


@dataclass(frozen=True)
class CaCertificates:
    """What GetCACert answered: the certificate to encrypt to (the RA, or the CA when it
    decrypts itself) and the CA chain."""

    recipient: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    """The issuing CA first, up to the root when the server sends it."""


@dataclass(frozen=True)
class PendingRequest:
    """A PKCSReq waiting for an administrator: what CertPoll needs to ask again."""

    transaction_id: str
    subject: x509.Name
    key: rsa.RSAPrivateKey
    signer: x509.Certificate


class ScepClient:
    """One SCEP server URL, over a requests Session."""

    def __init__(self, url: str, session: requests.Session, timeout: float = 30.0) -> None:
        self.url = url
        self.session = session
        self.timeout = timeout

    # -- GET operations --------------------------------------------------------------------

    def get_ca_caps(self) -> frozenset[str]:
        response = self.session.get(
            self.url, params={"operation": "GetCACaps"}, timeout=self.timeout
        )
        check_http(response, "GetCACaps")
        return frozenset(line.strip() for line in response.text.splitlines() if line.strip())

    def get_ca_cert(self) -> CaCertificates:
        response = self.session.get(
            self.url, params={"operation": "GetCACert"}, timeout=self.timeout
        )
        check_http(response, "GetCACert")
        content_type = response.headers.get("Content-Type", "")
        if content_type.startswith("application/x-x509-ca-cert"):
            ca = x509.load_der_x509_certificate(response.content)
            return CaCertificates(ca, (ca,))
        # A certs-only SignedData with the RA first, as clients expect (which is not DER
        # SET order, so read it as BER).
        try:
            certificates = embedded_certificates(load_content_info(response.content, "signed_data"))
        except CmsError as exc:
            raise DeviceError("scep:getcacert", f"unreadable GetCACert answer: {exc}") from exc
        recipient = next((c for c in certificates if _encrypts(c)), None)
        cas = tuple(c for c in certificates if _is_ca(c))
        if recipient is None or not cas:
            raise DeviceError("scep:getcacert", "no RA or CA certificate in GetCACert")
        return CaCertificates(recipient, cas)

    # -- PKIOperation ----------------------------------------------------------------------

    def enroll(
        self,
        ca: CaCertificates,
        signer: x509.Certificate,
        key: rsa.RSAPrivateKey,
        request_der: bytes,
        transaction_id: str,
    ) -> CertRep:
        """PKCSReq: ``request_der`` (a PKCS#10 request with the challenge password),
        signed by the self-signed ``signer``. A retry sends the same request under the
        same transactionID, so that the server answers it again rather than twice."""
        return self._operate(ca, MessageType.PKCS_REQ, request_der, transaction_id, signer, key)

    def renew(
        self,
        ca: CaCertificates,
        current: x509.Certificate,
        current_key: rsa.RSAPrivateKey,
        request_der: bytes,
        transaction_id: str,
    ) -> CertRep:
        """RenewalReq (RFC 8894 3.3.1.2): ``request_der`` (a new key, the same subject, no
        challenge) signed by the certificate being renewed."""
        return self._operate(
            ca, MessageType.RENEWAL_REQ, request_der, transaction_id, current, current_key
        )

    def poll(self, ca: CaCertificates, pending: PendingRequest) -> CertRep:
        """CertPoll (RFC 8894 3.3.3): is the request of ``pending`` decided yet?"""
        payload = encode_issuer_and_subject(ca.chain[0].subject, pending.subject)
        return self._operate(
            ca,
            MessageType.CERT_POLL,
            payload,
            pending.transaction_id,
            pending.signer,
            pending.key,
        )

    def _operate(
        self,
        ca: CaCertificates,
        kind: MessageType,
        payload: bytes,
        transaction_id: str,
        signer: x509.Certificate,
        signer_key: rsa.RSAPrivateKey,
    ) -> CertRep:
        message = build_pki_message(kind, payload, transaction_id, signer, signer_key, ca.recipient)
        response = self.session.post(
            self.url,
            params={"operation": "PKIOperation"},
            data=message,
            headers={"Content-Type": PKI_MESSAGE_TYPE},
            timeout=self.timeout,
        )
        check_http(response, "PKIOperation")
        try:
            reply = parse_cert_rep(
                response.content, signer_key, [ca.recipient, *ca.chain], requester_cert=signer
            )
        except ScepError as exc:
            raise DeviceError("scep:bad-reply", str(exc)) from exc
        if reply.transaction_id != transaction_id:
            raise DeviceError("scep:bad-reply", "the CertRep answers another transactionID")
        if reply.status is PkiStatus.SUCCESS and not reply.certificates:
            raise DeviceError("scep:bad-reply", "a SUCCESS CertRep without a certificate")
        return reply


def failure_type(reply: CertRep) -> str:
    """The report's name for a FAILURE CertRep: ``scep:<failInfo>``."""
    return f"scep:{reply.fail_info.rfc_name if reply.fail_info is not None else 'failure'}"


def _encrypts(certificate: x509.Certificate) -> bool:
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return bool(usage.key_encipherment)


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        return certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False
