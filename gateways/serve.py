"""`pkigate serve`: bootstrap once, then run each listener under gunicorn.

The parent process creates what the configuration names (CAs, the HTTPS certificate, the
first admin token), prints every URL, then starts one gunicorn arbiter per listener (plain
HTTP and HTTPS) as child processes and supervises them, as a lean process of its own
(``supervisor.py``, exec'd in place of this one). Each gunicorn worker opens its own
core; everything a request needs lives in the store, so any number of workers (and hosts
sharing a PostgreSQL database) serve the same state.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

from pkigate.gateways.config import GatewayConfig, load_config, parse_config
from pkigate.gateways.logs import configure_logging

METRICS_DIR = "metrics"


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
        f"  workers             {gateway.config.workers} per listener",
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


def serve(
    config_path: Path | None, data_dir: Path | None, database_url: str | None, workers: int | None
) -> NoReturn:
    from pkigate.gateways.runtime import Gateway

    config = effective_config(config_path, data_dir, database_url, workers)
    configure_logging(config.log_level)
    gateway = Gateway.open(config, bootstrap=True)
    tls = gateway.ensure_tls_certificate()
    gateway.ensure_client_ca_bundle()
    token_path = gateway.ensure_admin_token()
    print(banner(gateway, token_path, tls), flush=True)
    resolved_data_dir = gateway.core.data_dir
    gateway.close()

    base = [
        sys.executable,
        "-m",
        "pkigate.gateways.serve",
        "--data-dir",
        str(resolved_data_dir),
        "--workers",
        str(config.workers),
    ]
    if config_path:
        base += ["--config", str(config_path)]
    if database_url:
        base += ["--database-url", database_url]
    # Become the lean supervisor (see supervisor.py): same process, none of this memory.
    sys.stdout.flush()
    sys.stderr.flush()
    metrics_dir = str(resolved_data_dir / METRICS_DIR)
    os.execv(  # noqa: S606 - this interpreter and our own module, no shell
        sys.executable,
        [sys.executable, "-m", "pkigate.gateways.supervisor", metrics_dir, "--", *base],
    )


def run_listener(config: GatewayConfig, listener: str) -> None:
    """One gunicorn arbiter for one listener (runs in a child of `pkigate serve`)."""
    from gunicorn.app.base import BaseApplication
    from prometheus_client import multiprocess

    from pkigate.gateways.app import create_app
    from pkigate.gateways.runtime import CLIENT_CA_FILE, Gateway

    configure_logging(config.log_level)
    address = config.listeners.http if listener == "http" else config.listeners.https
    options: dict[str, Any] = {
        "bind": address,
        "workers": config.workers,
        "worker_class": "gthread",
        "threads": config.threads,
        "timeout": 60,
        "graceful_timeout": 10,
        "keepalive": 5,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": "warning",
        "proc_name": f"pkigate-{listener}",
        "limit_request_line": 8190,
        "child_exit": lambda _server, worker: multiprocess.mark_process_dead(worker.pid),
    }
    if listener == "https":
        if config.listeners.tls_certificate and config.listeners.tls_key:
            options["certfile"] = str(config.listeners.tls_certificate)
            options["keyfile"] = str(config.listeners.tls_key)
        else:
            data_dir = (config.data_dir or Path("pkigate-data")).resolve()
            options["certfile"] = str(data_dir / "tls" / "server.pem")
            options["keyfile"] = str(data_dir / "tls" / "server.key")
        client_cas = (config.data_dir or Path("pkigate-data")).resolve() / "tls" / CLIENT_CA_FILE
        if client_cas.exists():
            # Ask for a client certificate but do not require one: the AD-style connector
            # maps certificates it issued back to their principal for renewal.
            options["cert_reqs"] = ssl.CERT_OPTIONAL
            options["ca_certs"] = str(client_cas)

    class ListenerApplication(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in options.items():
                self.cfg.set(key, value)
            if "control_socket_disable" in self.cfg.settings:
                # gunicorn >= 25 opens a control socket at one path per user
                # ($XDG_RUNTIME_DIR or ~/.gunicorn/gunicorn.ctl) that both of our arbiters,
                # and every other pkigate on the host, would share: the supervisor is the
                # control interface here.
                self.cfg.set("control_socket_disable", True)

        def load(self) -> Any:
            # Runs in each worker after the fork: every worker has its own connections.
            gateway = Gateway.open(config)
            gateway.start_background_work()
            return create_app(gateway, listener)  # type: ignore[arg-type]

    ListenerApplication().run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pkigate-listener")
    parser.add_argument("--config", type=Path)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--database-url")
    parser.add_argument("--workers", type=int)
    parser.add_argument("--listener", choices=["http", "https"], required=True)
    args = parser.parse_args(argv)
    config = effective_config(args.config, args.data_dir, args.database_url, args.workers)
    run_listener(config, args.listener)


if __name__ == "__main__":
    main()
