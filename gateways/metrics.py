"""Prometheus metrics. Counters and histograms are per process (aggregated across gunicorn
workers through prometheus_client's multiprocess mode); CA expiry and expiring-certificate
gauges are read from the store at scrape time, so every worker reports the same truth."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from pkigate.core import Core
from pkigate.core.authorities import effective_status
from pkigate.core.model import CAStatus
from pkigate.core.service import utc_now

ISSUANCES = Counter(
    "pkigate_issuance_total", "Certificate requests by outcome", ["connector", "template", "result"]
)
REQUEST_SECONDS = Histogram(
    "pkigate_http_request_duration_seconds",
    "HTTP request latency",
    ["listener", "endpoint", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)


def record_issuance(connector: str, template: str, result: str) -> None:
    ISSUANCES.labels(connector, template, result).inc()


class StoreCollector(Collector):
    def __init__(self, core: Core) -> None:
        self._core = core

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = utc_now()
        expiry = GaugeMetricFamily(
            "pkigate_ca_expiry_days", "Days until the CA expires", labels=["ca_id", "subject"]
        )
        expiring = GaugeMetricFamily(
            "pkigate_certificates_expiring_30d",
            "Unrevoked certificates whose notAfter is within 30 days",
            labels=["ca_id"],
        )
        store = self._core.store
        with store.read() as conn:
            for ca in store.list_cas(conn):
                if ca.not_after is None or effective_status(ca, now) == CAStatus.DELETED:
                    continue
                expiry.add_metric([ca.id, ca.subject], (ca.not_after - now).total_seconds() / 86400)
                count = store.count_certificates(
                    conn,
                    ca.id,
                    status="ISSUED",
                    not_expired_at=now,
                    expiring_before=now + timedelta(days=30),
                )
                expiring.add_metric([ca.id], count)
        yield expiry
        yield expiring


def render(core: Core) -> bytes:
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    output = generate_latest(registry)
    store_registry = CollectorRegistry()
    store_registry.register(StoreCollector(core))
    return output + generate_latest(store_registry)
