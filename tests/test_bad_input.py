"""Bad input: a typed error, nothing stored, the refusal in the audit log."""

from __future__ import annotations

import html
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID
from flask.testing import FlaskClient
from helpers import (
    ACTOR,
    BIT_STRING_CN,
    CN_TWICE_IN_ONE_RDN,
    common_name,
    extension_request,
    make_csr,
    name_der,
    raw_csr,
    san_extension,
    with_subject,
)

from pkigate.core import Core, IssuanceRequest, Requester, SigningAlgorithm, Validity
from pkigate.core.der import tlv
from pkigate.core.errors import (
    BadCSRError,
    BadRequestError,
    CANotActiveError,
    InvalidValidityError,
    NotFoundError,
    PkigateError,
    UnknownTemplateError,
    UnsupportedAlgorithmError,
    WeakKeyError,
)
from pkigate.core.model import CAStatus
from pkigate.core.names import parse_dn
from pkigate.devsim.scep_client import (
    certificate_request,
    new_transaction_id,
    self_signed,
)
from pkigate.gateways.app import create_app
from pkigate.gateways.auth import Role
from pkigate.gateways.config import parse_config
from pkigate.gateways.runtime import Gateway
from pkigate.scep.authorization import static_challenge_secret_name
from pkigate.scep.cms import embedded_certificates, load_content_info
from pkigate.scep.messages import (
    CertRep,
    FailInfo,
    MessageType,
    PkiStatus,
    build_pki_message,
    parse_cert_rep,
)


def _weak_rsa_csr(bits: int = 1024, exponent: int = 65537) -> bytes:
    key = rsa.generate_private_key(public_exponent=exponent, key_size=bits)
    return make_csr(key=key)


def _csr_with_broken_signature() -> bytes:
    der = x509.load_pem_x509_csr(make_csr()).public_bytes(serialization.Encoding.DER)
    # Flip a bit inside the signature (the last bytes of the DER).
    return der[:-3] + bytes([der[-3] ^ 0x01]) + der[-2:]


def _csr_with_version(version: int) -> bytes:
    der = x509.load_pem_x509_csr(make_csr()).public_bytes(serialization.Encoding.DER)
    at = der.index(b"\x02\x01\x00")  # the first INTEGER: CertificationRequestInfo's version
    return der[: at + 2] + bytes([version]) + der[at + 3 :]  # cryptography: InvalidVersion


def _csr_on_an_unsupported_curve() -> bytes:
    key = ec.generate_private_key(ec.SECP256K1())
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "k1")]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )


def _csr_with_an_empty_rdn() -> bytes:
    """Subject SEQUENCE { SET {} }: cryptography loads it and verifies the signature, and
    refuses only when the subject is read."""
    return raw_csr(rsa.generate_private_key(65537, 2048), tlv(0x30, tlv(0x31)))


def _csr_with_two_san_extensions() -> bytes:
    san = x509.Extension(
        x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        False,
        x509.SubjectAlternativeName([x509.DNSName("twice.example.test")]),
    )
    # The constructor takes the list as given; add_extension would refuse the duplicate.
    builder = x509.CertificateSigningRequestBuilder(x509.Name([]), [san, san])
    return builder.sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()).public_bytes(
        serialization.Encoding.DER
    )


def _csr_with(
    subject: list[x509.NameAttribute], sans: list[x509.GeneralName] | None = None
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(subject))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()).public_bytes(
        serialization.Encoding.DER
    )


def _cn(value: str) -> x509.NameAttribute:
    return x509.NameAttribute(NameOID.COMMON_NAME, value)


def _oversized_csr() -> bytes:
    sans = [x509.DNSName(f"host-{i:05d}.example.test") for i in range(1500)]
    return make_csr("big.example.test", sans)


CASES: dict[str, tuple[Callable[[], dict[str, object]], type[PkigateError], str]] = {
    "garbage": (
        lambda: {"csr": b"this is not a certificate request"},
        BadCSRError,
        "cannot be parsed",
    ),
    "truncated": (
        lambda: {
            "csr": x509.load_pem_x509_csr(make_csr()).public_bytes(serialization.Encoding.DER)[:-20]
        },
        BadCSRError,
        "cannot be parsed",
    ),
    # PEM loading reads the first block and ignores the rest: which request was meant?
    "two PEM requests": (
        lambda: {"csr": make_csr() + make_csr()},
        BadCSRError,
        "2 PEM blocks",
    ),
    "unknown version": (
        lambda: {"csr": _csr_with_version(1)},
        BadCSRError,
        "cannot be parsed",
    ),
    "empty RDN in the subject": (
        lambda: {"csr": _csr_with_an_empty_rdn()},
        BadCSRError,
        "subject cannot be read",
    ),
    # Found by the fuzzer: cryptography raises TypeError, not ValueError, for these, and
    # each front-end answered 500.
    "a BIT STRING common name": (
        lambda: {"csr": raw_csr(rsa.generate_private_key(65537, 2048), BIT_STRING_CN)},
        BadCSRError,
        "subject cannot be read",
    ),
    "a directoryName subjectAltName with a BIT STRING common name": (
        lambda: {
            "csr": raw_csr(
                rsa.generate_private_key(65537, 2048),
                name_der((common_name(tlv(0x0C, b"x")),)),
                extension_request(san_extension(tlv(0xA4, BIT_STRING_CN))),
            )
        },
        BadCSRError,
        "extensions cannot be read",
    ),
    "an attribute twice in one RDN": (
        lambda: {"csr": raw_csr(rsa.generate_private_key(65537, 2048), CN_TWICE_IN_ONE_RDN)},
        BadCSRError,
        "subject cannot be read",
    ),
    "a GeneralizedTime common name": (
        lambda: {
            "csr": raw_csr(
                rsa.generate_private_key(65537, 2048),
                name_der((common_name(tlv(0x18, b"20260101000000Z")),)),
            )
        },
        BadRequestError,
        "not a string type",
    ),
    "an OCTET STRING common name": (
        lambda: {
            "csr": raw_csr(
                rsa.generate_private_key(65537, 2048), name_der((common_name(tlv(0x04, b"x")),))
            )
        },
        BadRequestError,
        "not a string type",
    ),
    "the same extension twice": (
        lambda: {"csr": _csr_with_two_san_extensions()},
        BadCSRError,
        "extensions cannot be read",
    ),
    "bad signature": (
        lambda: {"csr": _csr_with_broken_signature()},
        BadCSRError,
        "does not verify",
    ),
    "over 32 KB": (lambda: {"csr": _oversized_csr()}, BadCSRError, "at most 32768"),
    # Found in review: each of these was signed (two as invalid DER).
    "non-ASCII domainComponent (IA5String)": (
        lambda: {"csr": _csr_with([x509.NameAttribute(NameOID.DOMAIN_COMPONENT, "é"), _cn("x")])},
        BadRequestError,
        "must be ASCII",
    ),
    "serialNumber outside PrintableString": (
        lambda: {
            "csr": _csr_with(
                [
                    x509.NameAttribute(NameOID.SERIAL_NUMBER, "é1", _type=_ASN1Type.UTF8String),
                    _cn("x"),
                ]
            )
        },
        BadRequestError,
        "letters, digits",
    ),
    "common name over 64 characters": (
        lambda: {
            "csr": raw_csr(
                rsa.generate_private_key(65537, 2048),
                # cryptography refuses to build such a name; other tools make them.
                tlv(0x30, tlv(0x31, tlv(0x30, bytes.fromhex("0603550403"), tlv(0x0C, b"x" * 200)))),
            )
        },
        BadRequestError,
        "RFC 5280 allows 64",
    ),
    "street address of 5000 characters": (
        lambda: {"csr": _csr_with([x509.NameAttribute(NameOID.STREET_ADDRESS, "s" * 5000)])},
        BadRequestError,
        "allows 128",
    ),
    "empty DNS name": (
        lambda: {"csr": _csr_with([_cn("x")], [x509.DNSName("")])},
        BadRequestError,
        "non-empty ASCII",
    ),
    "rsa 1024": (lambda: {"csr": _weak_rsa_csr()}, WeakKeyError, "at least 2048"),
    "rsa exponent 3": (lambda: {"csr": _weak_rsa_csr(2048, 3)}, WeakKeyError, "exponent"),
    "unsupported curve": (
        lambda: {"csr": _csr_on_an_unsupported_curve()},
        WeakKeyError,
        "secp256k1",
    ),
    "validity beyond the CA": (
        lambda: {"validity": Validity.parse("30y")},
        InvalidValidityError,
        "beyond the CA",
    ),
    "signing algorithm of the wrong family": (
        lambda: {"signing_algorithm": SigningAlgorithm.SHA256WITHRSA},
        UnsupportedAlgorithmError,
        "cannot be used with",
    ),
    "unknown template": (
        lambda: {"template": "NoSuchTemplate/V1"},
        UnknownTemplateError,
        "unknown template",
    ),
    "unknown CA": (lambda: {"ca_id": "no-such-ca"}, NotFoundError, "no CA"),
    "idempotency token longer than its column": (
        lambda: {"idempotency_token": "t" * 5000},
        BadRequestError,
        "1 to 128 characters",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request_is_refused_stores_nothing_and_is_audited(
    core: Core, issuing, case: str
) -> None:
    build, error, message = CASES[case]
    fields: dict[str, object] = {
        "ca_id": issuing.record.id,
        "csr": make_csr(),
        "validity": Validity.parse("30d"),
        "requester": Requester("mallory", "test"),
    }
    fields.update(build())
    events_before = len(core.audit.events())
    with pytest.raises(error, match=message):
        core.issue(IssuanceRequest(**fields))  # type: ignore[arg-type]
    with core.store.read() as conn:
        assert core.store.count_certificates(conn) == 1  # only the issuing CA's own cert
    events = core.audit.events()
    assert len(events) == events_before + 1
    refusal = events[-1]
    assert (refusal.action, refusal.result, refusal.actor) == (
        "certificate.issue",
        "failure",
        "mallory",
    )
    assert error.code in refusal.parameters
    assert core.audit.verify().ok


def test_inactive_ca_is_refused_and_audited(core: Core, issuing) -> None:
    core.authorities.update_status(issuing.record.id, CAStatus.DISABLED, ACTOR)
    with pytest.raises(CANotActiveError, match="DISABLED"):
        core.issue(
            IssuanceRequest(
                issuing.record.id, make_csr(), Validity.parse("30d"), Requester("someone")
            )
        )
    assert core.audit.events()[-1].parameters.count("caNotActive") == 1


def test_rsa_modulus_with_close_primes_is_refused() -> None:
    from pkigate.core.policy import check_public_key

    # Two consecutive primes near 2^1024: Fermat's method factors their product at once.
    p = (1 << 1024) + 643
    q = (1 << 1024) + 1081
    key = rsa.RSAPublicNumbers(65537, p * q).public_key()
    with pytest.raises(WeakKeyError, match="Fermat"):
        check_public_key(key)


@pytest.mark.parametrize("rounds", [0, 1, 2, 37, 98, 99, 100, 101, 150, 5000])
def test_the_fermat_check_refuses_the_moduli_its_rounds_factor_and_no_others(rounds: int) -> None:
    """n = a^2 - d^2 with a chosen so that Fermat's method, starting at ceil(sqrt(n)),
    reaches a after about ``rounds`` steps: refused exactly when that is within the
    check's rounds (the check skips most rounds by their residues; none may be skipped
    wrongly)."""
    from pkigate.core.policy import _FERMAT_ROUNDS, _check_fermat

    a = (1 << 1024) + 12345
    d = math.isqrt(2 * a * rounds) + (rounds % 7)  # some d with about that many steps
    n = a * a - d * d
    start = math.isqrt(n) + (0 if math.isqrt(n) ** 2 == n else 1)
    steps = a - start  # the round at which a^2 - n is the square d^2
    assert abs(steps - rounds) <= 1
    if steps < _FERMAT_ROUNDS:
        with pytest.raises(WeakKeyError, match="Fermat"):
            _check_fermat(n)
    else:
        _check_fermat(n)


def test_rsa_modulus_with_a_small_factor_is_refused() -> None:
    from pkigate.core.policy import check_public_key

    n = 3 * ((1 << 2047) + 1)  # divisible by 3, 2049 bits
    with pytest.raises(WeakKeyError, match="small prime factor"):
        check_public_key(rsa.RSAPublicNumbers(65537, n).public_key())


@pytest.mark.parametrize(
    "text",
    ["serialNumber=é1,CN=x", "DC=é,CN=x", "emailAddress=é@x.test,CN=x", "C=ÄÖ,CN=x"],
)
def test_names_that_cannot_be_encoded_are_refused_when_parsed(text: str) -> None:
    """Found in review: `ca create --subject 'serialNumber=é,CN=x'` ended in a ValueError
    traceback, and DC/emailAddress were signed as invalid IA5String DER."""
    with pytest.raises(BadRequestError):
        parse_dn(text)


# -- through each front-end: the protocol's own error, not a 500 ----------------------------------


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    opened = Gateway.open(parse_config(f"data_dir = '{tmp_path / 'data'}'"), bootstrap=True)
    yield opened
    opened.close()


def _issuing_ca(gateway: Gateway) -> str:
    return next(
        c.record.id for c in gateway.core.authorities.list_cas() if c.record.type == "SUBORDINATE"
    )


def _api(gateway: Gateway) -> tuple[FlaskClient, dict[str, str]]:
    secret = gateway.tokens.create("issuer", Role("issuer"), ACTOR).secret
    return create_app(gateway, "https").test_client(), {"Authorization": f"Bearer {secret}"}


def _certificates(gateway: Gateway) -> int:
    with gateway.core.store.read() as conn:
        return gateway.core.store.count_certificates(conn)


def _pem_csr(der: bytes) -> str:
    return x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM).decode()


def test_api_answers_a_csr_with_a_bit_string_common_name_with_bad_csr(gateway: Gateway) -> None:
    client, auth = _api(gateway)
    csr = raw_csr(rsa.generate_private_key(65537, 2048), BIT_STRING_CN)
    before = _certificates(gateway)
    response = client.post(
        f"/api/v1/cas/{_issuing_ca(gateway)}/certificates",
        json={"csr": _pem_csr(csr), "validity": {"type": "DAYS", "value": 10}},
        headers=auth,
    )
    assert response.status_code == 400, response.text
    assert response.get_json()["error"]["code"] == "badCSR"
    assert _certificates(gateway) == before


@pytest.mark.parametrize(
    "number",
    ["1" + "0" * 100_000, "-" + "9" * 5000, "1e999", "-1e999", "NaN", "Infinity"],
    ids=["100001 digits", "5001 digits", "1e999", "-1e999", "NaN", "Infinity"],
)
def test_api_answers_numbers_no_field_can_hold_with_a_json_400(
    gateway: Gateway, number: str
) -> None:
    """Found by the fuzzer: Python's int() refuses over 4,300 digits with a ValueError from
    inside json.loads (a 500); 1e999 reads as infinity."""
    client, auth = _api(gateway)
    body = '{"csr": "x", "validity": {"type": "DAYS", "value": NUMBER}}'.replace("NUMBER", number)
    response = client.post(
        f"/api/v1/cas/{_issuing_ca(gateway)}/certificates",
        data=body,
        headers={**auth, "Content-Type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert response.get_json()["error"]["code"] == "badRequest"
    assert "malformed JSON" in response.get_json()["error"]["message"]


def _scep_device() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(65537, 2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device")])
    return key, self_signed(key, name)


def _scep_reply(gateway: Gateway, body: bytes, key: rsa.RSAPrivateKey) -> CertRep:
    client = create_app(gateway, "http").test_client()
    response = client.post(
        "/scep?operation=PKIOperation",
        data=body,
        headers={"Content-Type": "application/x-pki-message"},
    )
    assert response.status_code == 200, response.text
    return parse_cert_rep(response.data, key, _scep_certificates(gateway))


def _scep_certificates(gateway: Gateway) -> list[x509.Certificate]:
    """GetCACert's certificates, the RA (the recipient of requests) first."""
    client = create_app(gateway, "http").test_client()
    answer = client.get("/scep?operation=GetCACert").data
    return embedded_certificates(load_content_info(answer, "signed_data"))


def _scep_recipient(gateway: Gateway) -> x509.Certificate:
    return _scep_certificates(gateway)[0]


def _challenge(gateway: Gateway) -> str:
    challenge = gateway.core.secrets.get(static_challenge_secret_name("scep"))
    assert challenge is not None
    return challenge


def test_scep_answers_a_signer_certificate_with_an_attribute_twice_in_an_rdn_with_bad_request(
    gateway: Gateway,
) -> None:
    key, good = _scep_device()
    signer = x509.load_der_x509_certificate(with_subject(good, CN_TWICE_IN_ONE_RDN, key))
    csr = certificate_request(key, good.subject, _challenge(gateway))
    body = build_pki_message(
        MessageType.PKCS_REQ, csr, new_transaction_id(), signer, key, _scep_recipient(gateway)
    )
    reply = _scep_reply(gateway, body, key)
    assert (reply.status, reply.fail_info) == (PkiStatus.FAILURE, FailInfo.BAD_REQUEST)
    assert "subject cannot be read" in (reply.fail_info_text or "")


def test_scep_answers_a_request_with_a_bit_string_common_name_with_bad_request(
    gateway: Gateway,
) -> None:
    key, signer = _scep_device()
    challenge = tlv(0x13, _challenge(gateway).encode())
    challenge_attribute = tlv(0x30, bytes.fromhex("06092a864886f70d010907"), tlv(0x31, challenge))
    csr = raw_csr(key, BIT_STRING_CN, challenge_attribute)
    body = build_pki_message(
        MessageType.PKCS_REQ, csr, new_transaction_id(), signer, key, _scep_recipient(gateway)
    )
    before = _certificates(gateway)
    reply = _scep_reply(gateway, body, key)
    assert (reply.status, reply.fail_info) == (PkiStatus.FAILURE, FailInfo.BAD_REQUEST)
    assert "subject cannot be read" in (reply.fail_info_text or "")
    assert _certificates(gateway) == before


def test_a_ca_id_with_a_nul_is_not_found(core: Core) -> None:
    """Found by the fuzzer: GET /crl/<id>.crl with %00 in the id was a 500 on PostgreSQL,
    whose text cannot hold NUL (psycopg DataError)."""
    with pytest.raises(NotFoundError):
        core.authorities.describe("ca\x00id")


def test_api_answers_a_json_string_with_a_nul_with_a_json_400(gateway: Gateway) -> None:
    """No field takes a NUL, and on PostgreSQL a tag value with one was a DataError (500)."""
    secret = gateway.tokens.create("admin", Role("admin"), ACTOR).secret
    client = create_app(gateway, "https").test_client()
    response = client.put(
        f"/api/v1/cas/{_issuing_ca(gateway)}/tags",
        data='{"tags": {"team": "a\\u0000b"}}',
        headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
    )
    assert response.status_code == 400, response.text
    assert "NUL" in response.get_json()["error"]["message"]


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/events?after=99999999999999999999",
        "/console/certificates?after=99999999999999999999",
        "/console/audit?before=99999999999999999999",
    ],
)
def test_a_paging_position_past_what_a_store_holds_is_a_400_naming_it(
    gateway: Gateway, path: str
) -> None:
    """SQLite's driver cannot convert a number over 2**63 - 1 to compare it (OverflowError,
    a 500)."""
    secret = gateway.tokens.create("admin", Role("admin"), ACTOR).secret
    client = create_app(gateway, "https").test_client()
    signin = client.get("/console/signin", base_url="https://localhost")
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', signin.text)
    assert csrf is not None
    client.post(
        "/console/signin",
        data={"token": secret, "csrf_token": csrf.group(1)},
        base_url="https://localhost",
    )
    response = client.get(
        path, headers={"Authorization": f"Bearer {secret}"}, base_url="https://localhost"
    )
    assert response.status_code == 400, response.text
    name = "before" if "before" in path else "after"
    assert f"query parameter '{name}'" in html.unescape(response.text)


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/notifications/a%00b",
        "/api/v1/audit/events?request_id=a%00b",
        "/api/v1/cas?status=ACTIVE&x%00=1",
        "/console/certificates?q=a%00b",
        "/console/audit?actor=a%00b",
    ],
)
def test_a_nul_in_a_management_or_console_url_is_a_400(gateway: Gateway, path: str) -> None:
    """PostgreSQL text cannot hold a NUL: a name or filter carrying one was a DataError
    (a 500) wherever it reached a query."""
    secret = gateway.tokens.create("admin", Role("admin"), ACTOR).secret
    client = create_app(gateway, "https").test_client()
    response = client.get(
        path, headers={"Authorization": f"Bearer {secret}"}, base_url="https://localhost"
    )
    assert response.status_code == 400, response.text
    assert "NUL" in response.text
