"""The core assembled: store, keys, audit, authorities, templates and the issuer."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization

from pkigate.core.audit import Actor, AuditLog
from pkigate.core.authorities import AuthorityService
from pkigate.core.errors import DataDirectoryError, StoreIntegrityError
from pkigate.core.events import EventLog
from pkigate.core.expiry import ExpiryScanner
from pkigate.core.issuance import IssuanceRequest, IssuedCertificate, Issuer, Requester
from pkigate.core.jobs import JobQueue
from pkigate.core.keys import KeyBackends, KeyEncryptionKey, SoftwareKeyBackend
from pkigate.core.model import Validity
from pkigate.core.ocsp import OCSPResponder
from pkigate.core.revocation import RevocationService
from pkigate.core.secrets import SharedSecrets
from pkigate.core.store import Store, sqlite_url
from pkigate.core.templates import TemplateCatalogue
from pkigate.core.tenancy import AccessControl

if TYPE_CHECKING:
    from pkigate.core.pkcs11 import Pkcs11Backend
    from pkigate.core.pkcs11_settings import Pkcs11Settings

DATA_DIR_ENV = "PKIGATE_HOME"
_MAX_CHECK_REPORT = 300
DATABASE_URL_ENV = "PKIGATE_DATABASE_URL"


def _token_backend(settings: Pkcs11Settings | None) -> Pkcs11Backend | None:
    if settings is None:
        return None
    from pkigate.core.pkcs11 import Pkcs11Backend

    return Pkcs11Backend(settings)


def default_data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV) or "pkigate-data").resolve()


def _prepare_data_dir(data_dir: Path) -> None:
    """Make the data directory, or say in one line why it cannot be used: the database, its
    -wal file, the KEK and the audit anchor are all written there (SQLite would otherwise
    report "unable to open database file", which reads like a damaged store)."""
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise DataDirectoryError(
            f"cannot create the data directory {data_dir}: {exc.strerror or exc}"
        ) from None
    if not os.access(data_dir, os.W_OK | os.X_OK):
        raise DataDirectoryError(
            f"the data directory {data_dir} is not writable by this user; give it to the "
            "user pkigate runs as, or choose another with --data-dir or $PKIGATE_HOME"
        )


def store_url(data_dir: Path, database_url: str | None = None) -> str:
    """The database a data directory's pkigate uses: the URL given, else
    ``$PKIGATE_DATABASE_URL``, else SQLite ``pkigate.db`` in the data directory."""
    return database_url or os.environ.get(DATABASE_URL_ENV) or sqlite_url(data_dir / "pkigate.db")


def utc_now() -> datetime:
    return datetime.now(UTC)


def damaged_store_message(database: str | None, problem: str) -> str:
    """One line for a database whose own consistency check fails, or that cannot be read."""
    if len(problem) > _MAX_CHECK_REPORT:
        problem = problem[:_MAX_CHECK_REPORT] + "..."
    where = f" {database}" if database else ""
    return (
        f"the database{where} is damaged ({problem}); pkigate does not serve from it: put "
        "back a copy from a backup, then run `pkigate audit verify` and `pkigate audit "
        "recover` to restore what its audit anchor holds"
    )


@dataclass
class Core:
    """One process's handle on pkigate's state. Cheap to share between threads."""

    data_dir: Path
    store: Store
    kek: KeyEncryptionKey
    audit: AuditLog
    authorities: AuthorityService
    templates: TemplateCatalogue
    issuer: Issuer
    jobs: JobQueue
    revocation: RevocationService
    ocsp: OCSPResponder
    secrets: SharedSecrets
    keys: KeyBackends
    events: EventLog
    expiry: ExpiryScanner
    access: AccessControl

    @classmethod
    def open(
        cls,
        data_dir: Path | None = None,
        database_url: str | None = None,
        clock: Callable[[], datetime] = utc_now,
        *,
        signing_margin_bytes: int | None = None,
        pkcs11: Pkcs11Settings | None = None,
        upgrade_schema: bool = False,
    ) -> Core:
        """Open (creating on first use) the data directory and database.

        ``signing_margin_bytes``: the free space a SQLite store's filesystem must have for
        the CA key to sign (see ``store/space.py``). ``pkcs11``: the token that holds the
        keys of CAs with ``key_storage`` pkcs11 (opened on first use, in this process).
        ``upgrade_schema``: migrate a store at an older schema (otherwise
        SchemaOutdatedError says to run `pkigate db upgrade`)."""
        data_dir = (data_dir or default_data_dir()).resolve()
        _prepare_data_dir(data_dir)
        url = store_url(data_dir, database_url)
        store = Store.open(url, upgrade_schema=upgrade_schema)
        if signing_margin_bytes is not None:
            store.space.margin = signing_margin_bytes
        database = data_dir / "pkigate.db"
        if url == sqlite_url(database) and database.exists():
            # Sealed keys, audit log, certificates: for the service's user only (SQLite
            # gives its -wal and -shm files the database file's mode).
            with contextlib.suppress(PermissionError):  # owned by another user: theirs
                database.chmod(0o600)
        with store.read() as conn:
            sample = store.any_key_blob(conn)
        # A new key-encryption key beside keys sealed under a lost one would open nothing.
        kek = KeyEncryptionKey.load_or_create(data_dir, create=sample is None)
        audit = AuditLog(store, kek, data_dir)
        software = SoftwareKeyBackend(kek)
        if sample is not None:
            software.check_kek(sample)
        keys = KeyBackends(software, _token_backend(pkcs11))
        events = EventLog(store, clock)
        authorities = AuthorityService(store, keys, audit, clock, events)
        templates = TemplateCatalogue()
        access = AccessControl(store, audit, clock)
        issuer = Issuer(store, authorities, templates, audit, clock, events, access)
        jobs = JobQueue(store, clock)
        revocation = RevocationService(store, authorities, audit, jobs, clock, events)
        # Responder keys are software keys, whatever holds the CA's.
        ocsp = OCSPResponder(store, authorities, software, audit, issuer.issue, clock, events)
        secrets = SharedSecrets(store, kek, audit, clock)
        core = cls(
            data_dir,
            store,
            kek,
            audit,
            authorities,
            templates,
            issuer,
            jobs,
            revocation,
            ocsp,
            secrets,
            keys,
            events,
            ExpiryScanner(store, events, clock),
            access,
        )
        authorities.subordinate_signer = core._sign_subordinate
        return core

    @property
    def clock(self) -> Callable[[], datetime]:
        return self.issuer._clock

    def issue(self, request: IssuanceRequest) -> IssuedCertificate:
        return self.issuer.issue(request)

    def close(self) -> None:
        self.keys.close()
        self.ocsp.close()
        self.audit.close()
        self.store.close()

    def check_store(self) -> None:
        """Before serving from the store: its own integrity check, then its audit anchor.

        Raises StoreIntegrityError saying what is wrong and what to do; otherwise starts
        the anchor (a new store, or one from before anchors) or catches it up."""
        database = self.store.sqlite_database
        problem = self.store.integrity_problem()
        if problem is not None:
            raise StoreIntegrityError(damaged_store_message(database, problem))
        status = self.audit.anchor_status()
        if status.message is not None:
            raise StoreIntegrityError(status.message)
        self.audit.settle_anchor()

    def _sign_subordinate(
        self, parent_id: str, csr: bytes, path_length: int, validity: Validity, actor: Actor
    ) -> tuple[bytes, str]:
        issued = self.issue(
            IssuanceRequest(
                ca_id=parent_id,
                csr=csr,
                validity=validity,
                template=f"SubordinateCACertificate_PathLen{path_length}/V1",
                requester=Requester(actor.principal, actor.connector, request_id=actor.request_id),
            )
        )
        return issued.certificate.public_bytes(serialization.Encoding.DER), issued.chain_pem()
