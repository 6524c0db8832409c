"""Prometheus metrics. Counters and histograms are per process (aggregated across gunicorn
workers through prometheus_client's multiprocess mode); CA expiry and expiring-certificate
gauges are read from the store at scrape time, so every worker reports the same truth.

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
from datetime import timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from pkigate.core import Core
from pkigate.core.authorities import effective_status
from pkigate.core.model import CAStatus
from pkigate.core.service import utc_now

log = logging.getLogger("pkigate.metrics")
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
REQUEST_SECONDS = Histogram(
    "pkigate_http_request_duration_seconds",
    "HTTP request latency",
    ["listener", "endpoint", "status"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)


def record_issuance(connector: str, template: str, result: str) -> None:
    try:
        ISSUANCES.labels(connector, template, result).inc()
    except OSError as exc:
        _recording_failed(exc)


def observe_request(listener: str, endpoint: str, status: int, seconds: float) -> None:
    try:
        REQUEST_SECONDS.labels(listener, endpoint, str(status)).observe(seconds)
    except OSError as exc:
        _recording_failed(exc)


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
