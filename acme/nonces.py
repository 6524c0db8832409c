"""Replay nonces (RFC 8555 6.5) that any gateway process can check.

A nonce is ``expiry || random || HMAC``: handing one out costs no store write, and any
process holding the same key-encryption key can tell a nonce it (or a sibling) made from
a forged one. Single use is enforced in the store: spending a nonce inserts it into
``acme_spent_nonces``, whose primary key turns a replay into a conflict in every process.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct
from datetime import UTC, datetime, timedelta

from pkigate.core.keys import KeyEncryptionKey

NONCE_LIFETIME = timedelta(minutes=30)
_MAC_BYTES = 16
_RANDOM_BYTES = 16
_STAMP = struct.Struct(">Q")
_NONCE_BYTES = _STAMP.size + _RANDOM_BYTES + _MAC_BYTES
_NONCE_CHARS = (_NONCE_BYTES * 4 + 2) // 3  # base64url without padding


class NonceMinter:
    def __init__(self, kek: KeyEncryptionKey, lifetime: timedelta = NONCE_LIFETIME) -> None:
        self._key = kek.derive(b"pkigate acme nonce v1")
        self.lifetime = lifetime

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()[:_MAC_BYTES]

    def mint(self, now: datetime) -> str:
        expires = int((now + self.lifetime).timestamp())
        body = _STAMP.pack(expires) + os.urandom(_RANDOM_BYTES)
        return _encode(body + self._mac(body))

    def expiry(self, nonce: str, now: datetime) -> datetime | None:
        """When a genuine, unexpired nonce expires; None for anything else."""
        if len(nonce) != _NONCE_CHARS:
            return None
        try:
            raw = base64.urlsafe_b64decode(nonce + "=" * (-len(nonce) % 4))
        except (binascii.Error, ValueError):
            return None
        # Two spellings of one nonce (the unused low bits of the last character) would be
        # two keys in the spent-nonce table: only the canonical one is accepted.
        if len(raw) != _NONCE_BYTES or _encode(raw) != nonce:
            return None
        body, mac = raw[:-_MAC_BYTES], raw[-_MAC_BYTES:]
        if not hmac.compare_digest(mac, self._mac(body)):
            return None
        expires = datetime.fromtimestamp(_STAMP.unpack(body[: _STAMP.size])[0], UTC)
        return expires if expires > now else None


def _encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
