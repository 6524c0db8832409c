"""The example domain that the development directory starts with, as LDIF.

Built in code rather than shipped as a file because SIDs, GUIDs, password hashes and the
binary security descriptors of the templates have to be computed. The domain:

* users ``Administrator`` (Domain Admins), ``alice`` (Web Admins, itself a member of PKI
  Users), ``bob`` (disabled: userAccountControl 0x202), ``carol`` (Denied Users) and ``eve``
  (nothing beyond Domain Users);
* computers ``WS01$`` and ``SRV01$`` with dNSHostName ``ws01.<domain>`` and ``srv01.<domain>``;
* as in AD, every user's primary group is Domain Users (RID 513) and every computer's Domain
  Computers (515), through primaryGroupID and not through those groups' `member`;
* certificate templates ``Machine``, ``User``, ``WebServer``, ``UserPending`` (every request
  waits for approval) and ``ESC1Vulnerable`` (deliberately dangerous: client authentication,
  the enrollee supplies the subject, any domain user may enroll), under
  CN=Certificate Templates, and an empty CN=Enrollment Services.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

from pkigate.adcs import layout
from pkigate.adcs.catalogue import (
    EDITED_TEMPLATE,
    ENHANCED_PROVIDER,
    OID_CLIENT_AUTH,
    OID_EMAIL_PROTECTION,
    SIGNING_AND_ENCRYPTION,
    TEMPLATE_OID_ARC,
    USER_NAME_FLAGS,
    AttributeValue,
    TemplateDefinition,
    esc1_vulnerable_template,
    machine_template,
    readers,
    user_template,
    web_server_template,
)
from pkigate.adcs.encoding import to_ad_int32
from pkigate.adcs.flags import (
    RID_ADMINISTRATOR,
    RID_DOMAIN_ADMINS,
    RID_DOMAIN_COMPUTERS,
    RID_DOMAIN_USERS,
    EnrollmentFlag,
    GroupType,
    PrivateKeyFlag,
    SamAccountType,
    UserAccountControl,
)
from pkigate.adcs.security import (
    AUTOENROLL_RIGHT,
    ENROLL_RIGHT,
    InvalidSid,
    Sid,
    allow,
    deny,
)

DEFAULT_BASE = "DC=example,DC=test"

GLOBAL_SECURITY_GROUP = GroupType.SECURITY_ENABLED | GroupType.ACCOUNT_GROUP
GENERATED_PASSWORD_BYTES = 18


class AccountKind(Enum):
    USER = "user"
    COMPUTER = "computer"


@dataclass(frozen=True)
class SeedAccount:
    """A user or computer account of the example domain."""

    name: str
    """sAMAccountName (computers end in "$")."""
    kind: AccountKind
    dn: str
    sid: str
    password: str
    """Its password in clear, for simple binds in tests and development."""
    disabled: bool = False


@dataclass(frozen=True)
class SeedGroup:
    name: str
    dn: str
    sid: str
    members: tuple[str, ...]
    """DNs listed in `member` (primary-group members are not)."""


@dataclass(frozen=True)
class LdifEntry:
    dn: str
    attributes: tuple[tuple[str, tuple[AttributeValue, ...]], ...]

    def values(self, attribute: str) -> tuple[AttributeValue, ...]:
        for name, values in self.attributes:
            if name.lower() == attribute.lower():
                return values
        return ()


@dataclass(frozen=True)
class Seed:
    """The example domain: its entries in parent-first order and what tests need to know."""

    base: str
    domain: str
    """DNS name of the domain, e.g. example.test."""
    domain_sid: str
    accounts: Mapping[str, SeedAccount]
    """By sAMAccountName."""
    groups: Mapping[str, SeedGroup]
    """By sAMAccountName ("Domain Users", "Web Admins", …)."""
    templates: tuple[str, ...]
    """Certificate template names (their cn)."""
    entries: tuple[LdifEntry, ...] = field(repr=False)

    def ldif(self) -> str:
        """The entries as LDIF (RFC 2849), binary and non-ASCII values base64-encoded."""
        return "\n".join(_ldif_record(entry) for entry in self.entries)


def build_seed(
    base: str = DEFAULT_BASE,
    *,
    domain_sid: str | None = None,
    passwords: Mapping[str, str] | None = None,
) -> Seed:
    """The example domain under ``base`` (DC components only, e.g. DC=example,DC=test).

    ``domain_sid`` (S-1-5-21-x-y-z) is random when not given; so are the passwords of the
    accounts not named in ``passwords``.
    """
    builder = _SeedBuilder(base, _domain_sid(domain_sid), dict(passwords or {}))
    return builder.build()


def template_entries(base: str, group_sids: Mapping[str, str]) -> tuple[LdifEntry, ...]:
    """The example domain's certificate templates alone, for a domain that has its own
    accounts and groups (a Samba or Windows DC in tests).

    ``group_sids``: the SIDs of the groups the templates' security descriptors name, by
    sAMAccountName: Domain Admins, Domain Users, Domain Computers, PKI Users, Web Admins and
    Denied Users. The entries carry an objectGUID, which a DC assigns itself: leave it out.
    """
    domain = Sid.parse(group_sids["Domain Users"])
    builder = _SeedBuilder(base, Sid(domain.authority, domain.sub_authorities[:-1]), {})
    builder.groups = {name: SeedGroup(name, "", sid, ()) for name, sid in group_sids.items()}
    builder._templates()
    return tuple(builder.entries)


def ssha512(password: str) -> str:
    """A userPassword value slapd verifies with its pw-sha2 module: {SSHA512}."""
    salt = os.urandom(16)
    digest = hashlib.sha512(password.encode() + salt).digest()
    return "{SSHA512}" + base64.b64encode(digest + salt).decode()


def _domain_sid(text: str | None) -> Sid:
    if text is None:
        return Sid(5, (21, *(secrets.randbits(32) for _ in range(3))))
    sid = Sid.parse(text)
    if sid.authority != 5 or len(sid.sub_authorities) != 4 or sid.sub_authorities[0] != 21:
        raise InvalidSid(f"a domain SID has the form S-1-5-21-x-y-z, not {text}")
    return sid


class _SeedBuilder:
    def __init__(self, base: str, domain_sid: Sid, passwords: dict[str, str]) -> None:
        self.base = base
        self.domain = layout.dns_domain(base)
        self.domain_sid = domain_sid
        self.passwords = passwords
        self.users_dn = f"CN=Users,{base}"
        self.computers_dn = f"CN=Computers,{base}"
        self.entries: list[LdifEntry] = []
        self.accounts: dict[str, SeedAccount] = {}
        self.groups: dict[str, SeedGroup] = {}
        self.template_oid_base = ".".join(
            (TEMPLATE_OID_ARC, *(str(secrets.randbelow(1 << 24)) for _ in range(6)))
        )

    def sid(self, rid: int) -> str:
        return str(self.domain_sid.with_rid(rid))

    def build(self) -> Seed:
        self._containers()
        self._accounts()
        self._groups()
        templates = self._templates()
        return Seed(
            base=self.base,
            domain=self.domain,
            domain_sid=str(self.domain_sid),
            accounts=dict(self.accounts),
            groups=dict(self.groups),
            templates=tuple(spec.name for spec in templates),
            entries=tuple(self.entries),
        )

    def add(self, dn: str, **attributes: AttributeValue | Sequence[AttributeValue]) -> None:
        """Queue an entry; "_" in a keyword stands for "-" (msPKI_RA_Signature)."""
        encoded: list[tuple[str, tuple[AttributeValue, ...]]] = []
        for name, value in attributes.items():
            values = tuple(value) if isinstance(value, list | tuple) else (value,)
            if values:
                encoded.append((name.replace("_", "-"), values))
        self.entries.append(LdifEntry(dn, tuple(encoded)))

    def _containers(self) -> None:
        self.add(
            self.base,
            objectClass=["top", "domain", "domainDNS"],
            dc=layout.domain_components(self.base)[0],
            description=f"pkigate development domain {self.domain}",
            objectSid=self.domain_sid.to_bytes(),
            objectGUID=_guid(),
        )
        configuration = layout.configuration_dn(self.base)
        for dn in (
            self.users_dn,
            self.computers_dn,
            configuration,
            f"CN=Services,{configuration}",
            layout.public_key_services_dn(self.base),
            layout.certificate_templates_dn(self.base),
            layout.enrollment_services_dn(self.base),
        ):
            name = dn.split(",", 1)[0].removeprefix("CN=")
            self.add(dn, objectClass=["top", "container"], cn=name, objectGUID=_guid())

    def _account(
        self,
        name: str,
        rid: int,
        *,
        given_name: str,
        surname: str,
        primary_group: int = RID_DOMAIN_USERS,
        control: UserAccountControl = UserAccountControl.NORMAL_ACCOUNT,
    ) -> SeedAccount:
        dn = f"{layout.rdn(f'{given_name} {surname}'.strip())},{self.users_dn}"
        password = self.passwords.get(name) or secrets.token_urlsafe(GENERATED_PASSWORD_BYTES)
        disabled = bool(control & UserAccountControl.ACCOUNTDISABLE)
        account = SeedAccount(name, AccountKind.USER, dn, self.sid(rid), password, disabled)
        self.add(
            dn,
            objectClass=["top", "person", "organizationalPerson", "user"],
            cn=f"{given_name} {surname}".strip(),
            sn=surname or given_name,
            givenName=given_name,
            displayName=f"{given_name} {surname}".strip(),
            sAMAccountName=name,
            userPrincipalName=f"{name}@{self.domain}",
            mail=f"{name}@{self.domain}",
            objectSid=Sid.parse(account.sid).to_bytes(),
            objectGUID=_guid(),
            sAMAccountType=int(SamAccountType.USER_OBJECT),
            userAccountControl=int(control),
            primaryGroupID=primary_group,
            userPassword=ssha512(password),
        )
        self.accounts[name] = account
        return account

    def _computer(self, host: str, rid: int) -> SeedAccount:
        name = f"{host.upper()}$"
        dn = f"{layout.rdn(host.upper())},{self.computers_dn}"
        password = self.passwords.get(name) or secrets.token_urlsafe(GENERATED_PASSWORD_BYTES)
        account = SeedAccount(name, AccountKind.COMPUTER, dn, self.sid(rid), password)
        self.add(
            dn,
            objectClass=["top", "person", "organizationalPerson", "user", "computer"],
            cn=host.upper(),
            sn=host.upper(),  # slapd's person requires sn; AD's does not
            sAMAccountName=name,
            dNSHostName=f"{host.lower()}.{self.domain}",
            objectSid=Sid.parse(account.sid).to_bytes(),
            objectGUID=_guid(),
            sAMAccountType=int(SamAccountType.MACHINE_ACCOUNT),
            userAccountControl=int(UserAccountControl.WORKSTATION_TRUST_ACCOUNT),
            primaryGroupID=RID_DOMAIN_COMPUTERS,
            userPassword=ssha512(password),
        )
        self.accounts[name] = account
        return account

    def _accounts(self) -> None:
        self._account(
            "Administrator",
            RID_ADMINISTRATOR,
            given_name="Administrator",
            surname="",
            control=UserAccountControl.NORMAL_ACCOUNT | UserAccountControl.DONT_EXPIRE_PASSWORD,
        )
        self._account("alice", 1104, given_name="Alice", surname="Archer")
        self._account(
            "bob",
            1105,
            given_name="Bob",
            surname="Baker",
            control=UserAccountControl.NORMAL_ACCOUNT | UserAccountControl.ACCOUNTDISABLE,
        )
        self._account("carol", 1106, given_name="Carol", surname="Cooper")
        self._account("eve", 1107, given_name="Eve", surname="Evans")
        self._computer("ws01", 1108)
        self._computer("srv01", 1109)

    def _group(self, name: str, rid: int, description: str, members: Sequence[str]) -> None:
        dn = f"{layout.rdn(name)},{self.users_dn}"
        group = SeedGroup(name, dn, self.sid(rid), tuple(members))
        self.add(
            dn,
            objectClass=["top", "group"],
            cn=name,
            sAMAccountName=name,
            description=description,
            groupType=to_ad_int32(int(GLOBAL_SECURITY_GROUP)),
            objectSid=Sid.parse(group.sid).to_bytes(),
            objectGUID=_guid(),
            sAMAccountType=int(SamAccountType.GROUP_OBJECT),
            member=list(members),
        )
        self.groups[name] = group

    def _groups(self) -> None:
        dn = {name: account.dn for name, account in self.accounts.items()}
        web_admins = f"{layout.rdn('Web Admins')},{self.users_dn}"
        self._group(
            "Domain Admins", RID_DOMAIN_ADMINS, "Domain administrators", [dn["Administrator"]]
        )
        # Primary-group members: AD does not list them in `member` ([MS-ADA3] 2.120).
        self._group("Domain Users", RID_DOMAIN_USERS, "All domain users", [])
        self._group("Domain Computers", RID_DOMAIN_COMPUTERS, "All domain computers", [])
        self._group("PKI Users", 1101, "May enroll for held user certificates", [web_admins])
        self._group("Web Admins", 1102, "May enroll for web server certificates", [dn["alice"]])
        self._group("Denied Users", 1103, "Denied user certificates", [dn["carol"]])

    def _templates(self) -> list[TemplateDefinition]:
        sid = self.groups
        read = readers(sid["Domain Admins"].sid)
        specs = [
            machine_template(
                (
                    *read,
                    allow(sid["Domain Computers"].sid, ENROLL_RIGHT),
                    allow(sid["Domain Computers"].sid, AUTOENROLL_RIGHT),
                )
            ),
            # Canonical order, as AD's tools write it: the explicit deny first.
            user_template(
                (
                    deny(sid["Denied Users"].sid, ENROLL_RIGHT),
                    *read,
                    allow(sid["Domain Users"].sid, ENROLL_RIGHT),
                )
            ),
            web_server_template((*read, allow(sid["Web Admins"].sid, ENROLL_RIGHT))),
            TemplateDefinition(
                name="UserPending",
                display_name="User (manager approval)",
                extended_key_usages=(OID_CLIENT_AUTH, OID_EMAIL_PROTECTION),
                key_usage=SIGNING_AND_ENCRYPTION,
                name_flags=USER_NAME_FLAGS,
                enrollment_flags=EnrollmentFlag.PEND_ALL_REQUESTS
                | EnrollmentFlag.INCLUDE_SYMMETRIC_ALGORITHMS,
                private_key_flags=PrivateKeyFlag(0),
                general_flags=EDITED_TEMPLATE,
                provider=ENHANCED_PROVIDER,
                aces=(*read, allow(sid["PKI Users"].sid, ENROLL_RIGHT)),
            ),
            # ESC1: any domain user may ask for a client-authentication certificate in any
            # name, with no approval: the security tests must see the connector refuse it.
            esc1_vulnerable_template((*read, allow(sid["Domain Users"].sid, ENROLL_RIGHT))),
        ]
        for index, spec in enumerate(specs, start=1):
            self._template(spec, f"{self.template_oid_base}.{index}.1")
        return specs

    def _template(self, spec: TemplateDefinition, oid: str) -> None:
        attributes = spec.attributes(oid, owner_sid=self.groups["Domain Admins"].sid)
        self.entries.append(
            LdifEntry(
                layout.template_dn(self.base, spec.name),
                (
                    ("objectClass", ("top", "pKICertificateTemplate")),
                    *attributes.items(),
                    ("objectGUID", (_guid(),)),
                ),
            )
        )


def _guid() -> bytes:
    return uuid.uuid4().bytes_le


# --- LDIF (RFC 2849) -------------------------------------------------------------------------

_UNSAFE_INITIAL = frozenset(" :<")


def _is_safe_string(text: str) -> bool:
    if not text:
        return True
    if text[0] in _UNSAFE_INITIAL or text.endswith(" "):
        return False
    return all(0x01 <= ord(char) <= 0x7F and char not in "\r\n" for char in text)


def _ldif_line(attribute: str, value: AttributeValue) -> str:
    if isinstance(value, int):
        return f"{attribute}: {value}"
    if isinstance(value, str) and _is_safe_string(value):
        return f"{attribute}: {value}"
    raw = value.encode() if isinstance(value, str) else value
    return f"{attribute}:: {base64.b64encode(raw).decode()}"


def _ldif_record(entry: LdifEntry) -> str:
    lines = [_ldif_line("dn", entry.dn)]
    for attribute, values in entry.attributes:
        lines.extend(_ldif_line(attribute, value) for value in values)
    return "\n".join(lines) + "\n"
