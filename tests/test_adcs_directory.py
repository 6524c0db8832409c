"""The development directory: slapd with AD's schema, the example domain and its templates."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from adcs_directory_fixture import make_dev_directory_fixture
from click.testing import CliRunner
from ldap3 import BASE, LEVEL, SUBTREE, Connection, Server

from pkigate.adcs import layout
from pkigate.adcs.cli import dev_directory_command
from pkigate.adcs.directory import DevDirectory, DevDirectoryError, slapd_available
from pkigate.adcs.encoding import filetime_to_interval, from_ad_int32, key_usage_from_bytes
from pkigate.adcs.flags import (
    CertificateNameFlag,
    EnrollmentFlag,
    KeyUsage,
    TemplateFlag,
    UserAccountControl,
)
from pkigate.adcs.principals import find_principal, group_sids, principal_token
from pkigate.adcs.security import (
    AUTHENTICATED_USERS,
    EVERYONE,
    Sid,
    enroll_rights,
    guid_from_bytes,
    parse_security_descriptor,
)

dev_directory = make_dev_directory_fixture(scope="module")

TEMPLATES = {"Machine", "User", "WebServer", "UserPending", "ESC1Vulnerable"}


def search(
    connection: Connection, base: str, search_filter: str, scope: Any = SUBTREE
) -> list[dict[str, Any]]:
    connection.search(base, search_filter, scope, attributes=["*"])
    assert connection.result["result"] == 0, connection.result  # ldap3 says False for no entry
    return [item for item in connection.response if item["type"] == "searchResEntry"]


def raw(entry: dict[str, Any], attribute: str) -> list[bytes]:
    values: list[bytes] = entry["raw_attributes"][attribute]
    return values


def bind_as(directory: DevDirectory, dn: str, password: str) -> Connection:
    return Connection(Server(directory.url, connect_timeout=5), dn, password)


@pytest.fixture
def admin(dev_directory: DevDirectory) -> Connection:
    return dev_directory.admin_connection()


def template(admin: Connection, base: str, name: str) -> dict[str, Any]:
    (entry,) = search(admin, layout.template_dn(base, name), "(objectClass=*)", BASE)
    return entry


def test_slapd_listens_on_loopback_and_admin_binds(dev_directory: DevDirectory) -> None:
    assert re.fullmatch(r"ldap://127\.0\.0\.1:\d+", dev_directory.url)
    connection = dev_directory.admin_connection()
    assert connection.extend.standard.who_am_i().lower() == f"dn:{dev_directory.admin_dn}".lower()


def test_templates_sit_in_the_certificate_templates_container(
    admin: Connection,
    dev_directory: DevDirectory,
) -> None:
    container = layout.certificate_templates_dn(dev_directory.base)
    assert container.startswith("CN=Certificate Templates,CN=Public Key Services,CN=Services,")
    entries = search(admin, container, "(objectClass=pKICertificateTemplate)", LEVEL)
    assert {entry["attributes"]["cn"][0] for entry in entries} == TEMPLATES


def test_enrollment_services_container_exists_and_is_empty(
    admin: Connection,
    dev_directory: DevDirectory,
) -> None:
    container = layout.enrollment_services_dn(dev_directory.base)
    assert len(search(admin, container, "(objectClass=container)", BASE)) == 1
    assert search(admin, container, "(objectClass=*)", LEVEL) == []


def test_template_security_descriptor_is_stored_binary(
    admin: Connection,
    dev_directory: DevDirectory,
) -> None:
    (descriptor,) = raw(template(admin, dev_directory.base, "User"), "nTSecurityDescriptor")
    assert isinstance(descriptor, bytes) and descriptor[0] == 1  # revision 1, self-relative
    parsed = parse_security_descriptor(descriptor)
    assert parsed.owner == dev_directory.groups["Domain Admins"].sid
    assert parsed.dacl is not None and len(parsed.dacl) == 4


def test_template_periods_are_negative_filetime_intervals(
    admin: Connection,
    dev_directory: DevDirectory,
) -> None:
    machine = template(admin, dev_directory.base, "Machine")
    (expiration,) = raw(machine, "pKIExpirationPeriod")
    (overlap,) = raw(machine, "pKIOverlapPeriod")
    assert expiration == bytes.fromhex("004039872ee1feff")
    assert filetime_to_interval(expiration) == timedelta(days=365)
    assert filetime_to_interval(overlap) == timedelta(weeks=6)


def flag(entry: dict[str, Any], attribute: str) -> int:
    (value,) = raw(entry, attribute)
    return from_ad_int32(int(value))


def test_template_flags_read_back_as_ads_signed_integers(
    admin: Connection,
    dev_directory: DevDirectory,
) -> None:
    base = dev_directory.base
    user = template(admin, base, "User")
    assert int(raw(user, "msPKI-Certificate-Name-Flag")[0]) < 0  # bit 31 set, as AD returns it
    names = CertificateNameFlag(flag(user, "msPKI-Certificate-Name-Flag"))
    assert CertificateNameFlag.SUBJECT_REQUIRE_DIRECTORY_PATH in names
    assert CertificateNameFlag.SUBJECT_ALT_REQUIRE_UPN in names
    assert CertificateNameFlag.ENROLLEE_SUPPLIES_SUBJECT not in names

    machine = template(admin, base, "Machine")
    assert CertificateNameFlag(flag(machine, "msPKI-Certificate-Name-Flag")) == (
        CertificateNameFlag.SUBJECT_ALT_REQUIRE_DNS | CertificateNameFlag.SUBJECT_REQUIRE_DNS_AS_CN
    )
    assert EnrollmentFlag.AUTO_ENROLLMENT in EnrollmentFlag(flag(machine, "msPKI-Enrollment-Flag"))
    assert TemplateFlag.MACHINE_TYPE in TemplateFlag(flag(machine, "flags"))
    assert key_usage_from_bytes(raw(machine, "pKIKeyUsage")[0]) == (
        KeyUsage.DIGITAL_SIGNATURE | KeyUsage.KEY_ENCIPHERMENT
    )
    assert sorted(machine["attributes"]["pKIExtendedKeyUsage"]) == [
        "1.3.6.1.5.5.7.3.1",
        "1.3.6.1.5.5.7.3.2",
    ]

    pending = template(admin, base, "UserPending")
    assert EnrollmentFlag.PEND_ALL_REQUESTS in EnrollmentFlag(
        flag(pending, "msPKI-Enrollment-Flag")
    )

    dangerous = template(admin, base, "ESC1Vulnerable")
    assert CertificateNameFlag(flag(dangerous, "msPKI-Certificate-Name-Flag")) == (
        CertificateNameFlag.ENROLLEE_SUPPLIES_SUBJECT
    )
    assert dangerous["attributes"]["pKIExtendedKeyUsage"] == ["1.3.6.1.5.5.7.3.2"]
    assert int(raw(dangerous, "msPKI-RA-Signature")[0]) == 0
    assert int(raw(dangerous, "msPKI-Template-Schema-Version")[0]) == 2
    assert raw(dangerous, "msPKI-Cert-Template-OID")[0].startswith(b"1.3.6.1.4.1.311.21.8.")


def test_users_carry_binary_sids_in_the_domain(
    admin: Connection,
    dev_directory: DevDirectory,
) -> None:
    (alice,) = search(admin, dev_directory.base, "(sAMAccountName=alice)")
    (sid,) = raw(alice, "objectSid")
    assert len(sid) == 28  # S-1-5-21-x-y-z-rid
    assert str(Sid.from_bytes(sid)) == dev_directory.accounts["alice"].sid
    assert str(Sid.from_bytes(sid)).startswith(dev_directory.domain_sid + "-")
    (guid,) = raw(alice, "objectGUID")
    guid_from_bytes(guid)
    assert alice["attributes"]["userPrincipalName"] == "alice@example.test"
    assert int(raw(alice, "primaryGroupID")[0]) == 513


def test_objects_are_found_by_binary_sid(
    admin: Connection,
    dev_directory: DevDirectory,
) -> None:
    sid = Sid.parse(dev_directory.groups["Domain Users"].sid).to_bytes()
    escaped = "".join(f"\\{byte:02x}" for byte in sid)
    (group,) = search(admin, dev_directory.base, f"(objectSid={escaped})")
    assert group["attributes"]["cn"] == ["Domain Users"]


def test_computers_have_dns_host_names(
    admin: Connection,
    dev_directory: DevDirectory,
) -> None:
    (ws01,) = search(admin, dev_directory.base, "(&(objectClass=computer)(sAMAccountName=WS01$))")
    assert ws01["attributes"]["dNSHostName"] == "ws01.example.test"
    assert int(raw(ws01, "primaryGroupID")[0]) == 515
    control = UserAccountControl(int(raw(ws01, "userAccountControl")[0]))
    assert UserAccountControl.WORKSTATION_TRUST_ACCOUNT in control


def test_groups_nest_through_member(admin: Connection, dev_directory: DevDirectory) -> None:
    alice_dn = dev_directory.accounts["alice"].dn
    (direct,) = search(admin, dev_directory.base, f"(&(objectClass=group)(member={alice_dn}))")
    assert direct["attributes"]["cn"] == ["Web Admins"]
    (outer,) = search(admin, dev_directory.base, f"(&(objectClass=group)(member={direct['dn']}))")
    assert outer["attributes"]["cn"] == ["PKI Users"]


def test_alice_binds_with_her_password(dev_directory: DevDirectory) -> None:
    alice = dev_directory.accounts["alice"]
    connection = bind_as(dev_directory, alice.dn, alice.password)
    assert connection.bind(), connection.result
    assert search(connection, dev_directory.base, "(sAMAccountName=eve)")


def test_wrong_password_is_refused(dev_directory: DevDirectory) -> None:
    connection = bind_as(dev_directory, dev_directory.accounts["alice"].dn, "not her password")
    assert not connection.bind()
    assert connection.result["description"] == "invalidCredentials"


def test_anonymous_clients_read_nothing(dev_directory: DevDirectory) -> None:
    connection = Connection(Server(dev_directory.url))
    connection.open()
    connection.search(dev_directory.base, "(objectClass=*)", SUBTREE)
    assert not [item for item in connection.response or [] if item["type"] == "searchResEntry"]


def test_password_hashes_are_not_readable_by_other_users(dev_directory: DevDirectory) -> None:
    eve = dev_directory.accounts["eve"]
    connection = bind_as(dev_directory, eve.dn, eve.password)
    assert connection.bind()
    (alice,) = search(connection, dev_directory.base, "(sAMAccountName=alice)")
    assert "userPassword" not in alice["raw_attributes"]


# --- principals and their rights, end to end --------------------------------------------------


def rights_of(admin: Connection, directory: DevDirectory, account: str, name: str) -> Any:
    principal = find_principal(admin, directory.base, account)
    assert principal is not None
    token = principal_token(admin, directory.base, principal)
    (descriptor,) = raw(template(admin, directory.base, name), "nTSecurityDescriptor")
    return enroll_rights(descriptor, token)


def test_alice_token_holds_nested_groups_primary_group_and_well_known_sids(
    admin: Connection,
    dev_directory: DevDirectory,
) -> None:
    alice = find_principal(admin, dev_directory.base, "alice")
    assert alice is not None and not alice.disabled
    groups = dev_directory.groups
    assert group_sids(admin, dev_directory.base, alice) == {
        groups["Web Admins"].sid,
        groups["PKI Users"].sid,
        groups["Domain Users"].sid,
    }
    token = principal_token(admin, dev_directory.base, alice)
    assert {alice.sid, EVERYONE, AUTHENTICATED_USERS} <= token


@pytest.mark.parametrize(
    ("account", "name", "enroll", "autoenroll"),
    [
        ("alice", "WebServer", True, False),  # through Web Admins
        ("alice", "UserPending", True, False),  # through Web Admins, inside PKI Users
        ("alice", "User", True, False),  # through her primary group, Domain Users
        ("eve", "WebServer", False, False),
        ("eve", "UserPending", False, False),
        ("eve", "ESC1Vulnerable", True, False),
        ("carol", "User", False, False),  # Denied Users
        ("carol", "ESC1Vulnerable", True, False),
        ("WS01$", "Machine", True, True),  # through Domain Computers, its primary group
        ("alice", "Machine", False, False),
        ("Administrator", "WebServer", True, True),  # Domain Admins: full control
    ],
)
def test_template_rights_follow_the_directory(
    admin: Connection,
    dev_directory: DevDirectory,
    account: str,
    name: str,
    enroll: bool,
    autoenroll: bool,
) -> None:
    rights = rights_of(admin, dev_directory, account, name)
    assert (rights.enroll, rights.autoenroll) == (enroll, autoenroll)


def test_disabled_account_still_binds_so_the_connector_must_check_it(
    admin: Connection,
    dev_directory: DevDirectory,
) -> None:
    bob = find_principal(admin, dev_directory.base, "bob")
    assert bob is not None and bob.disabled
    assert bob.user_account_control == 0x202
    account = dev_directory.accounts["bob"]
    assert bind_as(dev_directory, account.dn, account.password).bind()


def test_unknown_account_is_not_found(admin: Connection, dev_directory: DevDirectory) -> None:
    assert find_principal(admin, dev_directory.base, "mallory") is None
    assert find_principal(admin, dev_directory.base, "*") is None


# --- lifecycle --------------------------------------------------------------------------------

needs_slapd = pytest.mark.skipif(not slapd_available(), reason="OpenLDAP slapd is not installed")


@needs_slapd
def test_restart_reuses_the_database_and_credentials(tmp_path: Path) -> None:
    with DevDirectory(tmp_path) as first:
        password, sid = first.admin_password, first.domain_sid
        first.admin_connection().modify(
            first.accounts["eve"].dn, {"description": [("MODIFY_REPLACE", ["kept"])]}
        )
    assert oct((tmp_path / "credentials.json").stat().st_mode & 0o777) == "0o600"
    with DevDirectory(tmp_path) as second:
        assert (second.admin_password, second.domain_sid) == (password, sid)
        connection = second.admin_connection()
        (eve,) = search(connection, second.base, "(sAMAccountName=eve)")
        assert eve["attributes"]["description"] == ["kept"]
    with pytest.raises(DevDirectoryError, match="holds DC=example,DC=test"):
        DevDirectory(tmp_path, base="DC=other,DC=test").start()


@needs_slapd
def test_other_base_dn_gives_another_domain(tmp_path: Path) -> None:
    with DevDirectory(tmp_path, base="DC=corp,DC=example,DC=org") as directory:
        connection = directory.admin_connection()
        (alice,) = search(connection, directory.base, "(sAMAccountName=alice)")
        assert alice["attributes"]["userPrincipalName"] == "alice@corp.example.org"
        templates = layout.certificate_templates_dn(directory.base)
        assert len(search(connection, templates, "(objectClass=pKICertificateTemplate)")) == 5


@needs_slapd
def test_taken_port_is_reported_with_slapds_log(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(DevDirectoryError, match="Address already in use"):
            DevDirectory(tmp_path, port=port).start()


@needs_slapd
def test_cli_background_prints_where_to_connect_and_the_password_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        dev_directory_command, ["--data-dir", str(tmp_path), "--port", "0", "--background"]
    )
    assert result.exit_code == 0, result.output
    started = re.search(r"process (\d+)", result.output)
    assert started is not None, result.output
    pid = int(started.group(1))
    try:
        url = re.search(r"URL:\s+(ldap://127\.0\.0\.1:\d+)\n", result.output)
        assert url is not None, result.output
        assert "Admin DN:   CN=admin,DC=example,DC=test" in result.output
        assert f"Passwords:  {tmp_path / 'credentials.json'}" in result.output
        # The slapd it left behind answers with the credentials it wrote.
        state = (tmp_path / "credentials.json").read_text()
        admin = Connection(Server(url.group(1)), "CN=admin,DC=example,DC=test", password_in(state))
        assert admin.bind(), admin.result
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)


def password_in(credentials: str) -> str:
    password: str = json.loads(credentials)["admin_password"]
    return password
