"""SCEP wire format (RFC 8894): pkiMessage parsing, CertRep building, and both checked
against OpenSSL's independent CMS implementation (`openssl cms`)."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import cms as asn1_cms
from asn1crypto import core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID

from pkigate.core.der import tlv
from pkigate.scep import cms
from pkigate.scep.messages import (
    SCEP_MAX_MESSAGE_BYTES,
    ContentCipher,
    DigestAlgorithm,
    FailInfo,
    KeyTransport,
    MessageType,
    PkiStatus,
    ReplyTo,
    ScepError,
    UnreadableMessage,
    build_cert_rep,
    build_pki_message,
    degenerate_certs_only,
    encode_issuer_and_serial,
    encode_issuer_and_subject,
    parse_cert_rep,
    parse_pki_message,
    sign_pki_message,
)

DER = serialization.Encoding.DER
PEM = serialization.Encoding.PEM
HEX_TRANSACTION_ID = "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08"
CERTMONGER_TRANSACTION_ID = "1234567890987654321"
NONCE = bytes(range(16))

needs_openssl = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="the openssl command is not installed"
)


# -- a small PKI: CA, RA, a device, and a stranger ---------------------------------------------


@dataclass(frozen=True)
class Party:
    name: str
    key: rsa.RSAPrivateKey
    cert: x509.Certificate


@dataclass(frozen=True)
class Pki:
    ca: Party
    ra: Party
    device: Party
    stranger: Party
    csr: x509.CertificateSigningRequest
    issued: x509.Certificate

    @property
    def recipients(self) -> list[tuple[x509.Certificate, rsa.RSAPrivateKey]]:
        return [(self.ca.cert, self.ca.key), (self.ra.cert, self.ra.key)]


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pkigate tests"),
        ]
    )


def _certificate(
    subject: x509.Name,
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    issuer: Party | None = None,
    ca: bool = False,
) -> x509.Certificate:
    now = datetime.now(UTC)
    issuer_name = issuer.cert.subject if issuer else subject
    signing_key = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if not ca:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, True, False, False, False, False, False, False), True
        )
    return builder.sign(signing_key, hashes.SHA256())


def _party(name: str, issuer: Party | None = None, ca: bool = False) -> Party:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return Party(name, key, _certificate(_name(name), key, issuer, ca))


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca = _party("SCEP Test CA", ca=True)
    ra = _party("SCEP Test RA", issuer=ca)
    device = _party("device-1")  # self-signed, as for a first PKCSReq
    stranger = _party("Some Other Server")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(device.cert.subject)
        .sign(device.key, hashes.SHA256())
    )
    issued = _certificate(device.cert.subject, device.key, issuer=ca)
    return Pki(ca, ra, device, stranger, csr, issued)


def pkcs_req(pki: Pki, **kwargs: Any) -> bytes:
    arguments: dict[str, Any] = {
        "message_type": MessageType.PKCS_REQ,
        "payload": pki.csr.public_bytes(DER),
        "transaction_id": HEX_TRANSACTION_ID,
        "signer_cert": pki.device.cert,
        "signer_key": pki.device.key,
        "recipient_cert": pki.ra.cert,
        "sender_nonce": NONCE,
    }
    arguments.update(kwargs)
    return build_pki_message(**arguments)


def raises_scep(fail_info: FailInfo, call: Callable[[], object]) -> ScepError:
    with pytest.raises(ScepError) as caught:
        call()
    assert caught.value.fail_info is fail_info, caught.value
    return caught.value


def reply_parts(reply: bytes) -> tuple[str, str | None]:
    """(digest algorithm of the reply's signer, content cipher of its envelope or None)."""
    signed_data = asn1_cms.ContentInfo.load(reply)["content"]
    digest = signed_data["signer_infos"][0]["digest_algorithm"]["algorithm"].native
    content = signed_data["encap_content_info"]["content"].native
    if not content:
        return digest, None
    enveloped = asn1_cms.ContentInfo.load(content)["content"]
    algorithm = enveloped["encrypted_content_info"]["content_encryption_algorithm"]
    return digest, algorithm["algorithm"].native


# -- round trips ------------------------------------------------------------------------------


# Single DES is accepted but never answered with: tests/test_scep.py covers it.
REPLY_CIPHERS = [c for c in ContentCipher if c is not ContentCipher.DES]


@pytest.mark.parametrize("key_transport", list(KeyTransport))
@pytest.mark.parametrize("cipher", REPLY_CIPHERS)
def test_pkcsreq_round_trip_for_each_cipher_and_key_transport(
    pki: Pki, cipher: ContentCipher, key_transport: KeyTransport
) -> None:
    message = parse_pki_message(
        pkcs_req(pki, cipher=cipher, key_transport=key_transport), pki.recipients
    )

    assert message.message_type is MessageType.PKCS_REQ
    assert message.transaction_id == HEX_TRANSACTION_ID
    assert message.sender_nonce == NONCE
    assert message.signer_certificate == pki.device.cert
    assert message.recipient_certificate == pki.ra.cert
    assert message.content_encryption_algorithm is cipher
    expected_transport = (
        KeyTransport.PKCS1V15 if key_transport is KeyTransport.PKCS1V15 else (KeyTransport.OAEP)
    )
    assert message.key_transport is expected_transport
    assert message.csr() == pki.csr
    assert message.signing_time is not None

    reply = build_cert_rep(
        message.reply_to,
        PkiStatus.SUCCESS,
        pki.ra.cert,
        pki.ra.key,
        certificates=[pki.issued, pki.ca.cert],
    )
    # The reply is encrypted with the client's own algorithm, never anything weaker.
    assert reply_parts(reply)[1] == cipher.asn1_name
    rep = parse_cert_rep(reply, pki.device.key, [pki.ca.cert, pki.ra.cert])
    assert rep.status is PkiStatus.SUCCESS
    assert rep.transaction_id == HEX_TRANSACTION_ID
    assert rep.recipient_nonce == NONCE
    assert rep.certificates == (pki.issued, pki.ca.cert)  # issued first: clients take [0]
    assert rep.signer_certificate == pki.ra.cert


@pytest.mark.parametrize(
    ("digest", "allow_sha1", "reply_digest"),
    [
        (DigestAlgorithm.SHA1, False, "sha256"),
        (DigestAlgorithm.SHA1, True, "sha1"),
        (DigestAlgorithm.SHA224, False, "sha256"),
        (DigestAlgorithm.SHA256, False, "sha256"),
        (DigestAlgorithm.SHA384, False, "sha256"),
        (DigestAlgorithm.SHA512, False, "sha512"),
    ],
)
def test_reply_digest_follows_the_client_within_sha256_sha512_and_legacy_sha1(
    pki: Pki, digest: DigestAlgorithm, allow_sha1: bool, reply_digest: str
) -> None:
    message = parse_pki_message(pkcs_req(pki, digest=digest), pki.recipients)
    assert message.signer_digest_algorithm is digest

    reply = build_cert_rep(
        message.reply_to,
        PkiStatus.SUCCESS,
        pki.ca.cert,
        pki.ca.key,
        certificates=[pki.issued],
        allow_sha1=allow_sha1,
    )

    assert reply_parts(reply)[0] == reply_digest
    rep = parse_cert_rep(reply, pki.device.key, [pki.ca.cert], requester_cert=pki.device.cert)
    assert rep.certificates == (pki.issued,)


@pytest.mark.parametrize("transaction_id", [CERTMONGER_TRANSACTION_ID, HEX_TRANSACTION_ID])
def test_transaction_id_decimal_or_hex_is_read_and_echoed(pki: Pki, transaction_id: str) -> None:
    message = parse_pki_message(pkcs_req(pki, transaction_id=transaction_id), pki.recipients)
    assert message.transaction_id == transaction_id

    reply = build_cert_rep(message.reply_to, PkiStatus.PENDING, pki.ca.cert, pki.ca.key)
    assert parse_cert_rep(reply, pki.device.key, [pki.ca.cert]).transaction_id == transaction_id


def test_renewal_request_signed_by_the_issued_certificate(pki: Pki) -> None:
    data = pkcs_req(pki, message_type=MessageType.RENEWAL_REQ, signer_cert=pki.issued)
    message = parse_pki_message(data, pki.recipients)
    assert message.message_type is MessageType.RENEWAL_REQ
    assert message.signer_certificate == pki.issued
    assert message.raw == data


def test_cert_poll_payload_is_issuer_and_subject(pki: Pki) -> None:
    payload = encode_issuer_and_subject(pki.ca.cert.subject, pki.csr.subject)
    data = pkcs_req(pki, message_type=MessageType.CERT_POLL, payload=payload)
    message = parse_pki_message(data, pki.recipients)
    assert message.message_type is MessageType.CERT_POLL
    poll = message.issuer_and_subject()
    assert poll.issuer == pki.ca.cert.subject
    assert poll.subject == pki.csr.subject
    assert poll.issuer_der == pki.ca.cert.subject.public_bytes()


def test_get_cert_payload_is_issuer_and_serial_and_reply_carries_the_certificate(
    pki: Pki,
) -> None:
    payload = encode_issuer_and_serial(pki.issued.issuer, pki.issued.serial_number)
    data = pkcs_req(pki, message_type=MessageType.GET_CERT, payload=payload, signer_cert=pki.issued)
    message = parse_pki_message(data, pki.recipients)
    wanted = message.issuer_and_serial()
    assert (wanted.issuer, wanted.serial_number) == (pki.issued.issuer, pki.issued.serial_number)

    reply = build_cert_rep(
        message.reply_to, PkiStatus.SUCCESS, pki.ca.cert, pki.ca.key, certificates=[pki.issued]
    )
    assert parse_cert_rep(reply, pki.device.key, [pki.ca.cert]).certificates == (pki.issued,)


def test_get_crl_reply_carries_the_crl(pki: Pki) -> None:
    payload = encode_issuer_and_serial(pki.issued.issuer, pki.issued.serial_number)
    data = pkcs_req(pki, message_type=MessageType.GET_CRL, payload=payload, signer_cert=pki.issued)
    message = parse_pki_message(data, pki.recipients)
    now = datetime.now(UTC)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(pki.ca.cert.subject)
        .last_update(now)
        .next_update(now + timedelta(days=1))
        .sign(pki.ca.key, hashes.SHA256())
    )

    reply = build_cert_rep(message.reply_to, PkiStatus.SUCCESS, pki.ca.cert, pki.ca.key, crls=[crl])

    rep = parse_cert_rep(reply, pki.device.key, [pki.ca.cert])
    assert rep.crls == (crl,)
    assert rep.certificates == ()


def test_malformed_poll_payload_is_bad_request_with_a_reply_address(pki: Pki) -> None:
    data = pkcs_req(pki, message_type=MessageType.CERT_POLL, payload=b"\x30\x03\x02\x01\x01")
    message = parse_pki_message(data, pki.recipients)
    error = raises_scep(FailInfo.BAD_REQUEST, message.issuer_and_subject)
    assert error.reply_to == message.reply_to


# -- replies ----------------------------------------------------------------------------------


def test_failure_carries_fail_info_and_fail_info_text(pki: Pki) -> None:
    message = parse_pki_message(pkcs_req(pki), pki.recipients)
    reply = build_cert_rep(
        message.reply_to,
        PkiStatus.FAILURE,
        pki.ca.cert,
        pki.ca.key,
        fail_info=FailInfo.BAD_REQUEST,
        fail_info_text="challenge password refused — ask your MDM for a new one",
    )

    rep = parse_cert_rep(reply, pki.device.key, [pki.ca.cert])
    assert rep.status is PkiStatus.FAILURE
    assert rep.fail_info is FailInfo.BAD_REQUEST
    assert rep.fail_info_text == "challenge password refused — ask your MDM for a new one"
    assert rep.certificates == ()
    assert reply_parts(reply)[1] is None  # no envelope on FAILURE


def test_recipient_nonce_is_the_sender_nonce_and_sender_nonces_are_fresh(pki: Pki) -> None:
    message = parse_pki_message(pkcs_req(pki, sender_nonce=os.urandom(16)), pki.recipients)
    replies = [
        parse_cert_rep(
            build_cert_rep(message.reply_to, PkiStatus.PENDING, pki.ca.cert, pki.ca.key),
            pki.device.key,
            [pki.ca.cert],
        )
        for _ in range(2)
    ]

    assert all(rep.recipient_nonce == message.sender_nonce for rep in replies)
    assert all(len(rep.sender_nonce) == 16 for rep in replies)
    assert replies[0].sender_nonce != replies[1].sender_nonce
    assert message.sender_nonce not in {rep.sender_nonce for rep in replies}
    assert replies[0].status is PkiStatus.PENDING and replies[0].fail_info is None


def test_failure_without_fail_info_and_success_without_certificates_are_refused(
    pki: Pki,
) -> None:
    reply_to = ReplyTo("1", NONCE)
    with pytest.raises(ValueError, match="failInfo"):
        build_cert_rep(reply_to, PkiStatus.FAILURE, pki.ca.cert, pki.ca.key)
    with pytest.raises(ValueError, match="requester"):
        build_cert_rep(
            reply_to, PkiStatus.SUCCESS, pki.ca.cert, pki.ca.key, certificates=[pki.issued]
        )


def test_cert_rep_signed_by_an_untrusted_certificate_is_rejected_by_the_client(
    pki: Pki,
) -> None:
    message = parse_pki_message(pkcs_req(pki), pki.recipients)
    reply = build_cert_rep(
        message.reply_to,
        PkiStatus.SUCCESS,
        pki.stranger.cert,
        pki.stranger.key,
        certificates=[pki.issued],
    )
    raises_scep(
        FailInfo.BAD_MESSAGE_CHECK, lambda: parse_cert_rep(reply, pki.device.key, [pki.ca.cert])
    )


def test_degenerate_certs_only_keeps_the_order_given(pki: Pki) -> None:
    data = degenerate_certs_only([pki.ra.cert, pki.ca.cert])
    signed_data = cms.load_content_info(data, "signed_data")
    assert cms.embedded_certificates(signed_data) == [pki.ra.cert, pki.ca.cert]
    assert len(signed_data["signer_infos"]) == 0
    assert signed_data["encap_content_info"]["content"].native is None


# -- BER with indefinite lengths (Apple) ------------------------------------------------------


def _read_tlv(data: bytes, pos: int) -> tuple[int, int, int, int]:
    """(tag, content start, content end, next position) of a DER element at `pos`."""
    tag = data[pos]
    length = data[pos + 1]
    start = pos + 2
    if length & 0x80:
        count = length & 0x7F
        length = int.from_bytes(data[start : start + count], "big")
        start += count
    return tag, start, start + length, start + length


def to_indefinite_ber(der: bytes, verbatim: set[bytes]) -> bytes:
    """Re-encode DER the way Apple's streaming CMS encoder does: every constructed value
    with an indefinite length, long OCTET STRINGs (and the [0] IMPLICIT encryptedContent)
    as constructed strings of 64-byte chunks. Elements in `verbatim` (certificates, signed
    attributes: what others have signed) are copied as they are."""
    out = bytearray()
    pos = 0
    while pos < len(der):
        tag, start, end, following = _read_tlv(der, pos)
        element = der[pos:following]
        if element in verbatim:
            out += element
        elif tag & 0x20:
            out += bytes([tag, 0x80]) + to_indefinite_ber(der[start:end], verbatim) + b"\0\0"
        elif tag in (0x04, 0x80) and end - start > 64:
            out += bytes([tag | 0x20, 0x80])
            for chunk in range(start, end, 64):
                piece = der[chunk : min(chunk + 64, end)]
                out += bytes([0x04, len(piece)]) + piece
            out += b"\0\0"
        else:
            out += element
        pos = following
    return bytes(out)


def test_indefinite_length_ber_message_is_read(pki: Pki) -> None:
    envelope = cms.build_enveloped_data(
        pki.csr.public_bytes(DER), pki.ra.cert, ContentCipher.AES128
    )
    ber_envelope = to_indefinite_ber(envelope, {pki.ra.cert.public_bytes(DER)})
    der = sign_pki_message(
        MessageType.PKCS_REQ,
        ber_envelope,
        HEX_TRANSACTION_ID,
        pki.device.cert,
        pki.device.key,
        sender_nonce=NONCE,
    )
    signer_info = asn1_cms.ContentInfo.load(der)["content"]["signer_infos"][0]
    ber = to_indefinite_ber(
        der, {signer_info["signed_attrs"].dump(), pki.device.cert.public_bytes(DER)}
    )
    assert ber.startswith(b"\x30\x80") and ber != der

    message = parse_pki_message(ber, pki.recipients)

    assert message.payload == pki.csr.public_bytes(DER)
    assert message.transaction_id == HEX_TRANSACTION_ID
    assert message.sender_nonce == NONCE


# -- bad input --------------------------------------------------------------------------------


def _flip_last_byte_of(data: bytes, part: bytes) -> bytes:
    index = data.index(part) + len(part) - 1
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def test_tampered_signature_is_bad_message_check_with_a_reply_address(pki: Pki) -> None:
    data = pkcs_req(pki)
    signature = asn1_cms.ContentInfo.load(data)["content"]["signer_infos"][0]["signature"].native

    error = raises_scep(
        FailInfo.BAD_MESSAGE_CHECK,
        lambda: parse_pki_message(_flip_last_byte_of(data, signature), pki.recipients),
    )

    assert not isinstance(error, UnreadableMessage)
    assert error.reply_to is not None
    assert error.reply_to.transaction_id == HEX_TRANSACTION_ID
    assert error.reply_to.recipient_nonce == NONCE
    # ... so a signed FAILURE can go back to the client.
    reply = build_cert_rep(
        error.reply_to, PkiStatus.FAILURE, pki.ca.cert, pki.ca.key, fail_info=error.fail_info
    )
    rep = parse_cert_rep(reply, pki.device.key, [pki.ca.cert])
    assert (rep.fail_info, rep.recipient_nonce) == (FailInfo.BAD_MESSAGE_CHECK, NONCE)


def test_tampered_content_is_bad_message_check(pki: Pki) -> None:
    data = pkcs_req(pki)
    content = asn1_cms.ContentInfo.load(data)["content"]["encap_content_info"]["content"].native
    raises_scep(
        FailInfo.BAD_MESSAGE_CHECK,
        lambda: parse_pki_message(_flip_last_byte_of(data, content), pki.recipients),
    )


def test_signature_by_a_key_other_than_the_included_certificate_is_bad_message_check(
    pki: Pki,
) -> None:
    data = pkcs_req(pki, signer_key=pki.stranger.key)
    raises_scep(FailInfo.BAD_MESSAGE_CHECK, lambda: parse_pki_message(data, pki.recipients))


def test_message_encrypted_to_another_certificate_is_bad_message_check(pki: Pki) -> None:
    data = pkcs_req(pki, recipient_cert=pki.stranger.cert)
    error = raises_scep(FailInfo.BAD_MESSAGE_CHECK, lambda: parse_pki_message(data, pki.recipients))
    assert error.reply_to is not None and error.reply_to.transaction_id == HEX_TRANSACTION_ID


def test_envelope_that_does_not_decrypt_with_our_key_is_bad_message_check(pki: Pki) -> None:
    # Addressed to the RA certificate, but the key we try is not its key: the PKCS#1 v1.5
    # failure must look like any other decryption failure (RFC 3218 2.3.2). OpenSSL's
    # implicit rejection answers a wrong key with a key of its own, never an error, and
    # about one envelope in 256 then unpads into noise (CI met one): that one holds no
    # request, which the issuance refuses. Three fresh envelopes: each is refused here or
    # holds no request, and at least one is refused as a decryption failure.
    refused = 0
    for _ in range(3):
        data = pkcs_req(pki)
        try:
            opened = parse_pki_message(data, [(pki.ra.cert, pki.stranger.key)])
        except ScepError as exc:
            assert exc.fail_info is FailInfo.BAD_MESSAGE_CHECK, exc
            refused += 1
        else:
            with pytest.raises(ValueError):
                x509.load_der_x509_csr(opened.payload)
    assert refused >= 1


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"garbage, not CMS at all", id="garbage"),
        pytest.param(b"\x30\x82\xff\xff\x06\x09", id="truncated-header"),
    ],
)
def test_garbage_is_unreadable(pki: Pki, data: bytes) -> None:
    with pytest.raises(UnreadableMessage):
        parse_pki_message(data, pki.recipients)


def test_mutated_messages_only_ever_raise_scep_errors(pki: Pki) -> None:
    # Bad input is answered (a FAILURE or HTTP 400), never crashes a worker: a fixed-seed
    # sample of byte edits to a DER and a BER request, each parsed or refused with ScepError.
    der = pkcs_req(pki)
    signer_info = asn1_cms.ContentInfo.load(der)["content"]["signer_infos"][0]
    ber = to_indefinite_ber(
        der, {signer_info["signed_attrs"].dump(), pki.device.cert.public_bytes(DER)}
    )
    generator = random.Random(8894)
    for base in (der, ber):
        for _ in range(250):
            data = bytearray(base)
            position = generator.randrange(len(data))
            edit = generator.randrange(3)
            if edit == 0:
                data[position] = generator.randrange(256)
            elif edit == 1:
                del data[position]
            else:
                data.insert(position, generator.randrange(256))
            with contextlib.suppress(ScepError):
                parse_pki_message(bytes(data), pki.recipients)


def test_truncated_message_is_unreadable(pki: Pki) -> None:
    data = pkcs_req(pki)
    for length in (len(data) - 1, len(data) // 2, 10):
        with pytest.raises(UnreadableMessage):
            parse_pki_message(data[:length], pki.recipients)


def test_wrong_content_type_and_oversize_are_unreadable(pki: Pki) -> None:
    envelope = cms.build_enveloped_data(b"x", pki.ra.cert, ContentCipher.AES128)
    with pytest.raises(UnreadableMessage, match="enveloped_data"):
        parse_pki_message(envelope, pki.recipients)
    with pytest.raises(UnreadableMessage):
        parse_pki_message(b"\x30" * (SCEP_MAX_MESSAGE_BYTES + 1), pki.recipients)


def _signed_with_attributes(pki: Pki, attributes: list[Any]) -> bytes:
    envelope = cms.build_enveloped_data(
        pki.csr.public_bytes(DER), pki.ra.cert, ContentCipher.AES128
    )
    return cms.build_signed_data(
        envelope,
        pki.device.cert,
        pki.device.key,
        DigestAlgorithm.SHA256,
        attributes,
        [pki.device.cert],
    )


def _attribute(oid: str, value: Any) -> tuple[str, Any]:
    return (oid, value)


MESSAGE_TYPE_19 = _attribute("2.16.840.1.113733.1.9.2", core.PrintableString("19"))
TRANSACTION_ID = _attribute("2.16.840.1.113733.1.9.7", core.PrintableString("42"))
SENDER_NONCE = _attribute("2.16.840.1.113733.1.9.5", core.OctetString(NONCE))


def test_missing_message_type_is_bad_request_with_a_reply_address(pki: Pki) -> None:
    data = _signed_with_attributes(pki, [TRANSACTION_ID, SENDER_NONCE])
    error = raises_scep(FailInfo.BAD_REQUEST, lambda: parse_pki_message(data, pki.recipients))
    assert error.reply_to is not None and error.reply_to.transaction_id == "42"


@pytest.mark.parametrize(
    "attributes", [[MESSAGE_TYPE_19, SENDER_NONCE], [MESSAGE_TYPE_19, TRANSACTION_ID]]
)
def test_missing_transaction_id_or_sender_nonce_is_unreadable_bad_request(
    pki: Pki, attributes: list[Any]
) -> None:
    data = _signed_with_attributes(pki, attributes)
    with pytest.raises(UnreadableMessage) as caught:
        parse_pki_message(data, pki.recipients)
    assert caught.value.fail_info is FailInfo.BAD_REQUEST


def test_a_cert_rep_sent_as_a_request_is_bad_request(pki: Pki) -> None:
    data = pkcs_req(pki, message_type=MessageType.CERT_REP)
    raises_scep(FailInfo.BAD_REQUEST, lambda: parse_pki_message(data, pki.recipients))


def _with_content_algorithm(pki: Pki, algorithm: dict[str, Any]) -> bytes:
    envelope = asn1_cms.ContentInfo.load(
        cms.build_enveloped_data(pki.csr.public_bytes(DER), pki.ra.cert, ContentCipher.AES128)
    )
    encrypted = envelope["content"]["encrypted_content_info"]
    encrypted["content_encryption_algorithm"] = algorithm
    return sign_pki_message(
        MessageType.PKCS_REQ, envelope.dump(force=True), "7", pki.device.cert, pki.device.key
    )


@pytest.mark.parametrize(
    "algorithm",
    [
        pytest.param(
            {"algorithm": "rc2", "parameters": {"rc2_parameter_version": 58, "iv": b"8 bytes!"}},
            id="rc2",
        ),
        pytest.param(
            {"algorithm": "aes128_ofb", "parameters": core.OctetString(bytes(16))}, id="aes-ofb"
        ),
    ],
)
def test_rc2_and_unknown_ciphers_are_bad_alg(pki: Pki, algorithm: dict[str, Any]) -> None:
    data = _with_content_algorithm(pki, algorithm)
    error = raises_scep(FailInfo.BAD_ALG, lambda: parse_pki_message(data, pki.recipients))
    assert error.reply_to is not None and error.reply_to.transaction_id == "7"


def test_elliptic_curve_signer_is_bad_alg(pki: Pki) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(_name("ec-device"), key)
    envelope = cms.build_enveloped_data(b"csr", pki.ra.cert, ContentCipher.AES128)
    attributes = [
        ("content_type", "data"),
        ("message_digest", hashes_sha256(envelope)),
        MESSAGE_TYPE_19,
        TRANSACTION_ID,
        SENDER_NONCE,
    ]
    signed_attrs = asn1_cms.CMSAttributes(
        [asn1_cms.CMSAttribute({"type": oid, "values": [value]}) for oid, value in attributes]
    )
    signature = key.sign(signed_attrs.dump(), ec.ECDSA(hashes.SHA256()))
    data = _assemble_signed_data(envelope, cert, signed_attrs, "sha256_ecdsa", signature)
    raises_scep(FailInfo.BAD_ALG, lambda: parse_pki_message(data, pki.recipients))


def hashes_sha256(data: bytes) -> bytes:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    return digest.finalize()


def _assemble_signed_data(
    content: bytes, cert: x509.Certificate, signed_attrs: Any, algorithm: str, signature: bytes
) -> bytes:
    certificate = asn1_x509.Certificate.load(cert.public_bytes(DER))
    signer_info = asn1_cms.SignerInfo(
        {
            "version": "v1",
            "sid": asn1_cms.SignerIdentifier(
                name="issuer_and_serial_number",
                value={"issuer": certificate.issuer, "serial_number": cert.serial_number},
            ),
            "digest_algorithm": {"algorithm": "sha256"},
            "signed_attrs": signed_attrs,
            "signature_algorithm": {"algorithm": algorithm},
            "signature": signature,
        }
    )
    signed_data = asn1_cms.SignedData(
        {
            "version": "v1",
            "digest_algorithms": [{"algorithm": "sha256"}],
            "encap_content_info": {"content_type": "data", "content": content},
            "certificates": [certificate],
            "signer_infos": [signer_info],
        }
    )
    return bytes(
        asn1_cms.ContentInfo({"content_type": "signed_data", "content": signed_data}).dump()
    )


# -- interop with OpenSSL's CMS ---------------------------------------------------------------


def openssl(directory: Path, command: str) -> bytes:
    """Run `openssl` with `command` split on spaces (file names here have none)."""
    result = subprocess.run(
        ["openssl", *command.split()], cwd=directory, capture_output=True, check=False
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


def subjects(printed: str) -> list[str]:
    """The subject common names, in order, from `openssl pkcs7 -print_certs` output."""
    lines = [line for line in printed.splitlines() if line.startswith("subject=")]
    return [line.replace(" = ", "=").split("CN=")[1].split(",")[0] for line in lines]


def write_party(directory: Path, party: Party) -> str:
    """Write the party's certificate and key as NAME.pem and NAME.key; returns NAME."""
    stem = party.name.replace(" ", "-")
    (directory / f"{stem}.pem").write_bytes(party.cert.public_bytes(PEM))
    key = party.key.private_bytes(
        PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (directory / f"{stem}.key").write_bytes(key)
    return stem


@needs_openssl
@pytest.mark.parametrize(
    ("options", "cipher", "transport"),
    [
        ("-aes256", ContentCipher.AES256, KeyTransport.PKCS1V15),
        ("-aes128 -keyopt rsa_padding_mode:oaep", ContentCipher.AES128, KeyTransport.OAEP),
        (
            "-aes192 -keyopt rsa_padding_mode:oaep -keyopt rsa_oaep_md:sha256",
            ContentCipher.AES192,
            KeyTransport.OAEP,
        ),
        ("-des3 -keyid", ContentCipher.DES3, KeyTransport.PKCS1V15),
    ],
    ids=["aes256-pkcs1", "aes128-oaep", "aes192-oaep-sha256", "des3-subject-key-id"],
)
def test_openssl_envelope_is_decrypted(
    pki: Pki, tmp_path: Path, options: str, cipher: ContentCipher, transport: KeyTransport
) -> None:
    ra = write_party(tmp_path, pki.ra)
    (tmp_path / "csr.der").write_bytes(pki.csr.public_bytes(DER))
    cipher_option, _, key_options = options.partition(" ")
    # -stream writes BER with indefinite lengths, as Apple's encoder does; -keyopt applies
    # to the -recip before it.
    envelope = openssl(
        tmp_path,
        f"cms -encrypt -binary -stream -outform DER -in csr.der {cipher_option}"
        f" -recip {ra}.pem {key_options}",
    )
    assert envelope.startswith(b"\x30\x80")

    opened = cms.decrypt_enveloped_data(
        cms.load_content_info(envelope, "enveloped_data"), pki.recipients
    )
    assert opened.content == pki.csr.public_bytes(DER)
    assert (opened.cipher, opened.key_transport) == (cipher, transport)
    assert opened.recipient_certificate == pki.ra.cert

    # The same envelope inside a SCEP pkiMessage goes through the full parse.
    data = sign_pki_message(
        MessageType.PKCS_REQ, envelope, "31337", pki.device.cert, pki.device.key
    )
    message = parse_pki_message(data, pki.recipients)
    assert message.payload == pki.csr.public_bytes(DER)
    assert message.content_encryption_algorithm is cipher


@needs_openssl
def test_openssl_signed_data_is_verified_and_tampering_detected(pki: Pki, tmp_path: Path) -> None:
    device = write_party(tmp_path, pki.device)
    (tmp_path / "content.bin").write_bytes(os.urandom(3000))
    signed = openssl(
        tmp_path,
        "cms -sign -nodetach -binary -stream -outform DER -md sha512 -in content.bin"
        f" -signer {device}.pem -inkey {device}.key",
    )
    assert signed.startswith(b"\x30\x80")

    verified = cms.verify_signed_data(cms.load_content_info(signed, "signed_data"))

    assert verified.content == (tmp_path / "content.bin").read_bytes()
    assert verified.signer_certificate == pki.device.cert
    assert verified.digest_algorithm is DigestAlgorithm.SHA512
    tampered = _flip_last_byte_of(signed, verified.content[1000:1032])
    with pytest.raises(cms.SignatureInvalid):
        cms.verify_signed_data(cms.load_content_info(tampered, "signed_data"))


@needs_openssl
@pytest.mark.parametrize(
    ("cipher", "key_transport"),
    [(cipher, KeyTransport.PKCS1V15) for cipher in REPLY_CIPHERS]
    + [(ContentCipher.AES256, KeyTransport.OAEP), (ContentCipher.AES128, KeyTransport.OAEP_SHA256)],
)
def test_openssl_reads_our_request_and_our_cert_rep(
    pki: Pki, tmp_path: Path, cipher: ContentCipher, key_transport: KeyTransport
) -> None:
    ca, ra, device = (write_party(tmp_path, p) for p in (pki.ca, pki.ra, pki.device))
    request = pkcs_req(pki, cipher=cipher, key_transport=key_transport)
    (tmp_path / "request.der").write_bytes(request)
    openssl(tmp_path, "cms -verify -noverify -inform DER -in request.der -out envelope.der")
    csr = openssl(
        tmp_path, f"cms -decrypt -inform DER -in envelope.der -recip {ra}.pem -inkey {ra}.key"
    )
    assert csr == pki.csr.public_bytes(DER)

    message = parse_pki_message((tmp_path / "request.der").read_bytes(), pki.recipients)
    reply = build_cert_rep(
        message.reply_to,
        PkiStatus.SUCCESS,
        pki.ra.cert,
        pki.ra.key,
        certificates=[pki.issued, pki.ca.cert],
    )
    (tmp_path / "reply.der").write_bytes(reply)
    # The RA's signature checks out up to the CA, and the envelope opens with the device key.
    openssl(
        tmp_path,
        f"cms -verify -purpose any -CAfile {ca}.pem -inform DER -in reply.der -out reply.env",
    )
    openssl(
        tmp_path,
        f"cms -decrypt -inform DER -in reply.env -recip {device}.pem -inkey {device}.key"
        " -out certs.p7",
    )
    printed = openssl(tmp_path, "pkcs7 -inform DER -in certs.p7 -print_certs").decode()
    assert subjects(printed) == ["device-1", "SCEP Test CA"]
    dump = openssl(tmp_path, "cms -cmsout -print -inform DER -in reply.der").decode()
    assert "2.16.840.1.113733.1.9.6" in dump  # recipientNonce
    assert NONCE.hex()[:8] in dump.replace(" ", "").replace("-", "")


@needs_openssl
def test_openssl_reads_degenerate_ca_ra_certificates(pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "ca-ra.p7").write_bytes(degenerate_certs_only([pki.ra.cert, pki.ca.cert]))
    printed = openssl(tmp_path, "pkcs7 -inform DER -in ca-ra.p7 -print_certs").decode()
    assert subjects(printed) == ["SCEP Test RA", "SCEP Test CA"]


@needs_openssl
def test_openssl_verifies_our_failure_reply(pki: Pki, tmp_path: Path) -> None:
    ca = write_party(tmp_path, pki.ca)
    reply = build_cert_rep(
        ReplyTo(CERTMONGER_TRANSACTION_ID, NONCE),
        PkiStatus.FAILURE,
        pki.ca.cert,
        pki.ca.key,
        fail_info=FailInfo.BAD_CERT_ID,
        fail_info_text="no such certificate",
    )
    (tmp_path / "failure.der").write_bytes(reply)
    # sscep and other OpenSSL-based clients verify a FAILURE whose content is empty.
    content = openssl(
        tmp_path, f"cms -verify -purpose any -CAfile {ca}.pem -inform DER -in failure.der"
    )
    assert content == b""
    dump = openssl(tmp_path, "cms -cmsout -print -inform DER -in failure.der").decode()
    assert "1.3.6.1.5.5.7.24.1" in dump and "no such certificate" in dump


def test_signed_data_is_canonical_der_with_sorted_attributes(pki: Pki) -> None:
    """The SignedData is joined from DER parts: asn1crypto, re-encoding it from scratch as
    DER (attributes sorted as a DER SET OF), must produce the very same octets, and the
    signature must verify over the attributes as sent."""
    data = cms.build_signed_data(
        b"content",
        pki.ra.cert,
        pki.ra.key,
        DigestAlgorithm.SHA256,
        [SENDER_NONCE, TRANSACTION_ID, MESSAGE_TYPE_19],  # deliberately not in DER order
        [pki.ra.cert],
    )
    parsed = asn1_cms.ContentInfo.load(data)
    assert parsed.dump(force=True) == data
    signer = parsed["content"]["signer_infos"][0]
    attribute_types = [a["type"].dotted for a in signer["signed_attrs"]]
    assert set(attribute_types) >= {"1.2.840.113549.1.9.3", "1.2.840.113549.1.9.4"}
    verified = cms.verify_signed_data(cms.load_content_info(data, "signed_data"), [pki.ra.cert])
    assert verified.content == b"content"


def test_signed_attributes_sent_out_of_der_order_verify_against_their_der_encoding(
    pki: Pki,
) -> None:
    """A signer that hashed the DER SET OF its signed attributes but sent them in another
    order: the octets as received fail, the DER re-encoding (made only then) verifies; a
    signature over neither is refused."""
    data = cms.build_signed_data(
        b"content",
        pki.ra.cert,
        pki.ra.key,
        DigestAlgorithm.SHA256,
        [SENDER_NONCE, TRANSACTION_ID, MESSAGE_TYPE_19],
        [pki.ra.cert],
    )
    signed_attrs = asn1_cms.ContentInfo.load(data)["content"]["signer_infos"][0]["signed_attrs"]
    attributes = [attribute.dump() for attribute in signed_attrs]
    assert attributes != attributes[::-1]
    reordered = data.replace(b"".join(attributes), b"".join(attributes[::-1]))
    assert reordered != data

    verified = cms.verify_signed_data(
        cms.load_content_info(reordered, "signed_data"), [pki.ra.cert]
    )

    assert verified.content == b"content"
    tampered = _flip_last_byte_of(reordered, attributes[0])
    with pytest.raises(cms.SignatureInvalid):
        cms.verify_signed_data(cms.load_content_info(tampered, "signed_data"), [pki.ra.cert])


def test_certs_only_keeps_the_order_given_and_carries_crls(pki: Pki) -> None:
    now = datetime.now(UTC)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(pki.ca.cert.subject)
        .last_update(now)
        .next_update(now + timedelta(days=1))
        .sign(pki.ca.key, hashes.SHA256())
    )
    order = [pki.issued, pki.ca.cert, pki.ra.cert]
    data = cms.build_degenerate_signed_data(order, [crl])
    signed_data = cms.load_content_info(data, "signed_data")
    assert cms.embedded_certificates(signed_data) == order
    assert cms.embedded_crls(signed_data) == [crl]
    # The order given is not DER's SET OF order (the issued certificate first, as clients
    # expect): cryptography reads it, falling back to BER and saying so.
    with pytest.warns(UserWarning, match="InvalidSetOrdering"):
        assert pkcs7.load_der_pkcs7_certificates(data) == order
    assert asn1_cms.ContentInfo.load(data)["content"]["signer_infos"].native == []


@pytest.mark.parametrize("cipher", list(ContentCipher))
def test_enveloped_data_is_canonical_der_and_opens(pki: Pki, cipher: ContentCipher) -> None:
    data = cms.build_enveloped_data(b"secret content", pki.ra.cert, cipher)
    assert asn1_cms.ContentInfo.load(data).dump(force=True) == data
    opened = cms.decrypt_enveloped_data(
        cms.load_content_info(data, "enveloped_data"), [(pki.ra.cert, pki.ra.key)]
    )
    assert (opened.content, opened.cipher) == (b"secret content", cipher)


def test_issuer_and_serial_names_a_certificate_by_its_octets_or_by_rfc5280_matching(
    pki: Pki,
) -> None:
    """The sid/rid of a message names a certificate by issuer and serial; the issuer's
    octets usually match, but a client may re-encode it (another string type, other case):
    RFC 5280 7.1 matching still finds the certificate."""
    cert = pki.ra.cert

    def identifier(issuer: asn1_x509.Name, serial: int) -> asn1_cms.IssuerAndSerialNumber:
        return asn1_cms.IssuerAndSerialNumber({"issuer": issuer, "serial_number": serial})

    same = asn1_x509.Name.load(cert.issuer.public_bytes())
    assert cms._identifies("issuer_and_serial_number", identifier(same, cert.serial_number), cert)
    assert not cms._identifies(
        "issuer_and_serial_number", identifier(same, cert.serial_number + 1), cert
    )
    # PrintableString and upper case where the certificate has UTF8String and mixed case.
    printable = _ASN1Type.PrintableString
    reencoded = asn1_x509.Name.load(
        x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, "SCEP  TEST CA", _type=printable),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "PKIGATE TESTS", _type=printable),
            ]
        ).public_bytes()
    )
    assert reencoded.dump() != cert.issuer.public_bytes()
    assert cms._identifies(
        "issuer_and_serial_number", identifier(reencoded, cert.serial_number), cert
    )
    other = asn1_x509.Name.build({"common_name": "Another CA"})
    assert not cms._identifies(
        "issuer_and_serial_number", identifier(other, cert.serial_number), cert
    )


def test_cms_nested_beyond_the_parsers_recursion_is_malformed() -> None:
    """Found in review: a value nested 5,000 deep in a signed attribute nobody reads made
    asn1crypto recurse out before any signature was checked: a 500."""
    from pkigate.core.der import tlv

    nested = b"\x05\x00"
    for _ in range(5000):
        nested = tlv(0x30, nested)
    attribute = tlv(0x30, core.ObjectIdentifier("1.2.3.4.5").dump(), tlv(0x31, nested))
    issuer = asn1_x509.Name.build({"common_name": "x"})
    signer_info = tlv(
        0x30,
        core.Integer(1).dump(),
        tlv(0x30, issuer.dump(), core.Integer(1).dump()),  # issuerAndSerialNumber
        tlv(0x30, core.ObjectIdentifier("2.16.840.1.101.3.4.2.1").dump()),  # sha256
        tlv(0xA0, attribute),  # signedAttrs
        tlv(0x30, core.ObjectIdentifier("1.2.840.113549.1.1.1").dump()),
        tlv(0x04, b"\x00"),
    )
    data = tlv(0x30, core.ObjectIdentifier("1.2.840.113549.1.7.1").dump())
    signed_data = tlv(0x30, core.Integer(1).dump(), tlv(0x31), data, tlv(0x31, signer_info))
    content_info = tlv(
        0x30, core.ObjectIdentifier("1.2.840.113549.1.7.2").dump(), tlv(0xA0, signed_data)
    )
    with pytest.raises(cms.MalformedCms):
        cms.load_content_info(content_info, "signed_data")


def _with_signature_algorithm(pki: Pki, algorithm: bytes) -> bytes:
    """A PKCSReq whose SignerInfo names ``algorithm`` (DER AlgorithmIdentifier)."""
    info = asn1_cms.ContentInfo.load(pkcs_req(pki))
    info["content"]["signer_infos"][0]["signature_algorithm"] = asn1_cms.SignedDigestAlgorithm.load(
        algorithm
    )
    return info.dump(force=True)


RSASSA_PSS = bytes.fromhex("06092a864886f70d01010a")
MGF1 = bytes.fromhex("06092a864886f70d010108")


@pytest.mark.parametrize(
    "algorithm",
    [
        pytest.param(tlv(0x30, RSASSA_PSS), id="no parameters"),
        pytest.param(
            tlv(0x30, RSASSA_PSS, tlv(0x30, tlv(0xA1, tlv(0x30, MGF1)))),
            id="MGF1 without its hash",
        ),
    ],
)
def test_pss_signature_without_its_parameters_is_bad_request(pki: Pki, algorithm: bytes) -> None:
    """Found by the fuzzer: asn1crypto gives absent parameters as a Void, and reading the
    hash from it raised TypeError ('Void' object is not subscriptable): a 500."""
    data = _with_signature_algorithm(pki, algorithm)
    error = raises_scep(FailInfo.BAD_REQUEST, lambda: parse_pki_message(data, pki.recipients))
    assert "RSASSA-PSS parameters cannot be read" in error.message


def test_oaep_key_transport_with_mgf1_without_its_hash_is_bad_request(pki: Pki) -> None:
    envelope = asn1_cms.ContentInfo.load(
        cms.build_enveloped_data(
            pki.csr.public_bytes(DER), pki.ra.cert, ContentCipher.AES128, KeyTransport.OAEP
        )
    )
    ktri = envelope["content"]["recipient_infos"][0].chosen
    ktri["key_encryption_algorithm"] = asn1_cms.KeyEncryptionAlgorithm.load(
        tlv(0x30, bytes.fromhex("06092a864886f70d010107"), tlv(0x30, tlv(0xA1, tlv(0x30, MGF1))))
    )
    data = sign_pki_message(
        MessageType.PKCS_REQ, envelope.dump(force=True), "7", pki.device.cert, pki.device.key
    )
    error = raises_scep(FailInfo.BAD_REQUEST, lambda: parse_pki_message(data, pki.recipients))
    assert "RSAES-OAEP parameters cannot be read" in error.message


def test_content_info_without_its_content_is_unreadable(pki: Pki) -> None:
    """Found by the fuzzer: the absent [0] content read as a Void, and indexing it raised
    TypeError (a 500)."""
    content_info = tlv(0x30, bytes.fromhex("06092a864886f70d010702"))  # signedData, no [0]
    with pytest.raises(UnreadableMessage, match="without its content"):
        parse_pki_message(content_info, pki.recipients)


def test_signed_attribute_whose_oid_never_ends_is_bad_message_check(pki: Pki) -> None:
    """Found by the fuzzer: asn1crypto reads an OID whose arc never ends (every octet has
    its continuation bit set) as "", and re-encoding the signed attributes then raised
    int('') (a 500)."""
    message_type = bytes.fromhex("060a6086480186f84501090 2".replace(" ", ""))
    data = pkcs_req(pki)
    assert data.count(message_type) == 1
    data = data.replace(message_type, message_type[:2] + b"\xff" * 10)
    error = raises_scep(FailInfo.BAD_MESSAGE_CHECK, lambda: parse_pki_message(data, pki.recipients))
    assert error.reply_to is not None
