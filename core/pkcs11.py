"""CA keys generated on, and used through, a PKCS#11 token (an HSM; SoftHSM2 in tests).

The binding is python-pkcs11 rather than PyKCS11: it ships cp311 manylinux wheels (nothing
to compile on the host), generates EC keys from named-curve domain parameters with a
template of CKA_ attributes, finds objects by label and id in one call, raises one Python
exception class per CKR_ code (so a wrong PIN, a removed token and a closed session are
told apart without comparing numbers), and releases the GIL around every C call.

What the store keeps for such a key is a *reference* (:data:`REFERENCE_MAGIC` and JSON:
the token's label, the object's CKA_LABEL and CKA_ID, and the public key, which is public),
never key material. Private keys are generated with CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE
true and CKA_EXTRACTABLE false: nothing, this program included, can read them back.

One session per process, opened on first use and logged in once; a process never uses
a session it inherited across ``fork`` (``pkigate serve`` opens the token only in the
process that execs into the arbiter, and each worker opens its own after the fork). Calls
on the session are serialised by a lock, since greenlets and threads of one worker share
it. A token that goes away (removed, its library failing) is reconnected once per call;
if that fails too the call raises :class:`TokenUnavailableError`, which the front-ends
answer as 503 and ``/readyz`` reports.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar, cast

import pkcs11
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11

from pkigate.core.blocking import run_blocking
from pkigate.core.errors import BadRequestError, InvalidCertificateError, KeyBackendError
from pkigate.core.keys import TOKEN_REFERENCE_MAGIC as REFERENCE_MAGIC
from pkigate.core.model import KeyAlgorithm
from pkigate.core.pkcs11_settings import Pkcs11Settings, TokenUnavailableError
from pkigate.core.signing import CAPublicKey, HashAlgorithm, verify

LABEL_MAX = 64

_T = TypeVar("_T")


def _openssl_error_queue_clearer() -> Callable[[], None]:
    """``ERR_clear_error`` of the libcrypto that Python's ``ssl`` module uses.

    A PKCS#11 module built on OpenSSL may leave errors on the calling thread's OpenSSL
    error queue: SoftHSM2's C_Initialize leaves "DSO: could not load the shared library"
    there (it looks for the rdrand and gost engines, which OpenSSL 3 lacks). OpenSSL's
    SSL_get_error answers SSL_ERROR_SSL while any error is queued, so the next TLS read
    on that thread that would merely block (every read in a gevent worker is
    non-blocking) raised that stale error as an SSLError on an unrelated connection, and
    the request was lost. Neither ``ssl`` nor python-pkcs11 exposes the queue, hence
    ctypes. (cryptography links its own OpenSSL, whose queue is not this one.)"""
    import _ssl

    try:
        library = ctypes.CDLL(getattr(_ssl, "__file__", None))  # None: _ssl is built in
        clear = library.ERR_clear_error
    except (OSError, AttributeError):  # no OpenSSL symbols to reach: nothing to clear
        return lambda: None
    clear.restype, clear.argtypes = None, []
    return cast(Callable[[], None], clear)


_forget_openssl_errors = _openssl_error_queue_clearer()


def _then_forget_openssl_errors(call: Callable[[], _T]) -> _T:
    """``call()`` (PKCS#11 calls), then the calling thread's OpenSSL error queue cleared."""
    try:
        return call()
    finally:
        _forget_openssl_errors()


_CURVE_OIDS = {
    KeyAlgorithm.EC_prime256v1: "secp256r1",
    KeyAlgorithm.EC_secp384r1: "secp384r1",
    KeyAlgorithm.EC_secp521r1: "secp521r1",
}
_RSA_MECHANISMS = {
    "sha256": Mechanism.SHA256_RSA_PKCS,
    "sha384": Mechanism.SHA384_RSA_PKCS,
    "sha512": Mechanism.SHA512_RSA_PKCS,
}
# The private half: on the token, behind the login, and never readable.
_PRIVATE_TEMPLATE = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.SIGN: True,
    Attribute.DECRYPT: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
}
_PUBLIC_TEMPLATE = {
    Attribute.TOKEN: True,
    Attribute.VERIFY: True,
    Attribute.ENCRYPT: False,
    Attribute.WRAP: False,
}


class _KeyNotFound(p11.PKCS11Error):
    """A CA key missing from the session's view of the token: looked for once more on a
    new session (a token put back is seen only by one), then reported."""


# Errors after which the session (or an object handle) is gone and a new one may work:
# the token was pulled and put back, the library restarted. Anything else is reported as
# it is.
_RECONNECT_AFTER = (
    p11.DeviceRemoved,
    p11.DeviceError,
    p11.TokenNotPresent,
    p11.TokenNotRecognised,
    p11.SessionClosed,
    p11.SessionHandleInvalid,
    p11.ObjectHandleInvalid,
    p11.KeyHandleInvalid,
    p11.UserNotLoggedIn,
    p11.SlotIDInvalid,
    p11.GeneralError,
    _KeyNotFound,
)


@dataclass(frozen=True)
class TokenReference:
    """Where a CA key is on the token: what the store keeps instead of the key."""

    token_label: str
    label: str
    id: bytes
    public_key_der: bytes

    def to_blob(self) -> bytes:
        document = {
            "token": self.token_label,
            "label": self.label,
            "id": self.id.hex(),
            "public_key": base64.b64encode(self.public_key_der).decode(),
        }
        return REFERENCE_MAGIC + json.dumps(document, sort_keys=True).encode()

    @classmethod
    def from_blob(cls, blob: bytes) -> TokenReference:
        document = json.loads(blob[len(REFERENCE_MAGIC) :])
        return cls(
            document["token"],
            document["label"],
            bytes.fromhex(document["id"]),
            base64.b64decode(document["public_key"]),
        )

    def to_json(self) -> dict[str, str]:
        return {"token_label": self.token_label, "label": self.label, "id": self.id.hex()}

    def public_key(self) -> CAPublicKey:
        key = serialization.load_der_public_key(self.public_key_der)
        assert isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
        return key


class TokenKey:
    """A CA key on the token: signs what it is handed (see :mod:`pkigate.core.signing`)."""

    def __init__(self, backend: Pkcs11Backend, reference: TokenReference) -> None:
        self._backend = backend
        self.reference = reference
        self._public_key = reference.public_key()

    def public_key(self) -> CAPublicKey:
        return self._public_key

    def sign(self, data: bytes, hash_algorithm: HashAlgorithm) -> bytes:
        return self._backend.sign(self.reference, data, hash_algorithm)

    def check(self) -> None:
        """Whether the key can be used now (``/readyz``)."""
        self._backend.check_key(self.reference)


class Pkcs11Backend:
    """CA keys on the configured token."""

    def __init__(self, settings: Pkcs11Settings) -> None:
        self.settings = settings
        self._session: Any = None
        self._keys: dict[bytes, Any] = {}  # CKA_ID -> private key object, per session
        self._lock = threading.Lock()
        self._lost = False  # the last session failed: initialise the library afresh
        self._forked = False  # the library was initialised by the parent process
        os.register_at_fork(after_in_child=self._drop_after_fork)

    def _drop_after_fork(self) -> None:
        # The parent's session is not this process's to use (PKCS#11 2.40 6.7.7).
        self._lock = threading.Lock()
        self._session = None
        self._keys = {}
        self._forked = True

    # -- the session -----------------------------------------------------------------------

    def _open(self, reinitialize: bool) -> Any:
        """A logged-in session. ``reinitialize`` after the token went away: the library
        is finalised and initialised again, since a library may keep no longer valid
        slots until then (SoftHSM does)."""
        settings = self.settings
        if not settings.module.exists():
            raise TokenUnavailableError(f"the PKCS#11 module {settings.module} does not exist")
        try:
            library = pkcs11.lib(str(settings.module))
            # After a fork the library was initialised by the parent: this process
            # initialises its own.
            if self._forked or reinitialize:
                library.reinitialize()
                self._forked = False
            token = library.get_token(token_label=settings.token_label)
            return token.open(rw=True, user_pin=settings.pin())
        except p11.NoSuchToken:
            raise TokenUnavailableError(
                f"no PKCS#11 token labelled {settings.token_label!r} in {settings.module}"
            ) from None
        except p11.PinIncorrect:
            raise TokenUnavailableError(
                f"the PIN of PKCS#11 token {settings.token_label!r} is wrong"
            ) from None
        except p11.PinLocked:
            raise TokenUnavailableError(
                f"the PIN of PKCS#11 token {settings.token_label!r} is locked"
            ) from None
        except p11.PKCS11Error as exc:
            raise TokenUnavailableError(
                f"cannot open PKCS#11 token {settings.token_label!r}: {_describe(exc)}"
            ) from None

    def _use(self, operation: Callable[[Any], _T]) -> _T:
        """``operation`` on this process's session, under the lock; one reconnect if the
        token went away meanwhile."""
        with self._lock:
            for attempt in (1, 2):
                if self._session is None:
                    reinitialize = self._lost or attempt == 2
                    self._lost = True  # until this open succeeds
                    self._session = _then_forget_openssl_errors(partial(self._open, reinitialize))
                    self._lost = False
                    self._keys = {}
                try:
                    # Under the lock (one operation at a time on the session), in a thread
                    # of its own in a gevent worker (core/blocking.py).
                    return run_blocking(
                        partial(_then_forget_openssl_errors, partial(operation, self._session))
                    )
                except _RECONNECT_AFTER as exc:
                    self._session = None
                    self._lost = True
                    if attempt == 2 and isinstance(exc, _KeyNotFound):
                        raise TokenUnavailableError(str(exc)) from None
                    if attempt == 2:
                        raise TokenUnavailableError(
                            f"PKCS#11 token {self.settings.token_label!r} is unavailable: "
                            f"{_describe(exc)}"
                        ) from None
                except p11.PKCS11Error as exc:
                    raise KeyBackendError(
                        f"PKCS#11 token {self.settings.token_label!r}: {_describe(exc)}"
                    ) from None
        raise AssertionError("unreachable")

    def check(self) -> None:
        """Open (or keep) the session: raises TokenUnavailableError saying why not."""
        self._use(lambda session: None)

    def check_key(self, reference: TokenReference) -> None:
        """The key is on the token now (looked up afresh): TokenUnavailableError if not."""

        def find(session: Any) -> None:
            self._keys.pop(reference.id, None)
            self._key(session, reference)

        self._use(find)

    def close(self) -> None:
        with self._lock:
            if self._session is not None:
                with contextlib.suppress(p11.PKCS11Error):  # a token gone: nothing to close
                    _then_forget_openssl_errors(self._session.close)
                self._session = None
                self._keys = {}

    # -- keys ------------------------------------------------------------------------------

    def generate(self, key_id: str, algorithm: KeyAlgorithm, label: str) -> bytes:
        token_id = bytes.fromhex(key_id) if _is_hex(key_id) else key_id.encode()
        label = label[:LABEL_MAX]

        def generate(session: Any) -> TokenReference:
            if algorithm.family == "RSA":
                public, _ = session.generate_keypair(
                    KeyType.RSA,
                    int(algorithm.value[4:]),
                    id=token_id,
                    label=label,
                    store=True,
                    public_template=_PUBLIC_TEMPLATE,
                    private_template=_PRIVATE_TEMPLATE,
                )
            else:
                parameters = session.create_domain_parameters(
                    KeyType.EC,
                    {
                        Attribute.EC_PARAMS: pkcs11.util.ec.encode_named_curve_parameters(
                            _CURVE_OIDS[algorithm]
                        )
                    },
                    local=True,
                )
                public, _ = parameters.generate_keypair(
                    id=token_id,
                    label=label,
                    store=True,
                    public_template=_PUBLIC_TEMPLATE,
                    private_template=_PRIVATE_TEMPLATE,
                )
            return TokenReference(
                self.settings.token_label, label, token_id, _public_key_der(public)
            )

        return self._use(generate).to_blob()

    def adopt(
        self, certificate: x509.Certificate, label: str | None, token_id: bytes | None
    ) -> bytes:
        """The reference to a private key already on the token (found by CKA_LABEL or
        CKA_ID) that belongs to ``certificate``: proven by a signature the certificate's
        public key verifies, since a public key object may be absent or mislabelled."""
        if not label and not token_id:
            raise BadRequestError("name the token key by its label or its id")
        public_key = certificate.public_key()
        if not isinstance(public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise InvalidCertificateError("the certificate's key is neither RSA nor EC")
        challenge = os.urandom(32)
        hash_algorithm = hashes.SHA256()

        def find_and_sign(session: Any) -> tuple[str, bytes, bytes]:
            try:
                key = session.get_key(ObjectClass.PRIVATE_KEY, label=label, id=token_id)
            except p11.NoSuchKey:
                raise BadRequestError(
                    f"no private key with {_named(label, token_id)} on token "
                    f"{self.settings.token_label!r}"
                ) from None
            except p11.MultipleObjectsReturned:
                raise BadRequestError(
                    f"several private keys with {_named(label, token_id)}: name it by its id"
                ) from None
            return (
                str(key.label or ""),
                bytes(key.id or b""),
                _sign_with(key, public_key, challenge, hash_algorithm),
            )

        found_label, found_id, signed = self._use(find_and_sign)
        try:
            verify(public_key, signed, challenge, hash_algorithm)
        except Exception:
            raise InvalidCertificateError(
                "the token key does not belong to the certificate's public key"
            ) from None
        if not found_id:
            raise BadRequestError("the token key has no CKA_ID; give it one to use it here")
        der = public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return TokenReference(self.settings.token_label, found_label, found_id, der).to_blob()

    def load(self, key_id: str, blob: bytes) -> TokenKey:
        reference = TokenReference.from_blob(blob)
        if reference.token_label != self.settings.token_label:
            raise TokenUnavailableError(
                f"key {key_id} is on PKCS#11 token {reference.token_label!r}, not on the "
                f"configured {self.settings.token_label!r}"
            )
        return TokenKey(self, reference)

    def sign(self, reference: TokenReference, data: bytes, hash_algorithm: HashAlgorithm) -> bytes:
        public_key = reference.public_key()

        def sign(session: Any) -> bytes:
            return _sign_with(self._key(session, reference), public_key, data, hash_algorithm)

        return self._use(sign)

    def _key(self, session: Any, reference: TokenReference) -> Any:
        """The private key object (found once per session)."""
        key = self._keys.get(reference.id)
        if key is None:
            try:
                key = session.get_key(ObjectClass.PRIVATE_KEY, id=reference.id)
            except p11.NoSuchKey:
                raise _KeyNotFound(
                    f"the CA key {reference.label!r} (id {reference.id.hex()}) is not on "
                    f"PKCS#11 token {reference.token_label!r}"
                ) from None
            self._keys[reference.id] = key
        return key

    def destroy(self, blob: bytes) -> TokenReference:
        """Destroy the key pair's objects on the token (gone already: nothing to do)."""
        reference = TokenReference.from_blob(blob)

        def destroy(session: Any) -> None:
            for found in list(session.get_objects({Attribute.ID: reference.id})):
                found.destroy()
            self._keys.pop(reference.id, None)

        self._use(destroy)
        return reference


def _sign_with(key: Any, public_key: Any, data: bytes, hash_algorithm: HashAlgorithm) -> bytes:
    """PKCS#1 v1.5 for RSA; for EC the digest is made here and signed with plain CKM_ECDSA
    (every token has it; the hashing variants are optional), then DER-encoded."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return bytes(key.sign(data, mechanism=_RSA_MECHANISMS[hash_algorithm.name]))
    digest = hashes.Hash(hash_algorithm)
    digest.update(data)
    raw = key.sign(digest.finalize(), mechanism=Mechanism.ECDSA)
    return pkcs11.util.ec.encode_ecdsa_signature(raw)


def _public_key_der(public: Any) -> bytes:
    if public.key_type == KeyType.RSA:
        numbers = rsa.RSAPublicNumbers(
            int.from_bytes(public[Attribute.PUBLIC_EXPONENT], "big"),
            int.from_bytes(public[Attribute.MODULUS], "big"),
        )
        key: Any = numbers.public_key()
        return key.public_bytes(  # type: ignore[no-any-return]
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return pkcs11.util.ec.encode_ec_public_key(public)


def _describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


def _named(label: str | None, token_id: bytes | None) -> str:
    parts = [f"label {label!r}"] if label else []
    if token_id:
        parts.append(f"id {token_id.hex()}")
    return " and ".join(parts)


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return bool(text) and len(text) % 2 == 0
