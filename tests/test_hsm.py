"""CA keys on a PKCS#11 token (SoftHSM2, a real token of the tests' own): generated there,
used there for everything a CA signs, never in the store or the data directory."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from helpers import ACTOR, Clock, create_root, create_sub, make_csr
from pyhanko_certvalidator import CertificateValidator, ValidationContext
from serving import PKIGATE, RunningServer, start_server
from softhsm import MODULE, PIN_ENV, SoftHsm, private_key_objects
from sqlalchemy import select
from test_cli import Cli
from test_ocsp import enable_ocsp, ocsp_request, signed_by_responder

from pkigate.core import (
    CASettings,
    CASpec,
    CAStatus,
    CAType,
    CAView,
    Core,
    IssuanceRequest,
    Requester,
    Validity,
)
from pkigate.core.errors import BadRequestError, InvalidCertificateError, KeyBackendError
from pkigate.core.keys import KeyStorage
from pkigate.core.model import KeyAlgorithm, RevocationReason
from pkigate.core.names import parse_dn
from pkigate.core.pkcs11 import Pkcs11Backend, TokenKey, TokenReference, TokenUnavailableError
from pkigate.core.signing import sign_certificate
from pkigate.core.store import schema
from pkigate.devsim.challenges import ChallengeDns
from pkigate.devsim.config import FleetSettings
from pkigate.devsim.simulation import Outputs, SpawnOptions, simulate
from pkigate.devsim.spawn import free_port
from pkigate.gateways.config import ConfigError, parse_config

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


@pytest.mark.parametrize(
    "algorithm",
    [KeyAlgorithm.EC_prime256v1, KeyAlgorithm.EC_secp521r1, KeyAlgorithm.RSA_2048],
)
def test_a_root_of_each_family_is_generated_on_the_token_and_self_signed(
    hsm_core: Core, softhsm: SoftHsm, algorithm: KeyAlgorithm
) -> None:
    root = create_root(hsm_core, f"Family {algorithm}", key_algorithm=algorithm, key_storage=PKCS11)
    certificate = ca_certificate(hsm_core, root)
    certificate.verify_directly_issued_by(certificate)
    assert KeyAlgorithm.of_key(certificate.public_key()) == algorithm
    assert root.token_key is not None and root.token_key["label"] in private_key_objects(
        softhsm.objects()
    )


def test_a_subordinate_for_a_parent_elsewhere_has_a_csr_signed_on_the_token(
    hsm_core: Core, tmp_path: Path
) -> None:
    """Bring your own parent: the CSR carries the token key and verifies; the certificate
    the parent signs is imported and the CA issues with the token key."""
    pending = hsm_core.authorities.create(
        CASpec(CAType.SUBORDINATE, parse_dn("CN=BYO Parent Sub"), key_storage=PKCS11), ACTOR
    )
    csr = x509.load_pem_x509_csr(hsm_core.authorities.csr_pem(pending.record.id).encode())
    assert csr.is_signature_valid
    assert pending.token_key is not None
    reference = hsm_core.keys.reference(_key_blob(hsm_core, pending))
    assert reference is not None
    assert _spki(csr.public_key()) == reference.public_key_der
    # The parent: an ordinary software root of another pkigate.
    parent_core = Core.open(tmp_path / "parent")
    parent = create_root(parent_core, "Outside Root")
    signed = parent_core.issue(
        IssuanceRequest(
            parent.record.id,
            csr.public_bytes(serialization.Encoding.PEM),
            Validity.parse("1y"),
            Requester("test"),
            template="SubordinateCACertificate_PathLen0/V1",
        )
    )
    parent_core.close()
    hsm_core.authorities.import_certificate(
        pending.record.id,
        signed.certificate.public_bytes(serialization.Encoding.PEM),
        signed.chain_pem().encode(),
        ACTOR,
    )
    leaf = issue_leaf(hsm_core, pending)
    parent_certificate = x509.load_pem_x509_certificate(signed.chain_pem().encode())
    openssl_verify(tmp_path, parent_certificate, leaf, signed.certificate)


def test_an_existing_token_key_is_imported_by_label_or_id_for_its_certificate(
    hsm_core: Core, softhsm: SoftHsm, tmp_path: Path
) -> None:
    """Bring your own root whose key is in the HSM: the key made with pkcs11-tool, the
    root certificate signed with it outside pkigate's CA code, then imported by label
    (and again by id); a certificate for another key is refused."""
    softhsm.tool(
        "--keypairgen", "--key-type", "EC:prime256v1", "--label", "byo-root", "--id", "0b0e"
    )
    softhsm.tool(
        "--read-object", "--type", "pubkey", "--id", "0b0e", "-o", str(tmp_path / "pub.der")
    )
    public_der = (tmp_path / "pub.der").read_bytes()
    token = hsm_core.keys.token
    assert token is not None
    outside = TokenKey(
        token, TokenReference(softhsm.token_label, "byo-root", b"\x0b\x0e", public_der)
    )
    subject = parse_dn("CN=BYO HSM Root")
    ski = x509.SubjectKeyIdentifier.from_public_key(outside.public_key())
    root_certificate = sign_certificate(
        x509.CertificateBuilder(
            issuer_name=subject,
            subject_name=subject,
            public_key=outside.public_key(),
            serial_number=x509.random_serial_number(),
            not_valid_before=datetime.now(UTC) - timedelta(minutes=5),
            not_valid_after=datetime.now(UTC) + timedelta(days=365),
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), True
        )
        .add_extension(ski, False),
        outside,
        hashes.SHA256(),
    )
    root_pem = pem(root_certificate)
    by_label = hsm_core.authorities.import_token_ca(root_pem, None, "byo-root", None, ACTOR)
    assert by_label.key_storage == "pkcs11"
    assert by_label.token_key == {
        "token_label": softhsm.token_label,
        "label": "byo-root",
        "id": "0b0e",
    }
    leaf = issue_leaf(hsm_core, by_label)
    openssl_verify(tmp_path, root_certificate, leaf)
    by_id = hsm_core.authorities.import_token_ca(root_pem, None, None, b"\x0b\x0e", ACTOR)
    assert by_id.token_key is not None and by_id.token_key["label"] == "byo-root"

    other = create_root(hsm_core, "Other Root")  # a software key: not the token's
    with pytest.raises(InvalidCertificateError, match="does not belong"):
        hsm_core.authorities.import_token_ca(
            pem(ca_certificate(hsm_core, other)), None, "byo-root", None, ACTOR
        )
    with pytest.raises(BadRequestError, match="no private key with label 'absent'"):
        hsm_core.authorities.import_token_ca(root_pem, None, "absent", None, ACTOR)


def test_purging_a_deleted_ca_destroys_its_token_objects_audited(
    hsm_core: Core, softhsm: SoftHsm, clock: Clock
) -> None:
    root = create_root(hsm_core, "Purged Root", key_storage=PKCS11)
    assert root.token_key is not None
    label = root.token_key["label"]
    assert label in private_key_objects(softhsm.objects())
    hsm_core.authorities.update_status(root.record.id, CAStatus.DISABLED, ACTOR)
    hsm_core.authorities.delete(root.record.id, 7, ACTOR)
    assert hsm_core.authorities.purge_expired_deletions(ACTOR) == []  # within the window
    assert label in private_key_objects(softhsm.objects())
    clock.advance(timedelta(days=8))
    assert hsm_core.authorities.purge_expired_deletions(ACTOR) == [root.record.id]
    listing = softhsm.objects()
    assert label not in listing and root.token_key["id"] not in listing
    (event,) = [e for e in hsm_core.audit.events() if e.action == "ca.key.destroy"]
    assert json.loads(event.parameters)["token_key"] == root.token_key
    assert hsm_core.authorities.describe(root.record.id).token_key is None


def test_a_wrong_pin_a_missing_module_or_token_is_one_clear_error(
    tmp_path: Path, softhsm: SoftHsm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WRONG_PIN", "000000")
    cases = [
        (softhsm.settings(pin_env="WRONG_PIN"), "the PIN of PKCS#11 token 'pkigate-test' is wrong"),
        (
            softhsm.settings(module=Path("/nonexistent/libpkcs11.so")),
            "the PKCS#11 module /nonexistent/libpkcs11.so does not exist",
        ),
        (softhsm.settings(token_label="absent"), "no PKCS#11 token labelled 'absent'"),
        (softhsm.settings(pin_env="UNSET_PIN"), "UNSET_PIN is empty"),
    ]
    for settings, message in cases:
        backend = Pkcs11Backend(settings)
        with pytest.raises(TokenUnavailableError, match=re.escape(message)):
            backend.check()
    # A CA whose key is on a token this process cannot open: issuance is refused with
    # the same error (a 503 in every front-end), nothing is issued.
    good = Core.open(tmp_path / "data", pkcs11=softhsm.settings())
    issuing = create_root(good, "Refusing Root", key_storage=PKCS11)
    good.close()
    wrong = Core.open(tmp_path / "data", pkcs11=softhsm.settings(pin_env="WRONG_PIN"))
    with pytest.raises(TokenUnavailableError, match="is wrong"):
        issue_leaf(wrong, issuing)
    wrong.close()
    without = Core.open(tmp_path / "data")
    with pytest.raises(KeyBackendError, match="no \\[pkcs11\\] token is configured"):
        issue_leaf(without, issuing)
    with pytest.raises(BadRequestError, match="needs a \\[pkcs11\\] token"):
        create_root(without, "No Token Root", key_storage=PKCS11)
    without.close()


def _key_blob(core: Core, view: CAView) -> bytes:
    with core.store.read() as conn:
        blob = core.store.key_blob(conn, view.record.key_id)
    assert blob is not None
    return blob


# -- served: two workers, every front-end ---------------------------------------------------------

TOKEN_CAS = """
[[cas]]
name = "root"
type = "ROOT"
subject = "CN=pkigate HSM Root,O=pkigate tests"
key_algorithm = "EC_secp384r1"
key_storage = "pkcs11"

[[cas]]
name = "issuing"
type = "SUBORDINATE"
parent = "root"
subject = "CN=pkigate HSM Issuing,O=pkigate tests"
path_length = 0
key_storage = "pkcs11"
"""


def _issuer(server: RunningServer) -> requests.Session:
    created = server.session().post(
        f"{server.https_url}/api/v1/tokens", json={"name": "hsm", "role": "issuer"}, timeout=30
    )
    assert created.status_code == 201, created.text
    return server.session(created.json()["secret"])


def _api_issue(
    server: RunningServer, issuer: requests.Session, ca_id: str, cn: str
) -> requests.Response:
    return issuer.post(
        f"{server.https_url}/api/v1/cas/{ca_id}/certificates",
        json={"csr": make_csr(cn).decode()},
        timeout=60,
    )


def test_two_workers_issue_through_the_api_and_answer_503_while_the_token_is_away(
    tmp_path: Path, softhsm: SoftHsm
) -> None:
    server = start_server(tmp_path / "data", workers=2, extra_config=softhsm.config() + TOKEN_CAS)
    try:
        session = server.session()
        issuer = _issuer(server)
        listed = session.get(f"{server.https_url}/api/v1/cas", timeout=30).json()["cas"]
        cas = {ca["subject"]: ca for ca in listed}
        issuing = cas["CN=pkigate HSM Issuing,O=pkigate tests"]
        root = cas["CN=pkigate HSM Root,O=pkigate tests"]
        for ca in (root, issuing):
            assert ca["key_storage"] == "pkcs11"
            assert ca["token_key"]["token_label"] == softhsm.token_label
        # A CA created through the API, on the token.
        created = session.post(
            f"{server.https_url}/api/v1/cas",
            json={"type": "ROOT", "subject": "CN=API HSM Root", "key_storage": "pkcs11"},
            timeout=60,
        )
        assert created.status_code == 201, created.text
        assert created.json()["key_storage"] == "pkcs11"
        assert created.json()["token_key"]["label"] == "pkigate CA CN=API HSM Root"
        # Its certificate and key again, as a CA imported with the key found on the token.
        certificate_pem = session.get(
            f"{server.https_url}/api/v1/cas/{created.json()['id']}/certificate", timeout=30
        ).json()["certificate_pem"]
        imported = session.post(
            f"{server.https_url}/api/v1/cas/import-token-key",
            json={"certificate_pem": certificate_pem, "id": created.json()["token_key"]["id"]},
            timeout=60,
        )
        assert imported.status_code == 201, imported.text
        assert imported.json()["token_key"] == created.json()["token_key"]
        unknown = session.post(
            f"{server.https_url}/api/v1/cas/import-token-key",
            json={"certificate_pem": certificate_pem, "label": "absent"},
            timeout=60,
        )
        assert unknown.status_code == 400 and "no private key with label" in unknown.text

        # Both workers sign (each with its own session): several requests in parallel.
        with ThreadPoolExecutor(4) as pool:
            answers = list(
                pool.map(
                    lambda n: _api_issue(server, issuer, issuing["id"], f"w{n}.test"), range(8)
                )
            )
        assert [a.status_code for a in answers] == [201] * 8, [a.text for a in answers]
        root_certificate = x509.load_pem_x509_certificate(
            session.get(f"{server.http_url}/ca/{root['id']}.pem").content
        )
        issued = answers[0].json()
        leaf = x509.load_pem_x509_certificate(issued["certificate_pem"].encode())
        chain = x509.load_pem_x509_certificates(issued["chain_pem"].encode())
        openssl_verify(tmp_path, root_certificate, leaf, *chain[:1])
        pyhanko_verify(root_certificate, leaf, *chain[:1])
        assert session.get(f"{server.http_url}/readyz").status_code == 200

        # The token goes away: a clean 503 per request and /readyz says why.
        away = softhsm.tokens.with_name("tokens.away")
        softhsm.tokens.rename(away)
        try:
            refused = _api_issue(server, issuer, issuing["id"], "away.example.test")
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "tokenUnavailable"
            ready = session.get(f"{server.http_url}/readyz")
            assert ready.status_code == 503
            assert "PKCS#11 token 'pkigate-test'" in ready.json()["error"]["message"]
        finally:
            away.rename(softhsm.tokens)
        # Back: each worker reconnects.
        again = [_api_issue(server, issuer, issuing["id"], f"back{n}.test") for n in range(4)]
        assert [a.status_code for a in again] == [201] * 4, [a.text for a in again]
        assert "Traceback" not in server.log.read_text()
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pin_env": "PKIGATE_TEST_WRONG_PIN"}, "the PIN of PKCS#11 token 'pkigate-test' is wrong"),
        ({"module": Path("/nonexistent/pkcs11.so")}, "the PKCS#11 module /nonexistent/pkcs11.so"),
        ({"token_label": "removed"}, "no PKCS#11 token labelled 'removed'"),
    ],
)
def test_serve_refuses_to_start_with_one_line_on_a_wrong_pin_a_missing_module_or_token(
    tmp_path: Path,
    softhsm: SoftHsm,
    monkeypatch: pytest.MonkeyPatch,
    change: dict[str, object],
    message: str,
) -> None:
    monkeypatch.setenv("PKIGATE_TEST_WRONG_PIN", "111111")
    settings = softhsm.settings(**change)
    table = (
        f'[pkcs11]\nmodule = "{settings.module}"\ntoken_label = "{settings.token_label}"\n'
        f'pin_env = "{settings.pin_env}"\n'
    )
    config = tmp_path / "pkigate.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\n[listeners]\nhttp = "127.0.0.1:{free_port()}"\n'
        f'https = "127.0.0.1:{free_port()}"\n' + table + TOKEN_CAS
    )
    result = subprocess.run(
        [PKIGATE, "serve", "--log-format", "text", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0] and "[tokenUnavailable]" in lines[0]
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.skipif(not ChallengeDns.available(), reason="pebble-challtestsrv is not installed")
def test_phones_servers_and_machines_enroll_from_a_token_held_hierarchy(
    tmp_path: Path, softhsm: SoftHsm
) -> None:
    """SCEP, ACME and AD-style enrollment against two workers whose CAs sign on the token:
    every certificate checked by the simulator (pyhanko path validation to the token-held
    root, OCSP and CRL for the revoked ones), and the store afterwards."""
    phones, servers, machines = 3, 2, 2
    simulation = simulate(
        FleetSettings(
            phones=phones,
            servers=servers,
            machines=machines,
            renewals=1,
            revoke_fraction=1.0,
            pending_fraction=0.0,
            seed=16,
        ),
        spawn=SpawnOptions(
            workers=2, base_dir=tmp_path / "server", extra_config=softhsm.config() + TOKEN_CAS
        ),
        outputs=Outputs(progress=False),
    )
    report = simulation.report
    assert report.ok, report.failures
    total = (phones + servers + machines) * 2
    assert report.certificates["received"] == report.certificates["verified"] == total
    assert report.certificates["revoked_verified"] == servers
    core = Core.open(tmp_path / "server" / "data")
    try:
        storages = {view.record.subject: view.key_storage for view in core.authorities.list_cas()}
    finally:
        core.close()
    assert storages == {
        "CN=pkigate HSM Root,O=pkigate tests": "pkcs11",
        "CN=pkigate HSM Issuing,O=pkigate tests": "pkcs11",
    }


def test_the_cli_creates_describes_and_imports_token_keys_with_the_configured_token(
    tmp_path: Path, softhsm: SoftHsm
) -> None:
    config = tmp_path / "pkigate.toml"
    config.write_text(softhsm.config())
    cli = Cli(tmp_path / "home")
    created = cli.json(
        "ca",
        "--config",
        str(config),
        "create",
        "--type",
        "ROOT",
        "--subject",
        "CN=CLI HSM Root",
        "--key-storage",
        "pkcs11",
    )
    assert isinstance(created, dict)
    assert created["key_storage"] == "pkcs11"
    assert created["token_key"]["label"] == "pkigate CA CN=CLI HSM Root"
    described = cli.run("ca", "--config", str(config), "describe", created["id"]).stdout
    assert "key_storage:        pkcs11" in described
    assert f"token id:           {created['token_key']['id']}" in described
    # Its certificate, imported again as a CA of the key found on the token by its id.
    certificate = tmp_path / "root.pem"
    certificate.write_text(cli.run("ca", "certificate", created["id"]).stdout)
    imported = cli.json(
        "ca",
        "--config",
        str(config),
        "import-token-key",
        "--certificate",
        str(certificate),
        "--id",
        created["token_key"]["id"],
    )
    assert isinstance(imported, dict)
    assert imported["token_key"] == created["token_key"] and imported["status"] == "ACTIVE"
    # Without the configuration the token's CA keys cannot be used: one line, no traceback.
    refused = cli.run(
        "ca", "create", "--type", "ROOT", "--subject", "CN=X", "--key-storage", "pkcs11", ok=False
    )
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        "error: key_storage pkcs11 needs a [pkcs11] token in the gateway configuration [badRequest]"
    ]


def test_a_forked_process_opens_its_own_session_and_signs(hsm_core: Core) -> None:
    """A session opened before a fork is not the child's: the child initialises the
    library and logs in again, and its signatures verify (the parent's still work)."""
    root = create_root(hsm_core, "Forked Root", key_storage=PKCS11)
    issue_leaf(hsm_core, root, "parent-before.example.test")  # the parent's session is open
    token = hsm_core.keys.token
    assert token is not None
    parents = token._session
    assert parents is not None
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only if it issued a verifying certificate
        status = 1
        try:
            leaf = issue_leaf(hsm_core, root, "child.example.test")
            leaf.verify_directly_issued_by(ca_certificate(hsm_core, root))
            # On a session of its own (SoftHSM would let it use the parent's copy).
            status = 0 if token._session is not None and token._session is not parents else 2
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    issue_leaf(hsm_core, root, "parent-after.example.test")


_TLS_AFTER_OPENING = """
import datetime, ssl, sys, tempfile
from pathlib import Path
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pkigate.core.pkcs11 import Pkcs11Backend
from pkigate.core.pkcs11_settings import Pkcs11Settings

key = ec.generate_private_key(ec.SECP256R1())
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tls.example.test")])
now = datetime.datetime.now(datetime.UTC)
certificate = (
    x509.CertificateBuilder().subject_name(name).issuer_name(name)
    .public_key(key.public_key()).serial_number(1)
    .not_valid_before(now).not_valid_after(now + datetime.timedelta(hours=1))
    .sign(key, hashes.SHA256())
)
pem = Path(tempfile.mkdtemp()) / "server.pem"
pem.write_bytes(
    certificate.public_bytes(serialization.Encoding.PEM)
    + key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
)
server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
server_context.load_cert_chain(pem)
client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
client_context.load_verify_locations(pem)
wires = [ssl.MemoryBIO() for _ in range(4)]  # client in, client out, server in, server out
client = client_context.wrap_bio(wires[0], wires[1], server_hostname="tls.example.test")
server = server_context.wrap_bio(wires[2], wires[3], server_side=True)
for _ in range(10):  # a TLS connection, established in memory
    for end in (client, server):
        try:
            end.do_handshake()
        except ssl.SSLWantReadError:
            pass
    wires[2].write(wires[1].read())
    wires[0].write(wires[3].read())
server.write(b"first")
wires[0].write(wires[3].read())
assert client.read(5) == b"first"

backend = Pkcs11Backend(Pkcs11Settings(Path(sys.argv[1]), sys.argv[2], pin_env=sys.argv[3]))
backend.check()  # initialises the library and logs in, on this thread
try:
    client.read(5)  # nothing has come yet
except ssl.SSLWantReadError:
    print("would block")
"""


def test_opening_the_token_leaves_no_openssl_error_for_the_next_tls_read(
    softhsm: SoftHsm,
) -> None:
    """SoftHSM leaves errors on the initialising thread's OpenSSL error queue, and a TLS
    read on that thread that would block then raised them as an SSLError (in a gevent
    worker every read is such a read: CI lost an ACME request that way). In a process
    of its own, so that the library is initialised afresh on the test's thread."""
    ran = subprocess.run(
        [sys.executable, "-c", _TLS_AFTER_OPENING, str(MODULE), softhsm.token_label, PIN_ENV],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.strip() == "would block"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            '[pkcs11]\nmodule = "/m.so"\ntoken_label = "t"\npin_env = "P"\npin = "1234"\n',
            "pkcs11.pin: unknown key; did you mean 'pin_env'?",
        ),
        (
            '[pkcs11]\nmodule = "/m.so"\ntoken_label = "t"\npin_env = "P"\npin_file = "/p"\n',
            "pkcs11: set exactly one of pin_env and pin_file",
        ),
        (
            '[pkcs11]\nmodule = "m.so"\ntoken_label = "t"\npin_env = "P"\n',
            "pkcs11.module: must be an absolute path",
        ),
        (
            '[[cas]]\nname = "r"\ntype = "ROOT"\nsubject = "CN=R"\nkey_storage = "pkcs11"\n',
            "cas[0].key_storage: pkcs11 needs a [pkcs11] table naming the token",
        ),
        (
            '[[cas]]\nname = "r"\ntype = "ROOT"\nsubject = "CN=R"\nkey_storage = "hsm"\n',
            "cas[0].key_storage: must be one of software, pkcs11",
        ),
    ],
)
def test_the_pkcs11_configuration_is_checked_with_where_the_problem_is(
    text: str, problem: str
) -> None:
    with pytest.raises(ConfigError, match=re.escape(problem)):
        parse_config(text)


def test_the_pin_file_must_be_private(tmp_path: Path, softhsm: SoftHsm) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(softhsm.pin + "\n")
    pin_file.chmod(0o644)
    backend = Pkcs11Backend(softhsm.settings(pin_env=None, pin_file=pin_file))
    with pytest.raises(TokenUnavailableError, match="readable by others"):
        backend.check()
    pin_file.chmod(0o600)
    backend.check()
    backend.close()
