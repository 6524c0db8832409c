"""Security principals read from the directory, and the SIDs of their tokens.

AD computes a logged-on principal's groups (tokenGroups), which is read where the directory
is AD (:func:`token_group_memberships`); over plain LDAP, as against the development
directory, they are found by following `member` upwards: every group whose
`member` names the principal, then every group naming one of those, and so on. As in AD the
primary group (primaryGroupID, a RID in the principal's domain) does not list its members,
so it is added by SID and its own parents are followed from its DN.

:func:`find_principal` and its siblings return an account without its token;
:func:`resolve_token` fills in :attr:`Principal.token_sids` and :attr:`Principal.group_names`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from typing import Any, Literal

from ldap3 import BASE, SUBTREE
from ldap3.utils.conv import escape_bytes, escape_filter_chars

from pkigate.adcs.encoding import MalformedAttributeValue, from_ad_int32
from pkigate.adcs.flags import GroupType, UserAccountControl
from pkigate.adcs.security import InvalidSid, SecurityDataError, Sid, guid_from_bytes, token_sids

# Windows refuses a logon whose token would hold more than 1024 SIDs.
MAX_TOKEN_GROUPS = 1024
PRINCIPAL_ATTRIBUTES = (
    "sAMAccountName",
    "objectSid",
    "objectGUID",
    "primaryGroupID",
    "userAccountControl",
    "userPrincipalName",
    "dNSHostName",
    "mail",
    "objectClass",
    "cn",
)
GROUP_ATTRIBUTES = ("objectSid", "sAMAccountName", "cn", "groupType")
# SIDs per search when naming a token's groups: keeps each filter well under AD's limits.
TOKEN_NAME_BATCH = 100

PrincipalKind = Literal["user", "computer"]


class PrincipalLookupError(RuntimeError):
    """The directory did not answer, or its answer does not describe a usable principal."""


class DirectorySearchFailed(PrincipalLookupError):
    """A search returned an error result (busy, unavailable, time limit, …)."""


@dataclass(frozen=True)
class Principal:
    """A user or computer account as the connector needs it."""

    dn: str
    sam_account_name: str
    sid: str
    primary_group_sid: str | None
    user_account_control: UserAccountControl
    user_principal_name: str | None = None
    dns_host_name: str | None = None
    mail: str | None = None
    object_guid: uuid.UUID | None = None
    kind: PrincipalKind = "user"
    """"computer" when the entry is of objectClass computer."""
    common_name: str | None = None
    token_sids: frozenset[str] = frozenset()
    """Every SID an access check uses: the principal's own, its groups' (nested and primary),
    Everyone and Authenticated Users. Empty until :func:`resolve_token`."""
    group_names: frozenset[str] = frozenset()
    """sAMAccountName (or cn) of the directory groups in the token, for audit records."""

    @property
    def disabled(self) -> bool:
        return bool(self.user_account_control & UserAccountControl.ACCOUNTDISABLE)

    @property
    def upn(self) -> str | None:
        return self.user_principal_name


@dataclass(frozen=True)
class GroupMemberships:
    """The directory groups a principal belongs to, directly or through nesting."""

    sids: frozenset[str]
    names: frozenset[str]


def find_principal(connection: Any, base: str, sam_account_name: str) -> Principal | None:
    """The account named ``sam_account_name`` under ``base``, or None if there is none."""
    return _find_one(connection, base, f"(sAMAccountName={escape_filter_chars(sam_account_name)})")


def find_principal_by_upn(connection: Any, base: str, upn: str) -> Principal | None:
    """The account whose userPrincipalName is ``upn`` (case-insensitive), or None."""
    return _find_one(connection, base, f"(userPrincipalName={escape_filter_chars(upn)})")


def find_principal_by_sid(connection: Any, base: str, sid: str) -> Principal | None:
    """The account whose objectSid is ``sid`` ("S-1-5-21-…"), or None."""
    try:
        binary = Sid.parse(sid).to_bytes()
    except InvalidSid:
        return None  # a string that is not a SID names no account
    return _find_one(connection, base, f"(objectSid={escape_bytes(binary)})")


def _find_one(connection: Any, base: str, assertion: str) -> Principal | None:
    entries = _search(
        connection,
        base,
        f"(&(objectClass=user){assertion})",  # computer derives from user
        PRINCIPAL_ATTRIBUTES,
    )
    if not entries:
        return None
    if len(entries) > 1:
        raise PrincipalLookupError(f"{len(entries)} accounts match {assertion}")
    return _principal(*entries[0])


def _principal(dn: str, raw: dict[str, list[bytes]]) -> Principal:
    try:
        return _decode_principal(dn, raw)
    except (SecurityDataError, MalformedAttributeValue) as exc:
        raise PrincipalLookupError(f"{dn} is not a usable account: {exc}") from None


def _decode_principal(dn: str, raw: dict[str, list[bytes]]) -> Principal:
    sid = Sid.from_bytes(_single(raw, "objectSid", dn))
    primary_rid = _optional_int(raw, "primaryGroupID")
    control = _optional_int(raw, "userAccountControl") or 0
    guid = raw.get("objectGUID")
    classes = {value.lower() for value in raw.get("objectClass") or []}
    return Principal(
        dn=dn,
        sam_account_name=_text(_single(raw, "sAMAccountName", dn)),
        sid=str(sid),
        primary_group_sid=str(_domain_of(sid).with_rid(primary_rid)) if primary_rid else None,
        user_account_control=UserAccountControl(from_ad_int32(control)),
        user_principal_name=_optional_text(raw, "userPrincipalName"),
        dns_host_name=_optional_text(raw, "dNSHostName"),
        mail=_optional_text(raw, "mail"),
        object_guid=guid_from_bytes(guid[0]) if guid else None,
        kind="computer" if b"computer" in classes else "user",
        common_name=_optional_text(raw, "cn"),
    )


def group_sids(connection: Any, base: str, principal: Principal) -> frozenset[str]:
    """The SIDs of every group ``principal`` belongs to, directly or through nesting."""
    return group_memberships(connection, base, principal).sids


def group_memberships(connection: Any, base: str, principal: Principal) -> GroupMemberships:
    """The SIDs and names of every group ``principal`` belongs to, directly or nested."""
    sids: set[str] = set()
    names: set[str] = set()
    pending = [principal.dn]
    if principal.primary_group_sid is not None:
        sids.add(principal.primary_group_sid)
        sid_filter = escape_bytes(Sid.parse(principal.primary_group_sid).to_bytes())
        for dn, raw in _search(
            connection, base, f"(&(objectClass=group)(objectSid={sid_filter}))", GROUP_ATTRIBUTES
        ):
            names.add(_group_name(dn, raw))
            pending.append(dn)
    visited = {dn.lower() for dn in pending}
    while pending:
        member = pending.pop()
        found = _search(
            connection,
            base,
            f"(&(objectClass=group)(member={escape_filter_chars(member)}))",
            GROUP_ATTRIBUTES,
        )
        for dn, raw in found:
            if dn.lower() in visited:
                continue  # nesting loops are legal in AD
            visited.add(dn.lower())
            if not _security_group(raw):
                # A distribution group (mail) is in no access token, nor what it is a
                # member of through it: it grants nothing.
                continue
            sids.add(_sid(raw, dn))
            names.add(_group_name(dn, raw))
            if len(sids) > MAX_TOKEN_GROUPS:
                raise PrincipalLookupError(f"{principal.dn} is in more than 1024 groups")
            pending.append(dn)
    return GroupMemberships(frozenset(sids), frozenset(names))


def principal_token(connection: Any, base: str, principal: Principal) -> frozenset[str]:
    """Every SID an access check against ``principal`` uses (see :func:`token_sids`)."""
    return token_sids(principal.sid, group_sids(connection, base, principal))


def token_group_memberships(connection: Any, base: str, principal: Principal) -> GroupMemberships:
    """The groups AD itself puts in ``principal``'s token: its constructed tokenGroups.

    AD computes it (nested security groups, the primary group, domain-local and BUILTIN groups
    of the DC's domain) and returns it only on a base-scope read of the account. Names are
    looked up for audit records; a SID the domain does not name keeps the SID as its name.
    """
    if not connection.search(principal.dn, "(objectClass=*)", BASE, attributes=["tokenGroups"]):
        raise DirectorySearchFailed(f"tokenGroups of {principal.dn}: {connection.result}")
    entries = [item for item in connection.response or [] if item.get("type") == "searchResEntry"]
    raw: dict[str, list[bytes]] = entries[0]["raw_attributes"] if entries else {}
    values = raw.get("tokenGroups") or []
    if len(values) > MAX_TOKEN_GROUPS:
        raise PrincipalLookupError(f"{principal.dn} is in more than 1024 groups")
    try:
        sids = frozenset(str(Sid.from_bytes(value)) for value in values)
    except InvalidSid as exc:
        raise PrincipalLookupError(f"{principal.dn} has a malformed tokenGroups: {exc}") from None
    names = {sid: sid for sid in sids}
    for start in range(0, len(values), TOKEN_NAME_BATCH):
        chunk = values[start : start + TOKEN_NAME_BATCH]
        batch = "".join(f"(objectSid={escape_bytes(value)})" for value in chunk)
        for dn, group in _search(
            connection, base, f"(&(objectClass=group)(|{batch}))", GROUP_ATTRIBUTES
        ):
            names[_sid(group, dn)] = _group_name(dn, group)
    return GroupMemberships(sids, frozenset(names.values()))


def resolve_token(
    connection: Any, base: str, principal: Principal, *, token_groups: bool = False
) -> Principal:
    """``principal`` with its token SIDs and group names read from the directory.

    ``token_groups``: ask the directory for the token (AD's tokenGroups, see
    :func:`token_group_memberships`) instead of following `member` upwards, which is all the
    development directory offers.
    """
    groups = (token_group_memberships if token_groups else group_memberships)(
        connection, base, principal
    )
    return replace(
        principal,
        token_sids=token_sids(principal.sid, groups.sids),
        group_names=groups.names,
    )


def _group_name(dn: str, raw: dict[str, list[bytes]]) -> str:
    return _optional_text(raw, "sAMAccountName") or _optional_text(raw, "cn") or dn


def _security_group(raw: dict[str, list[bytes]]) -> bool:
    values = raw.get("groupType") or []
    try:
        group_type = from_ad_int32(int(values[0])) if len(values) == 1 else 0
    except (ValueError, MalformedAttributeValue):
        return False
    return bool(group_type & GroupType.SECURITY_ENABLED)


def _sid(raw: dict[str, list[bytes]], dn: str) -> str:
    try:
        return str(Sid.from_bytes(_single(raw, "objectSid", dn)))
    except InvalidSid as exc:
        raise PrincipalLookupError(f"{dn} has a malformed objectSid: {exc}") from None


def _domain_of(sid: Sid) -> Sid:
    return Sid(sid.authority, sid.sub_authorities[:-1])


def _search(
    connection: Any, base: str, search_filter: str, attributes: tuple[str, ...]
) -> list[tuple[str, dict[str, list[bytes]]]]:
    if not connection.search(base, search_filter, SUBTREE, attributes=list(attributes)):
        if connection.result.get("result") in (0, 32):  # success with no entry; noSuchObject
            return []
        raise DirectorySearchFailed(f"search {search_filter} failed: {connection.result}")
    return [
        (item["dn"], item["raw_attributes"])
        for item in connection.response
        if item.get("type") == "searchResEntry"
    ]


def _single(raw: dict[str, list[bytes]], attribute: str, dn: str) -> bytes:
    values = raw.get(attribute) or []
    if len(values) != 1:
        raise PrincipalLookupError(f"{dn} has {len(values)} {attribute} values, not 1")
    return values[0]


def _text(value: bytes) -> str:
    try:
        return value.decode()
    except UnicodeDecodeError:
        raise PrincipalLookupError("a directory string is not UTF-8") from None


def _optional_text(raw: dict[str, list[bytes]], attribute: str) -> str | None:
    values = raw.get(attribute)
    return _text(values[0]) if values else None


def _optional_int(raw: dict[str, list[bytes]], attribute: str) -> int | None:
    values = raw.get(attribute)
    if not values:
        return None
    try:
        return int(values[0])
    except ValueError:
        raise PrincipalLookupError(f"{attribute} is not an integer") from None
