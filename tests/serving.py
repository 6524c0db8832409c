"""Start a real `pkigate serve` for a test and talk to it over HTTP(S)."""

from __future__ import annotations

import re
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import requests

from pkigate.devsim.spawn import ServeProcess

PKIGATE = str(Path(sys.executable).parent / "pkigate")


class RunningServer(ServeProcess):
    """`pkigate serve` in the data directory a test names, with its configuration and log
    beside it (``<data_dir>.toml``, ``<data_dir>.log``) and the TLS root in its ``tls``
    folder; starting, readiness and stopping are the simulator's (``ServeProcess``)."""

    def __init__(self, data_dir: Path, timeout: float) -> None:
        super().__init__(
            data_dir.parent,
            timeout,
            data_dir=data_dir,
            config=data_dir.parent / f"{data_dir.name}.toml",
            log_path=data_dir.parent / f"{data_dir.name}.log",
            tls_bundle=data_dir / "tls" / "root.pem",
        )

    @property
    def log(self) -> Path:
        return self.log_path

    @property
    def admin_token(self) -> str:
        return self.token

    def session(self, token: str | None = None) -> requests.Session:
        session = requests.Session()
        # REQUESTS_CA_BUNDLE in the environment would override session.verify otherwise.
        session.trust_env = False
        session.verify = str(self.tls_bundle)
        session.headers["Authorization"] = f"Bearer {token or self.admin_token}"
        return session

    def _exited_early(self) -> Exception:
        log = self.log_tail(1_000_000)
        if "Can't connect to" in log or "Address already in use" in log:
            return PortTaken(f"a listener's port was taken:\n{log[-2000:]}")
        return super()._exited_early()


def issuer_token_and_issuing_ca(server: RunningServer, name: str) -> tuple[str, str]:
    """A new issuer token (made with the admin token) and the id of the server's
    subordinate (issuing) CA."""
    admin = server.session()
    token = admin.post(
        f"{server.https_url}/api/v1/tokens", json={"name": name, "role": "issuer"}, timeout=10
    ).json()["secret"]
    cas = admin.get(f"{server.https_url}/api/v1/cas", timeout=10).json()["cas"]
    return str(token), next(str(ca["id"]) for ca in cas if ca["type"] == "SUBORDINATE")


def console_signin(server: RunningServer, token: str) -> tuple[requests.Session, str]:
    """A web console session signed in with ``token`` (as the sign-in form does it) and a
    CSRF token for its forms."""
    session = requests.Session()
    session.trust_env = False
    session.verify = str(server.tls_bundle)
    url = f"{server.https_url}/console/signin"
    form = session.get(url, timeout=10)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form.text)
    assert csrf is not None, form.text
    signed_in = session.post(url, data={"token": token, "csrf_token": csrf.group(1)}, timeout=10)
    assert signed_in.status_code == 200 and "Sign out" in signed_in.text, signed_in.text
    fresh = re.search(r'name="csrf_token" value="([^"]+)"', signed_in.text)
    assert fresh is not None
    return session, fresh.group(1)


def start_server(
    data_dir: Path,
    *,
    workers: int = 1,
    database_url: str | None = None,
    extra_config: str = "",  # tables, after [listeners]
    top_config: str = "",  # top-level keys
    timeout: float = 60.0,
    environment: Mapping[str, str] | None = None,  # added to the server's environment
) -> RunningServer:
    # A free port can be taken by another process (another xdist worker's server) before
    # gunicorn binds it: then the start is tried again on other ports. A fresh data
    # directory is made again (the CAs made on the first try name the old port in their
    # AIA and CRL URLs); one the caller prepared is kept (its CAs name the port of the start
    # that made them anyway, a restart never changes that).
    fresh = not data_dir.exists()
    for attempt in range(START_ATTEMPTS):
        try:
            return _start_server(
                data_dir, workers, database_url, extra_config, top_config, timeout, environment
            )
        except PortTaken:
            if attempt == START_ATTEMPTS - 1:
                raise
            if fresh:
                shutil.rmtree(data_dir, ignore_errors=True)
    raise AssertionError("unreachable")


START_ATTEMPTS = 3


class PortTaken(RuntimeError):
    pass


def adcs_connector_config(
    directory_url: str,
    base: str | None,
    bind_dn: str,
    bind_password: str,
    *,
    ca_name: str = "pkigate-issuing",
    cache_ttl_seconds: int | None = None,
) -> str:
    """The `[[connectors]]` table of an AD-style connector at /adcs reading ``directory_url``
    (the development directory or a Samba DC), for ``start_server(extra_config=...)``;
    ``base`` None leaves it to the root DSE."""
    ttl = "" if cache_ttl_seconds is None else f"cache_ttl_seconds = {cache_ttl_seconds}\n"
    base_setting = "" if base is None else f'base = "{base}"\n'
    return f"""
[[connectors]]
type = "adcs"
name = "adcs"
mount = "/adcs"
[connectors.settings]
directory_url = "{directory_url}"
{base_setting}bind_dn = "{bind_dn}"
bind_password = "{bind_password}"
ca_name = "{ca_name}"
{ttl}"""


def _start_server(
    data_dir: Path,
    workers: int,
    database_url: str | None,
    extra_config: str,
    top_config: str,
    timeout: float,
    environment: Mapping[str, str] | None,
) -> RunningServer:
    data_dir.mkdir(parents=True, exist_ok=True)
    server = RunningServer(data_dir, timeout)
    server.environment.update(environment or {})
    server.config.write_text(
        f'data_dir = "{data_dir}"\n'
        + (f'database_url = "{database_url}"\n' if database_url else "")
        + f"workers = {workers}\n"
        + top_config  # top-level keys, before the first table
        + f'[listeners]\nhttp = "127.0.0.1:{server.http_port}"\n'
        + f'https = "127.0.0.1:{server.https_port}"\n'
        + extra_config
    )
    server.log_path.write_bytes(b"")  # this start's log only
    server.start()  # stops what it started if the server never becomes ready
    return server


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (a server's workers), now."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(stat[1]) == pid:
                found.append(int(entry.name))
    return found


def eventually_ok(url: str, verify: str | bool = True, seconds: float = 60) -> bool:
    """Whether ``url`` answers 200 within ``seconds`` (a worker being replaced, say)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=5, verify=verify).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.2)
    return False
