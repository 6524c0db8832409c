"""A CRL's DER, with the list of revoked certificates encoded here rather than by
``cryptography``.

``cryptography``'s builders cost about 5 µs per revoked certificate (a
``RevokedCertificateBuilder``, an ``x509.RevokedCertificate``, then its encoding), which
made a million-entry CRL spend most of its time there. Each entry is a tiny SEQUENCE of
fixed shape (RFC 5280 5.1: userCertificate INTEGER, revocationDate Time, and at most the
reasonCode extension), so it is encoded by hand in well under a microsecond. Everything
else in the CRL (issuer, times, algorithm identifiers, CRL extensions) is still encoded by
``cryptography``: a CRL without entries is built as a template, the entries are spliced
into its TBSCertList after nextUpdate, and the result is signed with the CA key. Tests
compare the result byte for byte with ``cryptography``'s builder.
"""

from __future__ import annotations

from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from pkigate.core.der import element as der_element
from pkigate.core.der import tlv
from pkigate.core.signing import CASigningKey, assemble, signature

_SEQUENCE = 0x30
_UTC_TIME = 0x17
_GENERALIZED_TIME = 0x18
_CONTEXT_0 = 0xA0


def reason_extensions(flags: dict[str, x509.ReasonFlags]) -> dict[str, bytes]:
    """The crlEntryExtensions (a SEQUENCE holding one non-critical reasonCode) per stored
    reason; a reason with no flag (``unspecified``) has no extension (RFC 5280 5.3.1)."""
    out: dict[str, bytes] = {}
    for name, flag in flags.items():
        value = x509.CRLReason(flag).public_bytes()  # the ENUMERATED, DER
        oid = x509.ObjectIdentifier("2.5.29.21")
        extension = tlv(_SEQUENCE, _oid_der(oid), tlv(0x04, value))
        out[name] = tlv(_SEQUENCE, extension)
    return out


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


def _header(tag: int, length: int) -> bytes:
    if length < 0x80:
        return bytes((tag, length))
    octets = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(octets))) + octets


def revoked_certificates(
    entries: Iterable[tuple[str, str, str | None]], extensions: dict[str, bytes]
) -> tuple[bytes, int]:
    """The DER of revokedCertificates and its entry count; empty bytes for no entry (the
    field is then absent, as ``cryptography`` leaves it).

    ``entries`` are (serial in hex, revocation time as UTC text ``YYYY-MM-DD HH:MM:SS``
    perhaps followed by a fraction, stored reason name): the store hands them over in this
    shape straight from its driver, so that no datetime is made per entry. A revocation
    time is encoded once per distinct second (revocations come in bursts). RFC 5280
    4.1.2.5: UTCTime for 1950 to 2049, else GeneralizedTime; no fraction of a second."""
    parts: list[bytes] = []
    append = parts.append
    get_extension = extensions.get
    times: dict[str, bytes] = {}
    get_time = times.get
    count = 0
    for serial, at, reason in entries:
        number = int(serial, 16)
        # A positive INTEGER: one more octet than the bits need when the top bit is set.
        serial_der = number.to_bytes(number.bit_length() // 8 + 1, "big")
        second = at[:19]
        time_der = get_time(second)
        if time_der is None:
            time_der = times[second] = _time_der(second)
        extension = get_extension(reason, b"")  # type: ignore[arg-type]
        length = 2 + len(serial_der) + len(time_der) + len(extension)
        if length < 0x80:
            append(bytes((_SEQUENCE, length, 0x02, len(serial_der))))
        else:  # a serial of more than 20 octets, never issued here but not worth a crash
            integer = _header(0x02, len(serial_der))
            append(_header(_SEQUENCE, length - 2 + len(integer)) + integer)
        append(serial_der)
        append(time_der)
        append(extension)
        count += 1
    if not count:
        return b"", 0
    body = b"".join(parts)
    return _header(_SEQUENCE, len(body)) + body, count


_DIGITS_ONLY = str.maketrans("", "", "-: T")


def _time_der(second: str) -> bytes:
    digits = second.translate(_DIGITS_ONLY)  # YYYYMMDDHHMMSS
    if len(digits) != 14 or not digits.isdigit():
        raise ValueError(f"not a revocation time: {second!r}")
    if "1950" <= digits[:4] < "2050":  # four digits: text order is number order
        return b"\x17\x0d" + digits[2:].encode() + b"Z"
    return b"\x18\x0f" + digits.encode() + b"Z"


def splice_entries(template_der: bytes, revoked: bytes) -> tuple[bytes, bytes]:
    """(TBSCertList, signatureAlgorithm) of ``template_der`` (a CRL without entries) with
    ``revoked`` inserted after nextUpdate, where RFC 5280 5.1 places revokedCertificates."""
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
    body = template_der[tbs_content:cut] + revoked + template_der[cut:tbs_end]
    return _header(_SEQUENCE, len(body)) + body, algorithm


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
