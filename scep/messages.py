"""SCEP messages on the wire (RFC 8894 section 3): pkiMessage in, CertRep out.

A request is a CMS SignedData (signed by the requester, often with a self-signed
certificate) whose content is a pkcsPKIEnvelope: a CMS EnvelopedData addressed to the CA or
RA certificate that GetCACert gave out. The signed attributes carry the SCEP fields
(messageType, transactionID, senderNonce, ...). A reply (CertRep) is the same shape going
back, signed by the CA or RA and, on success, encrypted to the requester's certificate.

No HTTP and no issuance here: `parse_pki_message` turns bytes into a `PkiMessage` or a
`ScepError` carrying the failInfo to answer with, and `build_cert_rep` signs the answer.
The client half (`build_pki_message`, `parse_cert_rep`) serves the tests and devices-sim.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import IntEnum
from typing import Any, cast

from asn1crypto import cms, core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm as CryptographyUnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import rsa

from pkigate.core.errors import BadCSRError
from pkigate.core.readable import check_readable
from pkigate.scep.cms import (
    CmsError,
    ContentCipher,
    DecryptionFailed,
    DigestAlgorithm,
    KeyTransport,
    NoMatchingRecipient,
    SignatureInvalid,
    UnsupportedAlgorithm,
    build_degenerate_signed_data,
    build_enveloped_data,
    build_signed_data,
    decrypt_enveloped_data,
    digest_algorithm_of,
    embedded_certificates,
    embedded_crls,
    load_content_info,
    only_signer,
    signed_attributes,
    verify_signed_data,
)

__all__ = [
    "SCEP_MAX_MESSAGE_BYTES",
    "CertRep",
    "ContentCipher",
    "DigestAlgorithm",
    "FailInfo",
    "IssuerAndSerial",
    "IssuerAndSubject",
    "KeyTransport",
    "MessageType",
    "PkiMessage",
    "PkiStatus",
    "ReplyTo",
    "ScepError",
    "UnreadableMessage",
    "build_cert_rep",
    "build_pki_message",
    "degenerate_certs_only",
    "encode_issuer_and_serial",
    "encode_issuer_and_subject",
    "parse_cert_rep",
    "parse_issuer_and_serial",
    "parse_issuer_and_subject",
    "parse_pki_message",
    "reply_digest",
    "sign_pki_message",
]

SCEP_MAX_MESSAGE_BYTES = 256 * 1024
"""Largest pkiMessage accepted (a PKCS#10 request with a 4096-bit key is about 5 KiB)."""

# Signed attributes, RFC 8894 3.2.1.
OID_MESSAGE_TYPE = "2.16.840.1.113733.1.9.2"
OID_PKI_STATUS = "2.16.840.1.113733.1.9.3"
OID_FAIL_INFO = "2.16.840.1.113733.1.9.4"
OID_SENDER_NONCE = "2.16.840.1.113733.1.9.5"
OID_RECIPIENT_NONCE = "2.16.840.1.113733.1.9.6"
OID_TRANSACTION_ID = "2.16.840.1.113733.1.9.7"
OID_FAIL_INFO_TEXT = "1.3.6.1.5.5.7.24.1"  # id-scep-failInfoText, RFC 8894 3.2.1.4.6

NONCE_BYTES = 16
_MAX_TRANSACTION_ID_CHARS = 256
_MAX_NONCE_BYTES = 64


class MessageType(IntEnum):
    """messageType values (RFC 8894 3.2.1.2)."""

    CERT_REP = 3
    RENEWAL_REQ = 17
    PKCS_REQ = 19
    CERT_POLL = 20
    """CertPoll, called GetCertInitial before RFC 8894."""
    GET_CERT = 21
    GET_CRL = 22


REQUEST_TYPES = frozenset(
    {
        MessageType.RENEWAL_REQ,
        MessageType.PKCS_REQ,
        MessageType.CERT_POLL,
        MessageType.GET_CERT,
        MessageType.GET_CRL,
    }
)


class PkiStatus(IntEnum):
    """pkiStatus values (RFC 8894 3.2.1.3)."""

    SUCCESS = 0
    FAILURE = 2
    PENDING = 3


class FailInfo(IntEnum):
    """failInfo values (RFC 8894 3.2.1.4); the RFC's names are in `rfc_name`."""

    BAD_ALG = 0
    """Unrecognized or unsupported algorithm."""
    BAD_MESSAGE_CHECK = 1
    """Integrity check (signature verification of the CMS message) failed."""
    BAD_REQUEST = 2
    """Transaction not permitted or supported."""
    BAD_TIME = 3
    """The signingTime attribute was not sufficiently close to the system time."""
    BAD_CERT_ID = 4
    """No certificate could be identified matching the provided criteria."""

    @property
    def rfc_name(self) -> str:
        return ("badAlg", "badMessageCheck", "badRequest", "badTime", "badCertId")[self.value]


@dataclass(frozen=True)
class ReplyTo:
    """What a CertRep needs from the request it answers."""

    transaction_id: str
    """Echoed in the reply (RFC 8894 3.2.1.1)."""
    recipient_nonce: bytes
    """The request's senderNonce, returned as the reply's recipientNonce (3.2.1.5)."""
    digest_algorithm: DigestAlgorithm | None = None
    """The requester's digest, which the reply may mirror (see `reply_digest`)."""
    recipient_certificate: x509.Certificate | None = None
    """The requester's verified signer certificate: a SUCCESS reply is encrypted to it."""
    content_cipher: ContentCipher | None = None
    """The requester's content-encryption algorithm: a SUCCESS reply uses it too."""


class ScepError(Exception):
    """A request that gets a CertRep FAILURE with `fail_info`.

    `reply_to` is set whenever the request could be read far enough to address a reply
    (`parse_pki_message` always sets it on a ScepError that is not UnreadableMessage)."""

    def __init__(self, fail_info: FailInfo, message: str, reply_to: ReplyTo | None = None):
        super().__init__(message)
        self.fail_info = fail_info
        self.message = message
        self.reply_to = reply_to

    def __str__(self) -> str:
        return f"{self.fail_info.rfc_name}: {self.message}"


class UnreadableMessage(ScepError):
    """Input that no reply can be addressed to (not CMS, no transactionID or senderNonce).
    The HTTP layer answers 400."""

    def __init__(self, message: str, *, fail_info: FailInfo = FailInfo.BAD_REQUEST):
        super().__init__(fail_info, message, None)


@dataclass(frozen=True)
class IssuerAndSubject:
    """CertPoll payload (RFC 8894 3.3.3): the CA's name and the requested subject."""

    issuer: x509.Name
    subject: x509.Name
    issuer_der: bytes
    subject_der: bytes


@dataclass(frozen=True)
class IssuerAndSerial:
    """GetCert and GetCRL payload (RFC 8894 3.3.4, 3.3.5): a certificate's issuer and serial."""

    issuer: x509.Name
    serial_number: int
    issuer_der: bytes


@dataclass(frozen=True)
class PkiMessage:
    """A request whose signature verified and whose envelope we opened."""

    message_type: MessageType
    transaction_id: str
    """As sent: hex from most clients, decimal digits from certmonger."""
    sender_nonce: bytes
    signer_certificate: x509.Certificate
    """The certificate that signed the message (self-signed for a first PKCSReq; who it
    belongs to is for the authorization layer to decide)."""
    signer_digest_algorithm: DigestAlgorithm
    content_encryption_algorithm: ContentCipher
    key_transport: KeyTransport
    recipient_certificate: x509.Certificate
    """Which of our certificates the envelope was addressed to (CA, RA, or a successor)."""
    payload: bytes = field(repr=False)
    """The decrypted messageData: PKCS#10 DER for PKCSReq and RenewalReq, IssuerAndSubject
    for CertPoll, IssuerAndSerialNumber for GetCert and GetCRL."""
    signing_time: datetime | None
    """The signingTime attribute if sent (badTime is the caller's policy to apply)."""
    raw: bytes = field(repr=False)
    """The message as received, for logging."""

    @property
    def reply_to(self) -> ReplyTo:
        return ReplyTo(
            self.transaction_id,
            self.sender_nonce,
            self.signer_digest_algorithm,
            self.signer_certificate,
            # Never answer with single DES: a client that sent it (micromdm's scepclient)
            # decrypts DES-EDE3 as well, which every SCEP implementation supports.
            ContentCipher.DES3
            if self.content_encryption_algorithm is ContentCipher.DES
            else self.content_encryption_algorithm,
        )

    def csr(self) -> x509.CertificateSigningRequest:
        """The PKCS#10 request of a PKCSReq or RenewalReq (its signature unchecked here),
        refused as badAlg when its key is of an algorithm nothing here can use."""
        try:
            csr = x509.load_der_x509_csr(self.payload)
        except (ValueError, x509.InvalidVersion) as exc:
            raise ScepError(
                FailInfo.BAD_REQUEST, f"the payload is not a PKCS#10 request: {exc}", self.reply_to
            ) from exc
        try:
            csr.public_key()
        except (CryptographyUnsupportedAlgorithm, ValueError) as exc:
            raise ScepError(
                FailInfo.BAD_ALG, f"the request's public key cannot be used: {exc}", self.reply_to
            ) from exc
        try:
            check_readable(csr)  # a refusal now, not a crash where the subject is compared
        except BadCSRError as exc:
            raise ScepError(FailInfo.BAD_REQUEST, exc.message, self.reply_to) from exc
        return csr

    def issuer_and_subject(self) -> IssuerAndSubject:
        try:
            return parse_issuer_and_subject(self.payload)
        except ScepError as exc:
            raise ScepError(exc.fail_info, exc.message, self.reply_to) from exc

    def issuer_and_serial(self) -> IssuerAndSerial:
        try:
            return parse_issuer_and_serial(self.payload)
        except ScepError as exc:
            raise ScepError(exc.fail_info, exc.message, self.reply_to) from exc


# -- server side ------------------------------------------------------------------------------


def parse_pki_message(
    data: bytes, recipients: Sequence[tuple[x509.Certificate, rsa.RSAPrivateKey]]
) -> PkiMessage:
    """Read a pkiMessage: check its signature, read its attributes, open its envelope with
    one of `recipients` (our CA/RA certificates and keys).

    Raises UnreadableMessage when no reply can be addressed, otherwise ScepError with
    `reply_to` set and the failInfo for the CertRep FAILURE."""
    if len(data) > SCEP_MAX_MESSAGE_BYTES:
        raise UnreadableMessage(f"{len(data)} bytes is more than {SCEP_MAX_MESSAGE_BYTES}")
    try:
        signed_data = load_content_info(data, "signed_data")
        signer_info = only_signer(signed_data)
        attributes = signed_attributes(signer_info)
    except CmsError as exc:
        raise UnreadableMessage(str(exc)) from exc  # the HTTP answer says what it is not
    reply_to = _reply_address(attributes)
    with _as_scep_error(reply_to):
        reply_to = replace(reply_to, digest_algorithm=digest_algorithm_of(signer_info))
    with _as_scep_error(reply_to):
        verified = verify_signed_data(signed_data)
    message_type = _message_type(attributes, reply_to)
    if not isinstance(verified.signer_certificate.public_key(), rsa.RSAPublicKey):
        # RFC 8894 2.1: SCEP entities use RSA; a reply can only be encrypted to an RSA key.
        raise ScepError(FailInfo.BAD_ALG, "the signer's key is not RSA", reply_to)
    with _as_scep_error(reply_to):
        enveloped = load_content_info(verified.content, "enveloped_data")
        opened = decrypt_enveloped_data(enveloped, recipients)
    # decrypt_enveloped_data names the recipient it matched; ours are never None.
    recipient = cast(x509.Certificate, opened.recipient_certificate)
    return PkiMessage(
        message_type=message_type,
        transaction_id=reply_to.transaction_id,
        sender_nonce=reply_to.recipient_nonce,
        signer_certificate=verified.signer_certificate,
        signer_digest_algorithm=verified.digest_algorithm,
        content_encryption_algorithm=opened.cipher,
        key_transport=opened.key_transport,
        recipient_certificate=recipient,
        payload=opened.content,
        signing_time=_signing_time(attributes),
        raw=data,
    )


@contextmanager
def _as_scep_error(reply_to: ReplyTo | None) -> Iterator[None]:
    """Turns CMS failures into ScepError, addressed to `reply_to`."""
    try:
        yield
    except CmsError as exc:
        raise ScepError(failure_for(exc), str(exc), reply_to) from exc


def failure_for(exc: CmsError) -> FailInfo:
    """The failInfo that answers a CMS failure: the one place where that mapping lives."""
    if isinstance(exc, UnsupportedAlgorithm):
        return FailInfo.BAD_ALG
    if isinstance(exc, SignatureInvalid | DecryptionFailed):
        return FailInfo.BAD_MESSAGE_CHECK
    if isinstance(exc, NoMatchingRecipient):
        # An envelope for a certificate we do not hold (a stale CA after a rollover, another
        # server's RA) is a message whose integrity we cannot check: RFC 8894 3.2.1.4.5
        # defines badMessageCheck as the CMS message failing its check, while badRequest
        # ("transaction not permitted or supported") would tell the client the request
        # itself was refused, and badCertId is about GetCert/CertPoll lookups.
        return FailInfo.BAD_MESSAGE_CHECK
    return FailInfo.BAD_REQUEST


def _reply_address(attributes: dict[str, list[Any]]) -> ReplyTo:
    try:
        transaction_id = _string_attribute(attributes, OID_TRANSACTION_ID)
        sender_nonce = _octets_attribute(attributes, OID_SENDER_NONCE)
    except ValueError as exc:
        raise UnreadableMessage(str(exc)) from exc
    if transaction_id is None or sender_nonce is None:
        # RFC 8894 3.2.1: every message carries both; without them a reply has no address.
        raise UnreadableMessage("transactionID or senderNonce signed attribute missing")
    if not 0 < len(transaction_id) <= _MAX_TRANSACTION_ID_CHARS or not transaction_id.isprintable():
        raise UnreadableMessage("the transactionID is empty, too long or not printable")
    if not 0 < len(sender_nonce) <= _MAX_NONCE_BYTES:
        raise UnreadableMessage(f"a senderNonce of {len(sender_nonce)} bytes")
    return ReplyTo(transaction_id, sender_nonce)


def _message_type(attributes: dict[str, list[Any]], reply_to: ReplyTo) -> MessageType:
    try:
        text = _string_attribute(attributes, OID_MESSAGE_TYPE)
    except ValueError as exc:
        raise ScepError(FailInfo.BAD_REQUEST, str(exc), reply_to) from exc
    if text is None:
        raise ScepError(FailInfo.BAD_REQUEST, "messageType signed attribute missing", reply_to)
    try:
        message_type = MessageType(int(text))
    except ValueError:
        raise ScepError(FailInfo.BAD_REQUEST, f"unknown messageType {text!r}", reply_to) from None
    if message_type not in REQUEST_TYPES:
        raise ScepError(FailInfo.BAD_REQUEST, f"messageType {text!r} is not a request", reply_to)
    return message_type


def build_cert_rep(
    reply_to: ReplyTo,
    status: PkiStatus,
    signer_certificate: x509.Certificate,
    signer_key: rsa.RSAPrivateKey,
    *,
    certificates: Sequence[x509.Certificate] = (),
    crls: Sequence[x509.CertificateRevocationList] = (),
    fail_info: FailInfo | None = None,
    fail_info_text: str | None = None,
    allow_sha1: bool = False,
    sender_nonce: bytes | None = None,
) -> bytes:
    """A CertRep (RFC 8894 3.3.2) signed by the CA or RA (`signer_*`).

    SUCCESS carries `certificates` (the issued one first, then any chain) and/or `crls`
    (GetCRL) in a degenerate SignedData, encrypted to `reply_to.recipient_certificate` with
    the requester's own content cipher and PKCS#1 v1.5 key transport. FAILURE needs
    `fail_info`; `fail_info_text` is optional (3.2.1.4.6). FAILURE and PENDING carry no
    envelope: their signed content is empty (as micromdm, which the clients interoperate
    with, writes it). `allow_sha1` lets a reply mirror a SHA-1 request (legacy devices)."""
    attributes = [
        _attribute(OID_MESSAGE_TYPE, core.PrintableString(str(int(MessageType.CERT_REP)))),
        _attribute(OID_TRANSACTION_ID, core.PrintableString(reply_to.transaction_id)),
        _attribute(OID_PKI_STATUS, core.PrintableString(str(int(status)))),
        _attribute(OID_RECIPIENT_NONCE, core.OctetString(reply_to.recipient_nonce)),
        _attribute(OID_SENDER_NONCE, core.OctetString(sender_nonce or os.urandom(NONCE_BYTES))),
    ]
    content = b""
    if status is PkiStatus.FAILURE:
        if fail_info is None:
            raise ValueError("a FAILURE CertRep needs a failInfo")
        attributes.append(_attribute(OID_FAIL_INFO, core.PrintableString(str(int(fail_info)))))
        if fail_info_text:
            attributes.append(_attribute(OID_FAIL_INFO_TEXT, core.UTF8String(fail_info_text)))
    elif status is PkiStatus.SUCCESS:
        if reply_to.recipient_certificate is None or reply_to.content_cipher is None:
            raise ValueError("a SUCCESS CertRep needs the requester's certificate and cipher")
        if not certificates and not crls:
            raise ValueError("a SUCCESS CertRep needs certificates or CRLs to carry")
        content = build_enveloped_data(
            build_degenerate_signed_data(certificates, crls),
            reply_to.recipient_certificate,
            reply_to.content_cipher,
            KeyTransport.PKCS1V15,
        )
    return build_signed_data(
        content,
        signer_certificate,
        signer_key,
        reply_digest(reply_to.digest_algorithm, allow_sha1),
        attributes,
        [signer_certificate],
    )


def reply_digest(
    request_digest: DigestAlgorithm | None, allow_sha1: bool = False
) -> DigestAlgorithm:
    """The digest for a reply: the client's own when it is SHA-256 or SHA-512 (or SHA-1
    for legacy devices, when allowed), SHA-256 otherwise (what every client accepts)."""
    if request_digest is DigestAlgorithm.SHA512:
        return DigestAlgorithm.SHA512
    if request_digest is DigestAlgorithm.SHA1 and allow_sha1:
        return DigestAlgorithm.SHA1
    return DigestAlgorithm.SHA256


def degenerate_certs_only(
    certificates: Sequence[x509.Certificate],
    crls: Sequence[x509.CertificateRevocationList] = (),
) -> bytes:
    """A certs-only PKCS#7: the GetCACert body for `application/x-x509-ca-ra-cert` (CA and
    RA certificates, RFC 8894 4.2.1.2) and GetNextCACert, DER."""
    return build_degenerate_signed_data(certificates, crls)


# -- payloads ---------------------------------------------------------------------------------


def parse_issuer_and_subject(payload: bytes) -> IssuerAndSubject:
    """The CertPoll payload; ScepError(badRequest) when malformed."""
    try:
        value = _IssuerAndSubject.load(payload, strict=True)
        issuer, subject = value["issuer"], value["subject"]
        return IssuerAndSubject(
            _x509_name(issuer), _x509_name(subject), issuer.dump(), subject.dump()
        )
    except (ValueError, TypeError) as exc:
        raise ScepError(FailInfo.BAD_REQUEST, f"not an IssuerAndSubject: {exc}") from exc


def parse_issuer_and_serial(payload: bytes) -> IssuerAndSerial:
    """The GetCert and GetCRL payload; ScepError(badRequest) when malformed."""
    try:
        value = cms.IssuerAndSerialNumber.load(payload, strict=True)
        issuer = value["issuer"]
        serial_number = int(value["serial_number"].native)
        return IssuerAndSerial(_x509_name(issuer), serial_number, issuer.dump())
    except (ValueError, TypeError) as exc:
        raise ScepError(FailInfo.BAD_REQUEST, f"not an IssuerAndSerialNumber: {exc}") from exc


def encode_issuer_and_subject(issuer: x509.Name, subject: x509.Name) -> bytes:
    value = _IssuerAndSubject(
        {
            "issuer": asn1_x509.Name.load(issuer.public_bytes()),
            "subject": asn1_x509.Name.load(subject.public_bytes()),
        }
    )
    return bytes(value.dump())


def encode_issuer_and_serial(issuer: x509.Name, serial_number: int) -> bytes:
    value = cms.IssuerAndSerialNumber(
        {"issuer": asn1_x509.Name.load(issuer.public_bytes()), "serial_number": serial_number}
    )
    return bytes(value.dump())


class _IssuerAndSubject(core.Sequence):  # type: ignore[misc]
    _fields = [("issuer", asn1_x509.Name), ("subject", asn1_x509.Name)]


def _x509_name(name: Any) -> x509.Name:
    # cryptography has no loader for a bare Name; NameAttribute equality ignores the string
    # type, so the result compares equal to the same name read from a certificate.
    rdns = []
    for rdn in name.chosen:
        attributes = []
        for pair in rdn:
            value = pair["value"].native
            if not isinstance(value, str):
                raise ValueError(f"name attribute {pair['type'].dotted} is not a string")
            attributes.append(x509.NameAttribute(x509.ObjectIdentifier(pair["type"].dotted), value))
        rdns.append(x509.RelativeDistinguishedName(attributes))
    return x509.Name(rdns)


# -- client side (tests, devices-sim) ---------------------------------------------------------


def build_pki_message(
    message_type: MessageType,
    payload: bytes,
    transaction_id: str,
    signer_cert: x509.Certificate,
    signer_key: rsa.RSAPrivateKey,
    recipient_cert: x509.Certificate,
    cipher: ContentCipher | str = ContentCipher.AES128,
    key_transport: KeyTransport | str = KeyTransport.PKCS1V15,
    digest: DigestAlgorithm | str = DigestAlgorithm.SHA256,
    sender_nonce: bytes | None = None,
) -> bytes:
    """A client's pkiMessage: `payload` encrypted to the CA/RA `recipient_cert`, signed."""
    envelope = build_enveloped_data(
        payload, recipient_cert, ContentCipher(cipher), KeyTransport(key_transport)
    )
    return sign_pki_message(
        message_type, envelope, transaction_id, signer_cert, signer_key, digest, sender_nonce
    )


def sign_pki_message(
    message_type: MessageType,
    envelope: bytes,
    transaction_id: str,
    signer_cert: x509.Certificate,
    signer_key: rsa.RSAPrivateKey,
    digest: DigestAlgorithm | str = DigestAlgorithm.SHA256,
    sender_nonce: bytes | None = None,
) -> bytes:
    """The signing half of `build_pki_message`, for an envelope made elsewhere."""
    attributes = [
        _attribute(OID_MESSAGE_TYPE, core.PrintableString(str(int(message_type)))),
        _attribute(OID_TRANSACTION_ID, core.PrintableString(transaction_id)),
        _attribute(OID_SENDER_NONCE, core.OctetString(sender_nonce or os.urandom(NONCE_BYTES))),
    ]
    return build_signed_data(
        envelope, signer_cert, signer_key, DigestAlgorithm(digest), attributes, [signer_cert]
    )


@dataclass(frozen=True)
class CertRep:
    """A CertRep as a client reads it."""

    status: PkiStatus
    fail_info: FailInfo | None
    fail_info_text: str | None
    transaction_id: str
    recipient_nonce: bytes
    sender_nonce: bytes
    certificates: tuple[x509.Certificate, ...]
    crls: tuple[x509.CertificateRevocationList, ...]
    signer_certificate: x509.Certificate


def parse_cert_rep(
    data: bytes,
    requester_key: rsa.RSAPrivateKey,
    ca_certs: Sequence[x509.Certificate],
    *,
    requester_cert: x509.Certificate | None = None,
) -> CertRep:
    """Read a CertRep, trusting only a signature by one of `ca_certs` (what GetCACert gave).

    The envelope is opened with `requester_key`; with `requester_cert` it must also be
    addressed to that certificate. Raises ScepError (UnreadableMessage for non-CMS input)."""
    try:
        signed_data = load_content_info(data, "signed_data")
        attributes = signed_attributes(only_signer(signed_data))
    except CmsError as exc:
        raise UnreadableMessage(f"not a CertRep: {exc}") from exc
    with _as_scep_error(None):
        verified = verify_signed_data(signed_data, trusted_signers=ca_certs)
    try:
        message_type = _string_attribute(attributes, OID_MESSAGE_TYPE)
        status = PkiStatus(int(_string_attribute(attributes, OID_PKI_STATUS) or ""))
        fail_info_value = _string_attribute(attributes, OID_FAIL_INFO)
        fail_info = FailInfo(int(fail_info_value)) if fail_info_value is not None else None
        transaction_id = _string_attribute(attributes, OID_TRANSACTION_ID)
        recipient_nonce = _octets_attribute(attributes, OID_RECIPIENT_NONCE)
        sender_nonce = _octets_attribute(attributes, OID_SENDER_NONCE)
        fail_info_text = _string_attribute(attributes, OID_FAIL_INFO_TEXT)
    except ValueError as exc:
        raise ScepError(FailInfo.BAD_REQUEST, f"a malformed CertRep attribute: {exc}") from exc
    if message_type != str(int(MessageType.CERT_REP)):
        raise ScepError(FailInfo.BAD_REQUEST, f"messageType {message_type!r} is not CertRep")
    if transaction_id is None or recipient_nonce is None or sender_nonce is None:
        raise ScepError(FailInfo.BAD_REQUEST, "transactionID or a nonce missing from CertRep")
    certificates: list[x509.Certificate] = []
    crls: list[x509.CertificateRevocationList] = []
    if status is PkiStatus.SUCCESS:
        with _as_scep_error(None):
            enveloped = load_content_info(verified.content, "enveloped_data")
            opened = decrypt_enveloped_data(enveloped, [(requester_cert, requester_key)])
            degenerate = load_content_info(opened.content, "signed_data")
            certificates = embedded_certificates(degenerate)
            crls = embedded_crls(degenerate)
    return CertRep(
        status=status,
        fail_info=fail_info,
        fail_info_text=fail_info_text,
        transaction_id=transaction_id,
        recipient_nonce=recipient_nonce,
        sender_nonce=sender_nonce,
        certificates=tuple(certificates),
        crls=tuple(crls),
        signer_certificate=verified.signer_certificate,
    )


# -- attributes -------------------------------------------------------------------------------


def _attribute(oid: str, value: Any) -> tuple[str, Any]:
    """A signed attribute for :func:`build_signed_data`: its type and its one value."""
    return (oid, value)


def _single_value(attributes: dict[str, list[Any]], oid: str) -> Any:
    values = attributes.get(oid)
    if not values:
        return None
    if len(values) != 1:
        raise ValueError(f"attribute {oid} has {len(values)} values")
    value = values[0]
    # SCEP's attribute types are unknown to asn1crypto: their values arrive as Any.
    return value.parse() if isinstance(value, core.Any) else value


def _string_attribute(attributes: dict[str, list[Any]], oid: str) -> str | None:
    value = _single_value(attributes, oid)
    if value is None:
        return None
    # RFC 8894 says PrintableString; some clients write UTF8String or IA5String.
    if not isinstance(value, core.PrintableString | core.UTF8String | core.IA5String):
        raise ValueError(f"attribute {oid} is not a string")
    return str(value.native)


def _octets_attribute(attributes: dict[str, list[Any]], oid: str) -> bytes | None:
    value = _single_value(attributes, oid)
    if value is None:
        return None
    if not isinstance(value, core.OctetString):
        raise ValueError(f"attribute {oid} is not an OCTET STRING")
    return bytes(value.native)


def _signing_time(attributes: dict[str, list[Any]]) -> datetime | None:
    values = attributes.get("1.2.840.113549.1.9.5")
    if not values or len(values) != 1:
        return None
    moment = values[0].native
    return moment if isinstance(moment, datetime) else None
