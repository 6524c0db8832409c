"""Security principals read from the directory, and the SIDs of their tokens.

AD computes a logged-on principal's groups (tokenGroups); over plain LDAP, as against the
development directory, they are found by following `member` upwards: every group whose
`member` names the principal, then every group naming one of those, and so on. As in AD the
primary group (primaryGroupID, a RID in the principal's domain) does not list its members,
so it is added by SID and its own parents are followed from its DN.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from ldap3 import SUBTREE
from ldap3.utils.conv import escape_bytes, escape_filter_chars

from pkigate.adcs.encoding import from_ad_int32
from pkigate.adcs.flags import UserAccountControl
from pkigate.adcs.security import Sid, guid_from_bytes, token_sids

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
)


class PrincipalLookupError(RuntimeError):
    """The directory did not answer, or its answer does not describe a usable principal."""


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

    @property
    def disabled(self) -> bool:
        return bool(self.user_account_control & UserAccountControl.ACCOUNTDISABLE)


def find_principal(connection: Any, base: str, sam_account_name: str) -> Principal | None:
    """The account named ``sam_account_name`` under ``base``, or None if there is none."""
    name_filter = escape_filter_chars(sam_account_name)
    entries = _search(
        connection,
        base,
        f"(&(objectClass=user)(sAMAccountName={name_filter}))",  # computer derives from user
        PRINCIPAL_ATTRIBUTES,
    )
    if not entries:
        return None
    if len(entries) > 1:
        raise PrincipalLookupError(f"{len(entries)} accounts are named {sam_account_name!r}")
    dn, raw = entries[0]
    sid = Sid.from_bytes(_single(raw, "objectSid", dn))
    primary_rid = _optional_int(raw, "primaryGroupID")
    control = _optional_int(raw, "userAccountControl") or 0
    guid = raw.get("objectGUID")
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
    )


def group_sids(connection: Any, base: str, principal: Principal) -> frozenset[str]:
    """The SIDs of every group ``principal`` belongs to, directly or through nesting."""
    sids: set[str] = set()
    pending = [principal.dn]
    if principal.primary_group_sid is not None:
        sids.add(principal.primary_group_sid)
        sid_filter = escape_bytes(Sid.parse(principal.primary_group_sid).to_bytes())
        for dn, _raw in _search(
            connection, base, f"(&(objectClass=group)(objectSid={sid_filter}))", ("objectSid",)
        ):
            pending.append(dn)
    visited = {dn.lower() for dn in pending}
    while pending:
        member = pending.pop()
        found = _search(
            connection,
            base,
            f"(&(objectClass=group)(member={escape_filter_chars(member)}))",
            ("objectSid",),
        )
        for dn, raw in found:
            if dn.lower() in visited:
                continue  # nesting loops are legal in AD
            visited.add(dn.lower())
            sids.add(str(Sid.from_bytes(_single(raw, "objectSid", dn))))
            if len(sids) > MAX_TOKEN_GROUPS:
                raise PrincipalLookupError(f"{principal.dn} is in more than 1024 groups")
            pending.append(dn)
    return frozenset(sids)


def principal_token(connection: Any, base: str, principal: Principal) -> frozenset[str]:
    """Every SID an access check against ``principal`` uses (see :func:`token_sids`)."""
    return token_sids(principal.sid, group_sids(connection, base, principal))


def _domain_of(sid: Sid) -> Sid:
    return Sid(sid.authority, sid.sub_authorities[:-1])


def _search(
    connection: Any, base: str, search_filter: str, attributes: tuple[str, ...]
) -> list[tuple[str, dict[str, list[bytes]]]]:
    if not connection.search(base, search_filter, SUBTREE, attributes=list(attributes)):
        if connection.result.get("result") in (0, 32):  # success with no entry; noSuchObject
            return []
        raise PrincipalLookupError(f"search {search_filter} failed: {connection.result}")
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
