"""Revocation checked by independent tools against a running server: CRLs fetched over
HTTP from the URLs in the certificates, judged by `openssl verify` and pyhanko-certvalidator."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from asn1crypto import crl as asn1_crl
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from helpers import make_csr
from pyhanko_certvalidator import CertificateValidator, ValidationContext
from pyhanko_certvalidator.errors import PathValidationError, RevokedError
from pyhanko_certvalidator.policy_decl import (
    CertRevTrustPolicy,
    RevocationCheckingPolicy,
    RevocationCheckingRule,
)
from serving import RunningServer, start_server

CRL_REQUIRED = CertRevTrustPolicy(
    RevocationCheckingPolicy(
        ee_certificate_rule=RevocationCheckingRule.CRL_REQUIRED,
        intermediate_ca_cert_rule=RevocationCheckingRule.CRL_REQUIRED,
    )
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(tmp_path_factory.mktemp("revocation") / "data")
    yield running
    running.stop()


class Pki:
    def __init__(self, server: RunningServer) -> None:
        self.server = server
        self.admin = server.session()
        token = self.admin.post(
            f"{server.https_url}/api/v1/tokens", json={"name": "rev", "role": "issuer"}
        ).json()["secret"]
        self.issuer = server.session(token)
        cas = self.admin.get(f"{server.https_url}/api/v1/cas").json()["cas"]
        ids = {ca["subject"]: ca["id"] for ca in cas}
        self.root_id = ids["CN=pkigate Root CA,O=pkigate"]
        self.issuing_id = ids["CN=pkigate Issuing CA,O=pkigate"]
        for ca_id in (self.root_id, self.issuing_id):  # regenerate CRLs right after revoking
            patched = self.admin.patch(
                f"{server.https_url}/api/v1/cas/{ca_id}",
                json={"settings": {"crl_regenerate_delay_seconds": 0}},
            )
            assert patched.status_code == 200, patched.text

    def issue(self, ca_id: str, cn: str) -> tuple[x509.Certificate, list[x509.Certificate]]:
        reply = self.issuer.post(
            f"{self.server.https_url}/api/v1/cas/{ca_id}/certificates",
            json={"csr": make_csr(cn).decode(), "validity": "10d"},
        )
        assert reply.status_code == 201, reply.text
        body = reply.json()
        return (
            x509.load_pem_x509_certificate(body["certificate_pem"].encode()),
            x509.load_pem_x509_certificates(body["chain_pem"].encode()),
        )

    def revoke(self, ca_id: str, certificate: x509.Certificate, reason: str) -> None:
        serial = format(certificate.serial_number, "x")
        reply = self.issuer.post(
            f"{self.server.https_url}/api/v1/cas/{ca_id}/certificates/{serial}/revoke",
            json={"reason": reason},
        )
        assert reply.status_code == 200, reply.text


@pytest.fixture(scope="module")
def pki(server: RunningServer) -> Pki:
    return Pki(server)


def cdp(certificate: x509.Certificate) -> str:
    points = certificate.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    return str(points[0].full_name[0].value)


def fetch_crl(url: str) -> x509.CertificateRevocationList:
    reply = requests.get(url, timeout=10)
    assert reply.headers["Content-Type"] == "application/pkix-crl"
    return x509.load_der_x509_crl(reply.content)


def wait_until_listed(certificate: x509.Certificate) -> x509.CertificateRevocationList:
    deadline = time.monotonic() + 20
    while True:
        crl = fetch_crl(cdp(certificate))
        if crl.get_revoked_certificate_by_serial_number(certificate.serial_number) is not None:
            return crl
        assert time.monotonic() < deadline, "the CRL was not regenerated after revocation"
        time.sleep(0.3)


def pem(*items: x509.Certificate | x509.CertificateRevocationList) -> bytes:
    return b"".join(i.public_bytes(serialization.Encoding.PEM) for i in items)


def openssl_verify(
    directory: Path,
    leaf: x509.Certificate,
    chain: list[x509.Certificate],
    crls: list[x509.CertificateRevocationList],
    check_all: bool,
) -> str:
    (directory / "root.pem").write_bytes(pem(chain[-1]))
    (directory / "untrusted.pem").write_bytes(pem(*chain[:-1]))
    (directory / "crls.pem").write_bytes(pem(*crls))
    (directory / "leaf.pem").write_bytes(pem(leaf))
    result = subprocess.run(
        [
            "openssl",
            "verify",
            "-crl_check_all" if check_all else "-crl_check",
            "-CAfile",
            "root.pem",
            "-untrusted",
            "untrusted.pem",
            "-CRLfile",
            "crls.pem",
            "leaf.pem",
        ],
        cwd=directory,
        capture_output=True,
        text=True,
    )
    return result.stdout + result.stderr


def pyhanko_validate(
    leaf: x509.Certificate,
    chain: list[x509.Certificate],
    crls: list[x509.CertificateRevocationList],
) -> None:
    def a1(certificate: x509.Certificate) -> asn1_x509.Certificate:
        return asn1_x509.Certificate.load(certificate.public_bytes(serialization.Encoding.DER))

    context = ValidationContext(
        trust_roots=[a1(chain[-1])],
        other_certs=[a1(c) for c in chain[:-1]],
        crls=[
            asn1_crl.CertificateList.load(c.public_bytes(serialization.Encoding.DER)) for c in crls
        ],
        revinfo_policy=CRL_REQUIRED,
        allow_fetching=False,
    )
    asyncio.run(CertificateValidator(a1(leaf), validation_context=context).async_validate_path())


def test_openssl_accepts_a_good_certificate_and_rejects_a_revoked_one(
    pki: Pki, tmp_path: Path
) -> None:
    leaf, chain = pki.issue(pki.issuing_id, "crl-openssl.example.test")
    issuing_crl = fetch_crl(cdp(leaf))
    root_crl = fetch_crl(cdp(chain[0]))  # the issuing CA's certificate names the root's CRL
    assert "leaf.pem: OK" in openssl_verify(tmp_path, leaf, chain, [issuing_crl], False)
    # Through the two-level hierarchy: every certificate's CRL is checked.
    assert "leaf.pem: OK" in openssl_verify(tmp_path, leaf, chain, [issuing_crl, root_crl], True)
    pki.revoke(pki.issuing_id, leaf, "keyCompromise")
    revoked_crl = wait_until_listed(leaf)
    output = openssl_verify(tmp_path, leaf, chain, [revoked_crl, root_crl], True)
    assert "certificate revoked" in output and "leaf.pem: OK" not in output


def test_pyhanko_requires_and_honours_crls(pki: Pki) -> None:
    leaf, chain = pki.issue(pki.issuing_id, "crl-pyhanko.example.test")
    crls = [fetch_crl(cdp(leaf)), fetch_crl(cdp(chain[0]))]
    pyhanko_validate(leaf, chain, crls)
    with pytest.raises(PathValidationError):  # revocation information is required
        pyhanko_validate(leaf, chain, crls[1:])
    pki.revoke(pki.issuing_id, leaf, "superseded")
    with pytest.raises(RevokedError):
        pyhanko_validate(leaf, chain, [wait_until_listed(leaf), crls[1]])


def test_partitioned_crls_match_each_certificates_distribution_point(pki: Pki) -> None:
    server = pki.server
    created = pki.admin.post(
        f"{server.https_url}/api/v1/cas",
        json={
            "type": "SUBORDINATE",
            "subject": "CN=Partitioned Issuing,O=pkigate",
            "parent_id": pki.root_id,
            "path_length": 0,
        },
    )
    assert created.status_code == 201, created.text
    ca_id = created.json()["id"]
    patched = pki.admin.patch(
        f"{server.https_url}/api/v1/cas/{ca_id}",
        json={
            "settings": {
                "crl_enabled": True,
                "crl_mode": "PARTITIONED",
                "crl_partition_size": 1,
                "crl_regenerate_delay_seconds": 0,
                "crl_url": f"{server.http_url}/crl/{ca_id}/{{partition}}.crl",
            }
        },
    )
    assert patched.status_code == 200, patched.text
    issued = [pki.issue(ca_id, f"part-{n}.example.test") for n in range(3)]
    assert [cdp(c) for c, _ in issued] == [
        f"{server.http_url}/crl/{ca_id}/{n}.crl" for n in (1, 2, 3)
    ]
    (first, chain), (second, _), _third = issued
    root_crl = fetch_crl(cdp(chain[0]))
    pki.revoke(ca_id, second, "cessationOfOperation")
    partition_two = wait_until_listed(second)
    partition_one = fetch_crl(cdp(first))
    assert partition_one.get_revoked_certificate_by_serial_number(second.serial_number) is None
    # The validator matches each CRL's issuingDistributionPoint to the certificate's CDP.
    pyhanko_validate(first, chain, [partition_one, partition_two, root_crl])
    with pytest.raises(RevokedError):
        pyhanko_validate(second, chain, [partition_one, partition_two, root_crl])
    with pytest.raises(PathValidationError):  # partition 1's CRL does not cover partition 2
        pyhanko_validate(second, chain, [partition_one, root_crl])
