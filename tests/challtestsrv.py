"""pebble-challtestsrv, Let's Encrypt's mock DNS server, run on loopback for tests.

Debian's ``pebble`` package (2.4.0) installs ``/usr/bin/pebble-challtestsrv``. Only its DNS
server and management API are started: A queries for names without a mock are answered
with ``default_ipv4`` (127.0.0.1), AAAA only for mocked names, TXT from ``set_txt``.
Both ports are free ones, so parallel pytest-xdist workers each get their own server::

    @pytest.fixture(scope="module")
    def challtestsrv() -> Iterator[ChallTestServer]:
        if not ChallTestServer.available():
            pytest.skip("pebble-challtestsrv is not installed (Debian package pebble)")
        with ChallTestServer() as server:
            yield server

    resolver = challtestsrv.dns_address  # ("127.0.0.1", port) for dnspython
    challtestsrv.set_txt("_acme-challenge.web.example.test.", value)

Host names may be given with or without the trailing dot. Records set by one test stay
until cleared, so tests use names of their own.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from types import TracebackType
from typing import IO, Any

import dns.exception
import dns.message
import dns.query
import dns.rdatatype
import requests

BINARY = "pebble-challtestsrv"
START_ATTEMPTS = 3  # a free port can be taken by another process before the server binds it


def _free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _free_udp_tcp_port() -> int:
    """A port free for both UDP and TCP (DNS listens on both)."""
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


def _kill(process: subprocess.Popen[bytes]) -> None:
    """Stop the server's process group: politely, then for good."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(5)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)
    except ProcessLookupError:
        process.wait(5)


class ChallTestServer:
    """One pebble-challtestsrv process: DNS on ``dns_address``, management on
    ``management_url``. ``start()``/``stop()`` or use it as a context manager."""

    def __init__(
        self,
        *,
        default_ipv4: str = "127.0.0.1",
        default_ipv6: str = "",
        binary: str = BINARY,
        start_timeout: float = 10.0,
    ) -> None:
        self.default_ipv4 = default_ipv4
        self.default_ipv6 = default_ipv6
        self.binary = binary
        self.start_timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._dns_port = 0
        self._management_port = 0
        self._session = requests.Session()
        self._session.trust_env = False  # an HTTP(S)_PROXY must not see loopback calls
        self._finalizer: weakref.finalize[Any, Any] | None = None

    @staticmethod
    def available(binary: str = BINARY) -> bool:
        return shutil.which(binary) is not None

    @property
    def dns_address(self) -> tuple[str, int]:
        """(host, port) of the DNS server, for a dnspython resolver."""
        self._require_running()
        return ("127.0.0.1", self._dns_port)

    @property
    def dns_server(self) -> str:
        """``127.0.0.1:port``, the form pebble's ``-dnsserver`` takes."""
        host, port = self.dns_address
        return f"{host}:{port}"

    @property
    def management_url(self) -> str:
        self._require_running()
        return f"http://127.0.0.1:{self._management_port}"

    def start(self) -> ChallTestServer:
        if self._process is not None:
            raise RuntimeError("pebble-challtestsrv is already running")
        failures: list[str] = []
        for _ in range(START_ATTEMPTS):
            self._spawn()
            failure = self._wait_ready()
            if failure is None:
                return self
            failures.append(f"{failure}; output: {self._output()[-2000:]!r}")
            self.stop()
        raise RuntimeError(f"{self.binary} did not start: " + " | ".join(failures))

    def stop(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # kills the process once; a no-op when called again
            self._finalizer = None
        self._process = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ChallTestServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # --- mock DNS data (the management API of pebble-challtestsrv 2.4.0) ---

    def set_txt(self, host: str, value: str) -> None:
        """Add ``value`` to the TXT records of ``host`` (earlier values stay)."""
        self._post("/set-txt", {"host": _fqdn(host), "value": value})

    def clear_txt(self, host: str) -> None:
        self._post("/clear-txt", {"host": _fqdn(host)})

    def add_a(self, host: str, addresses: Sequence[str]) -> None:
        """Answer A queries for ``host`` with ``addresses``, in this order."""
        self._post("/add-a", {"host": _fqdn(host), "addresses": list(addresses)})

    def clear_a(self, host: str) -> None:
        self._post("/clear-a", {"host": _fqdn(host)})

    def add_aaaa(self, host: str, addresses: Sequence[str]) -> None:
        self._post("/add-aaaa", {"host": _fqdn(host), "addresses": list(addresses)})

    def clear_aaaa(self, host: str) -> None:
        self._post("/clear-aaaa", {"host": _fqdn(host)})

    def set_cname(self, host: str, target: str) -> None:
        """Answer queries for ``host`` with a CNAME to ``target`` and ``target``'s records."""
        self._post("/set-cname", {"host": _fqdn(host), "target": _fqdn(target)})

    def clear_cname(self, host: str) -> None:
        self._post("/clear-cname", {"host": _fqdn(host)})

    def set_servfail(self, host: str) -> None:
        """Answer every query for ``host`` with SERVFAIL."""
        self._post("/set-servfail", {"host": _fqdn(host)})

    def clear_servfail(self, host: str) -> None:
        self._post("/clear-servfail", {"host": _fqdn(host)})

    def set_default_ipv4(self, ip: str) -> None:
        """The answer to A queries for names without a mock; "" answers nothing."""
        self._post("/set-default-ipv4", {"ip": ip})

    def set_default_ipv6(self, ip: str) -> None:
        self._post("/set-default-ipv6", {"ip": ip})

    # --- internals ---

    def _require_running(self) -> None:
        if self._process is None:
            raise RuntimeError("pebble-challtestsrv is not running: call start()")

    def _spawn(self) -> None:
        self._dns_port = _free_udp_tcp_port()
        self._management_port = _free_tcp_port()
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - open while the server runs, closed in stop()
        self._process = subprocess.Popen(
            [
                self.binary,
                "-dns01",
                f"127.0.0.1:{self._dns_port}",
                "-management",
                f"127.0.0.1:{self._management_port}",
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-defaultIPv4",
                self.default_ipv4,
                "-defaultIPv6",
                self.default_ipv6,
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so _kill reaches all of it
        )
        # Kill it even if the test session forgets stop() (interpreter exit, lost object).
        self._finalizer = weakref.finalize(self, _kill, self._process)

    def _wait_ready(self) -> str | None:
        """None once both DNS and management answer, else why not."""
        assert self._process is not None
        deadline = time.monotonic() + self.start_timeout
        query = dns.message.make_query("ready.challtestsrv.test.", dns.rdatatype.A)
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                return f"exited with status {self._process.returncode}"
            try:
                dns.query.udp(query, "127.0.0.1", port=self._dns_port, timeout=0.2)
                # Any HTTP answer (404 for "/") means the management API listens.
                self._session.get(f"http://127.0.0.1:{self._management_port}/", timeout=1)
                return None
            except (OSError, dns.exception.DNSException, requests.RequestException):
                time.sleep(0.02)
        return f"not ready after {self.start_timeout:g}s"

    def _output(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode("utf-8", "replace")

    def _post(self, path: str, payload: dict[str, Any]) -> None:
        response = self._session.post(f"{self.management_url}{path}", json=payload, timeout=5)
        if response.status_code != 200:
            raise RuntimeError(
                f"pebble-challtestsrv {path} {payload} answered {response.status_code}: "
                f"{response.text[:200]}"
            )


def _fqdn(host: str) -> str:
    return host if host.endswith(".") else f"{host}."
