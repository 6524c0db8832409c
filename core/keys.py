"""CA private keys: generation, encryption at rest, and routing to the backend that holds them.

CA keys never leave a key backend in clear. The software backend keeps each key as
PKCS#8 DER sealed with AES-256-GCM under a key-encryption key (KEK) the operator controls:
``PKIGATE_KEK`` in the environment (32 bytes, base64 or hex), a systemd credential
``pkigate-kek`` (``LoadCredential=``, read from ``$CREDENTIALS_DIRECTORY``), or a 0600 file
``kek`` in the data directory, created on first use. The sealed blob is what the store
keeps; the key id is bound into the ciphertext as associated data so a blob cannot be
swapped between CAs.

A CA's key may instead be generated on a PKCS#11 token (:mod:`pkigate.core.pkcs11`),
chosen per CA (:class:`KeyStorage`); the store then keeps a reference to it. Keys of the
connectors (SCEP RA, OCSP responders) are always software keys. :class:`KeyBackends`
routes each key to the backend that holds it.

:class:`Sealer` is the one sealed-blob format (magic, KEK id, nonce, AES-GCM with the
blob's name as associated data) for CA keys here and for the store's shared secrets.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import hmac
import os
import secrets
import stat
import threading
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pkigate.core.errors import BadRequestError, KeyBackendError
from pkigate.core.model import CAPrivateKey, KeyAlgorithm
from pkigate.core.signing import CASigningKey

if TYPE_CHECKING:
    from cryptography import x509

    from pkigate.core.pkcs11 import Pkcs11Backend, TokenReference

KEK_ENV = "PKIGATE_KEK"
KEK_FILE = "kek"
KEK_CREDENTIAL = "pkigate-kek"
CREDENTIALS_DIRECTORY_ENV = "CREDENTIALS_DIRECTORY"
_KEK_ID_LEN = 8
_NONCE_LEN = 12
# What a token key's reference in the store starts with (pkigate.core.pkcs11), known here
# without importing the PKCS#11 binding where no token is configured.
TOKEN_REFERENCE_MAGIC = b"PKCS11:"


class KeyEncryptionKey:
    """The operator's 256-bit key-encryption key and the subkeys derived from it."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) != 32:
            raise KeyBackendError("the key-encryption key must be exactly 32 bytes")
        self._secret = secret
        self.key_id = hashlib.sha256(b"pkigate-kek-id" + secret).digest()[:_KEK_ID_LEN]

    def derive(self, purpose: bytes) -> bytes:
        """A 32-byte subkey for one purpose (AES-GCM sealing, the audit chain MAC)."""
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(
            self._secret
        )

    @classmethod
    def from_text(cls, text: str) -> KeyEncryptionKey:
        text = text.strip()
        for decode in (bytes.fromhex, base64.b64decode):
            try:
                raw = decode(text)
            except (ValueError, binascii.Error):
                continue
            if len(raw) == 32:
                return cls(raw)
        raise KeyBackendError(f"{KEK_ENV} must be 32 bytes as 64 hex digits or base64")

    @classmethod
    def load_or_create(cls, data_dir: Path, create: bool = True) -> KeyEncryptionKey:
        """The KEK from the environment, else from the service's systemd credential, else
        from ``data_dir/kek`` (created 0600 if absent and ``create``)."""
        if os.environ.get(KEK_ENV):
            return cls.from_text(os.environ[KEK_ENV])
        credentials = os.environ.get(CREDENTIALS_DIRECTORY_ENV)
        credential = Path(credentials) / KEK_CREDENTIAL if credentials else None
        if credential is not None and credential.is_file():
            # systemd made it readable by this service only, in a directory of its own.
            try:
                return cls.from_text(credential.read_text())
            except KeyBackendError:
                raise KeyBackendError(
                    f"the credential {credential} must hold 32 bytes as 64 hex digits or base64"
                ) from None
        path = data_dir / KEK_FILE
        if not path.exists() and not create:
            raise KeyBackendError(
                f"{path} is missing but the store holds keys sealed under it: restore the "
                f"file or set {KEK_ENV}"
            )
        if not path.exists():
            # Write a complete file under a temporary name, then link it into place: a
            # process starting at the same moment either wins the link or reads ours whole.
            temporary = data_dir / f".{KEK_FILE}.{os.getpid()}.{secrets.token_hex(4)}"
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "w") as handle:
                    handle.write(secrets.token_bytes(32).hex() + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                with contextlib.suppress(FileExistsError):  # another process won: use its key
                    os.link(temporary, path)
            finally:
                temporary.unlink(missing_ok=True)
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise KeyBackendError(f"{path} is readable by others (mode {mode:o}); chmod 600 it")
        try:
            return cls.from_text(path.read_text())
        except KeyBackendError:
            raise KeyBackendError(f"{path} must hold 32 bytes as 64 hex digits or base64") from None


class Sealer:
    """AES-256-GCM under one subkey of the KEK: ``magic``, the KEK's id, a nonce, then
    the ciphertext, with ``aad_prefix`` + the blob's name as associated data (a blob
    cannot be moved to another name)."""

    def __init__(self, kek: KeyEncryptionKey, purpose: bytes, magic: bytes, aad_prefix: bytes):
        self._kek = kek
        self._aead = AESGCM(kek.derive(purpose))
        self.magic = magic
        self._aad_prefix = aad_prefix

    def seal(self, name: str, plain: bytes) -> bytes:
        nonce = os.urandom(_NONCE_LEN)
        sealed = self._aead.encrypt(nonce, plain, self._aad_prefix + name.encode("utf-8"))
        return self.magic + self._kek.key_id + nonce + sealed

    def sealed_kek_id(self, blob: bytes) -> bytes | None:
        """The id of the KEK ``blob`` was sealed under; None if it is not such a blob."""
        if not blob.startswith(self.magic):
            return None
        return blob[len(self.magic) : len(self.magic) + _KEK_ID_LEN]

    def kek_matches(self, blob: bytes) -> bool:
        kek_id = self.sealed_kek_id(blob)
        return kek_id is not None and hmac.compare_digest(kek_id, self._kek.key_id)

    def unseal(self, name: str, blob: bytes, what: str) -> bytes:
        """The plaintext; KeyBackendError naming ``what`` if another KEK sealed it or
        it was altered."""
        kek_id = self.sealed_kek_id(blob)
        if kek_id is None or not hmac.compare_digest(kek_id, self._kek.key_id):
            mine = self._kek.key_id.hex()
            found = f" ({kek_id.hex()}, this process has {mine})" if kek_id else ""
            raise KeyBackendError(f"{what} was sealed under another key-encryption key{found}")
        nonce_at = len(self.magic) + _KEK_ID_LEN
        nonce = blob[nonce_at : nonce_at + _NONCE_LEN]
        try:
            return self._aead.decrypt(
                nonce, blob[nonce_at + _NONCE_LEN :], self._aad_prefix + name.encode("utf-8")
            )
        except InvalidTag:
            raise KeyBackendError(f"{what} failed its integrity check") from None


class SoftwareKeyBackend:
    """Keys sealed with AES-256-GCM under the operator's KEK; decrypted keys cached in memory."""

    name = "software"

    def __init__(self, kek: KeyEncryptionKey) -> None:
        self._kek = kek
        self._sealer = Sealer(kek, b"pkigate ca-key sealing v1", b"PKG1", b"pkigate-ca-key:")
        self._cache: dict[str, CAPrivateKey] = {}
        self._lock = threading.Lock()

    def generate(self, key_id: str, algorithm: KeyAlgorithm) -> bytes:
        key = algorithm.generate()
        blob = self.seal(key_id, key)
        with self._lock:
            self._cache[key_id] = key
        return blob

    def seal(self, key_id: str, key: CAPrivateKey) -> bytes:
        der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return self._sealer.seal(key_id, der)

    def holds(self, blob: bytes) -> bool:
        return blob.startswith(self._sealer.magic)

    def check_kek(self, blob: bytes) -> None:
        """Refuse to run with a KEK other than the one this blob was sealed under."""
        kek_id = self._sealer.sealed_kek_id(blob)
        if kek_id is not None and not self._sealer.kek_matches(blob):
            raise KeyBackendError(
                f"the CA keys here were sealed under another key-encryption key "
                f"({kek_id.hex()}; this process has {self._kek.key_id.hex()}): set "
                f"{KEK_ENV} or the data directory's kek file to the right one"
            )

    def load(self, key_id: str, blob: bytes) -> CAPrivateKey:
        cached = self._cache.get(key_id)
        if cached is not None:
            return cached
        if not self.holds(blob):
            raise KeyBackendError(f"key {key_id} is not a sealed software key")
        der = self._sealer.unseal(key_id, blob, f"key {key_id}")
        key = serialization.load_der_private_key(der, password=None)
        if not isinstance(key, CAPrivateKey):
            raise KeyBackendError(f"key {key_id} is a {type(key).__name__}, not a CA key type")
        with self._lock:
            self._cache[key_id] = key
        return key

    def forget(self, key_id: str) -> None:
        """Drop a key from the in-memory cache (after destruction)."""
        with self._lock:
            self._cache.pop(key_id, None)


class KeyStorage(StrEnum):
    """Where a CA's key is generated and kept (the store's key backend column)."""

    SOFTWARE = "software"
    PKCS11 = "pkcs11"


class KeyBackends:
    """The software backend for every key, and the PKCS#11 token for the CA keys kept
    there (None when this process has no ``[pkcs11]`` configuration)."""

    def __init__(self, software: SoftwareKeyBackend, token: Pkcs11Backend | None) -> None:
        self.software = software
        self.token = token

    def _token(self) -> Pkcs11Backend:
        if self.token is None:
            raise KeyBackendError(
                "this CA's key is on a PKCS#11 token, and no [pkcs11] token is configured "
                "here (the gateway configuration's [pkcs11] table; --config for the CLI)"
            )
        return self.token

    def check_storage(self, storage: KeyStorage) -> None:
        """Refuse, before anything is stored, a storage this process cannot use."""
        if storage == KeyStorage.PKCS11 and self.token is None:
            raise BadRequestError(
                "key_storage pkcs11 needs a [pkcs11] token in the gateway configuration"
            )

    def generate(
        self, key_id: str, algorithm: KeyAlgorithm, storage: KeyStorage, label: str
    ) -> bytes:
        if storage == KeyStorage.PKCS11:
            return self._token().generate(key_id, algorithm, label)
        return self.software.generate(key_id, algorithm)

    def adopt(
        self, certificate: x509.Certificate, label: str | None, token_id: bytes | None
    ) -> bytes:
        return self._token().adopt(certificate, label, token_id)

    def load(self, key_id: str, blob: bytes) -> CASigningKey:
        if self.software.holds(blob):
            return self.software.load(key_id, blob)
        if blob.startswith(TOKEN_REFERENCE_MAGIC):
            return self._token().load(key_id, blob)
        raise KeyBackendError(f"key {key_id} is held by no backend this process knows")

    def reference(self, blob: bytes | None) -> TokenReference | None:
        """Where on the token a key is (None for a software or destroyed key)."""
        if blob is None or not blob.startswith(TOKEN_REFERENCE_MAGIC):
            return None
        from pkigate.core.pkcs11 import TokenReference

        return TokenReference.from_blob(blob)

    def destroy(self, key_id: str, blob: bytes) -> TokenReference | None:
        """Destroy what holds the key outside the store: the token's objects (raises
        KeyBackendError if the token cannot be reached); a software key is only in the
        store, whose blob the caller drops."""
        self.software.forget(key_id)
        if blob.startswith(TOKEN_REFERENCE_MAGIC):
            return self._token().destroy(blob)
        return None

    def close(self) -> None:
        if self.token is not None:
            self.token.close()
