"""Start a real `pkigate serve` for a test and talk to it over HTTP(S)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from pkigate.devsim.spawn import free_port

PKIGATE = str(Path(sys.executable).parent / "pkigate")


@dataclass
class RunningServer:
    process: subprocess.Popen[str]
    data_dir: Path
    http_url: str
    https_url: str
    log: Path

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "admin-token").read_text().strip()

    @property
    def tls_bundle(self) -> Path:
        """The root that signed the HTTPS certificate, for `verify=`."""
        return self.data_dir / "tls" / "root.pem"

    def session(self, token: str | None = None) -> requests.Session:
        session = requests.Session()
        # REQUESTS_CA_BUNDLE in the environment would override session.verify otherwise.
        session.trust_env = False
        session.verify = str(self.tls_bundle)
        session.headers["Authorization"] = f"Bearer {token or self.admin_token}"
        return session

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        return self.process.returncode


def start_server(
    data_dir: Path,
    *,
    workers: int = 1,
    database_url: str | None = None,
    extra_config: str = "",
    timeout: float = 60.0,
) -> RunningServer:
    # A free port can be taken by another process (another xdist worker's server) before
    # gunicorn binds it: then a fresh data directory is started on other ports (the CAs
    # made on the first try name the old port in their AIA and CRL URLs). A data directory
    # the caller prepared is not thrown away: that start fails.
    fresh = not data_dir.exists()
    for attempt in range(START_ATTEMPTS):
        try:
            return _start_server(data_dir, workers, database_url, extra_config, timeout)
        except PortTaken:
            if not fresh or attempt == START_ATTEMPTS - 1:
                raise
            shutil.rmtree(data_dir, ignore_errors=True)
    raise AssertionError("unreachable")


START_ATTEMPTS = 3


class PortTaken(RuntimeError):
    pass


def _start_server(
    data_dir: Path,
    workers: int,
    database_url: str | None,
    extra_config: str,
    timeout: float,
) -> RunningServer:
    http_port, https_port = free_port(), free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    config = data_dir.parent / f"{data_dir.name}.toml"
    config.write_text(
        f'data_dir = "{data_dir}"\n'
        + (f'database_url = "{database_url}"\n' if database_url else "")
        + f'[listeners]\nhttp = "127.0.0.1:{http_port}"\nhttps = "127.0.0.1:{https_port}"\n'
        + extra_config
    )
    log = data_dir.parent / f"{data_dir.name}.log"
    process = subprocess.Popen(
        [PKIGATE, "serve", "--config", str(config), "--workers", str(workers)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    server = RunningServer(
        process, data_dir, f"http://127.0.0.1:{http_port}", f"https://127.0.0.1:{https_port}", log
    )
    try:
        _wait_until_ready(server, timeout)
    except BaseException:
        server.stop()  # never leave a server behind when the start fails
        raise
    return server


def _wait_until_ready(server: RunningServer, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            log = server.log.read_text()
            if "Can't connect to" in log or "Address already in use" in log:
                raise PortTaken(f"a listener's port was taken:\n{log[-2000:]}")
            raise RuntimeError(f"pkigate serve exited early:\n{log}")
        try:
            ready_http = requests.get(f"{server.http_url}/readyz", timeout=2).status_code
            if not server.tls_bundle.exists():
                _write_root(server)
            ready_https = requests.get(
                f"{server.https_url}/readyz", timeout=2, verify=str(server.tls_bundle)
            ).status_code
            if ready_http == ready_https == 200:
                return
        except (requests.RequestException, FileNotFoundError):  # not up yet, or busy
            pass
        time.sleep(0.2)
    raise TimeoutError(f"pkigate serve not ready in {timeout}s:\n{server.log.read_text()}")


def _write_root(server: RunningServer) -> None:
    """Fetch the root over plain HTTP (its AIA URL), as a client bootstrapping trust would."""
    chain = (server.data_dir / "tls" / "server.pem").read_text()
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    issuer = x509.load_pem_x509_certificates(chain.encode())[-1]
    aia = issuer.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    url = next(
        d.access_location.value
        for d in aia
        if d.access_method == x509.oid.AuthorityInformationAccessOID.CA_ISSUERS
    )
    root = x509.load_der_x509_certificate(requests.get(url, timeout=5).content)
    server.tls_bundle.write_bytes(root.public_bytes(serialization.Encoding.PEM))
