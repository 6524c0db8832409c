"""Service under slow clients: K slowloris connections held on each listener while normal
clients run OCSP GETs, SCEP enrollments and /healthz probes against the same server.

A slowloris connection sends a request line, then one more header line every few seconds
and never finishes its request: a server that gives each open request a worker (or a
thread) stops answering everybody else once K reaches its worker count. On the HTTPS
listener each one completes its TLS handshake first (the server holds a TLS session for it
as well). When the server closes one (a header read timeout), the attacker opens another at
once, as a real attack does, so K stay held; the reconnects are counted.

For each K in ``--slow`` (default 0, 10, 100, 1000) one run starts ``pkigate serve
--workers W`` afresh (an EC P-256 root and issuing CA, a SCEP connector with a static
challenge on that CA), opens K slow connections per listener, and then C client threads
(default 8) take turns, for ``--seconds`` seconds:

* OCSP GET ``/ocsp/<ca>/<base64 request>`` for a certificate issued before the timing
  (the answer parsed, status GOOD, signature checked);
* a SCEP PKCSReq (a fresh subject, RSA-2048 device key; the CertRep's signature checked,
  the reply decrypted, the certificate checked);
* ``/healthz`` on the HTTP and on the HTTPS listener.

It prints, per K and kind: operations/s, p50 and p99 latency, errors (timeouts included),
the slow connections held at the end and how often the server closed one, and the peak PSS
of the server's process tree. Figures, not a test: the exit status is non-zero only when
the harness itself failed. Targets from the serving issue: with K = 1000 per listener, OCSP
and SCEP p99 < 250 ms and zero errors.

    .venv/bin/python bench/slow_clients.py [--quick] [--slow 0,10,100,1000] [--seconds S]
        [--clients C] [--workers W] [--json FILE]
"""

from __future__ import annotations

import argparse
import base64
import json
import multiprocessing
import os
import selectors
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from pkigate.devsim.scep_client import (
    CaCertificates,
    ScepClient,
    certificate_request,
    new_transaction_id,
    self_signed,
)
from pkigate.devsim.spawn import ServeProcess
from pkigate.scep.messages import PkiStatus

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))
from _peers import RssSampler, plain_session  # noqa: E402

CHALLENGE = "slow-clients-bench-challenge"
HEADER_INTERVAL_S = 2.0  # one header line per slow connection this often
REQUEST_TIMEOUT_S = 10.0
OPEN_TIMEOUT_S = 2.0  # a slow connection the server does not take (or handshake) in time
FILL_SECONDS = 60.0  # how long the attack may take to open its K connections
RSA_POOL = 16
TARGET_P99_MS = 250.0


def progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


# -- the server -----------------------------------------------------------------------------


class BenchServer(ServeProcess):
    """``pkigate serve`` with the embedded default's CAs and one SCEP connector whose
    static challenge the benchmark knows."""

    def __init__(self, base_dir: Path, workers: int) -> None:
        super().__init__(base_dir)
        self.config.write_text(
            f'data_dir = "{self.data_dir}"\n'
            f"workers = {workers}\n"
            "[listeners]\n"
            f'http = "127.0.0.1:{self.http_port}"\n'
            f'https = "127.0.0.1:{self.https_port}"\n'
            "[[connectors]]\n"
            'type = "scep"\n'
            'name = "scep"\n'
            'mount = "/scep"\n'
            "[connectors.settings]\n"
            f'challenge = "{CHALLENGE}"\n'
            "dynamic_challenges = false\n"
        )


# -- the attackers --------------------------------------------------------------------------


class SlowLoris:
    """Holds ``count`` slow requests open on ``port`` (TLS when ``tls`` is a context) from one
    thread: a request line at connect, then a header line every HEADER_INTERVAL_S; a
    connection the server closes is replaced at once."""

    def __init__(self, port: int, count: int, tls: ssl.SSLContext | None) -> None:
        self.port = port
        self.count = count
        self.tls = tls
        self.selector = selectors.DefaultSelector()
        self.sockets: dict[socket.socket, float] = {}  # socket -> when it last sent
        self.closed_by_server = 0
        self.connect_failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"slowloris-{port}", daemon=True)

    def _open(self) -> None:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=OPEN_TIMEOUT_S)
        sock: socket.socket = raw
        if self.tls is not None:
            sock = self.tls.wrap_socket(raw, server_hostname="127.0.0.1")
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        sock.setblocking(False)
        self.selector.register(sock, selectors.EVENT_READ)
        self.sockets[sock] = time.monotonic()

    def _close(self, sock: socket.socket) -> None:
        self.selector.unregister(sock)
        del self.sockets[sock]
        sock.close()

    def fill(self, seconds: float) -> None:
        """Open connections until K are held, for at most ``seconds``: a server that stops
        taking (or handshaking) connections is not waited for."""
        deadline = time.monotonic() + seconds
        while (
            len(self.sockets) < self.count
            and not self._stop.is_set()
            and time.monotonic() < deadline
        ):
            try:
                self._open()
            except OSError:
                self.connect_failures += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self.selector.select(timeout=0.2):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(4096)
                except (ssl.SSLWantReadError, BlockingIOError):
                    continue
                except OSError:
                    data = b""
                if not data:  # the server closed it (or answered an error and closed)
                    self.closed_by_server += 1
                    self._close(sock)
            now = time.monotonic()
            for sock, sent in list(self.sockets.items()):
                if now - sent >= HEADER_INTERVAL_S:
                    try:
                        sock.send(b"X-Slow: 1\r\n")
                        self.sockets[sock] = now
                    except (ssl.SSLWantWriteError, BlockingIOError):
                        pass
                    except OSError:
                        self.closed_by_server += 1
                        self._close(sock)
            self.fill(OPEN_TIMEOUT_S)

    def __enter__(self) -> SlowLoris:
        self.fill(FILL_SECONDS)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for sock in list(self.sockets):
            self._close(sock)


def _attack(port: int, count: int, cafile: str | None, control: Any) -> None:
    """A SlowLoris process's body: fill, say so, hold until told to stop, then report."""
    tls = None
    if cafile is not None:
        tls = ssl.create_default_context(cafile=cafile)
        tls.check_hostname = False
    with SlowLoris(port, count, tls) as loris:
        control.send(len(loris.sockets))
        control.recv()
        control.send(
            {
                "held": len(loris.sockets),
                "closed_by_server": loris.closed_by_server,
                "connect_failures": loris.connect_failures,
            }
        )


class SlowLorisProcess:
    """One listener's attacker in a process of its own. In the benchmark's process its loop
    over K sockets and its TLS reconnects held the GIL that the measured clients wait for,
    so their latencies counted the attacker's work as the server's (a real attacker runs
    elsewhere; here it still takes the machine's CPU, as it would take the server's)."""

    def __init__(self, port: int, count: int, cafile: Path | None) -> None:
        context = multiprocessing.get_context("spawn")
        self._control, child = context.Pipe()
        self._process = context.Process(
            target=_attack,
            args=(port, count, None if cafile is None else str(cafile), child),
            name=f"slowloris-{port}",
            daemon=True,
        )
        self.stats: dict[str, int] = {}

    def __enter__(self) -> SlowLorisProcess:
        self._process.start()
        if not self._control.poll(FILL_SECONDS + 60):
            self._process.kill()
            raise RuntimeError("the slow-client process did not fill its connections")
        self._control.recv()
        return self

    def __exit__(self, *exc: object) -> None:
        self._control.send("stop")
        if self._control.poll(60):
            self.stats = self._control.recv()
        self._process.join(30)
        if self._process.is_alive():
            self._process.kill()


# -- the normal clients ---------------------------------------------------------------------


@dataclass
class Kind:
    name: str
    latencies_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies_ms) or [0.0]
        return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


@dataclass(frozen=True)
class Prepared:
    ca_id: str
    issuing: x509.Certificate
    ocsp_url: str  # GET URL of an OCSP request for a certificate the CA issued
    devices: list[tuple[x509.Name, rsa.RSAPrivateKey, x509.Certificate, bytes]]


def prepare(server: BenchServer, count: int, keys: Sequence[rsa.RSAPrivateKey]) -> Prepared:
    session = plain_session(str(server.tls_bundle))
    session.headers["Authorization"] = f"Bearer {server.token}"
    cas = session.get(f"{server.https_url}/api/v1/cas", timeout=30).json()["cas"]
    issuing_ca = next(ca for ca in cas if ca["type"] == "SUBORDINATE")
    issuing = x509.load_der_x509_certificate(
        session.get(f"{server.http_url}/ca/{issuing_ca['id']}.cer", timeout=30).content
    )
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ocsp.bench.test")]))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("ocsp.bench.test")]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    token = session.post(
        f"{server.https_url}/api/v1/tokens", json={"name": "bench", "role": "issuer"}, timeout=30
    )
    token.raise_for_status()
    session.headers["Authorization"] = f"Bearer {token.json()['secret']}"
    issued = session.post(
        f"{server.https_url}/api/v1/cas/{issuing_ca['id']}/certificates",
        json={
            "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
            "template": "EndEntityServerAuthCertificate/V1",
            "validity": "1d",
        },
        timeout=30,
    )
    issued.raise_for_status()
    leaf = x509.load_pem_x509_certificate(issued.json()["certificate_pem"].encode())
    # SHA-1 names the certificate in the CertID, as RFC 5019 clients send it.
    request = (
        ocsp.OCSPRequestBuilder().add_certificate(leaf, issuing, hashes.SHA1()).build()  # noqa: S303
    )
    encoded = base64.b64encode(request.public_bytes(serialization.Encoding.DER)).decode()
    devices = []
    for index in range(count):
        device_key = keys[index % len(keys)]
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"slow-bench-{index}")])
        devices.append(
            (
                subject,
                device_key,
                self_signed(device_key, subject),
                certificate_request(device_key, subject, CHALLENGE),
            )
        )
    return Prepared(
        issuing_ca["id"], issuing, f"{server.http_url}/ocsp/{issuing_ca['id']}/{encoded}", devices
    )


def run_clients(
    server: BenchServer, prepared: Prepared, clients: int, seconds: float
) -> dict[str, Kind]:
    kinds = {name: Kind(name) for name in ("ocsp", "scep", "healthz-http", "healthz-https")}
    lock = threading.Lock()
    device_index = [0]
    deadline = time.monotonic() + seconds

    def next_device() -> tuple[x509.Name, rsa.RSAPrivateKey, x509.Certificate, bytes]:
        with lock:
            device = prepared.devices[device_index[0] % len(prepared.devices)]
            device_index[0] += 1
            return device

    def ocsp_get(session: requests.Session, _ca: CaCertificates) -> None:
        response = session.get(prepared.ocsp_url, timeout=REQUEST_TIMEOUT_S)
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}")
        answer = ocsp.load_der_ocsp_response(response.content)
        if answer.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
            raise RuntimeError(f"OCSP {answer.response_status.name}")
        if answer.certificate_status is not ocsp.OCSPCertStatus.GOOD:
            raise RuntimeError(f"certificate {answer.certificate_status.name}")

    def scep_enroll(session: requests.Session, ca: CaCertificates) -> None:
        subject, key, signer, request_der = next_device()
        client = ScepClient(f"{server.http_url}/scep", session, timeout=REQUEST_TIMEOUT_S)
        reply = client.enroll(ca, signer, key, request_der, new_transaction_id())
        if reply.status is not PkiStatus.SUCCESS:
            raise RuntimeError(f"CertRep {reply.status.name}")
        if reply.certificates[0].subject != subject:
            raise RuntimeError("issued for another subject")

    def healthz(url: str) -> Callable[[requests.Session, CaCertificates], None]:
        def probe(session: requests.Session, _ca: CaCertificates) -> None:
            response = session.get(url, timeout=REQUEST_TIMEOUT_S)
            if response.status_code != 200:
                raise RuntimeError(f"HTTP {response.status_code}")

        return probe

    operations: list[tuple[str, Callable[[requests.Session, CaCertificates], None]]] = [
        ("ocsp", ocsp_get),
        ("scep", scep_enroll),
        ("healthz-http", healthz(f"{server.http_url}/healthz")),
        ("healthz-https", healthz(f"{server.https_url}/healthz")),
    ]

    def worker(k: int) -> None:
        session = plain_session(str(server.tls_bundle))
        ca = None
        while ca is None and time.monotonic() < deadline:
            began = time.perf_counter()
            try:
                ca = ScepClient(f"{server.http_url}/scep", session).get_ca_cert()
            except Exception as exc:  # counted as a SCEP error: no enrollment without it
                with lock:
                    kinds["scep"].errors[f"GetCACert {type(exc).__name__}"] += 1
                time.sleep(max(0.0, 1.0 - (time.perf_counter() - began)))
        if ca is None:
            return
        turn = k
        while time.monotonic() < deadline:
            name, operation = operations[turn % len(operations)]
            turn += 1
            began = time.perf_counter()
            try:
                operation(session, ca)
            except Exception as exc:
                with lock:
                    kinds[name].errors[f"{type(exc).__name__}: {str(exc)[:80]}"] += 1
                continue
            with lock:
                kinds[name].latencies_ms.append((time.perf_counter() - began) * 1000)
        session.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return kinds


def one_run(
    slow: int, args: argparse.Namespace, keys: Sequence[rsa.RSAPrivateKey], scratch: Path
) -> dict[str, Any]:
    server = BenchServer(scratch / f"k{slow}", args.workers)
    with server:
        assert server.process is not None
        prepared = prepare(server, 2000, keys)
        progress(f"K={slow}: opening {slow} slow connections on each listener")
        http_loris = SlowLorisProcess(server.http_port, slow, None)
        https_loris = SlowLorisProcess(server.https_port, slow, server.tls_bundle)
        with RssSampler(server.process.pid) as memory, http_loris, https_loris:
            progress(f"K={slow}: {args.clients} clients for {args.seconds:.0f} s")
            kinds = run_clients(server, prepared, args.clients, args.seconds)
        held = (http_loris.stats.get("held", -1), https_loris.stats.get("held", -1))
        closed = (
            http_loris.stats.get("closed_by_server", -1),
            https_loris.stats.get("closed_by_server", -1),
        )
    rows = {}
    for kind in kinds.values():
        rows[kind.name] = {
            "per_s": round(len(kind.latencies_ms) / args.seconds, 1),
            "p50_ms": round(kind.percentile(0.50), 1),
            "p99_ms": round(kind.percentile(0.99), 1),
            "errors": sum(kind.errors.values()),
            "error_kinds": dict(kind.errors.most_common(3)),
        }
    return {
        "slow_per_listener": slow,
        "held_at_end": {"http": held[0], "https": held[1]},
        "closed_by_server": {"http": closed[0], "https": closed[1]},
        "peak_pss_mib": round(memory.peak_pss_mib, 1),
        "processes": memory.processes,
        "kinds": rows,
    }


def report(results: Sequence[dict[str, Any]]) -> None:
    print(f"\nslow clients: pkigate serve, load average {os.getloadavg()[0]:.2f}")
    header = (
        f"{'K/listener':>10} {'kind':<14} {'ops/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}"
    )
    print(header)
    for result in results:
        for name, row in result["kinds"].items():
            print(
                f"{result['slow_per_listener']:>10} {name:<14} {row['per_s']:>8} "
                f"{row['p50_ms']:>8} {row['p99_ms']:>8} {row['errors']:>7}"
                + (f"  {row['error_kinds']}" if row["errors"] else "")
            )
        print(
            f"{'':>10} held at end {result['held_at_end']}, closed by the server "
            f"{result['closed_by_server']}, peak PSS {result['peak_pss_mib']} MiB "
            f"({result['processes']} processes)"
        )
    worst = results[-1]
    ok = all(
        worst["kinds"][kind]["per_s"] > 0
        and worst["kinds"][kind]["p99_ms"] < TARGET_P99_MS
        and worst["kinds"][kind]["errors"] == 0
        for kind in ("ocsp", "scep")
    )
    print(
        f"target at K={worst['slow_per_listener']}: OCSP and SCEP p99 < {TARGET_P99_MS:.0f} ms "
        f"and zero errors: {'met' if ok else 'NOT met'}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slow", default="0,10,100,1000", help="K values, comma-separated")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="K = 0 and 200, 5 s each")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.slow, args.seconds, args.clients = "0,200", 5.0, 4
    slows = [int(value) for value in args.slow.split(",")]
    keys = [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(RSA_POOL)]
    results = []
    with tempfile.TemporaryDirectory(prefix="pkigate-bench-slow-") as scratch:
        for slow in slows:
            results.append(one_run(slow, args, keys, Path(scratch)))
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
