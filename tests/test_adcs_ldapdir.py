"""The AD-style connector's directory view, against the development directory (real slapd)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from adcs_directory_fixture import make_dev_directory_fixture
from ldap3 import MODIFY_ADD, MODIFY_DELETE, MODIFY_REPLACE

from pkigate.adcs import layout
from pkigate.adcs.directory import DevDirectory, slapd_available
from pkigate.adcs.encoding import interval_to_filetime, key_usage_to_bytes, to_ad_int32
from pkigate.adcs.flags import (
    CertificateNameFlag,
    EnrollmentFlag,
    GroupType,
    KeyUsage,
    TemplateFlag,
)
from pkigate.adcs.ldapdir import (
    INVALID_CREDENTIALS_MESSAGE,
    Directory,
    DirectoryUnavailable,
    InvalidCredentials,
    Principal,
    PrincipalDisabled,
)
from pkigate.adcs.security import (
    AUTHENTICATED_USERS,
    ENROLL_RIGHT,
    EVERYONE,
    Sid,
    allow,
    build_security_descriptor,
    enroll_rights,
)
from pkigate.adcs.templates import CertificateTemplate, TemplateError

dev_directory = make_dev_directory_fixture(scope="module")

SEEDED_TEMPLATES = {"Machine", "User", "WebServer", "UserPending", "ESC1Vulnerable"}
CLIENT_AUTH = "1.3.6.1.5.5.7.3.2"
SERVER_AUTH = "1.3.6.1.5.5.7.3.1"
EMAIL_PROTECTION = "1.3.6.1.5.5.7.3.4"
EFS = "1.3.6.1.4.1.311.10.3.4"
SMARTCARD_LOGON = "1.3.6.1.4.1.311.20.2.2"
ANY_PURPOSE = "2.5.29.37.0"
TIMEOUT = 2.0


def connect(directory: DevDirectory, *, cache_ttl: float = 30.0) -> Directory:
    return Directory(
        directory.url,
        directory.base,
        directory.admin_dn,
        directory.admin_password,
        cache_ttl=cache_ttl,
        timeout=TIMEOUT,
    )


@pytest.fixture
def ldap(dev_directory: DevDirectory) -> Directory:
    return connect(dev_directory)


def password(directory: DevDirectory, account: str) -> str:
    return directory.accounts[account].password


# --- templates --------------------------------------------------------------------------------


def test_every_seeded_template_decodes_with_a_year_of_validity_and_six_weeks_of_renewal(
    ldap: Directory,
    dev_directory: DevDirectory,
) -> None:
    templates = ldap.templates()
    assert set(templates) >= SEEDED_TEMPLATES
    assert not SEEDED_TEMPLATES & set(ldap.template_errors())
    for name in SEEDED_TEMPLATES:
        template = templates[name]
        assert template.name == name
        assert template.dn.lower() == layout.template_dn(dev_directory.base, name).lower()
        assert template.validity == timedelta(days=365)
        assert template.overlap == timedelta(weeks=6)
        assert (template.schema_version, template.revision, template.minor_revision) == (2, 100, 1)
        assert template.oid is not None and template.oid.startswith("1.3.6.1.4.1.311.21.8.")
        assert template.minimal_key_size == 2048
        assert template.key_usage == {"digital_signature", "key_encipherment"}
        assert template.critical_extensions == ("2.5.29.15",)
        assert template.application_policies == template.ekus
        assert template.ra_signatures == 0 and template.ra_application_policies == ()
        assert template.security_descriptor[0] == 1  # a self-relative descriptor, revision 1


def test_machine_template_names_the_host_and_autoenrolls(ldap: Directory) -> None:
    machine = ldap.templates()["Machine"]
    assert machine.display_name == "Computer"
    assert set(machine.ekus) == {CLIENT_AUTH, SERVER_AUTH}
    assert machine.subject_dns_as_cn and machine.requires_dns
    assert not (machine.requires_upn or machine.enrollee_supplies_subject)
    assert machine.autoenrollment and machine.machine_type
    assert TemplateFlag.AUTO_ENROLLMENT in machine.general_flags
    assert machine.client_authentication


def test_user_template_flags_with_bit_31_set_decode(ldap: Directory) -> None:
    user = ldap.templates()["User"]
    assert set(user.ekus) == {CLIENT_AUTH, EMAIL_PROTECTION, EFS}
    assert user.subject_requires_directory_path  # bit 31: AD stores the word negative
    assert user.requires_upn and user.requires_email and user.subject_requires_email
    assert not user.requires_dns and not user.enrollee_supplies_subject
    assert EnrollmentFlag.PUBLISH_TO_DS in user.enrollment_flags
    assert user.exportable_key and not user.pend_all_requests


def test_webserver_lets_the_enrollee_name_the_subject_but_does_not_authenticate(
    ldap: Directory,
) -> None:
    web = ldap.templates()["WebServer"]
    assert web.display_name == "Web Server"
    assert web.ekus == (SERVER_AUTH,)
    assert web.enrollee_supplies_subject
    assert not web.client_authentication and not web.any_purpose_or_no_eku


def test_user_pending_holds_every_request(ldap: Directory) -> None:
    assert ldap.templates()["UserPending"].pend_all_requests
    assert not ldap.templates()["User"].pend_all_requests


def test_esc1_template_is_recognisable_as_dangerous(ldap: Directory) -> None:
    esc1 = ldap.templates()["ESC1Vulnerable"]
    assert esc1.enrollee_supplies_subject and esc1.client_authentication
    assert esc1.name_flags == CertificateNameFlag.ENROLLEE_SUPPLIES_SUBJECT
    assert not esc1.pend_all_requests and esc1.ra_signatures == 0
    assert not esc1.no_security_extension and not esc1.any_purpose_or_no_eku


def test_template_lookup_ignores_case_as_ad_does(ldap: Directory) -> None:
    found = ldap.template("webserver")
    assert found is not None and found.name == "WebServer"
    assert ldap.template("NoSuchTemplate") is None


def test_template_rights_follow_the_authenticated_token(
    ldap: Directory, dev_directory: DevDirectory
) -> None:
    templates = ldap.templates()
    alice = ldap.authenticate("alice", password(dev_directory, "alice"))
    eve = ldap.authenticate("eve", password(dev_directory, "eve"))
    assert enroll_rights(templates["WebServer"].security_descriptor, alice.token_sids).enroll
    assert enroll_rights(templates["UserPending"].security_descriptor, alice.token_sids).enroll
    assert not enroll_rights(templates["WebServer"].security_descriptor, eve.token_sids).enroll


def test_malformed_template_in_the_directory_is_reported_and_left_out(
    ldap: Directory, dev_directory: DevDirectory
) -> None:
    dn = layout.template_dn(dev_directory.base, "BrokenPeriod")
    admin = dev_directory.admin_connection()
    assert admin.add(
        dn,
        ["top", "pKICertificateTemplate"],
        {"cn": "BrokenPeriod", "pKIExpirationPeriod": b"\x00" * 7},
    ), admin.result
    try:
        assert "BrokenPeriod" not in ldap.templates()
        error = ldap.template_errors()["BrokenPeriod"]
        assert "pKIExpirationPeriod" in error and "8 bytes" in error
        assert set(ldap.templates()) >= SEEDED_TEMPLATES
    finally:
        admin.delete(dn)


def test_a_template_changed_in_ldap_is_seen_only_after_the_cache_ttl(
    dev_directory: DevDirectory,
) -> None:
    ldap = connect(dev_directory, cache_ttl=0.5)
    dn = layout.template_dn(dev_directory.base, "WebServer")
    assert ldap.templates()["WebServer"].minor_revision == 1
    admin = dev_directory.admin_connection()
    assert admin.modify(dn, {"msPKI-Template-Minor-Revision": [(MODIFY_REPLACE, [2])]})
    try:
        assert ldap.templates()["WebServer"].minor_revision == 1  # still the cached snapshot
        time.sleep(0.6)
        assert ldap.templates()["WebServer"].minor_revision == 2
    finally:
        admin.modify(dn, {"msPKI-Template-Minor-Revision": [(MODIFY_REPLACE, [1])]})


# --- decoding without a directory ------------------------------------------------------------


def raw_template(**overrides: list[bytes] | None) -> dict[str, list[bytes]]:
    """A well-formed template's raw attributes; an override of None removes the attribute."""
    owner = "S-1-5-21-1-2-3-512"
    raw = {
        "cn": [b"Probe"],
        "msPKI-Template-Schema-Version": [b"2"],
        "pKIExpirationPeriod": [interval_to_filetime(timedelta(days=90))],
        "pKIOverlapPeriod": [interval_to_filetime(timedelta(days=10))],
        "pKIExtendedKeyUsage": [CLIENT_AUTH.encode()],
        "msPKI-Certificate-Application-Policy": [CLIENT_AUTH.encode()],
        "pKIKeyUsage": [key_usage_to_bytes(KeyUsage.DIGITAL_SIGNATURE)],
        "msPKI-Certificate-Name-Flag": [b"0"],
        "nTSecurityDescriptor": [build_security_descriptor(owner, [allow(owner, ENROLL_RIGHT)])],
    }
    for name, value in overrides.items():
        attribute = name.replace("_", "-")
        if value is None:
            raw.pop(attribute, None)
        else:
            raw[attribute] = value
    return raw


def decode(**overrides: list[bytes] | None) -> CertificateTemplate:
    return CertificateTemplate.from_entry(
        "CN=Probe,CN=Certificate Templates", raw_template(**overrides)
    )


def test_decoding_a_minimal_template_fills_defaults() -> None:
    template = decode()
    assert template.validity == timedelta(days=90) and template.overlap == timedelta(days=10)
    assert template.display_name == "Probe" and template.oid is None
    assert template.key_usage == {"digital_signature"}
    assert (template.minimal_key_size, template.ra_signatures, template.revision) == (0, 0, 0)
    assert template.enrollment_flags == EnrollmentFlag(0)


def test_attribute_names_are_matched_without_case_or_options() -> None:
    raw = {name.upper(): values for name, values in raw_template().items()}
    raw["NTSECURITYDESCRIPTOR;binary"] = raw.pop("NTSECURITYDESCRIPTOR")
    assert CertificateTemplate.from_entry("CN=Probe", raw).name == "Probe"


@pytest.mark.parametrize(
    ("overrides", "attribute", "reason"),
    [
        ({"pKIExpirationPeriod": [b"\xff" * 7]}, "pKIExpirationPeriod", "8 bytes"),
        ({"pKIOverlapPeriod": [(10).to_bytes(8, "little")]}, "pKIOverlapPeriod", "negative"),
        ({"pKIExpirationPeriod": None}, "pKIExpirationPeriod", "missing"),
        ({"msPKI-Certificate-Name-Flag": [b"abc"]}, "msPKI-Certificate-Name-Flag", "integer"),
        ({"msPKI-Enrollment-Flag": [b"1_000"]}, "msPKI-Enrollment-Flag", "integer"),
        ({"flags": [b" 2"]}, "flags", "integer"),
        ({"msPKI-Private-Key-Flag": [b"4294967296"]}, "msPKI-Private-Key-Flag", "32-bit"),
        ({"msPKI-Minimal-Key-Size": [b"-1"]}, "msPKI-Minimal-Key-Size", "below 0"),
        ({"msPKI-RA-Signature": [b"0", b"1"]}, "msPKI-RA-Signature", "2 values"),
        ({"pKIExtendedKeyUsage": [b"clientAuth"]}, "pKIExtendedKeyUsage", "dotted OID"),
        ({"msPKI-Cert-Template-OID": [b"1.3..6"]}, "msPKI-Cert-Template-OID", "dotted OID"),
        ({"pKIKeyUsage": [b"\x80\x00\x00"]}, "pKIKeyUsage", "1 or 2 bytes"),
        ({"displayName": [b"\xff\xfe"]}, "displayName", "UTF-8"),
        ({"msPKI-Template-Schema-Version": [b"5"]}, "msPKI-Template-Schema-Version", "5"),
        ({"nTSecurityDescriptor": None}, "nTSecurityDescriptor", "missing"),
        ({"nTSecurityDescriptor": [b"\x01\x00"]}, "nTSecurityDescriptor", "header"),
        (
            {"msPKI-RA-Application-Policies": [b"msPKI-Asymmetric-Algorithm`RSA`"]},
            "msPKI-RA-Application-Policies",
            "triplets",
        ),
    ],
)
def test_malformed_values_raise_a_template_error_naming_the_attribute(
    overrides: dict[str, list[bytes] | None], attribute: str, reason: str
) -> None:
    with pytest.raises(TemplateError) as raised:
        CertificateTemplate.from_entry("CN=Probe", raw_template(**overrides))
    assert (raised.value.template_name, raised.value.attribute) == ("Probe", attribute)
    assert reason in raised.value.reason


def test_template_without_a_name_is_refused_under_its_dn() -> None:
    with pytest.raises(TemplateError) as raised:
        CertificateTemplate.from_entry(
            "CN=Nameless,CN=Certificate Templates", raw_template(cn=None)
        )
    assert raised.value.template_name == "CN=Nameless,CN=Certificate Templates"


def test_flag_words_with_bit_31_read_back_negative_are_decoded() -> None:
    word = (
        CertificateNameFlag.SUBJECT_REQUIRE_DIRECTORY_PATH
        | CertificateNameFlag.SUBJECT_ALT_REQUIRE_UPN
    )
    template = decode(msPKI_Certificate_Name_Flag=[str(to_ad_int32(int(word))).encode()])
    assert template.name_flags == word
    assert template.subject_requires_directory_path and template.requires_upn


@pytest.mark.parametrize(
    ("ekus", "policies", "schema", "authenticates", "anything"),
    [
        ([CLIENT_AUTH], [CLIENT_AUTH], b"2", True, False),
        ([SMARTCARD_LOGON], [SMARTCARD_LOGON], b"2", True, False),
        (["1.3.6.1.5.2.3.4"], ["1.3.6.1.5.2.3.4"], b"2", True, False),  # PKINIT client
        ([ANY_PURPOSE], [ANY_PURPOSE], b"2", True, True),
        ([], [], b"2", True, True),  # no EKU: good for anything
        ([SERVER_AUTH], [], b"2", True, True),  # v2 issues the (empty) application policies
        ([SERVER_AUTH], [SERVER_AUTH], b"2", False, False),
        ([SERVER_AUTH], [], b"1", False, False),  # v1 issues pKIExtendedKeyUsage
        ([SERVER_AUTH], [CLIENT_AUTH], b"2", True, False),
    ],
)
def test_authentication_ekus_follow_the_adcs_abuse_definition(
    ekus: list[str], policies: list[str], schema: bytes, authenticates: bool, anything: bool
) -> None:
    template = decode(
        pKIExtendedKeyUsage=[eku.encode() for eku in ekus],
        msPKI_Certificate_Application_Policy=[policy.encode() for policy in policies],
        msPKI_Template_Schema_Version=[schema],
    )
    assert template.client_authentication is authenticates
    assert template.any_purpose_or_no_eku is anything


def test_ra_application_policies_are_read_from_schema_3_triplets() -> None:
    value = (
        "msPKI-RA-Application-Policies`PZPWSTR`1.3.6.1.4.1.311.20.2.1,1.3.6.1.5.5.7.3.2`"
        "msPKI-Asymmetric-Algorithm`PZPWSTR`RSA`msPKI-Key-Usage`DWORD`16777215`"
    )
    template = decode(
        msPKI_Template_Schema_Version=[b"3"],
        msPKI_RA_Application_Policies=[value.encode()],
        msPKI_RA_Signature=[b"1"],
    )
    assert template.ra_application_policies == ("1.3.6.1.4.1.311.20.2.1", CLIENT_AUTH)
    assert template.ra_signatures == 1


# --- authentication ---------------------------------------------------------------------------


def test_alice_authenticates_with_her_password(
    ldap: Directory, dev_directory: DevDirectory
) -> None:
    alice = ldap.authenticate("alice", password(dev_directory, "alice"))
    assert isinstance(alice, Principal)
    assert alice.dn.lower() == dev_directory.accounts["alice"].dn.lower()
    assert alice.sam_account_name == "alice" and alice.kind == "user"
    assert alice.sid == dev_directory.accounts["alice"].sid
    assert alice.upn == "alice@example.test" and alice.mail == "alice@example.test"
    assert alice.common_name == "Alice Archer" and alice.dns_host_name is None
    assert not alice.disabled


@pytest.mark.parametrize(
    "username",
    [
        "alice@example.test",
        "ALICE@Example.Test",
        "EXAMPLE\\alice",
        "example\\alice",
        "example.test\\alice",
        "ALICE",
    ],
)
def test_alice_authenticates_by_upn_and_domain_qualified_names(
    ldap: Directory, dev_directory: DevDirectory, username: str
) -> None:
    assert ldap.authenticate(username, password(dev_directory, "alice")).sam_account_name == "alice"


@pytest.mark.parametrize("username", ["WS01$", "ws01$", "EXAMPLE\\WS01$", "ws01$@example.test"])
def test_machine_account_authenticates_as_a_computer(
    ldap: Directory, dev_directory: DevDirectory, username: str
) -> None:
    ws01 = ldap.authenticate(username, password(dev_directory, "WS01$"))
    assert ws01.kind == "computer" and ws01.sam_account_name == "WS01$"
    assert ws01.dns_host_name == "ws01.example.test" and ws01.upn is None
    assert dev_directory.groups["Domain Computers"].sid in ws01.token_sids
    assert ws01.group_names == {"Domain Computers"}


@pytest.mark.parametrize(
    ("username", "secret"),
    [
        ("alice", "not her password"),
        ("alice", ""),  # an unauthenticated bind would succeed: refused before binding
        ("mallory", "whatever"),
        ("mallory@example.test", "whatever"),
        ("OTHER\\alice", "<alice>"),  # another domain's alice is not this one
        ("alice@other.test", "<alice>"),
        ("*", "<alice>"),
        ("al*", "<alice>"),
        ("alice)(objectClass=*", "<alice>"),
        ("EXAMPLE\\", "<alice>"),
        ("", "<alice>"),
        ("alice\x00", "<alice>"),
        ("eve", "<alice>"),  # alice's password does not open eve's account
    ],
)
def test_bad_credentials_all_get_the_same_answer(
    ldap: Directory, dev_directory: DevDirectory, username: str, secret: str
) -> None:
    secret = secret.replace("<alice>", password(dev_directory, "alice"))
    with pytest.raises(InvalidCredentials) as raised:
        ldap.authenticate(username, secret)
    assert str(raised.value) == INVALID_CREDENTIALS_MESSAGE


def test_disabled_account_is_refused_once_its_password_is_right(
    ldap: Directory, dev_directory: DevDirectory
) -> None:
    with pytest.raises(PrincipalDisabled):
        ldap.authenticate("bob", password(dev_directory, "bob"))
    with pytest.raises(InvalidCredentials):  # a wrong password learns nothing about bob
        ldap.authenticate("bob", "guess")


def test_alice_token_holds_nested_and_primary_groups_and_well_known_sids(
    ldap: Directory, dev_directory: DevDirectory
) -> None:
    alice = ldap.authenticate("alice", password(dev_directory, "alice"))
    groups = dev_directory.groups
    assert alice.token_sids == {
        alice.sid,
        groups["Web Admins"].sid,  # her direct group
        groups["PKI Users"].sid,  # Web Admins is a member of PKI Users
        groups["Domain Users"].sid,  # her primary group: not in its member values
        EVERYONE,
        AUTHENTICATED_USERS,
    }
    assert alice.group_names == {"Web Admins", "PKI Users", "Domain Users"}
    carol = ldap.authenticate("carol", password(dev_directory, "carol"))
    assert groups["Denied Users"].sid in carol.token_sids


def test_group_nesting_loop_ends(ldap: Directory, dev_directory: DevDirectory) -> None:
    groups = dev_directory.groups
    admin = dev_directory.admin_connection()
    web_admins = groups["Web Admins"].dn
    loop = {"member": [(MODIFY_ADD, [groups["PKI Users"].dn])]}
    assert admin.modify(web_admins, loop), admin.result  # PKI Users <-> Web Admins
    try:
        alice = ldap.authenticate("alice", password(dev_directory, "alice"))
        assert alice.group_names == {"Web Admins", "PKI Users", "Domain Users"}
    finally:
        admin.modify(web_admins, {"member": [(MODIFY_DELETE, [groups["PKI Users"].dn])]})


def test_distribution_groups_are_in_no_token(ldap: Directory, dev_directory: DevDirectory) -> None:
    """As in AD, only security groups (groupType SECURITY_ENABLED) count for access checks:
    a mail distribution group, and a security group reached only through it, grant nothing."""
    groups = dev_directory.groups
    eve = dev_directory.accounts["eve"]
    admin = dev_directory.admin_connection()
    dn = f"CN=Newsletter,CN=Users,{dev_directory.base}"
    attributes = {
        "objectClass": ["top", "group"],
        "cn": "Newsletter",
        "sAMAccountName": "Newsletter",
        "groupType": str(to_ad_int32(int(GroupType.ACCOUNT_GROUP))),  # no SECURITY_ENABLED
        "objectSid": Sid.parse(dev_directory.domain_sid + "-7001").to_bytes(),
        "member": [eve.dn],
    }
    assert admin.add(dn, attributes=attributes), admin.result
    pki_users = groups["PKI Users"].dn
    assert admin.modify(pki_users, {"member": [(MODIFY_ADD, [dn])]}), admin.result
    try:
        token = ldap.authenticate("eve", password(dev_directory, "eve"))
        assert dev_directory.domain_sid + "-7001" not in token.token_sids
        assert groups["PKI Users"].sid not in token.token_sids
        assert "Newsletter" not in token.group_names
    finally:
        admin.modify(pki_users, {"member": [(MODIFY_DELETE, [dn])]})
        admin.delete(dn)


def test_principal_by_sid_round_trips(ldap: Directory, dev_directory: DevDirectory) -> None:
    for account in ("alice", "WS01$", "bob"):
        sid = dev_directory.accounts[account].sid
        found = ldap.principal_by_sid(sid)
        assert found is not None and found.sam_account_name == account and found.sid == sid
        assert found.token_sids >= {sid, AUTHENTICATED_USERS}
    bob = ldap.principal_by_sid(dev_directory.accounts["bob"].sid)
    assert bob is not None and bob.disabled  # no password here: the caller decides
    assert ldap.principal_by_sid(dev_directory.domain_sid + "-4242") is None
    assert ldap.principal_by_sid("not a SID") is None
    # A group's SID names no account.
    assert ldap.principal_by_sid(dev_directory.groups["Web Admins"].sid) is None


def test_principal_by_name_takes_the_forms_authenticate_takes(ldap: Directory) -> None:
    for name in ("alice", "EXAMPLE\\alice", "alice@example.test"):
        found = ldap.principal_by_name(name)
        assert found is not None and found.sam_account_name == "alice"
        assert "PKI Users" in found.group_names
    assert ldap.principal_by_name("mallory") is None
    assert ldap.principal_by_name("OTHER\\alice") is None


def test_concurrent_authentications_from_many_threads(
    ldap: Directory, dev_directory: DevDirectory
) -> None:
    accounts = ["alice", "eve", "WS01$", "SRV01$"] * 6

    def login(account: str) -> str:
        return ldap.authenticate(account, password(dev_directory, account)).sid

    with ThreadPoolExecutor(max_workers=8) as pool:
        sids = list(pool.map(login, accounts))
    assert sids == [dev_directory.accounts[account].sid for account in accounts]


# --- an unreachable directory -----------------------------------------------------------------

needs_slapd = pytest.mark.skipif(not slapd_available(), reason="OpenLDAP slapd is not installed")


@dataclass(frozen=True)
class Stopped:
    directory: DevDirectory
    url: str
    cached: Directory
    """Read templates and authenticated while slapd ran."""


@pytest.fixture
def stopped(tmp_path: Path) -> Stopped:
    """A second development directory that answered once and has been stopped since."""
    with DevDirectory(tmp_path) as directory:
        url = directory.url
        cached = connect(directory, cache_ttl=60)
        assert cached.templates()
        assert cached.authenticate("alice", password(directory, "alice"))
    return Stopped(directory, url, cached)


@needs_slapd
def test_stopped_directory_is_reported_unavailable(stopped: Stopped) -> None:
    directory, cached = stopped.directory, stopped.cached
    with pytest.raises(DirectoryUnavailable):
        cached.authenticate("alice", password(directory, "alice"))
    with pytest.raises(DirectoryUnavailable):
        cached.principal_by_sid(directory.accounts["alice"].sid)
    assert set(cached.templates()) == SEEDED_TEMPLATES  # within its TTL, from the cache

    fresh = Directory(
        stopped.url, directory.base, directory.admin_dn, directory.admin_password, timeout=TIMEOUT
    )
    for call in (fresh.templates, lambda: fresh.enrollment_service("CA")):
        with pytest.raises(DirectoryUnavailable):
            call()


def test_wrong_service_password_is_reported_unavailable(dev_directory: DevDirectory) -> None:
    ldap = Directory(
        dev_directory.url, dev_directory.base, dev_directory.admin_dn, "wrong", timeout=TIMEOUT
    )
    with pytest.raises(DirectoryUnavailable, match="service account cannot bind"):
        ldap.templates()


def test_service_account_without_password_is_refused(dev_directory: DevDirectory) -> None:
    with pytest.raises(ValueError, match="password"):
        Directory(dev_directory.url, dev_directory.base, dev_directory.admin_dn, "")
