"""Running a fleet: devices scheduled over a pool of worker threads, with a progress bar.

Each device is a state machine whose steps are due at given moments (most of a device's
life is waiting for its renewal time). ``concurrency`` worker threads take the steps that
are due, earliest first, so at most ``concurrency`` protocol operations are in flight: the
knob that turns the fleet into a load generator. While the fleet runs, a watcher puts
revoked certificates' CRL checks to rest as CRLs are regenerated; after it, the remaining
ones get ``crl_deadline`` seconds.
"""

from __future__ import annotations

import heapq
import itertools
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pkigate.devsim.attempts import DeviceFailed
from pkigate.devsim.challenges import ChallengeDns, Http01Responder
from pkigate.devsim.clock import SimClock
from pkigate.devsim.config import FleetConfigError, FleetSettings, Target
from pkigate.devsim.devices import DEVICE_KINDS, Device, FleetContext
from pkigate.devsim.events import Event, EventLog, ReceivedCertificate

CRL_WATCH_INTERVAL = 2.0
WATCHER = "crl-watch"


class Disruption(Protocol):
    """Something that runs beside the fleet (fault mode kills the server)."""

    moments: list[float]
    """When it struck, in seconds since the run started (marked on the plot)."""

    def start(self, elapsed: Callable[[], float]) -> None: ...

    def stop(self) -> None:
        """Stop, leaving the server answering."""


@dataclass(frozen=True)
class DeviceOutcome:
    name: str
    kind: str
    certificates: int
    failure: str | None


@dataclass
class FleetRun:
    """What a run produced, for the report and the post-conditions."""

    settings: FleetSettings
    run_id: str
    started_at: datetime
    duration: float
    events: list[Event]
    certificates: dict[str, ReceivedCertificate]
    duplicate_serials: list[str]
    devices: list[DeviceOutcome]
    disruptions: list[float] = field(default_factory=list)
    crl_missing: int = 0


def check_kinds(settings: FleetSettings) -> None:
    """Refuse, before anything starts, a fleet with devices of a kind not simulated yet."""
    for kind, count in settings.counts().items():
        if count and kind not in DEVICE_KINDS:
            raise FleetConfigError(f"{kind}s are not simulated yet; run with {kind}s = 0")


def build_devices(ctx: FleetContext) -> list[Device]:
    """The fleet's devices, each with its own random stream derived from the seed, so
    that a seed gives the same fleet (names, challenge types, who revokes) every time."""
    check_kinds(ctx.settings)
    seeds = random.Random(ctx.settings.seed)  # noqa: S311 - a reproducible fleet, no secrets
    devices: list[Device] = []
    for kind, count in ctx.settings.counts().items():
        factory = DEVICE_KINDS.get(kind)
        if factory is None:
            continue
        for index in range(count):
            stream = random.Random(seeds.getrandbits(64))  # noqa: S311 - as above
            devices.append(factory(ctx, index, stream))
    # Kinds interleaved, so that every protocol is under load from the start.
    seeds.shuffle(devices)
    return devices


def run_fleet(
    settings: FleetSettings,
    target: Target,
    *,
    http01: Http01Responder | None,
    dns: ChallengeDns | None,
    disruption: Disruption | None = None,
    progress: bool = True,
    console: Console | None = None,
) -> FleetRun:
    run_id = uuid.uuid4().hex[:6]
    log = EventLog()
    clock = SimClock(settings.time_scale)
    ctx = FleetContext(
        settings,
        target,
        clock,
        log,
        http01,
        dns,
        fault_mode=disruption is not None,
        run_id=run_id,
    )
    devices = build_devices(ctx)
    started_at = datetime.now(UTC)
    clock.start()
    log.start()
    watcher = ctx.recorder(WATCHER)
    stop_watch = threading.Event()

    def watch_crls() -> None:
        while not stop_watch.wait(CRL_WATCH_INTERVAL):
            if ctx.checker.watched():
                ctx.checker.poll_crls(watcher, time.monotonic() + CRL_WATCH_INTERVAL * 5)

    watch = threading.Thread(target=watch_crls, name="crl-watch", daemon=True)
    watch.start()
    if disruption is not None:
        disruption.start(log.elapsed)
    try:
        with _progress(progress, len(devices), log, console) as advance:
            Scheduler(devices, settings.concurrency, settings.ramp_seconds, advance).run()
    finally:
        if disruption is not None:
            disruption.stop()
        stop_watch.set()
        watch.join()
    console = console or Console(file=sys.stderr)
    if progress and console.is_terminal and ctx.checker.watched():
        console.print(
            f"waiting for {ctx.checker.watched()} revocations to reach the CRLs", style="dim"
        )
    missing = ctx.checker.settle(watcher, settings.crl_deadline)
    return FleetRun(
        settings=settings,
        run_id=run_id,
        started_at=started_at,
        duration=log.elapsed(),
        events=log.snapshot(),
        certificates=dict(log.certificates),
        duplicate_serials=list(log.duplicate_serials),
        devices=[
            DeviceOutcome(
                d.name,
                d.kind,
                d.certificates,
                None if d.failure is None else str(d.failure),
            )
            for d in devices
        ],
        disruptions=list(disruption.moments) if disruption is not None else [],
        crl_missing=missing,
    )


class Scheduler:
    """Runs due device steps on ``concurrency`` threads until every device is done."""

    def __init__(
        self,
        devices: list[Device],
        concurrency: int,
        ramp_seconds: float,
        finished: Callable[[Device], None],
    ) -> None:
        now = time.monotonic()
        spacing = ramp_seconds / len(devices) if devices else 0.0
        self._order = itertools.count()
        self._queue: list[tuple[float, int, Device]] = [
            (now + i * spacing, next(self._order), d) for i, d in enumerate(devices)
        ]
        heapq.heapify(self._queue)
        self._concurrency = concurrency
        self._running = 0
        self._stopped = False
        self._finished = finished
        self._condition = threading.Condition()

    def run(self) -> None:
        workers = [
            threading.Thread(target=self._work, name=f"device-worker-{i}", daemon=True)
            for i in range(self._concurrency)
        ]
        for worker in workers:
            worker.start()
        try:
            for worker in workers:
                while worker.is_alive():
                    worker.join(0.5)  # a join with a timeout lets Ctrl-C through
        except BaseException:
            with self._condition:
                self._stopped = True  # no new step; those under way finish on their own
                self._condition.notify_all()
            raise

    def _take(self) -> Device | None:
        with self._condition:
            while True:
                if self._stopped:
                    return None
                if not self._queue:
                    if self._running == 0:
                        self._condition.notify_all()
                        return None
                    self._condition.wait()
                    continue
                due = self._queue[0][0]
                wait = due - time.monotonic()
                if wait <= 0:
                    self._running += 1
                    return heapq.heappop(self._queue)[2]
                self._condition.wait(wait)

    def _work(self) -> None:
        while (device := self._take()) is not None:
            due: float | None = None
            try:
                due = device.step()
            except DeviceFailed as exc:
                device.failure = exc  # its events are recorded already
            except Exception as exc:  # a bug in the simulator or a malformed answer
                device.failure = DeviceFailed("step", f"crash:{type(exc).__name__}", str(exc))
                device.recorder.event(
                    "device",
                    "step",
                    time.monotonic(),
                    (f"crash:{type(exc).__name__}", repr(exc)),
                    expected=False,
                )
            with self._condition:
                self._running -= 1
                if due is not None:
                    heapq.heappush(self._queue, (due, next(self._order), device))
                self._condition.notify_all()
            if due is None:
                self._finished(device)


@contextmanager
def _progress(
    enabled: bool, total: int, log: EventLog, console: Console | None
) -> Iterator[Callable[[Device], None]]:
    """A rich progress bar over the devices, updated from a monitor thread; nothing when
    disabled or when the output is not a terminal."""
    console = console or Console(file=sys.stderr)
    done = 0
    lock = threading.Lock()

    def finished(_device: Device) -> None:
        nonlocal done
        with lock:
            done += 1

    if not enabled or not console.is_terminal:
        yield finished
        return
    bar = Progress(
        TextColumn("[bold]devices"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    task = bar.add_task("", total=total)
    stop = threading.Event()

    def refresh() -> None:
        while True:
            certificates, errors, unexpected = log.counts()
            bar.update(
                task,
                completed=done,
                description=f"certificates {certificates}  errors {errors} "
                f"(unexpected {unexpected})",
            )
            if stop.wait(0.25):
                return

    with bar:
        monitor = threading.Thread(target=refresh, name="progress", daemon=True)
        monitor.start()
        try:
            yield finished
        finally:
            stop.set()
            monitor.join()
