"""What a run is: the fleet (how many devices of each kind and what they do) and the
target (where the server answers and what its templates promise).

A fleet file is TOML; every key is optional and the command line overrides it::

    [fleet]
    phones = 500
    servers = 200
    machines = 0
    concurrency = 16
    renewals = 3                # each device renews this many times
    revoke_fraction = 0.1       # servers that revoke their last certificate
    pending_fraction = 0.05     # phones enrolled through the approval connector
    dns01_fraction = 0.5        # servers answering dns-01 (the others http-01)
    names_per_server = 2
    time_scale = 28800          # simulated seconds per real second (clock.py)
    seed = 7

    [target]                    # a running server (ignored with --spawn)
    server = "http://127.0.0.1:8080"
    https = "https://127.0.0.1:8443"
    root = "/var/lib/pkigate/tls/root.pem"
    token_file = "/var/lib/pkigate/admin-token"
    dns_management = "http://127.0.0.1:8055"   # pebble-challtestsrv the server resolves with
    http01_port = 5002                          # the server's ACME http01_port
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID


class FleetConfigError(ValueError):
    """A fleet file or option that cannot be used, with the key it is about."""


@dataclass(frozen=True)
class FleetSettings:
    """The devices and what they do."""

    phones: int = 0
    """SCEP devices enrolled by an MDM."""
    servers: int = 0
    """ACME clients, one account each."""
    machines: int = 0
    """AD-style domain machines (a device kind still to come)."""
    concurrency: int = 8
    """Protocol operations in flight at once (worker threads)."""
    renewals: int = 2
    """Renewals per device after its first certificate."""
    revoke_fraction: float = 0.2
    """Share of the servers that revoke their last certificate and check it is revoked."""
    pending_fraction: float = 0.1
    """Share of the phones enrolled through the connector that holds requests for approval
    (the simulator approves them as an MDM administrator would)."""
    dns01_fraction: float = 0.5
    """Share of the servers that answer dns-01; the others answer http-01."""
    names_per_server: int = 2
    time_scale: float = 28800.0
    """Simulated seconds per real second (see clock.py)."""
    seed: int = 0
    retry_deadline: float = 180.0
    """Seconds an operation keeps retrying transient failures before the device gives up."""
    acme_stall_seconds: float = 20.0
    """An order still pending after this long is abandoned for a new one (its validation
    job died with a killed server and waits out its lease)."""
    crl_deadline: float = 120.0
    """Seconds to wait, after the fleet is done, for revocations to reach the CRLs."""
    ramp_seconds: float = 0.0
    """Spread the devices' first step over this many seconds."""
    domain: str = "devsim.test"

    def __post_init__(self) -> None:
        for name in ("phones", "servers", "machines", "renewals"):
            if getattr(self, name) < 0:
                raise FleetConfigError(f"{name} must not be negative")
        if self.concurrency < 1:
            raise FleetConfigError("concurrency must be at least 1")
        if not 1 <= self.names_per_server <= 10:
            raise FleetConfigError("names_per_server must be from 1 to 10")
        for name in ("revoke_fraction", "pending_fraction", "dns01_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise FleetConfigError(f"{name} must be between 0 and 1")
        if self.time_scale <= 0:
            raise FleetConfigError("time_scale must be positive")

    @property
    def devices(self) -> int:
        return self.phones + self.servers + self.machines

    def counts(self) -> dict[str, int]:
        """Devices per kind, in the order they are created."""
        return {"phone": self.phones, "server": self.servers, "machine": self.machines}


@dataclass(frozen=True)
class Target:
    """A running pkigate: where its front-ends answer and what its templates promise."""

    http_url: str
    """The plain HTTP listener (SCEP; CRLs and OCSP are found through the certificates)."""
    https_url: str
    """The HTTPS listener: ACME and the management API."""
    root: x509.Certificate
    """The trust anchor for chains, and for the HTTPS listener's certificate."""
    tls_bundle: Path
    """``root`` as a PEM file, for requests' ``verify``."""
    token: str
    """A management API token with the issuer or admin role (challenges, approvals)."""
    scep_connector: str = "scep"
    pending_connector: str | None = None
    """A SCEP connector with ``pending = true``; None: no phone waits for approval."""
    acme_mount: str = "/acme"
    http01_port: int = 0
    """The port pkigate's ACME connector validates http-01 on (``http01_port``), where
    the simulator's responder listens; 0: a free port (only with a spawned server)."""
    dns_management: str | None = None
    """The management API of the pebble-challtestsrv pkigate resolves names with."""
    max_lifetime: timedelta | None = None
    """The longest lifetime a certificate may have (the connectors' validity)."""
    phone_eku: frozenset[x509.ObjectIdentifier] = frozenset({ExtendedKeyUsageOID.CLIENT_AUTH})
    server_eku: frozenset[x509.ObjectIdentifier] = frozenset({ExtendedKeyUsageOID.SERVER_AUTH})
    data_dir: Path | None = None
    """The server's data directory, when the simulator may read its store afterwards."""
    adcs_mount: str | None = None
    """The AD-style connector's mount on the HTTPS listener; None: no machines."""
    directory: Any = None
    """The development directory (pkigate.adcs.directory.DevDirectory) machines join."""
    machine_template: str = "Machine"
    machine_eku: frozenset[x509.ObjectIdentifier] = frozenset(
        {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH}
    )
    database_url: str | None = None

    @property
    def acme_directory(self) -> str:
        return f"{self.https_url}{self.acme_mount}/directory"


def load_fleet_file(path: Path) -> tuple[FleetSettings, dict[str, Any]]:
    """The ``[fleet]`` settings and the raw ``[target]`` table of a fleet file."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise FleetConfigError(f"{path}: {exc}") from None
    unknown = set(data) - {"fleet", "target"}
    if unknown:
        raise FleetConfigError(f"{path}: unknown table {sorted(unknown)[0]!r}")
    fleet = data.get("fleet", {})
    target = data.get("target", {})
    if not isinstance(fleet, dict) or not isinstance(target, dict):
        raise FleetConfigError(f"{path}: [fleet] and [target] must be tables")
    return with_overrides(FleetSettings(), fleet, str(path)), target


def with_overrides(
    settings: FleetSettings, values: dict[str, Any], source: str = "options"
) -> FleetSettings:
    """``settings`` with ``values`` (None values left out) applied, type-checked."""
    known = {f.name: f for f in fields(FleetSettings)}
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        field = known.get(key)
        if field is None:
            raise FleetConfigError(f"{source}: unknown fleet setting {key!r}")
        default = getattr(FleetSettings(), key)
        accepted: tuple[type, ...] = (
            (int, float) if isinstance(default, float) else (type(default),)
        )
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise FleetConfigError(f"{source}: {key} must be a {type(default).__name__}")
        changes[key] = type(default)(value)
    try:
        return replace(settings, **changes)
    except FleetConfigError as exc:
        raise FleetConfigError(f"{source}: {exc}") from None
