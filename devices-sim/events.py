"""What a run records: one Event per protocol exchange, and every certificate received.

Every attempt is recorded, successful or not, with its latency and when it happened, so
that the report can give attempts, successes, errors by type, latency percentiles and
throughput per protocol, and the plot throughput over time. An error is *expected* when
it is what the run provoked (a connection cut while fault mode killed the server);
anything else is unexpected and fails the run.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

# Protocols as the report names them.
SCEP = "scep"
ACME = "acme"
ADCS = "adcs"
API = "api"
"""The management API, as an MDM or an administrator uses it (challenges, approvals)."""
OCSP = "ocsp"
CRL = "crl"
VERIFY = "verify"
"""The independent check of a certificate received (chain, names, EKU, OCSP, CRL)."""

# Errors that a server being killed causes; expected, and retried, in fault mode.
CONNECTION = "connection"
TIMEOUT = "timeout"
UNAVAILABLE = "http-503"
"""502, 503 or 504: a listener that is starting, or a proxy without its backend."""
TRANSIENT = frozenset({CONNECTION, TIMEOUT, UNAVAILABLE})
CHALLENGE_CONSUMED = "scep:challenge-consumed"
"""A one-time challenge used by a PKCSReq whose answer was lost: the phone asks the MDM
for another one."""
VALIDATION_STALLED = "acme:validation-stalled"
"""An order whose validation job died with the server: abandoned for a new order."""
ORDER_STUCK = "acme:order-stuck-processing"
"""An order the server left "processing": a server fault (the server settles orders whose
finalization a crash interrupted), so never expected."""
FAULT_CONSEQUENCES = TRANSIENT | {CHALLENGE_CONSUMED, VALIDATION_STALLED}
"""What a killed server causes; expected in fault mode, unexpected otherwise."""


@dataclass(frozen=True)
class Event:
    """One attempt at one protocol operation."""

    protocol: str
    """scep, acme, api, ocsp, crl or verify."""
    operation: str
    """What was attempted: enroll, renew, poll, order, revoke, challenge, chain, ..."""
    ok: bool
    error_type: str | None
    """None when ``ok``; otherwise a short stable name (``connection``, ``acme:badNonce``,
    ``scep:badRequest``, ``verify:eku``) that the report counts by."""
    latency: float
    """Seconds from the first byte sent to the answer read (or the failure)."""
    t: float
    """When the attempt ended, in seconds since the run started."""
    device: str
    expected: bool = False
    """An error the run provoked (fault mode), not one that fails it."""
    detail: str = ""
    """For errors: what the server or the check said, to diagnose a failure."""


@dataclass(frozen=True)
class ReceivedCertificate:
    """A certificate a device received, for the post-conditions on the store."""

    device: str
    protocol: str
    serial_hex: str
    """Lower-case hex without leading zeros, as the store keeps serials."""
    der: bytes
    verified: bool = False
    revoked: bool = False


class EventLog:
    """Thread-safe collection of events and received certificates for one run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self.events: list[Event] = []
        self.certificates: dict[str, ReceivedCertificate] = {}
        """By serial; a serial received twice is recorded in ``duplicate_serials``."""
        self.duplicate_serials: list[str] = []
        self._errors = 0
        self._unexpected = 0

    def start(self) -> None:
        self._start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def record(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)
            if not event.ok:
                self._errors += 1
                self._unexpected += not event.expected

    def received(self, certificate: ReceivedCertificate) -> None:
        with self._lock:
            known = self.certificates.get(certificate.serial_hex)
            if known is not None and known.der != certificate.der:
                self.duplicate_serials.append(certificate.serial_hex)
            self.certificates[certificate.serial_hex] = certificate

    def mark(
        self, serial_hex: str, *, verified: bool | None = None, revoked: bool | None = None
    ) -> None:
        with self._lock:
            known = self.certificates[serial_hex]
            self.certificates[serial_hex] = ReceivedCertificate(
                known.device,
                known.protocol,
                known.serial_hex,
                known.der,
                known.verified if verified is None else verified,
                known.revoked if revoked is None else revoked,
            )

    def snapshot(self) -> list[Event]:
        with self._lock:
            return list(self.events)

    def counts(self) -> tuple[int, int, int]:
        """(certificates received, errors, unexpected errors) so far."""
        with self._lock:
            return len(self.certificates), self._errors, self._unexpected
