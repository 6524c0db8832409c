"""GetNextCACert (RFC 8894 4.7, 3.5.2): the successor CA during a rollover, in a SignedData
signed by the current RA (or CA), and advertised in GetCACaps only when configured."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from flask.testing import FlaskClient

from pkigate.gateways.app import create_app
from pkigate.gateways.config import ConfigError, parse_config
from pkigate.gateways.runtime import Gateway
from pkigate.scep.cms import (
    SignatureInvalid,
    embedded_certificates,
    load_content_info,
    verify_signed_data,
)

CAS = """
[[cas]]
name = "root"
type = "ROOT"
subject = "CN=Rollover Root"
[[cas]]
name = "issuing"
type = "SUBORDINATE"
parent = "root"
subject = "CN=Issuing CA 2025"
path_length = 0
[[cas]]
name = "issuing-next"
type = "SUBORDINATE"
parent = "root"
subject = "CN=Issuing CA 2026"
path_length = 0
"""


def open_gateway(tmp_path: Path, settings: str) -> Gateway:
    config = parse_config(f"""
data_dir = '{tmp_path / "data"}'
{CAS}
[[connectors]]
type = "scep"
name = "mdm"
mount = "/mdm"
ca = "issuing"
[connectors.settings]
challenge = "correct horse"
{settings}
""")
    return Gateway.open(config, bootstrap=True)


@pytest.fixture
def rollover(tmp_path: Path) -> Iterator[tuple[Gateway, FlaskClient]]:
    gateway = open_gateway(tmp_path, 'next_ca = "issuing-next"')
    yield gateway, create_app(gateway, "http").test_client()
    gateway.close()


def certs_only(der: bytes) -> list[x509.Certificate]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return pkcs7.load_der_pkcs7_certificates(der)


def test_get_next_ca_cert_is_signed_by_the_current_ra_and_holds_the_successor(
    rollover: tuple[Gateway, FlaskClient],
) -> None:
    gateway, client = rollover
    current_ra, current_ca, root = certs_only(client.get("/mdm?operation=GetCACert").data)
    response = client.get("/mdm?operation=GetNextCACert")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/x-x509-next-ca-cert"

    # Signed (not degenerate), by the current RA that GetCACert handed out.
    signed_data = load_content_info(response.data, "signed_data")
    verified = verify_signed_data(signed_data, [current_ra])
    assert verified.signer_certificate == current_ra
    assert verified.content_type == "1.2.840.113549.1.7.1"  # id-data
    assert embedded_certificates(signed_data) == [current_ra]
    # Another key's certificate does not verify it.
    with pytest.raises(SignatureInvalid):
        verify_signed_data(signed_data, [current_ca])

    # The content: a certs-only SignedData with the successor's RA, the successor, the root.
    next_ra, next_ca, next_root = certs_only(verified.content)
    assert next_ca.subject.rfc4514_string() == "CN=Issuing CA 2026"
    assert next_root == root
    assert next_ca.issuer == root.subject
    assert next_ca.public_key() != current_ca.public_key()
    next_id = gateway.ca_ids["issuing-next"]
    expected = x509.load_pem_x509_certificate(
        gateway.core.authorities.certificate_pem(next_id)[0].encode()
    )
    assert next_ca == expected
    # The successor's RA is issued from it, with the key usage Apple clients look for.
    assert next_ra.issuer == next_ca.subject
    assert next_ra != current_ra
    assert isinstance(next_ra.public_key(), rsa.RSAPublicKey)
    next_ra.verify_directly_issued_by(next_ca)
    usage = next_ra.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment
    # Stable across requests: the successor's RA is issued once.
    again = verify_signed_data(
        load_content_info(client.get("/mdm?operation=GetNextCACert").data, "signed_data"),
        [current_ra],
    )
    assert certs_only(again.content)[0] == next_ra
    # GetCACert still answers the current CA.
    assert certs_only(client.get("/mdm?operation=GetCACert").data)[0] == current_ra


def test_get_ca_caps_advertises_get_next_ca_cert_only_with_a_successor(
    rollover: tuple[Gateway, FlaskClient], tmp_path: Path
) -> None:
    _, client = rollover
    assert client.get("/mdm?operation=GetCACaps").text.split("\n") == [
        "POSTPKIOperation",
        "SHA-256",
        "SHA-512",
        "AES",
        "Renewal",
        "GetNextCACert",
        "SCEPStandard",
    ]
    plain = open_gateway(tmp_path / "plain", "")
    plain_client = create_app(plain, "http").test_client()
    assert "GetNextCACert" not in plain_client.get("/mdm?operation=GetCACaps").text
    response = plain_client.get("/mdm?operation=GetNextCACert")
    assert response.status_code == 404
    assert "no CA rollover in progress" in response.text
    plain.close()


def test_an_rsa_ca_that_decrypts_signs_get_next_ca_cert_itself(tmp_path: Path) -> None:
    config = parse_config(f"""
data_dir = '{tmp_path / "data"}'
[[cas]]
name = "old"
type = "ROOT"
subject = "CN=RSA Root 1"
key_algorithm = "RSA_2048"
signing_algorithm = "SHA256WITHRSA"
[[cas]]
name = "new"
type = "ROOT"
subject = "CN=RSA Root 2"
key_algorithm = "RSA_2048"
signing_algorithm = "SHA256WITHRSA"
[[connectors]]
type = "scep"
name = "mdm"
mount = "/mdm"
ca = "old"
[connectors.settings]
ca_decrypts = true
challenge = "correct horse"
next_ca = "new"
""")
    gateway = Gateway.open(config, bootstrap=True)
    client = create_app(gateway, "http").test_client()
    current = x509.load_der_x509_certificate(client.get("/mdm?operation=GetCACert").data)
    response = client.get("/mdm?operation=GetNextCACert")
    verified = verify_signed_data(load_content_info(response.data, "signed_data"), [current])
    assert verified.signer_certificate == current
    (successor,) = certs_only(verified.content)
    assert successor.subject.rfc4514_string() == "CN=RSA Root 2"
    gateway.close()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ('next_ca = "nope"', r"settings.next_ca: must name a configured CA; configured: "),
        ('next_ca = "issuing"', r"settings.next_ca: names the connector's own CA"),
        ("next_ca = 3", r"settings.next_ca: must name a configured CA"),
    ],
)
def test_a_bad_next_ca_stops_the_start(tmp_path: Path, settings: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        open_gateway(tmp_path, settings)
