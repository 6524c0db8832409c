"""What an AD-style enrollment is allowed to become: the template's rules applied to a
directory principal and its PKCS#10, with the ADCS abuse classes closed by design.

Identity comes from the directory, never from the request: the subject and SANs are built
from the principal's attributes as msPKI-Certificate-Name-Flag says, EKUs and key usage
come only from the template, and every certificate carries the principal's SID in the
security extension (1.3.6.1.4.1.311.25.2). A request that tries one of the known ADCS
escalations is refused with a :class:`EnrollmentRefused` that names the class (ESC1...),
so that the refusal is audited as an attack, not as a typo.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from asn1crypto import core as asn1
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID
from ldap3.core.exceptions import LDAPInvalidDnError
from ldap3.utils import dn as ldap_dn

from pkigate.adcs.flags import PrivateKeyFlag
from pkigate.adcs.principals import Principal
from pkigate.adcs.security import enroll_rights
from pkigate.adcs.templates import CertificateTemplate
from pkigate.core.names import upn_other_name
from pkigate.core.passthrough import ApiPassthrough, CustomExtension
from pkigate.core.readable import UNREADABLE

# Microsoft extensions (MS-WCCE 2.2.2.7).
TEMPLATE_NAME_OID = x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2")  # V1: BMPString name
TEMPLATE_INFO_OID = x509.ObjectIdentifier("1.3.6.1.4.1.311.21.7")  # V2+: OID and versions
APPLICATION_POLICIES_OID = x509.ObjectIdentifier("1.3.6.1.4.1.311.21.10")
SECURITY_EXTENSION_OID = x509.ObjectIdentifier("1.3.6.1.4.1.311.25.2")
SID_OTHER_NAME_OID = x509.ObjectIdentifier("1.3.6.1.4.1.311.25.2.1")
# The SAN URL form of the SID that KB5014754 added for strong mapping.
SID_URL_PREFIX = "tag:microsoft.com,2022-09-14:sid:"
# szOID_NTDS_OBJECTSID as a SAN otherName: another way Windows reads a SID from a name.
SID_OTHER_NAME_OID = x509.ObjectIdentifier("1.3.6.1.4.1.311.25.2.1")

# Domain Admins (512), Enterprise Admins (519), Administrators (S-1-5-32-544): the groups
# whose members may name any subject on a template that lets the enrollee supply it.
PRIVILEGED_RIDS = (512, 519)
BUILTIN_ADMINISTRATORS = "S-1-5-32-544"

_KEY_USAGE_NAMES = {
    "digital_signature": "digitalSignature",
    "content_commitment": "contentCommitment",
    "key_encipherment": "keyEncipherment",
    "data_encipherment": "dataEncipherment",
    "key_agreement": "keyAgreement",
    "key_cert_sign": "keyCertSign",
    "crl_sign": "cRLSign",
    "encipher_only": "encipherOnly",
    "decipher_only": "decipherOnly",
}


class EnrollmentRefused(Exception):
    """The request cannot be granted. ``code`` is stable for clients and the audit log;
    ``attack`` names the ADCS escalation class a refusal closes, if any."""

    def __init__(
        self, code: str, message: str, attack: str | None = None, *, audited: bool = False
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.attack = attack
        self.audited = audited  # already in the audit log (the connector audits the rest)


@dataclass(frozen=True)
class RequestContext:
    """What came with the PKCS#10 besides the key: the template the transport named, the
    name/value attributes of the request (WSTEP AdditionalContext, JSON ``attributes``),
    whether the request was signed by someone else (enroll on behalf of)."""

    template_name: str | None = None
    attributes: Sequence[tuple[str, str]] = ()
    on_behalf_of: bool = False
    ra_signatures_verified: int = 0


@dataclass(frozen=True)
class Decision:
    template: CertificateTemplate
    passthrough: ApiPassthrough
    pending: bool
    evidence: Mapping[str, str] = field(default_factory=dict)


def template_named_in_csr(csr: x509.CertificateSigningRequest) -> tuple[str | None, str | None]:
    """(template name from 1.3.6.1.4.1.311.20.2, template OID from 1.3.6.1.4.1.311.21.7)."""
    name: str | None = None
    oid: str | None = None
    for extension in _requested_extensions(csr):
        if extension.oid == TEMPLATE_NAME_OID:
            name = _template_name(_value_bytes(extension))
        elif extension.oid == TEMPLATE_INFO_OID:
            raw = _value_bytes(extension)
            try:
                oid = str(_TemplateInfo.load(raw, strict=True)["template_id"].dotted)
            except (ValueError, TypeError, KeyError, IndexError, RecursionError):
                raise EnrollmentRefused(
                    "badRequest", "the certificate template information extension cannot be read"
                ) from None
    return name, oid


# The string types a template name extension may hold (Windows writes a BMPString).
_NAME_STRINGS: dict[int, type[asn1.AbstractString]] = {
    0x1E: asn1.BMPString,
    0x0C: asn1.UTF8String,
    0x13: asn1.PrintableString,
    0x16: asn1.IA5String,
}


def _template_name(raw: bytes) -> str:
    """1.3.6.1.4.1.311.20.2: one string, nothing else (no structure to walk)."""
    kind = _NAME_STRINGS.get(raw[0]) if raw else None
    try:
        if kind is None:
            raise ValueError("not a string")
        return str(kind.load(raw, strict=True).native)
    except (ValueError, TypeError):
        raise EnrollmentRefused(
            "badRequest", "the certificate template name extension is not a string"
        ) from None


def _requested_extensions(
    csr: x509.CertificateSigningRequest,
) -> list[x509.Extension[x509.ExtensionType]]:
    try:
        return list(csr.extensions)
    except UNREADABLE as exc:
        raise EnrollmentRefused(
            "badRequest", f"the request's extensions cannot be read: {exc}"
        ) from None


def _value_bytes(extension: x509.Extension[x509.ExtensionType]) -> bytes:
    value = extension.value
    if isinstance(value, x509.UnrecognizedExtension):
        return value.value
    return value.public_bytes()


def choose_template(
    csr: x509.CertificateSigningRequest,
    context: RequestContext,
    templates: Mapping[str, CertificateTemplate],
    published: Iterable[str],
) -> CertificateTemplate:
    """The template this request is for: named by the transport, or by the CSR's template
    extensions; both must agree, and it must be published on this CA."""
    csr_name, csr_oid = template_named_in_csr(csr)
    by_lower = {name.lower(): t for name, t in templates.items()}
    candidates: list[CertificateTemplate] = []
    for wanted in (context.template_name, csr_name):
        if wanted:
            found = by_lower.get(wanted.lower())
            if found is None:
                raise EnrollmentRefused("unknownTemplate", f"no certificate template {wanted!r}")
            candidates.append(found)
    if csr_oid:
        found_oid = next((t for t in templates.values() if t.oid == csr_oid), None)
        if found_oid is None:
            raise EnrollmentRefused("unknownTemplate", f"no certificate template has OID {csr_oid}")
        candidates.append(found_oid)
    if not candidates:
        raise EnrollmentRefused(
            "unknownTemplate",
            "name the certificate template (the request's template extension, or the "
            "CertificateTemplate attribute)",
        )
    if len({c.name for c in candidates}) > 1:
        raise EnrollmentRefused(
            "templateMismatch",
            f"the request names two templates: {', '.join(sorted({c.name for c in candidates}))}",
        )
    template = candidates[0]
    if template.name.lower() not in {p.lower() for p in published}:
        raise EnrollmentRefused(
            "templateNotPublished",
            f"template {template.name!r} is not published on this CA (pKIEnrollmentService "
            "certificateTemplates)",
        )
    return template


def is_privileged(principal: Principal) -> bool:
    domain = principal.sid.rsplit("-", 1)[0]
    privileged = {f"{domain}-{rid}" for rid in PRIVILEGED_RIDS} | {BUILTIN_ADMINISTRATORS}
    return bool(principal.token_sids & privileged)


def decide(
    template: CertificateTemplate,
    principal: Principal,
    csr: x509.CertificateSigningRequest,
    context: RequestContext,
    *,
    autoenroll: bool = False,
) -> Decision:
    """Check rights and the abuse classes, then build the certificate's contents."""
    if principal.disabled:
        raise EnrollmentRefused(
            "accountDisabled", f"account {principal.sam_account_name} is disabled"
        )
    rights = enroll_rights(template.security_descriptor, principal.token_sids)
    if not rights.enroll or (autoenroll and not rights.autoenroll):
        right = "AutoEnroll" if autoenroll and rights.enroll else "Enroll"
        raise EnrollmentRefused(
            "accessDenied",
            f"{principal.sam_account_name} has no {right} permission on template {template.name}",
        )
    if autoenroll and not template.autoenrollment:
        raise EnrollmentRefused(
            "autoenrollmentDisabled",
            f"template {template.name} is not enabled for autoenrollment (msPKI-Enrollment-Flag "
            "has no CT_FLAG_AUTO_ENROLLMENT); enroll without autoenroll",
        )
    _close_abuse_classes(template, principal, csr, context)
    if template.private_key_flags & PrivateKeyFlag.REQUIRE_PRIVATE_KEY_ARCHIVAL:
        # ADCS would ask for the private key to archive it (key recovery agents); pkigate
        # never receives private keys, so such a template cannot be honoured.
        raise EnrollmentRefused(
            "keyArchivalRequired",
            f"template {template.name} requires private key archival, which this CA does not do",
        )
    _check_key(template, csr)
    passthrough = ApiPassthrough(
        subject=_subject(template, principal, csr),
        sans=_sans(template, principal, csr),
        key_usage=frozenset(_KEY_USAGE_NAMES[k] for k in template.key_usage) or None,
        extended_key_usage=tuple(x509.ObjectIdentifier(o) for o in template.issued_ekus),
        custom_extensions=(
            CustomExtension(SECURITY_EXTENSION_OID, security_extension(principal.sid)),
            CustomExtension(TEMPLATE_INFO_OID, template_information(template)),
        ),
    )
    return Decision(
        template,
        passthrough,
        pending=template.pend_all_requests,
        evidence={
            "principal": principal.sam_account_name,
            "sid": principal.sid,
            "kind": principal.kind,
            "template": template.name,
            "groups": ",".join(sorted(principal.group_names)),
        },
    )


def _close_abuse_classes(
    template: CertificateTemplate,
    principal: Principal,
    csr: x509.CertificateSigningRequest,
    context: RequestContext,
) -> None:
    # ESC2: a certificate good for anything (Any Purpose, or no EKU at all) is a
    # certificate good for client authentication and for enrolling on behalf of others.
    if template.any_purpose_or_no_eku:
        raise EnrollmentRefused(
            "dangerousTemplate",
            f"template {template.name} has an Any Purpose or empty EKU; pkigate does not issue "
            "from such templates",
            attack="ESC2",
        )
    # ESC1: the enrollee names the subject of a certificate it can authenticate with.
    if (
        template.enrollee_supplies_subject
        and template.client_authentication
        and not template.pend_all_requests
        and template.ra_signatures == 0
        and not is_privileged(principal)
    ):
        raise EnrollmentRefused(
            "dangerousTemplate",
            f"template {template.name} lets the enrollee supply the subject of a client "
            "authentication certificate without approval; refused for unprivileged enrollees",
            attack="ESC1",
        )
    # ESC3: an enrollment agent asking for someone else.
    if context.on_behalf_of and (
        template.ra_signatures == 0 or context.ra_signatures_verified < template.ra_signatures
    ):
        raise EnrollmentRefused(
            "onBehalfOfRefused",
            f"requests on behalf of another principal need template {template.name} to "
            "require enrollment agent signatures, and those signatures to verify",
            attack="ESC3",
        )
    # msPKI-RA-Signature: the template wants N enrollment agents to countersign every
    # request. A plain PKCS#10 has none, so it is refused: otherwise the setting that
    # exempts a template from the ESC1 rule above would be a way around it.
    if context.ra_signatures_verified < template.ra_signatures:
        esc1_shaped = template.enrollee_supplies_subject and template.client_authentication
        raise EnrollmentRefused(
            "raSignatureRequired",
            f"template {template.name} requires {template.ra_signatures} enrollment agent "
            f"signature(s) on each request; this request has "
            f"{context.ra_signatures_verified} that verify",
            attack="ESC1" if esc1_shaped else None,
        )
    # ESC6: names smuggled in as request attributes (EDITF_ATTRIBUTESUBJECTALTNAME2).
    for name, value in context.attributes:
        if name.strip().lower() in ("san", "subjectaltname", "subjectaltname2", "sid", "upn"):
            raise EnrollmentRefused(
                "attributeRefused",
                f"request attribute {name!r} ({value[:60]!r}) cannot set names: they come "
                "from the directory",
                attack="ESC6",
            )
    for extension in _requested_extensions(csr):
        # ESC15: application policies in the request override the template's EKUs in
        # schema version 1 templates on Windows.
        if extension.oid == APPLICATION_POLICIES_OID:
            raise EnrollmentRefused(
                "extensionRefused",
                "the request carries application policies; the template alone sets the "
                "certificate's purposes",
                attack="ESC15",
            )
        # A SID of the requester's choosing (ESC9/ESC16 abuse the absence of the real one).
        if extension.oid == SECURITY_EXTENSION_OID:
            raise EnrollmentRefused(
                "extensionRefused",
                "the request carries a security (SID) extension; the CA writes it from the "
                "directory",
                attack="ESC9",
            )


def _check_key(template: CertificateTemplate, csr: x509.CertificateSigningRequest) -> None:
    key = csr.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        size = key.key_size
    elif isinstance(key, ec.EllipticCurvePublicKey):
        size = key.curve.key_size
    elif isinstance(key, dsa.DSAPublicKey):
        raise EnrollmentRefused("badKey", "DSA keys are not accepted")
    elif isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        raise EnrollmentRefused("badKey", "EdDSA keys are not accepted for this template")
    else:
        raise EnrollmentRefused("badKey", "unsupported key type")
    if size < template.minimal_key_size:
        raise EnrollmentRefused(
            "keyTooSmall",
            f"the request's key is {size} bits; template {template.name} requires at least "
            f"{template.minimal_key_size}",
        )


def _subject(
    template: CertificateTemplate, principal: Principal, csr: x509.CertificateSigningRequest
) -> x509.Name:
    if template.enrollee_supplies_subject:
        return csr.subject
    if template.subject_requires_directory_path:
        return directory_path_name(principal.dn)
    attributes: list[x509.NameAttribute[str]] = []
    if template.subject_dns_as_cn:
        attributes.append(
            x509.NameAttribute(
                NameOID.COMMON_NAME, _required(principal.dns_host_name, "dNSHostName", principal)
            )
        )
    elif template.subject_requires_common_name:
        attributes.append(
            x509.NameAttribute(
                NameOID.COMMON_NAME, principal.common_name or principal.sam_account_name
            )
        )
    if template.subject_requires_email:
        attributes.append(
            x509.NameAttribute(NameOID.EMAIL_ADDRESS, _required(principal.mail, "mail", principal))
        )
    if not attributes:
        attributes.append(
            x509.NameAttribute(
                NameOID.COMMON_NAME,
                principal.dns_host_name
                if principal.kind == "computer" and principal.dns_host_name
                else principal.common_name or principal.sam_account_name,
            )
        )
    return x509.Name(attributes)


_DN_ATTRIBUTES = {
    "cn": NameOID.COMMON_NAME,
    "ou": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "o": NameOID.ORGANIZATION_NAME,
    "dc": NameOID.DOMAIN_COMPONENT,
    "c": NameOID.COUNTRY_NAME,
    "l": NameOID.LOCALITY_NAME,
    "st": NameOID.STATE_OR_PROVINCE_NAME,
}


def directory_path_name(dn: str) -> x509.Name:
    """The account's distinguished name as a certificate subject (SUBJECT_REQUIRE_DIRECTORY_
    PATH): RDNs in X.500 order, most significant (DC) first."""
    try:
        parts = ldap_dn.parse_dn(dn)
    except LDAPInvalidDnError:
        raise EnrollmentRefused(
            "nameUnavailable", f"the account's DN {dn!r} cannot be read"
        ) from None
    attributes = []
    for attribute, value, _separator in reversed(parts):
        oid = _DN_ATTRIBUTES.get(attribute.lower())
        if oid is None:
            raise EnrollmentRefused(
                "nameUnavailable",
                f"the account's DN has an attribute {attribute!r} a subject cannot carry",
            )
        attributes.append(x509.RelativeDistinguishedName([x509.NameAttribute(oid, value)]))
    return x509.Name(attributes)


def _sans(
    template: CertificateTemplate, principal: Principal, csr: x509.CertificateSigningRequest
) -> tuple[x509.GeneralName, ...]:
    names: list[x509.GeneralName] = []
    # Only ENROLLEE_SUPPLIES_SUBJECT (which the ESC1 rule guards) lets the CSR name
    # anything; with ENROLLEE_SUPPLIES_SUBJECT_ALT_NAME alone the names still come from
    # the directory, so that flag cannot be an unguarded way to name someone else.
    if template.enrollee_supplies_subject:
        try:
            requested = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            requested = None
        for name in requested.value if requested else ():
            if _names_a_sid(name):
                # Windows maps a certificate to the account a SID in its names names
                # (KB5014754); the CA writes the requester's SID, never the request.
                raise EnrollmentRefused(
                    "nameRefused",
                    "the request's alternative names carry a security identifier; the "
                    "CA writes the SID from the directory",
                    attack="ESC9",
                )
            names.append(name)
    if template.requires_dns:
        names.append(x509.DNSName(_required(principal.dns_host_name, "dNSHostName", principal)))
    if template.requires_upn:
        names.append(upn_other_name(_required(principal.upn, "userPrincipalName", principal)))
    if template.requires_email:
        names.append(x509.RFC822Name(_required(principal.mail, "mail", principal)))
    # The strong-mapping SID URL (KB5014754), beside the security extension.
    names.append(x509.UniformResourceIdentifier(SID_URL_PREFIX + principal.sid))
    return tuple(dict.fromkeys(names))


def _names_a_sid(name: x509.GeneralName) -> bool:
    if isinstance(name, x509.UniformResourceIdentifier):
        return name.value.lower().startswith(SID_URL_PREFIX)
    return isinstance(name, x509.OtherName) and name.type_id == SID_OTHER_NAME_OID


def _required(value: str | None, attribute: str, principal: Principal) -> str:
    if not value:
        raise EnrollmentRefused(
            "nameUnavailable",
            f"the template needs the account's {attribute}, and {principal.sam_account_name} "
            "has none in the directory",
        )
    return value


def security_extension(sid: str) -> bytes:
    """szOID_NTDS_CA_SECURITY_EXT: a SEQUENCE holding one otherName
    (1.3.6.1.4.1.311.25.2.1, [0] OCTET STRING with the SID as text)."""
    inner = asn1.OctetString(sid.encode("ascii")).dump()
    name = x509.OtherName(SID_OTHER_NAME_OID, inner)
    return x509.SubjectAlternativeName([name]).public_bytes()


def sid_from_certificate(certificate: x509.Certificate) -> str | None:
    """The SID in the certificate's security extension, or None."""
    try:
        extension = certificate.extensions.get_extension_for_oid(SECURITY_EXTENSION_OID)
    except x509.ExtensionNotFound:
        return None
    return sid_from_extension_value(_value_bytes(extension))


def sid_from_extension_value(raw: bytes) -> str | None:
    """SEQUENCE { [0] { OID 1.3.6.1.4.1.311.25.2.1, [0] { OCTET STRING sid } } } -> sid."""
    try:
        tag, names, _ = _tlv(raw, 0)
        if tag != 0x30:
            return None
        offset = 0
        while offset < len(names):
            tag, other, offset = _tlv(names, offset)
            if tag != 0xA0:
                continue
            oid_tag, oid_der, after = _tlv(other, 0)
            explicit_tag, explicit, _ = _tlv(other, after)
            if oid_tag != 0x06 or explicit_tag != 0xA0:
                continue
            oid = asn1.ObjectIdentifier.load(bytes([0x06, len(oid_der)]) + oid_der).dotted
            value_tag, value, _ = _tlv(explicit, 0)
            if oid == SID_OTHER_NAME_OID.dotted_string and value_tag == 0x04:
                return value.decode("ascii")
    except (ValueError, IndexError, UnicodeDecodeError):
        return None
    return None


def _tlv(data: bytes, offset: int) -> tuple[int, bytes, int]:
    """One DER tag-length-value at ``offset``: (tag, value, offset after it)."""
    tag = data[offset]
    length = data[offset + 1]
    start = offset + 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 3:
            raise ValueError("unsupported DER length")
        length = int.from_bytes(data[start : start + count], "big")
        start += count
    end = start + length
    if end > len(data):
        raise ValueError("truncated DER")
    return tag, data[start:end], end


class _TemplateInfo(asn1.Sequence):  # type: ignore[misc]
    # [MS-WCCE] 2.2.2.7.7.2: both versions are optional.
    _fields = [
        ("template_id", asn1.ObjectIdentifier),
        ("major_version", asn1.Integer, {"optional": True}),
        ("minor_version", asn1.Integer, {"optional": True}),
    ]


def template_information(template: CertificateTemplate) -> bytes:
    """szOID_CERTIFICATE_TEMPLATE: SEQUENCE { templateID OID, majorVersion, minorVersion }."""
    oid = template.oid or "1.3.6.1.4.1.311.21.8.0"
    return bytes(
        _TemplateInfo(
            {
                "template_id": oid,
                "major_version": template.revision,
                "minor_version": template.minor_revision,
            }
        ).dump()
    )
