"""ACME Renewal Information (RFC 9773): certificate identifiers and suggested windows."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509

from pkigate.acme.problems import AcmeProblem

MAX_CERT_ID_CHARS = 256


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    if not text or "=" in text:
        raise ValueError("empty or padded")
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64(raw) != text:
        raise ValueError("not canonical base64url")
    return raw


def serial_bytes(serial: int) -> bytes:
    """The content octets of the serial's DER INTEGER (a leading zero when the top bit is
    set), as RFC 9773 section 4.1 uses them."""
    return serial.to_bytes(serial.bit_length() // 8 + 1, "big")


def cert_id(certificate: x509.Certificate) -> str:
    """``base64url(AKI keyIdentifier) "." base64url(serial)`` of ``certificate``."""
    aki = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    if aki.key_identifier is None:
        raise ValueError("the certificate's AKI has no keyIdentifier")
    return f"{_b64(aki.key_identifier)}.{_b64(serial_bytes(certificate.serial_number))}"


@dataclass(frozen=True)
class CertId:
    key_identifier: bytes
    serial: int

    @property
    def serial_hex(self) -> str:
        return format(self.serial, "x")


def parse_cert_id(text: str) -> CertId:
    if len(text) > MAX_CERT_ID_CHARS or text.count(".") != 1:
        raise AcmeProblem("malformed", "a certID is base64url(AKI keyIdentifier).base64url(serial)")
    aki_text, serial_text = text.split(".")
    try:
        aki, serial = _unb64(aki_text), _unb64(serial_text)
    except (binascii.Error, ValueError):
        raise AcmeProblem("malformed", "the certID is not base64url") from None
    # A DER INTEGER's content: minimal, positive for a serial (RFC 5280 4.1.2.2).
    if not serial or serial[0] & 0x80 or (len(serial) > 1 and serial[0] == 0 and serial[1] < 0x80):
        raise AcmeProblem("malformed", "the certID's serial is not a positive DER integer")
    return CertId(aki, int.from_bytes(serial, "big"))


@dataclass(frozen=True)
class RenewalWindow:
    start: datetime
    end: datetime
    explanation_url: str | None = None

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {
            "suggestedWindow": {"start": stamp(self.start), "end": stamp(self.end)}
        }
        if self.explanation_url:
            body["explanationURL"] = self.explanation_url
        return body


def suggested_window(
    not_before: datetime, not_after: datetime, revoked: bool, now: datetime
) -> RenewalWindow:
    """Renew in the last third of the lifetime (the middle of it, so that a fleet spreads
    out); a revoked certificate should be replaced now (RFC 9773 section 4.2: a window in
    the past tells the client to renew immediately)."""
    if revoked:
        return RenewalWindow(now - timedelta(hours=1), now - timedelta(seconds=1))
    lifetime = not_after - not_before
    start = not_before + lifetime * 2 / 3
    end = not_before + lifetime * 5 / 6
    return RenewalWindow(start, end)


def stamp(moment: datetime) -> str:
    """An RFC 3339 timestamp to the second, UTC as "Z", as ACME documents carry them."""
    return moment.replace(microsecond=0).isoformat().replace("+00:00", "Z")
