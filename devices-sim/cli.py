"""``pkigate-sim``: run a simulated fleet against pkigate and report.

Against a running server::

    pkigate-sim run --server http://127.0.0.1:8080 --https https://127.0.0.1:8443 \\
        --root data/tls/root.pem --token-file data/admin-token \\
        --phones 100 --servers 20 --concurrency 8 [--json report.json] [--plot run.png]

With a server of its own (free loopback ports, a temporary data directory)::

    pkigate-sim run --spawn --workers 2 --phones 50 --servers 20 --renewals 2
    pkigate-sim run --spawn --database-url postgresql://... --phones 100
    pkigate-sim run --spawn --kill-server-every 3 --max-kills 4 --phones 20 --servers 8

The exit status is 0 when every device finished with every certificate verified, no
unexpected error happened and the store's post-conditions hold; 1 otherwise; 2 for
unusable options.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console

try:
    import pyhanko_certvalidator  # noqa: F401 - the simulator's checks need it
except ImportError:  # pragma: no cover - depends on how pkigate was installed
    sys.exit("pkigate-sim needs pkigate's sim extra: pip install 'pkigate[sim]'")

from pkigate.devsim.config import FleetConfigError, FleetSettings, load_fleet_file, with_overrides
from pkigate.devsim.report import print_summary
from pkigate.devsim.simulation import ExternalServer, Outputs, SpawnOptions, simulate

EXIT_FAILED = 1
EXIT_USAGE = 2
TOKEN_ENV = "PKIGATE_TOKEN"  # noqa: S105 - the name of a variable, not a secret


@click.group()
def main() -> None:
    """pkigate's device simulator: fleets of phones (SCEP) and servers (ACME)."""


@main.command("run")
@click.option(
    "--fleet",
    "fleet_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="TOML fleet file ([fleet], [target]); options override it.",
)
@click.option("--spawn", is_flag=True, help="Start a `pkigate serve` of its own.")
@click.option("--server", help="The server's plain HTTP URL (SCEP, CRLs, OCSP).")
@click.option("--https", "https_url", help="The server's HTTPS URL (ACME, management API).")
@click.option(
    "--root",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The root CA certificate (PEM) to validate chains and HTTPS against.",
)
@click.option(
    "--token-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help=f"A management API token with the issuer or admin role (or ${TOKEN_ENV}).",
)
@click.option(
    "--dns-management",
    help="Management URL of the pebble-challtestsrv the server resolves names with (dns-01).",
)
@click.option(
    "--http01-port",
    type=click.IntRange(0, 65535),
    help="The port the server validates http-01 on; the simulator answers there.",
)
@click.option("--scep-connector", help="The SCEP connector's name (default scep).")
@click.option("--pending-connector", help="A SCEP connector that holds requests for approval.")
@click.option("--acme-mount", help="The ACME connector's mount (default /acme).")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="With --spawn: where the server lives (kept). Otherwise: the server's data "
    "directory, to check the store afterwards.",
)
@click.option(
    "--database-url",
    help="With --spawn: the server's database (PostgreSQL URL). Otherwise: the server's, "
    "for the post-conditions.",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    default=2,
    show_default=True,
    help="gunicorn workers of the spawned server.",
)
@click.option(
    "--kill-server-every",
    type=click.FloatRange(min=0.5),
    help="Fault mode (--spawn): SIGKILL and restart the server after each S seconds of uptime.",
)
@click.option(
    "--max-kills",
    type=click.IntRange(min=1),
    help="Fault mode: stop killing after this many kills (default: until the fleet is done).",
)
@click.option("--phones", type=click.IntRange(min=0))
@click.option("--servers", type=click.IntRange(min=0))
@click.option("--machines", type=click.IntRange(min=0))
@click.option("--concurrency", type=click.IntRange(min=1))
@click.option("--renewals", type=click.IntRange(min=0))
@click.option("--revoke-fraction", type=click.FloatRange(0, 1))
@click.option("--pending-fraction", type=click.FloatRange(0, 1))
@click.option("--dns01-fraction", type=click.FloatRange(0, 1))
@click.option(
    "--time-scale", type=click.FloatRange(min=1), help="Simulated seconds per real second."
)
@click.option("--ramp-seconds", type=click.FloatRange(min=0))
@click.option("--seed", type=int)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the report as JSON.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write latency and throughput plots (PNG).",
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option(
    "--server-events",
    is_flag=True,
    help="Report the events the fleet caused on the server (needs an admin or auditor token).",
)
def run(
    fleet_file: Path | None,
    spawn: bool,
    server: str | None,
    https_url: str | None,
    root: Path | None,
    token_file: Path | None,
    dns_management: str | None,
    http01_port: int | None,
    scep_connector: str | None,
    pending_connector: str | None,
    acme_mount: str | None,
    data_dir: Path | None,
    database_url: str | None,
    workers: int,
    kill_server_every: float | None,
    max_kills: int | None,
    json_path: Path | None,
    plot_path: Path | None,
    quiet: bool,
    server_events: bool,
    **fleet_options: Any,
) -> None:
    """Run a fleet: enroll, verify, renew, revoke; print the summary per protocol."""
    console = Console(stderr=True)
    try:
        settings, target_file = load_fleet_file(fleet_file) if fleet_file else (FleetSettings(), {})
        settings = with_overrides(settings, fleet_options)
        if kill_server_every is not None and not spawn:
            raise FleetConfigError("--kill-server-every needs --spawn (the server to kill)")
        spawn_options = None
        external = None
        if spawn:
            spawn_options = SpawnOptions(
                workers=workers,
                database_url=database_url,
                base_dir=data_dir,
                kill_every=kill_server_every,
                max_kills=max_kills,
            )
        else:
            external = _external(
                target_file,
                server=server,
                https_url=https_url,
                root=root,
                token_file=token_file,
                dns_management=dns_management,
                http01_port=http01_port,
                scep_connector=scep_connector,
                pending_connector=pending_connector,
                acme_mount=acme_mount,
                data_dir=data_dir,
                database_url=database_url,
            )
        if settings.devices == 0:
            raise FleetConfigError("no devices: give --phones, --servers or a fleet file")
        result = simulate(
            settings,
            spawn=spawn_options,
            external=external,
            outputs=Outputs(
                json=json_path, plot=plot_path, progress=not quiet, server_events=server_events
            ),
            console=console,
        )
    except FleetConfigError as exc:
        console.print(f"error: {exc}", markup=False, highlight=False)
        sys.exit(EXIT_USAGE)
    print_summary(result.report, Console())
    sys.exit(0 if result.report.ok else EXIT_FAILED)


def _external(target: dict[str, Any], **options: Any) -> ExternalServer:
    """The running server from the options, falling back on the fleet file's [target]."""

    def pick(name: str, key: str | None = None) -> Any:
        value = options.get(name)
        return value if value is not None else target.get(key or name)

    server, https_url, root = pick("server"), pick("https_url", "https"), pick("root")
    if not server or not https_url or not root:
        raise FleetConfigError("give --spawn, or --server, --https and --root")
    token_file = pick("token_file")
    token = os.environ.get(TOKEN_ENV)
    if token_file:
        token = Path(token_file).read_text().strip()
    if not token:
        raise FleetConfigError(f"give --token-file or ${TOKEN_ENV} (a management API token)")
    data_dir = pick("data_dir")
    return ExternalServer(
        http_url=str(server),
        https_url=str(https_url),
        root=Path(root),
        token=token,
        dns_management=pick("dns_management"),
        http01_port=int(pick("http01_port") or 0),
        scep_connector=pick("scep_connector") or "scep",
        pending_connector=pick("pending_connector"),
        acme_mount=pick("acme_mount") or "/acme",
        data_dir=Path(data_dir) if data_dir else None,
        database_url=pick("database_url"),
    )


if __name__ == "__main__":  # pragma: no cover
    main()
