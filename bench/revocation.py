"""Revocation figures: OCSP over HTTP, and CRLs with a million entries.

OCSP (a real ``pkigate serve --workers W`` in a fresh data directory, started here):
issues N certificates from the default issuing CA and revokes every fourth, then drives
``POST /ocsp/<ca id>`` from C concurrent keep-alive clients (raw sockets, one thread
each) for S seconds, cycling through the certificates' requests:

* without a nonce (the cached path: answered from the store, no signature), and
* with a nonce (every response signed fresh);

and prints responses/s, latency percentiles, server CPU per response, and the peak RSS of
the server's processes. For scale, in the same run: ``cryptography``'s raw OCSP
build+sign rate with the same responder key (the signing limit), stock gunicorn
serving a constant body (a plain Python HTTP server's rate), and two peers that sign
every response: OpenSSL's own OCSP responder (``openssl ocsp -index ... -multi W``) over
the same certificates, and OpenBao's (``/v1/pki/ocsp``, see ``bench/_peers.py``) over as
many certificates its PKI engine issued, every fourth revoked, asked by the same clients.

CRLs (in-process, a fresh data directory): inserts revoked certificate rows in bulk
(fake DER, 159-bit serials, mixed reasons, each with the CRL entry a revocation stores;
not timed as CRL work), then times
``core.revocation.generate_crl`` for a complete CRL of 100,000 and 1,000,000 entries and
for the partitioned CRLs of the 1,000,000 (partitions of 100,000), with the time split
into the store read (``Store.crl_entries``: the entries stored with each revocation,
joined by the database), building the TBSCertList around them (``core.crl.splice_entries``),
signing it (``core.crl.sign_tbs``), storing the CRL, and the rest (the template CRL without
entries, auditing).

    .venv/bin/python bench/revocation.py [--quick] [--seconds S] [--workers W]
        [--clients C] [--certificates N] [--crl-sizes 100000,1000000]
        [--partition-size P] [--skip-ocsp] [--skip-crl] [--skip-peers] [--json]

The default run takes about three minutes; ``--quick`` (under 30 s) is sized for CI.
These are figures, not a test: the script exits non-zero only when an answer is wrong
(a revoked certificate reported good, a CRL with the wrong number of entries).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp

from pkigate.core import (
    Actor,
    CASettings,
    CASpec,
    CAType,
    Core,
    IssuanceRequest,
    Requester,
    Validity,
)
from pkigate.core import crl as crl_der
from pkigate.core.model import RevocationReason
from pkigate.core.names import parse_dn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from _peers import (  # noqa: E402
    OPENBAO_OCSP_PATH,
    OpenBaoServer,
    cpu_seconds,
    openbao_binary,
    process_tree,
)
from serving import RunningServer, start_server  # noqa: E402

from pkigate.devsim.spawn import free_port  # noqa: E402

ACTOR = Actor("bench", "bench")
TARGET_OCSP_PER_S = 5000
# A request unanswered this long ends a load run (a stalled server must not hang the bench).
REQUEST_TIMEOUT_S = 20.0
TARGET_CRL_1M_SECONDS = 3.0
REASONS = ("keyCompromise", "superseded", "cessationOfOperation", "unspecified", None)
BARE_APP = """
BODY = b"\\x30" * 1500
def app(environ, start_response):
    environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "application/ocsp-response"),
                              ("Content-Length", str(len(BODY)))])
    return [BODY]
"""


def progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


# -- processes ----------------------------------------------------------------------------


def peak_rss_mib(pids: Sequence[int]) -> dict[int, float]:
    """VmHWM (the peak resident set) of each process, MiB."""
    peaks = {}
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peaks[pid] = int(line.split()[1]) / 1024
    return peaks


# -- a minimal HTTP/1.1 keep-alive load client --------------------------------------------


@dataclass
class LoadResult:
    responses: int
    seconds: float
    reconnects: int
    latencies_ms: list[float] = field(repr=False)
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0

    @property
    def per_s(self) -> float:
        return self.responses / self.seconds

    def summary(self) -> dict[str, float]:
        ordered = sorted(self.latencies_ms) or [0.0]
        return {
            "responses_per_s": round(self.per_s),
            "p50_ms": round(ordered[len(ordered) // 2], 2),
            "p99_ms": round(ordered[int(len(ordered) * 0.99)], 2),
            "server_cpu_us_per_response": round(self.server_cpu_s / self.responses * 1e6),
            "client_cpu_us_per_response": round(self.client_cpu_s / self.responses * 1e6),
            "reconnects": self.reconnects,
        }


def http_post(host: str, port: int, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/ocsp-request\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def exchange(sock: socket.socket, request: bytes) -> bytes:
    """Send one request, read one response; the body (raises EOFError if closed)."""
    sock.sendall(request)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError
        data += chunk
        end = data.find(b"\r\n\r\n")
        if end < 0:
            continue
        head = data[:end].lower()
        at = head.find(b"content-length:")
        stop = head.find(b"\r\n", at)
        length = int(head[at + 15 : stop if stop > 0 else None])
        if len(data) >= end + 4 + length:
            if not data.startswith(b"HTTP/1.1 200") and not data.startswith(b"HTTP/1.0 200"):
                raise RuntimeError(data[: data.find(b"\r\n")].decode())
            return data[end + 4 : end + 4 + length]


def drive(
    host: str,
    port: int,
    requests: Sequence[bytes],
    clients: int,
    seconds: float,
    pids: list[int],
    request_timeout: float = REQUEST_TIMEOUT_S,
) -> LoadResult:
    """``clients`` threads, each on its own keep-alive connection, for ``seconds``. A
    request unanswered for ``request_timeout`` raises TimeoutError (a stalled server ends
    the run instead of hanging it)."""
    counts = [0] * clients
    reconnects = [0] * clients
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []
    start = threading.Barrier(clients + 1)
    deadline = [0.0]

    def connect() -> socket.socket:
        sock = socket.create_connection((host, port), timeout=request_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def client(k: int) -> None:
        sock = connect()
        index = k * 7
        start.wait()
        try:
            while time.monotonic() < deadline[0]:
                request = requests[index % len(requests)]
                began = time.perf_counter()
                try:
                    exchange(sock, request)
                except (EOFError, ConnectionError):
                    sock.close()
                    sock = connect()
                    reconnects[k] += 1
                    continue
                latencies[k].append((time.perf_counter() - began) * 1000)
                counts[k] += 1
                index += 1
        except BaseException as exc:
            errors.append(exc)
        finally:
            sock.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    server_before, client_before = cpu_seconds(pids), os.times()
    deadline[0] = time.monotonic() + seconds
    began = time.monotonic()
    start.wait()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - began
    client_after = os.times()
    if errors:
        raise errors[0]
    return LoadResult(
        sum(counts),
        elapsed,
        sum(reconnects),
        [v for per in latencies for v in per],
        cpu_seconds(pids) - server_before,
        (client_after.user + client_after.system) - (client_before.user + client_before.system),
    )


# -- OCSP ---------------------------------------------------------------------------------


@dataclass
class OCSPSetup:
    server: RunningServer
    core: Core
    ca_id: str
    issuing: x509.Certificate
    plain: list[bytes]  # DER requests without a nonce
    with_nonce: list[bytes]
    expected: dict[int, ocsp.OCSPCertStatus]
    index_lines: list[str]  # for the openssl peer


def setup_ocsp(data_dir: Path, workers: int, certificates: int) -> OCSPSetup:
    progress(f"starting pkigate serve --workers {workers}")
    server = start_server(data_dir, workers=workers)
    core = Core.open(data_dir)
    issuing_view = next(v for v in core.authorities.list_cas() if v.record.type == "SUBORDINATE")
    ca_id = issuing_view.record.id
    assert issuing_view.record.certificate_der is not None
    issuing = x509.load_der_x509_certificate(issuing_view.record.certificate_der)
    progress(f"issuing {certificates} certificates, revoking every fourth")
    plain, with_nonce, expected, index_lines = [], [], {}, []
    for n in range(certificates):
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(parse_dn(f"CN=ocsp-bench-{n}.example.test"))
            .sign(key, hashes.SHA256())
        )
        issued = core.issue(IssuanceRequest(ca_id, csr, Validity.parse("30d"), Requester("bench")))
        certificate = issued.certificate
        status, revocation = ocsp.OCSPCertStatus.GOOD, ""
        if n % 4 == 0:
            record = core.revocation.revoke(
                ca_id, issued.serial, RevocationReason.keyCompromise, ACTOR
            )
            assert record.revoked_at is not None
            status = ocsp.OCSPCertStatus.REVOKED
            revocation = f"{record.revoked_at:%y%m%d%H%M%SZ},keyCompromise"
        expected[certificate.serial_number] = status
        builder = ocsp.OCSPRequestBuilder().add_certificate(
            certificate,
            issuing,
            hashes.SHA1(),  # noqa: S303 - the CertID hash clients send by default
        )
        plain.append(builder.build().public_bytes(serialization.Encoding.DER))
        nonced = builder.add_extension(x509.OCSPNonce(secrets.token_bytes(16)), critical=False)
        with_nonce.append(nonced.build().public_bytes(serialization.Encoding.DER))
        serial_hex = format(certificate.serial_number, "X")
        index_lines.append(
            "\t".join(
                [
                    "R" if revocation else "V",
                    f"{certificate.not_valid_after_utc:%y%m%d%H%M%SZ}",
                    revocation,
                    serial_hex if len(serial_hex) % 2 == 0 else "0" + serial_hex,
                    "unknown",
                    f"/CN=ocsp-bench-{n}.example.test",
                ]
            )
        )
    return OCSPSetup(server, core, ca_id, issuing, plain, with_nonce, expected, index_lines)


def check_answers(
    host: str, port: int, expected: dict[int, ocsp.OCSPCertStatus], requests: Sequence[bytes]
) -> int:
    """Ask each (framed) request once; count wrong statuses (``expected`` by serial)."""
    wrong = 0
    sock = socket.create_connection((host, port), timeout=REQUEST_TIMEOUT_S)
    try:
        for request in requests:
            try:
                body = exchange(sock, request)
            except (EOFError, ConnectionError):  # a server that closes after each answer
                sock.close()
                sock = socket.create_connection((host, port), timeout=REQUEST_TIMEOUT_S)
                body = exchange(sock, request)
            response = ocsp.load_der_ocsp_response(body)
            answered = response.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
            if not answered or response.certificate_status != expected[response.serial_number]:
                wrong += 1
    finally:
        sock.close()
    return wrong


def raw_ocsp_signing_per_s(issuing: x509.Certificate, seconds: float) -> float:
    """``cryptography`` alone: build and sign one response, as the responder does (1 core)."""
    key = ec.generate_private_key(ec.SECP256R1())
    responder = (
        x509.CertificateBuilder()
        .subject_name(parse_dn("CN=raw responder"))
        .issuer_name(issuing.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.now(UTC))
        .not_valid_after(datetime.now(UTC) + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    name_hash, key_hash = secrets.token_bytes(20), secrets.token_bytes(20)
    now = datetime.now(UTC).replace(microsecond=0)
    count, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        (
            ocsp.OCSPResponseBuilder()
            .add_response_by_hash(
                name_hash,
                key_hash,
                count + 1,
                hashes.SHA1(),  # noqa: S303 - as the responder answers SHA-1 CertIDs
                ocsp.OCSPCertStatus.GOOD,
                now,
                now + timedelta(hours=1),
                None,
                None,
            )
            .responder_id(ocsp.OCSPResponderEncoding.HASH, responder)
            .certificates([responder])
            .add_extension(x509.OCSPNonce(secrets.token_bytes(16)), critical=False)
            .sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.DER)
        )
        count += 1
    return count / (time.perf_counter() - began)


@contextmanager
def bare_gunicorn(scratch: Path, workers: int, threads: int) -> Iterator[tuple[int, list[int]]]:
    """Stock gunicorn serving a constant body: a Python server with nothing of pkigate's
    in it, in its quickest stock configuration here (gthread workers). Its gevent worker,
    which `pkigate serve` builds on, answered at a fifth of pkigate's cached rate when
    tried: pkigate's worker sends each answer in one write (gateways/server.py)."""
    (scratch / "bare_app.py").write_text(BARE_APP)
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--chdir",
            str(scratch),
            "-k",
            "gthread",
            "-w",
            str(workers),
            "--threads",
            str(threads),
            "--keep-alive",
            "5",
            "-b",
            f"127.0.0.1:{port}",
            "--log-level",
            "warning",
            "bare_app:app",
        ],
        start_new_session=True,
    )
    try:
        wait_for_port(port, process)
        yield port, process_tree(process.pid)
    finally:
        process.terminate()
        process.wait(10)


@contextmanager
def openssl_responder(
    scratch: Path, setup: OCSPSetup, workers: int
) -> Iterator[tuple[int, list[int]]]:
    """OpenSSL's OCSP responder over the same certificates, its signer issued by the CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(parse_dn("CN=openssl peer responder"))
        .sign(key, hashes.SHA256())
    )
    signer = setup.core.issue(
        IssuanceRequest(
            setup.ca_id,
            csr,
            Validity.parse("1d"),
            Requester("bench"),
            template="OCSPSigningCertificate/V1",
        )
    ).certificate
    (scratch / "index.txt").write_text("\n".join(setup.index_lines) + "\n")
    (scratch / "rsigner.pem").write_bytes(signer.public_bytes(serialization.Encoding.PEM))
    (scratch / "rkey.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (scratch / "ca.pem").write_bytes(setup.issuing.public_bytes(serialization.Encoding.PEM))
    port = free_port()
    log = scratch / "openssl-ocsp.log"
    process = subprocess.Popen(
        [
            "openssl",
            "ocsp",
            "-index",
            "index.txt",
            "-port",  # OpenSSL 3.0 takes a port number only (it listens on every address)
            str(port),
            "-rsigner",
            "rsigner.pem",
            "-rkey",
            "rkey.pem",
            "-CA",
            "ca.pem",
            "-nmin",
            "60",
            "-multi",
            str(workers),
            "-ignore_err",
        ],
        cwd=scratch,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        # No start_new_session: with -multi, openssl makes itself a process group leader
        # and exits (logging only to syslog) when it cannot, as a session leader.
    )
    try:
        # Not a test connection: an openssl child spins on a connection closed unused.
        deadline = time.monotonic() + 30
        while b"ACCEPT" not in log.read_bytes():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"openssl ocsp did not start: {log.read_text()}")
            time.sleep(0.1)
        time.sleep(0.5)  # its children start after the parent announces the port
        yield port, process_tree(process.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the group openssl made for its children
        process.wait(10)


@dataclass
class OpenBaoOCSP:
    """OpenBao's OCSP responder over certificates its PKI engine issued."""

    port: int
    pid: int
    requests: list[bytes]  # framed, without a nonce
    expected: dict[int, ocsp.OCSPCertStatus]


@contextmanager
def openbao_responder(scratch: Path, certificates: int) -> Iterator[OpenBaoOCSP]:
    """OpenBao (``bench/_peers.py`` OpenBaoServer) issues ``certificates`` through
    ``pki/sign/<role>`` and revokes every fourth (``pki/revoke``), as pkigate's side does;
    its responder (``/v1/pki/ocsp`` on the plain-HTTP listener) signs every answer with
    the root key."""
    server = OpenBaoServer(scratch / "openbao")
    try:
        server.start()
        assert server.process is not None and server.root is not None
        progress(f"OpenBao: issuing {certificates} certificates, revoking every fourth")
        framed, expected = [], {}
        host, port = "127.0.0.1", server.ocsp_port
        with server.session() as session:
            for n in range(certificates):
                key = ec.generate_private_key(ec.SECP256R1())
                name = f"ocsp-bench-{n}.{server.dns_domain}"
                csr = (
                    x509.CertificateSigningRequestBuilder()
                    .subject_name(parse_dn(f"CN={name}"))
                    .sign(key, hashes.SHA256())
                )
                certificate, _ = server.sign(session, csr)
                status = ocsp.OCSPCertStatus.GOOD
                if n % 4 == 0:
                    server.revoke(session, certificate)
                    status = ocsp.OCSPCertStatus.REVOKED
                expected[certificate.serial_number] = status
                request = (
                    ocsp.OCSPRequestBuilder()
                    .add_certificate(
                        certificate,
                        server.root,
                        hashes.SHA1(),  # noqa: S303 - the CertID hash clients send by default
                    )
                    .build()
                    .public_bytes(serialization.Encoding.DER)
                )
                framed.append(http_post(host, port, OPENBAO_OCSP_PATH, request))
        yield OpenBaoOCSP(port, server.process.pid, framed, expected)
    finally:
        server.stop()


def wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            time.sleep(0.5)  # let every worker come up
            return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on port {port}")


def bench_ocsp(args: argparse.Namespace, scratch: Path) -> tuple[dict[str, Any], int]:
    setup = setup_ocsp(scratch / "data", args.workers, args.certificates)
    server = setup.server
    host, port_text = server.http_url.removeprefix("http://").split(":")
    port = int(port_text)
    figures: dict[str, Any] = {"load_average_before": load_average()}
    try:
        plain = [http_post(host, port, f"/ocsp/{setup.ca_id}", r) for r in setup.plain]
        nonced = [http_post(host, port, f"/ocsp/{setup.ca_id}", r) for r in setup.with_nonce]
        progress("warming up (first answers are signed and cached) and checking statuses")
        wrong = check_answers(host, port, setup.expected, plain)
        wrong += check_answers(host, port, setup.expected, plain)  # the cached answers too
        wrong += check_answers(host, port, setup.expected, nonced[:50])
        pids = process_tree(server.process.pid)
        for name, requests in (("cached", plain), ("nonce", nonced)):
            progress(f"OCSP {name}: {args.clients} clients for {args.seconds:g} s")
            result = drive(host, port, requests, args.clients, args.seconds, pids)
            figures[name] = result.summary()
        wrong += check_answers(host, port, setup.expected, plain)
        peaks = peak_rss_mib(pids)
        figures["server_processes"] = len(peaks)
        figures["server_peak_rss_mib_sum"] = round(sum(peaks.values()), 1)
        figures["server_peak_rss_mib_max_process"] = round(max(peaks.values()), 1)
        figures["raw_sign_per_s_one_core"] = round(
            raw_ocsp_signing_per_s(setup.issuing, min(args.seconds, 2.0))
        )
        if not args.skip_peers:
            with bare_gunicorn(scratch, args.workers, 8) as (bare_port, bare_pids):
                progress(f"bare gunicorn: {args.clients} clients for {args.seconds:g} s")
                framed = [http_post(host, bare_port, "/ocsp/x", setup.plain[0])]
                bare = drive(host, bare_port, framed, args.clients, args.seconds, bare_pids)
                figures["bare_gunicorn"] = bare.summary()
            with openssl_responder(scratch, setup, args.workers) as (peer_port, peer_pids):
                progress(f"openssl ocsp -multi {args.workers}: {args.clients} clients")
                framed = [http_post(host, peer_port, "/", r) for r in setup.plain]
                try:
                    wrong += check_answers(host, peer_port, setup.expected, framed[:20])
                    peer = drive(host, peer_port, framed, args.clients, args.seconds, peer_pids)
                    figures["openssl_ocsp"] = peer.summary()
                except TimeoutError:
                    # OpenSSL 3.0's children can spin on a connection closed before they
                    # read it and stop answering: the peer's figure is missing, said so.
                    figures["openssl_ocsp_stalled"] = (
                        f"openssl ocsp left a request unanswered for {REQUEST_TIMEOUT_S:g} s"
                    )
            if openbao_binary() is None:
                figures["openbao_missing"] = "bao is not installed (scripts/setup --test)"
            else:
                with openbao_responder(scratch, args.certificates) as bao:
                    progress(f"OpenBao /v1/pki/ocsp: {args.clients} clients")
                    wrong += check_answers(host, bao.port, bao.expected, bao.requests)
                    result = drive(
                        host, bao.port, bao.requests, args.clients, args.seconds, [bao.pid]
                    )
                    figures["openbao_ocsp"] = result.summary()
                    figures["openbao_peak_rss_mib"] = round(
                        sum(peak_rss_mib([bao.pid]).values()), 1
                    )
        figures["load_average_after"] = load_average()
    finally:
        setup.core.close()
        server.stop()
    return figures, wrong


# -- CRLs ---------------------------------------------------------------------------------


class PhaseTimer:
    """Wall time spent inside chosen functions while generating a CRL."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - began

        return timed


def timed_generate(core: Core, ca_id: str, partition: int) -> tuple[float, dict[str, float], Any]:
    timer = PhaseTimer()
    store = core.store
    originals = (crl_der.splice_entries, crl_der.sign_tbs)
    store.crl_entries = timer.wrap("store_read_s", store.crl_entries)  # type: ignore[method-assign]
    store.insert_crl = timer.wrap("store_write_s", store.insert_crl)  # type: ignore[method-assign]
    crl_der.splice_entries = timer.wrap("entries_s", crl_der.splice_entries)  # type: ignore[assignment]
    crl_der.sign_tbs = timer.wrap("sign_s", crl_der.sign_tbs)  # type: ignore[assignment]
    try:
        began, cpu_began = time.perf_counter(), time.process_time()
        published = core.revocation.generate_crl(ca_id, partition)
        total, cpu = time.perf_counter() - began, time.process_time() - cpu_began
    finally:
        crl_der.splice_entries, crl_der.sign_tbs = originals  # type: ignore[assignment]
        del store.crl_entries, store.insert_crl
    phases = {k: round(v, 2) for k, v in timer.seconds.items()}
    phases["rest_s"] = round(total - sum(timer.seconds.values()), 2)
    # CPU seconds of this process: on a machine others share, wall time says little.
    phases["cpu_s"] = round(cpu, 2)
    return total, phases, published


def insert_revoked(core: Core, ca_id: str, start: int, count: int, partition_size: int) -> float:
    """Bulk-insert revoked certificate rows (fake DER) with 159-bit serials; seconds taken."""
    now = core.clock()
    base = secrets.randbits(158) | (1 << 158)
    began = time.perf_counter()
    batch = 50_000
    for first in range(start, start + count, batch):
        rows = []
        for n in range(first, min(first + batch, start + count)):
            serial = format(base + n, "x")
            rows.append(
                {
                    "ca_id": ca_id,
                    "serial": serial,
                    "subject": f"CN=crl-bench-{n}",
                    "sans": "[]",
                    "not_before": now - timedelta(days=1),
                    "not_after": now + timedelta(days=90),
                    "issued_at": now - timedelta(days=1),
                    "template": "EndEntityCertificate/V1",
                    "requester": "bench",
                    "connector": "bench",
                    "correlation_id": None,
                    "status": "REVOKED",
                    "revoked_at": now - timedelta(seconds=n % 86400),
                    "revocation_reason": REASONS[n % len(REASONS)],
                    "fingerprint_sha256": serial.rjust(64, "0")[:64],
                    "der": b"\x30\x03\x02\x01\x00",
                    "crl_partition": n // partition_size + 1,
                    "team": None,
                }
            )
        with core.store.write() as conn:
            core.store.insert_certificates(conn, rows)
    return time.perf_counter() - began


def bench_crl(args: argparse.Namespace, scratch: Path) -> tuple[dict[str, Any], int]:
    core = Core.open(scratch / "crl-data")
    figures: dict[str, Any] = {"load_average_before": load_average()}
    wrong = 0
    try:
        root = core.authorities.create(
            CASpec(CAType.ROOT, parse_dn("CN=CRL Bench Root,O=pkigate bench")), ACTOR
        )
        issuing = core.authorities.create(
            CASpec(
                CAType.SUBORDINATE,
                parse_dn("CN=CRL Bench Issuing,O=pkigate bench"),
                parent_ca_id=root.record.id,
                path_length=0,
            ),
            ACTOR,
        )
        ca_id = issuing.record.id
        core.authorities.update_settings(
            ca_id, CASettings(crl_enabled=True, crl_url="http://crl.example.test/c.crl"), ACTOR
        )
        inserted = 0
        for size in args.crl_sizes:
            progress(f"inserting {size - inserted:,} revoked rows")
            insert_s = insert_revoked(core, ca_id, inserted, size - inserted, args.partition_size)
            inserted = size
            progress(f"complete CRL with {size:,} entries")
            total, phases, published = timed_generate(core, ca_id, 0)
            if published.entries != size:
                wrong += 1
            figures[f"complete_{size}"] = {
                "seconds": round(total, 2),
                **phases,
                "der_mib": round(len(published.der) / 2**20, 1),
                "bytes_per_entry": round(len(published.der) / size, 1),
                "insert_rows_s": round(insert_s, 1),
            }
        # The CRL mode is fixed once a CA has issued: the same rows again, under a CA
        # that is PARTITIONED from its start.
        partitioned = core.authorities.create(
            CASpec(
                CAType.SUBORDINATE,
                parse_dn("CN=CRL Bench Partitioned,O=pkigate bench"),
                parent_ca_id=root.record.id,
                path_length=0,
                settings=CASettings(
                    crl_enabled=True,
                    crl_mode="PARTITIONED",
                    crl_url="http://crl.example.test/{partition}.crl",
                    crl_partition_size=args.partition_size,
                ),
            ),
            ACTOR,
        )
        ca_id = partitioned.record.id
        progress(f"inserting {inserted:,} revoked rows under a PARTITIONED CA")
        insert_revoked(core, ca_id, 0, inserted, args.partition_size)
        partitions = -(-inserted // args.partition_size)
        progress(f"{partitions} partitioned CRLs of {args.partition_size:,} for {inserted:,}")
        per_partition: list[float] = []
        totals: dict[str, float] = {}
        began = time.perf_counter()
        for partition in range(1, partitions + 1):
            seconds, phases, published = timed_generate(core, ca_id, partition)
            per_partition.append(seconds)
            for key, value in phases.items():
                totals[key] = round(totals.get(key, 0.0) + value, 2)
            expected = min(args.partition_size, inserted - (partition - 1) * args.partition_size)
            if published.entries != expected:
                wrong += 1
        figures[f"partitioned_{inserted}"] = {
            "partitions": partitions,
            "seconds_all": round(time.perf_counter() - began, 2),
            "seconds_max_partition": round(max(per_partition), 2),
            **totals,
        }
        figures["load_average_after"] = load_average()
    finally:
        core.close()
    return figures, wrong


# -- report -------------------------------------------------------------------------------


def report(figures: dict[str, Any]) -> None:
    ocsp_figures = figures.get("ocsp")
    if ocsp_figures:
        print(
            f"OCSP over HTTP  (load average before {ocsp_figures['load_average_before']}, "
            f"after {ocsp_figures['load_average_after']})"
        )
        raw2 = ocsp_figures["raw_sign_per_s_one_core"] * 2
        rows = [
            ("pkigate, no nonce (cached)", ocsp_figures["cached"]),
            ("pkigate, nonce (signed)", ocsp_figures["nonce"]),
        ]
        if "bare_gunicorn" in ocsp_figures:
            rows.append(("bare gunicorn, constant body", ocsp_figures["bare_gunicorn"]))
        if "openssl_ocsp" in ocsp_figures:
            rows.append(("openssl ocsp (signs each)", ocsp_figures["openssl_ocsp"]))
        if "openbao_ocsp" in ocsp_figures:
            rows.append(("OpenBao pki/ocsp (signs each)", ocsp_figures["openbao_ocsp"]))
        print(
            f"  {'':32} {'resp/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'srv us/r':>9} "
            f"{'cli us/r':>9} {'reconn':>7}"
        )
        for name, row in rows:
            print(
                f"  {name:32} {row['responses_per_s']:>8} {row['p50_ms']:>7} "
                f"{row['p99_ms']:>7} {row['server_cpu_us_per_response']:>9} "
                f"{row['client_cpu_us_per_response']:>9} {row['reconnects']:>7}"
            )
        cached = ocsp_figures["cached"]["responses_per_s"]
        print(f"  target {TARGET_OCSP_PER_S}/s: cached is {cached / TARGET_OCSP_PER_S:.2f}x")
        print(
            f"  raw build+sign (cryptography, P-256, one core): "
            f"{ocsp_figures['raw_sign_per_s_one_core']}/s; cached/raw(2 cores) "
            f"{cached / raw2:.2f}, nonce/raw(2 cores) "
            f"{ocsp_figures['nonce']['responses_per_s'] / raw2:.2f}"
        )
        if "openssl_ocsp_stalled" in ocsp_figures:
            print(f"  openssl ocsp: no figure, {ocsp_figures['openssl_ocsp_stalled']}")
        if "openbao_missing" in ocsp_figures:
            print(f"  OpenBao: no figure, {ocsp_figures['openbao_missing']}")
        if "openbao_ocsp" in ocsp_figures:
            peer = ocsp_figures["openbao_ocsp"]["responses_per_s"]
            print(
                f"  cached/OpenBao {cached / peer:.2f}; nonce/OpenBao "
                f"{ocsp_figures['nonce']['responses_per_s'] / peer:.2f}; OpenBao peak RSS "
                f"{ocsp_figures['openbao_peak_rss_mib']} MiB (one process)"
            )
        if "bare_gunicorn" in ocsp_figures and "openssl_ocsp" in ocsp_figures:
            bare = ocsp_figures["bare_gunicorn"]["responses_per_s"]
            peer = ocsp_figures["openssl_ocsp"]["responses_per_s"]
            print(
                f"  cached/bare gunicorn {cached / bare:.2f}; cached/openssl ocsp "
                f"{cached / peer:.2f}; nonce/openssl ocsp "
                f"{ocsp_figures['nonce']['responses_per_s'] / peer:.2f}"
            )
        print(
            f"  server: {ocsp_figures['server_processes']} processes, peak RSS sum "
            f"{ocsp_figures['server_peak_rss_mib_sum']} MiB (largest "
            f"{ocsp_figures['server_peak_rss_mib_max_process']} MiB)"
        )
    crl_figures = figures.get("crl")
    if crl_figures:
        print(
            f"CRLs  (load average before {crl_figures['load_average_before']}, "
            f"after {crl_figures['load_average_after']})"
        )
        for name, row in crl_figures.items():
            if isinstance(row, dict):
                details = ", ".join(f"{k} {v}" for k, v in row.items())
                print(f"  {name:22} {details}")
        million = crl_figures.get("complete_1000000")
        if million:
            print(
                f"  target 1,000,000 entries in <= {TARGET_CRL_1M_SECONDS:g} s: "
                f"{million['seconds'] / TARGET_CRL_1M_SECONDS:.2f}x of the budget"
            )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized run (under 30 s)")
    parser.add_argument("--seconds", type=float, help="per OCSP measurement (default 10)")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn workers (default 2)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--certificates", type=int, help="certificates asked about (200)")
    parser.add_argument("--crl-sizes", help="complete CRL sizes (default 100000,1000000)")
    parser.add_argument("--partition-size", type=int, help="partition size (default 100000)")
    parser.add_argument("--skip-ocsp", action="store_true")
    parser.add_argument("--skip-crl", action="store_true")
    parser.add_argument("--skip-peers", action="store_true", help="no bare gunicorn/openssl")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    quick = args.quick
    args.seconds = args.seconds or (1.5 if quick else 10.0)
    args.certificates = args.certificates or (24 if quick else 200)
    sizes = args.crl_sizes or ("10000,50000" if quick else "100000,1000000")
    args.crl_sizes = sorted(int(s) for s in sizes.split(","))
    args.partition_size = args.partition_size or (10_000 if quick else 100_000)

    began = time.perf_counter()
    figures: dict[str, Any] = {"cpus": os.cpu_count(), "quick": quick}
    wrong = 0
    with tempfile.TemporaryDirectory(prefix="pkigate-bench-revocation-") as scratch:
        if not args.skip_ocsp:
            figures["ocsp"], bad = bench_ocsp(args, Path(scratch))
            wrong += bad
        if not args.skip_crl:
            figures["crl"], bad = bench_crl(args, Path(scratch))
            wrong += bad
    figures["wrong_answers"] = wrong
    figures["elapsed_s"] = round(time.perf_counter() - began, 1)
    if args.json:
        print(json.dumps(figures, indent=2, default=str))
    else:
        report(figures)
        print(f"elapsed {figures['elapsed_s']} s; wrong answers: {wrong}")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
