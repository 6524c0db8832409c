"""Bearer tokens for the management API and the console.

A token reads ``pkigate_<id>_<secret>``; the store keeps the id, the token's roles
(gateways/roles.py) and the SHA-256 of the secret, and the comparison is constant-time.
Token hygiene lives here too:

- expiry: every token may carry ``expires_at`` (a default lifetime and a maximum come from
  the configuration); an expired token is a 401 naming when it expired, and is audited.
- last use: written at most once a minute per token (:data:`LAST_USED_RESOLUTION`), found
  from the row that authentication reads anyway, so a busy token is not a store write per
  request and no worker keeps state of its own.
- rotation: a new secret, shown once; the replaced one keeps working for an overlap window
  (at most the configured maximum), then is refused.
- client networks: a token bound to CIDRs is refused (403, audited) from anywhere else. The
  client address is the connection's peer (WSGI ``REMOTE_ADDR``): pkigate has no trusted
  proxy setting, so ``X-Forwarded-For`` is never believed.
- separation of duties: the configuration may keep pairs of roles apart; such a token
  cannot be created, and one that exists (made before the rule) is refused at use (403).
- granting: a token gives a token (new, or one it changes) only roles it holds itself,
  ``admin`` any (:func:`~pkigate.gateways.roles.ungrantable`); a refusal is a 403 naming
  the roles, audited as ``api.denied``. Rotating another token hands out its secret, so
  it is judged the same way on that token's roles. The CLI on the CA host is the local
  operator and gives any role (it makes the first tokens of each role under separation
  of duties).

A process remembers a token's record for :data:`TOKEN_RECORD_SECONDS` after reading it, so
that a client's requests do not each read the store to authenticate. A revocation or a
rotation takes effect at once in the process that made it and within that bound in every
other process (worker or host): the bound is the price of not reading the store per request.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import re
import secrets
import time
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, NoReturn

from sqlalchemy import Connection

from pkigate.core.access import DEFAULT_TEAM, PrincipalFacts
from pkigate.core.audit import Actor, AuditLog
from pkigate.core.errors import (
    BadRequestError,
    InvalidStateError,
    NotAuthorizedError,
    NotFoundError,
    StoreUnavailableError,
)
from pkigate.core.store import ApiTokenRecord, Store
from pkigate.gateways.roles import (
    Permission,
    Role,
    effective_roles,
    permissions_of,
    separation_violations,
    ungrantable,
)

__all__ = ["Principal", "Role", "TokenPolicy", "TokenService"]

log = logging.getLogger("pkigate.auth")

# How long a token's record read from the store is trusted (see the module's docstring).
TOKEN_RECORD_SECONDS = 1.0
_TOKEN = re.compile(r"^pkigate_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
# ASCII digits only: \d would take an Arabic-Indic one (U+0661) before "d" for a day.
_SPAN = re.compile(r"^([0-9]{1,9})(s|min|h|d)$")
_SPAN_UNITS = {"s": 1, "min": 60, "h": 3600, "d": 86400}
# last_used_at is this precise: the write it costs happens at most this often per token.
LAST_USED_RESOLUTION = timedelta(minutes=1)
MAX_ALLOW_FROM = 32
LONGEST_SPAN = timedelta(days=100 * 366)


def parse_span(text: str) -> timedelta:
    """``90d``, ``12h``, ``30min``, ``3600s``: a token lifetime or rotation overlap.
    ("m" is not a unit: certificate validities read it as months.)"""
    match = _SPAN.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a span like 90d, 12h, 30min or 3600s")
    span = timedelta(seconds=int(match.group(1)) * _SPAN_UNITS[match.group(2)])
    if span > LONGEST_SPAN:  # a date that far ahead would not fit a timestamp
        raise ValueError(f"{text!r} is longer than {LONGEST_SPAN.days}d")
    return span


def _unmapped(
    network: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """An IPv4-mapped network (``::ffff:10.0.0.0/104``) as the IPv4 one it stands for: a
    client's IPv4-mapped address is compared as IPv4, so the mapped form never matched."""
    mapped = network.network_address
    if isinstance(mapped, ipaddress.IPv6Address) and mapped.ipv4_mapped and network.prefixlen >= 96:
        return ipaddress.ip_network(f"{mapped.ipv4_mapped}/{network.prefixlen - 96}")
    return network


def format_span(span: timedelta) -> str:
    seconds = int(span.total_seconds())
    for unit in ("d", "h", "min"):
        if seconds and seconds % _SPAN_UNITS[unit] == 0:
            return f"{seconds // _SPAN_UNITS[unit]}{unit}"
    return f"{seconds}s"


def parse_networks(values: Iterable[str]) -> tuple[str, ...]:
    """CIDRs (or single addresses) a token may be used from, in canonical form."""
    networks = []
    for value in values:
        try:
            networks.append(str(_unmapped(ipaddress.ip_network(value.strip()))))
        except ValueError:
            raise ValueError(
                f"{value!r} is not a network like 10.0.0.0/8 or 2001:db8::/32 "
                "(with no host bits set)"
            ) from None
    if len(networks) > MAX_ALLOW_FROM:
        raise ValueError(f"at most {MAX_ALLOW_FROM} networks")
    return tuple(dict.fromkeys(networks))


class AuthenticationError(NotAuthorizedError):
    """No credentials, or credentials that do not check out (HTTP 401)."""

    code = "unauthenticated"


class ForbiddenError(NotAuthorizedError):
    """Authenticated, but the roles, the client address or the separation of duties do
    not allow this (HTTP 403)."""

    code = "forbidden"


@dataclass(frozen=True)
class TokenPolicy:
    """The configuration's rules for tokens (``separation_of_duties`` and ``[tokens]``)."""

    #: Pairs of roles that no one token may hold both of.
    separated: tuple[tuple[Role, Role], ...] = ()
    #: The lifetime of a token created without one; None: it does not expire.
    default_lifetime: timedelta | None = None
    #: The longest lifetime a token may be given; None: no limit.
    max_lifetime: timedelta | None = None
    #: The longest a replaced secret may keep working after a rotation.
    max_rotation_overlap: timedelta = timedelta(days=7)


@dataclass(frozen=True)
class Principal:
    token_id: str
    name: str
    roles: tuple[Role, ...]
    team: str = DEFAULT_TEAM  # core/access.py: the team the token acts for

    def may(self, permission: Permission) -> bool:
        return permission in permissions_of(self.roles)

    @property
    def role_names(self) -> list[str]:
        return [r.value for r in self.roles]

    def actor(self, request_id: str | None) -> Actor:
        return Actor(f"token:{self.name}({self.token_id})", "api", request_id)

    @property
    def facts(self) -> PrincipalFacts:
        """Who this is, as the core's access decisions see it."""
        return PrincipalFacts(self.token_id, self.team)


@dataclass(frozen=True)
class IssuedToken:
    record: ApiTokenRecord
    secret: str  # shown once, never stored


# Tokens that break the separation of duties, with the pairs each one breaks.
Violations = list[tuple[ApiTokenRecord, list[tuple[Role, Role]]]]


def separated_tokens(
    records: Iterable[ApiTokenRecord], separated: Iterable[tuple[Role, Role]]
) -> Violations:
    """The active tokens among ``records`` that hold roles kept apart (made before the
    rule), with the pairs they break: refused at use, named by `serve` and `config check`."""
    pairs = tuple(separated)
    found = []
    for record in records:
        if record.revoked_at is None:
            broken = separation_violations((Role(r) for r in record.roles), pairs)
            if broken:
                found.append((record, broken))
    return found


def describe_separated(found: Violations) -> str:
    """``name (id): ca-admin+ca-deleter; ...`` for a warning."""
    return "; ".join(
        f"{record.name} ({record.id}): " + ", ".join(f"{a.value}+{b.value}" for a, b in pairs)
        for record, pairs in found
    )


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# Compared against when there is nothing to compare with, so that timing says nothing
# about which token ids exist or have a replaced secret.
_NO_DIGEST = _digest("x" * 43)


def _principal(record: ApiTokenRecord) -> Principal:
    return Principal(record.id, record.name, tuple(Role(r) for r in record.roles), record.team)


class TokenService:
    def __init__(
        self,
        store: Store,
        audit: AuditLog,
        clock: Callable[[], datetime],
        policy: TokenPolicy | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._audit = audit
        self._clock = clock
        self._monotonic = monotonic
        # token id -> (when read, its record): tokens that exist only, so that a token
        # made by another process is usable at once.
        self._records: dict[str, tuple[float, ApiTokenRecord]] = {}
        self.policy = policy or TokenPolicy()

    # -- managing tokens ------------------------------------------------------------------

    def create(
        self,
        name: str,
        roles: Role | Iterable[Role],
        actor: Actor,
        *,
        expires_in: timedelta | None = None,
        allow_from: Sequence[str] = (),
        team: str = DEFAULT_TEAM,
        caller: Principal | None = None,
        keep: Callable[[str], None] | None = None,
    ) -> IssuedToken:
        """A new token; BadRequestError (before anything is written) for a name, roles,
        lifetime or networks the policy refuses. ``caller``: the token asking (None: the
        local operator), ForbiddenError (audited) for roles it may not give. ``keep``: put
        the token where its holder finds it (a file), called before the token is
        committed; if it raises, nothing is stored."""
        held = (roles,) if isinstance(roles, Role) else tuple(dict.fromkeys(roles))
        if not name or len(name) > 128:
            raise BadRequestError("token name must be 1-128 characters")
        # A NUL is refused by PostgreSQL (a 500), a line break or a bidirectional override
        # makes a list, a log line or an audit record read otherwise than it is.
        if any(unicodedata.category(c).startswith("C") for c in name):
            raise BadRequestError("token name has a control or format character")
        if not held:
            raise BadRequestError("a token needs at least one role")
        self.check_separation(held)
        lifetime = self._lifetime(expires_in)
        if caller is not None and (refused := ungrantable(caller.roles, held)):
            self._refuse_grant(caller, actor, "tokens", refused)
        try:
            networks = parse_networks(allow_from)
        except ValueError as exc:
            raise BadRequestError(f"allow_from: {exc}") from None
        now = self._clock()
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        expires_at = now + lifetime if lifetime is not None else None
        with self._store.write() as conn:
            if self._store.get_team(conn, team, lock="share") is None:
                raise NotFoundError(f"no team named {team}")
            self._store.insert_api_token(
                conn,
                id=token_id,
                name=name,
                roles=" ".join(r.value for r in held),
                secret_sha256=_digest(secret),
                created_at=now,
                created_by=actor.principal,
                expires_at=expires_at,
                allow_from=" ".join(networks) or None,
                team=team,
            )
            self._audit.record(
                conn,
                actor,
                "token.create",
                f"token/{token_id}",
                at=now,
                parameters={
                    "name": name,
                    "roles": [r.value for r in held],
                    "expires_at": expires_at.isoformat() if expires_at else None,
                    "allow_from": list(networks),
                    "team": team,
                },
            )
            record = self._store.get_api_token(conn, token_id)
            if keep is not None:
                keep(f"pkigate_{token_id}_{secret}")
        assert record is not None
        return IssuedToken(record, f"pkigate_{token_id}_{secret}")

    def check_separation(self, roles: Iterable[Role]) -> None:
        """BadRequestError naming both roles of the first separated pair ``roles`` hold."""
        for first, second in separation_violations(roles, self.policy.separated):
            raise BadRequestError(
                f"one token may not hold both {first.value} and {second.value} "
                "(separation_of_duties in the configuration keeps them apart)"
            )

    def _lifetime(self, requested: timedelta | None) -> timedelta | None:
        longest = self.policy.max_lifetime
        if requested is None:
            return self.policy.default_lifetime or longest
        if requested <= timedelta(0):
            raise BadRequestError("expires_in must be positive")
        if longest is not None and requested > longest:
            raise BadRequestError(
                f"expires_in {format_span(requested)} is longer than the configured maximum "
                f"([tokens] max_lifetime = {format_span(longest)})"
            )
        return requested

    def rotate(
        self, token_id: str, overlap: timedelta, actor: Actor, caller: Principal | None = None
    ) -> IssuedToken:
        """A new secret for the token; the current one keeps working for ``overlap``
        (a secret replaced earlier stops at once). The new secret is the caller's to hand
        on, so ``caller`` (None: the local operator) rotates only its own token or one
        whose roles it may give (ForbiddenError, audited, otherwise)."""
        longest = self.policy.max_rotation_overlap
        if overlap < timedelta(0) or overlap > longest:
            raise BadRequestError(
                f"overlap must be from 0s to {format_span(longest)} ([tokens] max_rotation_overlap)"
            )
        now = self._clock()
        secret = secrets.token_urlsafe(32)
        refused: tuple[Role, ...] = ()
        with self._store.write() as conn:
            record = self._changeable(conn, token_id, now)
            if caller is not None and caller.token_id != token_id:
                refused = ungrantable(caller.roles, (Role(r) for r in record.roles))
            if not refused:
                self._store.update_api_token(
                    conn,
                    token_id,
                    secret_sha256=_digest(secret),
                    previous_secret_sha256=record.secret_sha256,
                    previous_secret_until=now + overlap,
                )
                self._audit.record(
                    conn,
                    actor,
                    "token.rotate",
                    f"token/{token_id}",
                    at=now,
                    parameters={"overlap_seconds": int(overlap.total_seconds())},
                )
                rotated = self._store.get_api_token(conn, token_id)
        if refused:  # nothing was written; audited out of the write so it is kept
            self._refuse_grant(
                caller, actor, f"token/{token_id}", refused, "; a rotation hands out its secret"
            )
        assert rotated is not None
        self._records.pop(token_id, None)
        return IssuedToken(rotated, f"pkigate_{token_id}_{secret}")

    def update(
        self,
        token_id: str,
        actor: Actor,
        *,
        roles: Iterable[Role] | None = None,
        allow_from: Sequence[str] | None = None,
        expires_in: timedelta | None = None,
        caller: Principal | None = None,
    ) -> ApiTokenRecord:
        """Change an active token's roles, client networks (empty: anywhere) or expiry
        (from now; at most [tokens] max_lifetime), under the rules that create applies.
        ``caller``: the token asking (None on the CA host), which may give the token only
        roles it may grant (judged on the roles the token gains, so that a token admin
        still changes the networks or expiry of a token it could not make; admin too may
        not give itself roles it does not hold). The audit record names each change,
        before and after."""
        held = tuple(dict.fromkeys(roles)) if roles is not None else None
        if held is None and allow_from is None and expires_in is None:
            raise BadRequestError("nothing to change: give roles, allow_from or expires_in")
        if held is not None:
            if not held:
                raise BadRequestError("a token needs at least one role")
            self.check_separation(held)
        try:
            networks = parse_networks(allow_from) if allow_from is not None else None
        except ValueError as exc:
            raise BadRequestError(f"allow_from: {exc}") from None
        lifetime = self._lifetime(expires_in) if expires_in is not None else None
        now = self._clock()
        refused: tuple[Role, ...] = ()
        with self._store.write() as conn:
            record = self._changeable(conn, token_id, now)
            if caller is not None and held is not None:
                refused = _refused_gains(caller, record, held)
            if not refused:
                updated = self._change(conn, record, actor, now, held, networks, lifetime)
        if refused:  # nothing was written; audited out of the write so it is kept
            self._refuse_grant(caller, actor, f"token/{token_id}", refused)
        self._records.pop(token_id, None)
        return updated

    def _change(
        self,
        conn: Connection,
        record: ApiTokenRecord,
        actor: Actor,
        now: datetime,
        held: tuple[Role, ...] | None,
        networks: tuple[str, ...] | None,
        lifetime: timedelta | None,
    ) -> ApiTokenRecord:
        """Write update's changes and their audit record (each change, before and after)."""
        before: dict[str, Any] = {
            "roles": list(record.roles),
            "allow_from": list(record.allow_from),
            "expires_at": record.expires_at.isoformat() if record.expires_at else None,
        }
        after = dict(before)
        values: dict[str, Any] = {}
        if held is not None:
            ordered = [r.value for r in Role if r in held]
            after["roles"], values["roles"] = ordered, " ".join(ordered)
        if networks is not None:
            after["allow_from"], values["allow_from"] = (
                list(networks),
                " ".join(networks) or None,
            )
        if lifetime is not None:
            values["expires_at"] = now + lifetime
            after["expires_at"] = values["expires_at"].isoformat()
        self._store.update_api_token(conn, record.id, **values)
        self._audit.record(
            conn,
            actor,
            "token.update",
            f"token/{record.id}",
            at=now,
            parameters={
                "changed": {
                    key: {"from": before[key], "to": after[key]}
                    for key in before
                    if before[key] != after[key]
                }
            },
        )
        updated = self._store.get_api_token(conn, record.id)
        assert updated is not None
        return updated

    def _refuse_grant(
        self,
        caller: Principal | None,
        actor: Actor,
        resource: str,
        refused: Sequence[Role],
        why: str = "",
    ) -> NoReturn:
        """Audit (as the API audits a role refusal) and raise a 403 for roles ``caller``
        may not give."""
        assert caller is not None
        names = ", ".join(r.value for r in refused)
        self._audit.record_alone(
            actor,
            "api.denied",
            resource,
            result="failure",
            parameters={
                "roles": caller.role_names,
                "needs": "grant",
                "refused": [r.value for r in refused],
            },
            at=self._clock(),
        )
        raise ForbiddenError(
            f"roles {', '.join(caller.role_names)} may not grant {names}: a token gives only "
            f"roles it holds itself (admin gives any, but not to itself){why}"
        )

    def _changeable(self, conn: Connection, token_id: str, now: datetime) -> ApiTokenRecord:
        """A token that may be rotated or changed: neither revoked (404) nor expired (409:
        it is not revived)."""
        record = self._store.get_api_token(conn, token_id)
        if record is None or record.revoked_at is not None:
            raise NotFoundError(f"no active token with id {token_id}")
        if record.expires_at is not None and record.expires_at <= now:
            raise InvalidStateError(f"token {token_id} has expired; create a new one")
        return record

    def list(self) -> list[ApiTokenRecord]:
        with self._store.read() as conn:
            return self._store.list_api_tokens(conn)

    def revoke(self, token_id: str, actor: Actor) -> None:
        now = self._clock()
        with self._store.write() as conn:
            if not self._store.revoke_api_token(conn, token_id, now):
                raise NotFoundError(f"no active token with id {token_id}")
            self._audit.record(conn, actor, "token.revoke", f"token/{token_id}", at=now)
        self._records.pop(token_id, None)

    def violating(self) -> Violations:
        """Active tokens that hold roles the separation of duties keeps apart."""
        return separated_tokens(self.list(), self.policy.separated)

    def has_tokens(self) -> bool:
        return any(t.revoked_at is None for t in self.list())

    # -- using tokens ---------------------------------------------------------------------

    def authenticate(
        self,
        authorization: str | None,
        address: str | None = None,
        request_id: str | None = None,
    ) -> Principal:
        """The principal of a bearer token sent from ``address`` (the client's IP)."""
        if not authorization or not authorization.startswith("Bearer "):
            raise AuthenticationError("a bearer token is required")
        match = _TOKEN.match(authorization.removeprefix("Bearer ").strip())
        if match is None:
            raise AuthenticationError("malformed bearer token")
        token_id, secret = match.groups()
        digest = _digest(secret)
        record = self._record(token_id)
        current, previous = _matches(record, digest)
        if not current and token_id in self._records:
            # A secret that the remembered record does not know may be one that another
            # process rotated in since: read the store again before refusing it.
            self._records.pop(token_id, None)
            record = self._record(token_id)
            current, previous = _matches(record, digest)
        if record is None or not (current or previous):
            raise AuthenticationError("invalid bearer token")
        now = self._clock()
        if not current:
            until = record.previous_secret_until
            if until is None or until <= now:
                self._refuse(
                    record,
                    request_id,
                    "rotated",
                    AuthenticationError(
                        "this secret was replaced by a rotation and stopped working at "
                        f"{until.isoformat() if until else 'once'}; use the new secret"
                    ),
                )
        return self._admit(record, now, address, request_id)

    def principal(
        self, token_id: str, address: str | None = None, request_id: str | None = None
    ) -> Principal:
        """The principal of a token that authenticated earlier (a console session's), as
        long as it is still usable from ``address``."""
        with self._store.read() as conn:
            record = self._store.get_api_token(conn, token_id)
        if record is None:
            raise AuthenticationError("this token no longer exists")
        return self._admit(record, self._clock(), address, request_id)

    def _record(self, token_id: str) -> ApiTokenRecord | None:
        """The token's record, read from the store at most TOKEN_RECORD_SECONDS ago."""
        now = self._monotonic()
        remembered = self._records.get(token_id)
        if remembered is not None and now - remembered[0] < TOKEN_RECORD_SECONDS:
            return remembered[1]
        with self._store.read() as conn:
            record = self._store.get_api_token(conn, token_id)
        if record is None:
            self._records.pop(token_id, None)
        else:
            self._records[token_id] = (now, record)
        return record

    def _admit(
        self, record: ApiTokenRecord, now: datetime, address: str | None, request_id: str | None
    ) -> Principal:
        """Whether a token whose secret checked out may be used now, from ``address``."""
        if record.revoked_at is not None:
            raise AuthenticationError("this token has been revoked")
        if record.expires_at is not None and record.expires_at <= now:
            self._refuse(
                record,
                request_id,
                "expired",
                AuthenticationError(
                    f"this token expired at {record.expires_at.isoformat()}; ask for a new one"
                ),
            )
        if record.allow_from and not _within(address, record.allow_from):
            self._refuse(
                record,
                request_id,
                "address",
                ForbiddenError(
                    f"this token may be used only from {', '.join(record.allow_from)}; "
                    f"this request came from {address or 'an unknown address'}"
                ),
                {"address": address},
            )
        who = _principal(record)
        pairs = separation_violations(who.roles, self.policy.separated)
        if pairs:
            first, second = pairs[0]
            self._refuse(
                record,
                request_id,
                "separation_of_duties",
                ForbiddenError(
                    f"this token holds both {first.value} and {second.value}, which "
                    "separation_of_duties keeps apart; use tokens that each hold one"
                ),
            )
        if record.last_used_at is None or now - record.last_used_at >= LAST_USED_RESOLUTION:
            self._touch(record.id, now)
            if record.id in self._records:  # so the remembered record does not touch again
                self._records[record.id] = (
                    self._records[record.id][0],
                    replace(record, last_used_at=now),
                )
        return who

    def _touch(self, token_id: str, now: datetime) -> None:
        try:
            with self._store.write() as conn:
                self._store.touch_api_token(conn, token_id, now)
        except StoreUnavailableError as exc:
            # Bookkeeping only: a busy store must not refuse the request; the next use
            # after the resolution tries again.
            log.warning("last use of token %s not recorded: %s", token_id, exc.message)

    def _refuse(
        self,
        record: ApiTokenRecord,
        request_id: str | None,
        reason: str,
        error: NotAuthorizedError,
        details: dict[str, Any] | None = None,
    ) -> None:
        """Audit why a token that proved its secret is refused, then raise ``error``."""
        self._audit.record_alone(
            _principal(record).actor(request_id),
            "token.refused",
            f"token/{record.id}",
            result="failure",
            parameters={"reason": reason, "message": error.message, **(details or {})},
            at=self._clock(),
        )
        raise error


def _refused_gains(
    caller: Principal, record: ApiTokenRecord, roles: Iterable[Role]
) -> tuple[Role, ...]:
    """The roles ``record`` would gain that ``caller`` may not give it. A token changing
    itself gives only what it holds, admin included: otherwise an admin token would
    reach past admin to issuer (which admin does not hold)."""
    gained = set(roles) - {Role(r) for r in record.roles}
    if caller.token_id == record.id:
        return tuple(role for role in Role if role in gained - effective_roles(caller.roles))
    return ungrantable(caller.roles, gained)


def _matches(record: ApiTokenRecord | None, digest: str) -> tuple[bool, bool]:
    """Whether ``digest`` is the token's current secret's, or the one a rotation replaced.
    Both comparisons run whatever the record holds (constant time, no early exit)."""
    current = hmac.compare_digest(record.secret_sha256 if record else _NO_DIGEST, digest)
    replaced = (record.previous_secret_sha256 if record else None) or _NO_DIGEST
    previous = hmac.compare_digest(replaced, digest) and replaced != _NO_DIGEST
    return current, previous


def _within(address: str | None, networks: Iterable[str]) -> bool:
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack listener's view of an IPv4 client
    return any(ip in ipaddress.ip_network(n) for n in networks)
