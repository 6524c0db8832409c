"""Kerberos (HTTP Negotiate, RFC 4559) on the AD-style connector, with MIT krb5 on both
sides: MIT GSSAPI accepts in `pkigate serve`; tickets come from a real Active Directory's KDC
(the Samba DC of tests/samba_dc.py) through MIT kinit, and are presented by requests-gssapi
(cepces's transport) and curl --negotiate. Tokens that name nobody are refused and
audited."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from adcs_directory_fixture import make_dev_directory_fixture
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from helpers import adcs_refusals, make_csr, make_key
from ldap3 import MODIFY_REPLACE
from samba_dc import SambaDC, samba_dc
from serving import RunningServer, adcs_connector_config, start_server

from pkigate.adcs import soap
from pkigate.adcs.directory import DevDirectory
from pkigate.adcs.policy import sid_from_certificate
from pkigate.core import Core
from pkigate.core.der import tlv
from pkigate.core.names import UPN_OID, decode_upn
from pkigate.gateways.config import ConfigError, parse_config
from pkigate.gateways.runtime import Gateway

dev_directory = make_dev_directory_fixture("module")
__all__ = ["samba_dc"]
PKIGATE = str(Path(sys.executable).parent / "pkigate")

SPNEGO_OID = bytes.fromhex("2b0601050502")  # 1.3.6.1.5.5.2
NTLMSSP_OID = bytes.fromhex("2b06010401823702020a")  # 1.3.6.1.4.1.311.2.2.10
NTLM_NEGOTIATE = b"NTLMSSP\x00\x01\x00\x00\x00\x07\x82\x08\xa2" + bytes(16)


def write_keytab(path: Path, principal: str) -> None:
    """A keytab made by MIT ktutil from a password: a key needs no KDC to exist."""
    commands = (
        f"addent -password -p {principal} -k 1 -e aes256-cts-hmac-sha1-96\n"
        f"{uuid.uuid4().hex}\nwkt {path}\nquit\n"
    )
    subprocess.run(["ktutil"], input=commands, text=True, capture_output=True, check=True)
    assert path.stat().st_size > 0


def adcs_config(directory: DevDirectory | SambaDC, keytab: Path, service_principal: str) -> str:
    """The adcs connector on ``directory`` (the development one or the Samba DC), with
    Kerberos for ``service_principal`` from ``keytab``."""
    return adcs_connector_config(
        directory.url,
        directory.base,
        directory.admin_dn,
        directory.admin_password,
        ca_name="pkigate-kerberos",
        cache_ttl_seconds=0,
    ) + (f'kerberos_keytab = "{keytab}"\nkerberos_service_principal = "{service_principal}"\n')


@dataclass
class Served:
    server: RunningServer
    core: Core

    @property
    def url(self) -> str:
        return f"{self.server.https_url}/adcs"

    def session(self) -> requests.Session:
        session = requests.Session()
        session.trust_env = False
        session.verify = str(self.server.tls_bundle)
        return session

    def refusals(self) -> list[dict[str, Any]]:
        return adcs_refusals(self.core)


@pytest.fixture(scope="module")
def served(
    dev_directory: DevDirectory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("adcs-kerberos")
    keytab = base / "http.keytab"
    write_keytab(keytab, "HTTP/pkigate.example.test@EXAMPLE.TEST")
    server = start_server(
        base / "data",
        extra_config=adcs_config(dev_directory, keytab, "HTTP/pkigate.example.test@EXAMPLE.TEST"),
        environment={"KRB5RCACHEDIR": str(base)},
    )
    served = Served(server, Core.open(base / "data"))
    try:
        yield served
    finally:
        served.core.close()
        server.stop()


@pytest.mark.parametrize(
    ("settings", "complaint"),
    [
        (
            'kerberos_keytab = "{keytab}"',
            "settings.kerberos_service_principal: give kerberos_keytab and "
            "kerberos_service_principal together",
        ),
        (
            'kerberos_keytab = "{keytab}"\n'
            'kerberos_service_principal = "HTTP/elsewhere.example.test@EXAMPLE.TEST"',
            "settings.kerberos_keytab: no key for HTTP/elsewhere.example.test@EXAMPLE.TEST in",
        ),
        (
            'kerberos_keytab = "{keytab}.missing"\n'
            'kerberos_service_principal = "HTTP/pkigate.example.test@EXAMPLE.TEST"',
            "not found",
        ),
    ],
    ids=["no-principal", "no-key-for-the-principal", "no-keytab"],
)
def test_kerberos_settings_that_cannot_work_stop_the_start(
    tmp_path: Path, settings: str, complaint: str
) -> None:
    keytab = tmp_path / "http.keytab"
    write_keytab(keytab, "HTTP/pkigate.example.test@EXAMPLE.TEST")
    config = parse_config(
        f"data_dir = '{tmp_path / 'data'}'\n"
        "[[connectors]]\ntype = 'adcs'\nname = 'adcs'\nmount = '/adcs'\n"
        "[connectors.settings]\n" + settings.format(keytab=keytab) + "\n"
    )
    with pytest.raises(ConfigError, match=re.escape("connectors[0].")) as raised:
        Gateway.open(config, bootstrap=True)
    assert complaint in str(raised.value)


def spnego_offering_ntlm() -> bytes:
    """A SPNEGO NegTokenInit (RFC 4178) whose only mechanism is NTLM."""
    init = tlv(
        0x30, tlv(0xA0, tlv(0x30, tlv(0x06, NTLMSSP_OID))), tlv(0xA2, tlv(0x04, NTLM_NEGOTIATE))
    )
    return tlv(0x60, tlv(0x06, SPNEGO_OID), tlv(0xA0, init))


def test_a_401_offers_negotiate_and_basic(served: Served) -> None:
    answer = served.session().post(f"{served.url}/enroll", json={}, timeout=30)
    assert answer.status_code == 401
    assert answer.raw.headers.getlist("WWW-Authenticate") == ["Negotiate", 'Basic realm="pkigate"']
    assert "Kerberos (Negotiate)" in answer.json()["message"]
    cep = served.session().post(
        f"{served.url}/cep",
        data=soap.build_get_policies_request(f"{served.url}/cep", f"urn:uuid:{uuid.uuid4()}"),
        headers={"Content-Type": "application/soap+xml; charset=utf-8"},
        timeout=30,
    )
    # requests-gssapi (cepces's transport) authenticates only when a 401 names Negotiate.
    assert cep.status_code == 401 and "Negotiate" in cep.headers["WWW-Authenticate"]


@pytest.mark.parametrize(
    ("token", "error", "says", "kerberos"),
    [
        (b"not a GSSAPI token", "badCredentials", "Negotiate token was refused", "badToken"),
        (NTLM_NEGOTIATE, "unsupportedAuthentication", "NTLM is not accepted", None),
        (spnego_offering_ntlm(), "unsupportedAuthentication", "no Kerberos mechanism", None),
    ],
    ids=["garbage", "raw-ntlm", "spnego-ntlm"],
)
def test_tokens_that_are_not_kerberos_are_refused_and_audited(
    served: Served, token: bytes, error: str, says: str, kerberos: str | None
) -> None:
    before = len(served.refusals())
    answer = served.session().post(
        f"{served.url}/enroll",
        json={},
        headers={"Authorization": "Negotiate " + base64.b64encode(token).decode()},
        timeout=30,
    )
    assert answer.status_code == 401
    assert answer.json()["error"] == error and says in answer.json()["message"]
    assert answer.json().get("attack") == (None if kerberos else "ESC8")
    [audited] = served.refusals()[before:]
    assert audited["action"] == "adcs.authenticate" and audited["code"] == error
    assert audited["actor"].startswith("adcs-client:")
    assert audited.get("kerberos") == (kerberos or "unsupportedAuthentication")


# --- Against a real Active Directory: the Samba DC's KDC, MIT kinit, requests-gssapi ---------

SERVICE_HOST = "pkigate.samba.test"
OTHER_SERVICE_HOST = "other.samba.test"
# The acceptor's clock-skew allowance (krb5.conf clockskew), small so that the expired-ticket
# test waits seconds past the ticket's end rather than MIT's default five minutes.
SERVER_CLOCK_SKEW_SECONDS = 5
# The shortest TGT for which Samba's KDC still issues a service ticket (it refuses a TGS-REQ
# on a TGT with less than about two minutes left).
SHORT_TICKET_SECONDS = 130
DAVE_PASSWORD = "D4ve-pkigate-Kerberos!"
AES_ONLY = 0x18  # msDS-SupportedEncryptionTypes: AES128 | AES256 ([MS-KILE] 2.2.7)


@dataclass
class Domain:
    """pkigate serving the Samba DC's directory, with Kerberos for HTTP/pkigate.samba.test."""

    dc: SambaDC
    served: Served
    config: Path
    work: Path
    dave: str
    """A user of this module's own, disabled by a test (the DC is shared by the session)."""
    stale_token: str
    """A token made at the start from a TGT of SHORT_TICKET_SECONDS, sent only once expired."""
    stale_ticket_end: float

    def kinit(
        self,
        name: str,
        *,
        keytab: Path | None = None,
        password: str | None = None,
        lifetime: str | None = None,
    ) -> Path:
        """A ccache holding a TGT of ``name``: its password on stdin, or its keytab."""
        ccache = self.work / f"{name.replace('$', '')}-{uuid.uuid4().hex[:8]}.ccache"
        command = ["kinit", *(["-l", lifetime] if lifetime else [])]
        command += ["-k", "-t", str(keytab), name] if keytab else [name]
        if keytab is None and password is None:
            password = self.dc.account(name).password
        subprocess.run(
            command,
            input=password,
            text=True,
            env={**self.dc.env, "KRB5CCNAME": f"FILE:{ccache}"},
            check=True,
            capture_output=True,
            timeout=30,
        )
        return ccache

    def ticket_end(self, ccache: Path) -> float:
        """When the TGT in ``ccache`` expires (seconds since the epoch)."""
        import gssapi

        credentials = gssapi.Credentials(usage="initiate", store={"ccache": f"FILE:{ccache}"})
        return time.time() + credentials.lifetime


def negotiate(ccache: Path, host: str = SERVICE_HOST) -> Any:
    """requests-gssapi as cepces drives it (SPNEGO, mutual authentication required), with the
    ticket of ``ccache`` for HTTP/``host`` (the server listens on 127.0.0.1)."""
    import gssapi
    from requests_gssapi import HTTPSPNEGOAuth

    return HTTPSPNEGOAuth(
        creds=gssapi.Credentials(usage="initiate", store={"ccache": f"FILE:{ccache}"}),
        target_name=gssapi.Name(f"HTTP@{host}", gssapi.NameType.hostbased_service),
        mech=gssapi.Mechanism.from_sasl_name("SPNEGO"),
    )


def negotiate_token(
    ccache: Path, host: str = SERVICE_HOST, tls_server_end_point: bytes | None = None
) -> str:
    """One Negotiate token, made now, to send when the test chooses; bound to the TLS
    channel whose certificate hash is ``tls_server_end_point`` (RFC 5929), if given."""
    import gssapi
    import gssapi.raw

    context = gssapi.SecurityContext(
        name=gssapi.Name(f"HTTP@{host}", gssapi.NameType.hostbased_service),
        creds=gssapi.Credentials(usage="initiate", store={"ccache": f"FILE:{ccache}"}),
        mech=gssapi.Mechanism.from_sasl_name("SPNEGO"),
        usage="initiate",
        channel_bindings=(
            None
            if tls_server_end_point is None
            else gssapi.raw.ChannelBindings(
                application_data=b"tls-server-end-point:" + tls_server_end_point
            )
        ),
    )
    return base64.b64encode(context.step()).decode()


@pytest.fixture(scope="module")
def domain(samba_dc: SambaDC, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Domain]:
    work = tmp_path_factory.mktemp("adcs-kerberos-samba")
    # The service account and keytab, as the README tells an administrator to make them.
    suffix = uuid.uuid4().hex[:6]
    for account, host in (
        (f"pkigate-http-{suffix}", SERVICE_HOST),
        (f"other-{suffix}", OTHER_SERVICE_HOST),
    ):
        samba_dc.tool("user", "create", account, "--random-password")
        samba_dc.tool("spn", "add", f"HTTP/{host}", account)
        with samba_dc.admin_connection() as connection:
            # AES tickets, and AES keys in the keytab (without this, AD issues RC4).
            assert connection.modify(
                f"CN={account},CN=Users,{samba_dc.base}",
                {"msDS-SupportedEncryptionTypes": [(MODIFY_REPLACE, [str(AES_ONLY)])]},
            ), connection.result
    keytab = work / "http.keytab"
    samba_dc.tool("domain", "exportkeytab", str(keytab), "--principal", f"HTTP/{SERVICE_HOST}")
    listed = subprocess.run(["klist", "-k", "-e", str(keytab)], capture_output=True, text=True)
    assert "aes256-cts" in listed.stdout and "arcfour" not in listed.stdout, listed.stdout
    samba_dc.tool("user", "create", f"dave-{suffix}", DAVE_PASSWORD)
    server_krb5 = work / "krb5.conf"
    server_krb5.write_text(
        samba_dc.krb5_conf_path.read_text().replace(
            "[libdefaults]", f"[libdefaults]\n\tclockskew = {SERVER_CLOCK_SKEW_SECONDS}", 1
        )
    )
    server = start_server(
        work / "data",
        extra_config=adcs_config(samba_dc, keytab, f"HTTP/{SERVICE_HOST}@{samba_dc.realm}"),
        environment={"KRB5_CONFIG": str(server_krb5), "KRB5RCACHEDIR": str(work)},
    )
    served = Served(server, Core.open(work / "data"))
    config = work / "data.toml"
    # This process's GSSAPI clients (requests-gssapi) ask the DC's KDC for service tickets.
    environment = pytest.MonkeyPatch()
    environment.setenv("KRB5_CONFIG", str(samba_dc.krb5_conf_path))
    try:
        published = subprocess.run(
            [PKIGATE, "--json", "--data-dir", str(work / "data"), "adcs", "--config", str(config),
             "publish", "--connector", "adcs", "--dns-host-name", SERVICE_HOST,
             "--keep-existing-templates"],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert published.returncode == 0, published.stderr
        partial = Domain(samba_dc, served, config, work, f"dave-{suffix}", "", 0.0)
        short = partial.kinit("alice", lifetime=f"{SHORT_TICKET_SECONDS}s")
        stale = negotiate_token(short)
        yield Domain(samba_dc, served, config, work, partial.dave, stale, partial.ticket_end(short))
    finally:
        environment.undo()
        served.core.close()
        server.stop()


def enroll_over_soap(domain: Domain, auth: Any, template: str) -> tuple[requests.Response, Any]:
    """MS-XCEP GetPolicies, then MS-WSTEP RequestSecurityToken for ``template`` at the CES
    the policy lists for Kerberos, as a Windows client does."""
    session = domain.served.session()
    cep = f"{domain.served.url}/cep"
    policies = session.post(
        cep,
        data=soap.build_get_policies_request(cep, f"urn:uuid:{uuid.uuid4()}"),
        headers={"Content-Type": "application/soap+xml; charset=utf-8"},
        auth=auth,
        timeout=30,
    )
    assert policies.status_code == 200, policies.text
    templates, cas = soap.parse_get_policies_response(policies.content)
    assert template in {t.common_name for t in templates}
    [ces] = [
        uri.uri
        for ca in cas
        for uri in ca.uris
        if uri.client_authentication == soap.ClientAuthentication.KERBEROS
    ]
    csr = x509.load_pem_x509_csr(make_csr("from the CSR", key=make_key("rsa"))).public_bytes(
        serialization.Encoding.DER
    )
    answer = session.post(
        ces,
        data=soap.build_rst_issue(
            ces,
            csr,
            f"urn:uuid:{uuid.uuid4()}",
            additional_context=[("CertificateTemplate", template)],
        ),
        headers={"Content-Type": "application/soap+xml; charset=utf-8"},
        auth=auth,
        timeout=30,
    )
    return answer, soap.parse_rstr(answer.content)


def test_a_user_with_a_kinit_ticket_enrolls_for_user_over_xcep_and_wstep(domain: Domain) -> None:
    alice = domain.dc.account("alice")
    answer, result = enroll_over_soap(domain, negotiate(domain.kinit("alice")), "User")
    assert answer.status_code == 200 and result.status == "issued", result.fault_reason
    # requests-gssapi checked the AP-REP (mutual authentication) it was sent back.
    assert answer.headers["WWW-Authenticate"].startswith("Negotiate ")
    certificate = x509.load_der_x509_certificate(result.certificate_der)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    upns = [
        decode_upn(n.value)
        for n in names.get_values_for_type(x509.OtherName)
        if n.type_id == UPN_OID
    ]
    assert upns == [alice.upn]  # from the directory, not the CSR
    assert sid_from_certificate(certificate) == alice.sid


def test_a_machine_with_its_keytab_enrolls_for_machine_over_xcep_and_wstep(domain: Domain) -> None:
    ws01 = domain.dc.account("WS01$")
    keytab = domain.work / "ws01.keytab"
    domain.dc.tool("domain", "exportkeytab", str(keytab), "--principal", "WS01$")
    answer, result = enroll_over_soap(
        domain, negotiate(domain.kinit("WS01$", keytab=keytab)), "Machine"
    )
    assert answer.status_code == 200 and result.status == "issued", result.fault_reason
    certificate = x509.load_der_x509_certificate(result.certificate_der)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == [f"ws01.{domain.dc.dns_domain}"]
    assert sid_from_certificate(certificate) == ws01.sid


def test_curl_negotiate_enrolls_over_the_json_endpoint(domain: Domain) -> None:
    ccache = domain.kinit("alice")
    csr = make_csr("alice", key=make_key("rsa")).decode()
    port = domain.served.server.https_port
    # curl names the service after the URL's host: pkigate.samba.test, resolved to loopback.
    # The gateway's TLS certificate names 127.0.0.1, so curl's check of it is left out here;
    # TLS is the serving layer's tests' business.
    run = subprocess.run(
        ["curl", "--silent", "--negotiate", "--user", ":", "--insecure",
         "--resolve", f"{SERVICE_HOST}:{port}:127.0.0.1",
         "--header", "Content-Type: application/json",
         "--data", json.dumps({"template": "User", "csr": csr}),
         "--write-out", "\n%{http_code}",
         f"https://{SERVICE_HOST}:{port}/adcs/enroll"],
        env={**domain.dc.env, "KRB5CCNAME": f"FILE:{ccache}"},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    body, _, status = run.stdout.rpartition("\n")
    assert status == "200", run.stdout + run.stderr
    issued = x509.load_pem_x509_certificate(json.loads(body)["certificate"].encode())
    assert sid_from_certificate(issued) == domain.dc.account("alice").sid


def _refused(
    domain: Domain, headers: dict[str, str] | None = None, auth: Any = None
) -> tuple[requests.Response, dict[str, Any]]:
    """A refused request and the refusal audited for it. requests-gssapi first asks without
    credentials, as RFC 4559 clients do: that challenge is audited too (authenticationRequired,
    as for any request without credentials)."""
    before = len(domain.served.refusals())
    answer = domain.served.session().post(
        f"{domain.served.url}/enroll", json={}, headers=headers or {}, auth=auth, timeout=30
    )
    *challenges, audited = domain.served.refusals()[before:]
    assert [c["code"] for c in challenges] == ["authenticationRequired"] * (auth is not None)
    assert audited["action"] == "adcs.authenticate"
    return answer, audited


def test_a_ticket_for_another_service_is_refused_and_audited(domain: Domain) -> None:
    ccache = domain.kinit("alice")
    token = negotiate_token(ccache, OTHER_SERVICE_HOST)
    answer, audited = _refused(domain, {"Authorization": f"Negotiate {token}"})
    assert answer.status_code == 401 and answer.json()["error"] == "badCredentials"
    assert f"not for HTTP/{SERVICE_HOST}" in answer.json()["message"]
    assert audited["kerberos"] == "wrongService"


def test_a_replayed_token_is_refused_and_audited(domain: Domain) -> None:
    token = negotiate_token(domain.kinit("alice"))
    first = domain.served.session().post(
        f"{domain.served.url}/enroll",
        json={},
        headers={"Authorization": f"Negotiate {token}"},
        timeout=30,
    )
    assert first.json()["error"] == "badRequest"  # authenticated; the empty body is refused
    answer, audited = _refused(domain, {"Authorization": f"Negotiate {token}"})
    assert answer.status_code == 401 and "replay" in answer.json()["message"]
    assert audited["kerberos"] == "replayedToken"


def test_a_ticket_of_an_account_disabled_since_is_refused_and_audited(domain: Domain) -> None:
    ccache = domain.kinit(domain.dave, password=DAVE_PASSWORD)
    # The service ticket is had while the account is enabled: the KDC gives a disabled
    # account none, but one it holds stays valid until it expires.
    negotiate_token(ccache)
    domain.dc.tool("user", "disable", domain.dave)
    answer, audited = _refused(domain, auth=negotiate(ccache))
    assert answer.status_code == 403 and answer.json()["error"] == "accountDisabled"
    assert audited["code"] == "accountDisabled"
    assert audited["kerberos_principal"] == f"{domain.dave}@{domain.dc.realm}"


def test_an_expired_ticket_is_refused_and_audited(domain: Domain) -> None:
    # The token was made at the start, while its ticket was valid: MIT clients make none
    # from an expired ticket. It is sent once the ticket and the acceptor's skew are past.
    time.sleep(max(0.0, domain.stale_ticket_end + SERVER_CLOCK_SKEW_SECONDS + 2 - time.time()))
    answer, audited = _refused(domain, {"Authorization": f"Negotiate {domain.stale_token}"})
    assert answer.status_code == 401 and "expired" in answer.json()["message"]
    assert audited["kerberos"] == "ticketExpired"


def test_a_token_bound_to_our_tls_channel_is_accepted(domain: Domain) -> None:
    from requests_gssapi import HTTPSPNEGOAuth

    auth = negotiate(domain.kinit("alice"))
    bound = HTTPSPNEGOAuth(
        creds=auth.creds,
        target_name=auth.target_name,
        mech=auth.mech,
        channel_bindings="tls-server-end-point",  # computed from the certificate it sees
    )
    answer = domain.served.session().post(f"{domain.served.url}/enroll", json={}, auth=bound)
    assert answer.json()["error"] == "badRequest"  # authenticated; the empty body is refused


def test_a_token_bound_to_another_tls_channel_is_refused_as_relayed(domain: Domain) -> None:
    # What a relay holds: a token the victim bound to the relay's own TLS session.
    elsewhere = hashlib.sha256(b"the relay's certificate").digest()
    token = negotiate_token(domain.kinit("alice"), tls_server_end_point=elsewhere)
    answer, audited = _refused(domain, {"Authorization": f"Negotiate {token}"})
    assert answer.status_code == 401 and answer.json()["attack"] == "ESC8"
    assert "another TLS channel" in answer.json()["message"]
    assert audited["kerberos"] == "channelBindingMismatch" and audited["attack"] == "ESC8"
