"""`pkigate adcs publish` against a real AD (Samba), audited by certipy-ad as an attacker would.

After publish, certipy-ad (PyPI, unmodified, in .venv-certipy made by scripts/setup --test)
must enumerate pkigate's CA and templates, and ``find -vulnerable`` run as an ordinary user
must report none of pkigate's templates (ESC1-ESC4, ESC9, ESC13, ESC15 and the rest certipy
checks per template). A deliberately dangerous template an administrator added (ESC1: the
enrollee names the subject of a client-authentication certificate, Domain Users enroll) is
what certipy must flag, and pkigate must refuse that abuse through its enrollment endpoint.

certipy binds with a simple bind over ldap:// (-ldap-simple-auth): the loopback DC allows it
(tests/samba_dc.py), and its NTLM bind is not what is tested here. -dc-only: nothing answers
certipy's RPC and Web Enrollment probes of the CA host (pkigate has neither), and without it
certipy spends its time resolving a host name no DNS serves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from ldap3 import BASE, LEVEL, MODIFY_REPLACE
from samba_dc import SambaDC, make_samba_dc_fixture
from serving import RunningServer, adcs_connector_config, start_server
from sqlalchemy import select

from pkigate.adcs import layout
from pkigate.adcs.catalogue import esc1_vulnerable_template, readers
from pkigate.adcs.flags import RID_DOMAIN_ADMINS, RID_DOMAIN_USERS
from pkigate.adcs.ldapdir import Directory
from pkigate.adcs.publish import CERT_OID_TYPE_TEMPLATE, ENTERPRISE_CA_FLAGS
from pkigate.adcs.security import ENROLL_RIGHT, Sid, allow
from pkigate.core import Core
from pkigate.core.names import upn_other_name
from pkigate.core.store import schema

PKIGATE = str(Path(sys.executable).parent / "pkigate")
CERTIPY = Path(__file__).resolve().parent.parent / ".venv-certipy" / "bin" / "certipy"
CA_NAME = "pkigate-issuing"
PKIGATE_TEMPLATES = ("Machine", "User", "WebServer")
DANGEROUS = "ESC1Vulnerable"
COMMAND_TIMEOUT = 180

# A DC of this module's own, with no template: publish starts from Samba's empty container.
samba_dc = make_samba_dc_fixture("module", templates=False)


@dataclass
class Published:
    dc: SambaDC
    server: RunningServer
    config: Path
    publish_output: dict[str, Any]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [PKIGATE, "--json", "--data-dir", str(self.server.data_dir), "adcs"]
        return subprocess.run(
            [*command, "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )

    def publish(self, *args: str) -> dict[str, Any]:
        done = self.cli(
            "publish",
            *[a for n in (*PKIGATE_TEMPLATES, DANGEROUS) for a in ("--template", n)],
            *args,
        )
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))

    def read(self, dn: str, *attributes: str) -> dict[str, list[bytes]]:
        with self.dc.admin_connection() as conn:
            assert conn.search(dn, "(objectClass=*)", BASE, attributes=list(attributes)), dn
            return {k.lower(): list(v) for k, v in conn.response[0]["raw_attributes"].items()}


def _dangerous_template(dc: SambaDC) -> None:
    """What an administrator might add by hand: ESC1 (not one of pkigate's templates)."""
    with dc.admin_connection() as conn:
        conn.search(dc.base, "(objectClass=*)", BASE, attributes=["objectSid"])
        domain = Sid.from_bytes(conn.response[0]["raw_attributes"]["objectSid"][0])
    admins, users = str(domain.with_rid(RID_DOMAIN_ADMINS)), str(domain.with_rid(RID_DOMAIN_USERS))
    definition = esc1_vulnerable_template((*readers(admins), allow(users, ENROLL_RIGHT)))
    assert definition.name == DANGEROUS
    attributes = definition.attributes("1.3.6.1.4.1.311.21.8.1.2.3.4.5.6.99.1", owner_sid=admins)
    dn = layout.template_dn(dc.base, DANGEROUS)
    with dc.admin_connection() as conn:
        assert conn.add(
            dn,
            ["top", "pKICertificateTemplate"],
            {name: list(values) for name, values in attributes.items()},
        ), conn.result


@pytest.fixture(scope="module")
def published(samba_dc: SambaDC, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Published]:
    base = tmp_path_factory.mktemp("adcs-samba")
    _dangerous_template(samba_dc)
    server = start_server(
        base / "data",
        extra_config=adcs_connector_config(
            samba_dc.url,
            samba_dc.base,
            samba_dc.admin_dn,
            samba_dc.admin_password,
            ca_name=CA_NAME,
            cache_ttl_seconds=0,
        ),
    )
    try:
        env = Published(samba_dc, server, base / "data.toml", {})
        env.publish_output = env.publish()
        yield env
    finally:
        server.stop()


def _certipy_find(env: Published, tmp_path: Path, account: str, *extra: str) -> dict[str, Any]:
    """``certipy find`` as ``account``; its JSON report."""
    if not CERTIPY.exists():
        reason = "certipy-ad is not installed in .venv-certipy (scripts/setup --test)"
        if os.environ.get("PKIGATE_TOOLS_INSTALLED"):
            pytest.fail(reason)
        pytest.skip(reason)
    who = env.dc.account(account)
    command = [str(CERTIPY), "find", "-u", f"{account}@{env.dc.dns_domain}", "-p", who.password]
    command += ["-dc-ip", env.dc.address, "-ldap-scheme", "ldap", "-ldap-simple-auth", "-dc-only"]
    # A relative prefix: certipy turns the slashes of a path into underscores.
    command += ["-json", "-output", account, *extra]
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = tmp_path / f"{account}_Certipy.json"
    assert report.exists(), done.stdout + done.stderr
    return dict(json.loads(report.read_text()))


def _templates(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = report["Certificate Templates"]
    if isinstance(found, str):  # "[!] Could not find any certificate templates"
        return {}
    return {t["Template Name"]: t for t in found.values()}


def test_publish_writes_the_objects_an_enterprise_ca_registers(published: Published) -> None:
    env, dc = published, published.dc
    outcomes = env.publish_output["template_outcomes"]
    assert [outcomes[name] for name in PKIGATE_TEMPLATES] == ["created"] * 3
    assert outcomes[DANGEROUS] == "existing"  # offered as the directory defines it
    issuing = x509.load_der_x509_certificate(
        env.read(env.publish_output["dn"], "cACertificate")["cacertificate"][0]
    )
    service = env.read(
        env.publish_output["dn"], "cACertificateDN", "dNSHostName", "flags", "certificateTemplates"
    )
    assert service["cacertificatedn"] == [
        ", ".join(r.rfc4514_string() for r in reversed(issuing.subject.rdns)).encode()
    ]
    assert service["flags"] == [str(ENTERPRISE_CA_FLAGS).encode()]
    assert {v.decode() for v in service["certificatetemplates"]} == {*PKIGATE_TEMPLATES, DANGEROUS}
    der = issuing.public_bytes(serialization.Encoding.DER)
    pks = layout.public_key_services_dn(dc.base)
    assert der in env.read(f"CN=NTAuthCertificates,{pks}", "cACertificate")["cacertificate"]
    assert env.read(f"CN={CA_NAME},CN=AIA,{pks}", "cACertificate")["cacertificate"] == [der]
    # The connector reads every template back, security descriptor included (SD_FLAGS).
    directory = Directory(dc.url, dc.base, dc.admin_dn, dc.admin_password, cache_ttl=0)
    templates = directory.templates()
    assert set(PKIGATE_TEMPLATES) <= set(templates), directory.template_errors()
    # Each template OID is named by an msPKI-Enterprise-Oid object under CN=OID.
    with dc.admin_connection() as conn:
        for name in PKIGATE_TEMPLATES:
            oid = templates[name].oid
            assert oid and oid.startswith("1.3.6.1.4.1.311.21.8.")
            conn.search(
                f"CN=OID,{pks}",
                f"(msPKI-Cert-Template-OID={oid})",
                LEVEL,
                attributes=["displayName", "flags"],
            )
            assert len(conn.response) == 1, name
            raw = conn.response[0]["raw_attributes"]
            assert raw["flags"] == [str(CERT_OID_TYPE_TEMPLATE).encode()]
            assert raw["displayName"] == [templates[name].display_name.encode()]
    core = Core.open(env.server.data_dir)
    try:
        c = schema.audit_events.c
        with core.store.read() as conn:
            rows = conn.execute(
                select(c.result, c.parameters).where(c.action == "adcs.publish")
            ).all()
    finally:
        core.close()
    assert rows and rows[0].result == "success"
    assert json.loads(rows[0].parameters)["template_outcomes"][DANGEROUS] == "existing"


def test_publishing_again_keeps_oids_and_keep_existing_templates_leaves_edits(
    published: Published,
) -> None:
    env = published
    dn = layout.template_dn(env.dc.base, "User")
    before = env.read(dn, "msPKI-Cert-Template-OID")["mspki-cert-template-oid"]
    with env.dc.admin_connection() as conn:
        assert conn.modify(dn, {"displayName": [(MODIFY_REPLACE, ["Edited by an admin"])]})
    kept = env.publish("--keep-existing-templates")
    assert kept["template_outcomes"]["User"] == "kept"
    assert (kept["result"], kept["ntauth"], kept["aia"]) == ("updated", "present", "present")
    assert env.read(dn, "displayName")["displayname"] == [b"Edited by an admin"]
    rewritten = env.publish()
    assert rewritten["template_outcomes"]["User"] == "updated"
    user = env.read(dn, "displayName", "msPKI-Cert-Template-OID")
    assert user["displayname"] == [b"User"]
    assert user["mspki-cert-template-oid"] == before


def test_certipy_find_enumerates_the_ca_and_its_templates(
    published: Published, tmp_path: Path
) -> None:
    report = _certipy_find(published, tmp_path, "eve")
    cas = {ca["CA Name"]: ca for ca in report["Certificate Authorities"].values()}
    ca = cas[CA_NAME]
    issuing = x509.load_der_x509_certificate(
        published.read(published.publish_output["dn"], "cACertificate")["cacertificate"][0]
    )
    assert ca["DNS Name"] == published.publish_output["dns_host_name"]
    assert ca["Certificate Serial Number"] == f"{issuing.serial_number:X}"
    templates = _templates(report)
    for name in PKIGATE_TEMPLATES:
        assert templates[name]["Enabled"] is True, templates[name]
        assert templates[name]["Certificate Authorities"] == [CA_NAME]
        assert templates[name]["Schema Version"] == 2
    rights = {
        n: templates[n]["Permissions"]["Enrollment Permissions"]["Enrollment Rights"]
        for n in PKIGATE_TEMPLATES
    }
    assert any("Domain Computers" in r for r in rights["Machine"]), rights
    assert any("Domain Users" in r for r in rights["User"]), rights
    assert all("Domain Admins" in r for r in rights["WebServer"]), rights


def test_certipy_finds_no_pkigate_template_an_ordinary_user_can_abuse(
    published: Published, tmp_path: Path
) -> None:
    """certipy counts Domain Users, Domain Computers (machine account quota) and
    Authenticated Users for eve: only the hand-made ESC1 template is reported."""
    report = _certipy_find(published, tmp_path, "eve", "-vulnerable")
    vulnerable = {
        name: template.get("[!] Vulnerabilities", {})
        for name, template in _templates(report).items()
    }
    assert set(vulnerable) == {DANGEROUS}, vulnerable
    assert "ESC1" in vulnerable[DANGEROUS]


def _csr_naming(key: Any, common_name: str, upn: str) -> str:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .add_extension(x509.SubjectAlternativeName([upn_other_name(upn)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _enroll(env: Published, account: str, template: str, csr: str) -> requests.Response:
    session = requests.Session()
    session.trust_env = False
    session.verify = str(env.server.tls_bundle)
    return session.post(
        f"{env.server.https_url}/adcs/enroll",
        json={"template": template, "csr": csr},
        auth=(account, env.dc.account(account).password),
        timeout=COMMAND_TIMEOUT,
    )


def test_the_abuse_certipy_flags_is_refused_by_pkigate(published: Published) -> None:
    """ESC1 as certipy would exploit it: eve asks the flagged template for a certificate
    naming Administrator. pkigate refuses a client-authentication template whose subject
    the enrollee supplies, whoever holds Enroll on it."""
    key = rsa.generate_private_key(65537, 2048)
    admin_upn = f"Administrator@{published.dc.dns_domain}"
    response = _enroll(published, "eve", DANGEROUS, _csr_naming(key, "Administrator", admin_upn))
    assert response.status_code == 403, response.text
    assert response.json()["error"] == "dangerousTemplate"
    assert response.json()["attack"] == "ESC1"


def test_pkigate_templates_name_the_requester_and_enforce_enroll_rights(
    published: Published,
) -> None:
    """What certipy takes on trust from the template flags, checked at the endpoint: the
    User template names eve from the directory whatever the request claims, and WebServer
    (Domain Admins only) refuses her."""
    key = rsa.generate_private_key(65537, 2048)
    admin_upn = f"Administrator@{published.dc.dns_domain}"
    csr = _csr_naming(key, "Administrator", admin_upn)
    issued = _enroll(published, "eve", "User", csr)
    assert issued.status_code == 200, issued.text
    certificate = x509.load_pem_x509_certificate(issued.json()["certificate"].encode())
    sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert upn_other_name(f"eve@{published.dc.dns_domain}") in sans
    assert upn_other_name(admin_upn) not in sans
    assert "Administrator" not in certificate.subject.rfc4514_string()
    refused = _enroll(published, "eve", "WebServer", csr)
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"] == "accessDenied"
