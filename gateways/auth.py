"""Bearer tokens for the management API, with roles that separate duties.

- ``admin``: CA lifecycle, connectors, tokens.
- ``issuer``: issue and revoke certificates, connector enrollment resources (SCEP
  challenges, ACME EAB keys).
- ``auditor``: read-only audit log, reports and inventory.

A token reads ``pkigate_<id>_<secret>``; the store keeps the id, role and SHA-256 of the
secret, and the comparison is constant-time.

A process remembers a token's record for :data:`TOKEN_RECORD_SECONDS` after reading it, so
that a client's requests do not each read the store to authenticate. A revocation takes
effect at once in the process that made it and within that bound in every other process
(worker or host): the bound is the price of not reading the store per request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from pkigate.core.audit import Actor, AuditLog
from pkigate.core.errors import BadRequestError, NotAuthorizedError, NotFoundError
from pkigate.core.store import ApiTokenRecord, Store

# How long a token's record read from the store is trusted (see the module's docstring).
TOKEN_RECORD_SECONDS = 1.0
_TOKEN = re.compile(r"^pkigate_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")


class Role(StrEnum):
    ADMIN = "admin"
    ISSUER = "issuer"
    AUDITOR = "auditor"


class AuthenticationError(NotAuthorizedError):
    """No credentials, or credentials that do not check out (HTTP 401)."""

    code = "unauthenticated"


class ForbiddenError(NotAuthorizedError):
    """Authenticated, but the role does not allow this (HTTP 403)."""

    code = "forbidden"


@dataclass(frozen=True)
class Principal:
    token_id: str
    name: str
    role: Role

    def actor(self, request_id: str | None) -> Actor:
        return Actor(f"token:{self.name}({self.token_id})", "api", request_id)


@dataclass(frozen=True)
class IssuedToken:
    record: ApiTokenRecord
    secret: str  # shown once, never stored


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenService:
    def __init__(
        self,
        store: Store,
        audit: AuditLog,
        clock: Callable[[], datetime],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._audit = audit
        self._clock = clock
        self._monotonic = monotonic
        # token id -> (when read, its record): tokens that exist only, so that a token
        # made by another process is usable at once.
        self._records: dict[str, tuple[float, ApiTokenRecord]] = {}

    def create(self, name: str, role: Role, actor: Actor) -> IssuedToken:
        if not name or len(name) > 128:
            raise BadRequestError("token name must be 1-128 characters")
        now = self._clock()
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        with self._store.write() as conn:
            self._store.insert_api_token(
                conn,
                id=token_id,
                name=name,
                role=role.value,
                secret_sha256=_digest(secret),
                created_at=now,
                created_by=actor.principal,
            )
            self._audit.record(
                conn,
                actor,
                "token.create",
                f"token/{token_id}",
                at=now,
                parameters={"name": name, "role": role.value},
            )
            record = self._store.get_api_token(conn, token_id)
        assert record is not None
        return IssuedToken(record, f"pkigate_{token_id}_{secret}")

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

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization or not authorization.startswith("Bearer "):
            raise AuthenticationError("a bearer token is required")
        match = _TOKEN.match(authorization.removeprefix("Bearer ").strip())
        if match is None:
            raise AuthenticationError("malformed bearer token")
        token_id, secret = match.groups()
        record = self._record(token_id)
        # Compare even when the id is unknown, so timing says nothing about which ids exist.
        expected = record.secret_sha256 if record else _digest("x" * 43)
        if not hmac.compare_digest(expected, _digest(secret)) or record is None:
            raise AuthenticationError("invalid bearer token")
        return self._active(record)

    def principal(self, token_id: str) -> Principal:
        """The principal of a token that authenticated earlier (a console session's), as
        long as it is not revoked."""
        with self._store.read() as conn:
            record = self._store.get_api_token(conn, token_id)
        if record is None:
            raise AuthenticationError("this token no longer exists")
        return self._active(record)

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

    @staticmethod
    def _active(record: ApiTokenRecord) -> Principal:
        if record.revoked_at is not None:
            raise AuthenticationError("this token has been revoked")
        return Principal(record.id, record.name, Role(record.role))

    def has_tokens(self) -> bool:
        return any(t.revoked_at is None for t in self.list())
