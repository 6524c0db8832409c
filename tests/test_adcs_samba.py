"""The AD-style connector's directory reading against a real AD: a Samba AD DC
(tests/samba_dc.py) with the example templates added to its Configuration partition; and
what the development directory must show alike (root DSE, domain SID, account types)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from adcs_directory_fixture import make_dev_directory_fixture
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from ldap3 import BASE
from samba_dc import SambaDC, make_samba_dc_fixture

from pkigate.adcs import layout
from pkigate.adcs.flags import CertificateNameFlag, EnrollmentFlag, SamAccountType
from pkigate.adcs.ldapdir import Directory, InvalidCredentials, PrincipalDisabled
from pkigate.adcs.publish import PublishRequest, publish
from pkigate.adcs.security import Sid, enroll_rights, token_sids

samba_dc = make_samba_dc_fixture("module")
dev_directory = make_dev_directory_fixture("module")
BUILTIN_USERS = "S-1-5-32-545"


@pytest.fixture(scope="module")
def directory(samba_dc: SambaDC) -> Iterator[Directory]:
    yield Directory(samba_dc.url, samba_dc.base, samba_dc.admin_dn, samba_dc.admin_password)


def test_templates_are_read_from_the_configuration_partition(directory: Directory) -> None:
    templates = directory.templates()
    assert set(templates) >= {"Machine", "User", "WebServer", "UserPending", "ESC1Vulnerable"}
    assert directory.template_errors() == {}
    machine = templates["Machine"]
    assert machine.dn.lower().endswith(
        "cn=certificate templates,cn=public key services,cn=services,"
        "cn=configuration,dc=samba,dc=test"
    )
    assert CertificateNameFlag.SUBJECT_ALT_REQUIRE_DNS in machine.name_flags
    assert EnrollmentFlag.PEND_ALL_REQUESTS in templates["UserPending"].enrollment_flags
    # The security descriptor came back (LDAP_SERVER_SD_FLAGS: owner, group and DACL).
    assert machine.security_descriptor


@pytest.mark.parametrize("form", ["alice", "alice@samba.test", "SAMBA\\alice", "samba.test\\alice"])
def test_a_user_authenticates_in_every_name_form(
    samba_dc: SambaDC, directory: Directory, form: str
) -> None:
    alice = samba_dc.account("alice")
    principal = directory.authenticate(form, alice.password)
    assert principal.sid == alice.sid
    assert principal.user_principal_name == "alice@samba.test"
    assert principal.mail == "alice@samba.test"
    with pytest.raises(InvalidCredentials):
        directory.authenticate(form, "not-the-password")


def test_token_holds_nested_groups_and_the_primary_group(
    samba_dc: SambaDC, directory: Directory
) -> None:
    alice = directory.authenticate("alice", samba_dc.account("alice").password)
    groups = samba_dc.group_sids(["Web Admins", "PKI Users", "Domain Users", "Denied Users"])
    assert {groups["Web Admins"], groups["PKI Users"], groups["Domain Users"]} <= alice.token_sids
    assert groups["Denied Users"] not in alice.token_sids
    assert {"Web Admins", "PKI Users", "Domain Users"} <= alice.group_names


def test_enroll_rights_follow_the_security_descriptors_with_nesting_and_deny(
    samba_dc: SambaDC, directory: Directory
) -> None:
    templates = directory.templates()
    alice = directory.authenticate("alice", samba_dc.account("alice").password)
    carol = directory.authenticate("carol", samba_dc.account("carol").password)
    eve = directory.authenticate("eve", samba_dc.account("eve").password)

    def may_enroll(template: str, principal_token: frozenset[str]) -> bool:
        return enroll_rights(templates[template].security_descriptor, principal_token).enroll

    assert may_enroll("UserPending", alice.token_sids)  # alice ∈ Web Admins ∈ PKI Users
    assert may_enroll("WebServer", alice.token_sids)
    assert not may_enroll("WebServer", eve.token_sids)
    assert may_enroll("User", eve.token_sids)
    assert not may_enroll("User", carol.token_sids)  # the deny ACE for Denied Users wins


def test_a_disabled_account_is_refused(samba_dc: SambaDC, directory: Directory) -> None:
    with pytest.raises(PrincipalDisabled):
        directory.authenticate("bob", samba_dc.account("bob").password)


def test_a_computer_is_found_by_its_sid_with_its_dns_host_name(
    samba_dc: SambaDC, directory: Directory
) -> None:
    ws01 = samba_dc.account("WS01$")
    principal = directory.principal_by_sid(ws01.sid)
    assert principal is not None
    assert principal.kind == "computer"
    assert principal.dns_host_name == "ws01.samba.test"
    assert directory.authenticate("WS01$", ws01.password).sid == ws01.sid
    groups = samba_dc.group_sids(["Domain Computers"])
    assert groups["Domain Computers"] in principal.token_sids


def test_an_enrollment_service_is_published_and_read_back(directory: Directory) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pkigate Samba test CA")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    der = certificate.public_bytes(serialization.Encoding.DER)
    # The example templates are this module's fixture: kept as they are.
    request = PublishRequest(
        "pkigate Samba CA", "pkigate.samba.test", der, ("Machine", "User"), True
    )
    outcome = publish(directory, request).enrollment_service
    assert outcome in ("created", "updated")
    service = directory.enrollment_service("pkigate Samba CA")
    assert service is not None
    assert service.certificate_templates == ("Machine", "User")
    assert service.ca_certificate_der == der
    assert service.dns_host_name == "pkigate.samba.test"


def test_the_token_is_the_one_ad_computes(samba_dc: SambaDC, directory: Directory) -> None:
    """tokenGroups, not a walk over `member`: AD's own answer, BUILTIN groups included."""
    alice = directory.authenticate("alice", samba_dc.account("alice").password)
    with samba_dc.admin_connection() as connection:
        connection.search(alice.dn, "(objectClass=*)", BASE, attributes=["tokenGroups"])
        raw = connection.entries[0].tokenGroups.raw_values
    computed = {str(Sid.from_bytes(value)) for value in raw}
    assert alice.token_sids == token_sids(alice.sid, computed)
    assert BUILTIN_USERS in alice.token_sids  # Domain Users (the primary group) is a member
    assert "Users" in alice.group_names


# -- the same reading on both directories --------------------------------------------------------


@pytest.fixture(scope="module", params=["dev", "samba"])
def either(request: pytest.FixtureRequest) -> tuple[Any, Directory]:
    """The development directory or the Samba DC, and the connector's Directory on it."""
    if request.param == "dev":
        held: Any = request.getfixturevalue("dev_directory")
    else:
        held = request.getfixturevalue("samba_dc")
    return held, Directory(held.url, held.base, held.admin_dn, held.admin_password)


def test_the_root_dse_names_the_naming_contexts_on_both(either: tuple[Any, Directory]) -> None:
    held, directory = either
    root = directory.root_dse()
    assert root.default_naming_context == held.base
    assert root.configuration_naming_context == f"CN=Configuration,{held.base}"
    assert root.active_directory == isinstance(held, SambaDC)
    with held.admin_connection() as connection:
        connection.search("", "(objectClass=*)", BASE, attributes=["*"])
        service = connection.entries[0].ldapServiceName.value
    domain = layout.dns_domain(held.base)
    assert service.startswith(f"{domain}:") and service.endswith(f"$@{domain.upper()}")


def test_the_domain_and_its_accounts_look_alike_on_both(either: tuple[Any, Directory]) -> None:
    """objectSid and objectGUID on the domain, sAMAccountType on users, computers, groups."""
    held, _ = either
    with held.admin_connection() as connection:
        connection.search(
            held.base, "(objectClass=*)", BASE, attributes=["objectSid", "objectGUID"]
        )
        domain = connection.entries[0]
        alice = held.accounts["alice"]
        assert str(domain.objectSid.value) == alice.sid.rsplit("-", 1)[0]
        assert len(domain.objectGUID.raw_values[0]) == 16
        kinds = {}
        for name in ("alice", "WS01$", "Web Admins"):
            connection.search(held.base, f"(sAMAccountName={name})", attributes=["sAMAccountType"])
            kinds[name] = int(connection.entries[0].sAMAccountType.value)
    assert kinds == {
        "alice": SamAccountType.USER_OBJECT,
        "WS01$": SamAccountType.MACHINE_ACCOUNT,
        "Web Admins": SamAccountType.GROUP_OBJECT,
    }


def test_discovery_finds_the_domain_in_the_root_dse_on_both(either: tuple[Any, Directory]) -> None:
    held, _ = either
    found = Directory.discover(held.url, held.admin_dn, held.admin_password)
    assert found.base == held.base
    assert found.dns_domain == layout.dns_domain(held.base)
    assert "User" in found.templates()
