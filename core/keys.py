"""CA private keys: generation, encryption at rest, and the key-backend interface.

CA keys never leave a key backend in clear. The software backend keeps each key as
PKCS#8 DER sealed with AES-256-GCM under a key-encryption key (KEK) the operator controls:
``PKIGATE_KEK`` in the environment (32 bytes, base64 or hex) or a 0600 file ``kek`` in the
data directory, created on first use. The sealed blob is what the store keeps; the key id
is bound into the ciphertext as associated data so a blob cannot be swapped between CAs.

A PKCS#11 backend implements the same :class:`KeyBackend` protocol and stores a token
label as its blob instead of key material.
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
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pkigate.core.errors import KeyBackendError
from pkigate.core.model import CAPrivateKey, KeyAlgorithm

KEK_ENV = "PKIGATE_KEK"
KEK_FILE = "kek"
_BLOB_MAGIC = b"PKG1"
_KEK_ID_LEN = 8
_NONCE_LEN = 12


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
        """The KEK from the environment, else from ``data_dir/kek`` (created 0600 if absent
        and ``create``)."""
        if os.environ.get(KEK_ENV):
            return cls.from_text(os.environ[KEK_ENV])
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


class KeyBackend(Protocol):
    """Where CA private keys live. The store keeps only the opaque ``blob`` it returns."""

    name: str

    def generate(self, key_id: str, algorithm: KeyAlgorithm) -> bytes:
        """Create a key and return the blob by which this backend finds it again."""

    def load(self, key_id: str, blob: bytes) -> CAPrivateKey:
        """The private key, usable by ``cryptography`` builders for signing."""


class SoftwareKeyBackend:
    """Keys sealed with AES-256-GCM under the operator's KEK; decrypted keys cached in memory."""

    name = "software"

    def __init__(self, kek: KeyEncryptionKey) -> None:
        self._kek = kek
        self._aead = AESGCM(kek.derive(b"pkigate ca-key sealing v1"))
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
        nonce = os.urandom(_NONCE_LEN)
        sealed = self._aead.encrypt(nonce, der, _aad(key_id))
        return _BLOB_MAGIC + self._kek.key_id + nonce + sealed

    def check_kek(self, blob: bytes) -> None:
        """Refuse to run with a KEK other than the one this blob was sealed under."""
        if not blob.startswith(_BLOB_MAGIC):
            return
        header = len(_BLOB_MAGIC)
        kek_id = blob[header : header + _KEK_ID_LEN]
        if not hmac.compare_digest(kek_id, self._kek.key_id):
            raise KeyBackendError(
                f"the CA keys here were sealed under another key-encryption key "
                f"({kek_id.hex()}; this process has {self._kek.key_id.hex()}): set "
                f"{KEK_ENV} or the data directory's kek file to the right one"
            )

    def load(self, key_id: str, blob: bytes) -> CAPrivateKey:
        cached = self._cache.get(key_id)
        if cached is not None:
            return cached
        if not blob.startswith(_BLOB_MAGIC):
            raise KeyBackendError(f"key {key_id} is not a sealed software key")
        header = len(_BLOB_MAGIC)
        kek_id = blob[header : header + _KEK_ID_LEN]
        if not hmac.compare_digest(kek_id, self._kek.key_id):
            raise KeyBackendError(
                f"key {key_id} was sealed under another key-encryption key "
                f"({kek_id.hex()}, this process has {self._kek.key_id.hex()})"
            )
        nonce_at = header + _KEK_ID_LEN
        nonce = blob[nonce_at : nonce_at + _NONCE_LEN]
        try:
            der = self._aead.decrypt(nonce, blob[nonce_at + _NONCE_LEN :], _aad(key_id))
        except InvalidTag:
            raise KeyBackendError(f"key {key_id} failed its integrity check") from None
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


def _aad(key_id: str) -> bytes:
    return b"pkigate-ca-key:" + key_id.encode()
