"""Distinguished names, subject alternative names and name constraints."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID, ObjectIdentifier

from pkigate.core.der import tlv
from pkigate.core.errors import BadRequestError, PolicyViolationError

# Attribute names accepted in DN strings beyond cryptography's defaults (C, CN, DC, L, O,
# OU, ST, STREET, UID). Any other attribute can be given by dotted OID: "1.2.3.4=value".
DN_ATTRIBUTE_NAMES: dict[str, ObjectIdentifier] = {
    "serialNumber": NameOID.SERIAL_NUMBER,
    "SERIALNUMBER": NameOID.SERIAL_NUMBER,
    "title": NameOID.TITLE,
    "T": NameOID.TITLE,
    "givenName": NameOID.GIVEN_NAME,
    "GN": NameOID.GIVEN_NAME,
    "surname": NameOID.SURNAME,
    "SN": NameOID.SURNAME,
    "initials": NameOID.INITIALS,
    "pseudonym": NameOID.PSEUDONYM,
    "generationQualifier": NameOID.GENERATION_QUALIFIER,
    "emailAddress": NameOID.EMAIL_ADDRESS,
    "E": NameOID.EMAIL_ADDRESS,
    "localityName": NameOID.LOCALITY_NAME,
    "organizationName": NameOID.ORGANIZATION_NAME,
    "organizationalUnitName": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "commonName": NameOID.COMMON_NAME,
    "countryName": NameOID.COUNTRY_NAME,
    "stateOrProvinceName": NameOID.STATE_OR_PROVINCE_NAME,
}

# RFC 5280 upper bounds (Appendix A, ub-*) that validators and pkilint enforce.
_UPPER_BOUNDS = {
    NameOID.COMMON_NAME: 64,
    NameOID.ORGANIZATION_NAME: 64,
    NameOID.ORGANIZATIONAL_UNIT_NAME: 64,
    NameOID.LOCALITY_NAME: 128,
    NameOID.STATE_OR_PROVINCE_NAME: 128,
    NameOID.SERIAL_NUMBER: 64,
    NameOID.TITLE: 64,
    NameOID.EMAIL_ADDRESS: 255,
    NameOID.STREET_ADDRESS: 128,
    NameOID.POSTAL_CODE: 40,
    NameOID.DOMAIN_COMPONENT: 63,
}
_ANY_ATTRIBUTE_BOUND = 1024  # attributes without an upper bound of their own
# Attributes whose ASN.1 type is IA5String (ASCII) or PrintableString (RFC 5280 A.1,
# RFC 4519): a character outside the set cannot be encoded (or encodes as invalid DER).
_IA5_ATTRIBUTES = frozenset({NameOID.DOMAIN_COMPONENT, NameOID.EMAIL_ADDRESS})
_PRINTABLE_ATTRIBUTES = frozenset(
    {
        NameOID.COUNTRY_NAME,
        NameOID.JURISDICTION_COUNTRY_NAME,
        NameOID.SERIAL_NUMBER,
        NameOID.DN_QUALIFIER,
    }
)
_PRINTABLE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 '()+,-./:=?")

UPN_OID = ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")

_STRING_TYPES = frozenset(
    {
        _ASN1Type.UTF8String,
        _ASN1Type.PrintableString,
        _ASN1Type.T61String,
        _ASN1Type.UniversalString,
        _ASN1Type.BMPString,
        _ASN1Type.IA5String,
        _ASN1Type.VisibleString,
        _ASN1Type.NumericString,
    }
)


def parse_dn(text: str) -> x509.Name:
    """Parse an RFC 4514 distinguished name, with a clear error and RFC 5280 bounds checked."""
    if not text.strip():
        return x509.Name([])
    try:
        name = x509.Name.from_rfc4514_string(text, DN_ATTRIBUTE_NAMES)
    except ValueError as exc:
        raise BadRequestError(f"cannot parse distinguished name {text!r}: {exc}") from None
    check_dn(name)
    return name


def check_dn(name: x509.Name) -> None:
    for attribute in name:
        value = attribute.value
        if not isinstance(value, str):
            continue
        if attribute._type not in _STRING_TYPES:
            # cryptography reads a time or an OCTET STRING in a name as text, and a
            # certificate would carry it as received: found by the fuzzer (a CN of
            # GeneralizedTime was signed, and clients could not parse the certificate).
            raise BadRequestError(
                f"{attribute.oid._name} is a {attribute._type.name}, which is not a string "
                "type (X.520 DirectoryString, or IA5String or PrintableString)"
            )
        if not value:
            raise BadRequestError(f"empty value for {attribute.oid._name} in subject")
        if attribute.oid == NameOID.COUNTRY_NAME and (len(value) != 2 or not value.isalpha()):
            raise BadRequestError(f"country must be a two-letter code, got {value!r}")
        if attribute.oid in _IA5_ATTRIBUTES and not value.isascii():
            raise BadRequestError(f"{attribute.oid._name} must be ASCII, got {value!r}")
        if attribute.oid in _PRINTABLE_ATTRIBUTES and not set(value) <= _PRINTABLE:
            raise BadRequestError(
                f"{attribute.oid._name} takes letters, digits, spaces and '()+,-./:=? only, "
                f"got {value!r}"
            )
        limit = _UPPER_BOUNDS.get(attribute.oid, _ANY_ATTRIBUTE_BOUND)
        if len(value) > limit:
            raise BadRequestError(
                f"{attribute.oid._name} is {len(value)} characters; RFC 5280 allows {limit}"
            )


def format_dn(name: x509.Name) -> str:
    return name.rfc4514_string(
        {NameOID.SERIAL_NUMBER: "serialNumber", NameOID.EMAIL_ADDRESS: "emailAddress"}
    )


def format_general_name(name: x509.GeneralName) -> str:
    """One SAN as ``TYPE:value``, stable enough to search for in the store."""
    if isinstance(name, x509.DNSName):
        return f"DNS:{name.value}"
    if isinstance(name, x509.IPAddress):
        return f"IP:{name.value}"
    if isinstance(name, x509.RFC822Name):
        return f"email:{name.value}"
    if isinstance(name, x509.UniformResourceIdentifier):
        return f"URI:{name.value}"
    if isinstance(name, x509.DirectoryName):
        return f"dirName:{format_dn(name.value)}"
    if isinstance(name, x509.RegisteredID):
        return f"RID:{name.value.dotted_string}"
    if isinstance(name, x509.OtherName):
        if name.type_id == UPN_OID:
            return f"UPN:{decode_upn(name.value)}"
        return f"otherName:{name.type_id.dotted_string}"
    return repr(name)


def upn_other_name(upn: str) -> x509.OtherName:
    """The Microsoft UPN otherName: a UTF8String wrapped in the [0] EXPLICIT of otherName."""
    encoded = upn.encode()
    return x509.OtherName(UPN_OID, tlv(0x0C, encoded))


def decode_upn(value: bytes) -> str:
    if not value or value[0] != 0x0C:
        return value.hex()
    length, offset = _read_der_length(value, 1)
    return value[offset : offset + length].decode(errors="replace")


def _read_der_length(data: bytes, offset: int) -> tuple[int, int]:
    first = data[offset]
    if first < 0x80:
        return first, offset + 1
    count = first & 0x7F
    return int.from_bytes(data[offset + 1 : offset + 1 + count], "big"), offset + 1 + count


def _dns_within(name: str, suffix: str) -> bool:
    name, suffix = name.lower().rstrip("."), suffix.lower().rstrip(".")
    if suffix.startswith("."):
        return name.endswith(suffix)
    return name == suffix or name.endswith("." + suffix)


def _is_child_of(constraint: str, base: str) -> bool:
    """Whether the host ``constraint`` names (without a leading dot) is one label below
    ``base``: a name "*.base" matches."""
    if constraint.startswith("."):
        return False  # ".x": the subdomains of x, which "*.base" never matches as x itself
    host = constraint.lower().rstrip(".")
    return host.partition(".")[2] == base.lower().rstrip(".")


def _email_within(address: str, constraint: str) -> bool:
    constraint = constraint.lower()
    address = address.lower()
    if "@" in constraint:
        return address == constraint
    return _dns_within(address.rpartition("@")[2], constraint)


# The lists of a CA's configured name constraints (besides the flag allow_wildcards).
NAME_CONSTRAINT_LISTS = (
    "permitted_dns",
    "excluded_dns",
    "permitted_ip",
    "excluded_ip",
    "permitted_email",
    "excluded_email",
)


@dataclass(frozen=True)
class NamePolicy:
    """Which names a CA or template may certify (RFC 5280 4.2.1.10 semantics).

    An empty ``permitted_*`` list leaves that name type unconstrained; anything matching
    an ``excluded_*`` entry is refused. DNS entries match the domain and its subdomains
    (a leading dot: subdomains only). ``allow_wildcards`` governs ``*.`` DNS names.
    """

    permitted_dns: tuple[str, ...] = ()
    excluded_dns: tuple[str, ...] = ()
    permitted_ip: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    excluded_ip: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    permitted_email: tuple[str, ...] = ()
    excluded_email: tuple[str, ...] = ()
    allow_wildcards: bool = True
    source: str = field(default="policy", compare=False)
    # URIs are constrained by their host: "host.example" exactly, ".example" below it.
    permitted_uri: tuple[str, ...] = ()
    excluded_uri: tuple[str, ...] = ()
    # Directory names (the subject, and directoryName SANs) by RDN prefix.
    permitted_dirname: tuple[x509.Name, ...] = ()
    excluded_dirname: tuple[x509.Name, ...] = ()
    # Name types a CA certificate constrains that this policy cannot judge: names of
    # those types are refused (RFC 5280 4.2.1.10: such certificates must be rejected).
    unchecked: tuple[str, ...] = ()

    _SETTINGS_KEYS = frozenset({*NAME_CONSTRAINT_LISTS, "allow_wildcards"})

    @classmethod
    def from_settings(cls, settings: object, source: str) -> NamePolicy:
        if not isinstance(settings, dict):
            raise BadRequestError("name constraints are a JSON object")
        unknown = sorted(set(settings) - cls._SETTINGS_KEYS)
        if unknown:
            raise BadRequestError(
                f"unknown name constraint key(s) {', '.join(map(str, unknown))}; use "
                f"{', '.join(sorted(cls._SETTINGS_KEYS))}"
            )

        def strings(key: str) -> tuple[str, ...]:
            value = settings.get(key) or []
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise BadRequestError(f"name constraint {key} must be a list of strings")
            return tuple(value)

        try:
            return cls(
                permitted_dns=strings("permitted_dns"),
                excluded_dns=strings("excluded_dns"),
                permitted_ip=tuple(ipaddress.ip_network(v) for v in strings("permitted_ip")),
                excluded_ip=tuple(ipaddress.ip_network(v) for v in strings("excluded_ip")),
                permitted_email=strings("permitted_email"),
                excluded_email=strings("excluded_email"),
                allow_wildcards=bool(settings.get("allow_wildcards", True)),
                source=source,
            )
        except ValueError as exc:
            raise BadRequestError(f"bad IP range in name constraints: {exc}") from None

    def to_settings(self) -> dict[str, object]:
        return {
            "permitted_dns": list(self.permitted_dns),
            "excluded_dns": list(self.excluded_dns),
            "permitted_ip": [str(n) for n in self.permitted_ip],
            "excluded_ip": [str(n) for n in self.excluded_ip],
            "permitted_email": list(self.permitted_email),
            "excluded_email": list(self.excluded_email),
            "allow_wildcards": self.allow_wildcards,
        }

    @classmethod
    def from_extension(cls, ext: x509.NameConstraints, source: str) -> NamePolicy:
        unchecked: set[str] = set()

        def split(subtrees: Iterable[x509.GeneralName] | None) -> dict[str, tuple[Any, ...]]:
            found: dict[str, list[Any]] = {"dns": [], "ip": [], "email": [], "uri": [], "dir": []}
            for name in subtrees or ():
                if isinstance(name, x509.DNSName):
                    found["dns"].append(name.value)
                elif isinstance(name, x509.IPAddress) and not isinstance(
                    name.value, ipaddress.IPv4Address | ipaddress.IPv6Address
                ):
                    found["ip"].append(name.value)
                elif isinstance(name, x509.RFC822Name):
                    found["email"].append(name.value)
                elif isinstance(name, x509.UniformResourceIdentifier):
                    found["uri"].append(name.value)
                elif isinstance(name, x509.DirectoryName):
                    found["dir"].append(name.value)
                else:
                    unchecked.add(type(name).__name__)
            return {key: tuple(values) for key, values in found.items()}

        permitted, excluded = split(ext.permitted_subtrees), split(ext.excluded_subtrees)
        return cls(
            permitted_dns=permitted["dns"],
            excluded_dns=excluded["dns"],
            permitted_ip=permitted["ip"],
            excluded_ip=excluded["ip"],
            permitted_email=permitted["email"],
            excluded_email=excluded["email"],
            source=source,
            permitted_uri=permitted["uri"],
            excluded_uri=excluded["uri"],
            permitted_dirname=permitted["dir"],
            excluded_dirname=excluded["dir"],
            unchecked=tuple(sorted(unchecked)),
        )

    def to_extension(self) -> x509.NameConstraints | None:
        permitted: list[x509.GeneralName] = [
            *(x509.DNSName(d) for d in self.permitted_dns),
            *(x509.IPAddress(n) for n in self.permitted_ip),
            *(x509.RFC822Name(e) for e in self.permitted_email),
            *(x509.UniformResourceIdentifier(u) for u in self.permitted_uri),
            *(x509.DirectoryName(n) for n in self.permitted_dirname),
        ]
        excluded: list[x509.GeneralName] = [
            *(x509.DNSName(d) for d in self.excluded_dns),
            *(x509.IPAddress(n) for n in self.excluded_ip),
            *(x509.RFC822Name(e) for e in self.excluded_email),
            *(x509.UniformResourceIdentifier(u) for u in self.excluded_uri),
            *(x509.DirectoryName(n) for n in self.excluded_dirname),
        ]
        if not permitted and not excluded:
            return None
        return x509.NameConstraints(
            permitted_subtrees=permitted or None, excluded_subtrees=excluded or None
        )

    def check(self, subject: x509.Name, sans: Sequence[x509.GeneralName]) -> None:
        """Raise :class:`PolicyViolationError` naming the first name this policy forbids."""
        for name in sans:
            if isinstance(name, x509.DNSName):
                self._check_dns(name.value)
            elif isinstance(name, x509.IPAddress):
                self._check_ip(name.value)
            elif isinstance(name, x509.RFC822Name):
                self._check_email(name.value)
            elif isinstance(name, x509.UniformResourceIdentifier):
                self._check_uri(name.value)
            elif isinstance(name, x509.DirectoryName):
                self._check_dirname(name.value)
            if type(name).__name__ in self.unchecked:
                self._refuse(f"{type(name).__name__} alternative name", str(name))
        if len(subject):
            self._check_dirname(subject)
        # Relying parties that still read the CN as a host name apply constraints to it.
        for attribute in subject.get_attributes_for_oid(NameOID.COMMON_NAME):
            value = str(attribute.value)
            try:
                self._check_ip(ipaddress.ip_address(value))
            except ValueError:
                if _looks_like_dns(value):
                    self._check_dns(value)
        for attribute in subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS):
            self._check_email(str(attribute.value))

    def _refuse(self, kind: str, value: str) -> None:
        raise PolicyViolationError(f"{kind} {value!r} is not allowed by {self.source}")

    def _check_dns(self, value: str) -> None:
        wildcard = value.startswith("*.")
        if "*" in (value[2:] if wildcard else value):
            # "x*.example" matches like a wildcard in some clients: only "*." as the whole
            # leftmost label is a wildcard, and only where the policy allows one.
            self._refuse("DNS name with a partial wildcard", value)
        if wildcard and not self.allow_wildcards:
            self._refuse("wildcard DNS name", value)
        # "*.b" stands for every one-label child of b: it is checked as written (it lies
        # within a constraint exactly when all of them do), and it is refused as well when
        # an excluded host is one of them.
        base = value[2:] if wildcard else None
        for excluded in self.excluded_dns:
            covers = base is not None and _is_child_of(excluded, base)
            if _dns_within(value, excluded) or covers:
                self._refuse("DNS name", value)
        if self.permitted_dns and not any(_dns_within(value, s) for s in self.permitted_dns):
            self._refuse("DNS name", value)

    def _check_ip(self, value: object) -> None:
        if not isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return
        # ::ffff:10.1.2.3 is 10.1.2.3 to most stacks: checked in both forms.
        forms: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [value]
        if isinstance(value, ipaddress.IPv6Address) and value.ipv4_mapped is not None:
            forms.append(value.ipv4_mapped)

        def within(networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
            return any(a in n for a in forms for n in networks if n.version == a.version)

        if within(self.excluded_ip):
            self._refuse("IP address", str(value))
        if self.permitted_ip and not within(self.permitted_ip):
            self._refuse("IP address", str(value))

    def _check_uri(self, value: str) -> None:
        if not (self.permitted_uri or self.excluded_uri):
            return
        host = (urlsplit(value).hostname or "").rstrip(".")
        if not host:
            self._refuse("URI without a host", value)

        def within(constraint: str) -> bool:
            constraint = constraint.lower().rstrip(".")
            if constraint.startswith("."):
                return host.endswith(constraint)
            return host == constraint

        if any(within(c) for c in self.excluded_uri):
            self._refuse("URI", value)
        if self.permitted_uri and not any(within(c) for c in self.permitted_uri):
            self._refuse("URI", value)

    def _check_dirname(self, name: x509.Name) -> None:
        if not (self.permitted_dirname or self.excluded_dirname):
            return

        def within(base: x509.Name) -> bool:
            rdns, prefix = list(name.rdns), list(base.rdns)
            return len(prefix) <= len(rdns) and rdns[: len(prefix)] == prefix

        if any(within(base) for base in self.excluded_dirname):
            self._refuse("directory name", format_dn(name))
        if self.permitted_dirname and not any(within(base) for base in self.permitted_dirname):
            self._refuse("directory name", format_dn(name))

    def _check_email(self, value: str) -> None:
        constrained = self.excluded_email or self.permitted_email
        if constrained and ('"' in value or "\\" in value):
            # A quoted or escaped local part ("ceo"@x is ceo@x) defeats exact matching.
            self._refuse("email address with a quoted local part", value)
        if any(_email_within(value, c) for c in self.excluded_email):
            self._refuse("email address", value)
        if self.permitted_email and not any(_email_within(value, c) for c in self.permitted_email):
            self._refuse("email address", value)


def _looks_like_dns(value: str) -> bool:
    labels = value.rstrip(".").split(".")
    return len(labels) > 1 and all(
        label and all(ch.isalnum() or ch in "-*_" for ch in label) for label in labels
    )
