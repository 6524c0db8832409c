"""Certificates and requests a peer sent, read whole before anything uses them.

cryptography loads a CSR or certificate at once but parses its names and extensions only
when they are first used, and refuses bad ones then: ValueError for an empty RDN, an
attribute twice in one RDN or a string that is not of its type, TypeError for a BIT STRING
in any attribute but x500UniqueIdentifier, DuplicateExtension, UnsupportedGeneralNameType.
Read here, at the edge, those become one typed refusal; read later (where a subject is
compared or logged), they were a crash of whichever front-end got there first.
"""

from __future__ import annotations

from cryptography import x509

from pkigate.core.errors import BadCSRError, InvalidCertificateError

# What cryptography raises for names and extensions it cannot read. Every place that reads
# them from something a peer sent catches this, not a tuple of its own.
UNREADABLE = (ValueError, TypeError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType)


def check_readable(csr: x509.CertificateSigningRequest) -> None:
    """BadCSRError unless the CSR's subject and extensions can be read."""
    try:
        csr.subject  # noqa: B018
    except UNREADABLE as exc:
        raise BadCSRError(f"CSR subject cannot be read: {exc}") from None
    try:
        csr.extensions  # noqa: B018
    except UNREADABLE as exc:
        raise BadCSRError(f"CSR extensions cannot be read: {exc}") from None


def check_certificate_readable(certificate: x509.Certificate) -> None:
    """InvalidCertificateError unless the certificate's subject, issuer and extensions can
    be read (a SCEP signer certificate and any other a message carries)."""
    for part in ("subject", "issuer", "extensions"):
        try:
            getattr(certificate, part)
        except UNREADABLE as exc:
            raise InvalidCertificateError(
                f"the certificate's {part} cannot be read: {exc}"
            ) from None
