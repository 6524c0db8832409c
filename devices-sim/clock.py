"""Simulated time: a clock that runs ``scale`` times faster than the wall clock.

The server keeps real time (its clock decides notBefore, notAfter, OCSP and CRL
validity), so the simulator cannot move the server forward. What it does instead:

* the server issues short-lived certificates (the spawned configuration gives every
  connector a one-day validity);
* each device decides *when* to renew on this clock, from the certificate's own
  notBefore/notAfter (SCEP phones: a point in the last third of the lifetime, as MDMs
  do) or from the ACME Renewal Information window the server suggests (servers);
* this clock starts at the real time the run starts and runs ``scale`` times faster, so a
  renewal due 16 simulated hours after issuance is due 16 h / scale of real time later.

With ``scale = 28800`` one simulated day lasts three real seconds, and a fleet goes
through several renewals in a run of some tens of seconds, while every certificate is
still valid in real time when it is checked (OCSP, CRL and chain validation use real
time, as relying parties do).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta


class SimClock:
    """Simulated UTC time, ``scale`` times faster than real time from ``start()``."""

    def __init__(self, scale: float) -> None:
        if scale <= 0:
            raise ValueError("the time scale must be positive")
        self.scale = scale
        self._real_start = datetime.now(UTC)
        self._monotonic_start = time.monotonic()

    def start(self) -> None:
        """Simulated time equals real time now, and runs faster from here."""
        self._real_start = datetime.now(UTC)
        self._monotonic_start = time.monotonic()

    def now(self) -> datetime:
        elapsed = time.monotonic() - self._monotonic_start
        return self._real_start + timedelta(seconds=elapsed * self.scale)

    def monotonic_at(self, moment: datetime) -> float:
        """The ``time.monotonic()`` value at which simulated time reaches ``moment`` (in
        the past: the value for now, so that the caller does not wait)."""
        ahead = (moment - self.now()).total_seconds() / self.scale
        return time.monotonic() + max(0.0, ahead)

    def real_seconds(self, simulated: timedelta) -> float:
        """How long ``simulated`` lasts in real seconds."""
        return simulated.total_seconds() / self.scale
