"""The HTTP layer under the apps (gateways/server.py), against a real `pkigate serve`: slow
and broken clients cost connections, never service; the arbiter's children die with it;
SIGHUP restarts the workers; every line the server writes is JSON."""

from __future__ import annotations

import ast
import base64
import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID
from helpers import make_csr
from serving import RunningServer, child_pids, eventually_ok, start_server

from pkigate.devsim.scep_client import (
    ScepClient,
    certificate_request,
    new_transaction_id,
    self_signed,
)
from pkigate.scep.messages import PkiStatus

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from slow_clients import SlowLoris

SLOW_PER_LISTENER = 200
BODY_TIMEOUT = 2
HEADER_TIMEOUT = 5


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(
        tmp_path_factory.mktemp("serving") / "data",
        workers=2,
        top_config=(
            f"body_timeout_seconds = {BODY_TIMEOUT}\n"
            f"header_timeout_seconds = {HEADER_TIMEOUT}\n"
            "max_body_bytes = 65536\n"
        ),
    )
    yield running
    running.stop()


def _tls_context(server: RunningServer) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(server.tls_bundle))
    context.check_hostname = False
    return context


def _issuing_ca_id(server: RunningServer) -> str:
    cas = server.session().get(f"{server.https_url}/api/v1/cas", timeout=10).json()["cas"]
    return next(ca["id"] for ca in cas if ca["subject"] == "CN=pkigate Issuing CA,O=pkigate")


def _ocsp_url(server: RunningServer) -> str:
    admin = server.session()
    token = admin.post(
        f"{server.https_url}/api/v1/tokens", json={"name": "serving", "role": "issuer"}, timeout=10
    ).json()["secret"]
    ca_id = _issuing_ca_id(server)
    issued = server.session(token).post(
        f"{server.https_url}/api/v1/cas/{ca_id}/certificates",
        json={"csr": make_csr("slow.serving.test").decode(), "validity": "1d"},
        timeout=30,
    )
    assert issued.status_code == 201, issued.text
    leaf = x509.load_pem_x509_certificate(issued.json()["certificate_pem"].encode())
    issuer = x509.load_der_x509_certificate(
        requests.get(f"{server.http_url}/ca/{ca_id}.cer", timeout=10).content
    )
    # SHA-1 names the certificate in the CertID, as RFC 5019 clients send it.
    request = (
        ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA1()).build()  # noqa: S303
    )
    encoded = base64.b64encode(request.public_bytes(serialization.Encoding.DER)).decode()
    return f"{server.http_url}/ocsp/{ca_id}/{encoded}"


def _scep_enroll(server: RunningServer, name: str) -> x509.Certificate:
    created = server.session().post(
        f"{server.https_url}/api/v1/connectors/scep/challenges", json={}, timeout=10
    )
    assert created.status_code == 201, created.text
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    session = requests.Session()
    session.trust_env = False
    client = ScepClient(f"{server.http_url}/scep", session, timeout=10)
    ca = client.get_ca_cert()
    reply = client.enroll(
        ca,
        self_signed(key, subject),
        key,
        certificate_request(key, subject, created.json()["challenge"]),
        new_transaction_id(),
    )
    assert reply.status is PkiStatus.SUCCESS
    return reply.certificates[0]


def test_slow_clients_on_both_listeners_leave_health_ocsp_and_scep_answering(
    server: RunningServer,
) -> None:
    ocsp_url = _ocsp_url(server)
    with (
        SlowLoris(server.http_port, SLOW_PER_LISTENER, None) as http_loris,
        SlowLoris(server.https_port, SLOW_PER_LISTENER, _tls_context(server)) as https_loris,
    ):
        # The server took every connection (and completed every TLS handshake) while the
        # others were still sending their headers.
        assert http_loris.connect_failures == https_loris.connect_failures == 0
        assert len(http_loris.sockets) + http_loris.closed_by_server >= SLOW_PER_LISTENER
        assert len(https_loris.sockets) + https_loris.closed_by_server >= SLOW_PER_LISTENER
        assert requests.get(f"{server.http_url}/healthz", timeout=5).status_code == 200
        https = requests.get(
            f"{server.https_url}/healthz", timeout=5, verify=str(server.tls_bundle)
        )
        assert https.status_code == 200
        answer = ocsp.load_der_ocsp_response(requests.get(ocsp_url, timeout=5).content)
        assert answer.certificate_status is ocsp.OCSPCertStatus.GOOD
        certificate = _scep_enroll(server, "behind-slowloris")
        assert certificate.subject.rfc4514_string() == "CN=behind-slowloris"
        # The slow ones are cut off at the header deadline, not kept for ever.
        time.sleep(HEADER_TIMEOUT + 2)
        assert http_loris.closed_by_server > 0 and https_loris.closed_by_server > 0


def _exchange(port: int, data: bytes, *, wait: float = 15.0) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def _headers(answer: bytes) -> str:
    return answer.split(b"\r\n\r\n", 1)[0].decode().lower()


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\nabc\r\n0\r\n\r\n",  # not a chunk size
        b"3\r\nabcXX0\r\n\r\n",  # a chunk without its CRLF
        b"-1\r\nabc\r\n0\r\n\r\n",
    ],
    ids=["bad-size", "missing-terminator", "negative-size"],
)
def test_malformed_chunked_bodies_are_a_400_that_closes_the_connection(
    server: RunningServer, body: bytes
) -> None:
    request = (
        b"POST /scep?operation=PKIOperation HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/x-pki-message\r\nTransfer-Encoding: chunked\r\n\r\n" + body
    )
    answer = _exchange(server.http_port, request)
    assert _status(answer) == 400
    assert "connection: close" in _headers(answer)
    assert b"malformed" in answer


def test_a_huge_chunk_size_or_a_short_body_waits_only_for_the_body_deadline(
    server: RunningServer,
) -> None:
    began = time.monotonic()
    answer = _exchange(
        server.http_port,
        b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Type: application/ocsp-request\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nabc",
    )
    assert _status(answer) in (400, 408)  # too big to ever be read, or not sent in time
    short = _exchange(
        server.http_port,
        b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Type: application/ocsp-request\r\n"
        b"Content-Length: 100\r\n\r\nabc",
    )
    assert _status(short) == 408
    assert "connection: close" in _headers(short)
    assert time.monotonic() - began < 4 * BODY_TIMEOUT + 10


@pytest.mark.parametrize(
    ("request_bytes", "status", "content_type", "says"),
    [
        (b"GET /api/v1/cas HTTP/9.9\r\nHost: x\r\n\r\n", 400, "json", "HTTP Version"),
        (b"GE<T / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "json", "GE<T"),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "json", "too large"),
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 200 + b"\r\n", 431, "json", ""),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n  folded\r\n\r\n", 400, "json", "folding"),
        (  # a header error carries its request: the ACME mount answers in RFC 8555 terms
            b"POST /acme/new-account HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
            b"Content-Length: 2\r\n\r\n",
            400,
            "problem+json",
            "CONTENT-LENGTH",
        ),
    ],
    ids=["version", "method", "line-too-long", "too-many-headers", "obs-fold", "acme-two-lengths"],
)
def test_what_gunicorn_cannot_parse_is_answered_in_the_protocols_terms_not_html(
    server: RunningServer, request_bytes: bytes, status: int, content_type: str, says: str
) -> None:
    with (
        socket.create_connection(("127.0.0.1", server.https_port), timeout=15) as raw,
        _tls_context(server).wrap_socket(raw) as sock,
    ):
        sock.sendall(request_bytes)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert _status(answer) == status
    headers = _headers(answer)
    assert f"content-type: application/{content_type}" in headers
    assert "connection: close" in headers
    document = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    if content_type == "json":
        assert document["error"]["code"][0].islower() and says in document["error"]["message"]
    else:
        assert document["type"] == "urn:ietf:params:acme:error:malformed"
        assert document["status"] == status and says in document["detail"]


def test_a_body_shorter_than_its_content_length_is_a_400(server: RunningServer) -> None:
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=10) as sock:
        sock.sendall(
            b"POST /ocsp HTTP/1.1\r\nHost: x\r\nContent-Type: application/ocsp-request\r\n"
            b"Content-Length: 100\r\n\r\nabc"
        )
        sock.shutdown(socket.SHUT_WR)  # the client is done: 97 bytes never come
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert _status(answer) == 400


def test_a_malformed_or_late_body_under_an_acme_mount_is_an_acme_problem(
    server: RunningServer,
) -> None:
    """Refused before the app runs, and still in the protocol's terms: an ACME client
    reads an RFC 8555 problem (urn:ietf:params:acme:error:malformed) with the status;
    elsewhere the answer is the management API's error object."""
    context = _tls_context(server)

    def over_tls(request: bytes) -> bytes:
        with (
            socket.create_connection(("127.0.0.1", server.https_port), timeout=30) as raw,
            context.wrap_socket(raw) as sock,
        ):
            sock.sendall(request)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            return answer

    head = b"POST /acme/new-order HTTP/1.1\r\nHost: x\r\nContent-Type: application/jose+json\r\n"
    malformed = over_tls(head + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n")
    late = over_tls(head + b"Content-Length: 100\r\n\r\n{")
    for answer, status in ((malformed, 400), (late, 408)):
        assert _status(answer) == status
        assert "application/problem+json" in _headers(answer)
        problem = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert problem["type"] == "urn:ietf:params:acme:error:malformed"
        assert problem["status"] == status and problem["detail"]
    api = over_tls(
        b"POST /api/v1/tokens HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"
    )
    assert _status(api) == 400
    error = json.loads(api.split(b"\r\n\r\n", 1)[1])["error"]
    assert error == {"code": "badRequest", "message": "the request body is malformed"}


def test_an_oversized_body_is_refused_in_the_protocols_terms_and_the_connection_closed(
    server: RunningServer,
) -> None:
    context = _tls_context(server)
    body = b"{" + b" " * 70_000 + b"}"
    with (
        socket.create_connection(("127.0.0.1", server.https_port), timeout=10) as raw,
        context.wrap_socket(raw) as sock,
    ):
        sock.sendall(
            b"POST /acme/new-account HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/jose+json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert _status(answer) == 413
    headers = _headers(answer)
    assert "connection: close" in headers and "keep-alive" not in headers
    assert "application/problem+json" in headers


def test_a_silent_tls_client_is_dropped_at_the_header_deadline(server: RunningServer) -> None:
    began = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.https_port), timeout=30) as sock:
        assert sock.recv(1) == b""  # no ClientHello: closed by the server
    assert time.monotonic() - began < HEADER_TIMEOUT + 5


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_sighup_restarts_the_workers_and_the_server_keeps_serving(tmp_path: Path) -> None:
    running = start_server(tmp_path / "data", workers=2)
    try:
        before = set(child_pids(running.process.pid))
        assert len(before) == 2
        os.kill(running.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 60
        after: set[int] = set()
        while time.monotonic() < deadline:
            after = set(child_pids(running.process.pid))
            if len(after) == 2 and not after & before:
                break
            time.sleep(0.2)
        assert len(after) == 2 and not after & before, (before, after)
        assert running.process.poll() is None  # the same arbiter, still running
        assert eventually_ok(f"{running.http_url}/readyz")
    finally:
        assert running.stop() == 0


def _maps_the_core(pid: int) -> bool:
    """Whether a process has cryptography's and SQLAlchemy's compiled modules mapped: what
    importing pkigate's core loads (a process that imports it cannot unload them)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "cryptography/hazmat/bindings" in maps and "sqlalchemy/" in maps


def _wait_for_workers(arbiter: int, count: int, unlike: set[int]) -> set[int]:
    deadline = time.monotonic() + 30  # well inside gunicorn's 60 s worker timeout
    found: set[int] = set()
    while time.monotonic() < deadline:
        found = set(child_pids(arbiter))
        if len(found) == count and not found & unlike:
            break
        time.sleep(0.2)
    return found


def test_several_workers_come_from_a_zygote_and_the_arbiter_keeps_none_of_their_modules(
    tmp_path: Path,
) -> None:
    """Two workers share the pages of a zygote that imported what they run and then
    exited: the arbiter itself never imports the core, the workers are its children
    (adopted), and it supervises them as its own: one killed is replaced at once (not
    at gunicorn's worker timeout), a SIGHUP starts two new ones the same way."""
    running = start_server(tmp_path / "data", workers=2)
    try:
        arbiter = running.process.pid
        first = _wait_for_workers(arbiter, 2, set())
        assert len(first) == 2, first  # no zygote left among the arbiter's children
        assert all(_maps_the_core(pid) for pid in first)
        assert not _maps_the_core(arbiter)

        victim = min(first)
        os.kill(victim, signal.SIGKILL)
        after_kill = _wait_for_workers(arbiter, 2, {victim})
        assert len(after_kill) == 2 and victim not in after_kill, after_kill
        assert eventually_ok(f"{running.http_url}/readyz")

        os.kill(arbiter, signal.SIGHUP)
        after_hup = _wait_for_workers(arbiter, 2, after_kill)
        assert len(after_hup) == 2 and not after_hup & after_kill, (after_kill, after_hup)
        assert eventually_ok(f"{running.http_url}/readyz")
        assert not _maps_the_core(arbiter)
        assert running.process.poll() is None
    finally:
        assert running.stop() == 0
    log = running.log.read_text()
    assert "was sent SIGKILL" in log and "WORKER TIMEOUT" not in log


def test_an_arbiter_adopts_no_worker_where_gevent_cannot_watch_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The zygote rests on a private gevent call (watching a child gevent did not fork):
    a gevent without it leaves the arbiter forking every worker itself."""
    import gevent.os

    from pkigate.gateways.server import make_arbiter_class

    assert make_arbiter_class().watches_adopted
    monkeypatch.delattr(gevent.os, "_watch_child")
    arbiter_class = make_arbiter_class()
    assert not arbiter_class.watches_adopted and not arbiter_class.adopts_orphans


def test_when_the_arbiter_is_killed_no_process_remains_and_the_ports_are_free(
    tmp_path: Path,
) -> None:
    running = start_server(tmp_path / "data", workers=2)
    process = running.process
    assert process is not None
    workers = child_pids(process.pid)
    assert len(workers) == 2
    # Keep a connection open on each listener: the workers hold them at the kill.
    held = [socket.create_connection(("127.0.0.1", port)) for port in running_ports(running)]
    try:
        process.send_signal(signal.SIGKILL)  # the arbiter alone, not its process group
        process.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            alive = [pid for pid in workers if Path(f"/proc/{pid}").exists() and not _zombie(pid)]
            if not alive and all(_port_free(port) for port in running_ports(running)):
                break
            time.sleep(0.1)
        assert not [pid for pid in workers if Path(f"/proc/{pid}").exists() and not _zombie(pid)]
        assert all(_port_free(port) for port in running_ports(running))
    finally:
        for sock in held:
            sock.close()
        running.stop()  # nothing left to stop; closes the log


def running_ports(server: RunningServer) -> tuple[int, int]:
    return server.http_port, server.https_port


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def _new_workers(running: RunningServer, old: set[int]) -> set[int]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        new = set(child_pids(running.process.pid)) - old
        if new:
            return new
        time.sleep(0.2)
    raise AssertionError("the arbiter started no new worker")


def test_every_line_the_server_writes_is_a_json_object(tmp_path: Path) -> None:
    """Not on a terminal, the default: the banner, request errors, a killed worker, a
    SIGHUP restart and the shutdown, every line of stdout and stderr parses."""
    running = start_server(tmp_path / "data", workers=1)
    try:
        assert requests.get(f"{running.http_url}/nope", timeout=10).status_code == 404
        malformed = requests.post(f"{running.http_url}/ocsp/nope", data=b"junk", timeout=10)
        assert malformed.content == b"0\x03\n\x01\x01"  # OCSP malformedRequest
        unauthorized = requests.get(
            f"{running.https_url}/api/v1/cas", timeout=10, verify=str(running.tls_bundle)
        )
        assert unauthorized.status_code == 401
        (worker,) = child_pids(running.process.pid)
        os.kill(worker, signal.SIGKILL)  # the arbiter reports the death of its worker
        replacement = _new_workers(running, {worker})
        assert eventually_ok(f"{running.http_url}/healthz")
        os.kill(running.process.pid, signal.SIGHUP)  # graceful restart of the workers
        _new_workers(running, {worker, *replacement})
        assert eventually_ok(f"{running.http_url}/readyz")
    finally:
        assert running.stop() == 0
    lines = running.log.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # each one parses
    assert all(isinstance(record, dict) and record["msg"] for record in records)
    messages = [record["msg"] for record in records]
    assert any(message.startswith("HTTP  http://127.0.0.1:") for message in messages)
    assert any(str(worker) in message for message in messages), messages


def test_the_text_log_format_is_for_a_terminal(tmp_path: Path) -> None:
    running = start_server(tmp_path / "data", environment={"PKIGATE_LOG_FORMAT": "text"})
    try:
        (worker,) = child_pids(running.process.pid)
        os.kill(worker, signal.SIGKILL)
        _new_workers(running, {worker})
    finally:
        running.stop()
    text = running.log.read_text()
    assert f"\n  HTTP  {running.http_url} " in text  # the banner as it is
    assert re.search(rf"^\d\d:\d\d:\d\d ERROR   gunicorn.error: .*{worker}", text, re.M), text
    assert not [line for line in text.splitlines() if line.startswith("{")]


def test_an_exception_escaping_a_greenlet_is_one_json_record() -> None:
    # What the workers and the arbiter install: gevent's hub would print the traceback
    # itself, as plain text among the JSON records.
    program = (
        "import gevent\n"
        "from pkigate.gateways.logs import configure_logging, log_gevent_errors\n"
        "configure_logging('INFO', 'json')\n"
        "log_gevent_errors()\n"
        "def fails():\n"
        "    raise ValueError('escaped')\n"
        "gevent.spawn(fails).join()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True
    )
    (line,) = done.stderr.splitlines()
    record = json.loads(line)
    assert record["level"] == "ERROR"
    assert "fails" in record["msg"]
    assert "ValueError: escaped" in record["exception"]


def test_a_worker_waiting_for_the_sqlite_write_lock_goes_on_serving(tmp_path: Path) -> None:
    """A write waits for the lock in a thread of the worker's pool, an issuance's group
    commit included: the worker answers meanwhile, and each write completes once the lock
    is free."""
    running = start_server(tmp_path / "data", workers=1)
    try:
        admin = running.session()
        issuer = running.session(
            admin.post(
                f"{running.https_url}/api/v1/tokens",
                json={"name": "issues", "role": "issuer"},
                timeout=60,
            ).json()["secret"]
        )
        cas = admin.get(f"{running.https_url}/api/v1/cas", timeout=60).json()["cas"]
        issuing = next(c["id"] for c in cas if c["type"] == "SUBORDINATE")
        lock = os.open(running.data_dir / "pkigate.db-writer.lock", os.O_RDWR)
        finished: list[int] = []
        writes = [
            lambda: admin.post(
                f"{running.https_url}/api/v1/tokens",
                json={"name": "waits", "role": "auditor"},
                timeout=60,
            ),
            lambda: issuer.post(
                f"{running.https_url}/api/v1/cas/{issuing}/certificates",
                json={"csr": make_csr("waits.example.test").decode()},
                timeout=60,
            ),
        ]
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # as another process writing for a while
            writers = [
                threading.Thread(target=lambda w=w: finished.append(w().status_code))
                for w in writes
            ]
            for writer in writers:
                writer.start()
            time.sleep(1.0)  # the writes are now waiting for the lock, in the only worker
            assert not finished
            began = time.monotonic()
            assert requests.get(f"{running.http_url}/healthz", timeout=5).status_code == 200
            assert time.monotonic() - began < 2
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            os.close(lock)
        for writer in writers:
            writer.join(30)
        assert sorted(finished) == [201, 201]
    finally:
        running.stop()


def _loaded_in_a_new_process(steps: str, packages: set[str]) -> list[str]:
    """The modules of ``packages`` (and ``pkigate.core``) a new interpreter has loaded after
    running ``steps``."""
    probe = (
        f"import sys\n{steps}\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(packages)!r}"
        " or m == 'pkigate.core'))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    return list(ast.literal_eval(out.stdout.strip().splitlines()[-1]))


def test_a_worker_without_a_token_or_webhook_loads_no_pkcs11_no_requests_no_plotting_and_no_linter(
    tmp_path: Path,
) -> None:
    """What the arbiter preloads and a worker opens, in the embedded default: neither the
    PKCS#11 binding (only a configured token needs it), nor requests (only a SCEP
    validation webhook does), nor the simulator's plotting, nor the certificate linter and
    path validator the tests and the simulator use."""
    steps = (
        "from pkigate.gateways.server import preload_worker_modules\n"
        "from pkigate.gateways.config import parse_config\n"
        "from pkigate.gateways.runtime import Gateway\n"
        "preload_worker_modules()\n"
        f"config = parse_config(\"data_dir = '{tmp_path / 'data'}'\")\n"
        "Gateway.open(config, bootstrap=True).close()"
    )
    heavy = {"pkcs11", "requests", "urllib3", "matplotlib", "numpy", "PIL"}
    heavy |= {"pkilint", "pyhanko", "pyhanko_certvalidator", "selenium"}
    assert _loaded_in_a_new_process(steps, heavy) == ["pkigate.core"]


def test_an_arbiter_imports_no_core_and_no_web_framework() -> None:
    """The arbiter's own imports (the server, its arbiter and worker classes, gunicorn and
    metrics) stop short of the core, SQLAlchemy and Flask: a zygote or the worker imports
    them after the fork."""
    steps = (
        "from gevent import monkey; monkey.patch_all()\n"
        "from gunicorn.app.base import BaseApplication\n"
        "from prometheus_client import multiprocess\n"
        "from pkigate.gateways.server import make_arbiter_class, make_worker_class\n"
        "make_arbiter_class(); make_worker_class()"
    )
    heavy = {"sqlalchemy", "flask", "cryptography", "ldap3", "lxml"}
    assert _loaded_in_a_new_process(steps, heavy) == []


def test_a_large_upload_over_the_limit_gets_its_413_not_a_reset(server: RunningServer) -> None:
    body = b"\0" * (4 * 1024 * 1024)  # far over max_body_bytes (64 KiB here)
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
        sending = threading.Thread(
            target=lambda: _send_quietly(
                sock,
                b"POST /scep?operation=PKIOperation HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/x-pki-message\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body,
            )
        )
        sending.start()
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        sending.join(30)
    assert _status(answer) == 413
    assert "connection: close" in _headers(answer)


def test_an_oversized_body_announced_with_expect_100_continue_is_refused_uninvited(
    server: RunningServer,
) -> None:
    """The 413 comes at once from the headers, with no "100 Continue" first: that would
    invite the client to send the body only for it to be refused unread."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
        sock.sendall(
            b"POST /scep?operation=PKIOperation HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/x-pki-message\r\nExpect: 100-continue\r\n"
            b"Content-Length: 4194304\r\n\r\n"
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"100 Continue" not in answer


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):  # the server stops reading after its answer
        sock.sendall(data)


def test_an_answer_leaves_in_one_write_and_a_long_one_whole(server: RunningServer) -> None:
    # One TLS record holds the whole small answer: OpenSSL's read returns one record at a
    # time, so a first read without the body means the headers went out on their own.
    host, port = server.https_url.removeprefix("https://").rsplit(":", 1)
    with (
        socket.create_connection((host, int(port)), timeout=10) as raw,
        _tls_context(server).wrap_socket(raw) as tls,
    ):
        for _ in range(2):  # and again on the kept-alive connection
            tls.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            first = tls.recv(65536)
            head, _, body = first.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), first
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
            assert len(body) == length and json.loads(body) == {"status": "ok"}, first
    # An answer longer than what is held back (64 KiB) arrives whole: the OpenAPI document.
    document = server.session().get(f"{server.https_url}/api/v1/openapi.json", timeout=10)
    assert len(document.content) > 64 * 1024
    assert document.json()["openapi"].startswith("3.")
