"""ACME problem documents (RFC 8555 6.7, RFC 7807): the one error type of the ACME connector.

Every refusal, from a bad nonce to a failed challenge, is an :class:`AcmeProblem` carrying
its ``urn:ietf:params:acme:error:*`` type, the HTTP status it is answered with, a detail a
client operator can act on, and subproblems for per-identifier failures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

ERROR_NS = "urn:ietf:params:acme:error:"

# The status each problem type is answered with when the raiser does not say otherwise.
DEFAULT_STATUS: Mapping[str, int] = {
    "accountDoesNotExist": 400,
    # RFC 9773 section 7.4: the certificate named in `replaces` was replaced already.
    "alreadyReplaced": 409,
    "alreadyRevoked": 400,
    "badCSR": 400,
    "badNonce": 400,
    "badPublicKey": 400,
    "badRevocationReason": 400,
    "badSignatureAlgorithm": 400,
    "caa": 403,
    "compound": 403,
    "connection": 400,
    "dns": 400,
    "externalAccountRequired": 403,
    "incorrectResponse": 403,
    "invalidContact": 400,
    "malformed": 400,
    "orderNotReady": 403,
    "rateLimited": 429,
    "rejectedIdentifier": 400,
    "serverInternal": 500,
    "tls": 400,
    "unauthorized": 403,
    "unsupportedContact": 400,
    "unsupportedIdentifier": 400,
    "userActionRequired": 403,
    "invalidProfile": 400,
}


@dataclass(frozen=True)
class Subproblem:
    """A failure about one identifier (RFC 8555 6.7.1)."""

    type: str
    detail: str
    identifier: Mapping[str, str]

    def to_json(self) -> dict[str, Any]:
        return {
            "type": ERROR_NS + self.type,
            "detail": self.detail,
            "identifier": dict(self.identifier),
        }


@dataclass
class AcmeProblem(Exception):
    """An ACME error: ``type`` is the short name (``badNonce``), not the URN."""

    type: str
    detail: str
    status: int | None = None
    subproblems: Sequence[Subproblem] = field(default_factory=tuple)
    retry_after: int | None = None
    """Seconds, sent as Retry-After (rateLimited, and orders still processing)."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Further members of the problem document (e.g. ``algorithms`` for badSignatureAlgorithm)."""

    def __post_init__(self) -> None:
        if self.type not in DEFAULT_STATUS:
            raise ValueError(f"unknown ACME problem type {self.type!r}")
        super().__init__(f"{self.type}: {self.detail}")

    @property
    def http_status(self) -> int:
        return self.status if self.status is not None else DEFAULT_STATUS[self.type]

    @property
    def urn(self) -> str:
        return ERROR_NS + self.type

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            **self.extra,
            "type": self.urn,
            "detail": self.detail,
            "status": self.http_status,
        }
        if self.subproblems:
            document["subproblems"] = [s.to_json() for s in self.subproblems]
        return document

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> AcmeProblem:
        """A problem stored on a challenge or order, read back."""
        kind = str(document.get("type", ""))
        short = kind.removeprefix(ERROR_NS)
        if short not in DEFAULT_STATUS:
            short = "serverInternal"
        return cls(
            short,
            str(document.get("detail", "")),
            status=document.get("status") if isinstance(document.get("status"), int) else None,
            subproblems=tuple(
                Subproblem(
                    str(s.get("type", "")).removeprefix(ERROR_NS),
                    str(s.get("detail", "")),
                    dict(s.get("identifier", {})),
                )
                for s in document.get("subproblems", ())
                if isinstance(s, Mapping)
            ),
        )
