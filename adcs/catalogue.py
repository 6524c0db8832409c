"""pkigate's own certificate templates and their pKICertificateTemplate attributes.

One definition serves two writers: the development directory's seed (:mod:`pkigate.adcs.seed`)
and `pkigate adcs publish` (:mod:`pkigate.adcs.publish`), which registers these templates in
an Active Directory forest as an AD CS installation registers its default ones. Who may
enroll is the caller's choice (the ACEs): the seed names its example groups, publish the
domain's well-known ones.

The definitions are safe by construction against the abuses certipy's ``find -vulnerable``
looks for: the directory, not the request, names the subject of every template that an
ordinary account may enroll for (ESC1, ESC15), no template is good for any purpose or as an
enrollment agent (ESC2, ESC3), the requester's SID extension is always issued (ESC9), no
issuance policy is linked to a group (ESC13), and only Domain Admins may write a template
(ESC4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from pkigate.adcs.encoding import interval_to_filetime, key_usage_to_bytes, to_ad_int32
from pkigate.adcs.flags import (
    CertificateNameFlag,
    EnrollmentFlag,
    KeyUsage,
    PrivateKeyFlag,
    TemplateFlag,
)
from pkigate.adcs.security import (
    AUTHENTICATED_USERS,
    FULL_CONTROL,
    GENERIC_READ_DS,
    Ace,
    allow,
    build_security_descriptor,
)

OID_SERVER_AUTH = "1.3.6.1.5.5.7.3.1"
OID_CLIENT_AUTH = "1.3.6.1.5.5.7.3.2"
OID_EMAIL_PROTECTION = "1.3.6.1.5.5.7.3.4"
OID_EFS = "1.3.6.1.4.1.311.10.3.4"
OID_KEY_USAGE_EXTENSION = "2.5.29.15"
# Template OIDs live under Microsoft's enterprise OID arc ([MS-CRTD] 2.21): 1.3.6.1.4.1.311.21.8
# followed by numbers random per forest, then per template.
TEMPLATE_OID_ARC = "1.3.6.1.4.1.311.21.8"

TEMPLATE_VALIDITY = timedelta(days=365)
TEMPLATE_RENEWAL_OVERLAP = timedelta(weeks=6)
# revision and msPKI-Template-Minor-Revision: the version issued certificates name in their
# szOID_CERTIFICATE_TEMPLATE extension ([MS-WCCE] 2.2.2.7.7.2).
TEMPLATE_REVISION = 100
TEMPLATE_MINOR_REVISION = 1
# Version 2 templates: what a Windows Server 2003 Enterprise CA issues from, and the lowest
# version with msPKI-Certificate-Application-Policy. Version 1 with an enrollee-supplied
# subject is ESC15 (CVE-2024-49019); none of these is version 1.
TEMPLATE_SCHEMA_VERSION = 2
MINIMAL_KEY_SIZE = 2048
AT_KEYEXCHANGE = 1  # pKIDefaultKeySpec: the key both signs and encrypts

SCHANNEL_PROVIDER = "1,Microsoft RSA SChannel Cryptographic Provider"
ENHANCED_PROVIDER = "1,Microsoft Enhanced Cryptographic Provider v1.0"
SIGNING_AND_ENCRYPTION = KeyUsage.DIGITAL_SIGNATURE | KeyUsage.KEY_ENCIPHERMENT
# The subject and SANs of a user certificate all come from the user's directory entry.
USER_NAME_FLAGS = (
    CertificateNameFlag.SUBJECT_ALT_REQUIRE_UPN
    | CertificateNameFlag.SUBJECT_ALT_REQUIRE_EMAIL
    | CertificateNameFlag.SUBJECT_REQUIRE_EMAIL
    | CertificateNameFlag.SUBJECT_REQUIRE_DIRECTORY_PATH
)
EDITED_TEMPLATE = TemplateFlag.ADD_TEMPLATE_NAME | TemplateFlag.IS_MODIFIED

AttributeValue = str | bytes | int


@dataclass(frozen=True)
class TemplateDefinition:
    """What a pKICertificateTemplate entry says, before it is encoded for the directory."""

    name: str
    """cn: the name requests and enrollment services use."""
    display_name: str
    extended_key_usages: tuple[str, ...]
    """Written to pKIExtendedKeyUsage and msPKI-Certificate-Application-Policy alike."""
    key_usage: KeyUsage
    name_flags: CertificateNameFlag
    enrollment_flags: EnrollmentFlag
    private_key_flags: PrivateKeyFlag
    general_flags: TemplateFlag
    provider: str
    """pKIDefaultCSPs: "<priority>,<CSP name>"."""
    aces: tuple[Ace, ...]
    """The DACL of nTSecurityDescriptor, in order."""

    def attributes(self, oid: str, owner_sid: str) -> dict[str, tuple[AttributeValue, ...]]:
        """The entry's attributes as AD encodes them ([MS-CRTD] 2), by LDAP name.

        Flag words are signed 32-bit integers, periods 8-byte FILETIME intervals, pKIKeyUsage
        the KeyUsage bit string's bytes, and nTSecurityDescriptor is self-relative with
        ``owner_sid`` as owner and primary group. objectClass and objectGUID are the
        caller's: AD assigns objectGUID itself.
        """
        ekus = self.extended_key_usages
        return {
            "cn": (self.name,),
            "displayName": (self.display_name,),
            "flags": (to_ad_int32(int(self.general_flags)),),
            "revision": (TEMPLATE_REVISION,),
            "msPKI-Template-Schema-Version": (TEMPLATE_SCHEMA_VERSION,),
            "msPKI-Template-Minor-Revision": (TEMPLATE_MINOR_REVISION,),
            "msPKI-Cert-Template-OID": (oid,),
            "pKIDefaultKeySpec": (AT_KEYEXCHANGE,),
            "pKIMaxIssuingDepth": (0,),
            "pKIDefaultCSPs": (self.provider,),
            "pKIExpirationPeriod": (interval_to_filetime(TEMPLATE_VALIDITY),),
            "pKIOverlapPeriod": (interval_to_filetime(TEMPLATE_RENEWAL_OVERLAP),),
            "pKIKeyUsage": (key_usage_to_bytes(self.key_usage),),
            "pKICriticalExtensions": (OID_KEY_USAGE_EXTENSION,),
            "pKIExtendedKeyUsage": ekus,
            "msPKI-Certificate-Application-Policy": ekus,
            "msPKI-Certificate-Name-Flag": (to_ad_int32(int(self.name_flags)),),
            "msPKI-Enrollment-Flag": (to_ad_int32(int(self.enrollment_flags)),),
            "msPKI-Private-Key-Flag": (to_ad_int32(int(self.private_key_flags)),),
            "msPKI-Minimal-Key-Size": (MINIMAL_KEY_SIZE,),
            "msPKI-RA-Signature": (0,),
            "nTSecurityDescriptor": (
                build_security_descriptor(owner_sid, self.aces, group_sid=owner_sid),
            ),
        }


def readers(administrators_sid: str) -> tuple[Ace, ...]:
    """Read for every authenticated account, full control for ``administrators_sid`` only:
    nobody else may rewrite the template (ESC4)."""
    return (
        allow(AUTHENTICATED_USERS, mask=GENERIC_READ_DS),
        allow(administrators_sid, mask=FULL_CONTROL),
    )


def machine_template(aces: Sequence[Ace]) -> TemplateDefinition:
    """Computers: CN and DNS SAN from the computer's dNSHostName, autoenrollment."""
    return TemplateDefinition(
        name="Machine",
        display_name="Computer",
        extended_key_usages=(OID_CLIENT_AUTH, OID_SERVER_AUTH),
        key_usage=SIGNING_AND_ENCRYPTION,
        name_flags=CertificateNameFlag.SUBJECT_ALT_REQUIRE_DNS
        | CertificateNameFlag.SUBJECT_REQUIRE_DNS_AS_CN,
        enrollment_flags=EnrollmentFlag.AUTO_ENROLLMENT,
        private_key_flags=PrivateKeyFlag(0),
        general_flags=TemplateFlag.MACHINE_TYPE | TemplateFlag.AUTO_ENROLLMENT | EDITED_TEMPLATE,
        provider=SCHANNEL_PROVIDER,
        aces=tuple(aces),
    )


def user_template(aces: Sequence[Ace]) -> TemplateDefinition:
    """Users: subject and SANs (UPN, mail) from the user's entry, autoenrollment."""
    return TemplateDefinition(
        name="User",
        display_name="User",
        extended_key_usages=(OID_CLIENT_AUTH, OID_EMAIL_PROTECTION, OID_EFS),
        key_usage=SIGNING_AND_ENCRYPTION,
        name_flags=USER_NAME_FLAGS,
        enrollment_flags=EnrollmentFlag.INCLUDE_SYMMETRIC_ALGORITHMS
        | EnrollmentFlag.PUBLISH_TO_DS
        | EnrollmentFlag.AUTO_ENROLLMENT,
        private_key_flags=PrivateKeyFlag.EXPORTABLE_KEY,
        general_flags=EDITED_TEMPLATE | TemplateFlag.AUTO_ENROLLMENT,
        provider=ENHANCED_PROVIDER,
        aces=tuple(aces),
    )


def web_server_template(aces: Sequence[Ace]) -> TemplateDefinition:
    """Servers: the enrollee names the subject, so only trusted groups may enroll; server
    authentication only, never client authentication (ESC1)."""
    return TemplateDefinition(
        name="WebServer",
        display_name="Web Server",
        extended_key_usages=(OID_SERVER_AUTH,),
        key_usage=SIGNING_AND_ENCRYPTION,
        name_flags=CertificateNameFlag.ENROLLEE_SUPPLIES_SUBJECT,
        enrollment_flags=EnrollmentFlag(0),
        private_key_flags=PrivateKeyFlag(0),
        general_flags=EDITED_TEMPLATE,
        provider=SCHANNEL_PROVIDER,
        aces=tuple(aces),
    )


def esc1_vulnerable_template(aces: Sequence[Ace]) -> TemplateDefinition:
    """ESC1, deliberately: client authentication with the subject the enrollee names. Not
    pkigate's and never published by it: the development directory seeds it and tests add it
    to Samba, so that the connector's refusal (and certipy's finding) can be seen."""
    return TemplateDefinition(
        name="ESC1Vulnerable",
        display_name="ESC1 vulnerable (tests only)",
        extended_key_usages=(OID_CLIENT_AUTH,),
        key_usage=SIGNING_AND_ENCRYPTION,
        name_flags=CertificateNameFlag.ENROLLEE_SUPPLIES_SUBJECT,
        enrollment_flags=EnrollmentFlag(0),
        private_key_flags=PrivateKeyFlag.EXPORTABLE_KEY,
        general_flags=EDITED_TEMPLATE,
        provider=ENHANCED_PROVIDER,
        aces=tuple(aces),
    )
