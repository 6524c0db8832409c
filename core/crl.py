"""A CRL's DER, with the list of revoked certificates encoded here rather than by
``cryptography``.

``cryptography``'s builders cost about 5 µs per revoked certificate (a
``RevokedCertificateBuilder``, an ``x509.RevokedCertificate``, then its encoding), and even
encoding entries by hand costs a few µs each in Python, which made a million-entry CRL
spend seconds there. Each entry is a tiny SEQUENCE of fixed shape (RFC 5280 5.1:
userCertificate INTEGER, revocationDate Time, and at most the reasonCode extension) that
never changes once the certificate is revoked, so it is encoded here once, when the
revocation is stored, and kept beside it (``certificates.crl_entry``); a CRL is the store's
entries joined. Everything else in the CRL (issuer, times, algorithm identifiers, CRL
extensions) is still encoded by ``cryptography``: a CRL without entries is built as a
template, the entries are spliced into its TBSCertList after nextUpdate, and the result is
signed with the CA key. Tests compare the result byte for byte with ``cryptography``'s
builder.
"""

from __future__ import annotations

from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from pkigate.core.der import element as der_element
from pkigate.core.der import encode_length, tlv
from pkigate.core.model import RevocationReason
from pkigate.core.signing import CASigningKey, assemble, signature

_SEQUENCE = 0x30
_INTEGER = 0x02
_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18
_REASON_CODE = x509.ObjectIdentifier("2.5.29.21")

# ``unspecified`` is expressed by leaving the reason out (RFC 5280 5.3.1).
_REASON_FLAGS = {
    RevocationReason.keyCompromise: x509.ReasonFlags.key_compromise,
    RevocationReason.cACompromise: x509.ReasonFlags.ca_compromise,
    RevocationReason.affiliationChanged: x509.ReasonFlags.affiliation_changed,
    RevocationReason.superseded: x509.ReasonFlags.superseded,
    RevocationReason.cessationOfOperation: x509.ReasonFlags.cessation_of_operation,
    RevocationReason.privilegeWithdrawn: x509.ReasonFlags.privilege_withdrawn,
    RevocationReason.aACompromise: x509.ReasonFlags.aa_compromise,
}


def reason_flag(reason: RevocationReason) -> x509.ReasonFlags | None:
    """The CRL/OCSP reason; ``unspecified`` is expressed by leaving it out (RFC 5280 5.3.1)."""
    return _REASON_FLAGS.get(reason)


def _oid_der(oid: x509.ObjectIdentifier) -> bytes:
    arcs = [int(a) for a in oid.dotted_string.split(".")]
    body = bytearray([40 * arcs[0] + arcs[1]])
    for arc in arcs[2:]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return tlv(0x06, bytes(body))


# The crlEntryExtensions (a SEQUENCE holding one non-critical reasonCode) per stored reason.
_REASON_EXTENSIONS = {
    reason.value: tlv(
        _SEQUENCE,
        tlv(_SEQUENCE, _oid_der(_REASON_CODE), tlv(0x04, x509.CRLReason(flag).public_bytes())),
    )
    for reason, flag in _REASON_FLAGS.items()
}


def entry(serial: str, revoked_at: datetime, reason: str | None) -> bytes:
    """One element of revokedCertificates (RFC 5280 5.1) for a certificate with ``serial``
    (hex, as the store keeps it) revoked at ``revoked_at`` (naive: UTC) for ``reason`` (a
    stored :class:`RevocationReason` name; None or ``unspecified``: no extension)."""
    number = int(serial, 16)
    # A positive INTEGER: one more octet than the bits need when the top bit is set.
    serial_der = tlv(_INTEGER, number.to_bytes(number.bit_length() // 8 + 1, "big"))
    extension = _REASON_EXTENSIONS.get(reason, b"") if reason else b""
    return tlv(_SEQUENCE, serial_der, _time_der(revoked_at), extension)


def _time_der(at: datetime) -> bytes:
    """RFC 5280 4.1.2.5: UTCTime for 1950 to 2049, else GeneralizedTime; in UTC, to the
    second (a fraction is dropped, as ``cryptography`` does)."""
    if at.tzinfo is not None:
        at = at.astimezone(UTC)
    digits = f"{at.year:04d}{at.month:02d}{at.day:02d}{at.hour:02d}{at.minute:02d}{at.second:02d}Z"
    if 1950 <= at.year < 2050:
        return tlv(_UTC_TIME, digits[2:].encode())
    return tlv(_GENERALIZED_TIME, digits.encode())


def splice_entries(template_der: bytes, entries: bytes) -> tuple[bytes, bytes]:
    """(TBSCertList, signatureAlgorithm) of ``template_der`` (a CRL without entries) with
    revokedCertificates, the SEQUENCE of ``entries`` (:func:`entry` values joined), inserted
    after nextUpdate, where RFC 5280 5.1 places it; no entries: the field is left out, as
    ``cryptography`` does. Tens of MiB for a million entries: copied once, here."""
    _, content, _ = der_element(template_der, 0)
    _, tbs_content, tbs_end = der_element(template_der, content)
    _, _, algorithm_end = der_element(template_der, tbs_end)
    algorithm = template_der[tbs_end:algorithm_end]
    position = tbs_content
    fields: list[tuple[int, int, int]] = []
    while position < tbs_end:
        tag, _, stop = der_element(template_der, position)
        fields.append((tag, position, stop))
        position = stop
    # version, signature, issuer, thisUpdate, nextUpdate, then [0] crlExtensions.
    times = [i for i, (tag, _, _) in enumerate(fields) if tag in (_UTC_TIME, _GENERALIZED_TIME)]
    if len(times) != 2 or any(tag == _SEQUENCE for tag, _, _ in fields[times[1] + 1 :][:1]):
        raise ValueError("the template CRL has no nextUpdate or already lists entries")
    cut = fields[times[1]][2]
    head, tail = template_der[tbs_content:cut], template_der[cut:tbs_end]
    listed = bytes([_SEQUENCE]) + encode_length(len(entries)) if entries else b""
    length = len(head) + len(listed) + len(entries) + len(tail)
    tbs = b"".join((bytes([_SEQUENCE]), encode_length(length), head, listed, entries, tail))
    return tbs, algorithm


def sign_tbs(
    tbs: bytes,
    algorithm: bytes,
    key: CASigningKey,
    hash_algorithm: hashes.SHA256 | hashes.SHA384 | hashes.SHA512,
) -> bytes:
    """CertificateList: ``tbs`` signed by ``key`` (in software or on a token) as
    ``algorithm`` (the template's signatureAlgorithm, which ``cryptography`` chose for
    this key's family and hash)."""
    return assemble(tbs, algorithm, signature(key, tbs, hash_algorithm))
