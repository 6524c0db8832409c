"""Command line of the AD-style connector: `pkigate adcs dev-directory`.

This module only defines the click command; the `pkigate` group in
:mod:`pkigate.gateways.cli` adds it under `adcs`.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType

import click

from pkigate.adcs.directory import DevDirectory, DevDirectoryError
from pkigate.adcs.layout import InvalidBaseDn, certificate_templates_dn, domain_components
from pkigate.adcs.seed import DEFAULT_BASE
from pkigate.core.service import default_data_dir

DEFAULT_PORT = 1389  # unprivileged; 0 picks a free port


@click.command("dev-directory")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the database and credentials here and reuse them on the next start "
    "(default: dev-directory/ in pkigate's data directory, where the embedded AD-style "
    "connector looks for them).",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_PORT,
    show_default=True,
    help="Port on 127.0.0.1; 0 picks a free one.",
)
@click.option("--base", default=DEFAULT_BASE, show_default=True, help="Base DN of the domain.")
@click.option(
    "--foreground/--background",
    default=True,
    show_default=True,
    help="Run until Ctrl-C, or leave slapd running and return.",
)
def dev_directory(data_dir: Path | None, port: int, base: str, foreground: bool) -> None:
    """Run a development directory: OpenLDAP slapd with AD's schema and an example domain.

    Listens on loopback only. The domain has users, computers, nested groups and the
    certificate templates Machine, User, WebServer, UserPending and ESC1Vulnerable (a
    deliberately dangerous one). Every password is in credentials.json in the data directory.

    \b
    Example:
      pkigate adcs dev-directory --port 1389 --background
    """
    try:
        domain_components(base)
    except InvalidBaseDn as exc:
        raise click.BadParameter(str(exc), param_hint="--base") from None
    if data_dir is None:
        data_dir = default_data_dir() / "dev-directory"
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory = DevDirectory(data_dir, base=base, port=port or None)
    try:
        directory.start()
    except DevDirectoryError as exc:
        raise click.ClickException(str(exc)) from None
    _describe(directory)
    if not foreground:
        pid = directory.detach()
        click.echo(f"slapd runs in the background as process {pid}; stop it with: kill {pid}")
        return
    try:
        click.echo("Press Ctrl-C to stop.")
        _wait_for_interrupt()
    finally:
        directory.stop()
        click.echo("Stopped.")


# The name the `pkigate` group registers (`adcs.add_command(dev_directory_command)`).
dev_directory_command = dev_directory


def _describe(directory: DevDirectory) -> None:
    click.echo(f"URL:        {directory.url}")
    click.echo(f"Base DN:    {directory.base}")
    click.echo(f"Admin DN:   {directory.admin_dn}")
    click.echo(f"Passwords:  {directory.credentials_path} (admin and every account)")
    click.echo(f"Templates:  {certificate_templates_dn(directory.base)}")
    click.echo(f"Accounts:   {', '.join(sorted(directory.accounts))}")
    click.echo(f"Log:        {directory.log_path}")


def _wait_for_interrupt() -> None:
    """Block until SIGINT or SIGTERM."""
    stop = threading.Event()

    def handle(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
