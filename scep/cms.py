"""The parts of CMS (RFC 5652) that SCEP needs: SignedData and EnvelopedData, both ways.

asn1crypto reads and writes the structures (it accepts BER with indefinite lengths, which
Apple clients and `openssl cms -stream` send); `cryptography` does the arithmetic. Nothing
here knows SCEP: failures are `CmsError` subclasses that say *why*, and the SCEP layer
maps them onto failInfo values in one place (`pkigate.scep.messages`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, cast

from asn1crypto import algos, cms, core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.exceptions import UnsupportedAlgorithm as CryptographyUnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.ciphers import BlockCipherAlgorithm, Cipher, algorithms, modes

from pkigate.core.der import encode_length, tlv
from pkigate.core.errors import InvalidCertificateError
from pkigate.core.readable import UNREADABLE, check_certificate_readable


class CmsError(Exception):
    """A CMS structure that cannot be used; the subclass says why."""


class MalformedCms(CmsError):
    """The bytes are not the expected CMS structure (bad DER/BER, wrong content type, ...)."""


class UnsupportedAlgorithm(CmsError):
    """A digest, signature, key-transport or content-encryption algorithm we refuse."""


class SignatureInvalid(CmsError):
    """The signature, the message digest or the signer certificate does not check out."""


class NoMatchingRecipient(CmsError):
    """The EnvelopedData is addressed to none of the certificates whose keys we hold."""


class DecryptionFailed(CmsError):
    """The content-encryption key or the content could not be decrypted."""


class DigestAlgorithm(StrEnum):
    """Digests accepted in signatures (values are asn1crypto's names). MD5 is refused."""

    SHA1 = "sha1"
    SHA224 = "sha224"
    SHA256 = "sha256"
    SHA384 = "sha384"
    SHA512 = "sha512"

    def hash(self) -> hashes.HashAlgorithm:
        return _HASHES[self]()


_HASHES: dict[DigestAlgorithm, type[hashes.HashAlgorithm]] = {
    DigestAlgorithm.SHA1: hashes.SHA1,
    DigestAlgorithm.SHA224: hashes.SHA224,
    DigestAlgorithm.SHA256: hashes.SHA256,
    DigestAlgorithm.SHA384: hashes.SHA384,
    DigestAlgorithm.SHA512: hashes.SHA512,
}


class ContentCipher(StrEnum):
    """Content-encryption algorithms for EnvelopedData. RC2 is refused; single DES is only
    accepted from clients (micromdm's scepclient sends nothing else); the server never
    answers with it (see `PkiMessage.reply_to`)."""

    AES128 = "aes128"
    AES192 = "aes192"
    AES256 = "aes256"
    DES3 = "des3"
    DES = "des"

    @property
    def asn1_name(self) -> str:
        return _CIPHER_ASN1_NAMES[self]

    @property
    def key_size(self) -> int:
        return {"aes128": 16, "aes192": 24, "aes256": 32, "des3": 24, "des": 8}[self.value]

    @property
    def block_size(self) -> int:
        return 8 if self in (ContentCipher.DES3, ContentCipher.DES) else 16

    def algorithm(self, key: bytes) -> BlockCipherAlgorithm:
        if self is ContentCipher.DES3:
            return _triple_des()(key)
        if self is ContentCipher.DES:
            # EDE with three equal keys is single DES.
            return _triple_des()(key * 3)
        return algorithms.AES(key)


_CIPHER_ASN1_NAMES = {
    ContentCipher.AES128: "aes128_cbc",
    ContentCipher.AES192: "aes192_cbc",
    ContentCipher.AES256: "aes256_cbc",
    ContentCipher.DES3: "tripledes_3key",
    ContentCipher.DES: "des",
}
_CIPHERS_BY_ASN1_NAME = {name: cipher for cipher, name in _CIPHER_ASN1_NAMES.items()}


def _triple_des() -> Callable[[bytes], BlockCipherAlgorithm]:
    # cryptography 43 moved TripleDES to the "decrepit" package and later versions drop the
    # old name; legacy SCEP clients (Cisco, older sscep) still send DES-EDE3-CBC.
    try:
        module = importlib.import_module("cryptography.hazmat.decrepit.ciphers.algorithms")
    except ImportError:  # pragma: no cover - cryptography < 43
        module = importlib.import_module("cryptography.hazmat.primitives.ciphers.algorithms")
    return cast(Callable[[bytes], BlockCipherAlgorithm], module.TripleDES)


class KeyTransport(StrEnum):
    """RSA key transport for the content-encryption key (RFC 3370 4.2.1, RFC 3560)."""

    PKCS1V15 = "pkcs1v15"
    OAEP = "oaep"
    """RSAES-OAEP with the default parameters (SHA-1, MGF1-SHA-1, empty label)."""
    OAEP_SHA256 = "oaep-sha256"
    """RSAES-OAEP with explicit SHA-256 and MGF1-SHA-256 (only ever built, for tests)."""


@dataclass(frozen=True)
class VerifiedSignedData:
    """What a verified SignedData vouches for."""

    signer_certificate: x509.Certificate
    """The certificate whose key made the signature."""
    digest_algorithm: DigestAlgorithm
    """The signer's digest algorithm (replies may mirror it)."""
    content_type: str
    """The dotted OID of the encapsulated content type."""
    content: bytes
    """The encapsulated content (empty when absent)."""


@dataclass(frozen=True)
class DecryptedContent:
    """The plaintext of an EnvelopedData and how it was protected."""

    content: bytes
    cipher: ContentCipher
    key_transport: KeyTransport
    """PKCS1V15, or OAEP for RSAES-OAEP with any supported parameters."""
    recipient_certificate: x509.Certificate | None
    """Which of the offered recipient certificates it was addressed to."""


# -- reading ----------------------------------------------------------------------------------


def load_content_info(data: bytes, content_type: str) -> Any:
    """Parse a ContentInfo (DER or BER) holding `content_type` ("signed_data", ...).

    The whole structure is parsed here (asn1crypto parses lazily), so that malformed input
    fails now with MalformedCms rather than later with some other error."""
    try:
        info = _parse_content_info(data, content_type)
    except CmsError:
        raise
    # asn1crypto reports bad input with all of these (AttributeError for some rare
    # universal types it decodes without a native form).
    except _ASN1_ERRORS as exc:
        if not data or data[0] != 0x30:
            raise MalformedCms(f"not a CMS ContentInfo: {exc}") from exc
        # Go's pkcs7 (micromdm scepclient) writes encryptedContent as a constructed [0] of
        # definite length holding one OCTET STRING, which asn1crypto reads only in the
        # indefinite form: retry with such chunked strings rewritten that way.
        try:
            info = _parse_content_info(
                _with_definite_lengths(data, chunked_strings_indefinite=True), content_type
            )
        except CmsError:
            raise
        except _ASN1_ERRORS:
            raise MalformedCms(f"not a CMS ContentInfo: {exc}") from exc
    return info["content"]


# RecursionError: asn1crypto parses nested values recursively (a SEQUENCE 5,000 deep in an
# unknown attribute, before any signature is checked).
_ASN1_ERRORS = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    OverflowError,
    AttributeError,
    RecursionError,
)


def _parse_content_info(data: bytes, content_type: str) -> Any:
    if len(data) > 1 and data[1] == 0x80:
        data = _with_definite_lengths(data)
    info = cms.ContentInfo.load(data, strict=True)
    found = info["content_type"].native
    if found != content_type:
        raise MalformedCms(f"a CMS {found} where {content_type} was expected")
    if isinstance(info["content"], core.Void):  # [0] EXPLICIT content is optional in ASN.1
        raise MalformedCms(f"a CMS {content_type} without its content")
    _parse_fully(info, content_type)
    return info


def _parse_fully(info: Any, content_type: str) -> None:
    """Force asn1crypto's lazy parse of every nested value, except the inside of the
    certificates a SignedData carries: :func:`embedded_certificates` hands those to
    ``cryptography``, which reads and checks them itself, and building asn1crypto's native
    form of a certificate (every name and extension) was a third of a SCEP request's
    parse."""
    if content_type != "signed_data":
        info.native  # noqa: B018
        return
    signed_data = info["content"]
    for name, *_ in signed_data._fields:
        value = signed_data[name]
        if name != "certificates":
            value.native  # noqa: B018
        elif not isinstance(value, core.Void):
            for choice in value:
                choice.chosen  # noqa: B018 - which kind of certificate it is, at least


_MAX_BER_DEPTH = 64


def _with_definite_lengths(data: bytes, *, chunked_strings_indefinite: bool = False) -> bytes:
    """The same BER with definite lengths on every SEQUENCE and SET.

    Streaming encoders (Apple's, `openssl cms -stream`) write indefinite lengths. asn1crypto
    reads most such BER, but not an indefinite-length SEQUENCE that is the chosen
    alternative of an untagged CHOICE (SignerIdentifier, RecipientInfo), so those lengths
    are settled here first. Other constructed values keep their form: asn1crypto reads
    a constructed (chunked) OCTET STRING only with an indefinite length."""
    normalized, end = _definite_elements(data, 0, len(data), 0, False, chunked_strings_indefinite)
    if end != len(data):
        raise MalformedCms("trailing data after the ContentInfo")
    return normalized


def _definite_elements(
    data: bytes,
    pos: int,
    end: int,
    depth: int,
    until_end_of_contents: bool,
    chunked_indefinite: bool = False,
) -> tuple[bytes, int]:
    if depth > _MAX_BER_DEPTH:
        raise MalformedCms("BER nested too deeply")
    out = bytearray()
    while pos < end:
        if until_end_of_contents and data[pos : pos + 2] == b"\0\0":
            return bytes(out), pos + 2
        tag_end = pos + 1
        if data[pos] & 0x1F == 0x1F:  # high tag number form
            while tag_end < end and data[tag_end] & 0x80:
                tag_end += 1
            tag_end += 1
        if tag_end >= end:
            raise MalformedCms("truncated BER header")
        constructed = bool(data[pos] & 0x20)
        first = data[tag_end]
        contents_start = tag_end + 1
        if first == 0x80:
            if not constructed:
                raise MalformedCms("indefinite length on a primitive value")
            inner, next_pos = _definite_elements(
                data, contents_start, end, depth + 1, True, chunked_indefinite
            )
        else:
            length = first
            if first & 0x80:
                count = first & 0x7F
                length = int.from_bytes(data[contents_start : contents_start + count], "big")
                contents_start += count
            next_pos = contents_start + length
            if next_pos > end:
                raise MalformedCms("truncated BER value")
            if constructed:
                inner, _ = _definite_elements(
                    data, contents_start, next_pos, depth + 1, False, chunked_indefinite
                )
            else:
                inner = data[contents_start:next_pos]
        chunked = (
            chunked_indefinite
            and constructed
            and data[pos] not in (0x30, 0x31)
            and inner[:1] == b"\x04"
        )
        if (first == 0x80 or chunked) and data[pos] not in (0x30, 0x31):
            out += data[pos:tag_end] + b"\x80" + inner + b"\0\0"
        else:
            out += data[pos:tag_end] + encode_length(len(inner)) + inner
        pos = next_pos
    if until_end_of_contents:
        raise MalformedCms("an indefinite length without end-of-contents")
    return bytes(out), pos


def only_signer(signed_data: Any) -> Any:
    """The single SignerInfo of a SignedData (SCEP messages have exactly one)."""
    signer_infos = signed_data["signer_infos"]
    if len(signer_infos) != 1:
        raise MalformedCms(f"{len(signer_infos)} signers where one was expected")
    return signer_infos[0]


def signed_attributes(signer_info: Any) -> dict[str, list[Any]]:
    """The signed attributes by dotted OID, each with its list of (asn1crypto) values."""
    attributes: dict[str, list[Any]] = {}
    if signer_info["signed_attrs"].native is None:
        return attributes
    for attribute in signer_info["signed_attrs"]:
        oid = attribute["type"].dotted
        if oid in attributes:
            raise MalformedCms(f"signed attribute {oid} appears twice")
        attributes[oid] = list(attribute["values"])
    return attributes


def digest_algorithm_of(signer_info: Any) -> DigestAlgorithm:
    name = signer_info["digest_algorithm"]["algorithm"].native
    try:
        return DigestAlgorithm(name)
    except ValueError:
        raise UnsupportedAlgorithm(f"digest algorithm {name} is not accepted") from None


def find_signer_certificate(
    signer_info: Any, candidates: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    """The candidate that the SignerInfo's sid names, if any."""
    sid = signer_info["sid"]
    for candidate in candidates:
        if _identifies(sid.name, sid.chosen, candidate):
            return candidate
    return None


def embedded_certificates(signed_data: Any) -> list[x509.Certificate]:
    """The X.509 certificates carried in a SignedData (other choices are skipped)."""
    found: list[x509.Certificate] = []
    if isinstance(signed_data["certificates"], core.Void):  # absent
        return found
    for choice in signed_data["certificates"]:
        if choice.name == "certificate":
            try:
                certificate = x509.load_der_x509_certificate(choice.chosen.dump())
                # Its names are read on first use (the signer's issuer when matching the
                # sid, its subject in the connector): refused here rather than there.
                check_certificate_readable(certificate)
            except (ValueError, x509.InvalidVersion) as exc:
                raise MalformedCms(f"an unreadable certificate: {exc}") from exc
            except InvalidCertificateError as exc:
                raise MalformedCms(f"an unreadable certificate: {exc.message}") from exc
            found.append(certificate)
    return found


def embedded_crls(signed_data: Any) -> list[x509.CertificateRevocationList]:
    found: list[x509.CertificateRevocationList] = []
    if signed_data["crls"].native is None:
        return found
    for choice in signed_data["crls"]:
        if choice.name == "crl":
            try:
                found.append(x509.load_der_x509_crl(choice.chosen.dump()))
            except ValueError as exc:
                raise MalformedCms(f"an unreadable CRL: {exc}") from exc
    return found


def verify_signed_data(
    signed_data: Any, trusted_signers: Sequence[x509.Certificate] | None = None
) -> VerifiedSignedData:
    """Check the one signature of a SignedData.

    The signer certificate is looked up among `trusted_signers` when given (a client that
    trusts only the CA/RA certificates it fetched), otherwise among the certificates the
    message carries (a SCEP request signed by its own, often self-signed, certificate: who
    the signer *is* gets decided by the caller). With signed attributes, content-type and
    message-digest must be present and match (RFC 5652 5.3, 5.4)."""
    signer_info = only_signer(signed_data)
    digest = digest_algorithm_of(signer_info)
    candidates = (
        trusted_signers if trusted_signers is not None else embedded_certificates(signed_data)
    )
    signer = find_signer_certificate(signer_info, candidates)
    if signer is None:
        raise SignatureInvalid("the signer's certificate is not available")
    encap = signed_data["encap_content_info"]
    content_type = encap["content_type"].dotted
    # An absent eContent is signed as empty content (SCEP FAILURE and PENDING replies).
    content = encap["content"].native
    if content is None:
        content = b""
    elif not isinstance(content, bytes):
        raise MalformedCms("the encapsulated content is not an OCTET STRING")
    attributes = signed_attributes(signer_info)
    signed_bytes: Iterable[bytes]
    if attributes:
        _check_content_attributes(attributes, content_type, _digest(digest, content))
        signed_bytes = _signed_attribute_encodings(signer_info["signed_attrs"])
    else:
        signed_bytes = [content]
    signature = signer_info["signature"].native
    if not any(
        _signature_ok(signer, signer_info["signature_algorithm"], digest, signature, data)
        for data in signed_bytes
    ):
        raise SignatureInvalid("the signature does not verify with the signer's key")
    return VerifiedSignedData(signer, digest, content_type, content)


def _check_content_attributes(
    attributes: dict[str, list[Any]], content_type: str, content_digest: bytes
) -> None:
    declared_type = attributes.get("1.2.840.113549.1.9.3")
    declared_digest = attributes.get("1.2.840.113549.1.9.4")
    if not declared_type or not declared_digest:
        raise SignatureInvalid("content-type or message-digest signed attribute missing")
    if len(declared_type) != 1 or declared_type[0].dotted != content_type:
        raise SignatureInvalid("the content-type attribute does not match the content")
    if len(declared_digest) != 1 or declared_digest[0].native != content_digest:
        raise SignatureInvalid("the message-digest attribute does not match the content")


def _signed_attribute_encodings(signed_attrs: Any) -> Iterator[bytes]:
    # RFC 5652 5.4: the signature covers the DER encoding of the attributes with a SET OF
    # tag. Try the octets as received first (what the signer hashed, if it sorted them
    # differently or used BER), then a DER re-encoding, made only if those fail to verify
    # (asn1crypto's re-encoding costs more than the signature check).
    as_received = b"\x31" + encode_length(len(signed_attrs.contents)) + signed_attrs.contents
    yield as_received
    try:
        reencoded = signed_attrs.untag().dump(force=True)
    except _ASN1_ERRORS:
        # asn1crypto re-encodes from the native value, and some it read it cannot write
        # back (an OID whose last arc never ends reads as "1.2." and int('') fails): the
        # octets as received are all there is to check.
        return
    if reencoded != as_received:
        yield reencoded


def _signature_ok(
    signer: x509.Certificate,
    signature_algorithm: Any,
    digest: DigestAlgorithm,
    signature: bytes,
    data: bytes,
) -> bool:
    try:
        kind = signature_algorithm.signature_algo
    except ValueError:
        raise UnsupportedAlgorithm(
            f"signature algorithm {signature_algorithm['algorithm'].dotted} is not accepted"
        ) from None
    key = _public_key(signer)
    try:
        if kind == "rsassa_pkcs1v15" and isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, data, asym_padding.PKCS1v15(), digest.hash())
        elif kind == "rsassa_pss" and isinstance(key, rsa.RSAPublicKey):
            pss, pss_hash = _pss_padding(signature_algorithm["parameters"])
            key.verify(signature, data, pss, pss_hash)
        elif kind == "ecdsa" and isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(digest.hash()))
        elif kind in ("rsassa_pkcs1v15", "rsassa_pss", "ecdsa"):
            raise SignatureInvalid(f"a {kind} signature from a certificate with another key")
        else:
            raise UnsupportedAlgorithm(f"signature algorithm {kind} is not accepted")
    except (InvalidSignature, ValueError):  # ValueError: parameters cryptography refuses
        return False
    return True


def _public_key(certificate: x509.Certificate) -> CertificatePublicKeyTypes:
    try:
        return certificate.public_key()
    except CryptographyUnsupportedAlgorithm as exc:
        raise UnsupportedAlgorithm(f"the signer's key type is not supported: {exc}") from exc
    except ValueError as exc:
        raise SignatureInvalid(f"the signer's public key is unreadable: {exc}") from exc


def _pss_padding(parameters: Any) -> tuple[asym_padding.PSS, hashes.HashAlgorithm]:
    with _algorithm_parameters("RSASSA-PSS"):
        return _read_pss_padding(parameters)


@contextmanager
def _algorithm_parameters(what: str) -> Iterator[None]:
    """asn1crypto types an AlgorithmIdentifier's parameters by its OID but reads them only
    when used: absent ones are a Void (not subscriptable) and a wrong type fails there."""
    try:
        yield
    except _ASN1_ERRORS as exc:
        raise MalformedCms(f"{what} parameters cannot be read: {exc}") from exc


def _read_pss_padding(parameters: Any) -> tuple[asym_padding.PSS, hashes.HashAlgorithm]:
    hash_name = parameters["hash_algorithm"]["algorithm"].native
    mgf = parameters["mask_gen_algorithm"]
    if mgf["algorithm"].native != "mgf1":
        raise UnsupportedAlgorithm(f"PSS mask generation {mgf['algorithm'].native}")
    pss_hash = _hash_named(hash_name)
    mgf_hash = _hash_named(mgf["parameters"]["algorithm"].native)
    salt = parameters["salt_length"].native
    return asym_padding.PSS(asym_padding.MGF1(mgf_hash), salt), pss_hash


def _hash_named(name: str) -> hashes.HashAlgorithm:
    try:
        return DigestAlgorithm(name).hash()
    except ValueError:
        raise UnsupportedAlgorithm(f"digest algorithm {name} is not accepted") from None


def decrypt_enveloped_data(
    enveloped: Any, recipients: Sequence[tuple[x509.Certificate | None, rsa.RSAPrivateKey]]
) -> DecryptedContent:
    """Decrypt an EnvelopedData with the first of `recipients` it is addressed to.

    A recipient certificate of None matches any key-transport recipient (a client that
    knows its key but not how the server addressed it)."""
    encrypted = enveloped["encrypted_content_info"]
    algorithm = encrypted["content_encryption_algorithm"]
    cipher = _CIPHERS_BY_ASN1_NAME.get(algorithm["algorithm"].native)
    if cipher is None:
        raise UnsupportedAlgorithm(
            f"content encryption {algorithm['algorithm'].native} is not accepted"
        )
    for info in enveloped["recipient_infos"]:
        if info.name != "ktri":
            continue
        ktri = info.chosen
        for certificate, key in recipients:
            rid = ktri["rid"]
            if certificate is None or _identifies(rid.name, rid.chosen, certificate):
                transport, cek = _unwrap_key(ktri, key, cipher.key_size)
                content = _decrypt_content(cipher, cek, algorithm, encrypted)
                return DecryptedContent(content, cipher, transport, certificate)
    raise NoMatchingRecipient("the envelope is not addressed to any certificate we hold")


def _unwrap_key(ktri: Any, key: rsa.RSAPrivateKey, key_size: int) -> tuple[KeyTransport, bytes]:
    algorithm = ktri["key_encryption_algorithm"]
    name = algorithm["algorithm"].native
    transport: KeyTransport
    pad: asym_padding.AsymmetricPadding
    if name in ("rsaes_pkcs1v15", "rsa"):
        transport, pad = KeyTransport.PKCS1V15, asym_padding.PKCS1v15()
    elif name == "rsaes_oaep":
        transport, pad = KeyTransport.OAEP, _oaep_padding(algorithm["parameters"])
    else:
        raise UnsupportedAlgorithm(f"key transport {name} is not accepted")
    try:
        cek = key.decrypt(ktri["encrypted_key"].native, pad)
    except ValueError:
        cek = b""
    if len(cek) != key_size:
        # RFC 3218 2.3.2: carry on with a random key so that a PKCS#1 v1.5 padding error
        # cannot be told apart from a content-decryption error (Bleichenbacher).
        cek = os.urandom(key_size)
    return transport, cek


def _oaep_padding(parameters: Any) -> asym_padding.OAEP:
    with _algorithm_parameters("RSAES-OAEP"):
        return _read_oaep_padding(parameters)


def _read_oaep_padding(parameters: Any) -> asym_padding.OAEP:
    if parameters.native is None:  # absent parameters: the RFC 4055 defaults (SHA-1)
        parameters = algos.RSAESOAEPParams.load(b"\x30\x00")
    hash_algorithm = _hash_named(parameters["hash_algorithm"]["algorithm"].native)
    mgf = parameters["mask_gen_algorithm"]
    if mgf["algorithm"].native != "mgf1":
        raise UnsupportedAlgorithm(f"OAEP mask generation {mgf['algorithm'].native}")
    mgf_hash = _hash_named(mgf["parameters"]["algorithm"].native)
    source = parameters["p_source_algorithm"]
    if source["algorithm"].native != "p_specified":
        raise UnsupportedAlgorithm(f"OAEP label source {source['algorithm'].native}")
    label = source["parameters"].native or None
    return asym_padding.OAEP(asym_padding.MGF1(mgf_hash), hash_algorithm, label)


def _decrypt_content(cipher: ContentCipher, cek: bytes, algorithm: Any, encrypted: Any) -> bytes:
    iv = algorithm["parameters"].native
    ciphertext = encrypted["encrypted_content"].native
    if not isinstance(iv, bytes) or len(iv) != cipher.block_size:
        raise DecryptionFailed("the content-encryption IV is missing or of the wrong size")
    if not ciphertext or len(ciphertext) % cipher.block_size:
        raise DecryptionFailed("the encrypted content is missing or not whole blocks")
    decryptor = Cipher(cipher.algorithm(cek), modes.CBC(iv)).decryptor()
    padded = decryptor.update(ciphertext) + decryptor.finalize()
    unpadder = padding.PKCS7(cipher.block_size * 8).unpadder()
    try:
        return unpadder.update(padded) + unpadder.finalize()
    except ValueError:
        raise DecryptionFailed("the envelope could not be decrypted") from None


def _identifies(kind: str, identifier: Any, certificate: x509.Certificate) -> bool:
    """Whether an issuerAndSerialNumber or subjectKeyIdentifier names `certificate`."""
    try:
        return _names_certificate(kind, identifier, certificate)
    except (*UNREADABLE, CryptographyUnsupportedAlgorithm):
        return False  # a certificate too broken to compare names nothing


def _names_certificate(kind: str, identifier: Any, certificate: x509.Certificate) -> bool:
    if kind == "issuer_and_serial_number":
        if identifier["serial_number"].native != certificate.serial_number:
            return False
        issuer_der = certificate.issuer.public_bytes()
        if identifier["issuer"].dump() == issuer_der:
            return True
        # RFC 5280 7.1 name matching (case and spacing) only when the octets differ.
        return bool(identifier["issuer"] == asn1_x509.Name.load(issuer_der))
    if kind == "subject_key_identifier":
        return bool(identifier.native == subject_key_identifier(certificate))
    return False


def subject_key_identifier(certificate: x509.Certificate) -> bytes:
    """The certificate's SKI, or the RFC 5280 4.2.1.2 method (1) value when it has none."""
    try:
        ext = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        return ext.value.digest
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(certificate.public_key()).digest


# -- writing ----------------------------------------------------------------------------------


def build_enveloped_data(
    content: bytes,
    recipient: x509.Certificate,
    cipher: ContentCipher,
    key_transport: KeyTransport = KeyTransport.PKCS1V15,
) -> bytes:
    """A DER ContentInfo with an EnvelopedData of `content` for one RSA recipient."""
    public_key = recipient.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise UnsupportedAlgorithm("key transport needs an RSA recipient certificate")
    cek = os.urandom(cipher.key_size)
    if cipher in (ContentCipher.DES3, ContentCipher.DES):
        cek = _with_odd_parity(cek)
    iv = os.urandom(cipher.block_size)
    padder = padding.PKCS7(cipher.block_size * 8).padder()
    encryptor = Cipher(cipher.algorithm(cek), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padder.update(content) + padder.finalize())
    ciphertext += encryptor.finalize()
    key_algorithm, pad = _key_transport_algorithm(key_transport)
    # Joined as DER like build_signed_data's structure (see there).
    recipient_info = tlv(  # KeyTransRecipientInfo
        _SEQUENCE,
        _VERSION_0,
        _issuer_and_serial_der(recipient),
        key_algorithm.dump(),
        tlv(_OCTET_STRING, public_key.encrypt(cek, pad)),
    )
    enveloped = tlv(
        _SEQUENCE,
        _VERSION_0,
        tlv(_SET, recipient_info),
        tlv(  # EncryptedContentInfo
            _SEQUENCE,
            _ID_DATA,
            tlv(_SEQUENCE, _oid_der(_cipher_oid(cipher)), tlv(_OCTET_STRING, iv)),
            tlv(_IMPLICIT_PRIMITIVE_0, ciphertext),
        ),
    )
    return tlv(_SEQUENCE, _ID_ENVELOPED_DATA, tlv(_CONTEXT_0, enveloped))


@functools.lru_cache(maxsize=8)
def _cipher_oid(cipher: ContentCipher) -> str:
    return str(algos.EncryptionAlgorithmId(cipher.asn1_name).dotted)


def _key_transport_algorithm(
    key_transport: KeyTransport,
) -> tuple[Any, asym_padding.AsymmetricPadding]:
    if key_transport is KeyTransport.PKCS1V15:
        return cms.KeyEncryptionAlgorithm({"algorithm": "rsaes_pkcs1v15"}), asym_padding.PKCS1v15()
    if key_transport is KeyTransport.OAEP:
        # RFC 4055 4.1: default parameters are written as an empty SEQUENCE.
        parameters = algos.RSAESOAEPParams.load(b"\x30\x00")
        sha: hashes.HashAlgorithm = hashes.SHA1()  # noqa: S303 - OAEP's default, RFC 4055
    else:
        parameters = algos.RSAESOAEPParams(
            {
                "hash_algorithm": {"algorithm": "sha256"},
                "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha256"}},
            }
        )
        sha = hashes.SHA256()
    algorithm = cms.KeyEncryptionAlgorithm({"algorithm": "rsaes_oaep", "parameters": parameters})
    return algorithm, asym_padding.OAEP(asym_padding.MGF1(sha), sha, None)


def _with_odd_parity(key: bytes) -> bytes:
    # DES keys carry a parity bit per byte; some legacy peers check it.
    return bytes((b & 0xFE) | (bin(b >> 1).count("1") + 1) % 2 for b in key)


def build_signed_data(
    content: bytes,
    signer_certificate: x509.Certificate,
    signer_key: rsa.RSAPrivateKey,
    digest: DigestAlgorithm,
    extra_attributes: Sequence[tuple[str, Any]] = (),
    certificates: Sequence[x509.Certificate] = (),
    signing_time: datetime | None = None,
) -> bytes:
    """A DER ContentInfo with a SignedData over `content` (type id-data), one RSA signer
    (PKCS#1 v1.5, signatureAlgorithm rsaEncryption as RFC 3370 3.2 allows and OpenSSL
    writes), signed attributes content-type, signing-time, message-digest plus
    `extra_attributes` (pairs of attribute type OID and one asn1crypto value), and
    `certificates` included.

    Values are encoded by asn1crypto; the structure around them (fixed fields, DER the
    signer already has, certificates as they are) is joined as DER directly: built as
    asn1crypto objects, it re-encoded every certificate and re-sorted every SET on each
    reply, which cost more than the RSA signature."""
    # SET OF Attribute in DER order (X.690 11.6: sorted by encoding).
    attributes = tlv(
        _SET,
        *sorted(
            [
                _attribute_der(_OID_CONTENT_TYPE, _ID_DATA),
                _attribute_der(
                    _OID_SIGNING_TIME, core.UTCTime(signing_time or datetime.now(UTC)).dump()
                ),
                _attribute_der(
                    _OID_MESSAGE_DIGEST, core.OctetString(_digest(digest, content)).dump()
                ),
                *(_attribute_der(oid, value.dump()) for oid, value in extra_attributes),
            ]
        ),
    )
    signature = signer_key.sign(attributes, asym_padding.PKCS1v15(), digest.hash())
    digest_algorithm = _digest_algorithm_der(digest)
    signer_info = tlv(
        _SEQUENCE,
        _VERSION_1,
        _issuer_and_serial_der(signer_certificate),
        digest_algorithm,
        tlv(_CONTEXT_0, attributes[len(_der_header(attributes)) :]),  # [0] IMPLICIT
        _RSA_ENCRYPTION,
        tlv(_OCTET_STRING, signature),
    )
    signed_data = tlv(
        _SEQUENCE,
        _VERSION_1,
        tlv(_SET, digest_algorithm),
        tlv(_SEQUENCE, _ID_DATA, tlv(_CONTEXT_0, tlv(_OCTET_STRING, content))),
        _certificate_set(certificates),
        tlv(_SET, signer_info),
    )
    return tlv(_SEQUENCE, _ID_SIGNED_DATA, tlv(_CONTEXT_0, signed_data))


def build_degenerate_signed_data(
    certificates: Sequence[x509.Certificate],
    crls: Sequence[x509.CertificateRevocationList] = (),
) -> bytes:
    """A DER "certs-only" SignedData: no content, no signers, just certificates and CRLs
    (RFC 5652 5.2; RFC 8894 3.4 and 4.2 for CA/RA certificates, issued certificates and
    CRLs). Certificates are written in the order given (see :func:`_certificate_set`)."""
    signed_data = tlv(
        _SEQUENCE,
        _VERSION_1,
        tlv(_SET),
        tlv(_SEQUENCE, _ID_DATA),
        _certificate_set(certificates),
        tlv(_CONTEXT_1, *(crl.public_bytes(serialization.Encoding.DER) for crl in crls))
        if crls
        else b"",
        tlv(_SET),
    )
    return tlv(_SEQUENCE, _ID_SIGNED_DATA, tlv(_CONTEXT_0, signed_data))


# DER of the fixed parts of a SignedData.
_SEQUENCE, _SET, _OCTET_STRING, _CONTEXT_0, _CONTEXT_1 = 0x30, 0x31, 0x04, 0xA0, 0xA1
_IMPLICIT_PRIMITIVE_0 = 0x80
_VERSION_0 = core.Integer(0).dump()
_VERSION_1 = core.Integer(1).dump()
_ID_ENVELOPED_DATA = core.ObjectIdentifier("1.2.840.113549.1.7.3").dump()
_ID_DATA = core.ObjectIdentifier("1.2.840.113549.1.7.1").dump()
_ID_SIGNED_DATA = core.ObjectIdentifier("1.2.840.113549.1.7.2").dump()
_RSA_ENCRYPTION = algos.SignedDigestAlgorithm({"algorithm": "rsassa_pkcs1v15"}).dump()
_OID_CONTENT_TYPE = "1.2.840.113549.1.9.3"
_OID_MESSAGE_DIGEST = "1.2.840.113549.1.9.4"
_OID_SIGNING_TIME = "1.2.840.113549.1.9.5"


def _attribute_der(oid: str, value: bytes) -> bytes:
    """``Attribute ::= SEQUENCE { attrType OID, attrValues SET OF ANY }`` with one value."""
    return tlv(_SEQUENCE, _oid_der(oid), tlv(_SET, value))


@functools.lru_cache(maxsize=64)
def _oid_der(oid: str) -> bytes:
    return bytes(core.ObjectIdentifier(oid).dump())


def _der_header(encoded: bytes) -> bytes:
    """The tag and length octets of a DER value (single-octet tag)."""
    first = encoded[1]
    return encoded[: 2 + (first & 0x7F if first & 0x80 else 0)]


def _certificate_set(certificates: Sequence[x509.Certificate]) -> bytes:
    """``certificates [0] IMPLICIT CertificateSet`` in the order given, not sorted as DER
    would sort a SET OF: clients take the first certificate of a certs-only reply as the
    issued one (micromdm's scepclient reads Certificates[0]), and OpenSSL and Go's pkcs7
    keep the order too. Absent when there are none."""
    if not certificates:
        return b""
    return tlv(_CONTEXT_0, *(c.public_bytes(serialization.Encoding.DER) for c in certificates))


@functools.lru_cache(maxsize=8)
def _digest_algorithm_der(digest: DigestAlgorithm) -> bytes:
    return bytes(algos.DigestAlgorithm({"algorithm": digest.value}).dump())


@functools.lru_cache(maxsize=64)
def _issuer_and_serial_der(certificate: x509.Certificate) -> bytes:
    return bytes(_issuer_and_serial(certificate).dump())


def _asn1_certificate(certificate: x509.Certificate) -> Any:
    return asn1_x509.Certificate.load(certificate.public_bytes(serialization.Encoding.DER))


def _issuer_and_serial(certificate: x509.Certificate) -> Any:
    return cms.IssuerAndSerialNumber(
        {
            "issuer": asn1_x509.Name.load(certificate.issuer.public_bytes()),
            "serial_number": certificate.serial_number,
        }
    )


def _digest(algorithm: DigestAlgorithm, data: bytes) -> bytes:
    return hashlib.new(algorithm.value, data).digest()
