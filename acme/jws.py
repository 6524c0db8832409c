"""ACME request signatures (RFC 8555 6.2): JWS parsing and verification, JWKs, thumbprints.

Every ACME POST body is a JWS in the flattened JSON serialization (RFC 7515 7.2.2) whose
protected header names the signing key, either inline (``jwk``, for newAccount and
revokeCert by certificate key) or by account URL (``kid``). This module turns the body into
a :class:`ParsedJWS` or an :class:`AcmeProblem`, checks the signature against a key, and
computes the values the challenges are built from (RFC 7638 thumbprints, key
authorizations). It also verifies external account bindings (RFC 8555 7.3.4).

Deliberately not here: nonce, URL and account checks. :func:`parse_jws` exposes
``nonce``, ``url`` and ``kid``; the HTTP layer checks them against its own state.

Parsing is strict on purpose. A JWS is a security boundary, and every leniency (padding,
duplicate members, unprotected headers, unknown ``crit`` extensions) is a place where two
implementations can read one message two ways.

The client half (:func:`sign`, :func:`sign_eab`) serves the tests and the device simulator.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, TypeAlias

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from pkigate.acme.problems import AcmeProblem

__all__ = [
    "EAB_ALGORITHMS",
    "MAX_JWS_BYTES",
    "SUPPORTED_ALGORITHMS",
    "ParsedJWS",
    "PrivateKey",
    "PublicKey",
    "b64url_decode",
    "b64url_encode",
    "dns01_txt_value",
    "jwk_thumbprint",
    "key_authorization",
    "parse_jws",
    "public_key_from_jwk",
    "public_key_to_jwk",
    "sign",
    "sign_eab",
    "verify",
    "verify_eab",
]

PublicKey: TypeAlias = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | Ed25519PublicKey
PrivateKey: TypeAlias = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | Ed25519PrivateKey

SUPPORTED_ALGORITHMS = ("RS256", "ES256", "ES384", "ES512", "EdDSA")
"""Account-key signature algorithms, in the order advertised in badSignatureAlgorithm."""

EAB_ALGORITHMS: Mapping[str, str] = {"HS256": "sha256", "HS384": "sha384", "HS512": "sha512"}
"""MAC algorithms of an external account binding (RFC 8555 7.3.4), to hashlib names."""

MAX_JWS_BYTES = 64 * 1024
"""The largest request body read. The biggest legitimate one is a finalize with an
8192-bit RSA CSR (about 3 KiB); the bound keeps a client from making us parse megabytes."""

RSA_MIN_BITS = 2048
RSA_MAX_BITS = 8192
"""Account keys below 2048 bits are factorable in practice; above 8192 bits they only make
every request expensive to verify."""

RSA_MAX_EXPONENT_BITS = 256
"""FIPS 186-5 A.1.1 caps e below 2**256; a larger e only buys an attacker slow verifies."""

PRIVATE_JWK_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
"""RSA/EC/OKP private parameters (RFC 7518 6.2.2, 6.3.2) and the symmetric key (6.4.1).
A client that sends one of them has leaked its key; it must not become an account key."""

_FLATTENED_MEMBERS = frozenset({"protected", "payload", "signature"})
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


@dataclass(frozen=True)
class _Curve:
    """One NIST curve as JOSE names it (RFC 7518 3.4, 6.2.1.1)."""

    crv: str
    alg: str
    field_bytes: int
    """Octets of a coordinate, and of each of r and s in a raw ECDSA signature."""
    curve: ec.EllipticCurve
    hash: hashes.HashAlgorithm


_CURVES = (
    _Curve("P-256", "ES256", 32, ec.SECP256R1(), hashes.SHA256()),
    _Curve("P-384", "ES384", 48, ec.SECP384R1(), hashes.SHA384()),
    _Curve("P-521", "ES512", 66, ec.SECP521R1(), hashes.SHA512()),
)
_CURVE_BY_CRV = {c.crv: c for c in _CURVES}
_CURVE_BY_NAME = {c.curve.name: c for c in _CURVES}

ED25519_KEY_BYTES = 32
ED25519_SIGNATURE_BYTES = 64


def _malformed(detail: str) -> NoReturn:
    raise AcmeProblem("malformed", detail)


def _bad_public_key(detail: str) -> NoReturn:
    raise AcmeProblem("badPublicKey", detail)


def _bad_algorithm(detail: str) -> NoReturn:
    # RFC 8555 6.2: the problem document lists the algorithms we do accept.
    raise AcmeProblem(
        "badSignatureAlgorithm", detail, extra={"algorithms": list(SUPPORTED_ALGORITHMS)}
    )


# -- base64url and JSON ------------------------------------------------------------------


def b64url_encode(data: bytes) -> str:
    """base64url without padding, the only encoding JOSE uses (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict base64url (RFC 7515 section 2 and appendix C), else ``malformed``.

    Padding, characters outside the URL-safe alphabet and non-zero unused trailing bits
    are all refused, so every byte string has exactly one accepted spelling: a signature
    or a nonce cannot be replayed under a second encoding.
    """
    return _b64url_decode(text, "value")


def _b64url_decode(text: str, what: str) -> bytes:
    if not _B64URL.fullmatch(text):
        if "=" in text:
            _malformed(f"{what} has base64 padding '=', which JOSE forbids (RFC 7515 2)")
        _malformed(f"{what} is not base64url: only A-Z a-z 0-9 '-' '_' are allowed")
    if len(text) % 4 == 1:
        _malformed(f"{what} is not base64url: its length ({len(text)}) is impossible")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url_encode(data) != text:
        _malformed(f"{what} is not canonical base64url: its unused trailing bits are not 0")
    return data


class _DuplicateMember(Exception):
    """A JSON object names a member twice; parsers disagree on which one wins."""


class _NonStandardNumber(Exception):
    """NaN or Infinity: Python's json reads them, RFC 8259 does not allow them."""


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise _DuplicateMember(name)
        result[name] = value
    return result


def _refuse_constant(name: str) -> Any:
    raise _NonStandardNumber(name)


def _load_json(data: bytes, what: str) -> Any:
    try:
        text = data.decode("utf-8")
        return json.loads(
            text,
            object_pairs_hook=_object_without_duplicates,
            parse_constant=_refuse_constant,
        )
    except _DuplicateMember as exc:
        _malformed(f"{what} names the member {exc.args[0]!r} twice")
    except _NonStandardNumber as exc:
        _malformed(f"{what} contains {exc.args[0]}, which is not JSON (RFC 8259 6)")
    except UnicodeDecodeError:
        _malformed(f"{what} is not UTF-8")
    except RecursionError:
        _malformed(f"{what} is nested too deeply")
    except ValueError as exc:  # json.JSONDecodeError, and integers too long to convert
        _malformed(f"{what} is not valid JSON: {exc}")


def _load_json_object(data: bytes, what: str) -> dict[str, Any]:
    value = _load_json(data, what)
    if not isinstance(value, dict):
        _malformed(f"{what} must be a JSON object, not {type(value).__name__}")
    return value


def _canonical_json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")


# -- parsing -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedJWS:
    """A syntactically valid ACME JWS whose signature has not been checked yet.

    Nothing here is trustworthy until :func:`verify` has passed with the key that ``jwk``
    or ``kid`` designates; the fields are exposed so the caller can find that key and check
    ``nonce`` and ``url`` (RFC 8555 6.4, 6.5), which this module does not.
    """

    protected: Mapping[str, Any]
    """The decoded protected header."""
    protected_b64: str
    """The protected header as sent; the signature covers these characters, not a
    re-serialization of ``protected``."""
    payload_b64: str
    """The payload as sent; empty for POST-as-GET (RFC 8555 6.3)."""
    payload: bytes
    """The decoded payload (empty for POST-as-GET)."""
    signature: bytes
    """The decoded signature: raw r||s for ES*, as JOSE specifies (RFC 7518 3.4)."""
    alg: str
    """One of :data:`SUPPORTED_ALGORITHMS`."""
    nonce: str | None
    """The anti-replay nonce, for the caller to redeem (RFC 8555 6.5)."""
    url: str | None
    """The URL the client meant to reach, for the caller to compare (RFC 8555 6.4)."""
    kid: str | None
    """The account URL, when the request is signed by an existing account."""
    jwk: Mapping[str, Any] | None
    """The inline public key (newAccount, revokeCert with the certificate key); not yet
    validated, see :func:`public_key_from_jwk`."""

    @property
    def is_post_as_get(self) -> bool:
        """RFC 8555 6.3: an empty payload (not ``{}``) asks for a resource's state."""
        return self.payload_b64 == ""

    def json_payload(self) -> dict[str, Any]:
        """The payload as a JSON object, as every ACME POST that is not a GET carries."""
        if self.is_post_as_get:
            _malformed("a JSON payload was expected, but the request is a POST-as-GET")
        return _load_json_object(self.payload, "JWS payload")

    def signing_input(self) -> bytes:
        """The octets the signature covers (RFC 7515 5.1 step 8)."""
        return f"{self.protected_b64}.{self.payload_b64}".encode("ascii")


def _flattened_members(document: object, what: str) -> tuple[str, str, str]:
    """The three members of a flattened JWS, refusing every other serialization.

    RFC 8555 6.2 allows only the flattened form with everything in the protected header:
    an unprotected ``header`` is unauthenticated data, and ``signatures`` (the general
    form) could carry several signers with different keys.
    """
    if not isinstance(document, Mapping):
        _malformed(f"{what} must be a JSON object")
    if "signatures" in document:
        _malformed(f"{what} uses the general JWS serialization; ACME requires the flattened one")
    if "header" in document:
        _malformed(f"{what} has an unprotected 'header'; ACME allows only 'protected'")
    missing = sorted(_FLATTENED_MEMBERS - document.keys())
    if missing:
        _malformed(f"{what} lacks {', '.join(repr(m) for m in missing)}")
    extra = sorted(str(m) for m in document.keys() - _FLATTENED_MEMBERS)
    if extra:
        _malformed(f"{what} has unexpected members {', '.join(repr(m) for m in extra)}")
    values = []
    for name in ("protected", "payload", "signature"):
        value = document[name]
        if not isinstance(value, str):
            _malformed(f"{what} member {name!r} must be a string")
        values.append(value)
    return values[0], values[1], values[2]


def _decode_protected_header(protected_b64: str, what: str) -> dict[str, Any]:
    if not protected_b64:
        _malformed(f"{what} has an empty protected header")
    header = _load_json_object(
        _b64url_decode(protected_b64, f"{what} protected header"), f"{what} protected header"
    )
    # RFC 7515 4.1.11: a recipient must refuse a "crit" extension it does not understand,
    # and we understand none.
    if "crit" in header:
        _malformed(f"{what} protected header has 'crit'; no JWS extensions are supported")
    # RFC 7797: "b64": false signs the payload unencoded, which would change what the
    # signature covers. Only the default is accepted.
    if "b64" in header and header["b64"] is not True:
        _malformed(f"{what} protected header has 'b64' other than true (RFC 7797)")
    return header


def _optional_string(header: Mapping[str, Any], name: str) -> str | None:
    value = header.get(name)
    if value is not None and not isinstance(value, str):
        _malformed(f"JWS protected header {name!r} must be a string")
    return value


def _check_algorithm(header: Mapping[str, Any]) -> str:
    if "alg" not in header:
        _malformed("JWS protected header has no 'alg'")
    alg = header["alg"]
    if not isinstance(alg, str):
        _malformed("JWS protected header 'alg' must be a string")
    if alg in SUPPORTED_ALGORITHMS:
        return alg
    if alg.lower() == "none":
        _bad_algorithm("unsigned JWS (alg 'none') is not accepted (RFC 8555 6.2)")
    if alg.startswith("HS"):
        _bad_algorithm(
            f"MAC algorithm {alg!r} is only for external account binding; "
            "requests must be signed with an account key (RFC 8555 6.2)"
        )
    _bad_algorithm(f"signature algorithm {alg!r} is not supported")


def parse_jws(body: bytes) -> ParsedJWS:
    """Parse an ACME request body (RFC 8555 6.2), without checking its signature."""
    if len(body) > MAX_JWS_BYTES:
        _malformed(f"request body is larger than {MAX_JWS_BYTES} bytes")
    document = _load_json(body, "request body")
    protected_b64, payload_b64, signature_b64 = _flattened_members(document, "JWS")
    header = _decode_protected_header(protected_b64, "JWS")
    alg = _check_algorithm(header)

    # RFC 8555 6.2: "jwk" and "kid" are mutually exclusive, and one of them names the key.
    has_jwk, has_kid = "jwk" in header, "kid" in header
    if has_jwk == has_kid:
        _malformed("JWS protected header must carry exactly one of 'jwk' and 'kid'")
    jwk = header.get("jwk")
    if has_jwk and not isinstance(jwk, dict):
        _malformed("JWS protected header 'jwk' must be a JSON object")
    kid = _optional_string(header, "kid")
    if has_kid and not kid:
        _malformed("JWS protected header 'kid' must be a non-empty string")

    signature = _b64url_decode(signature_b64, "JWS signature")
    if not signature:
        _malformed("JWS signature is empty")
    return ParsedJWS(
        protected=header,
        protected_b64=protected_b64,
        payload_b64=payload_b64,
        payload=_b64url_decode(payload_b64, "JWS payload"),
        signature=signature,
        alg=alg,
        nonce=_optional_string(header, "nonce"),
        url=_optional_string(header, "url"),
        kid=kid,
        jwk=jwk,
    )


# -- keys --------------------------------------------------------------------------------


def _jwk_member(jwk: Mapping[str, Any], name: str) -> bytes:
    value = jwk.get(name)
    if not isinstance(value, str):
        _malformed(f"JWK {jwk.get('kty')!r} key lacks the string member {name!r}")
    return _b64url_decode(value, f"JWK member {name!r}")


def _jwk_uint(jwk: Mapping[str, Any], name: str) -> int:
    # RFC 7518 2 (Base64urlUInt): the minimum number of octets, so one integer has one
    # spelling and one thumbprint.
    octets = _jwk_member(jwk, name)
    if not octets:
        _bad_public_key(f"JWK member {name!r} is empty")
    if octets[0] == 0:
        _bad_public_key(f"JWK member {name!r} has a leading zero octet (RFC 7518 6.3.1)")
    return int.from_bytes(octets, "big")


def _rsa_from_jwk(jwk: Mapping[str, Any]) -> rsa.RSAPublicKey:
    n = _jwk_uint(jwk, "n")
    e = _jwk_uint(jwk, "e")
    if not RSA_MIN_BITS <= n.bit_length() <= RSA_MAX_BITS:
        _bad_public_key(
            f"RSA key is {n.bit_length()} bits; {RSA_MIN_BITS} to {RSA_MAX_BITS} are accepted"
        )
    if n % 2 == 0:
        _bad_public_key("RSA modulus is even")
    if e < 3 or e % 2 == 0 or e.bit_length() > RSA_MAX_EXPONENT_BITS:
        _bad_public_key(f"RSA public exponent must be odd, at least 3 and below 2**256, not {e}")
    try:
        return rsa.RSAPublicNumbers(e, n).public_key()
    except ValueError as exc:
        _bad_public_key(f"RSA key is invalid: {exc}")


def _ec_from_jwk(jwk: Mapping[str, Any]) -> ec.EllipticCurvePublicKey:
    crv = jwk.get("crv")
    spec = _CURVE_BY_CRV.get(crv) if isinstance(crv, str) else None
    if spec is None:
        _bad_public_key(f"EC curve {crv!r} is not supported; use P-256, P-384 or P-521")
    x, y = _jwk_member(jwk, "x"), _jwk_member(jwk, "y")
    # RFC 7518 6.2.1.2: coordinates are always the full field length, zeros included.
    if len(x) != spec.field_bytes or len(y) != spec.field_bytes:
        _bad_public_key(f"{spec.crv} coordinates must be {spec.field_bytes} octets each")
    try:
        # OpenSSL refuses a point that is not on the curve: an invalid-curve attack starts
        # with one.
        return ec.EllipticCurvePublicKey.from_encoded_point(spec.curve, b"\x04" + x + y)
    except ValueError:
        _bad_public_key(f"the point is not on curve {spec.crv}")


def _okp_from_jwk(jwk: Mapping[str, Any]) -> Ed25519PublicKey:
    crv = jwk.get("crv")
    if crv != "Ed25519":
        _bad_public_key(f"OKP curve {crv!r} is not supported; use Ed25519")
    x = _jwk_member(jwk, "x")
    if len(x) != ED25519_KEY_BYTES:
        _bad_public_key(f"Ed25519 key must be {ED25519_KEY_BYTES} octets")
    try:
        return Ed25519PublicKey.from_public_bytes(x)
    except ValueError as exc:
        _bad_public_key(f"Ed25519 key is invalid: {exc}")


def public_key_from_jwk(jwk: Mapping[str, Any]) -> PublicKey:
    """The account key a JWK describes, refused (``badPublicKey``) unless fit for ACME."""
    if not isinstance(jwk, Mapping):
        _malformed("JWK must be a JSON object")
    leaked = [m for m in PRIVATE_JWK_MEMBERS if m in jwk]
    if leaked:
        _bad_public_key(f"JWK carries private key material ({', '.join(leaked)})")
    kty = jwk.get("kty")
    if kty == "RSA":
        return _rsa_from_jwk(jwk)
    if kty == "EC":
        return _ec_from_jwk(jwk)
    if kty == "OKP":
        return _okp_from_jwk(jwk)
    if kty == "oct":
        _bad_public_key("a symmetric key (kty 'oct') cannot sign ACME requests")
    _bad_public_key(f"key type {kty!r} is not supported; use RSA, EC or OKP")


def _curve_of(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) -> _Curve:
    spec = _CURVE_BY_NAME.get(key.curve.name)
    if spec is None:
        _bad_public_key(f"EC curve {key.curve.name} is not supported")
    return spec


def _uint_b64(value: int) -> str:
    return b64url_encode(value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def public_key_to_jwk(key: PublicKey) -> dict[str, str]:
    """The JWK of a public key with its required members only (the RFC 7638 input)."""
    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        return {"e": _uint_b64(numbers.e), "kty": "RSA", "n": _uint_b64(numbers.n)}
    if isinstance(key, ec.EllipticCurvePublicKey):
        spec = _curve_of(key)
        point = key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        x, y = point[1 : 1 + spec.field_bytes], point[1 + spec.field_bytes :]
        return {"crv": spec.crv, "kty": "EC", "x": b64url_encode(x), "y": b64url_encode(y)}
    if isinstance(key, Ed25519PublicKey):
        raw = key.public_bytes_raw()
        return {"crv": "Ed25519", "kty": "OKP", "x": b64url_encode(raw)}
    _bad_public_key(f"key type {type(key).__name__} is not supported")


def jwk_thumbprint(jwk_or_key: Mapping[str, Any] | PublicKey) -> str:
    """The RFC 7638 SHA-256 thumbprint, base64url: the account's name in challenges.

    A JWK is parsed into a key first, so only a valid account key has a thumbprint and the
    optional members ("alg", "kid", "use") a client adds never change it.
    """
    key = public_key_from_jwk(jwk_or_key) if isinstance(jwk_or_key, Mapping) else jwk_or_key
    return b64url_encode(hashlib.sha256(_canonical_json(public_key_to_jwk(key))).digest())


def key_authorization(token: str, thumbprint: str) -> str:
    """RFC 8555 8.1: what an http-01 response body carries, and dns-01 hashes."""
    return f"{token}.{thumbprint}"


def dns01_txt_value(key_authorization: str) -> str:
    """RFC 8555 8.4: the _acme-challenge TXT record, base64url(SHA-256(keyAuthorization))."""
    return b64url_encode(hashlib.sha256(key_authorization.encode("utf-8")).digest())


# -- verification ------------------------------------------------------------------------


def _algorithm_for_key(key: PublicKey | PrivateKey) -> str:
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return _curve_of(key).alg
    if isinstance(key, Ed25519PublicKey | Ed25519PrivateKey):
        return "EdDSA"
    _bad_public_key(f"key type {type(key).__name__} is not supported")


def verify(parsed: ParsedJWS, key: PublicKey) -> None:
    """Check the JWS signature with ``key``; return quietly or raise.

    The key decides the algorithm and ``alg`` must agree (RFC 8555 6.2): letting the header
    pick the verification algorithm is how "alg confusion" attacks work.
    """
    expected = _algorithm_for_key(key)
    if parsed.alg != expected:
        _bad_algorithm(f"JWS alg {parsed.alg!r} does not fit the key, which signs {expected}")
    data, signature = parsed.signing_input(), parsed.signature
    try:
        if isinstance(key, rsa.RSAPublicKey):
            modulus_bytes = (key.key_size + 7) // 8
            if len(signature) != modulus_bytes:
                _malformed(f"RS256 signature must be {modulus_bytes} octets, not {len(signature)}")
            key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ec.EllipticCurvePublicKey):
            spec = _curve_of(key)
            # RFC 7518 3.4: JOSE sends r||s, each the field length; a DER signature (a
            # common client bug) has a different length and is named as such.
            if len(signature) != 2 * spec.field_bytes:
                _malformed(
                    f"{spec.alg} signature must be {2 * spec.field_bytes} octets (raw r||s, "
                    f"RFC 7518 3.4), not {len(signature)}"
                )
            r = int.from_bytes(signature[: spec.field_bytes], "big")
            s = int.from_bytes(signature[spec.field_bytes :], "big")
            key.verify(encode_dss_signature(r, s), data, ec.ECDSA(spec.hash))
        else:
            if len(signature) != ED25519_SIGNATURE_BYTES:
                _malformed(
                    f"EdDSA signature must be {ED25519_SIGNATURE_BYTES} octets, "
                    f"not {len(signature)}"
                )
            key.verify(signature, data)
    except InvalidSignature:
        # RFC 8555 6.2 answers a bad signature with "malformed".
        _malformed("JWS signature is invalid")


def verify_eab(
    eab: Mapping[str, Any],
    *,
    outer_jwk: Mapping[str, Any],
    url: str,
    lookup: Callable[[str], bytes | None],
) -> str:
    """Check an externalAccountBinding (RFC 8555 7.3.4); return the EAB key id.

    The binding is a JWS MACed with a key the CA operator handed out, over the account key
    being registered: it proves the holder of that MAC key asked for *this* account key at
    *this* server. ``lookup`` maps a key id to its MAC key, or None when unknown.
    """
    protected_b64, payload_b64, signature_b64 = _flattened_members(eab, "externalAccountBinding")
    header = _decode_protected_header(protected_b64, "externalAccountBinding")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in EAB_ALGORITHMS:
        _malformed(f"externalAccountBinding alg must be HS256, HS384 or HS512, not {alg!r}")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        _malformed("externalAccountBinding protected header needs a string 'kid'")
    binding_url = header.get("url")
    if not isinstance(binding_url, str):
        _malformed("externalAccountBinding protected header needs a string 'url'")
    # RFC 8555 7.3.4: the binding is not a request of its own, so it carries no nonce, and
    # the key it binds is its payload, not a header.
    for forbidden in ("nonce", "jwk"):
        if forbidden in header:
            _malformed(f"externalAccountBinding must not carry {forbidden!r}")
    bound_jwk = _load_json_object(
        _b64url_decode(payload_b64, "externalAccountBinding payload"),
        "externalAccountBinding payload",
    )
    mac = _b64url_decode(signature_b64, "externalAccountBinding signature")

    # An empty MAC key would let anyone compute the MAC; treat it as no key at all.
    mac_key = lookup(kid)
    if not mac_key:
        raise AcmeProblem("unauthorized", f"external account key {kid!r} is not known")
    expected = hmac.new(
        mac_key, f"{protected_b64}.{payload_b64}".encode("ascii"), EAB_ALGORITHMS[alg]
    ).digest()
    if not hmac.compare_digest(expected, mac):
        raise AcmeProblem("unauthorized", "externalAccountBinding MAC is invalid")
    # Checked after the MAC so an unauthenticated caller learns nothing from them. A
    # binding made for another server or another account key must not be replayable.
    if binding_url != url:
        raise AcmeProblem("unauthorized", "externalAccountBinding 'url' is not this newAccount URL")
    if bound_jwk != dict(outer_jwk):
        raise AcmeProblem(
            "unauthorized", "externalAccountBinding binds a different key than the account's"
        )
    return kid


# -- client side (tests, device simulator) -------------------------------------------------


def sign(key_private: PrivateKey, protected: Mapping[str, Any], payload: bytes | None) -> bytes:
    """A flattened JWS body, as an ACME client sends it.

    ``alg`` defaults to the key's own algorithm; an ``alg`` in ``protected`` overrides the
    header only (the signature still uses the key's algorithm), which is how tests build a
    mismatch. ``payload`` None gives a POST-as-GET.
    """
    header = {"alg": _algorithm_for_key(key_private), **protected}
    protected_b64 = b64url_encode(json.dumps(header, separators=(",", ":")).encode("utf-8"))
    payload_b64 = "" if payload is None else b64url_encode(payload)
    data = f"{protected_b64}.{payload_b64}".encode("ascii")
    if isinstance(key_private, rsa.RSAPrivateKey):
        signature = key_private.sign(data, padding.PKCS1v15(), hashes.SHA256())
    elif isinstance(key_private, ec.EllipticCurvePrivateKey):
        spec = _curve_of(key_private)
        r, s = decode_dss_signature(key_private.sign(data, ec.ECDSA(spec.hash)))
        signature = r.to_bytes(spec.field_bytes, "big") + s.to_bytes(spec.field_bytes, "big")
    else:
        signature = key_private.sign(data)
    body = {
        "protected": protected_b64,
        "payload": payload_b64,
        "signature": b64url_encode(signature),
    }
    return json.dumps(body).encode("utf-8")


def sign_eab(
    hmac_key: bytes,
    kid: str,
    url: str,
    account_jwk: Mapping[str, Any],
    alg: str = "HS256",
) -> dict[str, str]:
    """An externalAccountBinding object for a newAccount payload (RFC 8555 7.3.4)."""
    if alg not in EAB_ALGORITHMS:
        _malformed(f"externalAccountBinding alg must be HS256, HS384 or HS512, not {alg!r}")
    header = {"alg": alg, "kid": kid, "url": url}
    protected_b64 = b64url_encode(json.dumps(header, separators=(",", ":")).encode("utf-8"))
    payload_b64 = b64url_encode(json.dumps(dict(account_jwk)).encode("utf-8"))
    mac = hmac.new(
        hmac_key, f"{protected_b64}.{payload_b64}".encode("ascii"), EAB_ALGORITHMS[alg]
    ).digest()
    return {"protected": protected_b64, "payload": payload_b64, "signature": b64url_encode(mac)}
