"""Prometheus metrics. Counters and histograms are per process (aggregated across gunicorn
workers through prometheus_client's multiprocess mode): requests, issuances and refusals,
OCSP responses. Gauges are read from the store at scrape time, so every worker reports
the same truth: CAs, certificates by status and by expiry bucket, the newest CRLs, the job
queue. A scrape costs a few rows per CA whatever the store's size: certificates are counted
by triggers into small tables (core/store/counts.py), never by counting the certificates
table. ``process_*`` describe the worker that answered the scrape.

In multiprocess mode each process keeps its values in a memory-mapped file in the data
directory. prometheus_client makes that file sparse (``truncate``) and writes into it
through the map: on a full disk the first touch of an unallocated page is a SIGBUS, which
kills the worker (and its replacement, at its first request). Here every byte is allocated
(``posix_fallocate``) before the map writes it, so a full disk costs a metric update, never
the process.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
    values,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from pkigate.core import Core
from pkigate.core.authorities import effective_status
from pkigate.core.model import CAStatus
from pkigate.core.service import utc_now
from pkigate.core.store import CARecord, counts
from pkigate.core.store import events as events_sql
from pkigate.core.store.jobs import JobStatus

log = logging.getLogger("pkigate.metrics")
# The text exposition format that generate_latest writes (a mimetype alone would make
# Flask drop the version parameter, and some scrapers then guess the format).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


class AllocatedMmapedDict(MmapedDict):
    """prometheus_client's per-process values file, allocated before it is written.

    A new file starts as one allocated page (the library would make it a 1 MiB hole) and
    each new entry's bytes are allocated before the library writes them through its map:
    an ``OSError`` (ENOSPC) then leaves the file as it was, instead of a SIGBUS."""

    def __init__(self, filename: str) -> None:
        if not os.path.exists(filename):
            # Made under another name and renamed once allocated: the collector reads every
            # *.db file, and an empty one (allocation failed) would break /metrics.
            partial = f"{filename}.partial"
            fd = os.open(partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, mmap.PAGESIZE)
            except OSError:
                os.unlink(partial)
                raise
            finally:
                os.close(fd)
            os.replace(partial, filename)
        super().__init__(filename)

    def _init_value(self, key: str) -> None:
        # The entry's size as the library lays it out: a 4-byte length, the key padded to
        # 8 bytes, then two doubles.
        encoded = len(key.encode("utf-8"))
        size = 4 + encoded + (8 - (encoded + 4) % 8) + 16
        os.posix_fallocate(self._f.fileno(), self._used, size)
        super()._init_value(key)


class AllocatedValue:
    """A metric value in this process's :class:`AllocatedMmapedDict` (prometheus_client's
    ``ValueClass`` contract: what a labelled child keeps for each sample)."""

    _multiprocess = True
    _files: dict[tuple[int, str], AllocatedMmapedDict] = {}
    _lock = threading.Lock()

    def __init__(
        self,
        typ: str,
        metric_name: str,
        name: str,
        labelnames: Any,
        labelvalues: Any,
        help_text: str,
        multiprocess_mode: str = "",
        **_options: Any,
    ) -> None:
        prefix = f"{typ}_{multiprocess_mode}" if typ == "gauge" else typ
        self._key = mmap_key(metric_name, name, labelnames, labelvalues, help_text)
        with self._lock:
            self._file = self._file_for(prefix)
            self._value, _stamp = self._file.read_value(self._key)

    @classmethod
    def _file_for(cls, prefix: str) -> AllocatedMmapedDict:
        # Keyed by process: a gunicorn worker forked from a parent writes files of its own.
        pid = os.getpid()
        found = cls._files.get((pid, prefix))
        if found is None:
            directory = os.environ[MULTIPROCESS_DIR_ENV]
            found = AllocatedMmapedDict(os.path.join(directory, f"{prefix}_{pid}.db"))
            cls._files[(pid, prefix)] = found
        return found

    def inc(self, amount: float) -> None:
        with self._lock:
            self._value += amount
            self._file.write_value(self._key, self._value, 0.0)

    def set(self, value: float, timestamp: float | None = None) -> None:
        with self._lock:
            self._value = value
            self._file.write_value(self._key, value, timestamp or 0.0)

    def get(self) -> float:
        with self._lock:
            return float(self._value)

    def set_exemplar(self, _exemplar: Any) -> None:
        return None  # multiprocess mode keeps no exemplars

    def get_exemplar(self) -> None:
        return None


if os.environ.get(MULTIPROCESS_DIR_ENV):
    # prometheus_client reads this when a labelled child is created (the hook it offers
    # for multiprocess values), so it must be set before the first sample.
    values.ValueClass = AllocatedValue

_skipped_for_space = threading.Event()


def _recording_failed(exc: OSError) -> None:
    """A sample that could not be kept (no space for its file): once in the log."""
    if not _skipped_for_space.is_set():
        _skipped_for_space.set()
        log.warning("metrics not recorded: %s", exc.strerror or exc)


ISSUANCES = Counter(
    "pkigate_issuance_total", "Certificate requests by outcome", ["connector", "template", "result"]
)
REFUSALS = Counter(
    "pkigate_issuance_refusals_total",
    "Certificate requests refused, by connector and reason (the error code)",
    ["connector", "reason"],
)
OCSP_RESPONSES = Counter(
    "pkigate_ocsp_responses_total",
    "OCSP responses by response status and whether the store's cached response was served",
    ["status", "cache"],
)
REQUEST_SECONDS = Histogram(
    "pkigate_http_request_duration_seconds",
    "HTTP request latency",
    ["listener", "endpoint", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
# pkigate_certificates_expiring{within}: cumulative, by UTC day of notAfter.
EXPIRY_BUCKETS_DAYS = (1, 7, 30, 90)
_OCSP_STATUS_NAMES = {
    0: "successful",
    1: "malformedRequest",
    2: "internalError",
    3: "tryLater",
    5: "sigRequired",
    6: "unauthorized",
}


def record_issuance(connector: str, template: str, result: str) -> None:
    try:
        ISSUANCES.labels(connector, template, result).inc()
        if result != "success":
            REFUSALS.labels(connector, result).inc()
    except OSError as exc:
        _recording_failed(exc)


def record_ocsp(status: int, cached: bool) -> None:
    """One OCSP response sent (``status``: the OCSPResponseStatus value)."""
    try:
        OCSP_RESPONSES.labels(
            _OCSP_STATUS_NAMES.get(status, str(status)), "hit" if cached else "miss"
        ).inc()
    except OSError as exc:
        _recording_failed(exc)


def observe_request(listener: str, endpoint: str, status: int, seconds: float) -> None:
    try:
        REQUEST_SECONDS.labels(listener, endpoint, str(status)).observe(seconds)
    except OSError as exc:
        _recording_failed(exc)


def _build_version() -> str:
    try:
        return version("pkigate")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


class StoreCollector(Collector):
    """What the store says, read at scrape time so every worker reports the same: a few
    rows per CA whatever the number of certificates (core/store/counts.py); and the
    build."""

    def __init__(self, core: Core) -> None:
        self._core = core

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = utc_now()
        store = self._core.store
        with store.read() as conn:
            cas = [
                ca for ca in store.list_cas(conn) if effective_status(ca, now) != CAStatus.DELETED
            ]
            certificates = counts.certificates_by_status(conn)
            today = now.date()
            expiring = counts.unrevoked_by_expiry_day(
                conn, today, today + timedelta(days=max(EXPIRY_BUCKETS_DAYS))
            )
            crls = counts.latest_crls(conn)
            jobs = counts.unfinished_jobs(conn)
            deliveries = events_sql.count_deliveries(conn, ("pending", "dead"))
        build = GaugeMetricFamily(
            "pkigate_build_info", "pkigate's version (value 1)", labels=["version"]
        )
        build.add_metric([_BUILD_VERSION], 1)
        yield build
        yield from _ca_families(cas, now)
        yield from _certificate_families(cas, certificates, expiring, today)
        yield from _crl_families(crls)
        yield from _job_families(jobs)
        unsettled = GaugeMetricFamily(
            "pkigate_notification_deliveries",
            "Event deliveries not (yet) made, by notification and status: pending (being "
            "retried) or dead (gave up after max_attempts; see `pkigate events list`)",
            labels=["destination", "status"],
        )
        for (destination, status), count in sorted(deliveries.items()):
            unsettled.add_metric([destination, status], count)
        yield unsettled


def _ca_families(cas: list[CARecord], now: datetime) -> Iterator[GaugeMetricFamily]:
    info = GaugeMetricFamily(
        "pkigate_ca_info", "The CAs (value 1)", labels=["ca", "subject", "type", "status"]
    )
    not_after = GaugeMetricFamily(
        "pkigate_ca_not_after_timestamp_seconds",
        "When the CA's certificate expires (Unix time)",
        labels=["ca"],
    )
    for ca in cas:
        info.add_metric([ca.id, ca.subject, ca.type, effective_status(ca, now).value], 1)
        if ca.not_after is not None:
            not_after.add_metric([ca.id], ca.not_after.timestamp())
    yield info
    yield not_after


def _certificate_families(
    cas: list[CARecord],
    certificates: list[tuple[str, str, int]],
    expiring: list[tuple[str, date, int]],
    today: date,
) -> Iterator[GaugeMetricFamily]:
    known = {ca.id for ca in cas}
    by_status = GaugeMetricFamily(
        "pkigate_certificates", "Certificates by CA and status", labels=["ca", "status"]
    )
    for ca_id, status, count in certificates:
        if ca_id in known:
            by_status.add_metric([ca_id, status], count)
    yield by_status
    within = GaugeMetricFamily(
        "pkigate_certificates_expiring",
        "Unrevoked certificates whose notAfter falls within the next N days, counted by UTC "
        "day (cumulative: within=30d includes within=7d)",
        labels=["ca", "within"],
    )
    for ca_id in sorted(known):
        for days in EXPIRY_BUCKETS_DAYS:
            last = today + timedelta(days=days)
            total = sum(n for ca, day, n in expiring if ca == ca_id and day <= last)
            within.add_metric([ca_id, f"{days}d"], total)
    yield within


def _crl_families(crls: list[counts.CRLTimes]) -> Iterator[GaugeMetricFamily]:
    this_update = GaugeMetricFamily(
        "pkigate_crl_this_update_timestamp_seconds",
        "thisUpdate of the newest CRL (Unix time); partition 0 is the complete CRL",
        labels=["ca", "partition"],
    )
    next_update = GaugeMetricFamily(
        "pkigate_crl_next_update_timestamp_seconds",
        "nextUpdate of the newest CRL (Unix time); partition 0 is the complete CRL",
        labels=["ca", "partition"],
    )
    for crl in crls:
        labels = [crl.ca_id, str(crl.partition)]
        this_update.add_metric(labels, crl.this_update.timestamp())
        next_update.add_metric(labels, crl.next_update.timestamp())
    yield this_update
    yield next_update


def _job_families(jobs: list[tuple[str, str, int]]) -> Iterator[GaugeMetricFamily]:
    depth = GaugeMetricFamily(
        "pkigate_job_queue_depth", "Jobs waiting or running, by kind", labels=["kind"]
    )
    failed = GaugeMetricFamily(
        "pkigate_jobs_failed",
        "Jobs that failed for good, by kind (kept until the queue purges finished jobs)",
        labels=["kind"],
    )
    waiting: dict[str, int] = {}
    for kind, status, count in jobs:
        if status == JobStatus.FAILED:
            failed.add_metric([kind], count)
        else:
            waiting[kind] = waiting.get(kind, 0) + count
    for kind, count in sorted(waiting.items()):
        depth.add_metric([kind], count)
    yield depth
    yield failed


def _build_registry(core: Core) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(StoreCollector(core))
    # The process answering the scrape (one gunicorn worker: each worker's own
    # counters are summed through the multiprocess files, process figures cannot be).
    ProcessCollector(registry=registry)
    return registry


_BUILD_VERSION = _build_version()


def render(core: Core) -> bytes:
    if os.environ.get(MULTIPROCESS_DIR_ENV):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    return generate_latest(registry) + generate_latest(_build_registry(core))
