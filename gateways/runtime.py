"""The gateway runtime: configuration + core + connectors + tokens, for one process."""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pkigate.core import (
    Actor,
    CASettings,
    CASpec,
    Core,
    IssuanceRequest,
    Requester,
    Validity,
)
from pkigate.core.anchor import sync_directory
from pkigate.core.errors import PkigateError, StoreUnavailableError
from pkigate.core.expiry import EXPIRY_JOB
from pkigate.core.jobs import JobHandler, JobRunner
from pkigate.core.names import parse_dn
from pkigate.gateways import metrics
from pkigate.gateways.auth import Role, TokenService, describe_separated
from pkigate.gateways.config import (
    CAConfig,
    ConfigError,
    GatewayConfig,
    check_connectors,
    connector_configs,
    unknown_connector_type,
)
from pkigate.gateways.connectors import (
    Connector,
    ConnectorContext,
    ConnectorSettingsError,
    discover,
)
from pkigate.gateways.destinations import NotificationDestinations
from pkigate.gateways.notifications import RUNNER_NAME as NOTIFIER_RUNNER
from pkigate.gateways.notifications import DestinationWatch, Notifier, destination_from_config
from pkigate.gateways.roles import separation_violations
from pkigate.gateways.server import plain_refusal_body

log = logging.getLogger("pkigate.gateway")
CONFIG_NAME_TAG = "pkigate:config-name"
SYSTEM = Actor("system:gateway", "gateway")
MAINTENANCE_JOB = "gateway:maintenance"
MAINTENANCE_INTERVAL = timedelta(hours=1)
ADMIN_TOKEN_FILE = "admin-token"  # noqa: S105 - a file name, not a secret
FIRST_TOKEN_NAME = "first-admin"  # noqa: S105 - a name, not a secret


CLIENT_CA_FILE = "client-cas.pem"


def tls_dir(core: Core) -> Path:
    return core.data_dir / "tls"


def _own_tls_certificate(cert_path: Path, key_path: Path) -> x509.Certificate:
    """The HTTPS listener's own certificate, if it and the key file make a pair; else
    ValueError saying why (one missing, unreadable, or not each other's)."""
    for path in (cert_path, key_path):
        if not path.exists():
            raise ValueError(f"{path} is missing")
    try:
        certificate = x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    except ValueError as exc:
        raise ValueError(f"{cert_path} or {key_path} cannot be read ({exc})") from None
    if key.public_key() != certificate.public_key():
        raise ValueError(f"{key_path} is not the key of {cert_path}")
    return certificate


def _write_secret_file(path: Path, secret: str) -> None:
    """``secret`` as the whole of ``path`` (0600), on disk when this returns: written
    under a temporary name, synced, renamed into place, the directory synced."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(secret + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    sync_directory(path.parent)


@dataclass
class Gateway:
    config: GatewayConfig
    core: Core
    tokens: TokenService
    ca_ids: dict[str, str]
    connectors: list[Connector] = field(default_factory=list)
    notifier: Notifier | None = None
    destinations: NotificationDestinations | None = None
    _runners: list[JobRunner] = field(default_factory=list)
    destination_watch: DestinationWatch | None = None

    @classmethod
    def open(
        cls, config: GatewayConfig, *, bootstrap: bool = False, upgrade_schema: bool = False
    ) -> Gateway:
        """Open the core; with ``bootstrap``, check the store (StoreIntegrityError) and
        create what the configuration names. ``upgrade_schema``: `serve --migrate`."""
        # The whole file, connectors' settings included, before anything is created or
        # changed (a data directory, a store, the CAs the file names).
        check_connectors(config)
        core = Core.open(
            config.data_dir,
            config.database_url,
            pkcs11=config.pkcs11,
            upgrade_schema=upgrade_schema,
        )
        if bootstrap:
            # Before anything is created or written: a damaged store, or one behind its
            # audit anchor, is not served (the error says what was lost and what to do).
            try:
                core.check_store()
                if core.keys.token is not None:
                    # A wrong PIN, a missing module or an absent token: one line at start
                    # (this process execs into the arbiter: its session goes with it).
                    core.keys.token.check()
            except BaseException:
                core.close()
                raise
        tokens = TokenService(core.store, core.audit, core.clock, config.token_policy)
        gateway = cls(config, core, tokens, {})
        gateway.ca_ids = gateway._ensure_cas(create=bootstrap)
        gateway.connectors = gateway._build_connectors()
        gateway.notifier = gateway._build_notifier()
        if bootstrap:
            for connector in gateway.connectors:
                connector.start()
        return gateway

    # -- CAs ----------------------------------------------------------------------------

    def _ensure_cas(self, create: bool) -> dict[str, str]:
        found = {
            view.tags.get(CONFIG_NAME_TAG): view.record.id
            for view in self.core.authorities.list_cas()
            if view.tags.get(CONFIG_NAME_TAG) and view.status.value != "DELETED"
        }
        ids: dict[str, str] = {}
        for index, ca in enumerate(self.config.cas):
            if ca.name in found:
                ids[ca.name] = found[ca.name]
                self._refuse_drift(index, ca, ids)
                continue
            if not create:
                raise ConfigError(
                    f"CA {ca.name!r} does not exist yet; run `pkigate serve` once to create it",
                    "cas",
                    self.config.source,
                )
            view = self.core.authorities.create(
                CASpec(
                    type=ca.type,
                    subject=parse_dn(ca.subject),
                    key_algorithm=ca.key_algorithm,
                    signing_algorithm=ca.signing_algorithm,
                    usage_mode=ca.usage_mode,
                    validity=ca.validity,
                    parent_ca_id=ids[ca.parent] if ca.parent else None,
                    path_length=ca.path_length,
                    tags={CONFIG_NAME_TAG: ca.name},
                    key_storage=ca.key_storage,
                ),
                SYSTEM,
            )
            ids[ca.name] = view.record.id
            # Now that the id is known, certificates it issues can point back to it.
            http = self.config.listeners.http_url
            ca_id = view.record.id
            self.core.authorities.update_settings(
                ca_id,
                CASettings(
                    ca_issuers_url=f"{http}/ca/{ca_id}.cer",
                    crl_enabled=ca.publish_revocation,
                    crl_url=f"{http}/crl/{ca_id}.crl" if ca.publish_revocation else None,
                    ocsp_enabled=ca.publish_revocation,
                    ocsp_url=f"{http}/ocsp/{ca_id}" if ca.publish_revocation else None,
                ),
                SYSTEM,
            )
            log.info("created CA", extra={"ca": ca.name, "ca_id": view.record.id})
        return ids

    def _refuse_drift(self, index: int, ca: CAConfig, ids: Mapping[str, str]) -> None:
        """A configured CA that exists already must still be the one the file describes.

        A CA's subject, key and parent are fixed once it has signed anything, so an edit
        of them cannot be applied; serving the stored CA regardless would hide that the
        file no longer says what runs. Refused (ConfigError at the key's line), with the
        two ways out: restore the stored value, or give the changed CA a new name (a new
        CA is created beside the old one, whose certificates stay valid)."""
        record = self.core.authorities.get(ids[ca.name])
        parent = ids.get(ca.parent) if ca.parent else None
        differences = [
            ("subject", record.subject_der != parse_dn(ca.subject).public_bytes(), record.subject),
            ("key_algorithm", record.key_algorithm != ca.key_algorithm.value, record.key_algorithm),
            ("parent", record.parent_id != parent, self._config_name(record.parent_id)),
        ]
        for key, differs, stored in differences:
            if differs:
                raise self.config.error(
                    f"cas[{index}].{key}",
                    f"CA {ca.name!r} exists with {key} {stored!r}; a CA's {key} cannot change. "
                    f"Set it back, or give the changed CA a new name to create a new one",
                )

    def _config_name(self, ca_id: str | None) -> str | None:
        if ca_id is None:
            return None
        view = self.core.authorities.describe(ca_id)
        return view.tags.get(CONFIG_NAME_TAG) or ca_id

    # -- connectors ---------------------------------------------------------------------

    def _build_connectors(self) -> list[Connector]:
        types = discover()
        built = []
        for index, item in enumerate(connector_configs(self.config, list(types))):
            connector_type = types.get(item.type)
            if connector_type is None:
                raise unknown_connector_type(self.config, index, item.type, list(types))
            listener = self.config.listeners
            context = ConnectorContext(
                name=item.name,
                type=item.type,
                mount=item.mount,
                ca_id=self.ca_ids[item.ca],
                template=item.template or connector_type.default_template,
                validity=item.validity or Validity.parse(connector_type.default_validity),
                core=self.core,
                base_url=listener.http_url
                if connector_type.listener == "http"
                else listener.https_url,
                record_issuance=metrics.record_issuance,
                ca_ids=dict(self.ca_ids),
            )
            try:
                self.core.templates.get(context.template)
                built.append(connector_type(context, item.settings))
            except ConnectorSettingsError as exc:
                raise self.config.error(
                    f"connectors[{index}].settings.{exc.key}", exc.message
                ) from None
            except PkigateError as exc:
                raise self.config.error(f"connectors[{index}].template", exc.message) from None
        return built

    def _build_notifier(self) -> Notifier:
        """The TOML's destinations and the store's (made through the API); a name in both
        is refused at start (a TOML entry added after the API made one of its name)."""
        self.destinations = NotificationDestinations(
            self.core, self.config.notifications, self.ca_ids
        )
        stored = {view["name"] for view in self.destinations.list() if view["source"] == "api"}
        for index, item in enumerate(self.config.notifications):
            if item.name in stored:
                raise self.config.error(
                    f"notifications[{index}].name",
                    f"a notification named {item.name!r} was made through the API; delete "
                    "it there (`pkigate notifications delete`) or give this one another name",
                )
        destinations = {
            item.name: destination_from_config(item, self.ca_ids)
            for item in self.config.notifications
        }
        return Notifier(
            self.core,
            destinations,
            timedelta(seconds=self.config.notifications_poll_seconds),
            stored=self.destinations.current,
        )

    # -- first start --------------------------------------------------------------------

    def ensure_admin_token(self) -> Path | None:
        """Write a first admin token (0600) if no token exists; returns where it is. Where
        separation_of_duties keeps powers that ``admin`` holds apart, the first token is a
        ``token-admin``; it gives only its own role, so the operator makes the tokens that
        each hold one of those powers with the CLI on the CA host."""
        path = self.core.data_dir / ADMIN_TOKEN_FILE
        if self.tokens.has_tokens():
            if path.exists():
                return path
            self._warn_unwritten_first_token(path)
            return None
        separated = separation_violations((Role.ADMIN,), self.config.token_policy.separated)
        first = Role.TOKEN_ADMIN if separated else Role.ADMIN
        # The file is written (and synced) before the token is committed: a first start
        # killed between the two leaves a file whose token was never stored, which the
        # next start replaces, never a stored token whose secret nobody has.
        self.tokens.create(
            FIRST_TOKEN_NAME, first, SYSTEM, keep=lambda secret: _write_secret_file(path, secret)
        )
        return path

    def _warn_unwritten_first_token(self, path: Path) -> None:
        """The first token's file gone and the token never used: its secret may be lost
        (the file deleted, or a disk that lost it), so the log says it once per start
        (nothing is revoked: an operator may have moved the file on purpose)."""
        for token in self.tokens.list():
            if (
                token.name == FIRST_TOKEN_NAME
                and token.created_by == SYSTEM.principal
                and token.revoked_at is None
                and token.last_used_at is None
            ):
                log.warning(
                    "the first admin token %s was never used and %s is gone: if its secret "
                    "was lost (a first start stopped before writing it), revoke it and make "
                    "another on this host (pkigate token revoke %s; pkigate token create)",
                    token.id,
                    path,
                    token.id,
                )

    def warn_separated_tokens(self) -> None:
        """One warning naming the tokens that hold roles separation_of_duties keeps apart
        (made before the rule): they are refused at use until replaced."""
        found = self.tokens.violating()
        if found:
            log.warning(
                "%d API token(s) hold roles that separation_of_duties keeps apart and are "
                "refused at use; replace them with tokens that each hold one: %s",
                len(found),
                describe_separated(found),
            )

    def refusal_body(self, path: str, status: int, message: str) -> tuple[str, bytes]:
        """What the serving layer answers a request it refuses before the app runs (a
        malformed or late body): in the terms of the connector mounted at ``path`` (an
        RFC 8555 problem under an ACME mount), else the management API's error object."""
        for connector in self.connectors:
            mount = connector.context.mount.rstrip("/")
            if path == mount or path.startswith(mount + "/"):
                answer = connector.refusal_body(status, message)
                if answer is not None:
                    return answer
        return plain_refusal_body(path, status, message)

    def ensure_tls_certificate(self) -> tuple[Path, Path]:
        """The HTTPS listener's certificate: configured files, or one from our own CA."""
        listeners = self.config.listeners
        if listeners.tls_certificate and listeners.tls_key:
            return listeners.tls_certificate, listeners.tls_key
        directory = tls_dir(self.core)
        directory.mkdir(mode=0o700, exist_ok=True)
        cert_path, key_path = directory / "server.pem", directory / "server.key"
        if cert_path.exists() or key_path.exists():
            try:
                current = _own_tls_certificate(cert_path, key_path)
            except ValueError as exc:
                # A lost file, or a start killed between the two writes below: no worker
                # could load the pair (each died at start, again and again); a new one.
                log.warning("%s: a new TLS key and certificate are made", exc)
            else:
                if (current.not_valid_after_utc - self.core.clock()).days > 30:
                    return cert_path, key_path
        host = listeners.https.rpartition(":")[0]
        names: list[x509.GeneralName] = [x509.DNSName("localhost")]
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
        names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        names = list(dict.fromkeys(names))
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(parse_dn(f"CN={host}"))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(key, hashes.SHA256())
        )
        ca_name = listeners.tls_from_ca or self.config.cas[-1].name
        issued = self.core.issue(
            IssuanceRequest(
                ca_id=self.ca_ids[ca_name],
                csr=csr,
                validity=Validity.parse("90d"),
                template="EndEntityServerAuthCertificate/V1",
                requester=Requester(SYSTEM.principal, SYSTEM.connector),
            )
        )
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        # The chain up to, not including, the root: clients have the root already.
        intermediates = "".join(
            c.public_bytes(serialization.Encoding.PEM).decode() for c in issued.chain[:-1]
        )
        cert_path.write_text(issued.pem() + intermediates)
        return cert_path, key_path

    def ensure_client_ca_bundle(self) -> Path:
        """The CAs whose certificates the HTTPS listener accepts from clients (TLS client
        authentication is optional there; the AD-style connector uses it for renewal)."""
        directory = tls_dir(self.core)
        directory.mkdir(mode=0o700, exist_ok=True)
        pems: list[str] = []
        for view in self.core.authorities.list_cas():
            if view.record.certificate_der is not None:
                certificate = x509.load_der_x509_certificate(view.record.certificate_der)
                pems.append(certificate.public_bytes(serialization.Encoding.PEM).decode())
        path = directory / CLIENT_CA_FILE
        path.write_text("".join(pems))
        return path

    def job_handlers(self) -> dict[str, JobHandler]:
        return {kind: h for group in self.job_handler_groups() for kind, h in group.items()}

    def job_handler_groups(self) -> list[dict[str, JobHandler]]:
        """The CA's own job handlers, the notifier's, then each connector's (kinds
        prefixed by its name)."""
        groups = self._service_handler_groups()
        if self.notifier is not None and self.notifier.job_handlers():
            # Threads of their own: a slow receiver never holds up a CRL.
            groups.insert(1, self.notifier.job_handlers())
        return groups

    def _service_handler_groups(self) -> list[dict[str, JobHandler]]:
        """The groups whose runners every process starts: the CA's and the connectors'."""
        groups: list[dict[str, JobHandler]] = [
            {
                MAINTENANCE_JOB: self._maintenance,
                EXPIRY_JOB: self._expiry_scan,
                **self.core.revocation.job_handlers(),
            }
        ]
        for connector in self.connectors:
            own = {
                f"{connector.context.name}:{kind}": handler
                for kind, handler in connector.job_handlers().items()
            }
            if own:
                groups.append(own)
        return groups

    def start_background_work(self) -> None:
        """Start this process's job worker threads; every process runs some, so any
        gunicorn worker on any host may pick up any job.

        The CA's own jobs (CRLs, maintenance) and each connector's have threads of their
        own: a flood of one connector's jobs (slow ACME validations that clients hold up
        on purpose) cannot delay a CRL or another connector's work. The notifier's start
        when there is a destination to deliver to (notifications.DestinationWatch)."""
        if self.config.job_threads == 0 or self._runners:
            return
        for index, group in enumerate(self._service_handler_groups()):
            # The CA's own jobs (the first group) run one at a time; the connectors' (ACME
            # validations) wait on the network, side by side.
            self._start_runner(group, concurrency=1 if index == 0 else None)
        if self.notifier is not None and self.notifier.job_handlers():
            assert self.destinations is not None  # made with the notifier
            self.destination_watch = DestinationWatch(
                self.destinations.any_exist,
                self._start_notifier,
                float(self.config.notifications_poll_seconds),
            )
            self.destinations.on_create.append(self.destination_watch.wake)
            self.destination_watch.start()
        try:
            self.core.jobs.enqueue(MAINTENANCE_JOB, {}, dedupe_key=MAINTENANCE_JOB)
            self.core.jobs.enqueue(EXPIRY_JOB, {}, dedupe_key=EXPIRY_JOB)
        except StoreUnavailableError as exc:
            # A worker starting on a full disk serves what needs no write. Maintenance is
            # queued again by each process that starts with room, and by the maintenance
            # job itself when it runs.
            log.warning("maintenance not queued at start: %s", exc.message)

    def _start_runner(
        self, handlers: dict[str, JobHandler], name: str = "jobs", concurrency: int | None = None
    ) -> None:
        """``concurrency``: jobs run at once (default: the configuration's job_concurrency)."""
        runner = JobRunner(
            self.core.jobs,
            handlers,
            threads=self.config.job_threads,
            name=name,
            concurrency=concurrency or self.config.job_concurrency,
        )
        runner.start()
        self._runners.append(runner)

    def _start_notifier(self) -> None:
        """The notifier's runner and its dispatcher (queued once however many processes
        start): there is a destination now."""
        assert self.notifier is not None
        if not any(runner.name == NOTIFIER_RUNNER for runner in self._runners):
            self._start_runner(self.notifier.job_handlers(), NOTIFIER_RUNNER)
        self.notifier.start()

    def _maintenance(self, _payload: dict[str, Any]) -> None:
        """Hourly: drop finished jobs, destroy keys past their restore window, settle CAs
        whose creation was interrupted, and let each connector clean up after itself."""
        self.core.jobs.purge_finished(timedelta(days=7))
        self.core.authorities.purge_expired_deletions(SYSTEM)
        self.core.authorities.settle_interrupted_creations(SYSTEM)
        for connector in self.connectors:
            try:
                connector.maintenance()
            except Exception:
                log.exception("maintenance of connector %s failed", connector.context.name)
        self.core.jobs.enqueue(
            MAINTENANCE_JOB,
            {},
            dedupe_key=MAINTENANCE_JOB,
            run_at=self.core.clock() + MAINTENANCE_INTERVAL,
        )

    def _expiry_scan(self, _payload: dict[str, Any]) -> None:
        """Every expiry_scan_seconds: certificate and CA expiry events (core/expiry.py).
        Two of these running at once (a process starting while another's runs) write
        each event once."""
        try:
            self.core.expiry.scan()
        finally:
            self.core.jobs.enqueue(
                EXPIRY_JOB,
                {},
                dedupe_key=EXPIRY_JOB,
                run_at=self.core.clock() + timedelta(seconds=self.config.expiry_scan_seconds),
            )

    def close(self) -> None:
        if self.destination_watch is not None:
            self.destination_watch.stop()
            self.destination_watch = None
        for runner in self._runners:
            runner.stop()
        self._runners = []
        self.core.close()
