"""The ACME client harness (tests/acme_clients.py) proven against Debian's pebble.

Real certbot and lego obtain, renew and revoke certificates from pebble with http-01,
tls-alpn-01 and dns-01; pebble's VA resolves every name through pebble-challtestsrv,
which answers A queries with 127.0.0.1 and serves the dns-01 TXT records.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from acme_clients import Certbot, Lego
from acme_peers import PebbleServer, free_port
from challtestsrv import ChallTestServer
from cryptography import x509

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not all(shutil.which(b) for b in ("pebble", "pebble-challtestsrv", "lego")),
        reason="pebble, pebble-challtestsrv and lego are Debian packages (scripts/setup --test)",
    ),
]

# pebble's EAB keys are base64url without padding, as ACME clients are given them.
EAB_KID = "kid-1"
EAB_HMAC = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"


@pytest.fixture(scope="module")
def challtestsrv() -> Iterator[ChallTestServer]:
    with ChallTestServer() as server:
        yield server


@pytest.fixture
def pebble(challtestsrv: ChallTestServer) -> Iterator[PebbleServer]:
    with PebbleServer(dns_server=challtestsrv.dns_server) as server:
        yield server


def _cert(path: Path) -> x509.Certificate:
    assert path.is_file(), f"{path} was not written"
    return x509.load_pem_x509_certificates(path.read_bytes())[0]


def _assert_names(path: Path, domains: list[str]) -> x509.Certificate:
    cert = _cert(path)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = san.get_values_for_type(x509.DNSName)
    assert sorted(names) == sorted(domains), names
    assert not san.get_values_for_type(x509.IPAddress)
    return cert


def _assert_chains_to(cert_path: Path, pebble: PebbleServer) -> None:
    """The file's second certificate is pebble's intermediate (what lego and certbot got)."""
    chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
    intermediate = x509.load_pem_x509_certificate(pebble.intermediate_pem().encode())
    assert len(chain) >= 2, "no issuer in the certificate file"
    assert chain[1] == intermediate
    chain[0].verify_directly_issued_by(intermediate)


def test_certbot_http01_register_certonly_renew_revoke(
    pebble: PebbleServer, tmp_path: Path
) -> None:
    certbot = Certbot(pebble.directory_url, pebble.tls_ca_pem_path, workdir=tmp_path)
    certbot.register(email="admin@example.test")
    domains = ["web1.example.test", "web2.example.test"]
    certbot.certonly_standalone(domains, pebble.http_port, cert_name="web")
    cert_pem, chain_pem, fullchain_pem, privkey_pem = certbot.cert_paths("web")
    first = _assert_names(cert_pem, domains)
    assert privkey_pem.is_file() and chain_pem.is_file()
    _assert_chains_to(fullchain_pem, pebble)

    certbot.renew("web")
    renewed = _assert_names(cert_pem, domains)
    assert renewed.serial_number != first.serial_number

    assert pebble.cert_status(renewed.serial_number)["Status"] == "Valid"
    certbot.revoke(cert_pem, reason="keycompromise")
    status = pebble.cert_status(renewed.serial_number)
    assert status["Status"] == "Revoked"
    assert status["Reason"] == 1  # keyCompromise
    assert pebble.cert_status(first.serial_number)["Status"] == "Valid"


def test_certbot_rsa_key_type(pebble: PebbleServer, tmp_path: Path) -> None:
    """certonly registers on the fly when register() was not called."""
    certbot = Certbot(pebble.directory_url, pebble.tls_ca_pem_path, workdir=tmp_path)
    certbot.certonly_standalone(["rsa.example.test"], pebble.http_port, key_type="rsa")
    cert = _assert_names(certbot.cert_paths("rsa.example.test")[0], ["rsa.example.test"])
    assert cert.public_key().key_size == 2048  # type: ignore[union-attr]


def test_certbot_dns01_manual_hooks(
    pebble: PebbleServer, challtestsrv: ChallTestServer, tmp_path: Path
) -> None:
    certbot = Certbot(pebble.directory_url, pebble.tls_ca_pem_path, workdir=tmp_path)
    certbot.register()
    domains = ["dns1.example.test", "*.dns1.example.test"]
    certbot.certonly_dns_manual(domains, challtestsrv, cert_name="dns1")
    first = _assert_names(certbot.cert_paths("dns1")[0], domains)

    certbot.renew("dns1", dns=challtestsrv)
    renewed = _assert_names(certbot.cert_paths("dns1")[0], domains)
    assert renewed.serial_number != first.serial_number


def test_certbot_eab(challtestsrv: ChallTestServer, tmp_path: Path) -> None:
    with PebbleServer(
        dns_server=challtestsrv.dns_server, eab_required=True, eab_keys={EAB_KID: EAB_HMAC}
    ) as pebble:
        certbot = Certbot(pebble.directory_url, pebble.tls_ca_pem_path, workdir=tmp_path / "a")
        # certbot reads meta.externalAccountRequired and refuses before asking the server
        refused = certbot.register(email="eab@example.test", check=False)
        assert refused.returncode != 0
        assert "requires external account binding" in refused.stderr
        # a wrong MAC key is refused by the server
        with pytest.raises(AssertionError, match="external account binding JWS"):
            certbot.register(email="eab@example.test", eab_kid=EAB_KID, eab_hmac_key="AAAA")

        certbot = Certbot(pebble.directory_url, pebble.tls_ca_pem_path, workdir=tmp_path / "b")
        certbot.register(email="eab@example.test", eab_kid=EAB_KID, eab_hmac_key=EAB_HMAC)
        certbot.certonly_standalone(["eab.example.test"], pebble.http_port)
        _assert_names(certbot.cert_paths("eab.example.test")[0], ["eab.example.test"])


def test_lego_http01_renew_revoke(pebble: PebbleServer, tmp_path: Path) -> None:
    # lego polls an authorization ~5 s after answering its challenge when the server sends no
    # Retry-After (pebble sends none), one identifier after the other: one name keeps this short.
    lego = Lego(pebble.directory_url, pebble.tls_ca_pem_path, workdir=tmp_path)
    domains = ["web1.example.test"]
    lego.run_http01(domains, pebble.http_port)
    crt, key, issuer = lego.certificate_paths(domains[0])
    first = _assert_names(crt, domains)
    assert key.is_file() and issuer.is_file()
    _assert_chains_to(crt, pebble)

    lego.renew(domains, http_port=pebble.http_port)
    renewed = _assert_names(crt, domains)
    assert renewed.serial_number != first.serial_number

    lego.revoke(domains, reason=4)
    status = pebble.cert_status(renewed.serial_number)
    assert status["Status"] == "Revoked"
    assert status["Reason"] == 4  # superseded


def test_lego_tls_alpn01(pebble: PebbleServer, tmp_path: Path) -> None:
    lego = Lego(pebble.directory_url, pebble.tls_ca_pem_path, workdir=tmp_path, key_type="rsa2048")
    domains = ["alpn1.example.test", "alpn2.example.test"]
    lego.run_tls_alpn01(domains, pebble.tls_port)
    cert = _assert_names(lego.certificate_paths(domains[0])[0], domains)
    assert cert.public_key().key_size == 2048  # type: ignore[union-attr]


def test_lego_dns01(pebble: PebbleServer, challtestsrv: ChallTestServer, tmp_path: Path) -> None:
    lego = Lego(pebble.directory_url, pebble.tls_ca_pem_path, workdir=tmp_path)
    domains = ["dns2.example.test", "*.dns2.example.test"]
    lego.run_dns01(domains, challtestsrv, challtestsrv.dns_server)
    _assert_names(lego.certificate_paths(domains[0])[0], domains)


def test_lego_eab(challtestsrv: ChallTestServer, tmp_path: Path) -> None:
    with PebbleServer(
        dns_server=challtestsrv.dns_server, eab_required=True, eab_keys={EAB_KID: EAB_HMAC}
    ) as pebble:
        without = Lego(pebble.directory_url, pebble.tls_ca_pem_path, workdir=tmp_path / "a")
        refused = without.run_http01(["eab.example.test"], pebble.http_port, check=False)
        assert refused.returncode != 0
        assert "Server requires External Account Binding" in refused.stderr

        lego = Lego(pebble.directory_url, pebble.tls_ca_pem_path, workdir=tmp_path / "b")
        lego.eab(EAB_KID, EAB_HMAC).run_http01(["eab.example.test"], pebble.http_port)
        _assert_names(lego.certificate_paths("eab.example.test")[0], ["eab.example.test"])


def test_failure_reports_output(pebble: PebbleServer, tmp_path: Path) -> None:
    """A failed run raises AssertionError with the command and the client's output."""
    certbot = Certbot(pebble.directory_url, pebble.tls_ca_pem_path, workdir=tmp_path / "c")
    # the client answers elsewhere: nothing listens on the port pebble's VA connects to
    with pytest.raises(AssertionError) as failed:
        certbot.certonly_standalone(["nobody.example.test"], free_port(), cert_name="x")
    assert "certbot certonly failed" in str(failed.value)
    assert "letsencrypt.log (tail)" in str(failed.value)

    lego = Lego(pebble.directory_url, pebble.tls_ca_pem_path, workdir=tmp_path / "l")
    with pytest.raises(AssertionError, match="lego run failed") as failed:
        lego.run_http01(["nobody.example.test"], free_port())
    assert "--http.port" in str(failed.value)
