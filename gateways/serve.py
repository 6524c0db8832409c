"""`pkigate serve`: bootstrap once, then become the server's arbiter.

The process creates what the configuration names (CAs, the HTTPS certificate, the first
admin token), prints every URL, then replaces itself (``execv``: the same process id, so
a service manager's PID stays right, and none of the bootstrap's memory) with one gunicorn
arbiter serving both listeners (``server.py``). Each worker opens its own core;
everything a request needs lives in the store, so any number of workers (and hosts
sharing a PostgreSQL database) serve the same state.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

from pkigate.gateways.config import GatewayConfig, load_config, parse_config
from pkigate.gateways.logs import configure_logging
from pkigate.gateways.server import SETTINGS_ENV, ServerSettings


def effective_config(
    config_path: Path | None, data_dir: Path | None, database_url: str | None, workers: int | None
) -> GatewayConfig:
    config = load_config(config_path) if config_path else parse_config("", "embedded default")
    if data_dir is not None:
        config = replace(config, data_dir=data_dir)
    if database_url:
        config = replace(config, database_url=database_url)
    if workers:
        config = replace(config, workers=workers)
    return config


def banner(gateway: Any, token_path: Path | None, tls: tuple[Path, Path]) -> str:
    listeners = gateway.config.listeners
    lines = [
        f"pkigate serving data directory {gateway.core.data_dir}",
        f"  database            {gateway.core.store.engine.url.render_as_string()}",
        f"  workers             {gateway.config.workers} (each serves both listeners)",
        f"  HTTP  {listeners.http_url:<28} CA certificates, CRLs, OCSP, SCEP",
        f"  HTTPS {listeners.https_url:<28} ACME, AD-style enrollment, management API",
        f"  management API      {listeners.https_url}/api/v1  "
        f"(OpenAPI: {listeners.https_url}/api/v1/openapi.json)",
        f"  TLS certificate     {tls[0]}",
        f"  health / metrics    {listeners.http_url}/healthz  /readyz  /metrics",
    ]
    for name, ca_id in gateway.ca_ids.items():
        lines.append(f"  CA {name:<16} {ca_id}  {listeners.http_url}/ca/{ca_id}.cer")
    for connector in gateway.connectors:
        info = connector.describe()
        lines.append(f"  connector {info['name']:<9} {info['type']:<6} {info['url']}")
        lines += [f"      {note}" for note in connector.startup_notes()]
    if not gateway.connectors:
        lines.append("  connectors          none installed")
    if token_path is not None:
        lines.append(
            f"  first admin token   {token_path}  (mode 0600; use it as "
            "'Authorization: Bearer <token>')"
        )
    return "\n".join(lines)


def announce(text: str, log_format: str) -> None:
    """The banner: as it is on a terminal (text), else one log record per line, so that
    every line the server writes is a JSON object."""
    if log_format == "text":
        print(text, flush=True)
        return
    log = logging.getLogger("pkigate.serve")
    for line in text.splitlines():
        log.info(line.strip())


def serve(
    config_path: Path | None,
    data_dir: Path | None,
    database_url: str | None,
    workers: int | None,
    *,
    migrate: bool = False,
    log_format: str = "json",
) -> NoReturn:
    from pkigate.gateways.runtime import CLIENT_CA_FILE, Gateway

    config = effective_config(config_path, data_dir, database_url, workers)
    configure_logging(config.log_level, log_format)
    gateway = Gateway.open(config, bootstrap=True, upgrade_schema=migrate)
    tls = gateway.ensure_tls_certificate()
    gateway.ensure_client_ca_bundle()
    token_path = gateway.ensure_admin_token()
    gateway.warn_separated_tokens()
    announce(banner(gateway, token_path, tls), log_format)
    resolved = replace(config, data_dir=gateway.core.data_dir)
    client_cas = gateway.core.data_dir / "tls" / CLIENT_CA_FILE
    settings = ServerSettings(
        http=config.listeners.http,
        https=config.listeners.https,
        workers=config.workers,
        max_connections=config.max_connections,
        header_timeout_seconds=config.header_timeout_seconds,
        body_timeout_seconds=config.body_timeout_seconds,
        keepalive_requests=config.keepalive_requests,
        max_body_bytes=config.max_body_bytes,
        log_level=config.log_level,
        log_format=log_format,
        data_dir=str(gateway.core.data_dir),
        tls_certificate=str(tls[0]),
        tls_key=str(tls[1]),
        client_cas=str(client_cas) if client_cas.exists() else None,
        config_path=str(config_path) if config_path else None,
        database_url=resolved.database_url,
    )
    gateway.close()
    # Become the arbiter (server.py): the same process id, none of this memory. The
    # settings travel in the environment, not on a command line everyone can read (the
    # database URL may carry a password).
    sys.stdout.flush()
    sys.stderr.flush()
    os.environ[SETTINGS_ENV] = settings.to_json()
    os.execv(sys.executable, [sys.executable, "-m", "pkigate.gateways.arbiter"])  # noqa: S606
