"""API passthrough: names and extensions an authorizer supplies for a certificate.

A front-end (or an operator through the API/CLI) passes these when the template allows
API passthrough. They are typed values; :func:`parse_api_passthrough` turns the JSON
shape used by the CLI and the management API into them, naming the field that is wrong.

JSON shape::

    {"subject": "CN=host.example,O=Example" | [{"oid": "2.5.4.3", "value": "host"}],
     "sans": [{"dns": "a.example"}, {"ip": "192.0.2.1"}, {"email": "a@example"},
              {"uri": "https://example"}, {"directory_name": "CN=x"},
              {"upn": "user@example.com"},
              {"other_name": {"oid": "1.2.3", "value": "<base64 DER>"}},
              {"registered_id": "1.2.3"}],
     "key_usage": ["digitalSignature", "keyEncipherment"],
     "extended_key_usage": ["serverAuth", "1.3.6.1.5.5.7.3.2"],
     "certificate_policies": [{"oid": "2.23.140.1.2.1", "cps_uri": "https://...",
                               "user_notice": "text"}],
     "custom_extensions": [{"oid": "1.2.3.4", "value": "<base64 DER>", "critical": false}]}
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from asn1crypto import core as asn1_core
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier

from pkigate.core.errors import BadRequestError
from pkigate.core.names import check_dn, parse_dn, upn_other_name

KEY_USAGE_NAMES = (
    "digitalSignature",
    "contentCommitment",
    "keyEncipherment",
    "dataEncipherment",
    "keyAgreement",
    "keyCertSign",
    "cRLSign",
    "encipherOnly",
    "decipherOnly",
)
_KEY_USAGE_ALIASES = {"nonRepudiation": "contentCommitment"}

EKU_NAMES: dict[str, ObjectIdentifier] = {
    "serverAuth": ExtendedKeyUsageOID.SERVER_AUTH,
    "clientAuth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "codeSigning": ExtendedKeyUsageOID.CODE_SIGNING,
    "emailProtection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "timeStamping": ExtendedKeyUsageOID.TIME_STAMPING,
    "OCSPSigning": ExtendedKeyUsageOID.OCSP_SIGNING,
    "anyExtendedKeyUsage": ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
    "smartcardLogon": ObjectIdentifier("1.3.6.1.4.1.311.20.2.2"),
    "documentSigning": ObjectIdentifier("1.3.6.1.5.5.7.3.36"),
    "ipsecIKE": ExtendedKeyUsageOID.IPSEC_IKE,
    "kerberosPKINITKDC": ExtendedKeyUsageOID.KERBEROS_PKINIT_KDC,
}


@dataclass(frozen=True)
class CustomExtension:
    oid: ObjectIdentifier
    value: bytes
    critical: bool = False


@dataclass(frozen=True)
class PolicyInformation:
    oid: ObjectIdentifier
    cps_uri: str | None = None
    user_notice: str | None = None

    def to_x509(self) -> x509.PolicyInformation:
        qualifiers: list[str | x509.UserNotice] = []
        if self.cps_uri:
            qualifiers.append(self.cps_uri)
        if self.user_notice:
            qualifiers.append(x509.UserNotice(None, self.user_notice))
        return x509.PolicyInformation(self.oid, qualifiers or None)


@dataclass(frozen=True)
class ApiPassthrough:
    """Names and extensions supplied by the authorizer; ``None`` means "not supplied"."""

    subject: x509.Name | None = None
    sans: tuple[x509.GeneralName, ...] | None = None
    key_usage: frozenset[str] | None = None
    extended_key_usage: tuple[ObjectIdentifier, ...] | None = None
    certificate_policies: tuple[PolicyInformation, ...] | None = None
    custom_extensions: tuple[CustomExtension, ...] = ()


def parse_oid(value: object, where: str) -> ObjectIdentifier:
    if not isinstance(value, str):
        raise BadRequestError(f"{where}: expected a dotted OID string")
    try:
        return ObjectIdentifier(value)
    except ValueError:
        raise BadRequestError(f"{where}: {value!r} is not a dotted OID") from None


def _b64(value: object, where: str) -> bytes:
    if not isinstance(value, str):
        raise BadRequestError(f"{where}: expected base64 text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequestError(f"{where}: not valid base64") from None


def _str(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise BadRequestError(f"{where}: expected a non-empty string")
    return value


def parse_key_usage(values: object, where: str = "key_usage") -> frozenset[str]:
    if not isinstance(values, list):
        raise BadRequestError(f"{where}: expected a list of key usage names")
    usages = set()
    for value in values:
        name = _KEY_USAGE_ALIASES.get(str(value), str(value))
        if name not in KEY_USAGE_NAMES:
            raise BadRequestError(
                f"{where}: unknown key usage {value!r}; expected {', '.join(KEY_USAGE_NAMES)}"
            )
        usages.add(name)
    return frozenset(usages)


def parse_eku(values: object, where: str = "extended_key_usage") -> tuple[ObjectIdentifier, ...]:
    if not isinstance(values, list):
        raise BadRequestError(f"{where}: expected a list of names or OIDs")
    return tuple(
        EKU_NAMES[v] if isinstance(v, str) and v in EKU_NAMES else parse_oid(v, f"{where}[{i}]")
        for i, v in enumerate(values)
    )


def parse_general_name(entry: object, where: str) -> x509.GeneralName:
    if not isinstance(entry, Mapping) or len(entry) != 1:
        raise BadRequestError(f"{where}: expected an object with exactly one name type")
    ((kind, value),) = entry.items()
    try:
        if kind == "dns":
            return x509.DNSName(_str(value, where))
        if kind == "ip":
            return x509.IPAddress(ipaddress.ip_address(_str(value, where)))
        if kind == "email":
            return x509.RFC822Name(_str(value, where))
        if kind == "uri":
            return x509.UniformResourceIdentifier(_str(value, where))
        if kind == "directory_name":
            return x509.DirectoryName(parse_dn(_str(value, where)))
        if kind == "upn":
            return upn_other_name(_str(value, where))
        if kind == "registered_id":
            return x509.RegisteredID(parse_oid(value, where))
        if kind == "other_name":
            if not isinstance(value, Mapping):
                raise BadRequestError(f"{where}: other_name needs oid and value")
            return x509.OtherName(
                parse_oid(value.get("oid"), f"{where}.oid"),
                _one_der_value(_b64(value.get("value"), f"{where}.value"), f"{where}.value"),
            )
    except ValueError as exc:
        raise BadRequestError(f"{where}: {exc}") from None
    raise BadRequestError(
        f"{where}: unknown name type {kind!r}; expected dns, ip, email, uri, directory_name, "
        "upn, other_name or registered_id"
    )


def _subject(value: object) -> x509.Name:
    if isinstance(value, str):
        return parse_dn(value)
    if not isinstance(value, list):
        raise BadRequestError("subject: expected a DN string or a list of {oid, value}")
    attributes = []
    for index, item in enumerate(value):
        if not isinstance(item, Mapping):
            raise BadRequestError(f"subject[{index}]: expected {{oid, value}}")
        oid = parse_oid(item.get("oid"), f"subject[{index}].oid")
        try:
            attributes.append(
                x509.NameAttribute(oid, _str(item.get("value"), f"subject[{index}].value"))
            )
        except ValueError as exc:
            raise BadRequestError(f"subject[{index}]: {exc}") from None
    name = x509.Name(attributes)
    check_dn(name)
    return name


_FIELDS = {
    "subject",
    "sans",
    "key_usage",
    "extended_key_usage",
    "certificate_policies",
    "custom_extensions",
}


def _policy(item: object, where: str) -> PolicyInformation:
    if not isinstance(item, Mapping):
        raise BadRequestError(f"{where}: expected an object with oid, cps_uri, user_notice")
    cps_uri, notice = item.get("cps_uri"), item.get("user_notice")
    # RFC 5280 4.2.1.4: the CPS pointer is an IA5String (ASCII); an explicit text at
    # most 200 characters.
    if cps_uri is not None and (not isinstance(cps_uri, str) or not cps_uri.isascii()):
        raise BadRequestError(f"{where}.cps_uri: expected an ASCII URI")
    if notice is not None and (not isinstance(notice, str) or not 0 < len(notice) <= 200):
        raise BadRequestError(f"{where}.user_notice: expected text of 1 to 200 characters")
    return PolicyInformation(parse_oid(item.get("oid"), f"{where}.oid"), cps_uri, notice)


def _flag(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequestError(f"{where}: expected true or false")
    return value


def _one_der_value(data: bytes, where: str) -> bytes:
    """An otherName value must be exactly one DER element (the certificate builder parses
    it, and refuses anything else only when signing)."""
    try:
        parsed = asn1_core.Asn1Value.load(data, strict=True)
    except (ValueError, TypeError):
        raise BadRequestError(f"{where}: expected one DER-encoded value") from None
    if parsed.dump() != data:
        raise BadRequestError(f"{where}: expected one DER-encoded value")
    return data


def parse_api_passthrough(data: object) -> ApiPassthrough:
    """Parse the JSON shape in this module's docstring, refusing unknown fields."""
    if not isinstance(data, Mapping):
        raise BadRequestError("api_passthrough: expected a JSON object")
    unknown = set(data) - _FIELDS
    if unknown:
        raise BadRequestError(f"api_passthrough: unknown field(s) {', '.join(sorted(unknown))}")
    policies = None
    if "certificate_policies" in data:
        raw = data["certificate_policies"]
        if not isinstance(raw, list):
            raise BadRequestError("certificate_policies: expected a list")
        policies = tuple(_policy(p, f"certificate_policies[{i}]") for i, p in enumerate(raw))
    customs: list[CustomExtension] = []
    for i, item in enumerate(data.get("custom_extensions") or []):
        if not isinstance(item, Mapping):
            raise BadRequestError(f"custom_extensions[{i}]: expected an object")
        customs.append(
            CustomExtension(
                parse_oid(item.get("oid"), f"custom_extensions[{i}].oid"),
                _b64(item.get("value"), f"custom_extensions[{i}].value"),
                _flag(item.get("critical", False), f"custom_extensions[{i}].critical"),
            )
        )
    sans_raw: Any = data.get("sans")
    if sans_raw is not None and not isinstance(sans_raw, list):
        raise BadRequestError("sans: expected a list")
    return ApiPassthrough(
        subject=_subject(data["subject"]) if "subject" in data else None,
        sans=tuple(parse_general_name(e, f"sans[{i}]") for i, e in enumerate(sans_raw))
        if sans_raw is not None
        else None,
        key_usage=parse_key_usage(data["key_usage"]) if "key_usage" in data else None,
        extended_key_usage=parse_eku(data["extended_key_usage"])
        if "extended_key_usage" in data
        else None,
        certificate_policies=policies,
        custom_extensions=tuple(customs),
    )
