"""The servers bench/protocols.py compares, started on loopback, and how to watch them.

* :class:`PkigateServer`: ``pkigate serve --workers W`` with the benchmark's own TOML (an
  RSA-2048 root and issuing CA, and SCEP, ACME and AD-style connectors on that issuing CA).
  Starting, readiness, the TLS root and stopping are the simulator's
  (``pkigate.devsim.spawn.ServeProcess``, as for its ``SpawnedServer``, whose
  configuration has no ``[[cas]]`` table, so an EC issuing CA, and no static challenge).
* :class:`ScepServer`: micromdm's ``scepserver`` (Debian package ``scep``) with a depot of
  its own.
* pebble comes from ``tests/acme_peers.py`` (``PebbleServer``), imported, not copied.

Every process starts in a process group of its own and is stopped by signalling the group.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import requests

from pkigate.devsim.spawn import ServeProcess, free_port
from pkigate.devsim.spawn import stop_process_group as stop_group

SCEPSERVER = "/usr/bin/scepserver"
SCEP_MOUNT = "/scep"
ACME_MOUNT = "/acme"
ADCS_MOUNT = "/adcs"
ADCS_CA_NAME = "pkigate-bench"
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
    """Samples the RSS and PSS sums of a process tree (re-read each time) every
    ``interval`` seconds in a thread; :attr:`peak_mib` (RSS) and :attr:`peak_pss_mib` are
    the largest sums seen."""

    def __init__(self, root_pid: int, interval: float = 0.2) -> None:
        self.root_pid = root_pid
        self.interval = interval
        self.peak_mib = 0.0
        self.peak_pss_mib = 0.0
        self.processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        pids = process_tree(self.root_pid)
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


def wait_until(check: Callable[[], bool], process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            if check():
                return
        except (requests.RequestException, OSError):
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{what} not ready in 120 s")


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


class PkigateServer(ServeProcess):
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
