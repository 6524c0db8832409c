"""Order identifiers: what a client may ask for, in canonical form, and the private CA's
policy on which names it issues for.

DNS names (RFC 8555 7.1.4) are lower-cased LDH names, with a wildcard only as the whole
leftmost label; IP addresses (RFC 8738) are canonical (RFC 5952 for IPv6). A private CA
decides which names it vouches for: per connector, and narrower per EAB key, a list of DNS
suffixes and IP networks. Anything outside is ``rejectedIdentifier``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pkigate.acme.problems import AcmeProblem, Subproblem

MAX_IDENTIFIERS = 100
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")  # fullmatch: "$" would allow a "\n"


@dataclass(frozen=True, order=True)
class Identifier:
    type: str  # "dns" or "ip"
    value: str

    @property
    def wildcard(self) -> bool:
        return self.type == "dns" and self.value.startswith("*.")

    @property
    def base(self) -> str:
        """The name an authorization is for: a wildcard's base domain."""
        return self.value[2:] if self.wildcard else self.value

    def to_json(self) -> dict[str, str]:
        return {"type": self.type, "value": self.value}


def parse_identifier(item: object) -> Identifier:
    """One identifier object from a client, canonicalized, or ``malformed`` /
    ``unsupportedIdentifier`` / ``rejectedIdentifier``."""
    if not isinstance(item, Mapping) or set(item) - {"type", "value"}:
        raise AcmeProblem("malformed", "an identifier is an object with 'type' and 'value'")
    kind, value = item.get("type"), item.get("value")
    if not isinstance(kind, str) or not isinstance(value, str):
        raise AcmeProblem("malformed", "identifier 'type' and 'value' must be strings")
    if kind == "dns":
        return Identifier("dns", _dns_name(value))
    if kind == "ip":
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            raise AcmeProblem(
                "malformed", f"{value[:64]!r} is not an IP address", subproblems=()
            ) from None
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
            # A zone names a link of the validator's host, not an address a certificate
            # can carry: "::1%1" and "::1%01" would be two spellings of one identifier.
            raise AcmeProblem(
                "rejectedIdentifier", f"{value[:64]!r}: an IPv6 zone is not part of an address"
            )
        return Identifier("ip", address.compressed)
    raise AcmeProblem("unsupportedIdentifier", f"identifier type {kind[:32]!r} is not supported")


def _dns_name(value: str) -> str:
    name = value.lower()
    if name.endswith("."):
        raise AcmeProblem("rejectedIdentifier", f"{value[:64]!r}: no trailing dot, please")
    labels = name.split(".")
    wildcard = labels[0] == "*"
    body = labels[1:] if wildcard else labels
    if len(name) > 253 or len(body) < 2:
        raise AcmeProblem(
            "rejectedIdentifier", f"{value[:64]!r} is not a fully qualified domain name"
        )
    if any("*" in label for label in body):
        raise AcmeProblem(
            "rejectedIdentifier", f"{value[:64]!r}: a wildcard may only be the leftmost label"
        )
    if not all(_LABEL.fullmatch(label) for label in body):
        raise AcmeProblem(
            "rejectedIdentifier",
            f"{value[:64]!r} is not a valid DNS name (letters, digits and hyphens; "
            "IDNs in their xn-- form)",
        )
    try:
        ipaddress.ip_address(name)
    except ValueError:
        pass
    else:
        raise AcmeProblem("malformed", f"{value!r} is an IP address: use type 'ip'")
    if body[-1].isdigit():
        raise AcmeProblem("rejectedIdentifier", f"{value[:64]!r}: the top-level label is numeric")
    return name


def parse_identifiers(items: object) -> tuple[Identifier, ...]:
    """The order's identifiers, canonical and without duplicates, in the client's order."""
    if not isinstance(items, list) or not items:
        raise AcmeProblem("malformed", "'identifiers' must be a non-empty array")
    if len(items) > MAX_IDENTIFIERS:
        raise AcmeProblem("rejectedIdentifier", f"at most {MAX_IDENTIFIERS} identifiers per order")
    parsed: list[Identifier] = []
    failures: list[Subproblem] = []
    for item in items:
        try:
            parsed.append(parse_identifier(item))
        except AcmeProblem as problem:
            raw = item if isinstance(item, Mapping) else {}
            failures.append(
                Subproblem(
                    problem.type,
                    problem.detail,
                    {
                        "type": str(raw.get("type", ""))[:32],
                        "value": str(raw.get("value", ""))[:256],
                    },
                )
            )
    if failures:
        if len(failures) == 1 and len(items) == 1:
            raise AcmeProblem(failures[0].type, failures[0].detail, subproblems=tuple(failures))
        raise AcmeProblem(
            "compound" if len({f.type for f in failures}) > 1 else failures[0].type,
            f"{len(failures)} of the identifiers cannot be accepted",
            status=400,
            subproblems=tuple(failures),
        )
    return tuple(dict.fromkeys(parsed))


@dataclass(frozen=True)
class IdentifierPolicy:
    """Which identifiers may be requested. Empty tuples for both means: any."""

    dns_suffixes: tuple[str, ...] = ()
    ip_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @property
    def unrestricted(self) -> bool:
        return not self.dns_suffixes and not self.ip_networks

    @classmethod
    def parse(cls, data: Mapping[str, Any] | None, where: str) -> IdentifierPolicy:
        """From ``{"dns_suffixes": [...], "ip_networks": [...]}``; ValueError names the
        member at fault."""
        if data is None:
            return cls()
        unknown = set(data) - {"dns_suffixes", "ip_networks"}
        if unknown:
            raise ValueError(f"{where}: unknown member {sorted(unknown)[0]!r}")
        suffixes = data.get("dns_suffixes") or []
        networks = data.get("ip_networks") or []
        if not isinstance(suffixes, list) or not all(isinstance(s, str) for s in suffixes):
            raise ValueError(f"{where}.dns_suffixes: a list of domain names")
        if not isinstance(networks, list) or not all(isinstance(n, str) for n in networks):
            raise ValueError(f"{where}.ip_networks: a list of CIDR networks")
        canonical: list[str] = []
        for suffix in suffixes:
            bare = suffix.lower().removeprefix("*.").removeprefix(".")
            try:
                canonical.append(_dns_name(bare) if "." in bare else bare)
            except AcmeProblem as problem:
                raise ValueError(f"{where}.dns_suffixes: {problem.detail}") from None
            if not _LABEL.fullmatch(bare.split(".")[-1]):
                raise ValueError(f"{where}.dns_suffixes: {suffix!r} is not a domain name")
        try:
            parsed_networks = tuple(ipaddress.ip_network(n, strict=True) for n in networks)
        except ValueError as exc:
            raise ValueError(f"{where}.ip_networks: {exc}") from None
        return cls(tuple(canonical), parsed_networks)

    def to_json(self) -> dict[str, list[str]]:
        return {
            "dns_suffixes": list(self.dns_suffixes),
            "ip_networks": [str(n) for n in self.ip_networks],
        }

    def allows(self, identifier: Identifier) -> bool:
        if self.unrestricted:
            return True
        if identifier.type == "dns":
            name = identifier.base
            return any(name == s or name.endswith("." + s) for s in self.dns_suffixes)
        address = ipaddress.ip_address(identifier.value)
        return any(address in network for network in self.ip_networks)


def check_policy(identifiers: Iterable[Identifier], policies: Sequence[IdentifierPolicy]) -> None:
    """Every identifier must be allowed by every policy (the connector's, the EAB key's)."""
    refused = [
        Subproblem(
            "rejectedIdentifier",
            f"this CA does not issue for {i.value}",
            i.to_json(),
        )
        for i in identifiers
        if not all(policy.allows(i) for policy in policies)
    ]
    if refused:
        names = ", ".join(s.identifier["value"] for s in refused[:5])
        raise AcmeProblem(
            "rejectedIdentifier",
            f"this CA's policy does not allow {names}",
            subproblems=tuple(refused),
        )
