"""Timing, recording and retrying one protocol operation, as a patient client does.

Real clients retry what the network or a restarting server broke: certbot and lego retry
on connection errors and 5xx answers, an MDM re-sends a SCEP message with the same
transactionID. The devices do the same through :func:`attempt`: every try is an
:class:`~pkigate.devsim.events.Event`; transient failures are retried with backoff until
the operation's deadline; anything else ends the operation with :class:`DeviceFailed`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

import requests

from pkigate.devsim.acme_client import AcmeClientError
from pkigate.devsim.events import (
    CONNECTION,
    FAULT_CONSEQUENCES,
    TIMEOUT,
    TRANSIENT,
    UNAVAILABLE,
    Event,
    EventLog,
)

T = TypeVar("T")

BACKOFF_FIRST_SECONDS = 0.2
BACKOFF_MAX_SECONDS = 1.5


class DeviceError(Exception):
    """A failed exchange or check, named for the report (``acme:unauthorized``,
    ``scep:badRequest``, ``verify:eku``). ``transient`` ones are tried again."""

    def __init__(self, error_type: str, detail: str, *, transient: bool = False) -> None:
        super().__init__(f"{error_type}: {detail}")
        self.error_type = error_type
        self.detail = detail
        self.transient = transient or error_type in TRANSIENT


class DeviceFailed(Exception):
    """An operation that failed for good (not transient, or out of time)."""

    def __init__(self, operation: str, error_type: str, detail: str) -> None:
        super().__init__(f"{operation} failed: {error_type}: {detail}")
        self.operation = operation
        self.error_type = error_type
        self.detail = detail


def check_http(response: requests.Response, what: str) -> requests.Response:
    """Raise a DeviceError for an HTTP error answer: 502-504 transient (a listener that is
    starting), other 5xx retried but unexpected, 4xx final."""
    status = response.status_code
    if status < 400:
        return response
    detail = f"{what}: HTTP {status} {response.text[:200]}"
    if status in (502, 503, 504):
        raise DeviceError(UNAVAILABLE, detail)
    raise DeviceError(f"http-{status}", detail, transient=status >= 500)


def classify(exc: BaseException) -> tuple[str, bool, str]:
    """(error type, transient, detail) of an exception raised during an attempt."""
    if isinstance(exc, DeviceError):
        return exc.error_type, exc.transient, exc.detail
    if isinstance(exc, AcmeClientError):
        detail = str(exc.problem.get("detail", ""))[:300]
        if exc.status in (502, 503, 504):
            return UNAVAILABLE, True, detail
        # serverInternal and other 5xx are retried, but are not expected.
        return f"acme:{exc.type or exc.status}", exc.status >= 500, detail
    if isinstance(exc, requests.Timeout):
        return TIMEOUT, True, str(exc)
    if isinstance(exc, requests.RequestException):
        # Connection refused or reset, a TLS handshake cut short, a body cut off: what a
        # SIGKILLed server looks like from the client.
        return CONNECTION, True, str(exc)
    return f"exception:{type(exc).__name__}", False, str(exc)


class Recorder:
    """Records one device's attempts into the run's EventLog."""

    def __init__(self, log: EventLog, device: str, fault_mode: bool) -> None:
        self.log = log
        self.device = device
        self.fault_mode = fault_mode

    def event(
        self,
        protocol: str,
        operation: str,
        started: float,
        error: tuple[str, str] | None = None,
        *,
        expected: bool | None = None,
    ) -> None:
        """Record one attempt; ``error`` is (type, detail) for a failure. A transient
        failure is expected in fault mode unless ``expected`` says otherwise."""
        error_type, detail = error if error is not None else (None, "")
        if expected is None:
            expected = self.fault_mode and error_type in FAULT_CONSEQUENCES
        self.log.record(
            Event(
                protocol,
                operation,
                error is None,
                error_type,
                time.monotonic() - started,
                self.log.elapsed(),
                self.device,
                expected,
                detail[:500],
            )
        )


def attempt(
    recorder: Recorder,
    protocol: str,
    operation: str,
    action: Callable[[], T],
    deadline: float,
) -> T:
    """Run ``action`` until it succeeds, retrying transient failures until ``deadline``
    (``time.monotonic()``); each try is one event. Raises DeviceFailed."""
    tries = 0
    while True:
        started = time.monotonic()
        try:
            value = action()
        except (DeviceError, AcmeClientError, requests.RequestException) as exc:
            error_type, transient, detail = classify(exc)
            recorder.event(protocol, operation, started, (error_type, detail))
            if not transient or time.monotonic() >= deadline:
                raise DeviceFailed(operation, error_type, detail) from exc
            tries += 1
            time.sleep(backoff(tries))
            continue
        recorder.event(protocol, operation, started)
        return value


def backoff(tries: int) -> float:
    """Exponential with full jitter, so that a fleet cut off together does not come back
    in one burst."""
    ceiling = min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2 ** (tries - 1))
    return float(ceiling / 2 + random.uniform(0, ceiling / 2))  # noqa: S311 - jitter, not secrets
