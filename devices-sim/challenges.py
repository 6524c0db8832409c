"""Where the simulated servers answer ACME challenges: an http-01 responder on loopback and
the test DNS server for dns-01.

The http-01 responder is what a web server in front of certbot's webroot does: it serves
``/.well-known/acme-challenge/<token>`` from the key authorizations the servers put in.
pkigate's ACME connector is told its port (``http01_port``) and resolves every name with
the test DNS server (``dns_resolver``), which answers 127.0.0.1 for any name and the TXT
records the servers set for dns-01.

The test DNS server is pebble-challtestsrv (Debian package ``pebble``), Let's Encrypt's
mock DNS: :class:`ChallengeDns` starts one on free loopback ports, or drives one that is
already running through its management API.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from typing import IO, Any

import dns.exception
import dns.message
import dns.query
import dns.rdatatype
import requests

CHALLTESTSRV = "pebble-challtestsrv"
WELL_KNOWN = "/.well-known/acme-challenge/"


class Http01Responder:
    """Answers ``/.well-known/acme-challenge/<token>`` on 127.0.0.1:``port`` (0: a free
    port) with the key authorizations in :attr:`tokens`."""

    def __init__(self, port: int = 0) -> None:
        self.tokens: dict[str, str] = {}
        tokens = self.tokens

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = None
                if self.path.startswith(WELL_KNOWN):
                    body = tokens.get(self.path[len(WELL_KNOWN) :])
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="http01-responder", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class ChallengeDns:
    """pebble-challtestsrv's DNS server and the mock records of its management API.

    :meth:`start` runs a private instance on free loopback ports (``resolver`` is then
    the ``HOST:PORT`` to give pkigate as ``dns_resolver``, or pebble as ``-dnsserver``);
    with ``management_url`` an instance started elsewhere is used and never stopped. A
    started instance is killed with its process group on :meth:`stop`, or when the object
    is forgotten (interpreter exit). Names may be given with or without the trailing dot.
    """

    def __init__(self, management_url: str | None = None, resolver: str | None = None) -> None:
        self.management_url = management_url
        self.resolver = resolver
        self._process: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._log: IO[bytes] | None = None
        self._session = requests.Session()
        self._session.trust_env = False  # a proxy in the environment must not see loopback
        self._lock = threading.Lock()  # one Session, shared by every device thread

    @staticmethod
    def available() -> bool:
        return shutil.which(CHALLTESTSRV) is not None

    @property
    def dns_address(self) -> tuple[str, int]:
        """(host, port) of the DNS server, for a dnspython resolver."""
        if self.resolver is None:
            raise RuntimeError("the test DNS server is not running")
        host, port = self.resolver.rsplit(":", 1)
        return host, int(port)

    @property
    def dns_server(self) -> str:
        """``127.0.0.1:port``, the form pebble's ``-dnsserver`` and lego's resolvers take."""
        host, port = self.dns_address
        return f"{host}:{port}"

    def start(self, attempts: int = 3, timeout: float = 10.0) -> ChallengeDns:
        binary = shutil.which(CHALLTESTSRV)
        if binary is None:
            raise RuntimeError(
                f"{CHALLTESTSRV} is not installed (Debian package `pebble`): the simulated "
                "servers need it to answer dns-01 and to resolve their names for http-01"
            )
        problems = []
        for _ in range(attempts):  # a free port may be taken before the server binds it
            dns_port, management_port = _free_udp_and_tcp_port(), _free_tcp_port()
            self._log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
            self._process = subprocess.Popen(
                [
                    binary,
                    "-dns01",
                    f"127.0.0.1:{dns_port}",
                    "-management",
                    f"127.0.0.1:{management_port}",
                    "-http01",
                    "",
                    "-https01",
                    "",
                    "-tlsalpn01",
                    "",
                    "-defaultIPv4",
                    "127.0.0.1",
                    "-defaultIPv6",
                    "",
                ],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, so _kill reaches all of it
            )
            self._finalizer = weakref.finalize(self, _kill, self._process)
            self.management_url = f"http://127.0.0.1:{management_port}"
            self.resolver = f"127.0.0.1:{dns_port}"
            if self._wait_ready(dns_port, timeout):
                return self
            problems.append(self._output()[-500:])
            self.stop()
        raise RuntimeError(f"{CHALLTESTSRV} did not start: {' | '.join(problems)}")

    def __enter__(self) -> ChallengeDns:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _wait_ready(self, dns_port: int, timeout: float) -> bool:
        """True once both the DNS server and the management API answer."""
        assert self._process is not None
        deadline = time.monotonic() + timeout
        query = dns.message.make_query("ready.challtestsrv.test.", dns.rdatatype.A)
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return False
            try:
                dns.query.udp(query, "127.0.0.1", port=dns_port, timeout=0.2)
                # Any HTTP answer (404 for "/") means the management API listens.
                self._session.get(f"{self.management_url}/", timeout=1)
                return True
            except (OSError, dns.exception.DNSException, requests.RequestException):
                time.sleep(0.02)
        return False

    def _output(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def stop(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # kills the process group once; a no-op when called again
            self._finalizer = None
        self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def set_txt(self, name: str, value: str) -> None:
        """Add ``value`` to the TXT records of ``name`` (earlier values stay)."""
        self._post("/set-txt", {"host": _fqdn(name), "value": value})

    def clear_txt(self, name: str) -> None:
        self._post("/clear-txt", {"host": _fqdn(name)})

    def _post(self, path: str, body: dict[str, Any]) -> None:
        if self.management_url is None:
            raise RuntimeError("the test DNS server is not running")
        with self._lock:
            response = self._session.post(f"{self.management_url}{path}", json=body, timeout=10)
        if response.status_code != 200:
            raise RuntimeError(
                f"{CHALLTESTSRV} {path}: HTTP {response.status_code} {response.text[:200]}"
            )


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    process.wait(10)


def _fqdn(name: str) -> str:
    return name if name.endswith(".") else f"{name}."


def _free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _free_udp_and_tcp_port() -> int:
    """A port free for both UDP and TCP: DNS listens on both."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = int(udp.getsockname()[1])
            with socket.socket() as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
