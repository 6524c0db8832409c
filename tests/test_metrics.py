"""/metrics in the Prometheus text format, scraped from a real server (two gunicorn workers,
multiprocess mode) and read with prometheus_client's own parser; and the store-side
counters that keep a scrape cheap on a store of millions of certificates."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from datetime import timedelta
from importlib.metadata import version

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from helpers import ACTOR, create_root, create_sub, make_csr
from prometheus_client.parser import text_string_to_metric_families
from serving import RunningServer, issuer_token_and_issuing_ca, start_server
from sqlalchemy import event

from pkigate.core import Core, IssuanceRequest, Requester, Validity
from pkigate.core.model import RevocationReason, ValidityType
from pkigate.core.store import counts
from pkigate.gateways.metrics import StoreCollector

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
FAMILIES = "families"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(tmp_path_factory.mktemp("metrics") / "data", workers=2)
    yield running
    running.stop()


def scrape(server: RunningServer) -> tuple[requests.Response, Samples]:
    response = requests.get(f"{server.http_url}/metrics", timeout=30)
    assert response.status_code == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        samples[(FAMILIES, frozenset({("name", family.name)}))] = 1
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return response, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _ocsp_get(server: RunningServer, ca_id: str, leaf_pem: str) -> bytes:
    leaf = x509.load_pem_x509_certificate(leaf_pem.encode())
    issuer = x509.load_der_x509_certificate(
        requests.get(f"{server.http_url}/ca/{ca_id}.cer", timeout=10).content
    )
    request = ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA256()).build()
    encoded = base64.b64encode(request.public_bytes(serialization.Encoding.DER)).decode()
    response = requests.get(f"{server.http_url}/ocsp/{ca_id}/{encoded}", timeout=10)
    assert response.status_code == 200
    return response.content


def test_metrics_follow_the_exposition_format_and_report_what_happened(
    server: RunningServer,
) -> None:
    token, ca_id = issuer_token_and_issuing_ca(server, "metrics")
    session = server.session(token)
    certificates = f"{server.https_url}/api/v1/cas/{ca_id}/certificates"
    _, before = scrape(server)

    issued = {}
    for name, validity in (("soon", "5d"), ("later", "60d"), ("revoked", "5d")):
        reply = session.post(
            certificates,
            json={"csr": make_csr(f"{name}.metrics.test").decode(), "validity": validity},
            timeout=30,
        )
        assert reply.status_code == 201, reply.text
        issued[name] = reply.json()
    revoked = session.post(
        f"{certificates}/{issued['revoked']['serial']}/revoke",
        json={"reason": "keyCompromise"},
        timeout=30,
    )
    assert revoked.status_code == 200, revoked.text
    # Before OCSP: the first OCSP request has the CA issue its delegated responder.
    _, issuing_done = scrape(server)
    refused = session.post(certificates, json={"csr": "not a CSR"}, timeout=30)
    assert refused.status_code == 400
    refusal_code = refused.json()["error"]["code"]
    for _ in range(2):  # signed, then served from the store's cache
        _ocsp_get(server, ca_id, issued["soon"]["certificate_pem"])
    requests.get(f"{server.http_url}/ocsp/{ca_id}/not-base64!", timeout=10)
    requests.get(f"{server.http_url}/crl/{ca_id}.crl", timeout=10)

    response, after = scrape(server)
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    def issuing_delta(name: str, **labels: str) -> float:
        return value(issuing_done, name, **labels) - value(before, name, **labels)

    assert value(after, "pkigate_build_info", version=version("pkigate")) == 1
    ca_certificate = x509.load_der_x509_certificate(
        requests.get(f"{server.http_url}/ca/{ca_id}.cer", timeout=10).content
    )
    assert (
        value(after, "pkigate_ca_not_after_timestamp_seconds", ca=ca_id)
        == ca_certificate.not_valid_after_utc.timestamp()
    )
    assert issuing_delta("pkigate_certificates", ca=ca_id, status="ISSUED") == 2
    assert issuing_delta("pkigate_certificates", ca=ca_id, status="REVOKED") == 1
    # Expiry by bucket label, cumulative; the revoked certificate is not counted.
    expected = {"1d": 0, "7d": 1, "30d": 1, "90d": 2}
    for within, count in expected.items():
        assert issuing_delta("pkigate_certificates_expiring", ca=ca_id, within=within) == count
    this_update = value(after, "pkigate_crl_this_update_timestamp_seconds", ca=ca_id, partition="0")
    next_update = value(after, "pkigate_crl_next_update_timestamp_seconds", ca=ca_id, partition="0")
    assert 0 < this_update < next_update
    assert delta("pkigate_ocsp_responses_total", status="successful", cache="miss") >= 1
    assert delta("pkigate_ocsp_responses_total", status="successful", cache="hit") >= 1
    assert delta("pkigate_ocsp_responses_total", status="malformedRequest", cache="miss") == 1
    assert delta("pkigate_issuance_refusals_total", connector="api", reason=refusal_code) == 1
    assert value(after, "process_resident_memory_bytes") > 0
    families = {dict(labels)["name"] for name, labels in after if name == FAMILIES}
    assert {"pkigate_job_queue_depth", "pkigate_jobs_failed"} <= families
    # Conventions: no threshold or unit baked into a name where a label belongs.
    assert not [name for name in families if re.search(r"_\d+d\b|_days\b", name)]


def _issue_for_days(core: Core, ca_id: str, days: list[int]) -> list[str]:
    """Certificates from ``ca_id`` valid for each number of days; their serials."""
    serials = []
    for number, lifetime in enumerate(days):
        issued = core.issue(
            IssuanceRequest(
                ca_id=ca_id,
                csr=make_csr(f"n{number}.counted.test"),
                validity=Validity(ValidityType.DAYS, lifetime),
                template="EndEntityCertificate/V1",
                requester=Requester("test", "test"),
            )
        )
        serials.append(format(issued.certificate.serial_number, "x"))
    return serials


def test_a_scrape_never_reads_the_certificates_table(core: Core) -> None:
    """What keeps /metrics cheap on a store of millions: every statement of a scrape, on
    SQLite and PostgreSQL, reads the trigger-kept counters, never `certificates`."""
    root = create_root(core)
    sub = create_sub(core, root)
    _issue_for_days(core, sub.record.id, [5, 45, 85])
    statements: list[str] = []

    def seen(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        statements.append(statement)

    event.listen(core.store.engine, "before_cursor_execute", seen)
    try:
        families = {family.name: family for family in StoreCollector(core).collect()}
    finally:
        event.remove(core.store.engine, "before_cursor_execute", seen)
    assert statements
    assert not [s for s in statements if re.search(r"\bcertificates\b", s)], statements
    by_status = {
        tuple(s.labels.values()): s.value for s in families["pkigate_certificates"].samples
    }
    assert by_status[(sub.record.id, "ISSUED")] == 3


def test_the_counters_follow_every_write_of_the_certificates_table(core: Core) -> None:
    root = create_root(core)
    sub = create_sub(core, root)
    serials = _issue_for_days(core, sub.record.id, [3, 33, 63, 93])
    core.revocation.revoke(sub.record.id, serials[0], RevocationReason.superseded, ACTOR)
    now = core.clock()
    with core.store.read() as conn:
        by_status = {(ca, status): n for ca, status, n in counts.certificates_by_status(conn)}
        for status in ("ISSUED", "REVOKED"):
            actual = core.store.count_certificates(conn, sub.record.id, status=status)
            assert by_status.get((sub.record.id, status), 0) == actual
        days = counts.unrevoked_by_expiry_day(conn, now.date(), now.date() + timedelta(days=400))
        per_day = {day: n for ca, day, n in days if ca == sub.record.id}
        unrevoked = core.store.list_certificates(conn, ca_id=sub.record.id, status="ISSUED")
    assert sum(per_day.values()) == len(unrevoked) == 3
    for certificate in unrevoked:
        assert per_day[certificate.not_after.date()] >= 1
