"""Certificate templates ([MS-CRTD]) decoded from their pKICertificateTemplate entries.

Decoding is strict: a value that does not have its attribute's encoding (an interval that is
not an 8-byte FILETIME, a flag word that is not an integer, an EKU that is not an OID, two
values in a single-valued attribute) raises :class:`TemplateError`, which names the template
and the attribute. The connector refuses such a template instead of guessing what it means.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Self, TypeVar

from pkigate.adcs.encoding import (
    MalformedAttributeValue,
    filetime_to_interval,
    from_ad_int32,
    key_usage_from_bytes,
)
from pkigate.adcs.flags import (
    CertificateNameFlag,
    EnrollmentFlag,
    KeyUsage,
    PrivateKeyFlag,
    TemplateFlag,
)
from pkigate.adcs.security import MalformedSecurityDescriptor, parse_security_descriptor

OID_CLIENT_AUTH = "1.3.6.1.5.5.7.3.2"
OID_SMARTCARD_LOGON = "1.3.6.1.4.1.311.20.2.2"
OID_PKINIT_CLIENT_AUTH = "1.3.6.1.5.2.3.4"
OID_ANY_PURPOSE = "2.5.29.37.0"
OID_CERTIFICATE_REQUEST_AGENT = "1.3.6.1.4.1.311.20.2.1"

# What the ADCS abuse literature (ESC1, ESC2) calls an authentication EKU: a certificate with
# any of them, or with no EKU at all, can log on to the domain through PKINIT or Schannel.
AUTHENTICATION_EKUS = frozenset(
    {OID_CLIENT_AUTH, OID_SMARTCARD_LOGON, OID_PKINIT_CLIENT_AUTH, OID_ANY_PURPOSE}
)

# Template schema versions 1 to 4 exist ([MS-CRTD] 2.16); a later one may carry meanings this
# decoder does not know, so it is refused rather than half-understood.
SUPPORTED_SCHEMA_VERSIONS = range(1, 5)

# pKIKeyUsage bits under the keyword names of cryptography's x509.KeyUsage (RFC 5280
# 4.2.1.3; nonRepudiation is "content_commitment" there).
KEY_USAGE_NAMES: Mapping[KeyUsage, str] = {
    KeyUsage.DIGITAL_SIGNATURE: "digital_signature",
    KeyUsage.NON_REPUDIATION: "content_commitment",
    KeyUsage.KEY_ENCIPHERMENT: "key_encipherment",
    KeyUsage.DATA_ENCIPHERMENT: "data_encipherment",
    KeyUsage.KEY_AGREEMENT: "key_agreement",
    KeyUsage.KEY_CERT_SIGN: "key_cert_sign",
    KeyUsage.CRL_SIGN: "crl_sign",
    KeyUsage.ENCIPHER_ONLY: "encipher_only",
    KeyUsage.DECIPHER_ONLY: "decipher_only",
}

# The attributes :meth:`CertificateTemplate.from_entry` reads: what to ask the directory for.
TEMPLATE_ATTRIBUTES = (
    "cn",
    "displayName",
    "flags",
    "revision",
    "msPKI-Template-Schema-Version",
    "msPKI-Template-Minor-Revision",
    "msPKI-Cert-Template-OID",
    "pKIExpirationPeriod",
    "pKIOverlapPeriod",
    "pKIExtendedKeyUsage",
    "msPKI-Certificate-Application-Policy",
    "pKIKeyUsage",
    "pKICriticalExtensions",
    "msPKI-Minimal-Key-Size",
    "msPKI-Certificate-Name-Flag",
    "msPKI-Enrollment-Flag",
    "msPKI-Private-Key-Flag",
    "msPKI-RA-Signature",
    "msPKI-RA-Application-Policies",
    "nTSecurityDescriptor",
)

_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
_INTEGER = re.compile(rb"-?(0|[1-9][0-9]*)")
# Schema 3 and 4 templates keep key and hash algorithms beside the RA policies in
# msPKI-RA-Application-Policies as "Name`Type`Value`" triplets ([MS-CRTD] 2.23.2).
_RA_POLICY_PROPERTY = "msPKI-RA-Application-Policies"
_TRIPLET_TYPES = frozenset({"DWORD", "PZPWSTR"})

_Flag = TypeVar("_Flag", CertificateNameFlag, EnrollmentFlag, PrivateKeyFlag, TemplateFlag)


def merge_attribute_options(
    raw_attributes: Mapping[str, Sequence[bytes]],
) -> dict[str, list[bytes]]:
    """Raw values by lower-case attribute name, options such as ";binary" dropped.

    ldap3 may return one attribute under two keys ("cACertificate;binary", and
    "cACertificate" when that was asked for); their values are merged, each once.
    """
    merged: dict[str, list[bytes]] = {}
    for name, values in raw_attributes.items():
        found = merged.setdefault(name.split(";", 1)[0].lower(), [])
        found.extend(value for value in values if value not in found)
    return merged


class TemplateError(ValueError):
    """A template entry with a missing or malformed attribute: the template is unusable."""

    def __init__(self, template_name: str, attribute: str, reason: str) -> None:
        super().__init__(f"certificate template {template_name!r}: {attribute}: {reason}")
        self.template_name = template_name
        self.attribute = attribute
        self.reason = reason


@dataclass(frozen=True)
class CertificateTemplate:
    """One certificate template, as its pKICertificateTemplate entry defines it."""

    dn: str
    name: str
    """cn: the name requests and enrollment services use."""
    display_name: str
    """displayName, or the name when there is none."""
    oid: str | None
    """msPKI-Cert-Template-OID (schema version 2 and later)."""
    schema_version: int
    """msPKI-Template-Schema-Version, 1 to 4 (1 when absent, as for version 1 templates)."""
    revision: int
    """revision: the template's major version."""
    minor_revision: int
    """msPKI-Template-Minor-Revision."""
    validity: timedelta
    """pKIExpirationPeriod: how long issued certificates are valid."""
    overlap: timedelta
    """pKIOverlapPeriod: the renewal window before a certificate expires."""
    ekus: tuple[str, ...]
    """pKIExtendedKeyUsage, dotted OIDs."""
    application_policies: tuple[str, ...]
    """msPKI-Certificate-Application-Policy, dotted OIDs (schema version 2 and later)."""
    key_usage: frozenset[str]
    """pKIKeyUsage as cryptography's x509.KeyUsage keyword names (see KEY_USAGE_NAMES)."""
    minimal_key_size: int
    """msPKI-Minimal-Key-Size in bits; 0 when the template sets none."""
    name_flags: CertificateNameFlag
    enrollment_flags: EnrollmentFlag
    private_key_flags: PrivateKeyFlag
    general_flags: TemplateFlag
    """The `flags` attribute."""
    ra_signatures: int
    """msPKI-RA-Signature: enrollment agent signatures a request needs."""
    ra_application_policies: tuple[str, ...]
    """Application policy OIDs the enrollment agent signatures must carry."""
    critical_extensions: tuple[str, ...]
    """pKICriticalExtensions: OIDs of the extensions issued as critical."""
    security_descriptor: bytes
    """nTSecurityDescriptor, self-relative; see :func:`pkigate.adcs.security.enroll_rights`."""

    # --- subject and SAN ------------------------------------------------------------------------

    @property
    def enrollee_supplies_subject(self) -> bool:
        """The request, not the directory, names the subject (ESC1 when it authenticates)."""
        return CertificateNameFlag.ENROLLEE_SUPPLIES_SUBJECT in self.name_flags

    @property
    def enrollee_supplies_subject_alt_name(self) -> bool:
        return CertificateNameFlag.ENROLLEE_SUPPLIES_SUBJECT_ALT_NAME in self.name_flags

    @property
    def requires_upn(self) -> bool:
        """The SAN carries the requester's userPrincipalName."""
        return CertificateNameFlag.SUBJECT_ALT_REQUIRE_UPN in self.name_flags

    @property
    def requires_dns(self) -> bool:
        """The SAN carries the requester's dNSHostName."""
        return CertificateNameFlag.SUBJECT_ALT_REQUIRE_DNS in self.name_flags

    @property
    def requires_domain_dns(self) -> bool:
        return CertificateNameFlag.SUBJECT_ALT_REQUIRE_DOMAIN_DNS in self.name_flags

    @property
    def requires_email(self) -> bool:
        """The SAN carries the requester's mail."""
        return CertificateNameFlag.SUBJECT_ALT_REQUIRE_EMAIL in self.name_flags

    @property
    def requires_spn(self) -> bool:
        return CertificateNameFlag.SUBJECT_ALT_REQUIRE_SPN in self.name_flags

    @property
    def requires_directory_guid(self) -> bool:
        return CertificateNameFlag.SUBJECT_ALT_REQUIRE_DIRECTORY_GUID in self.name_flags

    @property
    def subject_dns_as_cn(self) -> bool:
        """The subject is CN=<dNSHostName>."""
        return CertificateNameFlag.SUBJECT_REQUIRE_DNS_AS_CN in self.name_flags

    @property
    def subject_requires_email(self) -> bool:
        """The subject carries the requester's mail as an emailAddress attribute."""
        return CertificateNameFlag.SUBJECT_REQUIRE_EMAIL in self.name_flags

    @property
    def subject_requires_common_name(self) -> bool:
        return CertificateNameFlag.SUBJECT_REQUIRE_COMMON_NAME in self.name_flags

    @property
    def subject_requires_directory_path(self) -> bool:
        """The subject is the requester's distinguished name."""
        return CertificateNameFlag.SUBJECT_REQUIRE_DIRECTORY_PATH in self.name_flags

    # --- enrollment ------------------------------------------------------------------------------

    @property
    def pend_all_requests(self) -> bool:
        """Every request waits for a certificate manager's approval."""
        return EnrollmentFlag.PEND_ALL_REQUESTS in self.enrollment_flags

    @property
    def autoenrollment(self) -> bool:
        """Autoenrollment clients enroll for this template ([MS-CRTD] 2.26)."""
        return EnrollmentFlag.AUTO_ENROLLMENT in self.enrollment_flags

    @property
    def no_security_extension(self) -> bool:
        """Issued certificates carry no SID extension (szOID_NTDS_CA_SECURITY_EXT)."""
        return EnrollmentFlag.NO_SECURITY_EXTENSION in self.enrollment_flags

    @property
    def machine_type(self) -> bool:
        """The template is for computer accounts."""
        return TemplateFlag.MACHINE_TYPE in self.general_flags

    @property
    def exportable_key(self) -> bool:
        return PrivateKeyFlag.EXPORTABLE_KEY in self.private_key_flags

    # --- what issued certificates are good for -------------------------------------------------

    @property
    def issued_ekus(self) -> tuple[str, ...]:
        """The EKUs a certificate from this template carries.

        From schema version 2 the CA takes them from msPKI-Certificate-Application-Policy;
        version 1 templates have only pKIExtendedKeyUsage ([MS-CRTD] 2.18, 2.25).
        """
        return self.application_policies if self.schema_version >= 2 else self.ekus

    @property
    def any_purpose_or_no_eku(self) -> bool:
        """Certificates are good for anything: the Any Purpose EKU, or no EKU at all (ESC2)."""
        declared = set(self.ekus) | set(self.application_policies)
        return OID_ANY_PURPOSE in declared or not self.issued_ekus

    @property
    def client_authentication(self) -> bool:
        """Certificates authenticate to the domain (PKINIT, Schannel).

        True when either EKU attribute names client authentication, smart card logon, PKINIT
        client authentication or Any Purpose, or when the certificate carries no EKU. Both
        attributes are read so that neither can hide an authentication EKU.
        """
        declared = set(self.ekus) | set(self.application_policies)
        return bool(declared & AUTHENTICATION_EKUS) or not self.issued_ekus

    @property
    def enrollment_agent(self) -> bool:
        """Certificates may sign requests on behalf of others (Certificate Request Agent)."""
        declared = set(self.ekus) | set(self.application_policies)
        return OID_CERTIFICATE_REQUEST_AGENT in declared or self.any_purpose_or_no_eku

    # --- decoding --------------------------------------------------------------------------------

    @classmethod
    def from_entry(cls, dn: str, raw_attributes: Mapping[str, Sequence[bytes]]) -> Self:
        """Decode a template from its entry's raw attribute values (ldap3 raw_attributes).

        Attribute names are matched case-insensitively. Raises :class:`TemplateError`.
        """
        entry = _Entry(dn, raw_attributes)
        schema_version = entry.integer("msPKI-Template-Schema-Version", default=1, minimum=1)
        if schema_version not in SUPPORTED_SCHEMA_VERSIONS:
            raise entry.error(
                "msPKI-Template-Schema-Version", f"schema version {schema_version} unsupported"
            )
        return cls(
            dn=dn,
            name=entry.name,
            display_name=entry.text("displayName") or entry.name,
            oid=entry.oid("msPKI-Cert-Template-OID"),
            schema_version=schema_version,
            revision=entry.integer("revision", default=0, minimum=0),
            minor_revision=entry.integer("msPKI-Template-Minor-Revision", default=0, minimum=0),
            validity=entry.interval("pKIExpirationPeriod"),
            overlap=entry.interval("pKIOverlapPeriod"),
            ekus=entry.oids("pKIExtendedKeyUsage"),
            application_policies=entry.oids("msPKI-Certificate-Application-Policy"),
            key_usage=entry.key_usage("pKIKeyUsage"),
            minimal_key_size=entry.integer("msPKI-Minimal-Key-Size", default=0, minimum=0),
            name_flags=entry.flags("msPKI-Certificate-Name-Flag", CertificateNameFlag),
            enrollment_flags=entry.flags("msPKI-Enrollment-Flag", EnrollmentFlag),
            private_key_flags=entry.flags("msPKI-Private-Key-Flag", PrivateKeyFlag),
            general_flags=entry.flags("flags", TemplateFlag),
            ra_signatures=entry.integer("msPKI-RA-Signature", default=0, minimum=0),
            ra_application_policies=entry.ra_application_policies(),
            critical_extensions=entry.oids("pKICriticalExtensions"),
            security_descriptor=entry.security_descriptor("nTSecurityDescriptor"),
        )


class _Entry:
    """Raw attribute values of one template entry, with strict per-attribute decoders."""

    def __init__(self, dn: str, raw_attributes: Mapping[str, Sequence[bytes]]) -> None:
        self.dn = dn
        self.values = merge_attribute_options(raw_attributes)
        self.name = dn  # until cn is decoded, errors name the entry by its DN
        name = self.text("cn")
        if not name:
            raise self.error("cn", "the template has no name")
        self.name = name

    def error(self, attribute: str, reason: str) -> TemplateError:
        return TemplateError(self.name, attribute, reason)

    def all(self, attribute: str) -> list[bytes]:
        values = self.values.get(attribute.lower(), [])
        if not all(isinstance(value, bytes | bytearray) for value in values):
            raise self.error(attribute, "values are not raw bytes")
        return [bytes(value) for value in values]

    def single(self, attribute: str) -> bytes | None:
        values = self.all(attribute)
        if len(values) > 1:
            raise self.error(attribute, f"{len(values)} values in a single-valued attribute")
        return values[0] if values else None

    def required(self, attribute: str) -> bytes:
        value = self.single(attribute)
        if value is None:
            raise self.error(attribute, "missing")
        return value

    def decode(self, attribute: str, value: bytes) -> str:
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise self.error(attribute, "not UTF-8") from None

    def text(self, attribute: str) -> str | None:
        value = self.single(attribute)
        return None if value is None else self.decode(attribute, value)

    def integer(self, attribute: str, *, default: int, minimum: int) -> int:
        value = self.single(attribute)
        if value is None:
            return default
        number = self._int32(attribute, value)
        if number < minimum:
            raise self.error(attribute, f"{number} is below {minimum}")
        return number

    def flags(self, attribute: str, flag_type: type[_Flag]) -> _Flag:
        """A flag word: AD returns it as a signed 32-bit integer (bit 31 reads negative)."""
        value = self.single(attribute)
        if value is None:
            return flag_type(0)
        try:
            return flag_type(from_ad_int32(self._int32(attribute, value)))
        except MalformedAttributeValue as exc:
            raise self.error(attribute, str(exc)) from None

    def _int32(self, attribute: str, value: bytes) -> int:
        # int() would also take " 7", "+7" and "1_000"; LDAP INTEGER is plain decimal.
        if not _INTEGER.fullmatch(value):
            raise self.error(attribute, f"{value[:40]!r} is not an integer")
        number = int(value)
        if not -(1 << 31) <= number < 1 << 32:
            raise self.error(attribute, f"{number} is not a 32-bit integer")
        return number

    def interval(self, attribute: str) -> timedelta:
        try:
            return filetime_to_interval(self.required(attribute))
        except MalformedAttributeValue as exc:
            raise self.error(attribute, str(exc)) from None

    def oid(self, attribute: str) -> str | None:
        value = self.text(attribute)
        if value is not None and not _OID.fullmatch(value):
            raise self.error(attribute, f"{value[:80]!r} is not a dotted OID")
        return value

    def oids(self, attribute: str) -> tuple[str, ...]:
        found: list[str] = []
        for raw in self.all(attribute):
            value = self.decode(attribute, raw)
            if not _OID.fullmatch(value):
                raise self.error(attribute, f"{value[:80]!r} is not a dotted OID")
            if value not in found:
                found.append(value)
        return tuple(found)

    def key_usage(self, attribute: str) -> frozenset[str]:
        value = self.single(attribute)
        if value is None:
            return frozenset()
        try:
            bits = key_usage_from_bytes(value)
        except MalformedAttributeValue as exc:
            raise self.error(attribute, str(exc)) from None
        return frozenset(name for bit, name in KEY_USAGE_NAMES.items() if bit in bits)

    def ra_application_policies(self) -> tuple[str, ...]:
        """OIDs, given one per value (schema 2) or in "Name`Type`Value`" triplets (3, 4)."""
        attribute = "msPKI-RA-Application-Policies"
        found: list[str] = []
        for raw in self.all(attribute):
            value = self.decode(attribute, raw)
            if "`" in value:
                candidates = self._ra_policies_from_triplets(attribute, value)
            else:
                candidates = [value]
            for oid in candidates:
                if not _OID.fullmatch(oid):
                    raise self.error(attribute, f"{oid[:80]!r} is not a dotted OID")
                if oid not in found:
                    found.append(oid)
        return tuple(found)

    def _ra_policies_from_triplets(self, attribute: str, value: str) -> list[str]:
        fields = value.split("`")
        if fields[-1] != "" or (len(fields) - 1) % 3:
            raise self.error(attribute, "not a sequence of Name`Type`Value` triplets")
        oids: list[str] = []
        for index in range(0, len(fields) - 1, 3):
            name, value_type, text = fields[index : index + 3]
            if value_type not in _TRIPLET_TYPES:
                raise self.error(attribute, f"triplet {name!r} has type {value_type!r}")
            if name == _RA_POLICY_PROPERTY:
                oids.extend(part.strip() for part in text.split(",") if part.strip())
        return oids

    def security_descriptor(self, attribute: str) -> bytes:
        # Without it nobody may enroll; a template whose DACL cannot be read is refused.
        value = self.required(attribute)
        try:
            parse_security_descriptor(value)
        except MalformedSecurityDescriptor as exc:
            raise self.error(attribute, str(exc)) from None
        return value
