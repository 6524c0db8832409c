"""Roles and what each may do: the one mapping the API, the connectors' admin routes and the
console read (``http.requires`` checks a :class:`Permission` against it).

A token holds one or more roles. The fine-grained roles separate duties:

- ``ca-admin``: create and import CAs, enable and disable them, change settings and tags.
- ``ca-deleter``: delete CAs and restore them within their restore window.
- ``issuer``: issue certificates, revoke them, and hand out enrollment credentials
  (SCEP one-time challenges and profiles), which let a device get a certificate.
- ``revoker``: revoke certificates.
- ``approver``: approve or reject requests held for approval (SCEP, AD-style).
- ``auditor``: read-only audit log, its verification, reports and inventory.
- ``token-admin``: API tokens and ACME external account binding keys (who may get in).
- ``admin``: today's administrator, every administrative power at once (the CA
  lifecycle, tokens, ACME EAB keys, approvals, enrollment credentials, revocation).

Before roles were fine-grained a token had exactly one of admin, issuer, auditor; an
``issuer`` then could also approve, so migration 0017 gives old issuer tokens
``issuer`` + ``approver`` (:data:`LEGACY_ROLES`), and the API's legacy ``role`` field
does the same.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum


class Role(StrEnum):
    ADMIN = "admin"
    CA_ADMIN = "ca-admin"
    CA_DELETER = "ca-deleter"
    ISSUER = "issuer"
    REVOKER = "revoker"
    APPROVER = "approver"
    AUDITOR = "auditor"
    TOKEN_ADMIN = "token-admin"  # noqa: S105 - a role name, not a secret


class Permission(StrEnum):
    """What an operation needs; every API operation and console page names one."""

    READ_CAS = "cas:read"  # CAs, their certificates, tags and CSRs; templates; dashboard
    CREATE_CAS = "cas:create"  # create a CA, import a CA certificate or a token key
    MANAGE_CAS = "cas:manage"  # enable, disable, settings, tags
    DELETE_CAS = "cas:delete"  # delete and restore
    ISSUE = "certificates:issue"
    REVOKE = "certificates:revoke"
    READ_CERTIFICATES = "certificates:read"
    ENROLL = "enrollment:manage"  # SCEP one-time challenges and profiles
    APPROVE = "requests:approve"  # list, approve and reject held requests
    READ_AUDIT = "audit:read"  # audit events
    AUDIT_REPORTS = "audit:report"  # verify the chain, export reports
    READ_EVENTS = "events:read"
    MANAGE_TOKENS = "tokens:manage"
    MANAGE_NOTIFICATIONS = "notifications:manage"  # webhook and email destinations
    MANAGE_EAB = "eab:manage"
    READ_EAB = "eab:read"  # ACME EAB keys and accounts


P = Permission
PERMISSIONS: Mapping[Role, frozenset[Permission]] = {
    Role.ADMIN: frozenset(
        {
            P.READ_CAS,
            P.CREATE_CAS,
            P.MANAGE_CAS,
            P.DELETE_CAS,
            P.REVOKE,
            P.READ_CERTIFICATES,
            P.ENROLL,
            P.APPROVE,
            P.READ_AUDIT,
            P.READ_EVENTS,
            P.MANAGE_TOKENS,
            P.MANAGE_NOTIFICATIONS,
            P.MANAGE_EAB,
            P.READ_EAB,
        }
    ),
    Role.CA_ADMIN: frozenset({P.READ_CAS, P.CREATE_CAS, P.MANAGE_CAS}),
    Role.CA_DELETER: frozenset({P.READ_CAS, P.DELETE_CAS}),
    Role.ISSUER: frozenset({P.READ_CAS, P.ISSUE, P.REVOKE, P.READ_CERTIFICATES, P.ENROLL}),
    Role.REVOKER: frozenset({P.READ_CAS, P.REVOKE, P.READ_CERTIFICATES}),
    Role.APPROVER: frozenset({P.READ_CAS, P.APPROVE}),
    Role.AUDITOR: frozenset(
        {
            P.READ_CAS,
            P.READ_CERTIFICATES,
            P.READ_AUDIT,
            P.AUDIT_REPORTS,
            P.READ_EVENTS,
            P.READ_EAB,
        }
    ),
    Role.TOKEN_ADMIN: frozenset({P.READ_CAS, P.MANAGE_TOKENS, P.MANAGE_EAB, P.READ_EAB}),
}
del P

# What a token created before 0017 (or through the API's legacy ``role`` field) holds.
LEGACY_ROLES: Mapping[str, tuple[Role, ...]] = {
    "admin": (Role.ADMIN,),
    "issuer": (Role.ISSUER, Role.APPROVER),
    "auditor": (Role.AUDITOR,),
}


def roles_with(permission: Permission) -> tuple[Role, ...]:
    """The roles that grant ``permission``, in declaration order (what OpenAPI shows)."""
    return tuple(role for role in Role if permission in PERMISSIONS[role])


def permissions_of(roles: Iterable[Role]) -> frozenset[Permission]:
    granted: frozenset[Permission] = frozenset()
    for role in roles:
        granted |= PERMISSIONS[role]
    return granted


def effective_roles(roles: Iterable[Role]) -> frozenset[Role]:
    """Every role whose powers these roles hold together: ``admin`` holds ``ca-admin``
    and ``ca-deleter``, ``issuer`` holds ``revoker``. Separation of duties is judged on
    these, so no combination can hold two separated powers under another name."""
    granted = permissions_of(roles)
    return frozenset(role for role in Role if PERMISSIONS[role] <= granted)


def parse_roles(names: Iterable[str]) -> tuple[Role, ...]:
    """Role names, deduplicated in declaration order; ValueError names an unknown one."""
    wanted = set()
    for name in names:
        try:
            wanted.add(Role(name))
        except ValueError:
            raise ValueError(
                f"unknown role {name!r}; roles: {', '.join(r.value for r in Role)}"
            ) from None
    return tuple(role for role in Role if role in wanted)


def ungrantable(granter: Iterable[Role], wanted: Iterable[Role]) -> tuple[Role, ...]:
    """The roles among ``wanted`` that a token holding ``granter`` may not give a token (a
    new one, or one it changes): it gives only roles it holds itself (judged on
    :func:`effective_roles`, so ``issuer`` gives ``revoker``), except that ``admin`` gives
    any. This is Vault's rule for child tokens: a token-admin cannot mint an admin, so
    handing out tokens does not undo the separation of duties."""
    held = tuple(granter)
    if Role.ADMIN in held:
        return ()
    refused = set(wanted) - effective_roles(held)
    return tuple(role for role in Role if role in refused)


def separation_violations(
    roles: Iterable[Role], separated: Iterable[tuple[Role, Role]]
) -> list[tuple[Role, Role]]:
    """The configured pairs of roles that must stay apart and that ``roles`` hold both of
    (judged on :func:`effective_roles`)."""
    held = effective_roles(roles)
    return [(a, b) for a, b in separated if a in held and b in held]
