"""Wire codec for AD-style enrollment: [MS-XCEP] GetPolicies and [MS-WSTEP] over SOAP 1.2.

Pure functions from bytes to typed values and back: no HTTP, no directory, no issuing. The
routes decide who may do what; this module only makes sure that what they read is what the
client sent, and that what they answer is what Windows' CEP/CES clients and certmonger's
cepces parse.

Sources for the names and URIs below: [MS-XCEP] v18 (2.2.1 namespaces, 3.1.4.1 WSDL actions,
6.2 schema), [MS-WSTEP] v15 (2.2.1 namespaces, 3.1.4.1.2.7/8 RequestType and TokenType,
3.1.4.1.3.7 CertificateEnrollmentWSDetailType, 4.1 examples), WS-Security 1.0 UsernameToken
Profile, WS-Addressing 1.0 SOAP binding, and what cepces sends and parses.

Transport notes for the routes: answer with ``Content-Type: application/soap+xml;
charset=utf-8``; send faults with HTTP status 500 (SOAP 1.2 HTTP binding; cepces only reads
a fault out of a 500 response).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any, Final, Literal, NamedTuple, TypeVar, cast

from asn1crypto import core as asn1_core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from lxml import etree

from pkigate.adcs.flags import KeyUsage

_T = TypeVar("_T")

# --- Limits -------------------------------------------------------------------------------

MAX_SOAP_BYTES: Final = 256 * 1024
"""Largest request body accepted. A PKCS#10 with a 4096-bit key is under 8 KiB."""
MAX_XML_DEPTH: Final = 32
"""Deepest element nesting accepted. Our deepest legitimate message nests 10 levels."""
MAX_SOAP_RESPONSE_BYTES: Final = 4 * 1024 * 1024
"""Largest response the client-side parsers accept (a policy with many templates and CAs)."""

# --- Namespaces ---------------------------------------------------------------------------

SOAP12_NS: Final = "http://www.w3.org/2003/05/soap-envelope"
SOAP11_NS: Final = "http://schemas.xmlsoap.org/soap/envelope/"  # recognised to refuse it
WSA_NS: Final = "http://www.w3.org/2005/08/addressing"
WSSE_NS: Final = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
WSU_NS: Final = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"
WST_NS: Final = "http://docs.oasis-open.org/ws-sx/ws-trust/200512"
WSTEP_NS: Final = "http://schemas.microsoft.com/windows/pki/2009/01/enrollment"
"""[MS-WSTEP] 2.2.1 prefix ``wstep``: RequestID, DispositionMessage, the fault detail."""
XCEP_NS: Final = "http://schemas.microsoft.com/windows/pki/2009/01/enrollmentpolicy"
AUTH_NS: Final = "http://schemas.xmlsoap.org/ws/2006/12/authorization"
"""[MS-WSTEP] 2.2.1 prefix ``auth``: AdditionalContext / ContextItem."""
XSI_NS: Final = "http://www.w3.org/2001/XMLSchema-instance"
XSD_NS: Final = "http://www.w3.org/2001/XMLSchema"
XML_NS: Final = "http://www.w3.org/XML/1998/namespace"

# --- Actions and URIs ---------------------------------------------------------------------

XCEP_GET_POLICIES_ACTION: Final = (
    "http://schemas.microsoft.com/windows/pki/2009/01/enrollmentpolicy/IPolicy/GetPolicies"
)
XCEP_GET_POLICIES_RESPONSE_ACTION: Final = (
    "http://schemas.microsoft.com/windows/pki/2009/01/enrollmentpolicy/IPolicy/GetPoliciesResponse"
)
WSTEP_RST_ACTION: Final = "http://schemas.microsoft.com/windows/pki/2009/01/enrollment/RST/wstep"
WSTEP_RSTRC_ACTION: Final = (
    "http://schemas.microsoft.com/windows/pki/2009/01/enrollment/RSTRC/wstep"
)
WSTEP_FAULT_ACTION: Final = (
    "http://schemas.microsoft.com/windows/pki/2009/01/enrollment/"
    "RequestSecurityTokenCertificateEnrollmentWSDetailFault"
)
"""Action of a fault carrying CertificateEnrollmentWSDetail. Not in [MS-WSTEP]: it is the name
WCF derives for the fault contract, as Windows CES sends it."""
WSA_FAULT_ACTION: Final = "http://www.w3.org/2005/08/addressing/fault"
WSA_ANONYMOUS: Final = "http://www.w3.org/2005/08/addressing/anonymous"

REQUEST_TYPE_ISSUE: Final = "http://docs.oasis-open.org/ws-sx/ws-trust/200512/Issue"
REQUEST_TYPE_QUERY_TOKEN_STATUS: Final = (
    "http://schemas.microsoft.com/windows/pki/2009/01/enrollment/QueryTokenStatus"  # noqa: S105
)
REQUEST_TYPE_KET: Final = "http://docs.oasis-open.org/ws-sx/ws-trust/200512/KET"
TOKEN_TYPE_X509V3: Final = (
    "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-x509-token-profile-1.0#X509v3"  # noqa: S105
)
VALUE_TYPE_PKCS10: Final = "http://schemas.microsoft.com/windows/pki/2009/01/enrollment#PKCS10"
"""What cepces (and MDM enrollment) label a PKCS#10 request with."""
VALUE_TYPE_PKCS7: Final = WSSE_NS + "#PKCS7"
"""What Windows labels its request with ([MS-WSTEP] 4.1.1.1), whether the bytes are a bare
PKCS#10 or a CMS-wrapped renewal; also the type of the chain in a response."""
VALUE_TYPE_X509V3: Final = TOKEN_TYPE_X509V3
ENCODING_TYPE_BASE64: Final = WSSE_NS + "#base64binary"
# S105: these are URIs naming token and password types, not secrets.
_USERNAME_TOKEN_PROFILE: Final = (
    "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-username-token-profile-1.0"  # noqa: S105
)
PASSWORD_TEXT: Final = _USERNAME_TOKEN_PROFILE + "#PasswordText"
PASSWORD_DIGEST: Final = _USERNAME_TOKEN_PROFILE + "#PasswordDigest"

REQUEST_VALUE_TYPES: Final = frozenset({VALUE_TYPE_PKCS10, VALUE_TYPE_PKCS7})
# WS-Security 1.0 spells the fragment #Base64Binary; Microsoft's examples spell #base64binary.
_BASE64_ENCODING_TYPES: Final = frozenset({ENCODING_TYPE_BASE64, WSSE_NS + "#Base64Binary"})

# --- Fault codes --------------------------------------------------------------------------

FaultCode = Literal[
    "Sender", "Receiver", "VersionMismatch", "MustUnderstand", "DataEncodingUnknown"
]
_FAULT_CODES: Final = frozenset(
    {"Sender", "Receiver", "VersionMismatch", "MustUnderstand", "DataEncodingUnknown"}
)
FAULT_SUBCODE_NAMESPACES: Final = {
    "wsa": WSA_NS,
    "wsse": WSSE_NS,
    "wst": WST_NS,
    "wstep": WSTEP_NS,
    "xcep": XCEP_NS,
}
"""Prefixes a :class:`SoapFault` subcode may use; :func:`build_fault` declares the one it uses."""

# WS-Addressing 1.0 SOAP binding 6.4, WS-Security 1.0 section 12, WS-Trust 1.3 section 11.
SUBCODE_ADDRESSING_HEADER_REQUIRED: Final = "wsa:MessageAddressingHeaderRequired"
SUBCODE_INVALID_ADDRESSING_HEADER: Final = "wsa:InvalidAddressingHeader"
SUBCODE_ACTION_NOT_SUPPORTED: Final = "wsa:ActionNotSupported"
SUBCODE_INVALID_SECURITY: Final = "wsse:InvalidSecurity"
SUBCODE_INVALID_SECURITY_TOKEN: Final = "wsse:InvalidSecurityToken"  # noqa: S105
SUBCODE_UNSUPPORTED_SECURITY_TOKEN: Final = "wsse:UnsupportedSecurityToken"  # noqa: S105
SUBCODE_FAILED_AUTHENTICATION: Final = "wsse:FailedAuthentication"
SUBCODE_INVALID_REQUEST: Final = "wst:InvalidRequest"
SUBCODE_REQUEST_FAILED: Final = "wst:RequestFailed"

_INT32_MIN: Final = -(1 << 31)
_UINT32_MAX: Final = (1 << 32) - 1
_DOTTED_OID: Final = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")


class SoapFault(Exception):
    """A SOAP 1.2 fault: raised by the parsers, answered by :func:`build_fault`.

    ``subcode`` is a QName text whose prefix is a key of :data:`FAULT_SUBCODE_NAMESPACES`
    (``"wst:InvalidRequest"``). ``request_id``, ``hresult`` and ``invalid_request`` make it a
    [MS-WSTEP] enrollment fault, answered with a CertificateEnrollmentWSDetail; ``hresult``
    is kept as the signed 32-bit ``xs:int`` it travels as (0x80094012 -> -2146877422).
    """

    def __init__(
        self,
        code: FaultCode,
        subcode: str | None,
        reason: str,
        *,
        request_id: str | None = None,
        hresult: int | None = None,
        invalid_request: bool = False,
    ) -> None:
        if code not in _FAULT_CODES:
            raise ValueError(f"{code!r} is not a SOAP 1.2 fault code")
        if subcode is not None:
            prefix, _, local = subcode.partition(":")
            if prefix not in FAULT_SUBCODE_NAMESPACES or not local:
                raise ValueError(f"fault subcode {subcode!r} does not use a known prefix")
        if hresult is not None:
            if not _INT32_MIN <= hresult <= _UINT32_MAX:
                raise ValueError(f"{hresult:#x} is not a 32-bit HRESULT")
            hresult = hresult - (1 << 32) if hresult > 0x7FFFFFFF else hresult
        super().__init__(reason)
        self.code: FaultCode = code
        self.subcode = subcode
        self.reason = reason
        self.request_id = request_id
        self.hresult = hresult
        self.invalid_request = invalid_request

    @property
    def is_enrollment_fault(self) -> bool:
        """True when the fault carries [MS-WSTEP] CertificateEnrollmentWSDetail."""
        return self.request_id is not None or self.hresult is not None or self.invalid_request

    def __repr__(self) -> str:
        return f"SoapFault({self.code!r}, {self.subcode!r}, {self.reason!r})"


def _sender(reason: str, subcode: str | None = None) -> SoapFault:
    return SoapFault("Sender", subcode, reason)


# --- Parsed values ------------------------------------------------------------------------


@dataclass(frozen=True)
class UsernameToken:
    """wsse:UsernameToken from the Security header (WSS UsernameToken Profile 1.0)."""

    username: str
    password: str = field(repr=False)
    password_type: str
    """Always :data:`PASSWORD_TEXT`: digests are refused while parsing."""


@dataclass(frozen=True)
class SoapRequest:
    """A SOAP 1.2 request whose envelope, addressing and security headers were checked."""

    action: str
    """wsa:Action: what the client asks for."""
    message_id: str
    """wsa:MessageID: the reply's wsa:RelatesTo."""
    to: str | None
    """wsa:To; Windows' WSTEP requests ([MS-WSTEP] 4.1) leave it out."""
    reply_to: str | None
    """wsa:ReplyTo/wsa:Address, normally the anonymous address."""
    body_child: Any
    """The first element in s:Body (an lxml element)."""
    username_token: UsernameToken | None
    """Message-level credentials, when the client sent a UsernameToken."""


@dataclass(frozen=True)
class GetPoliciesRequest:
    """xcep:GetPolicies ([MS-XCEP] 3.1.4.1.2.1)."""

    last_update: datetime | None
    """When the client last fetched the policy (UTC); None for never."""
    preferred_language: str | None
    policy_oids: tuple[str, ...]
    """requestFilter/policyOIDs; empty means no filter ([MS-XCEP] 3.1.4.1.3.22)."""
    client_version: int | None = None
    server_version: int | None = None


@dataclass(frozen=True)
class RstRequest:
    """wst:RequestSecurityToken as [MS-WSTEP] 3.1.4.1.3.3 profiles it."""

    request_type: Literal["issue", "query"]
    token_type: str
    binary_security_token: bytes | None
    """The request's DER bytes (issue), None for QueryTokenStatus."""
    value_type: str | None
    """The BinarySecurityToken's ValueType, one of :data:`REQUEST_VALUE_TYPES`."""
    request_format: Literal["pkcs10", "cms"] | None
    """What the bytes are. Windows labels a bare PKCS#10 ``#PKCS7`` ([MS-WSTEP] 4.1.1.1), so
    the ValueType does not tell; a CMS SignedData is a renewal or an on-behalf-of request."""
    request_id: str | None
    """wstep:RequestID of a QueryTokenStatus (ignored on issue, [MS-WSTEP] 3.1.4.2.1.1)."""
    additional_context: tuple[tuple[str, str], ...]
    """auth:AdditionalContext name/value pairs, as sent. Informational only: never take names
    or a SAN from them (that is ESC6); refuse a request that asks for a SAN this way."""

    def context_value(self, name: str) -> str | None:
        """The first AdditionalContext value named ``name`` (case-insensitive)."""
        wanted = name.casefold()
        return next((v for n, v in self.additional_context if n.casefold() == wanted), None)

    @property
    def requests_san_attribute(self) -> bool:
        """True when AdditionalContext carries a ``SAN`` item: refuse the request."""
        return any(name.strip().casefold() == "san" for name, _ in self.additional_context)


# --- Policy values (MS-XCEP) --------------------------------------------------------------


class ClientAuthentication(IntEnum):
    """CAURI clientAuthentication ([MS-XCEP] 3.1.4.1.3.5)."""

    ANONYMOUS = 1
    KERBEROS = 2
    USERNAME_PASSWORD = 4
    CERTIFICATE = 8


class OidGroup(IntEnum):
    """OID group ([MS-XCEP] 3.1.4.1.3.16). A template's own OID is ENROLLMENT_OBJECT."""

    HASH_ALGORITHM = 1
    ENCRYPTION_ALGORITHM = 2
    PUBLIC_KEY = 3
    SIGNING_ALGORITHM = 4
    RDN = 5
    EXTENSION_OR_ATTRIBUTE = 6
    EXTENDED_KEY_USAGE = 7
    CERTIFICATE_POLICY = 8
    ENROLLMENT_OBJECT = 9


class CaUri(NamedTuple):
    """One CES endpoint of a CA ([MS-XCEP] 3.1.4.1.3.5)."""

    uri: str
    client_authentication: int
    """A :class:`ClientAuthentication` value."""
    priority: int
    """Lower is preferred. cepces skips an endpoint without one."""
    renewal_only: bool


@dataclass(frozen=True, kw_only=True)
class PolicyCA:
    """An issuer in the policy ([MS-XCEP] 3.1.4.1.3.2)."""

    uris: tuple[CaUri, ...]
    certificate_der: bytes
    enroll_permission: bool
    ca_reference_id: int

    def __post_init__(self) -> None:
        if not self.uris:
            raise ValueError("a policy CA needs at least one CES URI")
        for uri in self.uris:
            if not uri.uri:
                raise ValueError("a CES URI is empty")
            if uri.client_authentication not in set(ClientAuthentication):
                raise ValueError(f"clientAuthentication {uri.client_authentication} is not 1/2/4/8")
            _check_uint32(uri.priority, "priority")
        if not self.certificate_der:
            raise ValueError("a policy CA needs its certificate ([MS-XCEP] 3.1.4.1.3.2)")
        _check_int32(self.ca_reference_id, "cAReferenceID")


@dataclass(frozen=True, kw_only=True)
class PolicyOid:
    """An OID object of the response ([MS-XCEP] 3.1.4.1.3.16)."""

    value: str
    group: int
    """An :class:`OidGroup` value."""
    oid_reference_id: int
    default_name: str

    def __post_init__(self) -> None:
        _check_oid(self.value)
        if self.group not in set(OidGroup):
            raise ValueError(f"OID group {self.group} is not defined by [MS-XCEP]")
        _check_int32(self.oid_reference_id, "oIDReferenceID")


@dataclass(frozen=True, kw_only=True)
class PolicyTemplate:
    """A certificate template as a CertificateEnrollmentPolicy ([MS-XCEP] 3.1.4.1.3.7).

    The response carries the template's EKUs, key usage and identity both as fields and as
    the extensions Windows copies into its request: Certificate Template Information
    (1.3.6.1.4.1.311.21.7; the template name, 1.3.6.1.4.1.311.20.2, for schema 1), Extended
    Key Usage and Key Usage.
    """

    common_name: str
    display_name: str
    """defaultName of the template's OID object (what Windows shows)."""
    template_oid: str
    oid_reference: int
    """oIDReferenceID of the template's OID object (group ENROLLMENT_OBJECT)."""
    schema_version: int
    major_revision: int
    minor_revision: int
    validity_seconds: int
    renewal_seconds: int
    key_spec: int
    """pKIDefaultKeySpec: 1 AT_KEYEXCHANGE, 2 AT_SIGNATURE."""
    minimal_key_size: int
    key_usage: int
    """pKIKeyUsage bits as :class:`pkigate.adcs.flags.KeyUsage` numbers them."""
    algorithm_oid_reference: int | None = None
    """oIDReferenceID of the key algorithm (group PUBLIC_KEY), from the caller's ``oids``."""
    enrollment_flags: int = 0
    name_flags: int = 0
    private_key_flags: int = 0
    general_flags: int = 0
    ra_signatures: int = 0
    ekus: tuple[str, ...]
    permission_enroll: bool
    permission_autoenroll: bool
    ca_references: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.common_name:
            raise ValueError("a template needs a common name")
        _check_oid(self.template_oid)
        for eku in self.ekus:
            _check_oid(eku)
        if not 1 <= self.schema_version <= 4:
            raise ValueError(f"template schema version {self.schema_version} is not 1..4")
        if self.major_revision < 1:
            raise ValueError("majorRevision is a positive integer ([MS-XCEP] 3.1.4.1.3.24)")
        if self.validity_seconds < 1 or self.renewal_seconds < 1:
            raise ValueError("validity and renewal periods are positive ([MS-XCEP] 3.1.4.1.3.8)")
        if self.minimal_key_size < 1:
            raise ValueError("minimalKeyLength is positive ([MS-XCEP] 3.1.4.1.3.20)")
        if self.key_usage & ~_ALL_KEY_USAGE_BITS:
            raise ValueError(f"key usage {self.key_usage:#x} has bits pKIKeyUsage does not define")
        for name in (
            "minor_revision",
            "key_spec",
            "key_usage",
            "enrollment_flags",
            "name_flags",
            "private_key_flags",
            "general_flags",
            "ra_signatures",
        ):
            _check_uint32(getattr(self, name), name)
        _check_int32(self.oid_reference, "oid_reference")


def _check_uint32(value: int, what: str) -> None:
    if not 0 <= value <= _UINT32_MAX:
        raise ValueError(f"{what} {value} is not an unsigned 32-bit integer")


def _check_int32(value: int, what: str) -> None:
    if not _INT32_MIN <= value <= 0x7FFFFFFF:
        raise ValueError(f"{what} {value} is not a signed 32-bit integer")


def _check_oid(value: str) -> None:
    if not _DOTTED_OID.match(value):
        raise ValueError(f"{value!r} is not a dotted object identifier")


# --- Hardened XML parsing -----------------------------------------------------------------

# Refused before the parser sees them, in the encodings SOAP allows (UTF-8, UTF-16).
_DTD_MARKERS: Final = tuple(
    marker.encode(encoding)
    for marker in ("<!DOCTYPE", "<!ENTITY")
    for encoding in ("utf-8", "utf-16-le", "utf-16-be")
)


def _new_parser() -> Any:
    # One parser per call: lxml parsers must not be shared between threads.
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
    )


def _parse_xml(body: bytes, max_bytes: int) -> Any:
    """The root element of ``body``, or a fault: no DTD at all, bounded size and depth."""
    if not isinstance(body, bytes | bytearray):
        raise TypeError("a SOAP message is parsed from bytes")
    if len(body) > max_bytes:
        raise _sender(f"the message is larger than {max_bytes} bytes")
    if not body.strip():
        raise _sender("the message is empty")
    # A DOCTYPE is the only way to declare entities: refusing it closes entity expansion
    # (billion laughs) and external entities (XXE) whatever the parser would do with them.
    if any(marker in body for marker in _DTD_MARKERS):
        raise _sender("a document type declaration is not allowed")
    try:
        root = etree.fromstring(bytes(body), _new_parser())
    except etree.XMLSyntaxError as error:
        if "excessive depth" in str(error).lower():  # libxml2's own bound, far above ours
            raise _sender(f"the message nests elements deeper than {MAX_XML_DEPTH}") from None
        raise _sender(f"the message is not well-formed XML (line {error.lineno})") from None
    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise _sender("a document type declaration is not allowed")
    _check_depth(root)
    return root


def _check_depth(root: Any) -> None:
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        element, depth = stack.pop()
        if depth > MAX_XML_DEPTH:
            raise _sender(f"the message nests elements deeper than {MAX_XML_DEPTH}")
        stack.extend((child, depth + 1) for child in element)


def _q(namespace: str, local: str) -> str:
    return f"{{{namespace}}}{local}"


def _elements(parent: Any) -> list[Any]:
    return [child for child in parent if isinstance(child.tag, str)]


def _child(parent: Any, namespace: str, local: str) -> Any:
    return parent.find(_q(namespace, local))


def _is_nil(element: Any) -> bool:
    return element.get(_q(XSI_NS, "nil"), "").strip() in ("true", "1")


def _text(element: Any) -> str:
    return (element.text or "").strip()


def _split_envelope(root: Any) -> tuple[Any | None, Any]:
    """(Header or None, Body) of a SOAP 1.2 envelope."""
    if root.tag == _q(SOAP11_NS, "Envelope"):
        raise SoapFault("VersionMismatch", None, "SOAP 1.1 is not supported: send SOAP 1.2")
    if root.tag != _q(SOAP12_NS, "Envelope"):
        raise _sender("the message is not a SOAP 1.2 envelope")
    header = body = None
    for child in _elements(root):
        if child.tag == _q(SOAP12_NS, "Header") and header is None and body is None:
            header = child
        elif child.tag == _q(SOAP12_NS, "Body") and body is None:
            body = child
        else:
            raise _sender("the envelope holds something other than one Header and one Body")
    if body is None:
        raise _sender("the envelope has no Body")
    return header, body


def _first_body_element(body: Any) -> Any:
    children = _elements(body)
    if not children:
        raise _sender("the Body is empty")
    return children[0]


# --- Envelope (server side) ---------------------------------------------------------------


def parse_envelope(body: bytes) -> SoapRequest:
    """Check a SOAP 1.2 request and read its addressing and security headers."""
    root = _parse_xml(body, MAX_SOAP_BYTES)
    header, soap_body = _split_envelope(root)
    blocks = _elements(header) if header is not None else []
    _check_must_understand(blocks)
    action = _addressing_value(blocks, "Action")
    message_id = _addressing_value(blocks, "MessageID")
    if action is None:
        raise _sender("the wsa:Action header is missing", SUBCODE_ADDRESSING_HEADER_REQUIRED)
    if message_id is None:
        raise _sender("the wsa:MessageID header is missing", SUBCODE_ADDRESSING_HEADER_REQUIRED)
    reply_to = None
    reply_to_blocks = [b for b in blocks if b.tag == _q(WSA_NS, "ReplyTo")]
    if len(reply_to_blocks) > 1:
        raise _sender("wsa:ReplyTo appears more than once", SUBCODE_INVALID_ADDRESSING_HEADER)
    if reply_to_blocks:
        address = _child(reply_to_blocks[0], WSA_NS, "Address")
        reply_to = _text(address) if address is not None else None
    return SoapRequest(
        action=action,
        message_id=message_id,
        to=_addressing_value(blocks, "To"),
        reply_to=reply_to,
        body_child=_first_body_element(soap_body),
        username_token=_parse_security(blocks),
    )


def _check_must_understand(blocks: list[Any]) -> None:
    # SOAP 1.2 part 1, 5.2.3: a header block marked mustUnderstand that is not processed
    # faults. We process WS-Addressing headers and wsse:Security.
    for block in blocks:
        if block.get(_q(SOAP12_NS, "mustUnderstand"), "").strip() not in ("1", "true"):
            continue
        if etree.QName(block).namespace == WSA_NS or block.tag == _q(WSSE_NS, "Security"):
            continue
        name = etree.QName(block).localname[:64]
        raise SoapFault("MustUnderstand", None, f"header {name} is not understood")


def _addressing_value(blocks: list[Any], local: str) -> str | None:
    found = [b for b in blocks if b.tag == _q(WSA_NS, local)]
    if len(found) > 1:
        raise _sender(f"wsa:{local} appears more than once", SUBCODE_INVALID_ADDRESSING_HEADER)
    if not found:
        return None
    value = _text(found[0])
    if not value:
        raise _sender(f"wsa:{local} is empty", SUBCODE_INVALID_ADDRESSING_HEADER)
    return value


def _parse_security(blocks: list[Any]) -> UsernameToken | None:
    securities = [b for b in blocks if b.tag == _q(WSSE_NS, "Security")]
    if not securities:
        return None
    if len(securities) > 1:
        raise _sender("wsse:Security appears more than once", SUBCODE_INVALID_SECURITY)
    # Only what we verify may be in it: a signature or certificate token we ignored would
    # leave a request that claims message-level authentication looking anonymous.
    for element in _elements(securities[0]):
        if element.tag not in (_q(WSSE_NS, "UsernameToken"), _q(WSU_NS, "Timestamp")):
            raise _sender(
                "wsse:Security may hold a UsernameToken and a Timestamp only",
                SUBCODE_UNSUPPORTED_SECURITY_TOKEN,
            )
    tokens = securities[0].findall(_q(WSSE_NS, "UsernameToken"))
    if not tokens:
        return None  # a Timestamp alone
    if len(tokens) > 1:
        raise _sender("more than one UsernameToken", SUBCODE_INVALID_SECURITY)
    username_element = _child(tokens[0], WSSE_NS, "Username")
    password_element = _child(tokens[0], WSSE_NS, "Password")
    username = _text(username_element) if username_element is not None else ""
    if not username:
        raise _sender("the UsernameToken has no Username", SUBCODE_INVALID_SECURITY_TOKEN)
    if password_element is None:
        raise _sender("the UsernameToken has no Password", SUBCODE_INVALID_SECURITY_TOKEN)
    # The profile's Type attribute is unqualified; cepces sends it as wsse:Type.
    password_type = (
        password_element.get("Type") or password_element.get(_q(WSSE_NS, "Type")) or PASSWORD_TEXT
    ).strip()
    if password_type == PASSWORD_DIGEST:
        raise _sender(
            "PasswordDigest is not supported: send the password as #PasswordText over TLS",
            SUBCODE_UNSUPPORTED_SECURITY_TOKEN,
        )
    if password_type != PASSWORD_TEXT:
        raise _sender("unsupported UsernameToken password type", SUBCODE_UNSUPPORTED_SECURITY_TOKEN)
    return UsernameToken(username, password_element.text or "", password_type)


def _expect(request: SoapRequest, action: str, namespace: str, local: str) -> Any:
    if request.action != action:
        raise _sender("this endpoint does not handle that action", SUBCODE_ACTION_NOT_SUPPORTED)
    if request.body_child.tag != _q(namespace, local):
        found = etree.QName(request.body_child).localname[:64]
        raise _sender(f"the Body holds {found}, not {local}")
    return request.body_child


# --- Faults -------------------------------------------------------------------------------


def build_fault(fault: SoapFault, relates_to: str | None, action: str | None = None) -> bytes:
    """A SOAP 1.2 fault envelope; an enrollment fault carries CertificateEnrollmentWSDetail.

    ``action`` defaults to :data:`WSTEP_FAULT_ACTION` for enrollment faults (as Windows CES
    sends them) and to :data:`WSA_FAULT_ACTION` otherwise.
    """
    if action is None:
        action = WSTEP_FAULT_ACTION if fault.is_enrollment_fault else WSA_FAULT_ACTION
    envelope, body = _response_envelope(action, relates_to)
    fault_element = _sub(body, SOAP12_NS, "Fault")
    code = _sub(fault_element, SOAP12_NS, "Code")
    _sub(code, SOAP12_NS, "Value", f"s:{fault.code}")
    if fault.subcode is not None:
        prefix = fault.subcode.partition(":")[0]
        subcode = _sub(code, SOAP12_NS, "Subcode")
        value = etree.SubElement(
            subcode,
            _q(SOAP12_NS, "Value"),
            nsmap={prefix: FAULT_SUBCODE_NAMESPACES[prefix]},
        )
        value.text = fault.subcode
    reason = _sub(fault_element, SOAP12_NS, "Reason")
    _sub(reason, SOAP12_NS, "Text", fault.reason).set(_q(XML_NS, "lang"), "en-US")
    if fault.is_enrollment_fault:
        # [MS-WSTEP] 3.1.4.1.3.7: absent values are nil, not omitted.
        detail = _sub(
            _sub(fault_element, SOAP12_NS, "Detail"),
            WSTEP_NS,
            "CertificateEnrollmentWSDetail",
            default_ns=True,
        )
        _nil(detail, WSTEP_NS, "BinaryResponse")
        _value_or_nil(
            detail, WSTEP_NS, "ErrorCode", None if fault.hresult is None else str(fault.hresult)
        )
        _sub(detail, WSTEP_NS, "InvalidRequest", _bool(fault.invalid_request))
        _value_or_nil(detail, WSTEP_NS, "RequestID", fault.request_id)
    return _serialize(envelope)


def _parse_fault(fault_element: Any) -> SoapFault:
    code_value = fault_element.find(f"{_q(SOAP12_NS, 'Code')}/{_q(SOAP12_NS, 'Value')}")
    code = _text(code_value).rpartition(":")[2] if code_value is not None else ""
    subcode = None
    subcode_value = fault_element.find(
        f"{_q(SOAP12_NS, 'Code')}/{_q(SOAP12_NS, 'Subcode')}/{_q(SOAP12_NS, 'Value')}"
    )
    if subcode_value is not None:
        prefix, _, local = _text(subcode_value).rpartition(":")
        namespace = subcode_value.nsmap.get(prefix or None)
        ours = next((p for p, ns in FAULT_SUBCODE_NAMESPACES.items() if ns == namespace), None)
        subcode = f"{ours}:{local}" if ours and local else None
    reason_text = fault_element.find(f"{_q(SOAP12_NS, 'Reason')}/{_q(SOAP12_NS, 'Text')}")
    reason = _text(reason_text) if reason_text is not None else ""
    request_id = hresult = None
    invalid_request = False
    detail = fault_element.find(
        f"{_q(SOAP12_NS, 'Detail')}/{_q(WSTEP_NS, 'CertificateEnrollmentWSDetail')}"
    )
    if detail is not None:
        error_code = _optional_value(detail, WSTEP_NS, "ErrorCode")
        hresult = _to_int(error_code, "ErrorCode") if error_code is not None else None
        request_id = _optional_value(detail, WSTEP_NS, "RequestID")
        invalid = _optional_value(detail, WSTEP_NS, "InvalidRequest")
        invalid_request = invalid is not None and _to_bool(invalid, "InvalidRequest")
    return SoapFault(
        cast(FaultCode, code) if code in _FAULT_CODES else "Receiver",
        subcode,
        reason,
        request_id=request_id,
        hresult=hresult,
        invalid_request=invalid_request,
    )


# --- MS-XCEP: server side -----------------------------------------------------------------


def parse_get_policies(request: SoapRequest) -> GetPoliciesRequest:
    """Read xcep:GetPolicies; a missing or nil <client> is a fault ([MS-XCEP] 3.1.4.1.2.1)."""
    get_policies = _expect(request, XCEP_GET_POLICIES_ACTION, XCEP_NS, "GetPolicies")
    client = _child(get_policies, XCEP_NS, "client")
    if client is None or _is_nil(client):
        raise _sender("GetPolicies has no client element")
    last_update_text = _optional_value(client, XCEP_NS, "lastUpdate")
    policy_oids: tuple[str, ...] = ()
    client_version = server_version = None
    request_filter = _child(get_policies, XCEP_NS, "requestFilter")
    if request_filter is not None and not _is_nil(request_filter):
        oids = _child(request_filter, XCEP_NS, "policyOIDs")
        if oids is not None and not _is_nil(oids):
            policy_oids = tuple(_text(oid) for oid in oids.findall(_q(XCEP_NS, "oid")))
            for oid in policy_oids:
                if not _DOTTED_OID.match(oid):
                    raise _sender("requestFilter holds something that is not an OID")
        client_version = _optional_int(request_filter, XCEP_NS, "clientVersion")
        server_version = _optional_int(request_filter, XCEP_NS, "serverVersion")
    return GetPoliciesRequest(
        last_update=_parse_datetime(last_update_text) if last_update_text else None,
        preferred_language=_optional_value(client, XCEP_NS, "preferredLanguage") or None,
        policy_oids=policy_oids,
        client_version=client_version,
        server_version=server_version,
    )


def _parse_datetime(value: str) -> datetime:
    """An xs:dateTime; [MS-XCEP] 3.1.4.1.3.9 sends GMT, so a value without offset is UTC."""
    try:
        parsed = datetime.fromisoformat(value)
        if parsed.tzinfo is None:
            return parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        raise _sender("lastUpdate is not an xs:dateTime") from None


def build_get_policies_response(
    *,
    relates_to: str,
    policy_id: str,
    policy_friendly_name: str,
    next_update_hours: int,
    policies_not_changed: bool,
    templates: Sequence[PolicyTemplate],
    cas: Sequence[PolicyCA],
    oids: Sequence[PolicyOid],
) -> bytes:
    """xcep:GetPoliciesResponse, every element in the order of the [MS-XCEP] 6.2 schema.

    The OID collection is ``oids`` plus what the templates need and ``oids`` lacks: each
    template's own OID (group 9, named by its display name) and the OIDs of its EKUs
    (group 7) and extensions (group 6), under fresh reference ids. With
    ``policies_not_changed`` the policies, CAs and OIDs are sent as nil ([MS-XCEP] 3.1.4.1.3.9).
    """
    if not 1 <= next_update_hours <= _UINT32_MAX:
        raise ValueError("nextUpdateHours is a positive integer ([MS-XCEP] 3.1.4.1.3.23)")
    if not policy_id:
        raise ValueError("policyID is required")
    if policies_not_changed:
        templates, cas, oids = (), (), ()
    _check_references(templates, cas)
    table = _OidTable(oids, templates)
    template_extensions = [_template_extensions(template, table) for template in templates]

    envelope, body = _response_envelope(XCEP_GET_POLICIES_RESPONSE_ACTION, relates_to)
    root = _sub(body, XCEP_NS, "GetPoliciesResponse", default_ns=True)
    response = _x(root, "response")
    _x(response, "policyID", policy_id)
    _x(response, "policyFriendlyName", policy_friendly_name)
    _x(response, "nextUpdateHours", str(next_update_hours))
    _x(response, "policiesNotChanged", _bool(policies_not_changed))
    if templates:
        policies = _x(response, "policies")
        for template, extensions in zip(templates, template_extensions, strict=True):
            _policy_element(policies, template, extensions)
    else:
        _nil(response, XCEP_NS, "policies")
    if cas:
        ca_collection = _x(root, "cAs")
        for ca in cas:
            _ca_element(ca_collection, ca)
    else:
        _nil(root, XCEP_NS, "cAs")
    if table.oids:
        oid_collection = _x(root, "oIDs")
        for oid in table.oids:
            oid_element = _x(oid_collection, "oID")
            _x(oid_element, "value", oid.value)
            _x(oid_element, "group", str(oid.group))
            _x(oid_element, "oIDReferenceID", str(oid.oid_reference_id))
            _x(oid_element, "defaultName", oid.default_name)
    else:
        _nil(root, XCEP_NS, "oIDs")
    return _serialize(envelope)


def _check_references(templates: Sequence[PolicyTemplate], cas: Sequence[PolicyCA]) -> None:
    ca_ids = [ca.ca_reference_id for ca in cas]
    if len(set(ca_ids)) != len(ca_ids):
        raise ValueError("cAReferenceID values must be unique ([MS-XCEP] 3.1.4.1.3.2)")
    names = [template.common_name for template in templates]
    if len(set(names)) != len(names):
        raise ValueError("template common names must be unique ([MS-XCEP] 3.1.4.1.3.1)")
    for template in templates:
        unknown = set(template.ca_references) - set(ca_ids)
        if unknown:
            raise ValueError(f"template {template.common_name} references unknown CAs {unknown}")
        if len(set(template.ca_references)) != len(template.ca_references):
            raise ValueError(f"template {template.common_name} references a CA twice")


# Extension OIDs and the names Windows gives them in the OID collection.
_EXT_TEMPLATE_INFO: Final = ("1.3.6.1.4.1.311.21.7", "Certificate Template Information")
_EXT_TEMPLATE_NAME: Final = ("1.3.6.1.4.1.311.20.2", "Certificate Template Name")
_EXT_EKU: Final = ("2.5.29.37", "Enhanced Key Usage")
_EXT_KEY_USAGE: Final = ("2.5.29.15", "Key Usage")
_EKU_NAMES: Final = {
    "1.3.6.1.5.5.7.3.1": "Server Authentication",
    "1.3.6.1.5.5.7.3.2": "Client Authentication",
    "1.3.6.1.5.5.7.3.3": "Code Signing",
    "1.3.6.1.5.5.7.3.4": "Secure Email",
    "1.3.6.1.5.5.7.3.8": "Time Stamping",
    "1.3.6.1.5.5.7.3.9": "OCSP Signing",
    "1.3.6.1.4.1.311.10.3.4": "Encrypting File System",
    "1.3.6.1.4.1.311.10.3.12": "Document Signing",
    "1.3.6.1.4.1.311.20.2.1": "Certificate Request Agent",
    "1.3.6.1.4.1.311.20.2.2": "Smart Card Logon",
    "1.3.6.1.5.2.3.5": "KDC Authentication",
}


class _Extension(NamedTuple):
    oid_reference: int
    critical: bool
    der: bytes


class _OidTable:
    """The response's OID objects: the caller's, then those the templates add."""

    def __init__(self, oids: Sequence[PolicyOid], templates: Sequence[PolicyTemplate]) -> None:
        self._by_id: dict[int, PolicyOid] = {}
        for oid in oids:
            if oid.oid_reference_id in self._by_id:
                raise ValueError(f"oIDReferenceID {oid.oid_reference_id} is used twice")
            self._by_id[oid.oid_reference_id] = oid
        for template in templates:
            known = self._by_id.get(template.oid_reference)
            if known is None:
                self._by_id[template.oid_reference] = PolicyOid(
                    value=template.template_oid,
                    group=OidGroup.ENROLLMENT_OBJECT,
                    oid_reference_id=template.oid_reference,
                    default_name=template.display_name,
                )
            elif known.value != template.template_oid:
                raise ValueError(
                    f"template {template.common_name}: OID reference {template.oid_reference} "
                    f"is {known.value}, not {template.template_oid}"
                )
        for template in templates:
            reference = template.algorithm_oid_reference
            if reference is not None and reference not in self._by_id:
                raise ValueError(f"template {template.common_name}: no OID {reference}")

    @property
    def oids(self) -> list[PolicyOid]:
        return list(self._by_id.values())

    def reference(self, value: str, group: OidGroup, name: str) -> int:
        for oid in self._by_id.values():
            if oid.value == value and oid.group == group:
                return oid.oid_reference_id
        reference = max(self._by_id, default=0) + 1
        self._by_id[reference] = PolicyOid(
            value=value, group=group, oid_reference_id=reference, default_name=name
        )
        return reference


def _template_extensions(template: PolicyTemplate, table: _OidTable) -> list[_Extension]:
    def extension(oid_and_name: tuple[str, str], critical: bool, der: bytes) -> _Extension:
        oid, name = oid_and_name
        return _Extension(
            table.reference(oid, OidGroup.EXTENSION_OR_ATTRIBUTE, name), critical, der
        )

    if template.schema_version >= 2:
        info = x509.MSCertificateTemplate(
            x509.ObjectIdentifier(template.template_oid),
            template.major_revision,
            template.minor_revision,
        )
        extensions = [extension(_EXT_TEMPLATE_INFO, False, info.public_bytes())]
    else:
        name = asn1_core.BMPString(template.common_name).dump()
        extensions = [extension(_EXT_TEMPLATE_NAME, False, name)]
    if template.ekus:
        for eku in template.ekus:
            table.reference(eku, OidGroup.EXTENDED_KEY_USAGE, _EKU_NAMES.get(eku, eku))
        usage = x509.ExtendedKeyUsage([x509.ObjectIdentifier(eku) for eku in template.ekus])
        extensions.append(extension(_EXT_EKU, False, usage.public_bytes()))
    if template.key_usage:
        key_usage = _key_usage_extension(template.key_usage, template.common_name)
        extensions.append(extension(_EXT_KEY_USAGE, True, key_usage.public_bytes()))
    return extensions


_KEY_USAGE_FIELDS: Final = (
    (KeyUsage.DIGITAL_SIGNATURE, "digital_signature"),
    (KeyUsage.NON_REPUDIATION, "content_commitment"),
    (KeyUsage.KEY_ENCIPHERMENT, "key_encipherment"),
    (KeyUsage.DATA_ENCIPHERMENT, "data_encipherment"),
    (KeyUsage.KEY_AGREEMENT, "key_agreement"),
    (KeyUsage.KEY_CERT_SIGN, "key_cert_sign"),
    (KeyUsage.CRL_SIGN, "crl_sign"),
    (KeyUsage.ENCIPHER_ONLY, "encipher_only"),
    (KeyUsage.DECIPHER_ONLY, "decipher_only"),
)
_ALL_KEY_USAGE_BITS: Final = sum(int(bit) for bit, _ in _KEY_USAGE_FIELDS)


def _key_usage_extension(bits: int, template: str) -> x509.KeyUsage:
    flags = {name: bool(bits & bit) for bit, name in _KEY_USAGE_FIELDS}
    try:
        return x509.KeyUsage(**flags)
    except ValueError as error:  # encipher/decipher only without key agreement
        raise ValueError(f"template {template}: {error}") from None


def _policy_element(parent: Any, template: PolicyTemplate, extensions: list[_Extension]) -> None:
    policy = _x(parent, "policy")
    _x(policy, "policyOIDReference", str(template.oid_reference))
    if template.ca_references:
        references = _x(policy, "cAs")
        for reference in template.ca_references:
            _x(references, "cAReference", str(reference))
    else:
        _nil(policy, XCEP_NS, "cAs")
    attributes = _x(policy, "attributes")
    _x(attributes, "commonName", template.common_name)
    _x(attributes, "policySchema", str(template.schema_version))
    validity = _x(attributes, "certificateValidity")
    _x(validity, "validityPeriodSeconds", str(template.validity_seconds))
    _x(validity, "renewalPeriodSeconds", str(template.renewal_seconds))
    permission = _x(attributes, "permission")
    _x(permission, "enroll", _bool(template.permission_enroll))
    _x(permission, "autoEnroll", _bool(template.permission_autoenroll))
    key_attributes = _x(attributes, "privateKeyAttributes")
    _x(key_attributes, "minimalKeyLength", str(template.minimal_key_size))
    _x(key_attributes, "keySpec", str(template.key_spec))
    _x(key_attributes, "keyUsageProperty", str(template.key_usage))
    _nil(key_attributes, XCEP_NS, "permissions")
    _value_or_nil(
        key_attributes,
        XCEP_NS,
        "algorithmOIDReference",
        _optional_str(template.algorithm_oid_reference),
    )
    _nil(key_attributes, XCEP_NS, "cryptoProviders")
    revision = _x(attributes, "revision")
    _x(revision, "majorRevision", str(template.major_revision))
    _x(revision, "minorRevision", str(template.minor_revision))
    _nil(attributes, XCEP_NS, "supersededPolicies")
    _x(attributes, "privateKeyFlags", str(template.private_key_flags))
    _x(attributes, "subjectNameFlags", str(template.name_flags))
    _x(attributes, "enrollmentFlags", str(template.enrollment_flags))
    _x(attributes, "generalFlags", str(template.general_flags))
    _nil(attributes, XCEP_NS, "hashAlgorithmOIDReference")
    if template.ra_signatures:
        ra = _x(attributes, "rARequirements")
        _x(ra, "rASignatures", str(template.ra_signatures))
        _nil(ra, XCEP_NS, "rAEKUs")
        _nil(ra, XCEP_NS, "rAPolicies")
    else:
        _nil(attributes, XCEP_NS, "rARequirements")
    _nil(attributes, XCEP_NS, "keyArchivalAttributes")
    if extensions:
        extension_collection = _x(attributes, "extensions")
        for extension in extensions:
            element = _x(extension_collection, "extension")
            _x(element, "oIDReference", str(extension.oid_reference))
            _x(element, "critical", _bool(extension.critical))
            _x(element, "value", _b64(extension.der))
    else:
        _nil(attributes, XCEP_NS, "extensions")


def _ca_element(parent: Any, ca: PolicyCA) -> None:
    element = _x(parent, "cA")
    uris = _x(element, "uris")
    for uri in ca.uris:
        ca_uri = _x(uris, "cAURI")
        _x(ca_uri, "clientAuthentication", str(int(uri.client_authentication)))
        _x(ca_uri, "uri", uri.uri)
        _x(ca_uri, "priority", str(uri.priority))
        _x(ca_uri, "renewalOnly", _bool(uri.renewal_only))
    _x(element, "certificate", _b64(ca.certificate_der))
    _x(element, "enrollPermission", _bool(ca.enroll_permission))
    _x(element, "cAReferenceID", str(ca.ca_reference_id))


# --- MS-WSTEP: server side ----------------------------------------------------------------


def parse_request_security_token(request: SoapRequest) -> RstRequest:
    """Read a wst:RequestSecurityToken under the WSTEP action ([MS-WSTEP] 3.1.4.2.1)."""
    rst = _expect(request, WSTEP_RST_ACTION, WST_NS, "RequestSecurityToken")
    request_type = _optional_value(rst, WST_NS, "RequestType")
    if not request_type:
        raise _sender("the request has no RequestType", SUBCODE_INVALID_REQUEST)
    # wst:TokenType is optional in WS-Trust; when present WSTEP requires X509v3 (3.1.4.1.2.8).
    token_type = _optional_value(rst, WST_NS, "TokenType") or TOKEN_TYPE_X509V3
    if token_type != TOKEN_TYPE_X509V3:
        raise _sender("TokenType must be the X.509v3 token type", SUBCODE_INVALID_REQUEST)
    additional_context = _parse_additional_context(rst)
    if request_type == REQUEST_TYPE_ISSUE:
        token, value_type = _request_token(rst)
        return RstRequest(
            request_type="issue",
            token_type=token_type,
            binary_security_token=token,
            value_type=value_type,
            request_format=_sniff_request_format(token),
            request_id=None,
            additional_context=additional_context,
        )
    if request_type == REQUEST_TYPE_QUERY_TOKEN_STATUS:
        request_id = _optional_value(rst, WSTEP_NS, "RequestID")
        if not request_id:
            raise _sender("QueryTokenStatus needs a RequestID", SUBCODE_INVALID_REQUEST)
        return RstRequest(
            request_type="query",
            token_type=token_type,
            binary_security_token=None,
            value_type=None,
            request_format=None,
            request_id=request_id,
            additional_context=additional_context,
        )
    if request_type == REQUEST_TYPE_KET:
        raise _sender("key exchange (KET) requests are not supported", SUBCODE_INVALID_REQUEST)
    raise _sender("unknown RequestType", SUBCODE_INVALID_REQUEST)


def _request_token(rst: Any) -> tuple[bytes, str]:
    tokens = rst.findall(_q(WSSE_NS, "BinarySecurityToken"))
    if len(tokens) != 1:
        raise _sender(
            "an issue request carries exactly one BinarySecurityToken", SUBCODE_INVALID_REQUEST
        )
    token = tokens[0]
    value_type = (token.get("ValueType") or "").strip()
    if value_type not in REQUEST_VALUE_TYPES:
        raise _sender(
            "the BinarySecurityToken ValueType is not PKCS10 or PKCS7", SUBCODE_INVALID_REQUEST
        )
    encoding_type = (token.get("EncodingType") or ENCODING_TYPE_BASE64).strip()
    if encoding_type not in _BASE64_ENCODING_TYPES:
        raise _sender(
            "the BinarySecurityToken EncodingType must be base64binary", SUBCODE_INVALID_REQUEST
        )
    return _b64decode(token.text or "", "the BinarySecurityToken"), value_type


def _sniff_request_format(der: bytes) -> Literal["pkcs10", "cms"]:
    # A CMS ContentInfo starts SEQUENCE { OID signedData (1.2.840.113549.1.7.2), ... };
    # a CertificationRequest starts SEQUENCE { SEQUENCE { INTEGER version, ... } }.
    signed_data = bytes.fromhex("06092a864886f70d010702")
    header = 2 + (der[1] & 0x7F if len(der) > 1 and der[1] & 0x80 else 0)
    return "cms" if der[header : header + len(signed_data)] == signed_data else "pkcs10"


def _parse_additional_context(rst: Any) -> tuple[tuple[str, str], ...]:
    context = _child(rst, AUTH_NS, "AdditionalContext")
    if context is None:
        return ()
    items = []
    for item in context.findall(_q(AUTH_NS, "ContextItem")):
        name = (item.get("Name") or "").strip()
        if not name:
            raise _sender("a ContextItem has no Name", SUBCODE_INVALID_REQUEST)
        value = _child(item, AUTH_NS, "Value")
        items.append((name, (value.text or "") if value is not None else ""))
    return tuple(items)


def build_rstr_issued(
    *,
    relates_to: str,
    request_id: str,
    certificate_der: bytes,
    pkcs7_chain_der: bytes,
    disposition_message: str = "Issued",
) -> bytes:
    """The RSTRC of an issued certificate, laid out as [MS-WSTEP] 4.1.1.2.

    The chain travels as a PKCS#7 BinarySecurityToken beside the RequestedSecurityToken
    holding the certificate; Windows itself puts a CMC full PKI response there (3.1.4.1.3.2).
    """
    envelope, response = _rstr_envelope(disposition_message)
    token = _sub(response, WSSE_NS, "BinarySecurityToken", _b64(pkcs7_chain_der), default_ns=True)
    token.set("ValueType", VALUE_TYPE_PKCS7)
    token.set("EncodingType", ENCODING_TYPE_BASE64)
    requested = _sub(response, WST_NS, "RequestedSecurityToken")
    certificate = _sub(
        requested, WSSE_NS, "BinarySecurityToken", _b64(certificate_der), default_ns=True
    )
    certificate.set("ValueType", VALUE_TYPE_X509V3)
    certificate.set("EncodingType", ENCODING_TYPE_BASE64)
    _sub(response, WSTEP_NS, "RequestID", request_id, default_ns=True)
    return _finish_rstr(envelope, relates_to)


def build_rstr_pending(
    *,
    relates_to: str,
    request_id: str,
    reference_uri: str,
    disposition_message: str = "Request is pending",
) -> bytes:
    """The RSTRC of a pended request ([MS-WSTEP] 3.1.4.2.1.1): a response, not a fault.

    RequestedSecurityToken holds a wsse:SecurityTokenReference whose Reference URI is this
    CES endpoint (``reference_uri``), where the client polls with QueryTokenStatus and
    RequestID ([MS-WSTEP] 3.1.4.1.3.2). cepces reads both and fails without the reference;
    it parses RequestID as an unsigned integer, so keep request ids decimal.
    """
    envelope, response = _rstr_envelope(disposition_message)
    requested = _sub(response, WST_NS, "RequestedSecurityToken")
    token_reference = _sub(requested, WSSE_NS, "SecurityTokenReference", default_ns=True)
    _sub(token_reference, WSSE_NS, "Reference").set("URI", reference_uri)
    _sub(response, WSTEP_NS, "RequestID", request_id, default_ns=True)
    return _finish_rstr(envelope, relates_to)


def build_rstr_rejected(
    *, relates_to: str, request_id: str | None, hresult: int, reason: str
) -> bytes:
    """A denied request: a Receiver fault with CertificateEnrollmentWSDetail ([MS-WSTEP] 1.3).

    InvalidRequest is true, as 3.1.4.1.3.7 requires when the issuer denies; ``hresult`` is
    what Windows shows the user (CERTSRV_E_TEMPLATE_DENIED 0x80094012, say).
    """
    fault = SoapFault(
        "Receiver", None, reason, request_id=request_id, hresult=hresult, invalid_request=True
    )
    return build_fault(fault, relates_to)


def _rstr_envelope(disposition_message: str) -> tuple[Any, Any]:
    envelope, body = _response_envelope(WSTEP_RSTRC_ACTION, None)
    collection = _sub(body, WST_NS, "RequestSecurityTokenResponseCollection", default_ns=True)
    response = _sub(collection, WST_NS, "RequestSecurityTokenResponse")
    _sub(response, WST_NS, "TokenType", TOKEN_TYPE_X509V3)
    disposition = _sub(
        response, WSTEP_NS, "DispositionMessage", disposition_message, default_ns=True
    )
    disposition.set(_q(XML_NS, "lang"), "en-US")
    return envelope, response


def _finish_rstr(envelope: Any, relates_to: str) -> bytes:
    header = _child(envelope, SOAP12_NS, "Header")
    _sub(header, WSA_NS, "RelatesTo", relates_to)
    return _serialize(envelope)


def pkcs7_certs_only(certificates: Sequence[x509.Certificate]) -> bytes:
    """A degenerate PKCS#7 SignedData holding ``certificates`` (DER)."""
    return pkcs7.serialize_certificates(list(certificates), Encoding.DER)


# --- Client side: requests ----------------------------------------------------------------


def build_get_policies_request(
    to_url: str,
    message_id: str,
    username: str | None = None,
    password: str | None = None,
    *,
    last_update: datetime | None = None,
    preferred_language: str | None = None,
    policy_oids: Sequence[str] = (),
) -> bytes:
    """A GetPolicies request as Windows sends it ([MS-XCEP] 4.1.1.1)."""
    envelope, body = _request_envelope(
        XCEP_GET_POLICIES_ACTION, to_url, message_id, username, password
    )
    get_policies = _sub(body, XCEP_NS, "GetPolicies", default_ns=True)
    client = _x(get_policies, "client")
    if last_update is None:
        _nil(client, XCEP_NS, "lastUpdate")
    else:
        if last_update.tzinfo is not None:
            last_update = last_update.astimezone(UTC)
        _x(client, "lastUpdate", last_update.strftime("%Y-%m-%dT%H:%M:%SZ"))
    _value_or_nil(client, XCEP_NS, "preferredLanguage", preferred_language)
    if policy_oids:
        request_filter = _x(get_policies, "requestFilter")
        oids = _x(request_filter, "policyOIDs")
        for oid in policy_oids:
            _check_oid(oid)
            _x(oids, "oid", oid)
    else:
        _nil(get_policies, XCEP_NS, "requestFilter")
    return _serialize(envelope)


def build_rst_issue(
    to_url: str,
    pkcs10_der: bytes,
    message_id: str,
    username: str | None = None,
    password: str | None = None,
    *,
    value_type: str = VALUE_TYPE_PKCS10,
    additional_context: Iterable[tuple[str, str]] = (),
) -> bytes:
    """An issue RequestSecurityToken as [MS-WSTEP] 4.1.1.1 shows it."""
    if value_type not in REQUEST_VALUE_TYPES:
        raise ValueError(f"{value_type} is not a request ValueType")
    envelope, rst = _rst_envelope(to_url, message_id, username, password, REQUEST_TYPE_ISSUE)
    token = _sub(rst, WSSE_NS, "BinarySecurityToken", _b64(pkcs10_der), default_ns=True)
    token.set("ValueType", value_type)
    token.set("EncodingType", ENCODING_TYPE_BASE64)
    items = list(additional_context)
    if items:
        context = _sub(rst, AUTH_NS, "AdditionalContext", default_ns=True)
        for name, value in items:
            item = _sub(context, AUTH_NS, "ContextItem")
            item.set("Name", name)
            _sub(item, AUTH_NS, "Value", value)
    _nil(rst, WSTEP_NS, "RequestID", default_ns=True)
    return _serialize(envelope)


def build_rst_query(
    to_url: str,
    request_id: str,
    message_id: str,
    username: str | None = None,
    password: str | None = None,
) -> bytes:
    """A QueryTokenStatus RequestSecurityToken ([MS-WSTEP] 4.1.3.1)."""
    if not request_id:
        raise ValueError("QueryTokenStatus needs a request id")
    envelope, rst = _rst_envelope(
        to_url, message_id, username, password, REQUEST_TYPE_QUERY_TOKEN_STATUS
    )
    _sub(rst, WSTEP_NS, "RequestID", request_id, default_ns=True)
    return _serialize(envelope)


def _rst_envelope(
    to_url: str, message_id: str, username: str | None, password: str | None, request_type: str
) -> tuple[Any, Any]:
    envelope, body = _request_envelope(WSTEP_RST_ACTION, to_url, message_id, username, password)
    rst = _sub(body, WST_NS, "RequestSecurityToken", default_ns=True)
    _sub(rst, WST_NS, "TokenType", TOKEN_TYPE_X509V3)
    _sub(rst, WST_NS, "RequestType", request_type)
    return envelope, rst


def _request_envelope(
    action: str, to_url: str, message_id: str, username: str | None, password: str | None
) -> tuple[Any, Any]:
    if (username is None) != (password is None):
        raise ValueError("give both a username and a password, or neither")
    envelope = etree.Element(_q(SOAP12_NS, "Envelope"), nsmap={"s": SOAP12_NS, "a": WSA_NS})
    header = _sub(envelope, SOAP12_NS, "Header")
    _sub(header, WSA_NS, "Action", action).set(_q(SOAP12_NS, "mustUnderstand"), "1")
    _sub(header, WSA_NS, "MessageID", message_id)
    _sub(_sub(header, WSA_NS, "ReplyTo"), WSA_NS, "Address", WSA_ANONYMOUS)
    _sub(header, WSA_NS, "To", to_url).set(_q(SOAP12_NS, "mustUnderstand"), "1")
    if username is not None and password is not None:
        security = etree.SubElement(header, _q(WSSE_NS, "Security"), nsmap={"o": WSSE_NS})
        security.set(_q(SOAP12_NS, "mustUnderstand"), "1")
        token = _sub(security, WSSE_NS, "UsernameToken")
        _sub(token, WSSE_NS, "Username", username)
        _sub(token, WSSE_NS, "Password", password).set("Type", PASSWORD_TEXT)
    body = etree.SubElement(envelope, _q(SOAP12_NS, "Body"), nsmap={"xsi": XSI_NS, "xsd": XSD_NS})
    return envelope, body


# --- Client side: responses ---------------------------------------------------------------


@dataclass(frozen=True)
class RstrResult:
    """What a CES answered: an issued certificate, a pending request, or a fault."""

    status: Literal["issued", "pending", "fault"]
    certificate_der: bytes | None
    chain_der: bytes | None
    """The PKCS#7 (or CMC response) BinarySecurityToken, when sent."""
    request_id: str | None
    disposition_message: str | None
    fault_reason: str | None
    reference_uri: str | None = None
    """Where to poll a pending request (SecurityTokenReference/Reference URI)."""
    error_code: int | None = None
    """The fault's CertificateEnrollmentWSDetail ErrorCode (an HRESULT), if any."""


def parse_get_policies_response(body: bytes) -> tuple[list[PolicyTemplate], list[PolicyCA]]:
    """Templates and CAs of a GetPoliciesResponse; a fault in the Body raises it."""
    root = _parse_xml(body, MAX_SOAP_RESPONSE_BYTES)
    payload = _first_body_element(_split_envelope(root)[1])
    if payload.tag == _q(SOAP12_NS, "Fault"):
        raise _parse_fault(payload)
    if payload.tag != _q(XCEP_NS, "GetPoliciesResponse"):
        raise SoapFault("Receiver", None, "the Body is not a GetPoliciesResponse")
    oids: dict[int, PolicyOid] = {}
    for oid_element in _collection(payload, "oIDs", "oID"):
        oid = PolicyOid(
            value=_required(oid_element, "value"),
            group=_required_int(oid_element, "group"),
            oid_reference_id=_required_int(oid_element, "oIDReferenceID"),
            default_name=_optional_value(oid_element, XCEP_NS, "defaultName") or "",
        )
        oids[oid.oid_reference_id] = oid
    cas = [_parse_ca(ca) for ca in _collection(payload, "cAs", "cA")]
    response = _child(payload, XCEP_NS, "response")
    templates = []
    if response is not None and not _is_nil(response):
        templates = [_parse_policy(p, oids) for p in _collection(response, "policies", "policy")]
    return templates, cas


def _collection(parent: Any, name: str, item: str) -> list[Any]:
    element = _child(parent, XCEP_NS, name)
    if element is None or _is_nil(element):
        return []
    return list(element.findall(_q(XCEP_NS, item)))


def _parse_ca(element: Any) -> PolicyCA:
    uris = tuple(
        CaUri(
            uri=_required(uri, "uri"),
            client_authentication=_required_int(uri, "clientAuthentication"),
            priority=_optional_int(uri, XCEP_NS, "priority") or 0,
            renewal_only=_to_bool(
                _optional_value(uri, XCEP_NS, "renewalOnly") or "false", "renewalOnly"
            ),
        )
        for uri in _collection(element, "uris", "cAURI")
    )
    return _as_received(
        lambda: PolicyCA(
            uris=uris,
            certificate_der=_b64decode(_required(element, "certificate"), "a CA certificate"),
            enroll_permission=_to_bool(_required(element, "enrollPermission"), "enrollPermission"),
            ca_reference_id=_required_int(element, "cAReferenceID"),
        )
    )


def _parse_policy(policy: Any, oids: dict[int, PolicyOid]) -> PolicyTemplate:
    attributes = _child(policy, XCEP_NS, "attributes")
    if attributes is None:
        raise SoapFault("Receiver", None, "a policy has no attributes")
    reference = _required_int(policy, "policyOIDReference")
    template_oid = oids.get(reference)
    if template_oid is None:
        raise SoapFault("Receiver", None, f"policy OID reference {reference} is not in oIDs")
    validity = _section(attributes, "certificateValidity")
    permission = _section(attributes, "permission")
    key_attributes = _section(attributes, "privateKeyAttributes")
    revision = _section(attributes, "revision")
    ra = _child(attributes, XCEP_NS, "rARequirements")
    ekus: tuple[str, ...] = ()
    for extension in _collection(attributes, "extensions", "extension"):
        extension_oid = oids.get(_required_int(extension, "oIDReference"))
        value = _optional_value(extension, XCEP_NS, "value")
        if extension_oid is not None and extension_oid.value == _EXT_EKU[0] and value:
            try:
                syntax = asn1_x509.ExtKeyUsageSyntax.load(_b64decode(value, "the EKU extension"))
                ekus = tuple(str(purpose.dotted) for purpose in syntax)
            except ValueError:
                raise SoapFault("Receiver", None, "the EKU extension is not DER") from None
    return _as_received(
        lambda: PolicyTemplate(
            common_name=_required(attributes, "commonName"),
            display_name=template_oid.default_name,
            template_oid=template_oid.value,
            oid_reference=reference,
            schema_version=_required_int(attributes, "policySchema"),
            major_revision=_required_int(revision, "majorRevision"),
            minor_revision=_optional_int(revision, XCEP_NS, "minorRevision") or 0,
            validity_seconds=_required_int(validity, "validityPeriodSeconds"),
            renewal_seconds=_required_int(validity, "renewalPeriodSeconds"),
            key_spec=_optional_int(key_attributes, XCEP_NS, "keySpec") or 0,
            minimal_key_size=_required_int(key_attributes, "minimalKeyLength"),
            key_usage=_optional_int(key_attributes, XCEP_NS, "keyUsageProperty") or 0,
            algorithm_oid_reference=_optional_int(key_attributes, XCEP_NS, "algorithmOIDReference"),
            enrollment_flags=_optional_int(attributes, XCEP_NS, "enrollmentFlags") or 0,
            name_flags=_optional_int(attributes, XCEP_NS, "subjectNameFlags") or 0,
            private_key_flags=_optional_int(attributes, XCEP_NS, "privateKeyFlags") or 0,
            general_flags=_optional_int(attributes, XCEP_NS, "generalFlags") or 0,
            ra_signatures=(
                _optional_int(ra, XCEP_NS, "rASignatures") or 0
                if ra is not None and not _is_nil(ra)
                else 0
            ),
            ekus=ekus,
            permission_enroll=_to_bool(_required(permission, "enroll"), "enroll"),
            permission_autoenroll=_to_bool(_required(permission, "autoEnroll"), "autoEnroll"),
            ca_references=tuple(
                _to_int(_text(r), "cAReference") for r in _collection(policy, "cAs", "cAReference")
            ),
        )
    )


def _section(parent: Any, local: str) -> Any:
    element = _child(parent, XCEP_NS, local)
    if element is None or _is_nil(element):
        raise SoapFault("Receiver", None, f"{local} is missing")
    return element


def _as_received(build: Callable[[], _T]) -> _T:
    # A value the server sent that our dataclasses refuse is the server's fault.
    try:
        return build()
    except ValueError as error:
        raise SoapFault("Receiver", None, f"the response is invalid: {error}") from None


def parse_rstr(body: bytes) -> RstrResult:
    """Read a CES answer: an RSTRC (issued or pending) or a fault."""
    root = _parse_xml(body, MAX_SOAP_RESPONSE_BYTES)
    payload = _first_body_element(_split_envelope(root)[1])
    if payload.tag == _q(SOAP12_NS, "Fault"):
        fault = _parse_fault(payload)
        return RstrResult(
            status="fault",
            certificate_der=None,
            chain_der=None,
            request_id=fault.request_id,
            disposition_message=None,
            fault_reason=fault.reason,
            error_code=fault.hresult,
        )
    if payload.tag != _q(WST_NS, "RequestSecurityTokenResponseCollection"):
        raise SoapFault(
            "Receiver", None, "the Body is not a RequestSecurityTokenResponseCollection"
        )
    response = _child(payload, WST_NS, "RequestSecurityTokenResponse")
    if response is None:
        raise SoapFault("Receiver", None, "the collection holds no RequestSecurityTokenResponse")
    chain = _child(response, WSSE_NS, "BinarySecurityToken")
    certificate = reference_uri = None
    requested = _child(response, WST_NS, "RequestedSecurityToken")
    if requested is not None:
        token = _child(requested, WSSE_NS, "BinarySecurityToken")
        if token is not None:
            certificate = _b64decode(token.text or "", "the issued certificate")
        reference = requested.find(
            f"{_q(WSSE_NS, 'SecurityTokenReference')}/{_q(WSSE_NS, 'Reference')}"
        )
        if reference is not None:
            reference_uri = reference.get("URI")
    return RstrResult(
        status="issued" if certificate is not None else "pending",
        certificate_der=certificate,
        chain_der=_b64decode(chain.text or "", "the chain") if chain is not None else None,
        request_id=_optional_value(response, WSTEP_NS, "RequestID"),
        disposition_message=_optional_value(response, WSTEP_NS, "DispositionMessage"),
        fault_reason=None,
        reference_uri=reference_uri,
    )


# --- Small XML helpers --------------------------------------------------------------------


def _response_envelope(action: str, relates_to: str | None) -> tuple[Any, Any]:
    envelope = etree.Element(_q(SOAP12_NS, "Envelope"), nsmap={"s": SOAP12_NS, "a": WSA_NS})
    header = _sub(envelope, SOAP12_NS, "Header")
    _sub(header, WSA_NS, "Action", action).set(_q(SOAP12_NS, "mustUnderstand"), "1")
    if relates_to is not None:
        _sub(header, WSA_NS, "RelatesTo", relates_to)
    body = etree.SubElement(envelope, _q(SOAP12_NS, "Body"), nsmap={"xsi": XSI_NS, "xsd": XSD_NS})
    return envelope, body


def _sub(
    parent: Any, namespace: str, local: str, text: str | None = None, *, default_ns: bool = False
) -> Any:
    # default_ns declares the namespace as xmlns="..." on the element, as Windows writes it.
    element = etree.SubElement(
        parent, _q(namespace, local), nsmap={None: namespace} if default_ns else None
    )
    if text is not None:
        element.text = text
    return element


def _x(parent: Any, local: str, text: str | None = None) -> Any:
    return _sub(parent, XCEP_NS, local, text)


def _nil(parent: Any, namespace: str, local: str, *, default_ns: bool = False) -> Any:
    element = _sub(parent, namespace, local, default_ns=default_ns)
    element.set(_q(XSI_NS, "nil"), "true")
    return element


def _value_or_nil(parent: Any, namespace: str, local: str, value: str | None) -> Any:
    if value is None:
        return _nil(parent, namespace, local)
    return _sub(parent, namespace, local, value)


def _optional_str(value: int | None) -> str | None:
    return None if value is None else str(value)


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _b64(der: bytes) -> str:
    # One line: cepces re-wraps the text itself and would mangle CRLF-wrapped base64.
    return base64.b64encode(der).decode("ascii")


def _b64decode(text: str, what: str) -> bytes:
    # Windows wraps base64 with CRLF or spaces ([MS-WSTEP] 4.1); whitespace is not data.
    compact = "".join(text.split())
    if not compact:
        raise _sender(f"{what} is empty", SUBCODE_INVALID_REQUEST)
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise _sender(f"{what} is not valid base64", SUBCODE_INVALID_REQUEST) from None


def _optional_value(parent: Any, namespace: str, local: str) -> str | None:
    element = _child(parent, namespace, local)
    if element is None or _is_nil(element):
        return None
    return _text(element)


def _required(parent: Any, local: str) -> str:
    value = _optional_value(parent, XCEP_NS, local)
    if value is None:
        raise SoapFault("Receiver", None, f"{local} is missing")
    return value


def _optional_int(parent: Any, namespace: str, local: str) -> int | None:
    value = _optional_value(parent, namespace, local)
    return _to_int(value, local) if value else None


def _required_int(parent: Any, local: str) -> int:
    return _to_int(_required(parent, local), local)


def _to_int(value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise _sender(f"{what} is not an integer") from None


def _to_bool(value: str, what: str) -> bool:
    if value in ("true", "1"):
        return True
    if value in ("false", "0"):
        return False
    raise _sender(f"{what} is not an xs:boolean")


def _serialize(envelope: Any) -> bytes:
    # No XML declaration, as WCF answers: the Content-Type header carries the charset.
    return bytes(etree.tostring(envelope, encoding="utf-8", xml_declaration=False))
