"""Policy checks the core applies to every request: keys, names, validity.

Modelled on Boulder's ``goodkey`` for key checks; everything here raises a typed error
from :mod:`pkigate.core.errors` and never a bare exception.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtensionOID

from pkigate.core.errors import (
    BadRequestError,
    InvalidValidityError,
    PolicyViolationError,
    WeakKeyError,
)
from pkigate.core.model import SHORT_LIVED_MAX, UsageMode, Validity
from pkigate.core.names import check_dn

RSA_MIN_BITS = 2048
RSA_MAX_BITS = 8192
ALLOWED_CURVES = frozenset({"secp256r1", "secp384r1", "secp521r1"})
_FERMAT_ROUNDS = 100
# Whether a residue modulo 4032 (64 * 63) or 715 (65 * 11) is a square's: a number that
# is not a square modulo one of them is not a square. Together they settle all but about
# 1 in 120 of Fermat's rounds in small integers, without a square root of a 1000-bit one.
_SQUARE_MODULI = (4032, 715)


def _square_residues(m: int) -> bytes:
    """A table of m bytes: 1 at each residue modulo m that is a square's, else 0."""
    table = bytearray(m)
    for i in range(m):
        table[i * i % m] = 1
    return bytes(table)


_IS_SQUARE_RESIDUE = tuple(_square_residues(m) for m in _SQUARE_MODULI)


@cache
def _small_primes_product() -> int:
    """The product of the primes below 1000: a modulus sharing one is trivially factored."""
    sieve = bytearray([1]) * 1000
    sieve[0:2] = b"\x00\x00"
    for i in range(2, 32):
        if sieve[i]:
            sieve[i * i :: i] = bytearray(len(sieve[i * i :: i]))
    return math.prod(i for i, is_prime in enumerate(sieve) if is_prime)


def check_public_key(key: CertificatePublicKeyTypes) -> None:
    """Refuse keys that are unsupported, too small, or visibly weak."""
    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        if key.key_size < RSA_MIN_BITS:
            raise WeakKeyError(f"RSA key of {key.key_size} bits; at least {RSA_MIN_BITS} needed")
        if key.key_size > RSA_MAX_BITS:
            raise WeakKeyError(f"RSA key of {key.key_size} bits; at most {RSA_MAX_BITS} allowed")
        # CA/Browser Forum and Boulder: odd exponent in [65537, 2^256).
        if numbers.e % 2 == 0 or numbers.e < 65537 or numbers.e.bit_length() > 256:
            raise WeakKeyError(f"RSA public exponent {numbers.e} is not acceptable")
        if math.gcd(numbers.n, _small_primes_product()) != 1:
            raise WeakKeyError("RSA modulus has a small prime factor")
        _check_fermat(numbers.n)
        return
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ALLOWED_CURVES:
            raise WeakKeyError(
                f"elliptic curve {key.curve.name} is not allowed; use P-256, P-384 or P-521"
            )
        return
    if isinstance(key, ed25519.Ed25519PublicKey):
        return
    raise WeakKeyError(f"unsupported public key type {type(key).__name__.lstrip('_')}")


def _check_fermat(n: int) -> None:
    """Refuse moduli whose primes are close together (Fermat's method finds them fast):
    n = a^2 - b^2 for one of the first ``_FERMAT_ROUNDS`` values of a from sqrt(n) up.
    b^2 = a^2 - n is followed modulo the two small moduli; only a value that could be a
    square there is computed and tested in full."""
    start = math.isqrt(n)
    if start * start < n:
        start += 1
    m1, m2 = _SQUARE_MODULI
    square1, square2 = _IS_SQUARE_RESIDUE
    a1, a2 = start % m1, start % m2
    r1, r2 = (start * start - n) % m1, (start * start - n) % m2
    for step in range(_FERMAT_ROUNDS):
        if square1[r1] and square2[r2]:
            a = start + step
            b = math.isqrt(a * a - n)
            if b * b == a * a - n:
                raise WeakKeyError("RSA modulus is factorable with Fermat's method")
        # (a + 1)^2 - n = a^2 - n + 2a + 1
        r1, r2 = (r1 + 2 * a1 + 1) % m1, (r2 + 2 * a2 + 1) % m2
        a1, a2 = (a1 + 1) % m1, (a2 + 1) % m2


@dataclass(frozen=True)
class ValidityWindow:
    not_before: datetime
    not_after: datetime


def compute_validity(
    validity: Validity,
    *,
    now: datetime,
    backdate: timedelta,
    usage_mode: UsageMode,
    ca_not_before: datetime,
    ca_not_after: datetime,
    truncate_to_ca: bool,
) -> ValidityWindow:
    """notBefore/notAfter for a certificate, refusing what the CA cannot certify.

    A lifetime past the CA's own notAfter is refused unless the CA is configured to
    truncate; a SHORT_LIVED_CERTIFICATE CA issues at most 7 days.
    """
    # X.509 times have one-second resolution.
    not_after = validity.not_after(now).replace(microsecond=0)
    if not_after <= now:
        raise InvalidValidityError(f"requested notAfter {not_after.isoformat()} is in the past")
    if usage_mode == UsageMode.SHORT_LIVED_CERTIFICATE and not_after - now > SHORT_LIVED_MAX:
        raise InvalidValidityError(
            "this CA is in SHORT_LIVED_CERTIFICATE mode: validity is at most 7 days"
        )
    if not_after > ca_not_after:
        if not truncate_to_ca:
            raise InvalidValidityError(
                f"requested notAfter {not_after.isoformat()} is beyond the CA's notAfter "
                f"{ca_not_after.isoformat()}"
            )
        not_after = ca_not_after
    not_before = max(now - backdate, ca_not_before)
    return ValidityWindow(not_before.replace(microsecond=0), not_after)


def check_contents(
    subject: x509.Name,
    sans: Sequence[x509.GeneralName],
    extensions: Sequence[x509.Extension[x509.ExtensionType]],
) -> None:
    """Structural rules of RFC 5280 that no template or passthrough may break."""
    if not len(subject) and not sans:
        raise PolicyViolationError("the certificate needs a subject or a subject alternative name")
    check_dn(subject)
    for name in sans:
        if isinstance(name, x509.DirectoryName):
            check_dn(name.value)
        elif isinstance(name, x509.DNSName | x509.RFC822Name | x509.UniformResourceIdentifier) and (
            not name.value or not name.value.isascii()
        ):
            raise BadRequestError(
                f"a {type(name).__name__} alternative name must be non-empty ASCII (IA5String), "
                f"got {name.value!r}"
            )
    by_oid = {ext.oid: ext for ext in extensions}
    bc = by_oid.get(ExtensionOID.BASIC_CONSTRAINTS)
    is_ca = bool(bc and isinstance(bc.value, x509.BasicConstraints) and bc.value.ca)
    ku = by_oid.get(ExtensionOID.KEY_USAGE)
    if ku is not None and isinstance(ku.value, x509.KeyUsage):
        if not is_ca and (ku.value.key_cert_sign or ku.value.crl_sign):
            raise PolicyViolationError(
                "keyCertSign and cRLSign are only for CA certificates (RFC 5280 4.2.1.3)"
            )
        if not any(
            (
                ku.value.digital_signature,
                ku.value.content_commitment,
                ku.value.key_encipherment,
                ku.value.data_encipherment,
                ku.value.key_agreement,
                ku.value.key_cert_sign,
                ku.value.crl_sign,
            )
        ):
            raise PolicyViolationError("key usage must assert at least one usage")
    if (
        is_ca
        and ku is not None
        and isinstance(ku.value, x509.KeyUsage)
        and not ku.value.key_cert_sign
    ):
        raise PolicyViolationError("a CA certificate's key usage must include keyCertSign")
    eku = by_oid.get(ExtensionOID.EXTENDED_KEY_USAGE)
    if eku is not None and isinstance(eku.value, x509.ExtendedKeyUsage) and not list(eku.value):
        raise PolicyViolationError("extended key usage must list at least one purpose")
