"""A `pkigate serve` of the simulator's own (``pkigate-sim run --spawn``), and fault mode.

:class:`SpawnedServer` writes a TOML configuration for free loopback ports, starts
``pkigate serve`` in a process group of its own (gunicorn arbiters and workers included),
waits until both listeners are ready, and can kill the whole group with SIGKILL and start
it again on the same ports and data. The configuration:

* a SCEP connector ``scep`` (one-time challenges from the management API) and a SCEP
  connector ``mdm-pending`` that holds requests for approval, both issuing one-day
  certificates, the failed-challenge limit raised (every phone comes from 127.0.0.1, and
  in fault mode a challenge spent by a request whose answer was lost counts as a failure);
* an ACME connector ``acme`` issuing one-day certificates, validating http-01 on the
  simulator's responder port and resolving every name with the test DNS server, with the
  authorization reuse window at one second: in simulated time every renewal comes long
  after a real 30-day window, so each order proves control again, as in production.
* each CA regenerates its CRL one second after a revocation (set through the management
  API, as an operator would), so that runs do not wait out the default ten seconds.

:class:`ServerKiller` is fault mode: every ``every`` seconds of uptime it kills the server
(SIGKILL to the process group) and starts it again, up to ``limit`` times. A server that
comes back for two seconds at a time lets little finish (an ACME order takes a second or
more, and a validation job killed in its middle waits out its 60-second lease), so a limit
lets a run show the devices recovering, not only being cut off.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import AuthorityInformationAccessOID
from ldap3 import MODIFY_REPLACE

from pkigate.adcs.directory import DevDirectory
from pkigate.adcs.encoding import interval_to_filetime
from pkigate.adcs.layout import template_dn
from pkigate.devsim.config import Target

SCEP_CONNECTOR = "scep"
PENDING_CONNECTOR = "mdm-pending"
ACME_MOUNT = "/acme"
ADCS_MOUNT = "/adcs"
MACHINE_TEMPLATE = "Machine"
CERTIFICATE_VALIDITY = "1d"
CERTIFICATE_LIFETIME = timedelta(days=1)
CRL_REGENERATE_DELAY_SECONDS = 1
MAX_CHALLENGE_FAILURES = 100_000


def stop_process_group(process: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    """SIGTERM the process group led by ``process`` (started with start_new_session=True),
    wait up to ``timeout``, then SIGKILL the group: a leader that ignored SIGTERM, or
    children it did not take down with it (gunicorn workers, say)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pkigate_command() -> list[str]:
    """`pkigate` from this environment."""
    beside = Path(sys.executable).parent / "pkigate"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("pkigate")
    return [found] if found else [sys.executable, "-m", "pkigate.gateways.cli"]


def server_config(
    data_dir: Path,
    http: str,
    https: str,
    *,
    http01_port: int,
    dns_resolver: str | None,
    database_url: str | None = None,
    workers: int = 1,
    directory: DevDirectory | None = None,
) -> str:
    """The spawned server's TOML configuration (see the module docstring)."""
    lines = [
        f'data_dir = "{data_dir}"',
        *([f'database_url = "{database_url}"'] if database_url else []),
        f"workers = {workers}",
        "[listeners]",
        f'http = "{http}"',
        f'https = "{https}"',
    ]
    for name, mount, pending in (
        (SCEP_CONNECTOR, "/scep", False),
        (PENDING_CONNECTOR, "/mdm-pending", True),
    ):
        lines += [
            "[[connectors]]",
            'type = "scep"',
            f'name = "{name}"',
            f'mount = "{mount}"',
            f'validity = "{CERTIFICATE_VALIDITY}"',
            "[connectors.settings]",
            f"pending = {'true' if pending else 'false'}",
            f"max_failures = {MAX_CHALLENGE_FAILURES}",
        ]
    lines += [
        "[[connectors]]",
        'type = "acme"',
        'name = "acme"',
        f'mount = "{ACME_MOUNT}"',
        f'validity = "{CERTIFICATE_VALIDITY}"',
        "[connectors.settings]",
        f"http01_port = {http01_port}",
        *([f'dns_resolver = "{dns_resolver}"'] if dns_resolver else []),
        "authorization_reuse_seconds = 1",
        "orders_per_account_per_hour = 10000000",
        "failed_validations_per_identifier_per_hour = 10000000",
    ]
    if directory is not None:
        lines += [
            "[[connectors]]",
            'type = "adcs"',
            'name = "adcs"',
            f'mount = "{ADCS_MOUNT}"',
            "[connectors.settings]",
            f'directory_url = "{directory.url}"',
            f'base = "{directory.base}"',
            f'bind_dn = "{directory.admin_dn}"',
            f'bind_password = "{directory.admin_password}"',
        ]
    return "\n".join(lines) + "\n"


class ServeProcess:
    """``pkigate serve --config FILE`` on two free loopback ports, in ``base_dir``.

    The caller writes :attr:`config` (it names the ports: :attr:`http_port`,
    :attr:`https_port`) before :meth:`start`, which starts the server in a process group
    of its own (gunicorn arbiters and workers included), waits until both listeners are
    ready and writes the TLS root to :attr:`tls_bundle`.
    """

    def __init__(
        self,
        base_dir: Path,
        ready_timeout: float = 120.0,
        *,
        data_dir: Path | None = None,
        config: Path | None = None,
        log_path: Path | None = None,
        tls_bundle: Path | None = None,
    ) -> None:
        self.base_dir = base_dir
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = data_dir or self.base_dir / "data"
        self.ready_timeout = ready_timeout
        self.http_port, self.https_port = free_port(), free_port()
        self.http_url = f"http://127.0.0.1:{self.http_port}"
        self.https_url = f"https://127.0.0.1:{self.https_port}"
        self.config = config or self.base_dir / "pkigate.toml"
        self.log_path = log_path or self.base_dir / "pkigate.log"
        if tls_bundle is None:
            self.tls_bundle = self.base_dir / "root.pem"
            self.tls_bundle.unlink(missing_ok=True)  # an earlier run's, in this directory
        else:
            self.tls_bundle = tls_bundle  # the caller's: it stays with the data it belongs to
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        # Added to the server's environment (PKIGATE_KEK for hosts that share a database).
        self.environment: dict[str, str] = {}

    @property
    def token(self) -> str:
        return (self.data_dir / "admin-token").read_text().strip()

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self._process

    @property
    def command(self) -> list[str]:
        return [*pkigate_command(), "serve", "--config", str(self.config)]

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start `pkigate serve` and wait until both listeners are ready."""
        if self._process is not None and self._process.poll() is None:
            raise RuntimeError("the server is running already")
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            self.command,
            env={**configuration_only_environment(), **self.environment},
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a process group: one signal reaches every worker
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()  # never leave a server behind when the start fails
            raise

    def kill(self) -> None:
        """SIGKILL the whole process group, as a power cut would."""
        process = self._process
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)
        self._close_log()

    def stop(self) -> int | None:
        """SIGTERM the process group (gunicorn finishes its requests), SIGKILL if slow; the
        exit status of `pkigate serve` (None if it was not running)."""
        process, self._process = self._process, None
        if process is not None:
            stop_process_group(process, timeout=20)
        self._close_log()
        return None if process is None else process.returncode

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, characters: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-characters:]
        except OSError:
            return ""

    def _wait_ready(self) -> None:
        process = self._process
        assert process is not None
        deadline = time.monotonic() + self.ready_timeout
        session = requests.Session()
        session.trust_env = False
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise self._exited_early()
            try:
                if session.get(f"{self.http_url}/readyz", timeout=2).status_code == 200:
                    if not self.tls_bundle.exists():
                        self._write_root(session)
                    https = session.get(
                        f"{self.https_url}/readyz", timeout=2, verify=str(self.tls_bundle)
                    )
                    if https.status_code == 200:
                        return
            except (requests.RequestException, OSError):  # not up yet, or busy
                pass
            time.sleep(0.1)
        raise TimeoutError(f"pkigate serve not ready in {self.ready_timeout}s:\n{self.log_tail()}")

    def _exited_early(self) -> Exception:
        return RuntimeError(f"pkigate serve exited early:\n{self.log_tail()}")

    def _write_root(self, session: requests.Session) -> None:
        """The root, found by following the AIA of the HTTPS certificate's issuer over
        plain HTTP, as a client bootstrapping its trust would."""
        chain = x509.load_pem_x509_certificates((self.data_dir / "tls" / "server.pem").read_bytes())
        aia = chain[-1].extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
        url = next(
            str(d.access_location.value)
            for d in aia
            if d.access_method == AuthorityInformationAccessOID.CA_ISSUERS
        )
        response = session.get(url, timeout=10)
        response.raise_for_status()
        root = x509.load_der_x509_certificate(response.content)
        self.tls_bundle.write_bytes(root.public_bytes(serialization.Encoding.PEM))

    def publish(self, connector: str, template: str) -> None:
        """``pkigate adcs publish``: register the CA for ``template`` in the directory, as an
        enterprise CA admin would."""
        published = subprocess.run(
            [
                *pkigate_command(),
                "adcs",
                "--config",
                str(self.config),
                "publish",
                "--connector",
                connector,
                "--template",
                template,
                # The development directory's seeded templates are the fixture.
                "--keep-existing-templates",
            ],
            env=configuration_only_environment(),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if published.returncode != 0:
            raise RuntimeError(f"pkigate adcs publish failed: {published.stderr}")


def configuration_only_environment() -> dict[str, str]:
    """This environment without pkigate's own variables: the configuration file says
    everything (where the data and the database are)."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("PKIGATE_HOME", "PKIGATE_CONFIG", "PKIGATE_DATABASE_URL")
    }


class SpawnedServer(ServeProcess):
    """The simulator's ``pkigate serve`` (see the module docstring), in ``base_dir`` or a
    temporary directory."""

    def __init__(
        self,
        *,
        http01_port: int,
        dns_resolver: str | None,
        workers: int = 2,
        database_url: str | None = None,
        base_dir: Path | None = None,
        ready_timeout: float = 120.0,
        machines: bool = False,
        extra_config: str = "",
    ) -> None:
        self._temporary = base_dir is None
        super().__init__(
            Path(tempfile.mkdtemp(prefix="pkigate-sim-")) if base_dir is None else base_dir,
            ready_timeout,
        )
        self.database_url = database_url
        # AD-style machines need a directory: the development one, on a free port, for
        # the whole run (fault mode kills pkigate, not the domain controller).
        self.directory: DevDirectory | None = None
        if machines:
            self.directory = DevDirectory(self.base_dir / "directory").start()
        self.config.write_text(
            server_config(
                self.data_dir,
                f"127.0.0.1:{self.http_port}",
                f"127.0.0.1:{self.https_port}",
                http01_port=http01_port,
                dns_resolver=dns_resolver,
                database_url=database_url,
                workers=workers,
                directory=self.directory,
            )
            + extra_config
        )
        self.http01_port = http01_port
        self.dns_resolver = dns_resolver
        self.starts = 0

    def start(self) -> None:
        super().start()
        if self.starts == 0:
            self._first_start()
        self.starts += 1

    def remove(self) -> None:
        """Stop the directory and delete the temporary directory (a directory given by the
        caller stays)."""
        if self.directory is not None:
            self.directory.stop()
        if self._temporary:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def _first_start(self) -> None:
        """Shorten the CRL regeneration delay of every CA, through the management API."""
        session = requests.Session()
        session.trust_env = False
        session.verify = str(self.tls_bundle)
        session.headers["Authorization"] = f"Bearer {self.token}"
        listed = session.get(f"{self.https_url}/api/v1/cas", timeout=30)
        listed.raise_for_status()
        for ca in listed.json()["cas"]:
            if ca["status"] != "ACTIVE":
                continue
            changed = session.patch(
                f"{self.https_url}/api/v1/cas/{ca['id']}",
                json={"settings": {"crl_regenerate_delay_seconds": CRL_REGENERATE_DELAY_SECONDS}},
                timeout=30,
            )
            changed.raise_for_status()
        if self.directory is not None:
            self._publish_machine_template()

    def _publish_machine_template(self) -> None:
        """Give the Machine template the run's short lifetime, and register the CA for it
        in the directory (`pkigate adcs publish`), as an enterprise CA admin would."""
        assert self.directory is not None
        conn = self.directory.admin_connection()
        try:
            changed = conn.modify(
                template_dn(self.directory.base, MACHINE_TEMPLATE),
                {
                    "pKIExpirationPeriod": [
                        (MODIFY_REPLACE, [interval_to_filetime(CERTIFICATE_LIFETIME)])
                    ],
                    "pKIOverlapPeriod": [
                        (MODIFY_REPLACE, [interval_to_filetime(CERTIFICATE_LIFETIME / 3)])
                    ],
                },
            )
            if not changed:
                raise RuntimeError(f"cannot shorten the Machine template: {conn.result}")
        finally:
            conn.unbind()
        self.publish("adcs", MACHINE_TEMPLATE)

    def target(self) -> Target:
        return Target(
            http_url=self.http_url,
            https_url=self.https_url,
            root=x509.load_pem_x509_certificate(self.tls_bundle.read_bytes()),
            tls_bundle=self.tls_bundle,
            token=self.token,
            scep_connector=SCEP_CONNECTOR,
            pending_connector=PENDING_CONNECTOR,
            acme_mount=ACME_MOUNT,
            http01_port=self.http01_port,
            max_lifetime=CERTIFICATE_LIFETIME,
            data_dir=self.data_dir,
            database_url=self.database_url,
            adcs_mount=ADCS_MOUNT if self.directory is not None else None,
            directory=self.directory,
        )


class ServerKiller:
    """Fault mode: after each ``every`` seconds of uptime, SIGKILL the server and start it
    again, at most ``limit`` times (a :class:`~pkigate.devsim.fleet.Disruption`)."""

    def __init__(self, server: SpawnedServer, every: float, limit: int | None = None) -> None:
        if every <= 0:
            raise ValueError("kill-server-every must be positive")
        self.server = server
        self.every = every
        self.limit = limit
        self.moments: list[float] = []
        self.restart_seconds: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self, elapsed: Callable[[], float]) -> None:
        def run() -> None:
            while not self._stop.wait(self.every):
                if self.limit is not None and len(self.moments) >= self.limit:
                    return  # the rest of the run shows the recovery
                self.moments.append(elapsed())
                self.server.kill()
                began = time.monotonic()
                try:
                    self.server.start()
                except BaseException as exc:  # the run ends with the server down: report it
                    self.error = exc
                    return
                self.restart_seconds.append(time.monotonic() - began)

        self._thread = threading.Thread(target=run, name="server-killer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop killing; a restart under way finishes first, so the server answers."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.error is not None:
            raise RuntimeError(f"the server did not come back after a kill: {self.error}")
