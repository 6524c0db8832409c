"""AD-style enrollment against a running `pkigate serve` and a real OpenLDAP directory
(`DevDirectory`: slapd with AD's schema and the seeded example domain): machine and user
enrollment over MS-XCEP/MS-WSTEP and the JSON endpoint, group rights with nesting and deny,
disabled accounts, renewal with a client certificate, pending approval, the ADCS abuse
classes (ESC1, 2, 3, 6, 8, 9/16, 15) refused and audited, and bad SOAP."""

from __future__ import annotations

import base64
import http.client
import json
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import pytest
import requests
from adcs_directory_fixture import make_dev_directory_fixture
from asn1crypto import core as asn1_core
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from helpers import adcs_refusals, raw_csr
from ldap3 import MODIFY_REPLACE, Connection
from samba_dc import SambaDC, make_samba_dc_fixture
from serving import RunningServer, adcs_connector_config, console_signin, start_server
from sqlalchemy import func, select

from pkigate.adcs import soap
from pkigate.adcs.directory import DevDirectory
from pkigate.adcs.encoding import interval_to_filetime, to_ad_int32
from pkigate.adcs.flags import (
    CertificateNameFlag,
    EnrollmentFlag,
    GroupType,
    PrivateKeyFlag,
    UserAccountControl,
)
from pkigate.adcs.layout import dns_domain, enrollment_services_dn, template_dn
from pkigate.adcs.policy import (
    APPLICATION_POLICIES_OID,
    SECURITY_EXTENSION_OID,
    TEMPLATE_INFO_OID,
    security_extension,
    sid_from_certificate,
)
from pkigate.core import Actor, Core
from pkigate.core.der import tlv
from pkigate.core.model import RevocationReason
from pkigate.core.names import UPN_OID, decode_upn
from pkigate.core.store import schema

dev_directory = make_dev_directory_fixture("module")
samba_dc = make_samba_dc_fixture("module")

PKIGATE = str(Path(sys.executable).parent / "pkigate")
ANY_PURPOSE = "2.5.29.37.0"
REQUEST_AGENT = "1.3.6.1.4.1.311.20.2.1"
ESC13_POLICY_OID = "1.3.6.1.4.1.311.21.8.4121.7.1.400.1"
ESC13_GROUP_DN = "CN=Tier0 Operators,CN=Users,{base}"
ESC13_OID_DN = (
    "CN=400.0F1E2D3C4B5A69788796A5B4C3D2E1F0,CN=OID,CN=Public Key Services,CN=Services,"
    "{configuration}"
)
UNIVERSAL = GroupType.SECURITY_ENABLED | GroupType.UNIVERSAL_GROUP


PUBLISHED = (
    "Machine",
    "MachinePending",
    "MachineManual",
    "User",
    "WebServer",
    "UserPending",
    "ESC1Vulnerable",
    "ESC1AgentSigned",
    "ThirtyDaysV1",
    "ThirtyDaysV2",
    "ClientSuppliedAltNames",
    "AnyPurpose",
    "NoEku",
    "EnrollmentAgent",
    "NoSidExtension",
    "Archival",
    "IssuancePolicyLinked",
)
"""The templates the test CA offers (its pKIEnrollmentService certificateTemplates)."""


class Directory(Protocol):
    """What the tests use of the development directory and of the Samba DC alike."""

    url: str
    base: str
    admin_dn: str
    admin_password: str

    @property
    def accounts(self) -> Mapping[str, Any]: ...

    def admin_connection(self) -> Connection: ...


# Attributes a copied template does not take over: its name, and what an AD assigns itself.
NOT_COPIED = frozenset(
    {"cn", "name", "distinguishedname", "objectguid", "instancetype", "objectcategory",
     "whencreated", "whenchanged", "usncreated", "usnchanged", "dscorepropagationdata"}
)  # fmt: skip


@dataclass
class Env:
    server: RunningServer
    directory: Directory
    core: Core
    config: Path

    @property
    def url(self) -> str:
        return f"{self.server.https_url}/adcs"

    @property
    def domain(self) -> str:
        """The directory's DNS domain (example.test, samba.test)."""
        return dns_domain(self.directory.base)

    def account(self, name: str) -> Any:
        # sAMAccountName matches without case, as in AD ("ws01$" is "WS01$").
        return next(a for n, a in self.directory.accounts.items() if n.lower() == name.lower())

    def password(self, name: str) -> str:
        return str(self.account(name).password)

    def sid(self, name: str) -> str:
        return str(self.account(name).sid)

    def plain(self) -> requests.Session:
        session = requests.Session()
        session.trust_env = False
        session.verify = str(self.server.tls_bundle)
        return session

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                PKIGATE,
                "--json",
                "--data-dir",
                str(self.server.data_dir),
                "adcs",
                "--config",
                str(self.config),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def counts(self) -> dict[str, int]:
        with self.core.store.read() as conn:
            return {
                t.name: int(conn.execute(select(func.count()).select_from(t)).scalar_one())
                for t in (schema.certificates, schema.adcs_requests)
            }

    def refusals(self, attack: str | None = None) -> list[dict[str, Any]]:
        found = adcs_refusals(self.core)
        return [f for f in found if attack is None or f.get("attack") == attack]


def _add_template(directory: Directory, name: str, base_template: str, **changes: Any) -> None:
    """A copy of a seeded template under another name, with some attributes replaced."""
    conn = directory.admin_connection()
    try:
        source = template_dn(directory.base, base_template)
        # An AD returns the security descriptor only when asked for it by name.
        attributes_read = ["*", "nTSecurityDescriptor"]
        conn.search(source, "(objectClass=*)", search_scope="BASE", attributes=attributes_read)
        entry = conn.response[0]["raw_attributes"]
        attributes = {k: v for k, v in entry.items() if k.lower() not in NOT_COPIED}
        attributes["cn"] = [name.encode()]
        attributes["msPKI-Cert-Template-OID"] = [
            f"1.3.6.1.4.1.311.21.8.99.{uuid.uuid4().int % 10**6}".encode()
        ]
        for key, value in changes.items():
            for existing in [k for k in attributes if k.lower() == key.lower()]:
                del attributes[existing]
            if value:
                attributes[key] = value
        assert conn.add(template_dn(directory.base, name), attributes=attributes), conn.result
    finally:
        conn.unbind()


def _link_issuance_policy_to_a_group(directory: SambaDC) -> None:
    """ESC13 as AD holds it: a universal group (empty, as AD requires) linked from the
    msPKI-Enterprise-Oid object of :data:`ESC13_POLICY_OID` by msDS-OIDToGroupLink."""
    conn = directory.admin_connection()
    try:
        assert conn.add(
            ESC13_GROUP_DN.format(base=directory.base),
            ["top", "group"],
            {"sAMAccountName": "Tier0 Operators", "groupType": str(to_ad_int32(UNIVERSAL))},
        ), conn.result
        assert conn.add(
            ESC13_OID_DN.format(configuration=directory.configuration_dn),
            ["top", "msPKI-Enterprise-Oid"],
            {
                "msPKI-Cert-Template-OID": ESC13_POLICY_OID,
                "flags": "2",  # an issuance policy ([MS-CRTD] 2.5: CERT_OID_TYPE_ISSUER_POLICY)
                "displayName": "Tier 0 logon",
                "msDS-OIDToGroupLink": ESC13_GROUP_DN.format(base=directory.base),
            },
        ), conn.result
    finally:
        conn.unbind()


@contextmanager
def _running_env(directory: Directory, base: Path) -> Iterator[Env]:
    """pkigate serve with the AD-style connector on ``directory``, the templates the tests
    use added to it and published."""
    agent_flags = str(int(EnrollmentFlag(0))).encode()
    _add_template(
        directory,
        "AnyPurpose",
        "ESC1Vulnerable",
        pKIExtendedKeyUsage=[ANY_PURPOSE.encode()],
        **{
            "msPKI-Certificate-Name-Flag": [b"0"],
            "msPKI-Certificate-Application-Policy": [ANY_PURPOSE.encode()],
        },
    )
    _add_template(
        directory,
        "NoEku",
        "User",
        pKIExtendedKeyUsage=[],
        **{"msPKI-Certificate-Application-Policy": []},
    )
    _add_template(
        directory,
        "EnrollmentAgent",
        "User",
        pKIExtendedKeyUsage=[REQUEST_AGENT.encode()],
        **{
            "msPKI-Certificate-Application-Policy": [REQUEST_AGENT.encode()],
            "msPKI-Enrollment-Flag": [agent_flags],
        },
    )
    _add_template(
        directory,
        "NoSidExtension",
        "User",
        **{"msPKI-Enrollment-Flag": [str(int(EnrollmentFlag.NO_SECURITY_EXTENSION)).encode()]},
    )
    _add_template(directory, "Unpublished", "User")
    _add_template(
        directory,
        "MachinePending",
        "Machine",
        **{"msPKI-Enrollment-Flag": [str(int(EnrollmentFlag.PEND_ALL_REQUESTS)).encode()]},
    )
    # Domain Computers hold AutoEnroll on it, but the template is not enabled for it.
    _add_template(directory, "MachineManual", "Machine", **{"msPKI-Enrollment-Flag": [b"0"]})
    # Validity, version and (by schema version) the EKU source come from the template.
    client_auth, email = ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.EMAIL_PROTECTION
    for name, schema_version in (("ThirtyDaysV1", 1), ("ThirtyDaysV2", 2)):
        _add_template(
            directory,
            name,
            "User",
            pKIExpirationPeriod=[interval_to_filetime(timedelta(days=30))],
            pKIOverlapPeriod=[interval_to_filetime(timedelta(days=6))],
            pKIExtendedKeyUsage=[email.dotted_string.encode()],
            revision=[b"7"],
            **{
                "msPKI-Template-Schema-Version": [str(schema_version).encode()],
                "msPKI-Template-Minor-Revision": [b"3"],
                "msPKI-Minimal-Key-Size": [b"2048"],
                "msPKI-Certificate-Application-Policy": [client_auth.dotted_string.encode()],
            },
        )
    # ESC1's template, but each request must be countersigned by an enrollment agent.
    _add_template(directory, "ESC1AgentSigned", "ESC1Vulnerable", **{"msPKI-RA-Signature": [b"1"]})
    # Client authentication where the enrollee may supply alternative names only.
    _add_template(
        directory,
        "ClientSuppliedAltNames",
        "ESC1Vulnerable",
        **{
            "msPKI-Certificate-Name-Flag": [
                str(int(CertificateNameFlag.ENROLLEE_SUPPLIES_SUBJECT_ALT_NAME)).encode()
            ]
        },
    )
    _add_template(
        directory,
        "Archival",
        "User",
        **{
            "msPKI-Private-Key-Flag": [
                str(int(PrivateKeyFlag.REQUIRE_PRIVATE_KEY_ARCHIVAL)).encode()
            ]
        },
    )
    # ESC13: an issuance policy whose OID object links it to a group (in AD, logging on with
    # a certificate naming the policy adds the group to the token).
    _add_template(
        directory,
        "IssuancePolicyLinked",
        "User",
        **{"msPKI-Certificate-Policy": [ESC13_POLICY_OID.encode()]},
    )
    if isinstance(directory, SambaDC):
        _link_issuance_policy_to_a_group(directory)
    # Against AD, base is left out as its users would: the root DSE names the domain.
    server = start_server(
        base / "data",
        extra_config=adcs_connector_config(
            directory.url,
            None if isinstance(directory, SambaDC) else directory.base,
            directory.admin_dn,
            directory.admin_password,
            cache_ttl_seconds=0,
        ),
    )
    config = base / "data.toml"
    env = Env(server, directory, Core.open(base / "data"), config)
    try:
        published = env.cli(
            "publish",
            "--connector",
            "adcs",
            "--keep-existing-templates",
            *[arg for name in PUBLISHED for arg in ("--template", name)],
        )
        assert published.returncode == 0, published.stderr
        assert json.loads(published.stdout)["result"] == "created"
        yield env
    finally:
        env.core.close()
        server.stop()


@pytest.fixture(scope="module")
def dev_env(dev_directory: DevDirectory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with _running_env(dev_directory, tmp_path_factory.mktemp("adcs")) as env:
        yield env


@pytest.fixture(scope="module")
def samba_env(samba_dc: SambaDC, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    with _running_env(samba_dc, tmp_path_factory.mktemp("adcs-samba")) as env:
        yield env


@pytest.fixture
def env(request: pytest.FixtureRequest) -> Env:
    """The server over the development directory; over a Samba AD DC for the tests marked
    :data:`both_directories`."""
    directory = getattr(request, "param", "dev")
    return cast(Env, request.getfixturevalue(f"{directory}_env"))


both_directories = pytest.mark.parametrize("env", ["dev", "samba"], indirect=True)
"""Run a test against the development directory and against a real AD (Samba): the ESC
tests, and those where names and rights come from the directory."""


def _csr(
    key: Any = None,
    cn: str = "CN from the request",
    sans: list[x509.GeneralName] | None = None,
    extensions: list[tuple[x509.ExtensionType, bool]] | None = None,
) -> tuple[bytes, Any]:
    key = key or rsa.generate_private_key(65537, 2048)
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    for extension, critical in extensions or []:
        builder = builder.add_extension(extension, critical=critical)
    csr = builder.sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER), key


def _pem_csr(der: bytes) -> str:
    return x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM).decode()


def _json_enroll(
    env: Env, user: str, template: str, der: bytes, password: str | None = None, **extra: Any
) -> requests.Response:
    return env.plain().post(
        f"{env.url}/enroll",
        json={"template": template, "csr": _pem_csr(der), **extra},
        auth=(user, password if password is not None else env.password(user)),
        timeout=30,
    )


def _wstep(
    env: Env,
    user: str,
    der: bytes,
    template: str | None = None,
    context: tuple[tuple[str, str], ...] = (),
    password: str | None = None,
    path: str = "/ces",
    value_type: str = soap.VALUE_TYPE_PKCS10,
) -> tuple[requests.Response, soap.RstrResult]:
    extra = ((("CertificateTemplate", template),) if template else ()) + context
    body = soap.build_rst_issue(
        env.url + path,
        der,
        f"urn:uuid:{uuid.uuid4()}",
        user,
        password if password is not None else env.password(user),
        value_type=value_type,
        additional_context=extra,
    )
    response = env.plain().post(
        env.url + path,
        data=body,
        headers={"Content-Type": "application/soap+xml; charset=utf-8"},
        timeout=30,
    )
    return response, soap.parse_rstr(response.content)


def _certificate(response: requests.Response) -> x509.Certificate:
    assert response.status_code == 200, response.text
    return x509.load_pem_x509_certificate(response.json()["certificate"].encode())


def _check_chain(env: Env, certificate: x509.Certificate, ekus: set[str]) -> None:
    """The certificate chains to the root (pyhanko), with the template's EKUs only."""
    chain_pem = (
        env.server.session()
        .get(f"{env.server.http_url}/ca/{_issuing_id(env)}.cer", timeout=10)
        .content
    )
    issuing = x509.load_der_x509_certificate(chain_pem)
    import asyncio

    from asn1crypto import x509 as asn1_x509
    from pyhanko_certvalidator import CertificateValidator, ValidationContext

    def a1(c: x509.Certificate) -> Any:
        return asn1_x509.Certificate.load(c.public_bytes(serialization.Encoding.DER))

    root = x509.load_pem_x509_certificate(env.server.tls_bundle.read_bytes())
    context = ValidationContext(
        trust_roots=[a1(root)],
        other_certs=[a1(issuing)],
        allow_fetching=False,
        revocation_mode="soft-fail",
    )
    asyncio.run(
        CertificateValidator(a1(certificate), validation_context=context).async_validate_path()
    )
    got = {
        o.dotted_string
        for o in certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    }
    assert got == ekus


def _issuing_id(env: Env) -> str:
    with env.core.store.read() as conn:
        return str(
            conn.execute(
                select(schema.authorities.c.id).where(schema.authorities.c.type == "SUBORDINATE")
            ).scalar_one()
        )


def _sans(certificate: x509.Certificate) -> x509.SubjectAlternativeName:
    return certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value


# -- enrollment ----------------------------------------------------------------------------


@both_directories
def test_machine_enrolls_over_wstep_with_its_directory_names(env: Env) -> None:
    der, _ = _csr(cn="evil.example.test", sans=[x509.DNSName("evil.example.test")])
    response, result = _wstep(env, "ws01$", der, template="Machine")
    assert response.status_code == 200, response.text
    assert result.status == "issued" and result.request_id
    assert result.certificate_der is not None
    certificate = x509.load_der_x509_certificate(result.certificate_der)
    assert certificate.subject.rfc4514_string() == f"CN=ws01.{env.domain}"
    assert _sans(certificate).get_values_for_type(x509.DNSName) == [f"ws01.{env.domain}"]
    assert sid_from_certificate(certificate) == env.sid("ws01$")
    _check_chain(
        env,
        certificate,
        {
            ExtendedKeyUsageOID.CLIENT_AUTH.dotted_string,
            ExtendedKeyUsageOID.SERVER_AUTH.dotted_string,
        },
    )
    assert result.chain_der and len(pkcs7.load_der_pkcs7_certificates(result.chain_der)) >= 2


@both_directories
def test_user_enrolls_over_json_and_the_csr_names_are_ignored(env: Env) -> None:
    der, _ = _csr(cn="Administrator", sans=[x509.RFC822Name("administrator@example.test")])
    certificate = _certificate(_json_enroll(env, "alice", "User", der))
    assert "alice" in certificate.subject.rfc4514_string().lower()
    assert "administrator" not in certificate.subject.rfc4514_string().lower()
    sans = _sans(certificate)
    upns = [
        decode_upn(n.value)
        for n in sans.get_values_for_type(x509.OtherName)
        if n.type_id == UPN_OID
    ]
    assert upns == [f"alice@{env.domain}"]
    assert sans.get_values_for_type(x509.RFC822Name) == [f"alice@{env.domain}"]
    assert sid_from_certificate(certificate) == env.sid("alice")
    assert (
        ExtendedKeyUsageOID.CLIENT_AUTH
        in certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    )


@both_directories
def test_policy_lists_the_templates_the_caller_may_enroll_in(env: Env) -> None:
    def templates(user: str) -> dict[str, soap.PolicyTemplate]:
        body = soap.build_get_policies_request(
            env.url + "/cep", f"urn:uuid:{uuid.uuid4()}", user, env.password(user)
        )
        response = env.plain().post(
            env.url + "/cep",
            data=body,
            headers={"Content-Type": "application/soap+xml; charset=utf-8"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        listed, cas = soap.parse_get_policies_response(response.content)
        assert cas and {u.uri for u in cas[0].uris} == {
            env.url + "/ces",
            env.url + "/ces-certificate",
        }
        return {t.common_name: t for t in listed}

    alice = templates("alice")
    assert {"User", "WebServer", "UserPending"} <= alice.keys()
    assert "Machine" not in alice
    machines = templates("ws01$")
    assert "Machine" in machines and "User" not in machines
    assert "User" not in templates("carol")  # denied through Denied Users
    # The template's attributes, as the directory holds them (the test's own template).
    listed = alice["ThirtyDaysV2"]
    assert (listed.validity_seconds, listed.renewal_seconds) == (30 * 86400, 6 * 86400)
    assert (listed.schema_version, listed.major_revision, listed.minor_revision) == (2, 7, 3)
    assert listed.minimal_key_size == 2048
    assert listed.ekus == (ExtendedKeyUsageOID.CLIENT_AUTH.dotted_string,)
    assert listed.permission_enroll and not listed.permission_autoenroll
    # Domain Computers hold AutoEnroll on Machine.
    assert machines["Machine"].permission_enroll and machines["Machine"].permission_autoenroll


@both_directories
def test_nested_group_rights_and_the_enrollee_supplied_subject_of_webserver(env: Env) -> None:
    der, _ = _csr(cn="intranet.example.test", sans=[x509.DNSName("intranet.example.test")])
    # alice is in Web Admins; eve is not.
    certificate = _certificate(_json_enroll(env, "alice", "WebServer", der))
    assert certificate.subject.rfc4514_string() == "CN=intranet.example.test"
    assert "intranet.example.test" in _sans(certificate).get_values_for_type(x509.DNSName)
    refused = _json_enroll(env, "eve", "WebServer", der)
    assert refused.status_code == 403 and refused.json()["error"] == "accessDenied"


@both_directories
def test_a_deny_ace_wins_and_a_disabled_account_is_refused(env: Env) -> None:
    der, _ = _csr()
    before = env.counts()["certificates"]
    denied = _json_enroll(env, "carol", "User", der)
    assert denied.status_code == 403 and denied.json()["error"] == "accessDenied"
    disabled = _json_enroll(env, "bob", "User", der)
    assert disabled.status_code == 403 and disabled.json()["error"] == "accountDisabled"
    assert env.counts()["certificates"] == before
    assert any(r["code"] == "accountDisabled" for r in env.refusals())


@both_directories
@pytest.mark.parametrize(
    ("user", "password", "template", "status", "error"),
    [
        ("alice", "wrong", "User", 401, "badCredentials"),
        ("nobody", "x", "User", 401, "badCredentials"),
        ("alice", None, "NoSuchTemplate", 404, "unknownTemplate"),
        ("alice", None, "Unpublished", 403, "templateNotPublished"),
    ],
)
def test_credentials_and_templates_are_checked(
    env: Env, user: str, password: str | None, template: str, status: int, error: str
) -> None:
    before, audited = env.counts(), len(env.refusals())
    response = env.plain().post(
        f"{env.url}/enroll",
        json={"template": template, "csr": _pem_csr(_csr()[0])},
        auth=(user, password if password is not None else env.password(user)),
        timeout=30,
    )
    assert response.status_code == status, response.text
    assert response.json()["error"] == error
    assert [r["code"] for r in env.refusals()[audited:]] == [error]
    assert env.counts() == before


def test_a_password_saslprep_refuses_is_wrong_credentials_not_an_outage(env: Env) -> None:
    # Found by tests/fuzzing.py: ldap3 refuses to prepare such a password (RFC 4013) before
    # any bind, which was taken for an unavailable directory (503).
    before = env.counts()["certificates"]
    response, result = _wstep(env, "alice", _csr()[0], "User", password="\u202e\ufeff")
    assert response.status_code == 401, response.text
    assert result.status == "fault"
    assert env.counts()["certificates"] == before


def test_a_csr_the_core_cannot_read_is_a_bad_request_not_a_crash(env: Env) -> None:
    # Found by tests/fuzzing.py: an unknown key algorithm and an out-of-range version field
    # raised from the signature check (a 500).
    der = _csr()[0]
    rsa_encryption = bytes.fromhex("06092a864886f70d010101")
    unknown_key = der.replace(rsa_encryption, bytes.fromhex("06092a864886f70d010163"))
    at = der.index(b"\x02\x01\x00")  # the first INTEGER: CertificationRequestInfo's version
    bad_version = der[: at + 2] + b"\x05" + der[at + 3 :]
    before = env.counts()["certificates"]
    for bad in (unknown_key, bad_version):
        response, result = _wstep(env, "alice", bad, "User")
        assert response.status_code == 400, response.text
        assert result.status == "fault"
    assert env.counts()["certificates"] == before


def _extension_request(oid: str, value: bytes) -> bytes:
    """An extensionRequest attribute (PKCS#9) asking for one extension with raw ``value``."""
    extension = tlv(0x30, asn1_core.ObjectIdentifier(oid).dump(), tlv(0x04, value))
    return tlv(
        0x30,
        asn1_core.ObjectIdentifier("1.2.840.113549.1.9.14").dump(),
        tlv(0x31, tlv(0x30, extension)),
    )


def test_requests_whose_structures_break_parsers_are_bad_requests(env: Env) -> None:
    """Found in review: a template name extension nested 3000 deep (asn1crypto's .native
    recursed out: a 500), and a subject with an empty RDN on a template whose subject the
    request supplies (cryptography refuses to read it only when asked: a 500)."""
    key = rsa.generate_private_key(65537, 2048)
    cn = tlv(
        0x30, tlv(0x31, tlv(0x30, asn1_core.ObjectIdentifier("2.5.4.3").dump() + tlv(0x0C, b"x")))
    )
    nested = b"\x05\x00"
    for _ in range(3000):
        nested = tlv(0x30, nested)
    deep_name = raw_csr(key, cn, _extension_request("1.3.6.1.4.1.311.20.2", nested))
    empty_rdn = raw_csr(key, tlv(0x30, tlv(0x31)))
    before = env.counts()
    for name, der, template, user in (
        ("deep template name", deep_name, "User", "alice"),
        ("empty RDN", empty_rdn, "WebServer", "alice"),
    ):
        audited = len(env.refusals())
        response = _json_enroll(env, user, template, der)
        assert response.status_code == 400, (name, response.text)
        assert response.json()["error"] == "badRequest", name
        soap_response, result = _wstep(env, user, der, template=template)
        assert soap_response.status_code == 400 and result.status == "fault", name
        assert [r["code"] for r in env.refusals()[audited:]] == ["badRequest"] * 2, name
    assert env.counts() == before


def test_a_key_below_the_template_minimum_is_refused(env: Env) -> None:
    small = rsa.generate_private_key(65537, 1024)  # noqa: S505 - the weak key under test
    before, audited = env.counts(), len(env.refusals())
    response = _json_enroll(env, "alice", "User", _csr(small)[0])
    assert response.status_code == 400 and response.json()["error"] == "keyTooSmall"
    assert "2048" in response.json()["message"]
    assert [r["code"] for r in env.refusals()[audited:]] == ["keyTooSmall"]
    assert env.counts() == before


# -- renewal with a client certificate -------------------------------------------------------


def test_a_json_body_over_the_gateways_limit_is_payload_too_large(env: Env) -> None:
    before, audited = env.counts(), len(env.refusals())
    status, content_type, content = _post_over_the_body_limit(
        env, "/enroll", "application/json", auth=("alice", env.password("alice"))
    )
    assert (status, content_type) == (413, "application/json"), content[:300]
    assert json.loads(content)["error"] == "payloadTooLarge"
    assert [r["code"] for r in env.refusals()[audited:]] == ["payloadTooLarge"]
    assert env.counts() == before


def _files(tmp_path: Path, certificate: x509.Certificate, key: Any) -> tuple[str, str]:
    cert_path, key_path = tmp_path / "client.pem", tmp_path / "client.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(cert_path), str(key_path)


def _assert_login_refused(
    env: Env, tmp_path: Path, certificate: x509.Certificate, key: Any, code: str, message: str
) -> None:
    """Enrolling with ``certificate`` as the TLS client certificate is refused with ``code``
    (``message`` in its text), audited once, and changes nothing."""
    before, audited = env.counts(), len(env.refusals())
    response = env.plain().post(
        f"{env.url}/enroll",
        json={"template": "User", "csr": _pem_csr(_csr()[0])},
        cert=_files(tmp_path, certificate, key),
        timeout=30,
    )
    assert response.status_code == 403, response.text
    assert response.json()["error"] == code and message in response.json()["message"]
    assert [r["code"] for r in env.refusals()[audited:]] == [code]
    assert env.counts() == before


def test_renewal_with_the_client_certificate_over_json_and_wstep(env: Env, tmp_path: Path) -> None:
    der, key = _csr()
    first = _certificate(_json_enroll(env, "alice", "User", der))
    client = _files(tmp_path, first, key)
    renewed = env.plain().post(
        f"{env.url}/enroll",
        json={"template": "User", "csr": _pem_csr(_csr()[0])},
        cert=client,
        timeout=30,
    )
    second = _certificate(renewed)
    assert sid_from_certificate(second) == env.sid("alice")
    assert second.serial_number != first.serial_number
    body = soap.build_rst_issue(
        env.url + "/ces-certificate",
        _csr()[0],
        f"urn:uuid:{uuid.uuid4()}",
        additional_context=(("CertificateTemplate", "User"),),
    )
    response = env.plain().post(
        env.url + "/ces-certificate",
        data=body,
        headers={"Content-Type": "application/soap+xml; charset=utf-8"},
        cert=client,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert soap.parse_rstr(response.content).status == "issued"


@pytest.mark.parametrize(
    ("change", "code", "message"),
    [
        ("disable", "accountDisabled", "is disabled"),
        ("delete", "badCertificate", "no longer exists"),
    ],
)
def test_a_client_certificate_of_a_disabled_or_deleted_account_is_refused(
    env: Env, tmp_path: Path, change: str, code: str, message: str
) -> None:
    from pkigate.devsim.adcs_client import provision_machine

    host = f"CERT{change.upper()}"
    machine = provision_machine(env.directory, host, rid=62000 + len(change))
    der, key = _csr()
    first = _certificate(_json_enroll(env, machine.name, "Machine", der, password=machine.password))
    assert sid_from_certificate(first) == machine.sid
    conn = env.directory.admin_connection()
    try:
        dn = f"CN={host},CN=Computers,{env.directory.base}"
        if change == "disable":
            disabled = (
                UserAccountControl.WORKSTATION_TRUST_ACCOUNT | UserAccountControl.ACCOUNTDISABLE
            )
            assert conn.modify(dn, {"userAccountControl": [(MODIFY_REPLACE, [str(int(disabled))])]})
        else:
            assert conn.delete(dn), conn.result
    finally:
        conn.unbind()
    _assert_login_refused(env, tmp_path, first, key, code, message)


def test_a_certificate_whose_subject_the_request_supplied_does_not_log_in(
    env: Env, tmp_path: Path
) -> None:
    """Found in review: the Administrator may request a certificate naming a kiosk from an
    enrollee-supplies-subject template; it carries the Administrator's SID (every
    certificate does), but it names the kiosk, and whoever holds the kiosk's key must not
    enroll as the Administrator with it."""
    der, key = _csr(cn="kiosk01.example.test", sans=[x509.DNSName("kiosk01.example.test")])
    kiosk = _certificate(_json_enroll(env, "Administrator", "ESC1Vulnerable", der))
    assert sid_from_certificate(kiosk) == env.sid("Administrator")
    _assert_login_refused(
        env, tmp_path, kiosk, key, "badCertificate", "with names from the directory"
    )


def test_certificates_from_before_the_login_record_log_in_by_their_template(
    env: Env, tmp_path: Path
) -> None:
    """Requests settled before schema 0007 have no record of where their names came from:
    their certificates log in if their template takes the names from the directory (a
    machine must renew without a password), not if the request supplied them."""
    from sqlalchemy import update

    der, key = _csr()
    user = _certificate(_json_enroll(env, "alice", "User", der))
    kiosk_der, kiosk_key = _csr(cn="kiosk02.example.test")
    kiosk = _certificate(_json_enroll(env, "Administrator", "ESC1Vulnerable", kiosk_der))
    c = schema.adcs_requests.c
    with env.core.store.write() as conn:
        for certificate in (user, kiosk):
            serial = format(certificate.serial_number, "x")
            conn.execute(
                update(schema.adcs_requests)
                .where(c.serial == serial)
                .values(names_from_directory=None)
            )
    renewed = env.plain().post(
        f"{env.url}/enroll",
        json={"template": "User", "csr": _pem_csr(_csr()[0])},
        cert=_files(tmp_path, user, key),
        timeout=30,
    )
    assert sid_from_certificate(_certificate(renewed)) == env.sid("alice")
    _assert_login_refused(
        env, tmp_path, kiosk, kiosk_key, "badCertificate", "with names from the directory"
    )


def test_a_revoked_client_certificate_is_refused(env: Env, tmp_path: Path) -> None:
    der, key = _csr()
    certificate = _certificate(_json_enroll(env, "alice", "User", der))
    env.core.revocation.revoke(
        _issuing_id(env),
        format(certificate.serial_number, "x"),
        RevocationReason.superseded,
        Actor("test-admin", "cli"),
    )
    response = env.plain().post(
        f"{env.url}/enroll",
        json={"template": "User", "csr": _pem_csr(_csr()[0])},
        cert=_files(tmp_path, certificate, key),
        timeout=30,
    )
    assert response.status_code == 403 and response.json()["error"] == "badCertificate"


# -- pending approval ----------------------------------------------------------------------


def test_pending_requests_are_approved_or_rejected_by_an_administrator(env: Env) -> None:
    held = _json_enroll(env, "alice", "UserPending", _csr()[0])
    assert held.status_code == 202, held.text
    request_id = held.json()["request_id"]
    status = env.plain().get(
        f"{env.url}/requests/{request_id}", auth=("alice", env.password("alice")), timeout=30
    )
    assert status.status_code == 202
    listed = env.cli("pending", "list", "--connector", "adcs")
    waiting = {r["request_id"]: r for r in json.loads(listed.stdout)}
    # The approver sees what the request asks for (the template decides what is used).
    assert waiting[request_id]["requested_subject"] == "CN=CN from the request"
    assert waiting[request_id]["requested_sans"] == []
    (event,) = [
        s.event
        for s in env.core.events.list(types=["enrollment.pending"])
        if s.event.data["request"] == str(request_id)
    ]
    assert (event.data["connector"], event.data["requester"]) == ("adcs", "alice")
    assert event.data["subject"] == "CN=CN from the request"
    approved = env.cli("pending", "approve", "--connector", "adcs", str(request_id))
    assert approved.returncode == 0, approved.stderr
    issued = env.plain().get(
        f"{env.url}/requests/{request_id}", auth=("alice", env.password("alice")), timeout=30
    )
    certificate = _certificate(issued)
    assert sid_from_certificate(certificate) == env.sid("alice")
    # MS-WSTEP QueryTokenStatus finds it too.
    body = soap.build_rst_query(
        env.url + "/ces",
        str(request_id),
        f"urn:uuid:{uuid.uuid4()}",
        "alice",
        env.password("alice"),
    )
    query = env.plain().post(
        env.url + "/ces",
        data=body,
        headers={"Content-Type": "application/soap+xml; charset=utf-8"},
        timeout=30,
    )
    assert soap.parse_rstr(query.content).status == "issued"
    # Another is rejected, through the API.
    other = _json_enroll(env, "alice", "UserPending", _csr()[0]).json()["request_id"]
    rejected = env.server.session().post(
        f"{env.server.https_url}/api/v1/connectors/adcs/pending/{other}/reject",
        json={"reason": "not this one"},
        timeout=10,
    )
    assert rejected.status_code == 200 and rejected.json()["status"] == "rejected"
    final = env.plain().get(
        f"{env.url}/requests/{other}", auth=("alice", env.password("alice")), timeout=30
    )
    assert final.status_code == 403 and final.json()["error"] == "requestDenied"
    # And the other way round: listed and approved through the API, rejected by the CLI.
    api = f"{env.server.https_url}/api/v1/connectors/adcs/pending"
    third = _json_enroll(env, "alice", "UserPending", _csr()[0]).json()["request_id"]
    pending = env.server.session().get(api, timeout=10)
    assert pending.status_code == 200 and third in [r["request_id"] for r in pending.json()]
    approved_by_api = env.server.session().post(f"{api}/{third}/approve", timeout=30)
    assert approved_by_api.status_code == 200, approved_by_api.text
    assert approved_by_api.json()["status"] == "issued"
    by_api = x509.load_pem_x509_certificate(approved_by_api.json()["certificate"].encode())
    assert sid_from_certificate(by_api) == env.sid("alice")
    fourth = _json_enroll(env, "alice", "UserPending", _csr()[0]).json()["request_id"]
    rejected_by_cli = env.cli(
        "pending", "reject", "--connector", "adcs", str(fourth), "--reason", "no"
    )
    assert rejected_by_cli.returncode == 0, rejected_by_cli.stderr
    after_cli = env.plain().get(
        f"{env.url}/requests/{fourth}", auth=("alice", env.password("alice")), timeout=30
    )
    assert after_cli.status_code == 403 and after_cli.json()["error"] == "requestDenied"
    assert fourth not in [r["request_id"] for r in env.server.session().get(api, timeout=10).json()]


def test_pending_requests_are_decided_in_the_web_console(env: Env) -> None:
    approve_id = _json_enroll(env, "alice", "UserPending", _csr()[0]).json()["request_id"]
    reject_id = _json_enroll(env, "alice", "UserPending", _csr()[0]).json()["request_id"]
    session, csrf = console_signin(env.server, env.server.admin_token)
    console = f"{env.server.https_url}/console/enrollment"
    listed = session.get(console, timeout=10).text
    for request_id in (approve_id, reject_id):
        assert f'<td class="request-id">{request_id}</td>' in listed
    approved = session.post(
        f"{console}/adcs/adcs/pending/approve",
        data={"csrf_token": csrf, "request_id": approve_id},
        timeout=30,
    )
    assert approved.status_code == 200, approved.text
    issued = env.plain().get(
        f"{env.url}/requests/{approve_id}", auth=("alice", env.password("alice")), timeout=30
    )
    assert sid_from_certificate(_certificate(issued)) == env.sid("alice")
    rejected = session.post(
        f"{console}/adcs/adcs/pending/reject",
        data={"csrf_token": csrf, "request_id": reject_id, "reason": "not from the console"},
        timeout=30,
    )
    assert rejected.status_code == 200, rejected.text
    assert f'<td class="request-id">{reject_id}</td>' not in rejected.text
    final = env.plain().get(
        f"{env.url}/requests/{reject_id}", auth=("alice", env.password("alice")), timeout=30
    )
    assert final.status_code == 403 and final.json()["error"] == "requestDenied"
    # Without the form's CSRF token nothing is decided.
    third = _json_enroll(env, "alice", "UserPending", _csr()[0]).json()["request_id"]
    forged = session.post(
        f"{console}/adcs/adcs/pending/approve", data={"request_id": third}, timeout=30
    )
    assert forged.status_code == 400
    api = f"{env.server.https_url}/api/v1/connectors/adcs/pending"
    assert third in [r["request_id"] for r in env.server.session().get(api, timeout=10).json()]


def test_a_pending_request_over_wstep_answers_with_its_request_id(env: Env) -> None:
    response, result = _wstep(env, "alice", _csr()[0], template="UserPending")
    assert response.status_code == 200, response.text
    assert result.status == "pending" and result.request_id
    assert result.reference_uri == env.url + "/ces"
    # QueryTokenStatus while it waits: still pending, same RequestID.
    query = env.plain().post(
        env.url + "/ces",
        data=soap.build_rst_query(
            env.url + "/ces",
            result.request_id,
            f"urn:uuid:{uuid.uuid4()}",
            "alice",
            env.password("alice"),
        ),
        headers={"Content-Type": "application/soap+xml; charset=utf-8"},
        timeout=30,
    )
    assert query.status_code == 200, query.text
    waiting = soap.parse_rstr(query.content)
    assert (waiting.status, waiting.request_id) == ("pending", result.request_id)


def test_approval_decides_again_from_the_directory_as_it_is_now(env: Env) -> None:
    """A request held for approval is decided again when approved: an account disabled
    since it asked gets nothing, its request is rejected, and the refusal is audited."""
    from pkigate.devsim.adcs_client import provision_machine

    machine = provision_machine(env.directory, "HELDOFF", rid=62100)
    held = _json_enroll(env, machine.name, "MachinePending", _csr()[0], password=machine.password)
    assert held.status_code == 202, held.text
    request_id = held.json()["request_id"]
    conn = env.directory.admin_connection()
    try:
        disabled = UserAccountControl.WORKSTATION_TRUST_ACCOUNT | UserAccountControl.ACCOUNTDISABLE
        assert conn.modify(
            f"CN=HELDOFF,CN=Computers,{env.directory.base}",
            {"userAccountControl": [(MODIFY_REPLACE, [str(int(disabled))])]},
        )
    finally:
        conn.unbind()
    before, audited = env.counts()["certificates"], len(env.refusals())
    api = f"{env.server.https_url}/api/v1/connectors/adcs/pending"
    approved = env.server.session().post(f"{api}/{request_id}/approve", timeout=30)
    assert approved.status_code == 400, approved.text
    assert "accountDisabled" in approved.json()["error"]["message"]
    assert [r["code"] for r in env.refusals()[audited:]] == ["accountDisabled"]
    assert env.counts()["certificates"] == before
    assert request_id not in [r["request_id"] for r in env.server.session().get(api).json()]
    with env.core.store.read() as conn:
        status = conn.execute(
            select(schema.adcs_requests.c.status).where(schema.adcs_requests.c.id == request_id)
        ).scalar_one()
    assert status == "rejected"


def test_a_sid_another_way_of_issuing_carried_does_not_log_in(env: Env, tmp_path: Path) -> None:
    """An issuer through the management API may write any extension, the SID one too; such
    a certificate must not authenticate as the account that SID names (only certificates
    AD-style enrollment issued from the directory do)."""
    der, key = _csr()
    token = env.server.session().post(
        f"{env.server.https_url}/api/v1/tokens", json={"name": "sid-issuer", "role": "issuer"}
    )
    assert token.status_code == 201, token.text
    forged = env.server.session(token.json()["secret"]).post(
        f"{env.server.https_url}/api/v1/cas/{_issuing_id(env)}/certificates",
        json={
            "csr": _pem_csr(der),
            "template": "EndEntityClientAuthCertificate_APIPassthrough/V1",
            "api_passthrough": {
                "custom_extensions": [
                    {
                        "oid": SECURITY_EXTENSION_OID.dotted_string,
                        "value": base64.b64encode(
                            security_extension(env.sid("Administrator"))
                        ).decode(),
                        "critical": False,
                    }
                ]
            },
        },
        timeout=30,
    )
    assert forged.status_code == 201, forged.text
    certificate = x509.load_pem_x509_certificate(forged.json()["certificate_pem"].encode())
    assert sid_from_certificate(certificate) == env.sid("Administrator")
    _assert_login_refused(
        env, tmp_path, certificate, key, "badCertificate", "not issued by AD-style enrollment"
    )


# -- the ADCS abuse classes ------------------------------------------------------------------


@both_directories
def test_esc1_enrollee_supplied_subject_on_a_client_auth_template_is_refused(env: Env) -> None:
    from pkigate.core.names import upn_other_name

    der, _ = _csr(cn="Administrator", sans=[upn_other_name("Administrator@example.test")])
    before = env.counts()["certificates"]
    response = _json_enroll(env, "eve", "ESC1Vulnerable", der)
    assert response.status_code == 403, response.text
    assert response.json()["error"] == "dangerousTemplate" and response.json()["attack"] == "ESC1"
    assert env.counts()["certificates"] == before
    assert env.refusals("ESC1")


@both_directories
def test_esc1_a_template_requiring_agent_signatures_refuses_a_plain_request(env: Env) -> None:
    """msPKI-RA-Signature exempts a template from the ESC1 rule only because an enrollment
    agent must countersign each request; a plain PKCS#10 has no such signature."""
    from pkigate.core.names import upn_other_name

    der, _ = _csr(cn="Administrator", sans=[upn_other_name("Administrator@example.test")])
    before = env.counts()
    refused_before = len(env.refusals("ESC1"))
    response = _json_enroll(env, "eve", "ESC1AgentSigned", der)
    assert response.status_code == 403, response.text
    assert response.json()["error"] == "raSignatureRequired"
    assert response.json()["attack"] == "ESC1"
    assert "1 enrollment agent signature" in response.json()["message"]
    soap_response, result = _wstep(env, "eve", der, template="ESC1AgentSigned")
    assert soap_response.status_code == 400 and result.status == "fault"
    assert "raSignatureRequired" in (result.fault_reason or "")
    assert env.counts() == before
    refusals = env.refusals("ESC1")[refused_before:]
    assert [r["code"] for r in refusals] == ["raSignatureRequired"] * 2


@both_directories
def test_enrollee_supplied_alt_names_alone_do_not_name_the_certificate(env: Env) -> None:
    """Only ENROLLEE_SUPPLIES_SUBJECT (guarded by the ESC1 rule) lets the request name the
    certificate; with ENROLLEE_SUPPLIES_SUBJECT_ALT_NAME alone, the names still come from
    the directory, so an unprivileged user cannot name the Administrator."""
    from pkigate.core.names import upn_other_name

    der, _ = _csr(
        cn="Administrator",
        sans=[upn_other_name("Administrator@example.test"), x509.DNSName("dc01.example.test")],
    )
    certificate = _certificate(_json_enroll(env, "eve", "ClientSuppliedAltNames", der))
    assert certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value != (
        "Administrator"
    )
    names = list(_sans(certificate))
    assert upn_other_name("Administrator@example.test") not in names
    assert x509.DNSName("dc01.example.test") not in names
    assert sid_from_certificate(certificate) == env.sid("eve")


@both_directories
@pytest.mark.parametrize("template", ["AnyPurpose", "NoEku"])
def test_esc2_any_purpose_and_no_eku_templates_are_refused(env: Env, template: str) -> None:
    response = _json_enroll(env, "alice", template, _csr()[0])
    assert response.status_code == 403, response.text
    assert response.json()["attack"] == "ESC2"
    assert env.refusals("ESC2")


@both_directories
def test_esc3_an_agent_requesting_on_behalf_of_another_is_refused(env: Env) -> None:
    # An enrollment agent (Certificate Request Agent EKU) signs a request for someone else:
    # a CMS-wrapped PKCS#10. No published template requires RA signatures that pkigate
    # could verify, so it is refused.
    der, key = _csr()
    agent = _certificate(_json_enroll(env, "alice", "EnrollmentAgent", der))
    agent_ekus = agent.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert [o.dotted_string for o in agent_ekus] == [REQUEST_AGENT]
    before, audited = env.counts(), len(env.refusals("ESC3"))
    inner, _ = _csr()
    signed = (
        pkcs7.PKCS7SignatureBuilder()
        .set_data(inner)
        .add_signer(agent, key, hashes.SHA256())
        .sign(serialization.Encoding.DER, [])
    )
    response, result = _wstep(
        env, "alice", signed, template="User", value_type=soap.VALUE_TYPE_PKCS7
    )
    assert response.status_code == 400, response.text
    assert result.status == "fault"
    assert "on behalf" in (result.fault_reason or "")
    assert [r["code"] for r in env.refusals("ESC3")[audited:]] == ["onBehalfOfRefused"]
    assert env.counts() == before


@both_directories
def test_esc6_names_in_request_attributes_are_refused(env: Env) -> None:
    response = _json_enroll(
        env, "alice", "User", _csr()[0], attributes={"SAN": "upn=Administrator@example.test"}
    )
    assert response.status_code == 403 and response.json()["attack"] == "ESC6"
    soap_response, result = _wstep(
        env,
        "alice",
        _csr()[0],
        template="User",
        context=(("SAN", "upn=Administrator@example.test"),),
    )
    assert soap_response.status_code == 400 and result.status == "fault"
    assert len(env.refusals("ESC6")) >= 2


@both_directories
def test_esc8_plain_http_and_ntlm_are_not_offered(env: Env) -> None:
    before, audited = env.counts(), len(env.refusals("ESC8"))
    over_http = requests.post(
        f"{env.server.http_url}/adcs/enroll",
        json={"template": "User", "csr": _pem_csr(_csr()[0])},
        auth=("alice", env.password("alice")),
        timeout=10,
    )
    assert over_http.status_code == 403
    assert over_http.json()["error"] == "httpsRequired" and over_http.json()["attack"] == "ESC8"
    assert f"{env.url}/enroll" in over_http.json()["message"]
    soap_over_http = requests.post(
        f"{env.server.http_url}/adcs/ces",
        data=soap.build_rst_issue(env.url + "/ces", _csr()[0], "urn:uuid:8", "alice", "x"),
        headers={"Content-Type": "application/soap+xml; charset=utf-8"},
        timeout=10,
    )
    assert soap_over_http.status_code == 403
    assert soap_over_http.headers["Content-Type"].startswith("application/soap+xml")
    assert "httpsRequired" in (soap.parse_rstr(soap_over_http.content).fault_reason or "")
    refused = env.refusals("ESC8")[audited:]
    assert [(r["code"], r["action"]) for r in refused] == [("httpsRequired", "adcs.transport")] * 2
    assert env.counts() == before
    ntlm = env.plain().post(
        f"{env.url}/enroll",
        json={"template": "User", "csr": _pem_csr(_csr()[0])},
        headers={"Authorization": "NTLM TlRMTVNTUAABAAAAB4IIogAAAAAAAAAAAAAAAAAAAAAKAGFKAAAADw=="},
        timeout=10,
    )
    assert ntlm.status_code == 401 and ntlm.json()["attack"] == "ESC8"
    assert env.refusals("ESC8")


@both_directories
def test_esc9_and_esc16_every_certificate_carries_the_sid_extension(env: Env) -> None:
    # The template asks for no security extension (CT_FLAG_NO_SECURITY_EXTENSION): ignored.
    certificate = _certificate(_json_enroll(env, "alice", "NoSidExtension", _csr()[0]))
    assert sid_from_certificate(certificate) == env.sid("alice")
    # A request bringing its own SID extension (someone else's) is refused.
    forged = x509.UnrecognizedExtension(
        SECURITY_EXTENSION_OID, security_extension(env.sid("Administrator"))
    )
    response = _json_enroll(env, "alice", "User", _csr(extensions=[(forged, False)])[0])
    assert response.status_code == 403 and response.json()["attack"] == "ESC9"
    assert env.refusals("ESC9")


@both_directories
def test_esc9_a_sid_in_the_requested_alternative_names_is_refused(env: Env) -> None:
    """Where the request may supply names (WebServer lets Web Admins name their sites), a
    SID in them, as the KB5014754 SID URL or an objectSid otherName, is not a name: Windows
    would map the certificate to that account."""
    administrator = env.sid("Administrator")
    for forged in (
        x509.UniformResourceIdentifier(f"tag:microsoft.com,2022-09-14:sid:{administrator}"),
        x509.OtherName(
            x509.ObjectIdentifier("1.3.6.1.4.1.311.25.2.1"),
            asn1_core.OctetString(administrator.encode()).dump(),
        ),
    ):
        der, _ = _csr(
            cn="intranet.example.test", sans=[x509.DNSName("intranet.example.test"), forged]
        )
        before, audited = env.counts(), len(env.refusals("ESC9"))
        response = _json_enroll(env, "alice", "WebServer", der)
        assert response.status_code == 403, response.text
        assert response.json()["error"] == "nameRefused"
        assert [r["code"] for r in env.refusals("ESC9")[audited:]] == ["nameRefused"]
        assert env.counts() == before


@both_directories
def test_esc15_application_policies_in_the_request_are_refused(env: Env) -> None:
    policies = x509.UnrecognizedExtension(
        APPLICATION_POLICIES_OID, bytes.fromhex("300c300a06082b06010505070302")
    )
    response = _json_enroll(env, "alice", "User", _csr(extensions=[(policies, False)])[0])
    assert response.status_code == 403 and response.json()["attack"] == "ESC15"
    assert env.refusals("ESC15")


@both_directories
def test_esc13_an_issuance_policy_linked_to_a_group_is_not_issued(env: Env) -> None:
    """pkigate puts no issuance policy (certificatePolicies) in a certificate, so a template
    whose policy AD links to a group (msDS-OIDToGroupLink, ESC13) cannot hand that group to
    whoever may enroll: the certificate names no policy for the KDC to map."""
    if isinstance(env.directory, SambaDC):
        with env.directory.admin_connection() as conn:
            oid = ESC13_OID_DN.format(configuration=env.directory.configuration_dn)
            conn.search(oid, "(objectClass=msPKI-Enterprise-Oid)", "BASE", attributes=["*"])
            group = ESC13_GROUP_DN.format(base=env.directory.base)
            assert conn.entries[0]["msDS-OIDToGroupLink"].value.lower() == group.lower()
    certificate = _certificate(_json_enroll(env, "eve", "IssuancePolicyLinked", _csr()[0]))
    assert sid_from_certificate(certificate) == env.sid("eve")
    with pytest.raises(x509.ExtensionNotFound):
        certificate.extensions.get_extension_for_class(x509.CertificatePolicies)
    policy = asn1_core.ObjectIdentifier(ESC13_POLICY_OID).dump()
    assert policy not in certificate.public_bytes(serialization.Encoding.DER)


# -- bad input ----------------------------------------------------------------------------------


def _post_over_the_body_limit(
    env: Env, path: str, content_type: str, auth: tuple[str, str] | None = None
) -> tuple[int, str, bytes]:
    """A POST whose Content-Length is over the gateway's body limit, sent without its body:
    the server answers from the headers (it must not read such a body), so the test does not
    race the server closing the connection while the client is still sending."""
    parsed = urlsplit(env.url + path)
    context = ssl.create_default_context(cafile=str(env.server.tls_bundle))
    conn = http.client.HTTPSConnection(
        parsed.hostname or "", parsed.port, context=context, timeout=30
    )
    try:
        conn.putrequest("POST", parsed.path)
        conn.putheader("Content-Type", content_type)
        conn.putheader("Content-Length", str(2 * 1024 * 1024))
        if auth:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            conn.putheader("Authorization", f"Basic {token}")
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        conn.close()


def _post_soap(env: Env, body: bytes, path: str = "/ces") -> requests.Response:
    return env.plain().post(
        env.url + path,
        data=body,
        headers={"Content-Type": "application/soap+xml; charset=utf-8"},
        timeout=30,
    )


def test_bad_soap_gets_a_fault_naming_the_problem_and_issues_nothing(env: Env) -> None:
    good = soap.build_rst_issue(
        env.url + "/ces",
        _csr()[0],
        "urn:uuid:1",
        "alice",
        env.password("alice"),
        additional_context=(("CertificateTemplate", "User"),),
    )
    laughs = (
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>'
        b"<lolz>&lol2;</lolz>"
    )
    xxe = (
        b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b'<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"><s:Body>&x;'
        b"</s:Body></s:Envelope>"
    )
    deep = b"<a>" * 5000 + b"</a>" * 5000
    # Each case: the body, the HTTP status and the refusal code the audit log records.
    # Each case: the body, the HTTP status, the refusal code the audit log records and
    # what the fault's reason says.
    cases = {
        "not xml": (b"this is not XML", 400, "badRequest", "not well-formed XML"),
        "billion laughs": (laughs, 400, "badRequest", "document type declaration"),
        "external entity": (xxe, 400, "badRequest", "document type declaration"),
        "deep": (deep, 400, "badRequest", "nests elements deeper than 32"),
        "deep, under the parser's own bound": (
            b"<a>" * 100 + b"</a>" * 100,
            400,
            "badRequest",
            "nests elements deeper than 32",
        ),
        "oversized": (
            b"<a>" + b"x" * (300 * 1024) + b"</a>",
            400,
            "badRequest",
            "larger than 262144 bytes",
        ),
        "wrong action": (
            good.replace(soap.WSTEP_RST_ACTION.encode(), b"urn:wrong:action"),
            400,
            "badRequest",
            "does not handle that action",
        ),
        "no credentials": (
            soap.build_rst_issue(env.url + "/ces", _csr()[0], "urn:uuid:2"),
            401,
            "authenticationRequired",
            "authenticationRequired",
        ),
        "bad password": (
            soap.build_rst_issue(env.url + "/ces", _csr()[0], "urn:uuid:3", "alice", "nope"),
            401,
            "badCredentials",
            "badCredentials",
        ),
    }
    before = env.counts()
    for name, (body, status, code, named) in cases.items():
        audited = len(env.refusals())
        response = _post_soap(env, body)
        assert response.status_code == status, (name, response.status_code, response.text[:300])
        assert response.headers["Content-Type"].startswith("application/soap+xml"), name
        assert b"Fault" in response.content, name
        assert b"root:" not in response.content, name
        assert [r["code"] for r in env.refusals()[audited:]] == [code], name
        reason = soap.parse_rstr(response.content).fault_reason or ""
        assert named in reason, (name, reason)
    # Over the gateway's own body limit too: still a SOAP fault, not the gateway's JSON 413.
    audited = len(env.refusals())
    status, content_type, content = _post_over_the_body_limit(
        env, "/ces", "application/soap+xml; charset=utf-8"
    )
    assert status == 400 and content_type.startswith("application/soap+xml"), content[:300]
    assert b"larger than" in content
    assert [r["code"] for r in env.refusals()[audited:]] == ["badRequest"]
    assert env.counts() == before


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"template": 1}',
        b'{"template": "User", "csr": "!!!"}',
        b'{"template": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",  # deeper than json's recursion
        b'{"template": "User\\udc00", "csr": "x"}',  # a lone surrogate: not Unicode text
    ],
    ids=["not-json", "array", "wrong-type", "bad-csr", "nested-too-deeply", "lone-surrogate"],
)
def test_bad_json_gets_an_error_naming_the_problem(env: Env, body: bytes) -> None:
    before, audited = env.counts(), len(env.refusals())
    response = env.plain().post(
        f"{env.url}/enroll",
        data=body,
        headers={"Content-Type": "application/json"},
        auth=("alice", env.password("alice")),
        timeout=30,
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "badRequest" and response.json()["message"]
    refusals = env.refusals()[audited:]
    assert [(r["code"], r["actor"]) for r in refusals] == [("badRequest", "adcs:alice")]
    assert env.counts() == before


@pytest.mark.parametrize(
    ("auth", "headers", "body", "status", "code"),
    [
        (None, {}, b'{"template": "User", "csr": "x"}', 401, "authenticationRequired"),
        (("alice", "wrong"), {}, b'{"template": "User", "csr": "x"}', 401, "badCredentials"),
        ("alice", {}, b"{}" + b" " * (64 * 1024), 413, "payloadTooLarge"),
        ("alice", {"Content-Type": "text/plain"}, b"{}", 400, "badRequest"),
    ],
    ids=["no-credentials", "wrong-password", "over-64k", "not-json-type"],
)
def test_json_refusals_at_the_door_are_audited_and_change_nothing(
    env: Env,
    auth: tuple[str, str] | str | None,
    headers: dict[str, str],
    body: bytes,
    status: int,
    code: str,
) -> None:
    before, audited = env.counts(), len(env.refusals())
    response = env.plain().post(
        f"{env.url}/enroll",
        data=body,
        headers={"Content-Type": "application/json", **headers},
        auth=(auth, env.password(auth)) if isinstance(auth, str) else auth,
        timeout=30,
    )
    assert response.status_code == status, response.text
    assert response.json()["error"] == code and response.json()["message"]
    assert [r["code"] for r in env.refusals()[audited:]] == [code]
    assert env.counts() == before


def test_the_audit_chain_verifies_after_everything(env: Env) -> None:
    _certificate(_json_enroll(env, "alice", "User", _csr()[0]))
    assert env.core.audit.verify().ok


def test_a_modified_template_is_seen_after_the_cache_expires(env: Env) -> None:
    conn = env.directory.admin_connection()
    try:
        dn = template_dn(env.directory.base, "NoSidExtension")
        assert conn.modify(dn, {"msPKI-Minimal-Key-Size": [(MODIFY_REPLACE, [b"3072"])]})
    finally:
        conn.unbind()
    response = _json_enroll(env, "alice", "NoSidExtension", _csr()[0])
    assert response.status_code == 400 and response.json()["error"] == "keyTooSmall"


def test_autoenroll_needs_the_autoenroll_right(env: Env) -> None:
    machine = _json_enroll(env, "ws01$", "Machine", _csr()[0], autoenroll=True)
    assert machine.status_code == 200, machine.text
    # User is an autoenrollment template, but Domain Users hold Enroll only.
    user = _json_enroll(env, "alice", "User", _csr()[0], autoenroll=True)
    assert user.status_code == 403 and user.json()["error"] == "accessDenied"
    assert "AutoEnroll" in user.json()["message"]
    # The right is not enough: the template must be enabled for autoenrollment too.
    before, audited = env.counts(), len(env.refusals())
    manual = _json_enroll(env, "ws01$", "MachineManual", _csr()[0], autoenroll=True)
    assert manual.status_code == 403 and manual.json()["error"] == "autoenrollmentDisabled"
    assert [r["code"] for r in env.refusals()[audited:]] == ["autoenrollmentDisabled"]
    assert env.counts() == before
    assert _json_enroll(env, "ws01$", "MachineManual", _csr()[0]).status_code == 200


def _template_info(oid: str) -> x509.UnrecognizedExtension:
    from asn1crypto import core as asn1

    value = asn1.Sequence()
    value.contents = asn1.ObjectIdentifier(oid).dump() + asn1.Integer(100).dump()
    return x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.311.21.7"), value.dump())


def _template_oid(env: Env, name: str) -> str:
    conn = env.directory.admin_connection()
    try:
        conn.search(
            template_dn(env.directory.base, name),
            "(objectClass=*)",
            search_scope="BASE",
            attributes=["msPKI-Cert-Template-OID"],
        )
        return str(conn.response[0]["raw_attributes"]["msPKI-Cert-Template-OID"][0].decode())
    finally:
        conn.unbind()


class _TemplateInformation(asn1_core.Sequence):  # type: ignore[misc]
    """szOID_CERTIFICATE_TEMPLATE ([MS-WCCE] 2.2.2.7.7.2), read independently of pkigate."""

    _fields = [
        ("template_id", asn1_core.ObjectIdentifier),
        ("major_version", asn1_core.Integer),
        ("minor_version", asn1_core.Integer),
    ]


@pytest.mark.parametrize(
    ("template", "ekus"),
    [
        # Schema version 1: pKIExtendedKeyUsage; 2 and later: the application policies.
        ("ThirtyDaysV1", {ExtendedKeyUsageOID.EMAIL_PROTECTION.dotted_string}),
        ("ThirtyDaysV2", {ExtendedKeyUsageOID.CLIENT_AUTH.dotted_string}),
    ],
)
def test_the_template_sets_validity_version_and_the_eku_source(
    env: Env, template: str, ekus: set[str]
) -> None:
    certificate = _certificate(_json_enroll(env, "alice", template, _csr()[0]))
    lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
    # pKIExpirationPeriod (30 days), plus the CA's backdating of notBefore (5 minutes).
    assert timedelta(days=30) <= lifetime <= timedelta(days=30, minutes=10), lifetime
    info = _TemplateInformation.load(
        certificate.extensions.get_extension_for_oid(TEMPLATE_INFO_OID).value.public_bytes()
    )
    assert info["template_id"].dotted == _template_oid(env, template)
    assert (info["major_version"].native, info["minor_version"].native) == (7, 3)
    _check_chain(env, certificate, ekus)


def test_the_template_is_named_by_the_csr_extension_and_both_names_must_agree(env: Env) -> None:
    info = _template_info(_template_oid(env, "Machine"))
    der, _ = _csr(extensions=[(info, False)])
    response, result = _wstep(env, "ws01$", der)  # no CertificateTemplate attribute
    assert response.status_code == 200, response.text
    # Both versions are optional ([MS-WCCE]): the OID alone names the template too.
    from asn1crypto import core as asn1

    oid_only = asn1.Sequence()
    oid_only.contents = asn1.ObjectIdentifier(_template_oid(env, "Machine")).dump()
    bare = x509.UnrecognizedExtension(TEMPLATE_INFO_OID, oid_only.dump())
    named_by_oid, _ = _wstep(env, "ws01$", _csr(extensions=[(bare, False)])[0])
    assert named_by_oid.status_code == 200, named_by_oid.text
    certificate = x509.load_der_x509_certificate(result.certificate_der or b"")
    assert certificate.subject.rfc4514_string() == "CN=ws01.example.test"
    mismatch = _json_enroll(env, "ws01$", "User", der)
    assert mismatch.json()["error"] == "templateMismatch"
    # Schema version 1 requests name the template (1.3.6.1.4.1.311.20.2, a BMPString).
    from asn1crypto import core as asn1

    by_name = x509.UnrecognizedExtension(
        x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2"), asn1.BMPString("Machine").dump()
    )
    named, _ = _csr(extensions=[(by_name, False)])
    response, result = _wstep(env, "ws01$", named)  # no CertificateTemplate attribute
    assert response.status_code == 200, response.text
    assert x509.load_der_x509_certificate(
        result.certificate_der or b""
    ).subject.rfc4514_string() == ("CN=ws01.example.test")
    assert _json_enroll(env, "ws01$", "User", named).json()["error"] == "templateMismatch"


def test_ekus_and_key_usage_come_only_from_the_template(env: Env) -> None:
    der, _ = _csr(
        extensions=[
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), False),
            (x509.KeyUsage(True, True, True, True, True, False, False, False, False), True),
        ]
    )
    certificate = _certificate(_json_enroll(env, "alice", "User", der))
    ekus = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CODE_SIGNING not in ekus
    usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment and not usage.data_encipherment
    _check_chain(
        env,
        certificate,
        {
            ExtendedKeyUsageOID.CLIENT_AUTH.dotted_string,
            ExtendedKeyUsageOID.EMAIL_PROTECTION.dotted_string,
            "1.3.6.1.4.1.311.10.3.4",
        },
    )


def test_wstep_with_http_basic_over_tls(env: Env) -> None:
    body = soap.build_rst_issue(
        env.url + "/ces",
        _csr()[0],
        f"urn:uuid:{uuid.uuid4()}",
        additional_context=(("CertificateTemplate", "User"),),
    )
    response = env.plain().post(
        env.url + "/ces",
        data=body,
        headers={"Content-Type": "application/soap+xml; charset=utf-8"},
        auth=("alice", env.password("alice")),
        timeout=30,
    )
    assert response.status_code == 200, response.text
    assert soap.parse_rstr(response.content).status == "issued"


def test_soap_refusals_name_the_problem(env: Env) -> None:
    small = rsa.generate_private_key(65537, 1024)  # noqa: S505 - the weak key under test
    before = env.counts()
    for template, key, code in (
        ("NoSuchTemplate", None, "unknownTemplate"),
        ("Unpublished", None, "templateNotPublished"),
        ("User", small, "keyTooSmall"),
    ):
        audited = len(env.refusals())
        response, result = _wstep(env, "alice", _csr(key)[0], template=template)
        assert response.status_code == 400 and result.status == "fault", code
        assert code in (result.fault_reason or ""), (code, result.fault_reason)
        assert [r["code"] for r in env.refusals()[audited:]] == [code]
    assert env.counts() == before


@pytest.mark.parametrize("request_id", ["\u00b2", "9" * 20, "-1", "1e3"])
def test_a_request_id_that_is_no_stored_id_is_a_fault_not_a_crash(
    env: Env, request_id: str
) -> None:
    """QueryTokenStatus RequestIDs and the JSON status path: a digit Python's int() refuses
    ("²"), or one beyond the store's 64-bit ids, is the client's error (found in review)."""
    before, audited = env.counts(), len(env.refusals())
    body = soap.build_rst_query(
        env.url + "/ces",
        request_id.encode().decode("unicode_escape"),
        f"urn:uuid:{uuid.uuid4()}",
        "alice",
        env.password("alice"),
    )
    query = _post_soap(env, body)
    assert query.status_code == 400, query.text
    assert "1 to 18 decimal digits" in (soap.parse_rstr(query.content).fault_reason or "")
    assert [r["code"] for r in env.refusals()[audited:]] == ["badRequest"]
    assert env.counts() == before


def test_a_request_id_beyond_the_stores_range_is_not_found(env: Env) -> None:
    huge = "9" * 20
    status = env.plain().get(
        f"{env.url}/requests/{huge}", auth=("alice", env.password("alice")), timeout=30
    )
    assert status.status_code == 404 and status.json()["error"] == "unknownRequest"
    api = f"{env.server.https_url}/api/v1/connectors/adcs/pending/{huge}"
    assert env.server.session().post(f"{api}/approve", timeout=10).status_code == 404
    rejected = env.server.session().post(f"{api}/reject", json={"reason": "x"}, timeout=10)
    assert rejected.status_code == 404


def test_the_default_connector_uses_the_development_directory_in_the_data_directory(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    directory = DevDirectory(data / "dev-directory")
    config = """
[[connectors]]
type = "adcs"
name = "adcs"
mount = "/adcs"
[connectors.settings]
directory_url = "ldap://127.0.0.1:{port}"
"""
    with directory:
        port = directory.url.rsplit(":", 1)[1].rstrip("/")
        server = start_server(data, extra_config=config.replace("{port}", port))
        try:
            published = subprocess.run(
                [
                    PKIGATE,
                    "--json",
                    "--data-dir",
                    str(data),
                    "adcs",
                    "--config",
                    str(tmp_path / "data.toml"),
                    "publish",
                    "--keep-existing-templates",
                    "--template",
                    "User",
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert published.returncode == 0, published.stderr
            session = requests.Session()
            session.trust_env = False
            session.verify = str(server.tls_bundle)
            alice = directory.accounts["alice"]
            response = session.post(
                f"{server.https_url}/adcs/enroll",
                json={"template": "User", "csr": _pem_csr(_csr()[0])},
                auth=("alice", alice.password),
                timeout=30,
            )
            certificate = _certificate(response)
            assert sid_from_certificate(certificate) == alice.sid
        finally:
            server.stop()


def test_an_unreachable_directory_is_reported_not_crashed(tmp_path: Path) -> None:
    server = start_server(
        tmp_path / "data",
        extra_config="""
[[connectors]]
type = "adcs"
name = "adcs"
mount = "/adcs"
[connectors.settings]
directory_url = "ldap://127.0.0.1:9"
bind_dn = "CN=admin,DC=example,DC=test"
bind_password = "x"
""",
    )
    try:
        assert "is unavailable" in server.log.read_text()
        session = requests.Session()
        session.trust_env = False
        session.verify = str(server.tls_bundle)
        response = session.post(
            f"{server.https_url}/adcs/enroll",
            json={"template": "User", "csr": _pem_csr(_csr()[0])},
            auth=("alice", "whatever"),
            timeout=30,
        )
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "directoryUnavailable"
        body = soap.build_get_policies_request(
            f"{server.https_url}/adcs/cep", "urn:uuid:9", "alice", "whatever"
        )
        fault = session.post(
            f"{server.https_url}/adcs/cep",
            data=body,
            headers={"Content-Type": "application/soap+xml; charset=utf-8"},
            timeout=30,
        )
        assert fault.status_code == 503 and b"directoryUnavailable" in fault.content
        # A request held while the directory answered cannot be decided now: 503, and it
        # stays pending for a later approval.
        from datetime import UTC, datetime

        from pkigate.core.store import adcs as adcs_store

        core = Core.open(server.data_dir)
        try:
            with core.store.write() as conn:
                held = adcs_store.insert_request(
                    conn,
                    connector="adcs",
                    template="User",
                    principal_sid="S-1-5-21-1-2-3-1104",
                    principal_name="alice",
                    csr_der=_csr()[0],
                    attributes=(),
                    status=adcs_store.PENDING,
                    now=datetime.now(UTC),
                )
            api = f"{server.https_url}/api/v1/connectors/adcs/pending"
            approved = server.session().post(f"{api}/{held}/approve", timeout=30)
            assert approved.status_code == 503, approved.text
            assert approved.json()["error"]["code"] == "directoryUnavailable"
            assert held in [r["request_id"] for r in server.session().get(api).json()]
        finally:
            core.close()
    finally:
        server.stop()


def _keyed_csr(template: soap.PolicyTemplate, keys: dict[str, Any]) -> Any:
    der, key = _csr()
    keys[template.common_name] = key
    return x509.load_der_x509_csr(der)


def test_simulated_machines_autoenroll_and_renew_with_their_certificate(env: Env) -> None:
    from pkigate.devsim.adcs_client import AdcsClient, provision_machines

    machines = provision_machines(env.directory, 3, prefix="T")
    for machine in machines:
        client = AdcsClient(env.url, str(env.server.tls_bundle), machine.name, machine.password)
        try:
            keys: dict[str, Any] = {}
            enrolled = client.autoenroll(lambda template, keys=keys: _keyed_csr(template, keys))
            assert [e.template for e in enrolled] == ["Machine"]
            first = enrolled[0].certificate
            assert first.subject.rfc4514_string() == f"CN={machine.dns_host_name}"
            assert sid_from_certificate(first) == machine.sid
            renewed = client.renew(
                "Machine", x509.load_der_x509_csr(_csr()[0]), first, keys["Machine"]
            )
            assert sid_from_certificate(renewed.certificate) == machine.sid
            assert renewed.certificate.serial_number != first.serial_number
        finally:
            client.close()


def test_a_template_requiring_key_archival_is_refused(env: Env) -> None:
    response = _json_enroll(env, "alice", "Archival", _csr()[0])
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "keyArchivalRequired"


def test_publishing_again_updates_the_enrollment_service(env: Env) -> None:
    """`pkigate adcs publish` on a CA already registered: the pKIEnrollmentService object
    is updated in place (host, certificate, templates), as an enterprise CA re-registers."""
    republished = env.cli(
        "publish",
        "--connector",
        "adcs",
        "--dns-host-name",
        "ca2.example.test",
        "--keep-existing-templates",
        *[arg for name in PUBLISHED for arg in ("--template", name)],
    )
    assert republished.returncode == 0, republished.stderr
    assert json.loads(republished.stdout)["result"] == "updated"
    conn = env.directory.admin_connection()
    try:
        conn.search(
            enrollment_services_dn(env.directory.base),
            "(cn=pkigate-issuing)",
            attributes=["dNSHostName", "cACertificate;binary", "certificateTemplates"],
        )
        assert len(conn.response) == 1, conn.response
        entry = conn.response[0]["raw_attributes"]
    finally:
        conn.unbind()
    assert entry["dNSHostName"] == [b"ca2.example.test"]
    assert {t.decode() for t in entry["certificateTemplates"]} == set(PUBLISHED)
    issuing = env.core.authorities.get(_issuing_id(env))
    assert entry["cACertificate;binary"] == [bytes(issuing.certificate_der or b"")]


def test_publishing_a_template_nobody_defines_is_refused_audited_and_writes_nothing(
    env: Env,
) -> None:
    every = [arg for name in PUBLISHED for arg in ("--template", name)]
    refused = env.cli("publish", *every, "--template", "NoSuchTemplate")
    assert refused.returncode == 1
    # env.cli runs with --json: the error is one JSON object on stdout, nothing on stderr.
    error = json.loads(refused.stdout)["error"]
    assert error["message"] == "no such template in the directory: NoSuchTemplate"
    assert refused.stderr == ""
    failures = [f for f in env.refusals() if f["action"] == "adcs.publish"]
    assert failures and "NoSuchTemplate" in failures[-1]["error"]
    conn = env.directory.admin_connection()
    try:
        conn.search(
            enrollment_services_dn(env.directory.base),
            "(cn=pkigate-issuing)",
            attributes=["certificateTemplates"],
        )
        offered = {t.decode() for t in conn.response[0]["raw_attributes"]["certificateTemplates"]}
    finally:
        conn.unbind()
    assert offered == set(PUBLISHED)  # as the fixture published it


def test_a_team_decides_a_held_request_on_the_names_the_directory_gives_it(env: Env) -> None:
    """Approving is decided on what the certificate would carry: for a template that takes
    its names from the directory, the directory's, not the CSR's (core/access.py)."""
    admin = env.server.session()
    api = f"{env.server.https_url}/api/v1"
    secrets = {}
    for team in ("web", "people"):
        assert admin.post(f"{api}/teams", json={"name": team}, timeout=10).status_code == 201
        body = {"name": f"{team}-approver", "roles": ["approver"], "team": team}
        secrets[team] = admin.post(f"{api}/tokens", json=body, timeout=10).json()["secret"]
    ca = _issuing_id(env)
    version = admin.get(f"{api}/cas/{ca}/policy", timeout=10).json()["version"]
    statements = [
        {
            "id": "web-approves",
            "principal": {"team": "web"},
            "actions": ["approve-pending"],
            "conditions": {"dns_suffixes": [".web.example"], "connectors": ["adcs"]},
        },
        {
            "id": "people-approve",
            "principal": {"team": "people"},
            "actions": ["approve-pending"],
            "conditions": {"templates": ["UserPending"], "connectors": ["adcs"]},
        },
    ]

    def set_policy(statements: list[dict[str, Any]], replaces: int) -> int:
        body = {"document": {"statements": statements}, "replaces": replaces}
        response = admin.put(f"{api}/cas/{ca}/policy", json=body, timeout=10)
        assert response.status_code == 200, response.text
        return int(response.json()["version"])

    version = set_policy(statements, version)
    try:
        # The CSR names only what team web may approve; alice's certificate names her.
        der = _csr(cn="host.web.example", sans=[x509.DNSName("host.web.example")])[0]
        request_id = _json_enroll(env, "alice", "UserPending", der).json()["request_id"]
        approve = f"{api}/connectors/adcs/pending/{request_id}/approve"
        refused = env.server.session(secrets["web"]).post(approve, timeout=30)
        assert refused.status_code == 403, refused.text
        message = refused.json()["error"]["message"]
        # The CSR's names would pass: what is refused is a name from alice's entry.
        assert "outside the allowed names" in message and "host.web.example" not in message
        pending = admin.get(f"{api}/connectors/adcs/pending", timeout=10).json()
        assert request_id in [r["request_id"] for r in pending]
        approved = env.server.session(secrets["people"]).post(approve, timeout=30)
        assert approved.status_code == 200, approved.text
    finally:
        set_policy([], version)
