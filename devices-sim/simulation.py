"""One simulation, end to end: challenge responders, the server (spawned or given), the
fleet, the post-conditions on the store, the report, the JSON and the plot.

``pkigate-sim run`` and the tests call :func:`simulate`; everything it starts is stopped
before it returns, whatever happens.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography import x509
from rich.console import Console

from pkigate.devsim.challenges import ChallengeDns, Http01Responder
from pkigate.devsim.config import FleetConfigError, FleetSettings, Target
from pkigate.devsim.fleet import FleetRun, check_kinds, run_fleet
from pkigate.devsim.postconditions import check_store
from pkigate.devsim.report import Report, build_report, plot
from pkigate.devsim.server_events import events_since, outbox_position
from pkigate.devsim.spawn import ServerKiller, SpawnedServer


@dataclass(frozen=True)
class SpawnOptions:
    """``--spawn``: the simulator runs its own `pkigate serve`."""

    workers: int = 2
    database_url: str | None = None
    base_dir: Path | None = None
    """Where the server's configuration, data and log go (default: a temporary directory,
    removed afterwards)."""
    kill_every: float | None = None
    """Fault mode: SIGKILL and restart the server after each this many seconds of uptime."""
    max_kills: int | None = None
    """Fault mode: stop killing after this many kills (None: until the fleet is done)."""
    extra_config: str = ""
    """Tables appended to the server's configuration (a [pkcs11] token and CAs on it)."""


@dataclass(frozen=True)
class ExternalServer:
    """A `pkigate serve` running elsewhere (on this machine: challenges are answered on
    loopback)."""

    http_url: str
    https_url: str
    root: Path
    token: str
    dns_management: str | None = None
    http01_port: int = 0
    scep_connector: str = "scep"
    pending_connector: str | None = None
    acme_mount: str = "/acme"
    data_dir: Path | None = None
    """The server's data directory, to check the post-conditions on its store."""
    database_url: str | None = None


@dataclass(frozen=True)
class Outputs:
    json: Path | None = None
    plot: Path | None = None
    progress: bool = True
    #: Report the events the run caused (the server's outbox, before and after).
    server_events: bool = False


@dataclass(frozen=True)
class Simulation:
    report: Report
    run: FleetRun


def simulate(
    settings: FleetSettings,
    *,
    spawn: SpawnOptions | None = None,
    external: ExternalServer | None = None,
    outputs: Outputs = Outputs(),
    console: Console | None = None,
) -> Simulation:
    if (spawn is None) == (external is None):
        raise FleetConfigError("give a server to run against, or spawn one")
    check_kinds(settings)
    console = console or Console(stderr=True)
    http01: Http01Responder | None
    killer: ServerKiller | None
    with ExitStack() as cleanup:
        if spawn is not None:
            if outputs.progress and console.is_terminal:
                console.print(f"starting pkigate serve ({spawn.workers} workers)", style="dim")
            target, http01, dns, killer = _spawned(settings, spawn, cleanup)
        else:
            assert external is not None
            target, http01, dns = _external(settings, external, cleanup)
            killer = None
        position = outbox_position(target) if outputs.server_events else None
        run = run_fleet(
            settings,
            target,
            http01=http01,
            dns=dns,
            disruption=killer,
            progress=outputs.progress,
            console=console,
        )
        postconditions = None
        if target.data_dir is not None:
            postconditions = check_store(
                target.data_dir,
                target.database_url,
                run.certificates,
                tuple(run.duplicate_serials),
            )
        caused = events_since(target, position) if position is not None else None
    report = replace(build_report(run, postconditions), server_events=caused)
    if outputs.json is not None:
        report.write_json(outputs.json)
    if outputs.plot is not None:
        plot(run, outputs.plot)
    return Simulation(report, run)


def _spawned(
    settings: FleetSettings, options: SpawnOptions, cleanup: ExitStack
) -> tuple[Target, Http01Responder, ChallengeDns | None, ServerKiller | None]:
    http01 = Http01Responder()
    cleanup.callback(http01.close)
    dns = None
    if settings.servers:
        # The spawned ACME connector resolves every name with it, for http-01 too.
        if not ChallengeDns.available():
            raise FleetConfigError(
                "servers need pebble-challtestsrv (Debian package `pebble`) as the test DNS "
                "server; install it or run with --servers 0"
            )
        dns = ChallengeDns().start()
        cleanup.callback(dns.stop)
    server = SpawnedServer(
        http01_port=http01.port,
        dns_resolver=dns.resolver if dns is not None else None,
        workers=options.workers,
        database_url=options.database_url,
        base_dir=options.base_dir,
        machines=settings.machines > 0,
        extra_config=options.extra_config,
    )
    cleanup.callback(server.remove)
    cleanup.callback(server.stop)
    server.start()
    killer = None
    if options.kill_every:
        killer = ServerKiller(server, options.kill_every, options.max_kills)
    return server.target(), http01, dns, killer


def _external(
    settings: FleetSettings, options: ExternalServer, cleanup: ExitStack
) -> tuple[Target, Http01Responder | None, ChallengeDns | None]:
    http01: Http01Responder | None = None
    if settings.servers:
        if not options.http01_port:
            raise FleetConfigError(
                "servers answer http-01 on the port the server validates: give --http01-port"
            )
        http01 = Http01Responder(options.http01_port)
        cleanup.callback(http01.close)
    dns = ChallengeDns(options.dns_management) if options.dns_management else None
    target = Target(
        http_url=options.http_url.rstrip("/"),
        https_url=options.https_url.rstrip("/"),
        root=x509.load_pem_x509_certificate(options.root.read_bytes()),
        tls_bundle=options.root,
        token=options.token,
        scep_connector=options.scep_connector,
        pending_connector=options.pending_connector,
        acme_mount=options.acme_mount,
        http01_port=options.http01_port,
        dns_management=options.dns_management,
        data_dir=options.data_dir,
        database_url=options.database_url,
    )
    return target, http01, dns
