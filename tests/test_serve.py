"""`pkigate serve` as users run it: real gunicorn workers, real HTTP(S), real clients."""

from __future__ import annotations

import json
import logging
import os
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from helpers import fresh_postgres_database, make_csr
from serving import PKIGATE, RunningServer, child_pids, eventually_ok, start_server

from pkigate.core import Core
from pkigate.gateways.config import parse_config
from pkigate.gateways.runtime import Gateway


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    running = start_server(tmp_path / "data")
    yield running
    running.stop()


def _ca_ids(session: requests.Session, server: RunningServer) -> dict[str, str]:
    cas = session.get(f"{server.https_url}/api/v1/cas").json()
    return (
        {ca["subject"]: ca["id"] for ca in cas["cas"]}
        if isinstance(cas, dict)
        else {ca["subject"]: ca["id"] for ca in cas}
    )


def test_default_serve_prints_urls_publishes_ca_certificates_and_restarts_cleanly(
    server: RunningServer, tmp_path: Path
) -> None:
    banner = server.log.read_text()
    assert f"HTTP  {server.http_url}" in banner and f"HTTPS {server.https_url}" in banner
    assert f"first admin token   {server.data_dir / 'admin-token'}" in banner
    assert (server.data_dir / "admin-token").stat().st_mode & 0o777 == 0o600
    assert requests.get(f"{server.http_url}/healthz", timeout=5).json() == {"status": "ok"}
    session = server.session()
    ids = _ca_ids(session, server)
    root_id = ids["CN=pkigate Root CA,O=pkigate"]
    published = requests.get(f"{server.http_url}/ca/{root_id}.cer", timeout=5)
    assert published.headers["Content-Type"] == "application/pkix-cert"
    root = x509.load_der_x509_certificate(published.content)
    assert root.subject == root.issuer
    token_before = server.admin_token
    assert server.stop() == 0

    again = start_server(server.data_dir)
    try:
        assert again.admin_token == token_before
        assert _ca_ids(again.session(), again) == ids  # nothing created twice
        assert "first admin token" in again.log.read_text()
    finally:
        again.stop()


@pytest.mark.parametrize("fault", ["key of another certificate", "key lost"])
def test_a_tls_pair_that_no_longer_fits_is_replaced_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    """A start killed between the writes of the HTTPS listener's own key and certificate,
    or a lost key file: the next start makes a new pair and says so. The pair was used as
    it was: every worker died loading it ("key values mismatch"), at every start."""
    gateway = Gateway.open(
        parse_config(f"data_dir = '{tmp_path / 'data'}'\n[listeners]\nhttps = '127.0.0.1:8443'\n"),
        bootstrap=True,
    )
    try:
        certificate, key = gateway.ensure_tls_certificate()
        if fault == "key lost":
            key.unlink()
        else:
            other = ec.generate_private_key(ec.SECP256R1())
            key.write_bytes(
                other.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
        caplog.set_level(logging.WARNING, logger="pkigate.gateway")
        assert gateway.ensure_tls_certificate() == (certificate, key)
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certificate, key)
        assert "a new TLS key and certificate are made" in caplog.text
        caplog.clear()
        gateway.ensure_tls_certificate()  # a good pair is kept, without a word
        assert caplog.text == ""
    finally:
        gateway.close()


def test_a_first_admin_token_whose_file_is_gone_unused_is_named_at_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The first admin token's file deleted (or lost with a disk) before the token was
    ever used leaves a token whose secret nobody may have: later starts say so (they said
    nothing, and made no other token)."""
    gateway = Gateway.open(
        parse_config(f"data_dir = '{tmp_path / 'data'}'\n[listeners]\nhttps = '127.0.0.1:8443'\n"),
        bootstrap=True,
    )
    try:
        path = gateway.ensure_admin_token()
        assert path is not None
        caplog.set_level(logging.WARNING, logger="pkigate.gateway")
        assert gateway.ensure_admin_token() == path
        assert caplog.text == ""  # the file is there: nothing to say
        path.unlink()
        assert gateway.ensure_admin_token() is None
        (token,) = gateway.tokens.list()
        assert f"the first admin token {token.id} was never used and {path} is gone" in (
            caplog.text
        )
    finally:
        gateway.close()


def test_the_first_admin_token_is_stored_only_once_its_file_is_written(tmp_path: Path) -> None:
    """The file comes first: where it cannot be written no token is stored (a later start
    makes one, not a token whose secret nobody has), and a file left by a start that
    stopped before its token was committed is replaced by one whose token works."""
    gateway = Gateway.open(
        parse_config(f"data_dir = '{tmp_path / 'data'}'\n[listeners]\nhttps = '127.0.0.1:8443'\n"),
        bootstrap=True,
    )
    try:
        path = gateway.core.data_dir / "admin-token"
        path.mkdir()  # a file cannot be renamed over a directory
        with pytest.raises(OSError):
            gateway.ensure_admin_token()
        assert gateway.tokens.list() == []
        assert [p.name for p in gateway.core.data_dir.glob(".admin-token*")] == []
        path.rmdir()

        path.write_text("pkigate_0123456789abcdef_never-committed\n")
        assert gateway.ensure_admin_token() == path
        secret = path.read_text().strip()
        assert secret != "pkigate_0123456789abcdef_never-committed"
        assert path.stat().st_mode & 0o777 == 0o600
        (token,) = gateway.tokens.list()
        assert gateway.tokens.authenticate(f"Bearer {secret}").token_id == token.id
    finally:
        gateway.close()


def test_the_listeners_open_no_gunicorn_control_socket_and_log_no_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # gunicorn >= 25 would open $XDG_RUNTIME_DIR/gunicorn.ctl in each of the two arbiters
    # (one path for both, and for every pkigate on the host) and log an ERROR when the
    # other arbiter's socket vanished under it.
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    running = start_server(tmp_path / "data", workers=2)
    try:
        assert requests.get(f"{running.http_url}/healthz", timeout=5).status_code == 200
        assert list(runtime.iterdir()) == []
        records = [json.loads(line) for line in running.log.read_text().splitlines()]
        errors = [record for record in records if record["level"] == "ERROR"]
        assert errors == []
    finally:
        running.stop()


def test_metrics_and_readiness(server: RunningServer) -> None:
    assert requests.get(f"{server.http_url}/readyz", timeout=5).json() == {"status": "ready"}
    text = requests.get(f"{server.http_url}/metrics", timeout=5).text
    assert "pkigate_ca_not_after_timestamp_seconds{" in text
    assert "pkigate_certificates_expiring{" in text
    assert "pkigate_http_request_duration_seconds_bucket{" in text


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_500_certificates_from_8_clients_against_4_workers(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    database_url = None
    if backend == "postgres":
        database_url = fresh_postgres_database(request.getfixturevalue("postgres_server"))
    server = start_server(tmp_path / "data", workers=4, database_url=database_url)
    try:
        admin = server.session()
        created = admin.post(
            f"{server.https_url}/api/v1/tokens", json={"name": "load", "role": "issuer"}
        )
        assert created.status_code == 201, created.text
        issuer = server.session(created.json()["secret"])
        issuing_id = _ca_ids(admin, server)["CN=pkigate Issuing CA,O=pkigate"]
        csrs = [make_csr(f"host-{i}.load.test").decode() for i in range(500)]

        def issue(csr: str) -> dict[str, str]:
            response = issuer.post(
                f"{server.https_url}/api/v1/cas/{issuing_id}/certificates",
                json={"csr": csr, "validity": "30d"},
                timeout=60,
            )
            assert response.status_code == 201, response.text
            return response.json()  # type: ignore[no-any-return]

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(issue, csrs))
        serials = {r["serial"] for r in results}
        assert len(serials) == 500

        bundle = tmp_path / "bundle.pem"
        bundle.write_text(results[0]["chain_pem"])
        leaf = tmp_path / "leaf.pem"
        leaf.write_text(results[-1]["certificate_pem"])
        verify = subprocess.run(
            [
                "openssl",
                "verify",
                "-CAfile",
                str(server.tls_bundle),
                "-untrusted",
                str(bundle),
                str(leaf),
            ],
            capture_output=True,
            text=True,
        )
        assert verify.stdout.strip().endswith(": OK"), verify.stderr
    finally:
        assert server.stop() == 0

    core = Core.open(server.data_dir, database_url)
    with core.store.read() as conn:
        rows = [
            r for r in core.store.list_certificates(conn, ca_id=issuing_id) if r.connector == "api"
        ]  # the HTTPS server's own certificate is there too
    assert {r.serial for r in rows} == serials and len(rows) == 500
    issue_events = [
        e
        for e in core.audit.events()
        if e.action == "certificate.issue"
        and e.result == "success"
        and e.resource == f"ca/{issuing_id}"
        and e.connector == "api"
    ]
    assert len(issue_events) == 500
    assert core.audit.verify().ok
    core.close()


def test_a_bad_configuration_stops_the_start_with_the_place_of_the_error(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n\n[listeners]\nhttps = "nowhere"\n')
    result = subprocess.run(
        [PKIGATE, "serve", "--log-format", "text", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: {config}:4: listeners.https: must be HOST:PORT, not 'nowhere'"
    )
    assert not (tmp_path / "data").exists()  # nothing was created


def test_the_server_process_becomes_an_arbiter_of_workers_serving_both_listeners(
    tmp_path: Path,
) -> None:
    running = start_server(tmp_path / "data", workers=2)
    try:
        pid = running.process.pid
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"pkigate.gateways.arbiter" in command  # the same process, exec'd
        # The arbiter opens nothing a request needs (its workers do): no database file
        # and no connection.
        opened = {os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()}
        assert not [path for path in opened if "pkigate.db" in path or "kek" in path]
        workers = child_pids(pid)
        assert len(workers) == 2
        for worker in workers:
            worker_opened = {os.readlink(fd) for fd in Path(f"/proc/{worker}/fd").iterdir()}
            assert any(path.endswith("pkigate.db") for path in worker_opened)
        # Each worker serves both listeners: every fresh connection lands on either.
        for _ in range(4):
            assert requests.get(f"{running.http_url}/healthz", timeout=5).status_code == 200
            https = requests.get(
                f"{running.https_url}/healthz", timeout=5, verify=str(running.tls_bundle)
            )
            assert https.status_code == 200
    finally:
        assert running.stop() == 0


def test_a_killed_worker_is_replaced_and_the_listeners_keep_serving(
    server: RunningServer,
) -> None:
    (worker,) = child_pids(server.process.pid)
    os.kill(worker, signal.SIGKILL)
    deadline = time.monotonic() + 30
    replacements: list[int] = []
    while time.monotonic() < deadline and not replacements:
        replacements = [pid for pid in child_pids(server.process.pid) if pid != worker]
        time.sleep(0.2)
    assert replacements, "the arbiter started no new worker"
    assert eventually_ok(f"{server.http_url}/healthz")
    assert eventually_ok(f"{server.https_url}/readyz", verify=str(server.tls_bundle))
    assert server.process.poll() is None
