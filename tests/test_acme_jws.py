"""ACME JWS (RFC 8555 6.2, RFC 7515/7518/7638): parsing, verification, thumbprints, EAB.

Every refusal is checked by its ACME problem type, since that is what a client sees.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pkigate.acme.jws import (
    MAX_JWS_BYTES,
    SUPPORTED_ALGORITHMS,
    ParsedJWS,
    PrivateKey,
    b64url_decode,
    b64url_encode,
    dns01_txt_value,
    jwk_thumbprint,
    key_authorization,
    parse_jws,
    public_key_from_jwk,
    public_key_to_jwk,
    sign,
    sign_eab,
    verify,
    verify_eab,
)
from pkigate.acme.problems import AcmeProblem

NEW_ACCOUNT_URL = "https://ca.example/acme/new-account"
ORDER_URL = "https://ca.example/acme/order/1"
ACCOUNT_URL = "https://ca.example/acme/acct/1"
NONCE = "oFvnlFP1wIhRlYS2jTaXbA"
EAB_KID = "eab-key-1"
EAB_KEY = bytes(range(32))

# RFC 7638 section 3.1: the example RSA key and its published SHA-256 thumbprint.
RFC7638_JWK = {
    "kty": "RSA",
    "n": (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_B"
        "JECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_"
        "FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI"
        "4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    ),
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


@pytest.fixture(scope="module")
def keys() -> dict[str, PrivateKey]:
    """One account key per algorithm; RSA generation is the slow part, so done once."""
    return {
        "RS256": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ES256": ec.generate_private_key(ec.SECP256R1()),
        "ES384": ec.generate_private_key(ec.SECP384R1()),
        "ES512": ec.generate_private_key(ec.SECP521R1()),
        "EdDSA": Ed25519PrivateKey.generate(),
    }


@pytest.fixture(scope="module")
def es256(keys: dict[str, PrivateKey]) -> ec.EllipticCurvePrivateKey:
    key = keys["ES256"]
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def jwk_of(key: PrivateKey) -> dict[str, str]:
    return public_key_to_jwk(key.public_key())


def new_account_body(
    key: PrivateKey, payload: dict[str, Any] | None = None, **header: Any
) -> bytes:
    protected = {"nonce": NONCE, "url": NEW_ACCOUNT_URL, "jwk": jwk_of(key), **header}
    return sign(key, protected, json.dumps(payload or {"termsOfServiceAgreed": True}).encode())


def raw_body(
    protected: dict[str, Any] | str, payload: str = "e30", signature: str = "AAAA"
) -> bytes:
    """A flattened JWS with a hand-made header (a dict is encoded, a str used as is)."""
    if isinstance(protected, dict):
        protected = b64url_encode(json.dumps(protected).encode())
    return json.dumps({"protected": protected, "payload": payload, "signature": signature}).encode()


def problem_type(action: Callable[[], object]) -> str:
    with pytest.raises(AcmeProblem) as caught:
        action()
    return caught.value.type


def parse_and_verify(body: bytes) -> ParsedJWS:
    parsed = parse_jws(body)
    assert parsed.jwk is not None
    verify(parsed, public_key_from_jwk(parsed.jwk))
    return parsed


def reencode(body: bytes, **members: str) -> bytes:
    document = json.loads(body)
    document.update(members)
    return json.dumps(document).encode()


# -- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("alg", SUPPORTED_ALGORITHMS)
def test_every_supported_algorithm_signs_and_verifies(
    keys: dict[str, PrivateKey], alg: str
) -> None:
    parsed = parse_and_verify(new_account_body(keys[alg], {"contact": ["mailto:a@example.org"]}))

    assert parsed.alg == alg
    assert parsed.nonce == NONCE
    assert parsed.url == NEW_ACCOUNT_URL
    assert parsed.kid is None
    assert parsed.jwk == jwk_of(keys[alg])
    assert parsed.json_payload() == {"contact": ["mailto:a@example.org"]}
    assert not parsed.is_post_as_get


@pytest.mark.parametrize("alg", SUPPORTED_ALGORITHMS)
def test_public_key_survives_a_jwk_round_trip(keys: dict[str, PrivateKey], alg: str) -> None:
    public = keys[alg].public_key()
    jwk = public_key_to_jwk(public)

    assert public_key_to_jwk(public_key_from_jwk(jwk)) == jwk
    assert jwk_thumbprint(jwk) == jwk_thumbprint(public)


def test_kid_signed_post_as_get_exposes_its_fields(keys: dict[str, PrivateKey]) -> None:
    key = keys["ES384"]
    body = sign(key, {"nonce": NONCE, "url": ORDER_URL, "kid": ACCOUNT_URL}, None)

    parsed = parse_jws(body)
    verify(parsed, key.public_key())

    assert parsed.is_post_as_get
    assert parsed.payload == b""
    assert parsed.kid == ACCOUNT_URL
    assert parsed.jwk is None
    assert parsed.protected == {
        "alg": "ES384",
        "nonce": NONCE,
        "url": ORDER_URL,
        "kid": ACCOUNT_URL,
    }
    assert parsed.signing_input() == f"{parsed.protected_b64}.".encode()


def test_post_as_get_has_no_json_payload(es256: ec.EllipticCurvePrivateKey) -> None:
    parsed = parse_jws(sign(es256, {"kid": ACCOUNT_URL}, None))

    with pytest.raises(AcmeProblem) as caught:
        parsed.json_payload()
    assert caught.value.type == "malformed"
    assert "payload was expected" in caught.value.detail


def test_payload_that_is_not_a_json_object_is_malformed(es256: ec.EllipticCurvePrivateKey) -> None:
    parsed = parse_jws(sign(es256, {"kid": ACCOUNT_URL}, b'["not", "an", "object"]'))

    assert problem_type(parsed.json_payload) == "malformed"


def test_payload_with_a_duplicate_member_is_malformed(es256: ec.EllipticCurvePrivateKey) -> None:
    parsed = parse_jws(sign(es256, {"kid": ACCOUNT_URL}, b'{"csr": "a", "csr": "b"}'))

    assert problem_type(parsed.json_payload) == "malformed"


# -- signatures --------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", SUPPORTED_ALGORITHMS)
def test_tampered_payload_is_an_invalid_signature(keys: dict[str, PrivateKey], alg: str) -> None:
    body = new_account_body(keys[alg])
    tampered = reencode(body, payload=b64url_encode(b'{"termsOfServiceAgreed":false}'))
    parsed = parse_jws(tampered)

    with pytest.raises(AcmeProblem) as caught:
        verify(parsed, keys[alg].public_key())
    assert caught.value.type == "malformed"
    assert caught.value.detail == "JWS signature is invalid"


def test_tampered_protected_header_is_an_invalid_signature(keys: dict[str, PrivateKey]) -> None:
    key = keys["RS256"]
    parsed = parse_jws(new_account_body(key))
    header = {**parsed.protected, "url": "https://attacker.example/acme/new-account"}
    tampered = reencode(new_account_body(key), protected=b64url_encode(json.dumps(header).encode()))

    with pytest.raises(AcmeProblem) as caught:
        verify(parse_jws(tampered), key.public_key())
    assert caught.value.type == "malformed"
    assert caught.value.detail == "JWS signature is invalid"


def test_signature_by_another_key_is_invalid(keys: dict[str, PrivateKey]) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    parsed = parse_jws(new_account_body(other))

    assert problem_type(lambda: verify(parsed, keys["ES256"].public_key())) == "malformed"


def test_der_encoded_ecdsa_signature_has_the_wrong_length(
    es256: ec.EllipticCurvePrivateKey,
) -> None:
    body = new_account_body(es256)
    parsed = parse_jws(body)
    der = es256.sign(parsed.signing_input(), ec.ECDSA(hashes.SHA256()))
    parsed = parse_jws(reencode(body, signature=b64url_encode(der)))

    with pytest.raises(AcmeProblem) as caught:
        verify(parsed, es256.public_key())
    assert caught.value.type == "malformed"
    assert "64 octets" in caught.value.detail


@pytest.mark.parametrize("alg", ["RS256", "EdDSA"])
def test_truncated_signature_is_malformed(keys: dict[str, PrivateKey], alg: str) -> None:
    body = new_account_body(keys[alg])
    signature = b64url_decode(json.loads(body)["signature"])
    parsed = parse_jws(reencode(body, signature=b64url_encode(signature[:-1])))

    assert problem_type(lambda: verify(parsed, keys[alg].public_key())) == "malformed"


@pytest.mark.parametrize(
    ("key_alg", "header_alg"),
    [("ES256", "ES384"), ("ES256", "RS256"), ("RS256", "ES256"), ("EdDSA", "ES256")],
)
def test_alg_that_does_not_fit_the_key_is_refused(
    keys: dict[str, PrivateKey], key_alg: str, header_alg: str
) -> None:
    parsed = parse_jws(new_account_body(keys[key_alg], alg=header_alg))

    with pytest.raises(AcmeProblem) as caught:
        verify(parsed, keys[key_alg].public_key())
    assert caught.value.type == "badSignatureAlgorithm"
    assert caught.value.extra == {"algorithms": list(SUPPORTED_ALGORITHMS)}


@pytest.mark.parametrize("alg", ["none", "HS256", "PS256", "ES256K"])
def test_unsupported_outer_alg_lists_the_supported_ones(alg: str) -> None:
    body = raw_body({"alg": alg, "kid": ACCOUNT_URL, "nonce": NONCE, "url": ORDER_URL})

    with pytest.raises(AcmeProblem) as caught:
        parse_jws(body)
    assert caught.value.type == "badSignatureAlgorithm"
    assert caught.value.to_json()["algorithms"] == list(SUPPORTED_ALGORITHMS)


# -- structure -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "ES256", "kid": ACCOUNT_URL, "jwk": {"kty": "EC"}},
        {"alg": "ES256"},
        {"alg": "ES256", "kid": 7},
        {"alg": "ES256", "jwk": "not an object"},
        {"alg": "ES256", "kid": ACCOUNT_URL, "nonce": 1},
        {"alg": "ES256", "kid": ACCOUNT_URL, "url": ["x"]},
        {"kid": ACCOUNT_URL},
        {"alg": "ES256", "kid": ACCOUNT_URL, "crit": ["exp"], "exp": 1},
        {"alg": "ES256", "kid": ACCOUNT_URL, "b64": False},
    ],
    ids=[
        "jwk-and-kid",
        "neither-jwk-nor-kid",
        "kid-not-a-string",
        "jwk-not-an-object",
        "nonce-not-a-string",
        "url-not-a-string",
        "no-alg",
        "crit",
        "b64-false",
    ],
)
def test_bad_protected_header_is_malformed(header: dict[str, Any]) -> None:
    assert problem_type(lambda: parse_jws(raw_body(header))) == "malformed"


@pytest.mark.parametrize(
    "body",
    [
        b'{"protected": "e30", "protected": "e30", "payload": "", "signature": "AAAA"}',
        b"\xff\xfe not UTF-8",
        b"not JSON",
        b'["protected", "payload", "signature"]',
        b'{"protected": "e30", "payload": "", "signature": NaN}',
        b'{"protected": "e30", "payload": ""}',
        b'{"protected": "e30", "payload": 5, "signature": "AAAA"}',
        b"[" * 50_000,
    ],
    ids=[
        "duplicate-member",
        "not-utf8",
        "not-json",
        "not-an-object",
        "nan",
        "no-signature",
        "payload-not-a-string",
        "deep-nesting",
    ],
)
def test_unreadable_body_is_malformed(body: bytes) -> None:
    assert problem_type(lambda: parse_jws(body)) == "malformed"


def test_duplicate_member_in_protected_header_is_malformed() -> None:
    protected = b64url_encode(b'{"alg":"ES256","kid":"a","kid":"b"}')

    assert problem_type(lambda: parse_jws(raw_body(protected))) == "malformed"


@pytest.mark.parametrize(
    "extra",
    [
        {"header": {"kid": ACCOUNT_URL}},
        {"signatures": []},
        {"unexpected": "x"},
    ],
    ids=["unprotected-header", "general-serialization", "extra-member"],
)
def test_members_beyond_the_flattened_serialization_are_malformed(
    es256: ec.EllipticCurvePrivateKey, extra: dict[str, Any]
) -> None:
    document = json.loads(sign(es256, {"kid": ACCOUNT_URL}, b"{}"))
    document.update(extra)

    assert problem_type(lambda: parse_jws(json.dumps(document).encode())) == "malformed"


def test_oversize_body_is_malformed_before_it_is_parsed() -> None:
    body = b" " * (MAX_JWS_BYTES + 1)

    with pytest.raises(AcmeProblem) as caught:
        parse_jws(body)
    assert caught.value.type == "malformed"
    assert str(MAX_JWS_BYTES) in caught.value.detail


@pytest.mark.parametrize("member", ["protected", "payload", "signature"])
def test_padded_base64url_is_malformed(es256: ec.EllipticCurvePrivateKey, member: str) -> None:
    body = sign(es256, {"kid": ACCOUNT_URL}, b'{"a":1}')
    value = json.loads(body)[member]
    padded = value + "=" * (-len(value) % 4 or 4)

    assert problem_type(lambda: parse_jws(reencode(body, **{member: padded}))) == "malformed"


@pytest.mark.parametrize(
    "text",
    ["ab+/", "ab c", "abc=", "a", "ab\n", "AB", "AAB", "ab\u00e9"],
    ids=[
        "standard-alphabet",
        "space",
        "padding",
        "impossible-length",
        "newline",
        "nonzero-trailing-bits-1",
        "nonzero-trailing-bits-2",
        "non-ascii",
    ],
)
def test_strict_base64url_decoding_refuses(text: str) -> None:
    assert problem_type(lambda: b64url_decode(text)) == "malformed"


@pytest.mark.parametrize("data", [b"", b"\x00", b"\xfb\xff", b"\xff\xfe\xfd", bytes(range(256))])
def test_base64url_round_trips_without_padding(data: bytes) -> None:
    encoded = b64url_encode(data)

    assert "=" not in encoded
    assert "+" not in encoded and "/" not in encoded
    assert b64url_decode(encoded) == data


# -- account keys --------------------------------------------------------------------------------


@pytest.mark.parametrize("member", ["d", "p", "q", "dp", "dq", "qi", "oth", "k"])
def test_jwk_with_private_members_is_refused(keys: dict[str, PrivateKey], member: str) -> None:
    jwk = {**jwk_of(keys["RS256"]), member: "AQAB"}

    assert problem_type(lambda: public_key_from_jwk(jwk)) == "badPublicKey"


def test_symmetric_jwk_is_refused() -> None:
    assert problem_type(lambda: public_key_from_jwk({"kty": "oct"})) == "badPublicKey"


@pytest.mark.parametrize(
    "jwk",
    [
        {"kty": "DSA"},
        {"kty": "EC", "crv": "secp256k1", "x": "AA", "y": "AA"},
        {"kty": "OKP", "crv": "Ed448", "x": "AA"},
        {"kty": "OKP", "crv": "X25519", "x": b64url_encode(bytes(32))},
        {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(bytes(31))},
    ],
    ids=["dsa", "secp256k1", "ed448", "x25519", "ed25519-short"],
)
def test_unsupported_key_is_refused(jwk: dict[str, str]) -> None:
    assert problem_type(lambda: public_key_from_jwk(jwk)) == "badPublicKey"


def test_rsa_1024_key_is_refused() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505

    with pytest.raises(AcmeProblem) as caught:
        public_key_from_jwk(public_key_to_jwk(weak.public_key()))
    assert caught.value.type == "badPublicKey"
    assert "1024" in caught.value.detail


def test_rsa_modulus_with_a_leading_zero_octet_is_refused(keys: dict[str, PrivateKey]) -> None:
    jwk = jwk_of(keys["RS256"])
    jwk["n"] = b64url_encode(b"\x00" + b64url_decode(jwk["n"]))

    assert problem_type(lambda: public_key_from_jwk(jwk)) == "badPublicKey"


@pytest.mark.parametrize("exponent", [1, 4, 65536, 2**256 + 1])
def test_rsa_exponent_must_be_odd_and_sane(keys: dict[str, PrivateKey], exponent: int) -> None:
    jwk = jwk_of(keys["RS256"])
    jwk["e"] = b64url_encode(exponent.to_bytes((exponent.bit_length() + 7) // 8, "big"))

    assert problem_type(lambda: public_key_from_jwk(jwk)) == "badPublicKey"


def test_jwk_missing_a_member_is_malformed(keys: dict[str, PrivateKey]) -> None:
    jwk = jwk_of(keys["ES256"])
    del jwk["y"]

    assert problem_type(lambda: public_key_from_jwk(jwk)) == "malformed"


def test_ec_point_not_on_the_curve_is_refused(es256: ec.EllipticCurvePrivateKey) -> None:
    jwk = jwk_of(es256)
    y = bytearray(b64url_decode(jwk["y"]))
    y[-1] ^= 1
    jwk["y"] = b64url_encode(bytes(y))

    with pytest.raises(AcmeProblem) as caught:
        public_key_from_jwk(jwk)
    assert caught.value.type == "badPublicKey"
    assert "not on curve" in caught.value.detail


def test_ec_coordinate_of_the_wrong_length_is_refused(es256: ec.EllipticCurvePrivateKey) -> None:
    jwk = jwk_of(es256)
    jwk["x"] = b64url_encode(b"\x00" + b64url_decode(jwk["x"]))

    assert problem_type(lambda: public_key_from_jwk(jwk)) == "badPublicKey"


def test_ec_coordinates_keep_their_leading_zero_octets() -> None:
    """RFC 7518 6.2.1.2: x is the full field length even when its integer is smaller."""
    key = next(
        k
        for k in (ec.derive_private_key(i, ec.SECP256R1()) for i in range(1, 5000))
        if k.public_key().public_numbers().x < 2**248
    )
    jwk = public_key_to_jwk(key.public_key())

    assert b64url_decode(jwk["x"])[0] == 0
    assert len(b64url_decode(jwk["x"])) == 32
    parse_and_verify(new_account_body(key))


# -- thumbprints and challenge values ----------------------------------------------------------


def test_thumbprint_of_the_rfc7638_example_key() -> None:
    assert jwk_thumbprint(RFC7638_JWK) == RFC7638_THUMBPRINT
    assert jwk_thumbprint(public_key_from_jwk(RFC7638_JWK)) == RFC7638_THUMBPRINT


def test_thumbprint_follows_the_rfc7638_definition(keys: dict[str, PrivateKey]) -> None:
    key = keys["ES384"]
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    numbers = key.public_key().public_numbers()
    x = base64.urlsafe_b64encode(numbers.x.to_bytes(48, "big")).decode().rstrip("=")
    y = base64.urlsafe_b64encode(numbers.y.to_bytes(48, "big")).decode().rstrip("=")
    canonical = f'{{"crv":"P-384","kty":"EC","x":"{x}","y":"{y}"}}'
    expected = base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest())

    shuffled = {"y": y, "use": "sig", "x": x, "kty": "EC", "crv": "P-384"}
    assert jwk_thumbprint(shuffled) == expected.decode().rstrip("=")


def test_key_authorization_and_dns01_value() -> None:
    token = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
    authorization = key_authorization(token, RFC7638_THUMBPRINT)
    digest = hashlib.sha256(authorization.encode()).digest()

    assert authorization == f"{token}.{RFC7638_THUMBPRINT}"
    assert dns01_txt_value(authorization) == base64.urlsafe_b64encode(digest).decode().rstrip("=")


# -- external account binding ------------------------------------------------------------------


def check_eab(eab: Any, outer_jwk: dict[str, str], url: str = NEW_ACCOUNT_URL) -> str:
    return verify_eab(eab, outer_jwk=outer_jwk, url=url, lookup={EAB_KID: EAB_KEY}.get)


@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
def test_eab_binding_the_account_key_is_accepted(
    es256: ec.EllipticCurvePrivateKey, alg: str
) -> None:
    jwk = jwk_of(es256)
    body = new_account_body(
        es256,
        {
            "termsOfServiceAgreed": True,
            "externalAccountBinding": sign_eab(EAB_KEY, EAB_KID, NEW_ACCOUNT_URL, jwk, alg),
        },
    )
    parsed = parse_and_verify(body)
    assert parsed.jwk is not None

    assert check_eab(parsed.json_payload()["externalAccountBinding"], dict(parsed.jwk)) == EAB_KID


def test_eab_is_independent_of_the_member_order_of_the_key(
    es256: ec.EllipticCurvePrivateKey,
) -> None:
    jwk = jwk_of(es256)
    reordered = dict(reversed(list(jwk.items())))

    assert check_eab(sign_eab(EAB_KEY, EAB_KID, NEW_ACCOUNT_URL, reordered), jwk) == EAB_KID


def test_eab_with_the_wrong_mac_key_is_unauthorized(es256: ec.EllipticCurvePrivateKey) -> None:
    jwk = jwk_of(es256)
    eab = sign_eab(b"not the issued key", EAB_KID, NEW_ACCOUNT_URL, jwk)

    assert problem_type(lambda: check_eab(eab, jwk)) == "unauthorized"


def test_eab_for_another_url_is_unauthorized(es256: ec.EllipticCurvePrivateKey) -> None:
    jwk = jwk_of(es256)
    eab = sign_eab(EAB_KEY, EAB_KID, "https://other-ca.example/acme/new-account", jwk)

    assert problem_type(lambda: check_eab(eab, jwk)) == "unauthorized"


def test_eab_for_another_account_key_is_unauthorized(keys: dict[str, PrivateKey]) -> None:
    eab = sign_eab(EAB_KEY, EAB_KID, NEW_ACCOUNT_URL, jwk_of(keys["ES384"]))

    assert problem_type(lambda: check_eab(eab, jwk_of(keys["ES256"]))) == "unauthorized"


def test_eab_with_an_unknown_key_id_is_unauthorized(es256: ec.EllipticCurvePrivateKey) -> None:
    jwk = jwk_of(es256)
    eab = sign_eab(EAB_KEY, "never-issued", NEW_ACCOUNT_URL, jwk)

    assert problem_type(lambda: check_eab(eab, jwk)) == "unauthorized"


def hand_made_eab(header: dict[str, Any], jwk: dict[str, str]) -> dict[str, str]:
    """An EAB with an arbitrary header, correctly MACed, so only the header is at fault."""
    protected = b64url_encode(json.dumps(header).encode())
    payload = b64url_encode(json.dumps(jwk).encode())
    mac = hmac.new(EAB_KEY, f"{protected}.{payload}".encode(), "sha256").digest()
    return {"protected": protected, "payload": payload, "signature": b64url_encode(mac)}


@pytest.mark.parametrize(
    "extra",
    [
        {"nonce": NONCE},
        {"jwk": {"kty": "EC"}},
        {"alg": "RS256"},
        {"alg": "none"},
        {"kid": 5},
        {"url": None},
        {"crit": ["b64"]},
    ],
    ids=["nonce", "jwk", "rs256", "alg-none", "kid-not-a-string", "no-url", "crit"],
)
def test_eab_with_a_bad_header_is_malformed(
    es256: ec.EllipticCurvePrivateKey, extra: dict[str, Any]
) -> None:
    jwk = jwk_of(es256)
    header = {"alg": "HS256", "kid": EAB_KID, "url": NEW_ACCOUNT_URL, **extra}
    eab = hand_made_eab({k: v for k, v in header.items() if v is not None}, jwk)

    assert problem_type(lambda: check_eab(eab, jwk)) == "malformed"


@pytest.mark.parametrize(
    "eab",
    [
        "a string",
        {"protected": "e30", "payload": "e30"},
        {"protected": "e30", "payload": "e30", "signature": "AAAA", "header": {}},
    ],
    ids=["not-an-object", "no-signature", "unprotected-header"],
)
def test_eab_that_is_not_a_flattened_jws_is_malformed(
    es256: ec.EllipticCurvePrivateKey, eab: Any
) -> None:
    assert problem_type(lambda: check_eab(eab, jwk_of(es256))) == "malformed"


def test_eab_payload_that_is_not_a_jwk_object_is_malformed(
    es256: ec.EllipticCurvePrivateKey,
) -> None:
    eab = hand_made_eab({"alg": "HS256", "kid": EAB_KID, "url": NEW_ACCOUNT_URL}, jwk_of(es256))
    eab["payload"] = b64url_encode(b'"just a string"')

    assert problem_type(lambda: check_eab(eab, jwk_of(es256))) == "malformed"
