"""Flag words of AD certificate templates ([MS-CRTD]) and accounts, as AD defines them.

AD returns these attributes as signed 32-bit integers: a word with bit 31 set (for example
CT_FLAG_SUBJECT_REQUIRE_DIRECTORY_PATH) reads back negative. Use
:func:`pkigate.adcs.encoding.from_ad_int32` before building a flag from an LDAP value, and
:func:`pkigate.adcs.encoding.to_ad_int32` before writing one.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag


class CertificateNameFlag(IntFlag):
    """msPKI-Certificate-Name-Flag: where the subject and SAN come from ([MS-CRTD] 2.28)."""

    ENROLLEE_SUPPLIES_SUBJECT = 0x00000001
    OLD_CERT_SUPPLIES_SUBJECT_AND_ALT_NAME = 0x00000008
    ENROLLEE_SUPPLIES_SUBJECT_ALT_NAME = 0x00010000
    SUBJECT_ALT_REQUIRE_DOMAIN_DNS = 0x00400000
    SUBJECT_ALT_REQUIRE_SPN = 0x00800000
    SUBJECT_ALT_REQUIRE_DIRECTORY_GUID = 0x01000000
    SUBJECT_ALT_REQUIRE_UPN = 0x02000000
    SUBJECT_ALT_REQUIRE_EMAIL = 0x04000000
    SUBJECT_ALT_REQUIRE_DNS = 0x08000000
    SUBJECT_REQUIRE_DNS_AS_CN = 0x10000000
    SUBJECT_REQUIRE_EMAIL = 0x20000000
    SUBJECT_REQUIRE_COMMON_NAME = 0x40000000
    SUBJECT_REQUIRE_DIRECTORY_PATH = 0x80000000


class EnrollmentFlag(IntFlag):
    """msPKI-Enrollment-Flag ([MS-CRTD] 2.26)."""

    INCLUDE_SYMMETRIC_ALGORITHMS = 0x00000001
    PEND_ALL_REQUESTS = 0x00000002
    """The CA puts every request on hold for a certificate manager's approval."""
    PUBLISH_TO_KRA_CONTAINER = 0x00000004
    PUBLISH_TO_DS = 0x00000008
    AUTO_ENROLLMENT_CHECK_USER_DS_CERTIFICATE = 0x00000010
    AUTO_ENROLLMENT = 0x00000020
    PREVIOUS_APPROVAL_VALIDATE_REENROLLMENT = 0x00000040
    USER_INTERACTION_REQUIRED = 0x00000100
    REMOVE_INVALID_CERTIFICATE_FROM_PERSONAL_STORE = 0x00000400
    ALLOW_ENROLL_ON_BEHALF_OF = 0x00000800
    ADD_OCSP_NOCHECK = 0x00001000
    ENABLE_KEY_REUSE_ON_NT_TOKEN_KEYSET_STORAGE_FULL = 0x00002000
    NOREVOCATIONINFOINISSUEDCERTS = 0x00004000
    INCLUDE_BASIC_CONSTRAINTS_FOR_EE_CERTS = 0x00008000
    ALLOW_PREVIOUS_APPROVAL_KEYBASEDRENEWAL_VALIDATE_REENROLLMENT = 0x00010000
    ISSUANCE_POLICIES_FROM_REQUEST = 0x00020000
    SKIP_AUTO_RENEWAL = 0x00040000
    NO_SECURITY_EXTENSION = 0x00080000
    """Issued certificates carry no szOID_NTDS_CA_SECURITY_EXT (the requester's SID)."""


class PrivateKeyFlag(IntFlag):
    """msPKI-Private-Key-Flag, low bits ([MS-CRTD] 2.27)."""

    REQUIRE_PRIVATE_KEY_ARCHIVAL = 0x00000001
    EXPORTABLE_KEY = 0x00000010
    STRONG_KEY_PROTECTION_REQUIRED = 0x00000020
    REQUIRE_ALTERNATE_SIGNATURE_ALGORITHM = 0x00000040


class TemplateFlag(IntFlag):
    """The template's general-enrollment `flags` attribute ([MS-CRTD] 2.4)."""

    ADD_EMAIL = 0x00000002
    PUBLISH_TO_DS = 0x00000008
    EXPORTABLE_KEY = 0x00000010
    AUTO_ENROLLMENT = 0x00000020
    MACHINE_TYPE = 0x00000040
    """The template is for machines: requesters are computer accounts."""
    IS_CA = 0x00000080
    ADD_TEMPLATE_NAME = 0x00000200
    IS_CROSS_CA = 0x00000800
    DONOTPERSISTINDB = 0x00001000
    IS_DEFAULT = 0x00010000
    IS_MODIFIED = 0x00020000


class UserAccountControl(IntFlag):
    """userAccountControl bits that matter to enrollment ([MS-ADTS] 2.2.16)."""

    SCRIPT = 0x00000001
    ACCOUNTDISABLE = 0x00000002
    """A disabled account may not enroll; slapd does not enforce this, the connector must."""
    LOCKOUT = 0x00000010
    PASSWD_NOTREQD = 0x00000020
    NORMAL_ACCOUNT = 0x00000200
    WORKSTATION_TRUST_ACCOUNT = 0x00001000
    SERVER_TRUST_ACCOUNT = 0x00002000
    DONT_EXPIRE_PASSWORD = 0x00010000
    SMARTCARD_REQUIRED = 0x00040000


class GroupType(IntFlag):
    """groupType bits ([MS-ADTS] 2.2.12)."""

    BUILTIN_LOCAL_GROUP = 0x00000001
    ACCOUNT_GROUP = 0x00000002
    """Global scope."""
    RESOURCE_GROUP = 0x00000004
    """Domain-local scope."""
    UNIVERSAL_GROUP = 0x00000008
    SECURITY_ENABLED = 0x80000000


class SamAccountType(IntEnum):
    """sAMAccountType values ([MS-ADTS] 2.2.14): what kind of account an entry is."""

    GROUP_OBJECT = 0x10000000
    """A global or universal security group."""
    USER_OBJECT = 0x30000000
    MACHINE_ACCOUNT = 0x30000001


class KeyUsage(IntFlag):
    """pKIKeyUsage bits: the X.509 KeyUsage BIT STRING, first byte then second byte."""

    DIGITAL_SIGNATURE = 0x0080
    NON_REPUDIATION = 0x0040
    KEY_ENCIPHERMENT = 0x0020
    DATA_ENCIPHERMENT = 0x0010
    KEY_AGREEMENT = 0x0008
    KEY_CERT_SIGN = 0x0004
    CRL_SIGN = 0x0002
    ENCIPHER_ONLY = 0x0001
    DECIPHER_ONLY = 0x8000


# Well-known relative identifiers of domain groups ([MS-DTYP] 2.4.2.4).
RID_DOMAIN_ADMINS = 512
RID_DOMAIN_USERS = 513
RID_DOMAIN_COMPUTERS = 515
RID_ADMINISTRATOR = 500
