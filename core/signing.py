"""Signing as a CA, whether its key is a software key or a key that never leaves a token.

``cryptography``'s builders sign only with keys it holds. A token key (:class:`TokenKey`)
signs bytes it is handed instead, so for it a structure is built and signed once with a
*stand-in*: a throwaway software key of the same family and curve, which makes
``cryptography`` encode the to-be-signed part and the signatureAlgorithm exactly as it would
for the CA key (neither depends on the signing key's value; only a CSR carries the key,
and there the CA's own public key is put in). The to-be-signed bytes are then signed on the
token, the signature checked against the CA's public key, and the DER assembled: nothing
signed by a token leaves this module unverified.

Software keys take ``cryptography``'s own path, unchanged.
"""

from __future__ import annotations

import threading
from typing import Protocol, runtime_checkable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from pkigate.core.der import element, encode_length, tlv
from pkigate.core.errors import KeyBackendError
from pkigate.core.model import CAPrivateKey

HashAlgorithm = hashes.SHA256 | hashes.SHA384 | hashes.SHA512
CAPublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

_SEQUENCE = 0x30
_BIT_STRING = 0x03


@runtime_checkable
class TokenKey(Protocol):
    """A CA key held by a key backend that signs on request and never hands the key out."""

    def public_key(self) -> CAPublicKey:
        """The CA's public key, read from the token."""

    def sign(self, data: bytes, hash_algorithm: HashAlgorithm) -> bytes:
        """A signature over ``data``: PKCS#1 v1.5 for RSA, DER ECDSA-Sig-Value for EC."""

    def check(self) -> None:
        """Whether the key can be used now (``/readyz``): raises if not."""


# What a CA signs with: the key itself (software), or a handle on a token.
CASigningKey = CAPrivateKey | TokenKey


def is_software(key: CASigningKey) -> bool:
    return isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)


def signature(key: CASigningKey, data: bytes, hash_algorithm: HashAlgorithm) -> bytes:
    """``data`` signed by ``key`` (PKCS#1 v1.5 for RSA, ECDSA for EC); a token's signature
    is verified against its public key before it is returned."""
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), hash_algorithm)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(data, ec.ECDSA(hash_algorithm))
    signed = key.sign(data, hash_algorithm)
    try:
        verify(key.public_key(), signed, data, hash_algorithm)
    except InvalidSignature:
        raise KeyBackendError(
            "the token's signature does not verify against the CA's public key; nothing was issued"
        ) from None
    return signed


def verify(
    public_key: CAPublicKey, signed: bytes, data: bytes, hash_algorithm: HashAlgorithm
) -> None:
    if isinstance(public_key, rsa.RSAPublicKey):
        public_key.verify(signed, data, padding.PKCS1v15(), hash_algorithm)
    else:
        public_key.verify(signed, data, ec.ECDSA(hash_algorithm))


def assemble(tbs: bytes, algorithm: bytes, signed: bytes) -> bytes:
    """SEQUENCE { tbs, signatureAlgorithm, BIT STRING signature }: the shape of a
    certificate, a CSR and a CRL alike (all three DER already, but the signature)."""
    bits = tlv(_BIT_STRING, b"\x00", signed)
    body_length = len(tbs) + len(algorithm) + len(bits)
    # One join, one copy: a million-entry CRL's TBSCertList is tens of MiB.
    return b"".join((bytes([_SEQUENCE]), encode_length(body_length), tbs, algorithm, bits))


def _parts(signed_der: bytes) -> tuple[bytes, bytes]:
    """(to-be-signed, signatureAlgorithm) of a signed structure this process encoded."""
    _, content, _ = element(signed_der, 0)
    _, _, tbs_end = element(signed_der, content)
    _, _, algorithm_end = element(signed_der, tbs_end)
    return signed_der[content:tbs_end], signed_der[tbs_end:algorithm_end]


def builder_key(key: CASigningKey) -> CAPrivateKey:
    """The key to hand a ``cryptography`` builder whose to-be-signed bytes are signed
    again with :func:`signature`: the key itself, or a token key's stand-in."""
    if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        return key
    return stand_in(key.public_key())


def sign_certificate(
    builder: x509.CertificateBuilder, key: CASigningKey, hash_algorithm: HashAlgorithm
) -> x509.Certificate:
    if is_software(key):
        return builder.sign(key, hash_algorithm)  # type: ignore[arg-type]
    draft = builder.sign(builder_key(key), hash_algorithm)
    tbs, algorithm = _parts(draft.public_bytes(serialization.Encoding.DER))
    return x509.load_der_x509_certificate(
        assemble(tbs, algorithm, signature(key, tbs, hash_algorithm))
    )


def sign_csr(
    builder: x509.CertificateSigningRequestBuilder,
    key: CASigningKey,
    hash_algorithm: HashAlgorithm,
) -> x509.CertificateSigningRequest:
    if is_software(key):
        return builder.sign(key, hash_algorithm)  # type: ignore[arg-type]
    public_key = key.public_key()
    draft = builder.sign(builder_key(key), hash_algorithm)
    draft_tbs, algorithm = _parts(draft.public_bytes(serialization.Encoding.DER))
    # CertificationRequestInfo: version, subject, subjectPKInfo, [0] attributes. The
    # stand-in's public key is replaced by the CA's.
    _, position, end = element(draft_tbs, 0)
    fields = []
    while position < end:
        _, _, stop = element(draft_tbs, position)
        fields.append(draft_tbs[position:stop])
        position = stop
    fields[2] = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    tbs = tlv(_SEQUENCE, *fields)
    csr = x509.load_der_x509_csr(assemble(tbs, algorithm, signature(key, tbs, hash_algorithm)))
    if not csr.is_signature_valid:
        raise KeyBackendError("the CSR signed on the token does not verify")
    return csr


_stand_ins: dict[str, CAPrivateKey] = {}
_stand_ins_lock = threading.Lock()


def stand_in(public_key: CAPublicKey) -> CAPrivateKey:
    """A software key of the same family (and curve) as ``public_key``, made once per
    process: ``cryptography`` encodes the signatureAlgorithm from it exactly as it would
    from the token's key (for RSA the AlgorithmIdentifier does not depend on the size)."""
    kind = public_key.curve.name if isinstance(public_key, ec.EllipticCurvePublicKey) else "rsa"
    with _stand_ins_lock:
        key = _stand_ins.get(kind)
        if key is None:
            if isinstance(public_key, ec.EllipticCurvePublicKey):
                key = ec.generate_private_key(public_key.curve)
            else:
                key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            _stand_ins[kind] = key
    return key
