"""The throwaway Samba AD DC (tests/samba_dc.py) holds what the AD-style tests rely on."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from ldap3 import BASE, Connection, Server
from samba_dc import SambaDC, loopback_address, make_samba_dc_fixture

from pkigate.adcs.security import Sid

samba_dc = make_samba_dc_fixture()


def test_loopback_addresses_differ_per_process_and_avoid_127_0_0_1() -> None:
    pids = (1, 255, 256, 65536, 4_194_303)
    addresses = {loopback_address(pid, index) for pid in pids for index in range(3)}
    assert len(addresses) == 15
    assert "127.0.0.1" not in addresses
    assert all(address.startswith("127.") for address in addresses)


def test_the_dcs_of_one_process_take_different_addresses(tmp_path: Path) -> None:
    first, second = SambaDC(tmp_path / "first"), SambaDC(tmp_path / "second")
    assert first.address != second.address
    first.stop()  # gives its address back, unstarted as it is
    third = SambaDC(tmp_path / "third")
    assert third.address == first.address
    third.stop()
    second.stop()


def test_root_dse_names_the_naming_contexts(samba_dc: SambaDC) -> None:
    with Connection(Server(samba_dc.address), auto_bind=True) as connection:
        connection.search("", "(objectClass=*)", BASE, attributes=["*"])
        root = connection.entries[0]
    assert root.defaultNamingContext.value == samba_dc.base
    assert root.configurationNamingContext.value == samba_dc.configuration_dn
    assert root.ldapServiceName.value == f"{samba_dc.dns_domain}:dc1$@{samba_dc.realm}"
    assert "1.2.840.113556.1.4.801" in root.supportedControl.values  # LDAP_SERVER_SD_FLAGS


@pytest.mark.parametrize("form", ["upn", "netbios", "dn"])
def test_a_user_binds_in_each_of_the_forms_windows_accepts(samba_dc: SambaDC, form: str) -> None:
    alice = samba_dc.account("alice")
    user = {"upn": alice.upn, "netbios": f"{samba_dc.netbios_domain}\\alice", "dn": alice.dn}
    connection = Connection(Server(samba_dc.address), user=user[form], password=alice.password)
    assert connection.bind(), connection.result
    connection.unbind()
    wrong = Connection(Server(samba_dc.address), user=user[form], password="not-the-password")
    assert not wrong.bind()
    assert wrong.result["result"] == 49


def test_the_disabled_account_is_refused_with_ads_reason_code(samba_dc: SambaDC) -> None:
    bob = samba_dc.account("bob")
    assert bob.disabled
    connection = Connection(Server(samba_dc.address), user=bob.upn, password=bob.password)
    assert not connection.bind()
    assert "data 533" in connection.result["message"]  # ERROR_ACCOUNT_DISABLED


def test_token_groups_hold_nested_groups_and_the_primary_group(samba_dc: SambaDC) -> None:
    alice = samba_dc.account("alice")
    with samba_dc.admin_connection() as connection:
        connection.search(alice.dn, "(objectClass=*)", BASE, attributes=["tokenGroups"])
        token = {str(Sid.from_bytes(raw)) for raw in connection.entries[0].tokenGroups.raw_values}
        connection.search(
            samba_dc.base,
            "(|(cn=Web Admins)(cn=PKI Users)(cn=Domain Users)(cn=Denied Users))",
            attributes=["cn", "objectSid"],
        )
        groups = {entry.cn.value: str(entry.objectSid.value) for entry in connection.entries}
    assert {groups["Web Admins"], groups["PKI Users"], groups["Domain Users"]} <= token
    assert groups["Denied Users"] not in token


def test_computers_have_a_dns_host_name_and_a_password(samba_dc: SambaDC) -> None:
    ws01 = samba_dc.account("WS01$")
    with samba_dc.admin_connection() as connection:
        connection.search(ws01.dn, "(objectClass=computer)", BASE, attributes=["dNSHostName"])
        assert connection.entries[0].dNSHostName.value == f"ws01.{samba_dc.dns_domain}"
    machine = Connection(Server(samba_dc.address), user=ws01.dn, password=ws01.password)
    assert machine.bind(), machine.result


def test_mit_kinit_gets_a_ticket_from_the_kdc(samba_dc: SambaDC, tmp_path: Path) -> None:
    alice = samba_dc.account("alice")
    env = {**samba_dc.env, "KRB5CCNAME": f"FILE:{tmp_path / 'ccache'}"}
    subprocess.run(
        ["kinit", f"alice@{samba_dc.realm}"],
        input=alice.password.encode(),
        env=env,
        check=True,
        capture_output=True,
        timeout=30,
    )
    listing = subprocess.run(["klist"], env=env, check=True, capture_output=True, text=True)
    assert f"krbtgt/{samba_dc.realm}@{samba_dc.realm}" in listing.stdout
