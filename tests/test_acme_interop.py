"""Real ACME clients against `pkigate serve`: certbot (PyPI) and lego (Debian 4.9.1), with
http-01, dns-01 (TXT records in pebble-challtestsrv, the DNS server pkigate's validator
asks), tls-alpn-01, renewal, revocation and external account binding. Every certificate
they receive must chain to pkigate's root and name exactly what was ordered."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from acme_clients import Certbot, Lego
from acme_support import check_issued
from challtestsrv import ChallTestServer
from cryptography import x509
from serving import RunningServer, start_server
from sqlalchemy import select

from pkigate.core import Core
from pkigate.core.store import schema
from pkigate.devsim.spawn import free_port


@dataclass
class Env:
    server: RunningServer
    dns: ChallTestServer
    core: Core
    http_port: int
    tls_port: int

    def directory(self, mount: str = "/acme") -> str:
        return f"{self.server.https_url}{mount}/directory"

    @property
    def bundle(self) -> Path:
        return self.server.tls_bundle

    @property
    def root(self) -> bytes:
        return self.server.tls_bundle.read_bytes()

    def eab_key(self) -> tuple[str, str]:
        response = self.server.session().post(
            f"{self.server.https_url}/api/v1/connectors/eab/eab-keys",
            json={"label": "interop"},
            timeout=10,
        )
        assert response.status_code == 201, response.text
        return response.json()["kid"], response.json()["hmac_key"]

    def status(self, certificate: x509.Certificate) -> tuple[str, str | None]:
        c = schema.certificates.c
        with self.core.store.read() as conn:
            row = conn.execute(
                select(c.status, c.revocation_reason).where(
                    c.serial == format(certificate.serial_number, "x")
                )
            ).one()
        return str(row.status), row.revocation_reason


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("acme-interop")
    dns = ChallTestServer()
    dns.start()
    http_port, tls_port = free_port(), free_port()
    resolver = f"{dns.dns_address[0]}:{dns.dns_address[1]}"
    server = start_server(
        base / "data",
        extra_config=f"""
[[connectors]]
type = "acme"
name = "acme"
mount = "/acme"
[connectors.settings]
http01_port = {http_port}
tls_alpn01_port = {tls_port}
dns_resolver = "{resolver}"

[[connectors]]
type = "acme"
name = "eab"
mount = "/eab"
[connectors.settings]
external_account_required = true
http01_port = {http_port}
dns_resolver = "{resolver}"
""",
    )
    core = Core.open(base / "data")
    try:
        yield Env(server, dns, core, http_port, tls_port)
    finally:
        core.close()
        server.stop()
        dns.stop()


def _certificates(path: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(path.read_bytes())


def _dns(names: list[str]) -> list[tuple[str, str]]:
    return [("dns", n) for n in names]


# -- certbot ---------------------------------------------------------------------------------


def test_certbot_standalone_http01_register_issue_renew_revoke(env: Env, tmp_path: Path) -> None:
    names = ["www.certbot.example.test", "certbot.example.test"]
    with Certbot(env.directory(), env.bundle, workdir=tmp_path) as certbot:
        certbot.register(email="ops@example.test")
        certbot.certonly_standalone(names, env.http_port, cert_name="web")
        cert, _, fullchain, _ = certbot.cert_paths("web")
        first = check_issued(_certificates(fullchain), env.root, _dns(names))
        certbot.renew("web")
        renewed = check_issued(_certificates(fullchain), env.root, _dns(names))
        assert renewed.serial_number != first.serial_number
        assert env.status(renewed) == ("ISSUED", None)
        certbot.revoke(cert, reason="keycompromise")
    assert env.status(renewed) == ("REVOKED", "keyCompromise")
    assert env.status(first) == ("ISSUED", None)


def test_certbot_dns01_with_manual_hooks_for_a_wildcard(env: Env, tmp_path: Path) -> None:
    names = ["dns.certbot.example.test", "*.dns.certbot.example.test"]
    with Certbot(env.directory(), env.bundle, workdir=tmp_path) as certbot:
        certbot.certonly_dns_manual(names, env.dns, cert_name="wild")
        check_issued(_certificates(certbot.cert_paths("wild")[2]), env.root, _dns(names))


def test_certbot_rsa_key_and_revocation_with_the_certificate_key(env: Env, tmp_path: Path) -> None:
    names = ["rsa.certbot.example.test"]
    with Certbot(env.directory(), env.bundle, workdir=tmp_path) as certbot:
        certbot.certonly_standalone(names, env.http_port, cert_name="rsa", key_type="rsa")
        cert, _, fullchain, key = certbot.cert_paths("rsa")
        leaf = check_issued(_certificates(fullchain), env.root, _dns(names))
        certbot.revoke(cert, key_path=key)
    assert env.status(leaf)[0] == "REVOKED"


def test_certbot_registration_with_external_account_binding(env: Env, tmp_path: Path) -> None:
    with Certbot(env.directory("/eab"), env.bundle, workdir=tmp_path / "without") as refused:
        result = refused.register(check=False)
        assert result.returncode != 0
        assert "external account" in (result.stdout + result.stderr).lower()
    kid, hmac_key = env.eab_key()
    names = ["eab.certbot.example.test"]
    with Certbot(env.directory("/eab"), env.bundle, workdir=tmp_path / "with") as certbot:
        certbot.register(eab_kid=kid, eab_hmac_key=hmac_key)
        certbot.certonly_standalone(names, env.http_port, cert_name="eab")
        check_issued(_certificates(certbot.cert_paths("eab")[2]), env.root, _dns(names))


# -- lego ------------------------------------------------------------------------------------


def test_lego_http01_issue_renew_revoke(env: Env, tmp_path: Path) -> None:
    names = ["lego.example.test", "www.lego.example.test"]
    with Lego(env.directory(), env.bundle, workdir=tmp_path) as lego:
        lego.run_http01(names, env.http_port)
        chain_path = lego.certificate_paths(names[0])[0]
        first = check_issued(_certificates(chain_path), env.root, _dns(names))
        lego.renew(names, http_port=env.http_port)
        renewed = check_issued(_certificates(chain_path), env.root, _dns(names))
        assert renewed.serial_number != first.serial_number
        lego.revoke(names, reason=4)
    assert env.status(renewed) == ("REVOKED", "superseded")


def test_lego_tls_alpn01(env: Env, tmp_path: Path) -> None:
    names = ["alpn.lego.example.test"]
    with Lego(env.directory(), env.bundle, workdir=tmp_path) as lego:
        lego.run_tls_alpn01(names, env.tls_port)
        check_issued(_certificates(lego.certificate_paths(names[0])[0]), env.root, _dns(names))


def test_lego_dns01_wildcard(env: Env, tmp_path: Path) -> None:
    names = ["dns.lego.example.test", "*.dns.lego.example.test"]
    server = f"{env.dns.dns_address[0]}:{env.dns.dns_address[1]}"
    with Lego(env.directory(), env.bundle, workdir=tmp_path) as lego:
        lego.run_dns01(names, env.dns, server)
        check_issued(_certificates(lego.certificate_paths(names[0])[0]), env.root, _dns(names))


def test_lego_with_external_account_binding(env: Env, tmp_path: Path) -> None:
    kid, hmac_key = env.eab_key()
    names = ["eab.lego.example.test"]
    with Lego(env.directory("/eab"), env.bundle, workdir=tmp_path) as lego:
        lego.eab(kid, hmac_key).run_http01(names, env.http_port)
        check_issued(_certificates(lego.certificate_paths(names[0])[0]), env.root, _dns(names))
