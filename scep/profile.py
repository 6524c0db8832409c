"""Apple configuration profiles with a SCEP payload, for MDM administrators to push.

The payload keys are those of Apple's ``com.apple.security.scep`` payload (Device
Management documentation, "SCEP"); the profile is plist XML written with :mod:`plistlib`.
"""

from __future__ import annotations

import hashlib
import plistlib
import uuid
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

SCEP_PAYLOAD_TYPE = "com.apple.security.scep"
KEY_SIZE = 2048
# Apple's "Key Usage" bit mask: 1 signing, 4 encryption; 5 asks for both.
KEY_USAGE_SIGNING_AND_ENCRYPTION = 5


@dataclass(frozen=True)
class ScepProfile:
    """What goes into one SCEP enrollment profile."""

    url: str
    """The connector's SCEP URL, as devices reach it."""
    name: str
    """The CA identifier the device sends with GetCACert (the connector's name)."""
    subject: x509.Name
    challenge: str | None
    ca_certificate: x509.Certificate
    """The CA whose SHA-256 fingerprint the device checks in the GetCACert answer."""
    identifier: str
    """Reverse-DNS identifier of the profile; the payload's is this plus ``.scep``."""


def subject_array(name: x509.Name) -> list[list[list[str]]]:
    """Apple's array form of a DN: one array per RDN, most significant first (the ASN.1
    order), each holding [attribute, value] pairs, e.g. [[["O", "Acme"]], [["CN", "x"]]]."""
    return [
        [[attribute.rfc4514_attribute_name, str(attribute.value)] for attribute in rdn]
        for rdn in name.rdns
    ]


def ca_fingerprint(certificate: x509.Certificate) -> bytes:
    """SHA-256 over the certificate's DER, as raw bytes (a plist <data> element)."""
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).digest()


def build_profile(profile: ScepProfile) -> bytes:
    """The configuration profile as plist XML."""
    content: dict[str, object] = {
        "URL": profile.url,
        "Name": profile.name,
        "Subject": subject_array(profile.subject),
        "Keysize": KEY_SIZE,
        "Key Type": "RSA",
        "Key Usage": KEY_USAGE_SIGNING_AND_ENCRYPTION,
        "CAFingerprint": ca_fingerprint(profile.ca_certificate),
    }
    if profile.challenge is not None:
        content["Challenge"] = profile.challenge
    payload = {
        "PayloadContent": content,
        "PayloadType": SCEP_PAYLOAD_TYPE,
        "PayloadIdentifier": f"{profile.identifier}.scep",
        "PayloadUUID": str(uuid.uuid4()).upper(),
        "PayloadVersion": 1,
        "PayloadDisplayName": f"SCEP enrollment ({profile.name})",
    }
    outer = {
        "PayloadContent": [payload],
        "PayloadType": "Configuration",
        "PayloadIdentifier": profile.identifier,
        "PayloadUUID": str(uuid.uuid4()).upper(),
        "PayloadVersion": 1,
        "PayloadDisplayName": f"pkigate certificate ({profile.name})",
    }
    return plistlib.dumps(outer, fmt=plistlib.FMT_XML)
