"""The SCEP connector through Flask's test client, with scep.messages as the client."""

from __future__ import annotations

import base64
import json
import urllib.parse
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from asn1crypto.cms import ContentInfo
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import AttributeOID, ExtendedKeyUsageOID, NameOID
from flask.testing import FlaskClient
from helpers import raw_csr, stale_first_scep_transaction_lookup
from sqlalchemy import func, select

from pkigate.core import Actor
from pkigate.core.model import RevocationReason
from pkigate.core.store import scep as scep_store
from pkigate.core.store import schema
from pkigate.gateways.app import create_app
from pkigate.gateways.auth import Role
from pkigate.gateways.config import ConfigError, parse_config
from pkigate.gateways.runtime import Gateway
from pkigate.scep.authorization import static_challenge_secret_name
from pkigate.scep.connector import ScepConnector
from pkigate.scep.messages import (
    CertRep,
    FailInfo,
    MessageType,
    PkiStatus,
    ScepError,
    build_pki_message,
    encode_issuer_and_serial,
    encode_issuer_and_subject,
    parse_cert_rep,
)

SCEP = "/scep"


@dataclass
class Env:
    gateway: Gateway
    client: FlaskClient
    api: FlaskClient
    challenge: str

    @property
    def ra(self) -> x509.Certificate:
        return ca_certs(self.client)[0]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    gateway = Gateway.open(parse_config(f"data_dir = '{tmp_path / 'data'}'"), bootstrap=True)
    challenge = gateway.core.secrets.get(static_challenge_secret_name("scep"))
    assert challenge is not None
    yield Env(
        gateway,
        create_app(gateway, "http").test_client(),
        create_app(gateway, "https").test_client(),
        challenge,
    )
    gateway.close()


def load_certs_only(der: bytes) -> list[x509.Certificate]:
    # The certificates are in the order clients expect (RA first), not DER SET order.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return pkcs7.load_der_pkcs7_certificates(der)


def ca_certs(client: FlaskClient) -> list[x509.Certificate]:
    response = client.get(f"{SCEP}?operation=GetCACert")
    assert response.status_code == 200
    return load_certs_only(response.data)


@dataclass
class Device:
    key: rsa.RSAPrivateKey
    certificate: x509.Certificate  # self-signed, or one pkigate issued

    @classmethod
    def new(cls, cn: str = "device-1") -> Device:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        now = datetime.now(UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(days=1))
            .sign(key, hashes.SHA256())
        )
        return cls(key, certificate)

    def csr(
        self, challenge: str | None, cn: str = "device-1", key: rsa.RSAPrivateKey | None = None
    ) -> bytes:
        builder = x509.CertificateSigningRequestBuilder().subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        )
        if challenge is not None:
            builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, challenge.encode())
        return builder.sign(key or self.key, hashes.SHA256()).public_bytes(
            serialization.Encoding.DER
        )

    def message(
        self,
        recipient: x509.Certificate,
        payload: bytes,
        *,
        kind: MessageType = MessageType.PKCS_REQ,
        transaction_id: str | None = None,
        cipher: str = "aes128",
    ) -> bytes:
        return build_pki_message(
            kind,
            payload,
            transaction_id or uuid.uuid4().hex,
            self.certificate,
            self.key,
            recipient,
            cipher=cipher,
        )

    def read(self, env: Env, data: bytes) -> CertRep:
        return parse_cert_rep(data, self.key, ca_certs(env.client)[:1])


def issue_events(env: Env) -> list[dict[str, Any]]:
    """The parameters of successful certificate.issue audit events."""
    return [
        json.loads(e.parameters)
        for e in env.gateway.core.audit.events()
        if e.action == "certificate.issue" and e.result == "success"
    ]


def post(client: FlaskClient, body: bytes, content_type: str = "application/x-pki-message"):  # type: ignore[no-untyped-def]
    return client.post(
        f"{SCEP}?operation=PKIOperation", data=body, headers={"Content-Type": content_type}
    )


def enroll(env: Env, device: Device, challenge: str | None = None, **kwargs: object) -> CertRep:
    body = device.message(env.ra, device.csr(challenge or env.challenge), **kwargs)  # type: ignore[arg-type]
    response = post(env.client, body)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/x-pki-message"
    return device.read(env, response.data)


# -- GetCACaps and GetCACert ------------------------------------------------------------


def test_get_ca_caps_lists_the_capabilities_as_exact_text_plain(env: Env) -> None:
    response = env.client.get(f"{SCEP}?operation=GetCACaps")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/plain"
    assert response.text.split("\n") == [
        "POSTPKIOperation",
        "SHA-256",
        "SHA-512",
        "AES",
        "Renewal",
        "SCEPStandard",
    ]


def test_get_ca_cert_answers_an_rsa_ra_with_both_key_usages_and_the_ca_chain(env: Env) -> None:
    response = env.client.get(f"{SCEP}?operation=GetCACert")
    assert response.headers["Content-Type"] == "application/x-x509-ca-ra-cert"
    ra, issuing, root = load_certs_only(response.data)
    assert isinstance(ra.public_key(), rsa.RSAPublicKey)
    assert ra.public_key().key_size == 2048
    usage = ra.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and usage.key_encipherment
    assert not usage.key_cert_sign and not usage.content_commitment
    assert ra.issuer == issuing.subject and issuing.issuer == root.subject
    assert issuing.subject.rfc4514_string() == "CN=pkigate Issuing CA,O=pkigate"
    # Issued once, then the same certificate for every request (and every process).
    assert ca_certs(env.client)[0] == ra
    with env.gateway.core.store.read() as conn:
        rows = env.gateway.core.store.list_certificates(conn, ca_id=env.gateway.ca_ids["issuing"])
    assert [
        (r.template, r.connector) for r in rows if r.serial == format(ra.serial_number, "x")
    ] == [("BlankEndEntityCertificate_APIPassthrough/V1", "scep")]


def test_an_rsa_ca_that_decrypts_itself_is_answered_as_a_single_certificate(
    tmp_path: Path,
) -> None:
    config = parse_config(f"""
data_dir = '{tmp_path / "data"}'
[[cas]]
name = "root"
type = "ROOT"
subject = "CN=RSA Root"
key_algorithm = "RSA_2048"
signing_algorithm = "SHA256WITHRSA"
[[connectors]]
type = "scep"
name = "mdm"
mount = "/mdm"
ca = "root"
[connectors.settings]
ca_decrypts = true
challenge = "correct horse"
""")
    gateway = Gateway.open(config, bootstrap=True)
    client = create_app(gateway, "http").test_client()
    response = client.get("/mdm?operation=GetCACert")
    assert response.headers["Content-Type"] == "application/x-x509-ca-cert"
    ca = x509.load_der_x509_certificate(response.data)
    assert ca.subject.rfc4514_string() == "CN=RSA Root"
    device = Device.new()
    reply = client.post(
        "/mdm?operation=PKIOperation", data=device.message(ca, device.csr("correct horse"))
    )
    rep = parse_cert_rep(reply.data, device.key, [ca])
    assert rep.status is PkiStatus.SUCCESS
    assert rep.certificates[0].issuer == ca.subject
    gateway.close()


def test_unknown_operation_is_a_400(env: Env) -> None:
    assert env.client.get(f"{SCEP}?operation=Nope").status_code == 400
    assert env.client.get(SCEP).status_code == 400


# -- PKCSReq with the static challenge ---------------------------------------------------


def test_pkcsreq_with_the_static_challenge_issues_a_client_auth_certificate(env: Env) -> None:
    device = Device.new()
    transaction_id = uuid.uuid4().hex
    rep = enroll(env, device, transaction_id=transaction_id)
    assert rep.status is PkiStatus.SUCCESS, rep.fail_info_text
    assert rep.transaction_id == transaction_id
    issued = rep.certificates[0]
    assert issued.subject.rfc4514_string() == "CN=device-1"
    assert issued.public_key() == device.key.public_key()
    eku = issued.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    issue = [p for p in issue_events(env) if p["correlation_id"] == transaction_id]
    assert (issue[0]["transaction_id"], issue[0]["challenge"]) == (transaction_id, "static")
    assert issue[0]["serial"] == format(issued.serial_number, "x")


def test_wrong_or_missing_challenge_is_a_failure_bad_request(env: Env) -> None:
    device = Device.new()
    rep = enroll(env, device, challenge="wrong-challenge")
    assert (rep.status, rep.fail_info) == (PkiStatus.FAILURE, FailInfo.BAD_REQUEST)
    body = device.message(env.ra, device.csr(None))
    rep = device.read(env, post(env.client, body).data)
    assert (rep.status, rep.fail_info) == (PkiStatus.FAILURE, FailInfo.BAD_REQUEST)
    failures = [
        e
        for e in env.gateway.core.audit.events()
        if e.action == "scep.enroll" and e.result == "failure"
    ]
    assert len(failures) == 2


def test_pkcsreq_by_get_accepts_raw_percent_encoded_and_url_safe_base64(env: Env) -> None:
    for encode in (
        lambda b: base64.b64encode(b).decode(),  # macOS: '+' and '/' raw
        lambda b: urllib.parse.quote(base64.b64encode(b).decode(), safe=""),
        lambda b: base64.urlsafe_b64encode(b).decode().rstrip("="),
    ):
        device = Device.new()
        body = device.message(env.ra, device.csr(env.challenge), cipher="aes256")
        response = env.client.get(f"{SCEP}?operation=PKIOperation&message={encode(body)}")
        assert response.status_code == 200, response.text
        assert device.read(env, response.data).status is PkiStatus.SUCCESS


def test_single_des_requests_are_answered_with_des3(env: Env) -> None:
    # micromdm's scepclient encrypts with single DES whatever the capabilities say.
    device = Device.new()
    body = device.message(env.ra, device.csr(env.challenge), cipher="des")
    response = post(env.client, body)
    rep = device.read(env, response.data)
    assert rep.status is PkiStatus.SUCCESS
    reply = ContentInfo.load(response.data)["content"]["encap_content_info"]["content"].native
    algorithm = ContentInfo.load(reply)["content"]["encrypted_content_info"][
        "content_encryption_algorithm"
    ]["algorithm"].native
    assert algorithm == "tripledes_3key"


def test_single_des_can_be_refused(tmp_path: Path) -> None:
    config = parse_config(f"""
data_dir = '{tmp_path / "data"}'
[[connectors]]
type = "scep"
name = "strict"
mount = "/strict"
[connectors.settings]
accept_single_des = false
challenge = "correct horse"
""")
    gateway = Gateway.open(config, bootstrap=True)
    client = create_app(gateway, "http").test_client()
    ra = load_certs_only(client.get("/strict?operation=GetCACert").data)[0]
    device = Device.new()
    body = device.message(ra, device.csr("correct horse"), cipher="des")
    reply = client.post("/strict?operation=PKIOperation", data=body)
    rep = parse_cert_rep(reply.data, device.key, [ra])
    assert (rep.status, rep.fail_info) == (PkiStatus.FAILURE, FailInfo.BAD_ALG)
    gateway.close()


def test_a_retried_transaction_gets_the_same_certificate(env: Env) -> None:
    device = Device.new()
    body = device.message(env.ra, device.csr(env.challenge), transaction_id="retry-1")
    first = device.read(env, post(env.client, body).data)
    again = device.read(env, post(env.client, body).data)
    assert first.certificates[0] == again.certificates[0]


def test_a_replayed_transaction_id_with_another_csr_is_refused(env: Env) -> None:
    device = Device.new()
    first = device.message(env.ra, device.csr(env.challenge), transaction_id="tx-1")
    assert device.read(env, post(env.client, first).data).status is PkiStatus.SUCCESS
    second = device.message(env.ra, device.csr(env.challenge, cn="device-2"), transaction_id="tx-1")
    rep = device.read(env, post(env.client, second).data)
    assert (rep.status, rep.fail_info) == (PkiStatus.FAILURE, FailInfo.BAD_REQUEST)


def test_pkcsreq_signed_with_another_key_than_the_csr_is_refused(env: Env) -> None:
    device = Device.new()
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    body = device.message(env.ra, device.csr(env.challenge, key=other))
    rep = device.read(env, post(env.client, body).data)
    assert (rep.status, rep.fail_info) == (PkiStatus.FAILURE, FailInfo.BAD_MESSAGE_CHECK)


# -- bad input --------------------------------------------------------------------------


def test_a_request_whose_key_algorithm_is_unknown_is_bad_alg(env: Env) -> None:
    # Found by tests/fuzzing.py: the key comparison with the signer raised (a 500).
    device = Device.new()
    csr = device.csr(env.challenge)
    rsa_encryption = bytes.fromhex("06092a864886f70d010101")  # OID 1.2.840.113549.1.1.1
    assert csr.count(rsa_encryption) == 1
    unknown = csr.replace(rsa_encryption, bytes.fromhex("06092a864886f70d010163"))
    message = device.message(env.ra, unknown)
    issued_before = len(issue_events(env))
    reply = post(env.client, message)
    assert reply.status_code == 200, reply.data
    rep = device.read(env, reply.data)
    assert (rep.status, rep.fail_info) == (PkiStatus.FAILURE, FailInfo.BAD_ALG)
    assert "public key" in (rep.fail_info_text or "")
    assert len(issue_events(env)) == issued_before


def test_garbage_and_truncated_cms_are_a_400(env: Env) -> None:
    device = Device.new()
    body = device.message(env.ra, device.csr(env.challenge))
    for bad in (b"garbage", body[: len(body) // 2], b""):
        response = post(env.client, bad)
        assert response.status_code == 400, response.text
        # Said once: the answer read "not a SCEP pkiMessage: not a SCEP pkiMessage: ...".
        assert response.text.count("not a SCEP pkiMessage") == 1, response.text
    response = env.client.get(f"{SCEP}?operation=PKIOperation&message=%%%")
    assert response.status_code == 400


def test_wrong_content_type_is_a_415(env: Env) -> None:
    device = Device.new()
    body = device.message(env.ra, device.csr(env.challenge))
    assert post(env.client, body, "application/json").status_code == 415


def test_oversized_message_is_refused(env: Env) -> None:
    assert post(env.client, b"\x30" * (300 * 1024)).status_code == 413


def test_a_message_encrypted_to_another_certificate_is_a_failure_bad_message_check(
    env: Env,
) -> None:
    device = Device.new()
    stranger = Device.new("not-our-ra").certificate
    rep = device.read(env, post(env.client, device.message(stranger, device.csr("x"))).data)
    assert (rep.status, rep.fail_info) == (PkiStatus.FAILURE, FailInfo.BAD_MESSAGE_CHECK)


def test_a_signature_that_does_not_verify_is_a_failure_bad_message_check(env: Env) -> None:
    device = Device.new()
    body = bytearray(device.message(env.ra, device.csr(env.challenge)))
    body[-10] ^= 0xFF  # inside the signature value, at the end of the SignerInfo
    rep = device.read(env, post(env.client, bytes(body)).data)
    assert (rep.status, rep.fail_info) == (PkiStatus.FAILURE, FailInfo.BAD_MESSAGE_CHECK)
    with env.gateway.core.store.read() as conn:
        rows = env.gateway.core.store.list_certificates(conn, ca_id=env.gateway.ca_ids["issuing"])
    assert [r for r in rows if r.subject == "CN=device-1"] == []


# -- renewal ----------------------------------------------------------------------------


def test_renewalreq_signed_by_an_issued_certificate_needs_no_challenge(env: Env) -> None:
    device = Device.new()
    issued = enroll(env, device).certificates[0]
    renewing = Device(device.key, issued)
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    body = renewing.message(env.ra, renewing.csr(None, key=new_key), kind=MessageType.RENEWAL_REQ)
    rep = renewing.read(env, post(env.client, body).data)
    assert rep.status is PkiStatus.SUCCESS, rep.fail_info_text
    assert rep.certificates[0].public_key() == new_key.public_key()
    assert rep.certificates[0].serial_number != issued.serial_number


def test_renewal_signed_by_a_revoked_certificate_is_refused(env: Env) -> None:
    device = Device.new()
    issued = enroll(env, device).certificates[0]
    env.gateway.core.revocation.revoke(
        env.gateway.ca_ids["issuing"],
        format(issued.serial_number, "x"),
        RevocationReason.keyCompromise,
        Actor("test"),
    )
    renewing = Device(device.key, issued)
    body = renewing.message(env.ra, renewing.csr(None), kind=MessageType.RENEWAL_REQ)
    rep = renewing.read(env, post(env.client, body).data)
    assert (rep.status, rep.fail_info) == (PkiStatus.FAILURE, FailInfo.BAD_REQUEST)
    assert rep.fail_info_text == "the signing certificate is revoked"


def test_renewal_for_another_subject_is_refused(env: Env) -> None:
    device = Device.new()
    issued = enroll(env, device).certificates[0]
    renewing = Device(device.key, issued)
    body = renewing.message(
        env.ra, renewing.csr(None, cn="someone-else"), kind=MessageType.RENEWAL_REQ
    )
    rep = renewing.read(env, post(env.client, body).data)
    assert (rep.status, rep.fail_info) == (PkiStatus.FAILURE, FailInfo.BAD_REQUEST)


def test_a_renewal_may_not_add_alternative_names(env: Env) -> None:
    """Found in review: a renewal kept the subject but took any SANs from its CSR, so one
    enrolled device could renew itself into a certificate for any name."""
    device = Device.new()
    issued = enroll(env, device).certificates[0]
    renewing = Device(device.key, issued)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(issued.subject)
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("vpn.corp.example")]), critical=False
        )
        .sign(rsa.generate_private_key(65537, 2048), hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    before = len(issue_events(env))
    rep = renewing.read(
        env, post(env.client, renewing.message(env.ra, csr, kind=MessageType.RENEWAL_REQ)).data
    )
    assert (rep.status, rep.fail_info) == (PkiStatus.FAILURE, FailInfo.BAD_REQUEST)
    assert "may not add alternative names" in (rep.fail_info_text or "")
    assert len(issue_events(env)) == before


def test_a_certificate_another_connector_issued_does_not_renew_over_scep(env: Env) -> None:
    """Found in review: any certificate of the CA signed a RenewalReq, an ACME server
    certificate too (same CA, another connector): it proves what ACME validated, not
    what this SCEP connector authorizes."""
    from pkigate.core import IssuanceRequest, Requester, Validity

    device = Device.new("acme-host")
    core = env.gateway.core
    other = core.issue(
        IssuanceRequest(
            env.gateway.ca_ids["issuing"],
            device.csr(None, cn="acme-host"),
            Validity.parse("30d"),
            Requester("acme:account-1", connector="acme"),
        )
    ).certificate
    renewing = Device(device.key, other)
    body = renewing.message(
        env.ra,
        renewing.csr(None, cn="acme-host", key=rsa.generate_private_key(65537, 2048)),
        kind=MessageType.RENEWAL_REQ,
    )
    before = len(issue_events(env))
    rep = renewing.read(env, post(env.client, body).data)
    assert (rep.status, rep.fail_info) == (PkiStatus.FAILURE, FailInfo.BAD_REQUEST)
    assert rep.fail_info_text == "the renewal is signed by a certificate another connector issued"
    assert len(issue_events(env)) == before


def test_requests_parsers_trip_on_are_failures_not_crashes(env: Env) -> None:
    """Found in review (each a 500): a challengePassword with two values; a subject that
    is not valid UTF-8 (read only when compared, in a RenewalReq)."""
    from pkigate.core.der import tlv

    device = Device.new()
    cn_oid = bytes.fromhex("0603550403")
    subject = tlv(0x30, tlv(0x31, tlv(0x30, cn_oid, tlv(0x0C, b"device-1"))))
    two_passwords = tlv(
        0x30,
        bytes.fromhex("06092a864886f70d010907"),
        tlv(0x31, tlv(0x0C, env.challenge.encode()), tlv(0x0C, b"another")),
    )
    bad_utf8 = tlv(0x30, tlv(0x31, tlv(0x30, cn_oid, tlv(0x0C, b"\xff\xfe"))))
    issued = enroll(env, device).certificates[0]
    renewing = Device(device.key, issued)
    before = len(issue_events(env))
    for sender, payload, kind in (
        (device, raw_csr(device.key, subject, two_passwords), MessageType.PKCS_REQ),
        (
            renewing,
            raw_csr(rsa.generate_private_key(65537, 2048), bad_utf8),
            MessageType.RENEWAL_REQ,
        ),
    ):
        response = post(env.client, sender.message(env.ra, payload, kind=kind))
        assert response.status_code == 200, response.text
        rep = sender.read(env, response.data)
        assert (rep.status, rep.fail_info) == (PkiStatus.FAILURE, FailInfo.BAD_REQUEST)
    assert len(issue_events(env)) == before


def test_renewal_signed_by_a_self_signed_certificate_is_refused(env: Env) -> None:
    device = Device.new()
    body = device.message(env.ra, device.csr(None), kind=MessageType.RENEWAL_REQ)
    rep = device.read(env, post(env.client, body).data)
    assert (rep.status, rep.fail_info) == (PkiStatus.FAILURE, FailInfo.BAD_REQUEST)


# -- GetCert ----------------------------------------------------------------------------


def test_get_cert_answers_only_the_certificates_holder(env: Env) -> None:
    device = Device.new()
    issued = enroll(env, device).certificates[0]
    payload = encode_issuer_and_serial(issued.issuer, issued.serial_number)
    holder = Device(device.key, issued)
    rep = holder.read(
        env, post(env.client, holder.message(env.ra, payload, kind=MessageType.GET_CERT)).data
    )
    assert rep.status is PkiStatus.SUCCESS and rep.certificates[0] == issued
    stranger = Device.new("stranger")
    rep = stranger.read(
        env, post(env.client, stranger.message(env.ra, payload, kind=MessageType.GET_CERT)).data
    )
    assert (rep.status, rep.fail_info) == (PkiStatus.FAILURE, FailInfo.BAD_CERT_ID)


# -- one-time challenges and rate limiting ----------------------------------------------


def issuer_token(env: Env, role: Role = Role.ISSUER) -> dict[str, str]:
    token = env.gateway.tokens.create(f"mdm-{uuid.uuid4().hex[:6]}", role, Actor("test")).secret
    return {"Authorization": f"Bearer {token}"}


def new_challenge(env: Env, **body: object) -> dict[str, str]:
    response = env.api.post(
        "/api/v1/connectors/scep/challenges", json=body, headers=issuer_token(env)
    )
    assert response.status_code == 201, response.text
    return response.json  # type: ignore[return-value]


def test_a_one_time_challenge_is_consumed_by_its_first_successful_use(env: Env) -> None:
    created = new_challenge(env, device_id="serial-C02X")
    device = Device.new()
    rep = enroll(env, device, challenge=created["challenge"])
    assert rep.status is PkiStatus.SUCCESS
    again = enroll(env, Device.new(), challenge=created["challenge"])
    assert (again.status, again.fail_info_text) == (
        PkiStatus.FAILURE,
        "the challenge password was already used",
    )
    issue = [p for p in issue_events(env) if p.get("challenge") == "dynamic"]
    assert [(p["challenge_id"], p["device_id"]) for p in issue] == [(created["id"], "serial-C02X")]


def test_a_challenge_bound_to_a_subject_refuses_other_subjects(env: Env) -> None:
    created = new_challenge(env, subject="CN=device-9")
    rep = enroll(env, Device.new(), challenge=created["challenge"])
    assert rep.fail_info_text == "the challenge password is bound to another subject"
    device = Device.new("device-9")
    body = device.message(env.ra, device.csr(created["challenge"], cn="device-9"))
    assert device.read(env, post(env.client, body).data).status is PkiStatus.SUCCESS


def test_a_bound_challenge_enrolls_only_the_alternative_names_it_lists(env: Env) -> None:
    """Found in review: a challenge bound to CN=device-9 enrolled any SANs the CSR asked
    for (a domain controller's name, an administrator's UPN). A bound challenge now allows
    the names it was created with, none unless some were."""

    def csr(device: Device, challenge: str, sans: list[x509.GeneralName]) -> bytes:
        builder = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device-9")]))
            .add_attribute(AttributeOID.CHALLENGE_PASSWORD, challenge.encode())
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        )
        return builder.sign(device.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)

    assert env.ra  # the RA certificate is issued at first use: not counted below
    before = len(issue_events(env))
    bare = new_challenge(env, subject="CN=device-9")
    assert bare["sans"] is None
    device = Device.new("device-9")
    body = device.message(
        env.ra, csr(device, bare["challenge"], [x509.DNSName("dc01.corp.example")])
    )
    rep = device.read(env, post(env.client, body).data)
    assert (rep.status, rep.fail_info) == (PkiStatus.FAILURE, FailInfo.BAD_REQUEST)
    assert rep.fail_info_text == (
        "the challenge password does not allow the alternative name(s) DNS:dc01.corp.example"
    )
    assert len(issue_events(env)) == before
    upn = {"upn": "device-9@corp.example"}
    listed = new_challenge(env, subject="CN=device-9", sans=[{"dns": "Device-9.corp.example"}, upn])
    assert listed["sans"][0] == "DNS:device-9.corp.example"
    # An otherName is compared with its value, not only its type (found in review).
    from pkigate.core.names import upn_other_name

    impostor = Device.new("device-9")
    body = impostor.message(
        env.ra,
        csr(impostor, listed["challenge"], [upn_other_name("administrator@corp.example")]),
    )
    rep = impostor.read(env, post(env.client, body).data)
    assert (rep.status, rep.fail_info) == (PkiStatus.FAILURE, FailInfo.BAD_REQUEST)
    other = Device.new("device-9")
    names = [x509.DNSName("device-9.corp.example"), upn_other_name("device-9@corp.example")]
    body = other.message(env.ra, csr(other, listed["challenge"], names))
    assert other.read(env, post(env.client, body).data).status is PkiStatus.SUCCESS


def test_an_expired_challenge_is_refused(env: Env) -> None:
    created = new_challenge(env, ttl_seconds=60)
    clock = env.gateway.core.issuer
    original = clock._clock
    clock._clock = lambda: original() + timedelta(minutes=2)
    try:
        rep = enroll(env, Device.new(), challenge=created["challenge"])
    finally:
        clock._clock = original
    assert rep.fail_info_text == "the challenge password has expired"


def test_challenges_need_the_issuer_or_admin_role(env: Env) -> None:
    response = env.api.post(
        "/api/v1/connectors/scep/challenges", json={}, headers=issuer_token(env, Role.AUDITOR)
    )
    assert response.status_code == 403
    assert env.api.post("/api/v1/connectors/scep/challenges", json={}).status_code == 401


def test_failed_challenges_are_rate_limited_per_client_address(env: Env) -> None:
    for _ in range(5):
        rep = enroll(env, Device.new(), challenge="wrong-challenge")
        assert rep.fail_info_text == "wrong challenge password"
    rep = enroll(env, Device.new())  # the right challenge, but too late
    assert rep.fail_info_text == "too many failed challenge attempts; try again later"
    other = env.client.post(
        f"{SCEP}?operation=PKIOperation",
        data=(device := Device.new()).message(env.ra, device.csr(env.challenge)),
        environ_base={"REMOTE_ADDR": "192.0.2.7"},
    )
    assert device.read(env, other.data).status is PkiStatus.SUCCESS


def test_failed_challenges_are_rate_limited_per_transaction_id(env: Env) -> None:
    device = Device.new()
    for number in range(5):
        body = device.message(env.ra, device.csr(f"wrong-{number}"), transaction_id="guess")
        response = env.client.post(
            f"{SCEP}?operation=PKIOperation",
            data=body,
            environ_base={"REMOTE_ADDR": f"198.51.100.{number}"},
        )
        assert device.read(env, response.data).fail_info_text == "wrong challenge password"
    body = device.message(env.ra, device.csr(env.challenge), transaction_id="guess")
    response = env.client.post(
        f"{SCEP}?operation=PKIOperation", data=body, environ_base={"REMOTE_ADDR": "203.0.113.9"}
    )
    rep = device.read(env, response.data)
    assert rep.fail_info_text == "too many failed challenge attempts; try again later"


def test_cert_poll_returns_the_certificate_of_an_issued_transaction(env: Env) -> None:
    device = Device.new()
    issued = enroll(env, device, transaction_id="poll-1").certificates[0]
    payload = encode_issuer_and_subject(issued.issuer, issued.subject)
    body = device.message(env.ra, payload, kind=MessageType.CERT_POLL, transaction_id="poll-1")
    rep = device.read(env, post(env.client, body).data)
    assert rep.status is PkiStatus.SUCCESS and rep.certificates[0] == issued
    body = device.message(env.ra, payload, kind=MessageType.CERT_POLL, transaction_id="unknown")
    rep = device.read(env, post(env.client, body).data)
    assert (rep.status, rep.fail_info) == (PkiStatus.FAILURE, FailInfo.BAD_CERT_ID)
    # Found in review: another client polling this transactionID got its certificate.
    stranger = Device.new("stranger")
    body = stranger.message(env.ra, payload, kind=MessageType.CERT_POLL, transaction_id="poll-1")
    rep = stranger.read(env, post(env.client, body).data)
    assert (rep.status, rep.fail_info) == (PkiStatus.FAILURE, FailInfo.BAD_CERT_ID)


def test_get_crl_returns_the_cas_current_crl(env: Env) -> None:
    device = Device.new()
    issued = enroll(env, device).certificates[0]
    payload = encode_issuer_and_serial(issued.issuer, issued.serial_number)
    holder = Device(device.key, issued)
    rep = holder.read(
        env, post(env.client, holder.message(env.ra, payload, kind=MessageType.GET_CRL)).data
    )
    assert rep.status is PkiStatus.SUCCESS
    assert rep.crls[0].issuer == issued.issuer


def test_get_next_ca_cert_without_a_rollover_is_a_404(env: Env) -> None:
    assert env.client.get(f"{SCEP}?operation=GetNextCACert").status_code == 404


def test_a_request_for_an_ra_certificate_another_process_issued_is_answered(
    tmp_path: Path,
) -> None:
    config = parse_config(f"data_dir = '{tmp_path / 'data'}'")
    first = Gateway.open(config, bootstrap=True)
    second = Gateway.open(config)
    client_a = create_app(first, "http").test_client()
    ra_a = load_certs_only(client_a.get(f"{SCEP}?operation=GetCACert").data)[0]
    # Both processes made an RA certificate at once: the second's is the newest.
    (connector_b,) = [c for c in second.connectors if isinstance(c, ScepConnector)]
    connector_b.ra._issue(second.core.clock(), connector_b.ra.signer().ca_chain[0])
    ra_b = connector_b.ra.signer(reload=True).certificate
    assert ra_b != ra_a
    challenge = second.core.secrets.get(static_challenge_secret_name("scep"))
    assert challenge is not None
    device = Device.new()
    reply = client_a.post(
        f"{SCEP}?operation=PKIOperation", data=device.message(ra_b, device.csr(challenge))
    )
    # The reply is signed by the RA the device encrypted to: the only one it knows.
    assert parse_cert_rep(reply.data, device.key, [ra_b]).status is PkiStatus.SUCCESS
    # And the process whose newest RA is B answers a device that was given A with A.
    client_b = create_app(second, "http").test_client()
    other = Device.new()
    reply = client_b.post(
        f"{SCEP}?operation=PKIOperation", data=other.message(ra_a, other.csr(challenge))
    )
    with pytest.raises(ScepError, match="signer's certificate is not available"):
        parse_cert_rep(reply.data, other.key, [ra_b])
    assert parse_cert_rep(reply.data, other.key, [ra_a]).status is PkiStatus.SUCCESS
    second.close()
    first.close()


def test_renewal_signed_by_an_expired_certificate_is_refused(env: Env) -> None:
    device = Device.new()
    issued = enroll(env, device).certificates[0]
    issuer = env.gateway.core.issuer
    original = issuer._clock
    issuer._clock = lambda: original() + timedelta(days=400)
    try:
        ra = ca_certs(env.client)[0]  # the first RA certificate has expired too: a new one
        renewing = Device(device.key, issued)
        body = renewing.message(ra, renewing.csr(None), kind=MessageType.RENEWAL_REQ)
        rep = parse_cert_rep(post(env.client, body).data, device.key, [ra])
    finally:
        issuer._clock = original
    assert (rep.status, rep.fail_info) == (PkiStatus.FAILURE, FailInfo.BAD_REQUEST)
    assert rep.fail_info_text == "the signing certificate has expired"


def test_legacy_des3_is_advertised_only_when_configured(tmp_path: Path) -> None:
    config = parse_config(f"""
data_dir = '{tmp_path / "data"}'
[[connectors]]
type = "scep"
name = "cisco"
mount = "/cisco"
[connectors.settings]
legacy_des3 = true
renewal = false
""")
    gateway = Gateway.open(config, bootstrap=True)
    caps = create_app(gateway, "http").test_client().get("/cisco?operation=GetCACaps").text
    assert caps.split("\n") == [
        "POSTPKIOperation",
        "SHA-256",
        "SHA-512",
        "AES",
        "SCEPStandard",
        "DES3",
    ]
    gateway.close()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ("challenge = 'short'", r"settings.challenge: must be a string of at least 8"),
        ("max_failures = 0", r"settings.max_failures: must be a positive integer"),
        ("legacy_des3 = 'yes'", r"settings.legacy_des3: must be true or false"),
        ("chalenge = 'typo-typo'", r"settings.chalenge: unknown setting"),
        ("ca_decrypts = true", r"settings.ca_decrypts: the CA's key is EC_prime256v1"),
    ],
)
def test_bad_settings_stop_the_start(tmp_path: Path, settings: str, message: str) -> None:
    config = parse_config(
        f"data_dir = '{tmp_path / 'data'}'\n[[connectors]]\ntype = 'scep'\nname = 'x'\n"
        f"mount = '/x'\n[connectors.settings]\n{settings}\n"
    )
    with pytest.raises(ConfigError, match=message):
        Gateway.open(config, bootstrap=True)


def test_each_transaction_is_kept_with_its_request_and_evidence(env: Env) -> None:
    device = Device.new()
    issued = enroll(env, device, transaction_id="kept-1").certificates[0]
    with env.gateway.core.store.read() as conn:
        row = scep_store.get_transaction(conn, "scep", "kept-1")
        raw = conn.execute(
            select(schema.scep_transactions.c.csr_der, schema.scep_transactions.c.evidence)
        ).one()
    assert row is not None
    assert (row.status, row.serial) == ("ISSUED", format(issued.serial_number, "x"))
    assert x509.load_der_x509_csr(raw[0]).public_key() == device.key.public_key()
    assert json.loads(raw[1]) == {"challenge": "static", "transaction_id": "kept-1"}


def certificate_count(env: Env) -> int:
    with env.gateway.core.store.read() as conn:
        return int(conn.execute(select(func.count()).select_from(schema.certificates)).scalar_one())


def test_a_process_killed_while_recording_leaves_nothing_and_the_retry_succeeds(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Spending the one-time challenge, storing the certificate and recording the SCEP
    transaction commit together: a failure in the middle (a killed process, here an
    exception where the transaction is recorded) leaves no certificate, no transaction and
    an unspent challenge, so the client's retry of the same request succeeds."""
    created = new_challenge(env)
    device = Device.new()
    payload = device.csr(created["challenge"])
    body = device.message(env.ra, payload, transaction_id="tid-cut")
    before = certificate_count(env)
    original = scep_store.record_transaction

    def killed(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("the process died here")

    monkeypatch.setattr(scep_store, "record_transaction", killed)
    assert post(env.client, body).status_code == 500  # what the client sees of a crash
    assert certificate_count(env) == before
    with env.gateway.core.store.read() as conn:
        assert scep_store.get_transaction(conn, "scep", "tid-cut") is None
        events = conn.execute(
            select(schema.audit_events.c.parameters).where(
                schema.audit_events.c.action == "certificate.issue",
                schema.audit_events.c.result == "failure",
            )
        ).scalars()
        discarded = [json.loads(p) for p in events]
    # The signature that was made is audited as discarded.
    assert any(e.get("error") == "RuntimeError" for e in discarded), discarded
    monkeypatch.setattr(scep_store, "record_transaction", original)
    rep = device.read(env, post(env.client, body).data)
    assert rep.status is PkiStatus.SUCCESS, rep.fail_info_text
    assert certificate_count(env) == before + 1
    with env.gateway.core.store.read() as conn:
        recorded = scep_store.get_transaction(conn, "scep", "tid-cut")
    assert recorded is not None
    assert recorded.serial == format(rep.certificates[0].serial_number, "x")


def test_a_copy_whose_challenge_its_twin_spent_meanwhile_gets_the_twins_answer(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interleaving behind a flaky CI run of the concurrent test below: copy B looked
    the transaction up before copy A recorded it, then found the one-time challenge spent
    (by A). B must get A's certificate, not a refusal that counts as a failed challenge."""
    created = new_challenge(env)
    device = Device.new()
    body = device.message(env.ra, device.csr(created["challenge"]), transaction_id="tid-late")
    first = device.read(env, post(env.client, body).data)
    assert first.status is PkiStatus.SUCCESS
    before = certificate_count(env)
    stale_first_scep_transaction_lookup(monkeypatch)
    second = device.read(env, post(env.client, body).data)
    assert second.status is PkiStatus.SUCCESS, second.fail_info_text
    assert second.certificates[0] == first.certificates[0]
    assert certificate_count(env) == before
    refusals = [
        e
        for e in env.gateway.core.audit.events()
        if e.action == "scep.enroll" and e.result == "failure"
    ]
    assert refusals == []


def test_a_concurrent_retry_of_one_transaction_issues_once(env: Env) -> None:
    """Two copies of one request racing: one certificate is stored and both get it."""
    import threading

    created = new_challenge(env)
    device = Device.new()
    body = device.message(env.ra, device.csr(created["challenge"]), transaction_id="tid-twice")
    before = certificate_count(env)
    replies: list[bytes] = []
    start = threading.Barrier(2)

    def send() -> None:
        client = create_app(env.gateway, "http").test_client()
        start.wait()
        replies.append(post(client, body).data)

    threads = [threading.Thread(target=send) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    reps = [device.read(env, reply) for reply in replies]
    assert [r.status for r in reps] == [PkiStatus.SUCCESS, PkiStatus.SUCCESS]
    assert reps[0].certificates[0] == reps[1].certificates[0]
    assert certificate_count(env) == before + 1
