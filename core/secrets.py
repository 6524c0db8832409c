"""Generated secrets that every gateway process and host behind one name must agree on
(a connector's generated static challenge, say).

A value made in one host's data directory would differ from the next host's; these live in
the store instead, sealed with AES-256-GCM under a subkey of the operator's KEK (the name
bound in as associated data, so a sealed value cannot be moved to another name), and the
first process to need one creates it for all.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from pkigate.core.audit import Actor, AuditLog
from pkigate.core.keys import KeyEncryptionKey, Sealer
from pkigate.core.store import Store
from pkigate.core.store import secrets as secrets_store

SECRET_NAME_MAX = 256


class SharedSecrets:
    """Sealed, named secrets in the store."""

    def __init__(
        self, store: Store, kek: KeyEncryptionKey, audit: AuditLog, clock: Callable[[], datetime]
    ) -> None:
        self._store = store
        self._sealer = Sealer(kek, b"pkigate shared-secret sealing v1", b"PKS1", b"pkigate-secret:")
        self._audit = audit
        self._clock = clock

    def get(self, name: str) -> str | None:
        with self._store.read() as conn:
            sealed = secrets_store.sealed_secret(conn, name)
        return None if sealed is None else self._unseal(name, sealed)

    def get_or_create(self, name: str, make: Callable[[], str], actor: Actor) -> str:
        """The secret named ``name``; made by ``make`` and kept (audited, without its
        value) if there is none yet. Processes starting at once agree on one value."""
        found = self.get(name)
        if found is not None:
            return found
        if len(name) > SECRET_NAME_MAX:
            raise ValueError(f"a secret's name is at most {SECRET_NAME_MAX} characters")
        value = make()
        now = self._clock()
        with self._store.write() as conn:
            if secrets_store.insert_sealed_secret(conn, name, self._seal(name, value), now):
                self._audit.record(conn, actor, "secret.create", f"secret/{name}", at=now)
                return value
            sealed = secrets_store.sealed_secret(conn, name)
        assert sealed is not None  # the row that won the insert
        return self._unseal(name, sealed)

    def _seal(self, name: str, value: str) -> bytes:
        return self._sealer.seal(name, value.encode("utf-8"))

    def _unseal(self, name: str, blob: bytes) -> str:
        # Every host sharing this store needs the same key-encryption key.
        return self._sealer.unseal(name, blob, f"the secret {name}").decode("utf-8")
