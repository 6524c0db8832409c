"""Who may do what with a CA: teams, ownership and per-CA policies, decided here for every
front-end (the management API, the console, the connectors' management calls).

A CA is owned by one team. Tokens of the owning team act on it as they always did,
unless a statement of its policy names one of them: that token is then confined to the
statements that name it (how an owner limits one of its own tokens, like an IAM condition
key). Everyone else is refused unless a statement names their team or token and allows the
action under its conditions. Every refusal says why, in words an operator can act on.

A policy document (JSON)::

    {"statements": [{
        "id": "share-web",
        "principal": {"team": "b"},            # or {"token": "<token id>"}
        "actions": ["issue", "read"],
        "conditions": {                         # every key optional; all must hold
            "templates": ["EndEntityServerAuthCertificate/V1"],
            "dns_suffixes": [".web.a.example"], # ".x" names below x; "x": x and below
            "ip_ranges": ["10.1.0.0/16"],
            "email_domains": ["a.example"],     # same suffix rules as DNS
            "upn_suffixes": ["corp.a.example"],
            "max_validity_days": 90,
            "connectors": ["api"]}}]}

Name conditions cover what may appear in the subject (its commonName and emailAddress
values) and in the SANs: once a statement has any of them, every name must match a
pattern of its own kind, and a kind the statement lists no pattern for is refused.
A wildcard ``*.x.example`` is a name below ``x.example`` (the ``*`` is one label), so
``.x.example`` allows it and ``.y.x.example`` does not.

Nothing here touches the store or a web framework: :func:`parse_policy` turns untrusted
JSON into a :class:`Policy` (or a :class:`PolicyDocumentError` naming the failing path),
and :func:`decide` is a pure function of its facts.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from pkigate.core.errors import BadRequestError, NotAuthorizedError
from pkigate.core.names import UPN_OID, decode_upn

DEFAULT_TEAM = "default"
TEAM_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MAX_STATEMENTS = 100
MAX_LIST_ITEMS = 100
MAX_STRING = 253  # a DNS name's length (RFC 1035 2.3.4); ample for every other pattern
MAX_VALIDITY_DAYS = 36_500
_STATEMENT_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_TOKEN_ID = re.compile(r"^[0-9a-f]{16}$")
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")  # fullmatch


class Action(StrEnum):
    ISSUE = "issue"
    REVOKE = "revoke"
    READ = "read"
    APPROVE_PENDING = "approve-pending"
    MANAGE = "manage"


class PolicyDocumentError(BadRequestError):
    """A policy document that does not follow the schema; the message names the path."""

    code = "badPolicy"


class AccessDeniedError(NotAuthorizedError):
    """The CA's owner and policy do not allow this principal this action (HTTP 403)."""

    code = "accessDenied"


# -- documents -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Conditions:
    """What a statement's allowance is limited to; None: not limited by this."""

    templates: frozenset[str] | None = None
    dns_suffixes: tuple[str, ...] | None = None
    ip_ranges: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None = None
    email_domains: tuple[str, ...] | None = None
    upn_suffixes: tuple[str, ...] | None = None
    max_validity_days: int | None = None
    connectors: frozenset[str] | None = None

    @property
    def limits_names(self) -> bool:
        return any(
            v is not None
            for v in (self.dns_suffixes, self.ip_ranges, self.email_domains, self.upn_suffixes)
        )

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        if self.templates is not None:
            data["templates"] = sorted(self.templates)
        for key in ("dns_suffixes", "email_domains", "upn_suffixes"):
            if getattr(self, key) is not None:
                data[key] = list(getattr(self, key))
        if self.ip_ranges is not None:
            data["ip_ranges"] = [str(n) for n in self.ip_ranges]
        if self.max_validity_days is not None:
            data["max_validity_days"] = self.max_validity_days
        if self.connectors is not None:
            data["connectors"] = sorted(self.connectors)
        return data


@dataclass(frozen=True)
class Statement:
    id: str
    actions: frozenset[Action]
    team: str | None = None  # exactly one of team and token
    token: str | None = None
    conditions: Conditions = field(default_factory=Conditions)

    @property
    def principal_text(self) -> str:
        return f"team {self.team}" if self.team is not None else f"token {self.token}"

    def to_json(self) -> dict[str, Any]:
        principal = {"team": self.team} if self.team is not None else {"token": self.token}
        return {
            "id": self.id,
            "principal": principal,
            "actions": sorted(a.value for a in self.actions),
            "conditions": self.conditions.to_json(),
        }


@dataclass(frozen=True)
class Policy:
    statements: tuple[Statement, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"statements": [s.to_json() for s in self.statements]}


def _fail(path: str, message: str) -> PolicyDocumentError:
    return PolicyDocumentError(f"policy {path}: {message}")


def _object(
    value: Any, path: str, allowed: Iterable[str], required: Iterable[str] = ()
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(path, "must be an object")
    allowed = tuple(allowed)
    for key in value:
        if not isinstance(key, str) or key not in allowed:
            raise _fail(f"{path}.{key}", f"unknown key; allowed: {', '.join(allowed)}")
    for key in required:
        if key not in value:
            raise _fail(f"{path}.{key}", "is required")
    return value


def _string(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise _fail(path, "must be a string")
    if not 1 <= len(value) <= MAX_STRING:
        raise _fail(path, f"must be 1 to {MAX_STRING} characters")
    if not value.isprintable():
        raise _fail(path, "must be printable text")
    return value


def _list(value: Any, path: str, item: Callable[[Any, str], Any]) -> tuple[Any, ...]:
    if not isinstance(value, list):
        raise _fail(path, "must be an array")
    if not 1 <= len(value) <= MAX_LIST_ITEMS:
        raise _fail(path, f"must hold 1 to {MAX_LIST_ITEMS} items")
    return tuple(item(entry, f"{path}[{index}]") for index, entry in enumerate(value))


def _domain_suffix(value: Any, path: str) -> str:
    """``.x.example`` (names below x.example) or ``x.example`` (it and names below)."""
    text = _string(value, path).lower()
    labels = text.removeprefix(".").split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise _fail(path, f"{value!r} is not a domain name (a leading '.' means below it)")
    return text


def _ip_range(value: Any, path: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    text = _string(value, path)
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise _fail(path, f"{text!r} is not a CIDR range: {exc}") from None


def _action(value: Any, path: str) -> Action:
    try:
        return Action(_string(value, path))
    except ValueError:
        raise _fail(path, f"{value!r} is not an action; one of {', '.join(Action)}") from None


def _conditions(value: Any, path: str) -> Conditions:
    data = _object(value, path, Conditions.__dataclass_fields__)
    days = data.get("max_validity_days")
    if days is not None and (
        not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= MAX_VALIDITY_DAYS
    ):
        raise _fail(f"{path}.max_validity_days", f"must be an integer 1 to {MAX_VALIDITY_DAYS}")

    def optional(key: str, item: Callable[[Any, str], Any]) -> tuple[Any, ...] | None:
        return _list(data[key], f"{path}.{key}", item) if key in data else None

    templates = optional("templates", _string)
    connectors = optional("connectors", _string)
    return Conditions(
        templates=frozenset(templates) if templates is not None else None,
        dns_suffixes=optional("dns_suffixes", _domain_suffix),
        ip_ranges=optional("ip_ranges", _ip_range),
        email_domains=optional("email_domains", _domain_suffix),
        upn_suffixes=optional("upn_suffixes", _domain_suffix),
        max_validity_days=days,
        connectors=frozenset(connectors) if connectors is not None else None,
    )


def _statement(value: Any, path: str) -> Statement:
    data = _object(
        value, path, ("id", "principal", "actions", "conditions"), ("id", "principal", "actions")
    )
    statement_id = _string(data["id"], f"{path}.id")
    if not _STATEMENT_ID.match(statement_id):
        raise _fail(f"{path}.id", "must be 1 to 64 letters, digits, '.', '_' or '-'")
    principal = _object(data["principal"], f"{path}.principal", ("team", "token"))
    if len(principal) != 1:
        raise _fail(f"{path}.principal", "names exactly one of team and token")
    team = token = None
    if "team" in principal:
        team = _string(principal["team"], f"{path}.principal.team")
        if not TEAM_NAME.match(team):
            raise _fail(f"{path}.principal.team", f"{team!r} is not a team name")
    else:
        token = _string(principal["token"], f"{path}.principal.token")
        if not _TOKEN_ID.match(token):
            raise _fail(f"{path}.principal.token", "must be a token id (16 hex digits)")
    actions = frozenset(_list(data["actions"], f"{path}.actions", _action))
    conditions = _conditions(data.get("conditions", {}), f"{path}.conditions")
    return Statement(statement_id, actions, team, token, conditions)


def parse_policy(document: Any) -> Policy:
    """A policy from untrusted JSON, checked strictly: an unknown key, a wrong type, a bad
    pattern or too many items is a :class:`PolicyDocumentError` naming its path."""
    data = _object(document, "document", ("statements",), ("statements",))
    statements = data["statements"]
    if not isinstance(statements, list):
        raise _fail("statements", "must be an array")
    if len(statements) > MAX_STATEMENTS:
        raise _fail("statements", f"holds at most {MAX_STATEMENTS} statements")
    parsed = tuple(_statement(s, f"statements[{i}]") for i, s in enumerate(statements))
    seen: set[str] = set()
    for index, statement in enumerate(parsed):
        if statement.id in seen:
            raise _fail(f"statements[{index}].id", f"{statement.id!r} is used twice")
        seen.add(statement.id)
    return Policy(parsed)


# -- decisions -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PrincipalFacts:
    """Who asks: a token of a team. Device enrollments (no token) are not decided here:
    they act under the CA owner's authority, within their connector's own checks."""

    token_id: str
    team: str


@dataclass(frozen=True)
class CAFacts:
    ca_id: str
    team: str  # the owner
    policy: Policy = field(default_factory=Policy)


@dataclass(frozen=True)
class RequestFacts:
    """What the action is about; a fact left None is not constrained by conditions."""

    template: str | None = None
    subject: x509.Name | None = None
    sans: Sequence[x509.GeneralName] = ()
    validity: timedelta | None = None
    connector: str | None = None
    # The names facts are present (an issuance or a stored certificate), even if empty.
    has_names: bool = False


def held_request_facts(
    csr: x509.CertificateSigningRequest,
    *,
    template: str,
    connector: str,
    validity: timedelta | None = None,
    subject: x509.Name | None = None,
    sans: Sequence[x509.GeneralName] | None = None,
) -> RequestFacts:
    """The facts of a request held for approval, so that approving or rejecting it is
    decided on what it would certify, as issuing it would be: its template and the names
    its certificate would carry (``subject`` and ``sans`` when the connector supplies them,
    the CSR's otherwise). Without them, a team allowed to approve ``.b.example`` only could
    approve anyone's held request on that connector."""
    if subject is None:
        subject = csr.subject
    if sans is None:
        try:
            sans = list(csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        except x509.ExtensionNotFound:
            sans = []
        except ValueError:
            # Names that cannot be read cannot be matched: only a statement without name
            # conditions allows it.
            sans = [x509.UniformResourceIdentifier("unreadable:")]
    return RequestFacts(template, subject, tuple(sans), validity, connector, has_names=True)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    statement_id: str | None = None  # None with allowed: the owner's implicit authority

    def audit_json(self) -> dict[str, Any]:
        return {"allowed": self.allowed, "reason": self.reason, "statement": self.statement_id}


def decide(
    principal: PrincipalFacts, action: Action, ca: CAFacts, request: RequestFacts | None = None
) -> Decision:
    """Whether ``principal`` may do ``action`` on ``ca``: the owner's tokens may (unless a
    statement names the token: then only its statements count), others only as a statement
    allows; deny by default, with the reason."""
    request = request or RequestFacts()
    owner = principal.team == ca.team
    confined = [s for s in ca.policy.statements if s.token == principal.token_id]
    if owner and not confined:
        return Decision(True, f"team {principal.team} owns CA {ca.ca_id}")
    statements = confined or [s for s in ca.policy.statements if s.team == principal.team]
    if not statements:
        return Decision(False, f"CA {ca.ca_id} is not shared with team {principal.team}")
    who = f"token {principal.token_id}" if confined else f"team {principal.team}"
    acting = [s for s in statements if action in s.actions]
    if not acting:
        allowed = sorted({a.value for s in statements for a in s.actions})
        return Decision(
            False,
            f"{who} may not {action.value} on CA {ca.ca_id} (its statements allow "
            f"{', '.join(allowed)})",
        )
    refusals = []
    for statement in acting:
        problem = _unmet_condition(statement, request)
        if problem is None:
            return Decision(True, f"statement {statement.id} allows {who}", statement.id)
        refusals.append(f"{problem} (statement {statement.id})")
    return Decision(False, "; ".join(refusals))


def visible(principal: PrincipalFacts, ca: CAFacts) -> bool:
    """Whether the CA appears to the principal at all: its owner's unconfined tokens, and
    principals some statement names (otherwise it answers as if it did not exist)."""
    if principal.team == ca.team and not any(
        s.token == principal.token_id for s in ca.policy.statements
    ):
        return True
    return any(
        s.token == principal.token_id or s.team == principal.team for s in ca.policy.statements
    )


def _unmet_condition(statement: Statement, request: RequestFacts) -> str | None:
    conditions = statement.conditions
    whom = statement.principal_text
    connector, template, validity = request.connector, request.template, request.validity
    if conditions.connectors is not None and connector not in (None, *conditions.connectors):
        return f"connector {connector} is not allowed for {whom}"
    if conditions.templates is not None and template not in (None, *conditions.templates):
        return f"template {template} is not shared with {whom}"
    days = conditions.max_validity_days
    if days is not None and validity is not None and validity > timedelta(days=days):
        return f"a validity of {_days(validity)} days exceeds the {days} days allowed to {whom}"
    if conditions.limits_names and request.has_names:
        for kind, value in _names(request.subject, request.sans):
            problem = _unmatched_name(conditions, kind, value)
            if problem is not None:
                return problem
    return None


def _days(span: timedelta) -> str:
    return f"{span.total_seconds() / 86400:.4g}"


def _names(subject: x509.Name | None, sans: Sequence[x509.GeneralName]) -> list[tuple[str, Any]]:
    """(kind, value) for every name the certificate would carry."""
    names: list[tuple[str, Any]] = []
    for attribute in subject or ():
        if attribute.oid == NameOID.COMMON_NAME:
            names.append(("commonName", attribute.value))
        elif attribute.oid == NameOID.EMAIL_ADDRESS:
            names.append(("rfc822Name", attribute.value))
    for name in sans:
        if isinstance(name, x509.DNSName):
            names.append(("dNSName", name.value))
        elif isinstance(name, x509.IPAddress):
            names.append(("iPAddress", name.value))
        elif isinstance(name, x509.RFC822Name):
            names.append(("rfc822Name", name.value))
        elif isinstance(name, x509.OtherName) and name.type_id == UPN_OID:
            names.append(("userPrincipalName", decode_upn(name.value)))
        else:
            names.append((type(name).__name__, getattr(name, "value", name)))
    return names


def _host_name(name: str, wildcard: bool) -> str | None:
    """The name in lower case if it is a host name as certificates carry one (ASCII labels,
    IDNs as A-labels, a leading ``*`` label if ``wildcard``, one optional trailing dot),
    else None. Only such a name can be below a suffix: ``evil.com\x00.b.example`` ends
    like a name of b.example, but a client that stops at the NUL reads evil.com, and
    ``x.\u212a.b.example`` lower-cases (Kelvin sign) to a name it is not."""
    if not name.isascii():
        return None
    host = name.lower().removesuffix(".")
    labels = host.split(".")
    if wildcard and labels[0] == "*":
        labels = labels[1:]
    if not labels or len(host) > MAX_STRING:
        return None
    return host if all(_LABEL.fullmatch(label) for label in labels) else None


def _under(name: str, suffixes: Sequence[str], wildcard: bool = False) -> bool:
    host = _host_name(name, wildcard)
    if host is None:
        return False
    name = host
    for suffix in suffixes:
        if suffix.startswith("."):
            if name.endswith(suffix) and len(name) > len(suffix):
                return True
        elif name == suffix or name.endswith("." + suffix):
            return True
    return False


def _in_ranges(value: Any, ranges: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    if isinstance(value, str):
        try:
            value = ipaddress.ip_address(value)
        except ValueError:
            return False
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return any(value.version == r.version and value.subnet_of(r) for r in ranges)  # type: ignore[arg-type]
    return any(value in r for r in ranges)


def _domain_of(address: str) -> str | None:
    local, at, domain = address.rpartition("@")
    return domain if at and local else None


def _unmatched_name(conditions: Conditions, kind: str, value: Any) -> str | None:
    """Why this name is refused under name conditions, or None when a pattern allows it."""
    checks: Mapping[str, tuple[Any, Callable[[Any, Any], bool], str]] = {
        "dNSName": (conditions.dns_suffixes, lambda v, p: _under(v, p, True), "DNS suffixes"),
        "iPAddress": (conditions.ip_ranges, _in_ranges, "IP ranges"),
        "rfc822Name": (
            conditions.email_domains,
            lambda v, p: (d := _domain_of(v)) is not None and _under(d, p),
            "email domains",
        ),
        "userPrincipalName": (
            conditions.upn_suffixes,
            lambda v, p: (d := _domain_of(v)) is not None and _under(d, p),
            "UPN suffixes",
        ),
    }
    # Shown escaped: the reason goes to the audit log (no NUL in a PostgreSQL text column)
    # and to the client.
    name = ascii(value)[1:-1] if isinstance(value, str) and not value.isprintable() else value
    if kind == "commonName":
        # A commonName is allowed when any kind's patterns allow it.
        if any(
            patterns is not None and match(value, patterns)
            for patterns, match, _ in checks.values()
        ):
            return None
        allowed = "; ".join(
            f"{label} {', '.join(str(p) for p in patterns)}"
            for patterns, _, label in checks.values()
            if patterns is not None
        )
        return f"commonName {name} is outside the allowed names ({allowed})"
    if kind not in checks:
        return f"{kind} {name} is not among the allowed name kinds"
    patterns, match, label = checks[kind]
    if patterns is None:
        return f"{kind} {name} is not allowed: no {label} are allowed"
    if not match(value, patterns):
        shown = ", ".join(str(p) for p in patterns)
        return f"{kind} {name} is outside the allowed {label} {shown}"
    return None
