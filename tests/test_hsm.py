"""CA keys on a PKCS#11 token (SoftHSM2, a real token of the tests' own): generated there,
used there for everything a CA signs, never in the store or the data directory."""

from __future__ import annotations

import asyncio
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from helpers import ACTOR, Clock, create_root, create_sub, make_csr
from pyhanko_certvalidator import CertificateValidator, ValidationContext
from softhsm import SoftHsm, private_key_objects
from sqlalchemy import select
from test_ocsp import enable_ocsp, ocsp_request, signed_by_responder

from pkigate.core import CASettings, CAView, Core, IssuanceRequest, Requester, Validity
from pkigate.core.keys import KeyStorage
from pkigate.core.model import KeyAlgorithm, RevocationReason
from pkigate.core.pkcs11 import TokenReference
from pkigate.core.store import schema

PKCS11 = KeyStorage.PKCS11


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def hsm_core(tmp_path: Path, softhsm: SoftHsm, clock: Clock) -> Iterator[Core]:
    core = Core.open(tmp_path / "data", clock=clock, pkcs11=softhsm.settings())
    yield core
    core.close()


def pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def ca_certificate(core: Core, view: CAView) -> x509.Certificate:
    der = core.authorities.get(view.record.id).certificate_der
    assert der is not None
    return x509.load_der_x509_certificate(der)


def issue_leaf(core: Core, ca: CAView, cn: str = "hsm-leaf.example.test") -> x509.Certificate:
    return core.issue(
        IssuanceRequest(ca.record.id, make_csr(cn), Validity.parse("30d"), Requester("test"))
    ).certificate


def openssl_verify(tmp_path: Path, root: x509.Certificate, *chain: x509.Certificate) -> None:
    """``chain`` (leaf first) verifies up to ``root`` with `openssl verify`."""
    (tmp_path / "root.pem").write_bytes(pem(root))
    (tmp_path / "untrusted.pem").write_bytes(b"".join(pem(c) for c in chain[1:]) or pem(root))
    (tmp_path / "leaf.pem").write_bytes(pem(chain[0]))
    result = subprocess.run(
        ["openssl", "verify", "-CAfile", "root.pem", "-untrusted", "untrusted.pem", "leaf.pem"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and "leaf.pem: OK" in result.stdout, result.stdout + result.stderr


def pyhanko_verify(root: x509.Certificate, *chain: x509.Certificate) -> None:
    def a1(certificate: x509.Certificate) -> asn1_x509.Certificate:
        return asn1_x509.Certificate.load(certificate.public_bytes(serialization.Encoding.DER))

    context = ValidationContext(
        trust_roots=[a1(root)],
        other_certs=[a1(c) for c in chain[1:]],
        allow_fetching=False,
        revocation_mode="soft-fail",
    )
    asyncio.run(
        CertificateValidator(a1(chain[0]), validation_context=context).async_validate_path()
    )


def token_hierarchy(core: Core, name: str) -> tuple[CAView, CAView]:
    """An RSA root and an EC P-256 issuing CA, both keys generated on the token."""
    root = create_root(
        core, f"{name} Root", key_algorithm=KeyAlgorithm.RSA_3072, key_storage=PKCS11
    )
    issuing = create_sub(core, root, f"{name} Issuing", key_storage=PKCS11)
    return root, issuing


def test_a_token_held_hierarchy_signs_certificates_crls_and_ocsp_responders(
    hsm_core: Core,
    softhsm: SoftHsm,
    tmp_path: Path,
) -> None:
    core = hsm_core
    root, issuing = token_hierarchy(core, "Signing")
    for view in (root, issuing):
        assert view.key_storage == "pkcs11"
        assert view.token_key is not None
        assert view.token_key["token_label"] == softhsm.token_label
        assert view.token_key["label"].startswith("pkigate CA CN=Signing")
    root_certificate = ca_certificate(core, root)
    issuing_certificate = ca_certificate(core, issuing)
    issuing_certificate.verify_directly_issued_by(root_certificate)

    leaf = issue_leaf(core, issuing)
    openssl_verify(tmp_path, root_certificate, leaf, issuing_certificate)
    pyhanko_verify(root_certificate, leaf, issuing_certificate)

    # CRLs, complete then partitioned, signed on the token, list what was revoked.
    core.revocation.revoke(
        issuing.record.id, format(leaf.serial_number, "x"), RevocationReason.superseded, ACTOR
    )
    core.authorities.update_settings(
        issuing.record.id, CASettings(crl_url="http://crl.example.test/i.crl"), ACTOR
    )
    complete = x509.load_der_x509_crl(core.revocation.generate_crl(issuing.record.id).der)
    assert complete.is_signature_valid(issuing_certificate.public_key())  # type: ignore[arg-type]
    assert complete.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None
    partitioned = create_sub(
        core,
        root,
        "Signing Partitioned",
        key_algorithm=KeyAlgorithm.EC_secp384r1,
        key_storage=PKCS11,
        settings=CASettings(
            crl_url="http://crl.example.test/p-{partition}.crl", crl_mode="PARTITIONED"
        ),
    )
    partitioned_leaf = issue_leaf(core, partitioned, "partitioned.example.test")
    core.revocation.revoke(
        partitioned.record.id,
        format(partitioned_leaf.serial_number, "x"),
        RevocationReason.keyCompromise,
        ACTOR,
    )
    (partition,) = core.revocation.partitions(partitioned.record.id)
    part = x509.load_der_x509_crl(
        core.revocation.generate_crl(partitioned.record.id, partition).der
    )
    assert part.is_signature_valid(ca_certificate(core, partitioned).public_key())  # type: ignore[arg-type]
    assert part.get_revoked_certificate_by_serial_number(partitioned_leaf.serial_number)
    core.authorities.update_settings(
        root.record.id, CASettings(crl_url="http://crl.example.test/r.crl"), ACTOR
    )
    root_crl = x509.load_der_x509_crl(core.revocation.generate_crl(root.record.id).der)
    assert root_crl.is_signature_valid(root_certificate.public_key())  # type: ignore[arg-type]

    # OCSP: the responder certificate is issued by the token key; the answer verifies.
    enable_ocsp(core, issuing)
    good = issue_leaf(core, issuing, "good.example.test")
    for certificate, status in ((good, "GOOD"), (leaf, "REVOKED")):
        response = x509.ocsp.load_der_ocsp_response(
            core.ocsp.respond(issuing.record.id, ocsp_request(certificate, issuing_certificate))
        )
        signed_by_responder(response, issuing_certificate)
        assert response.certificate_status.name == status


def test_the_private_keys_are_sensitive_unextractable_and_nowhere_but_on_the_token(
    hsm_core: Core,
    softhsm: SoftHsm,
) -> None:
    core = hsm_core
    root, issuing = token_hierarchy(core, "Sealed")
    issue_leaf(core, issuing)  # the data directory gets everything a CA in use leaves there
    enable_ocsp(core, issuing)

    objects = private_key_objects(softhsm.objects())
    for view in (root, issuing):
        assert view.token_key is not None
        block = objects[view.token_key["label"]]
        assert "sensitive" in block and "never extractable" in block
        assert "extractable" not in block.replace("never extractable", "")
        assert f"ID:         {view.token_key['id']}" in block

    token_public_keys = {
        ca_certificate(core, view)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        for view in (root, issuing)
    }
    # The store: these CAs' rows hold a reference (public data only); every sealed key in
    # it (responders, RA, TLS) opens to some other key.
    with core.store.read() as conn:
        rows = conn.execute(
            select(schema.ca_keys.c.id, schema.ca_keys.c.backend, schema.ca_keys.c.blob)
        ).all()
    for key_id, backend, blob in rows:
        if blob is None:
            continue
        if key_id in (root.record.key_id, issuing.record.key_id):
            assert backend == "pkcs11"
            reference = TokenReference.from_blob(blob)
            assert reference.public_key_der in token_public_keys
            assert b"PRIVATE" not in blob
            continue
        key = core.keys.software.load(key_id, blob)
        assert _spki(key.public_key()) not in token_public_keys
    # The data directory: no private key in any file opens to these CAs' keys.
    for path in core.data_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert b"PRIVATE KEY-----" not in data or all(
                _spki(_pem_private(block).public_key()) not in token_public_keys
                for block in _pem_blocks(data)
            ), path


def _spki(public_key: object) -> bytes:
    return public_key.public_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


_PEM_PRIVATE_KEY = re.compile(rb"-----BEGIN ([A-Z ]*PRIVATE KEY)-----.*?-----END \1-----", re.S)


def _pem_blocks(data: bytes) -> list[bytes]:
    """The PEM private keys (of any kind) in ``data``."""
    return [match.group(0) for match in _PEM_PRIVATE_KEY.finditer(data)]


def _pem_private(block: bytes) -> ec.EllipticCurvePrivateKey:
    return serialization.load_pem_private_key(block, password=None)  # type: ignore[return-value]
