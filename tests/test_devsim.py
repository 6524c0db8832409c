"""pkigate-sim end to end: fleets of phones (SCEP) and servers (ACME) against a real
`pkigate serve --workers 2`, every certificate checked independently (pyhanko path
validation, names, EKU, OCSP, CRL), then the store checked from the inside; fault mode
with the server SIGKILLed and restarted under load; the command line and its outputs.

pebble-challtestsrv (Debian package `pebble`) is the servers' test DNS server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import matplotlib.image
import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from helpers import fresh_postgres_database
from sqlalchemy import func, select

from pkigate.core import Core
from pkigate.core.store import schema
from pkigate.devsim.attempts import DeviceFailed, Recorder
from pkigate.devsim.challenges import ChallengeDns
from pkigate.devsim.config import FleetSettings
from pkigate.devsim.events import EventLog
from pkigate.devsim.report import Report
from pkigate.devsim.scep_client import ScepClient
from pkigate.devsim.simulation import (
    ExternalServer,
    Outputs,
    Simulation,
    SpawnOptions,
    simulate,
)
from pkigate.devsim.spawn import SpawnedServer, free_port
from pkigate.devsim.verify import CertificateChecker, Expectation

PKIGATE_SIM = str(Path(sys.executable).parent / "pkigate-sim")

needs_test_dns = pytest.mark.skipif(
    not ChallengeDns.available(),
    reason="pebble-challtestsrv is not installed (Debian package `pebble`)",
)


def _store_counts(
    data_dir: Path, serials: Collection[str]
) -> tuple[Counter[str], Counter[str], int]:
    """(valid ACME challenges by type, the devices' certificates by issuing connector,
    valid replacement orders), read from the store."""
    core = Core.open(data_dir)
    try:
        with core.store.read() as conn:
            challenges = conn.execute(
                select(schema.acme_challenges.c.type, func.count())
                .where(schema.acme_challenges.c.status == "valid")
                .group_by(schema.acme_challenges.c.type)
            ).all()
            connectors = conn.execute(
                select(schema.certificates.c.serial, schema.certificates.c.connector)
            ).all()
            replacements = conn.execute(
                select(func.count())
                .select_from(schema.acme_orders)
                .where(
                    schema.acme_orders.c.replaces.is_not(None),
                    schema.acme_orders.c.status == "valid",
                )
            ).scalar_one()
    finally:
        core.close()
    return (
        Counter({str(t): int(n) for t, n in challenges}),
        Counter(str(connector) for serial, connector in connectors if serial in serials),
        int(replacements),
    )


def _successes(report: Report, protocol: str, operation: str) -> int:
    summary = next((p for p in report.protocols if p.protocol == protocol), None)
    if summary is None or operation not in summary.operations:
        return 0
    return summary.operations[operation].successes


# -- the CI fleet ------------------------------------------------------------------------------
#
# One test runs the fleet (a module fixture would run it once per xdist worker) and checks
# it through the functions below, each named for the behaviour it checks.

PHONES, SERVERS, MACHINES, RENEWALS = 50, 20, 20, 2
CERTIFICATES = (PHONES + SERVERS + MACHINES) * (1 + RENEWALS)


@needs_test_dns
def test_ci_fleet_of_phones_servers_and_machines_against_two_workers(tmp_path: Path) -> None:
    settings = FleetSettings(
        phones=PHONES,
        servers=SERVERS,
        machines=MACHINES,
        concurrency=8,
        renewals=RENEWALS,
        revoke_fraction=0.2,
        pending_fraction=0.1,
        dns01_fraction=0.5,
        seed=11,
    )
    simulation = simulate(
        settings,
        spawn=SpawnOptions(workers=2, base_dir=tmp_path / "server"),
        outputs=Outputs(json=tmp_path / "report.json", plot=tmp_path / "run.png", progress=False),
    )
    finishes_with_zero_unexpected_errors(simulation.report)
    every_certificate_is_received_and_verified(simulation.report)
    renews_through_renewalreq_and_ari_replacement_orders(simulation, tmp_path / "server" / "data")
    revoked_certificates_show_revoked_in_ocsp_and_crl(simulation.report)
    store_holds_every_certificate_with_its_audit_event(simulation.report)
    json_report_is_complete_and_consistent(simulation.report, tmp_path / "report.json")
    plot_is_a_png_with_both_panels(tmp_path / "run.png")


def finishes_with_zero_unexpected_errors(report: Report) -> None:
    assert report.unexpected_errors == 0, report.failures
    assert report.devices == {
        "phone": {"total": PHONES, "finished": PHONES, "failed": 0},
        "server": {"total": SERVERS, "finished": SERVERS, "failed": 0},
        "machine": {"total": MACHINES, "finished": MACHINES, "failed": 0},
    }
    assert report.ok, report.failures


def every_certificate_is_received_and_verified(report: Report) -> None:
    assert report.certificates["received"] == CERTIFICATES
    assert report.certificates["verified"] == CERTIFICATES
    assert _successes(report, "verify", "issued") == CERTIFICATES
    # OCSP over real HTTP for each (and once more for each revoked one).
    assert _successes(report, "ocsp", "status") >= CERTIFICATES


def renews_through_renewalreq_and_ari_replacement_orders(
    simulation: Simulation, data_dir: Path
) -> None:
    report = simulation.report
    assert _successes(report, "scep", "renew") == PHONES * RENEWALS
    assert _successes(report, "acme", "renew") == SERVERS * RENEWALS
    # Machines autoenrolled through MS-XCEP/MS-WSTEP, then renewed with their certificate.
    assert _successes(report, "adcs", "autoenroll") == MACHINES
    assert _successes(report, "adcs", "renew") == MACHINES * RENEWALS
    # ARI asked after each certificate and again when the chosen moment came.
    assert _successes(report, "acme", "ari") >= SERVERS * RENEWALS * 2
    challenges, by_connector, replacements = _store_counts(
        data_dir, set(simulation.run.certificates)
    )
    # Every renewal order named the certificate it replaced.
    assert replacements == SERVERS * RENEWALS
    assert challenges["http-01"] > 0 and challenges["dns-01"] > 0
    pending = _successes(report, "api", "approve")
    assert pending > 0  # some phones waited for approval, and were approved
    assert by_connector["mdm-pending"] == pending * (1 + RENEWALS)  # renewed where enrolled
    assert by_connector["scep"] == (PHONES - pending) * (1 + RENEWALS)
    assert by_connector["acme"] == SERVERS * (1 + RENEWALS)
    assert by_connector["adcs"] == MACHINES * (1 + RENEWALS)


def revoked_certificates_show_revoked_in_ocsp_and_crl(report: Report) -> None:
    revoked = report.certificates["revoked"]
    assert revoked > 0
    # One verify/revoked event per revocation: OCSP revoked, then the CRL listing it.
    assert report.certificates["revoked_verified"] == revoked
    assert _successes(report, "acme", "revoke") == revoked


def store_holds_every_certificate_with_its_audit_event(report: Report) -> None:
    post = report.postconditions
    assert post is not None
    assert post["ok"], post
    assert post["certificates_checked"] == CERTIFICATES
    assert not post["audit_problems"]


def json_report_is_complete_and_consistent(report: Report, path: Path) -> None:
    data = json.loads(path.read_text())
    assert data["ok"] is True
    assert data["run_id"] == report.run_id
    assert data["settings"]["phones"] == PHONES and data["settings"]["servers"] == SERVERS
    assert data["certificates"]["received"] == data["certificates"]["verified"] == CERTIFICATES
    by_protocol = {p["protocol"]: p for p in data["protocols"]}
    assert {"scep", "acme", "api", "ocsp", "crl", "verify"} <= set(by_protocol)
    for summary in by_protocol.values():
        assert summary["attempts"] >= summary["successes"] > 0
        assert summary["attempts"] - summary["successes"] == sum(summary["errors"].values())
        assert 0 < summary["latency_p50"] <= summary["latency_p95"] <= summary["latency_p99"]
        expected = summary["successes"] / data["duration"]
        assert summary["throughput"] == pytest.approx(expected, rel=1e-3)
        assert sum(o["successes"] for o in summary["operations"].values()) == summary["successes"]
    assert data["postconditions"]["ok"] is True


def plot_is_a_png_with_both_panels(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 20_000
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (800, 1000)
    # Not a blank canvas: the curves and labels put many colours on it.
    assert len({tuple(pixel) for pixel in image[::8, ::8].reshape(-1, image.shape[2])}) > 20


# -- PostgreSQL ----------------------------------------------------------------------------------


@needs_test_dns
@pytest.mark.postgres
def test_a_fleet_against_two_workers_sharing_postgresql(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    database_url = fresh_postgres_database(request.getfixturevalue("postgres_server"))
    simulation = simulate(
        FleetSettings(phones=10, servers=5, renewals=1, revoke_fraction=0.4, seed=6),
        spawn=SpawnOptions(workers=2, database_url=database_url, base_dir=tmp_path / "server"),
        outputs=Outputs(progress=False),
    )
    report = simulation.report
    assert report.ok, report.failures
    assert report.certificates["received"] == report.certificates["verified"] == 30
    assert report.postconditions is not None and report.postconditions["ok"]
    assert not (tmp_path / "server" / "data" / "pkigate.db").exists()  # all in PostgreSQL


# -- fault mode --------------------------------------------------------------------------------


@needs_test_dns
def test_fault_mode_devices_cut_off_by_sigkill_retry_and_the_store_stays_whole(
    tmp_path: Path,
) -> None:
    settings = FleetSettings(
        phones=20,
        servers=8,
        machines=4,
        concurrency=8,
        renewals=4,
        revoke_fraction=0.25,
        pending_fraction=0.1,
        # One simulated day lasts 8 s: four renewals keep the fleet busy for 25 s or so.
        time_scale=10800,
        seed=5,
        # An order whose validation or finalization died with the server is given up
        # sooner than the default 20 s, to keep the test short.
        acme_stall_seconds=10,
    )
    simulation = simulate(
        settings,
        spawn=SpawnOptions(workers=2, base_dir=tmp_path / "server", kill_every=2.0, max_kills=4),
        outputs=Outputs(progress=False),
    )
    report, run = simulation.report, simulation.run
    assert 3 <= len(report.server_kills) <= 4, report.server_kills
    assert report.unexpected_errors == 0, report.failures
    assert report.devices_failed == 0, report.failures
    assert report.certificates["received"] == (20 + 8 + 4) * 5
    assert report.certificates["verified"] == report.certificates["received"]
    assert report.certificates["revoked_verified"] == report.certificates["revoked"]
    # Devices were cut off (the connection errors fault mode expects) and finished anyway.
    cut_off = {e.device for e in run.events if not e.ok and e.expected}
    assert cut_off, "no request was in flight when the server was killed"
    finished = {o.name for o in run.devices if o.failure is None}
    assert cut_off - {"crl-watch"} <= finished
    post = report.postconditions
    assert post is not None and post["ok"], post
    assert post["duplicate_serials"] == () or post["duplicate_serials"] == []


# -- against a running server ------------------------------------------------------------------


@dataclass
class Running:
    server: SpawnedServer
    dns: ChallengeDns
    http01_port: int

    def external(self) -> ExternalServer:
        target = self.server.target()
        return ExternalServer(
            http_url=target.http_url,
            https_url=target.https_url,
            root=target.tls_bundle,
            token=target.token,
            dns_management=self.dns.management_url,
            http01_port=self.http01_port,
            data_dir=target.data_dir,
        )


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """A `pkigate serve` started apart from the simulator, with its own test DNS server
    and an http-01 port the simulator is told about."""
    if not ChallengeDns.available():
        pytest.skip("pebble-challtestsrv is not installed (Debian package `pebble`)")
    dns = ChallengeDns().start()
    http01_port = free_port()
    server = SpawnedServer(
        http01_port=http01_port,
        dns_resolver=dns.resolver,
        workers=1,
        base_dir=tmp_path_factory.mktemp("running") / "server",
    )
    try:
        server.start()
        yield Running(server, dns, http01_port)
    finally:
        server.stop()
        dns.stop()


def test_a_fleet_runs_against_a_server_started_elsewhere(running: Running) -> None:
    simulation = simulate(
        FleetSettings(phones=3, servers=2, renewals=1, revoke_fraction=1.0, seed=3),
        external=running.external(),
        outputs=Outputs(progress=False),
    )
    report = simulation.report
    assert report.ok, report.failures
    assert report.certificates["received"] == (3 + 2) * 2
    assert report.certificates["revoked_verified"] == 2
    assert report.postconditions is not None and report.postconditions["ok"]


def test_the_checker_refuses_another_key_other_usages_another_root_or_a_good_status(
    running: Running,
) -> None:
    """The independent check fails where it should, on a real certificate."""
    simulation = simulate(
        FleetSettings(phones=1, renewals=0, seed=8),
        external=running.external(),
        outputs=Outputs(progress=False),
    )
    assert simulation.report.ok, simulation.report.failures
    (received,) = simulation.run.certificates.values()
    leaf = x509.load_der_x509_certificate(received.der)
    target = running.server.target()
    session = requests.Session()
    session.trust_env = False
    ca = ScepClient(f"{target.http_url}/scep", session).get_ca_cert()
    chain = [leaf, *ca.chain]
    recorder = Recorder(EventLog(), "checker", fault_mode=False)
    deadline = time.monotonic() + 30
    checker = CertificateChecker(target.root, lambda: session)
    right = Expectation(
        leaf.public_key(),
        frozenset({"digital_signature"}),
        frozenset({ExtendedKeyUsageOID.CLIENT_AUTH}),
        subject_common_name=leaf.subject.rfc4514_string().removeprefix("CN="),
    )
    issuer = checker.check_issued(chain, right, recorder, deadline)
    assert issuer.subject == leaf.issuer

    def refused(expected: Expectation, using: CertificateChecker = checker) -> str:
        with pytest.raises(DeviceFailed) as failed:
            using.check_issued(chain, expected, recorder, deadline)
        return failed.value.error_type

    other_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    assert refused(replace(right, public_key=other_key)) == "verify:key"
    server_auth = frozenset({ExtendedKeyUsageOID.SERVER_AUTH})
    assert refused(replace(right, extended_key_usage=server_auth)) == "verify:chain"
    assert refused(replace(right, subject_common_name="someone-else")) == "verify:names"
    stranger = _self_signed_root()
    assert refused(right, CertificateChecker(stranger, lambda: session)) == "verify:chain"
    with pytest.raises(DeviceFailed) as good:
        checker.check_revoked(leaf, issuer, None, recorder, deadline)
    assert good.value.error_type == "verify:ocsp-not-revoked"


def _self_signed_root() -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Stranger Root")])
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


# -- the command -------------------------------------------------------------------------------


@needs_test_dns
def test_pkigate_sim_run_spawn_prints_the_summary_and_writes_json_and_plot(
    tmp_path: Path,
) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text("[fleet]\nphones = 2\nservers = 9\nrenewals = 1\nseed = 4\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PKIGATE_")}
    run = subprocess.run(
        [
            PKIGATE_SIM,
            "run",
            "--spawn",
            "--workers",
            "1",
            "--fleet",
            str(fleet),
            "--servers",
            "2",  # the option wins over the fleet file
            "--revoke-fraction",
            "1",
            "--json",
            str(tmp_path / "report.json"),
            "--plot",
            str(tmp_path / "run.png"),
            "--server-events",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**env, "COLUMNS": "120"},
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    for word in ("protocol", "scep", "acme", "ocsp", "crl", "verify", "p95 ms", "OK"):
        assert word in run.stdout, run.stdout
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["ok"] is True
    assert data["devices"] == {
        "phone": {"total": 2, "finished": 2, "failed": 0},
        "server": {"total": 2, "finished": 2, "failed": 0},
    }
    assert data["certificates"]["received"] == 8
    assert data["certificates"]["revoked"] == data["certificates"]["revoked_verified"] == 2
    # The events the fleet caused: one per certificate the devices got (phones by SCEP,
    # servers by ACME; the server may issue its own too, an OCSP responder, say) and per
    # revocation.
    caused = data["server_events"]
    issued = caused["issued_by_template"]
    assert issued["EndEntityClientAuthCertificate/V1"] == 4, caused
    assert issued["EndEntityServerAuthCertificate_APIPassthrough/V1"] == 4, caused
    assert caused["by_type"]["certificate.issued"] == sum(issued.values())
    assert caused["by_type"]["certificate.revoked"] == 2, caused
    assert f"certificate.issued {sum(issued.values())}" in run.stdout
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "run.png").stat().st_size > 20_000


def test_an_unknown_device_kind_is_refused_before_anything_starts() -> None:
    run = subprocess.run(
        [PKIGATE_SIM, "run", "--spawn", "--phones", "-1", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 2
    assert "--phones" in run.stderr
