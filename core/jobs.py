"""Background jobs: work that must not run inside a request, kept as rows in the store.

CRL regeneration, ACME challenge validation, webhook retries and the like are queued with
:meth:`JobQueue.enqueue` (inside the caller's transaction when given one, so a revocation
and the CRL job it calls for commit or roll back together) and run by a
:class:`JobRunner`'s worker threads in any gateway process. Nothing lives in one process's
memory: a job is leased to one worker at a time, and a job whose worker died is picked up
again once its lease runs out. Handlers therefore run *at least* once and must be
idempotent; with workers that stay alive and handlers that finish within their lease,
each job runs exactly once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import Enum
from types import TracebackType
from typing import Any

from sqlalchemy import Connection

from pkigate.core.errors import InvalidStateError, StoreUnavailableError
from pkigate.core.store import Store
from pkigate.core.store import jobs as jobs_sql
from pkigate.core.store.jobs import JobRecord, JobStatus

__all__ = [
    "DEFAULT_LEASE",
    "DEFAULT_MAX_ATTEMPTS",
    "Job",
    "JobHandler",
    "JobQueue",
    "JobRecord",
    "JobRunner",
    "JobStatus",
    "LeaseLostError",
    "RetryLater",
    "RunCounts",
    "retry_delay",
]

logger = logging.getLogger(__name__)

DEFAULT_LEASE = timedelta(seconds=60)
DEFAULT_MAX_ATTEMPTS = 5
MAX_RETRY_DELAY = timedelta(minutes=5)
# The columns' sizes (schema.jobs); checked here so SQLite, which ignores them, fails alike.
MAX_KIND_CHARS = 64
MAX_DEDUPE_KEY_CHARS = 200
MAX_WORKER_ID_CHARS = 128
# Enough to see what went wrong; the full traceback goes to the log.
MAX_ERROR_CHARS = 4000
# Two enqueues racing for one dedupe key on PostgreSQL: the loser re-reads the winner's row.
_DEDUPE_RACE_ROUNDS = 3

JobHandler = Callable[[dict[str, Any]], None]
"""Does one job's work given its payload; raising makes the attempt fail (and retry)."""


def retry_delay(attempts: int) -> timedelta:
    """How long a job waits after its ``attempts``-th failed attempt: 2, 4, 8 s ... 5 min."""
    return min(timedelta(seconds=2 ** min(attempts, 16)), MAX_RETRY_DELAY)


class RetryLater(Exception):
    """An attempt that failed in a way its handler expects and has logged already (a
    webhook receiver that is down): the job is retried with backoff like any failure, but
    the runner adds no error line and no traceback of its own, as the failure is logged
    once, by the handler that knows what it means."""


class LeaseLostError(InvalidStateError):
    """The worker no longer holds the job's lease: another worker took it over (or it ended).

    The new holder's outcome is the one that counts, so this worker's is not recorded.
    """

    code = "leaseLost"


@dataclass(frozen=True)
class Job:
    """A job leased to one worker by :meth:`JobQueue.claim`."""

    id: int
    kind: str
    #: What the handler is given; the JSON object passed to :meth:`JobQueue.enqueue`.
    payload: Mapping[str, Any]
    #: This attempt's number, starting at 1.
    attempts: int
    max_attempts: int
    #: When the job became due.
    run_at: datetime
    #: The worker holding the lease, and when the lease runs out: past that moment another
    #: worker may claim the job and this worker's complete() or fail() is refused.
    locked_by: str
    locked_until: datetime

    @classmethod
    def from_record(cls, record: JobRecord) -> Job:
        assert record.locked_by is not None and record.locked_until is not None
        return cls(
            id=record.id,
            kind=record.kind,
            payload=record.payload,
            attempts=record.attempts,
            max_attempts=record.max_attempts,
            run_at=record.run_at,
            locked_by=record.locked_by,
            locked_until=record.locked_until,
        )


class JobQueue:
    """Queue, claim and settle jobs in the store. Stateless, so safe to share between threads."""

    def __init__(self, store: Store, clock: Callable[[], datetime]) -> None:
        self.store = store
        self.clock = clock
        self._listeners: list[tuple[Callable[[], None], frozenset[str] | None]] = []

    def subscribe(self, listener: Callable[[], None], kinds: Collection[str] | None = None) -> None:
        """Call ``listener`` on :meth:`notify` (a runner in this process waking up): for
        every notice, or only for notices of a job of ``kinds``."""
        self._listeners.append((listener, None if kinds is None else frozenset(kinds)))

    def unsubscribe(self, listener: Callable[[], None]) -> None:
        self._listeners = [entry for entry in self._listeners if entry[0] != listener]

    def notify(self, kind: str | None = None) -> None:
        """Tell this process's runners that a job (of ``kind``, or of any kind) is due now
        (after the transaction that queued it committed), so that they claim it without
        waiting out their poll interval. Runners in other processes find it at their next
        poll. A kind wakes only the runners that do it: waking the others costs each a
        read of the queue for nothing."""
        for listener, kinds in list(self._listeners):
            if kind is None or kinds is None or kind in kinds:
                listener()

    @contextmanager
    def _transaction(self, conn: Connection | None) -> Iterator[Connection]:
        if conn is not None:
            yield conn
            return
        with self.store.write() as own:
            yield own

    def enqueue(
        self,
        kind: str,
        payload: Mapping[str, Any],
        run_at: datetime | None = None,
        dedupe_key: str | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        conn: Connection | None = None,
    ) -> int:
        """Queue a job due at ``run_at`` (default now) and return its id.

        With ``conn`` (a connection from :meth:`Store.write`) the job is part of the
        caller's transaction and is never seen by a worker unless that commits.

        With a ``dedupe_key``, at most one job per key waits in the queue: while one is
        pending, enqueueing again returns its id and only ever brings its ``run_at``
        earlier (the payload of the later call is dropped). While the key's job is already
        *running*, its handler may have read the state before the caller's change, so a
        follow-up job is queued under the key instead (the running job gives the key up).
        """
        if not kind or len(kind) > MAX_KIND_CHARS:
            raise ValueError(f"a job kind is 1 to {MAX_KIND_CHARS} characters: {kind!r}")
        if dedupe_key is not None and not 0 < len(dedupe_key) <= MAX_DEDUPE_KEY_CHARS:
            raise ValueError(f"a dedupe key is 1 to {MAX_DEDUPE_KEY_CHARS} characters")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if run_at is not None and run_at.tzinfo is None:
            raise ValueError("run_at must be timezone-aware")
        now = self.clock()
        due = run_at or now
        with self._transaction(conn) as tx:
            return self._enqueue(tx, kind, payload, due, dedupe_key, max_attempts, now)

    def _enqueue(
        self,
        conn: Connection,
        kind: str,
        payload: Mapping[str, Any],
        due: datetime,
        dedupe_key: str | None,
        max_attempts: int,
        now: datetime,
    ) -> int:
        for _ in range(_DEDUPE_RACE_ROUNDS):
            if dedupe_key is not None:
                holder = jobs_sql.find_by_dedupe_key(conn, dedupe_key)
                if holder is not None and holder.status is JobStatus.PENDING:
                    if due < holder.run_at:
                        jobs_sql.move_run_at_earlier(conn, holder.id, due)
                    return holder.id
                if holder is not None:
                    jobs_sql.release_dedupe_key(conn, holder.id)
            job_id = jobs_sql.insert_job(
                conn,
                kind=kind,
                payload=payload,
                run_at=due,
                dedupe_key=dedupe_key,
                max_attempts=max_attempts,
                now=now,
            )
            if job_id is not None:
                return job_id
        raise RuntimeError(f"could not queue a job under dedupe key {dedupe_key!r}")

    def claim(
        self,
        worker_id: str,
        kinds: Collection[str],
        limit: int = 1,
        lease: timedelta = DEFAULT_LEASE,
        *,
        told_due: bool = False,
    ) -> list[Job]:
        """Lease up to ``limit`` due jobs of ``kinds`` to ``worker_id`` for ``lease``.

        Due: pending with ``run_at`` reached, or running under an expired lease (a crashed
        worker's job is retried). Each claim counts as an attempt. No job is ever leased to
        two workers at once. ``told_due``: this process just queued one (:meth:`notify`),
        so the read that keeps idle polls off the write lock would only cost a read.
        """
        if len(worker_id) > MAX_WORKER_ID_CHARS:
            raise ValueError(f"a worker id is at most {MAX_WORKER_ID_CHARS} characters")
        if not kinds or limit <= 0:
            return []
        now = self.clock()
        # Idle polls stay off the write lock: on SQLite a write transaction excludes every
        # other writer, issuance included, in every process sharing the file.
        if not told_due:
            with self.store.read() as conn:
                if not jobs_sql.has_due(conn, kinds, now):
                    return []
        with self.store.write() as conn:
            records = jobs_sql.claim_due(
                conn,
                worker_id=worker_id,
                kinds=kinds,
                limit=limit,
                now=now,
                locked_until=now + lease,
            )
        return [Job.from_record(record) for record in records]

    def complete(self, job_id: int, worker_id: str) -> None:
        """Record that the job's work is done; :class:`LeaseLostError` if no longer ours."""
        with self.store.write() as conn:
            self._mark_done(conn, job_id, worker_id)

    def fail(self, job_id: int, worker_id: str, error: str) -> JobStatus:
        """Record a failed attempt: retried after :func:`retry_delay`, or failed for good.

        Returns the status the job is left in (``pending`` again, or ``failed`` once
        ``max_attempts`` attempts have failed). :class:`LeaseLostError` if no longer ours.
        """
        error = error[:MAX_ERROR_CHARS]
        with self.store.write() as conn:
            job = self._held(conn, job_id, worker_id)
            now = self.clock()
            if job.attempts >= job.max_attempts:
                jobs_sql.mark_failed(conn, job_id, now, error)
                return JobStatus.FAILED
            jobs_sql.reschedule(conn, job_id, now + retry_delay(job.attempts), error)
            return JobStatus.PENDING

    def _held(self, conn: Connection, job_id: int, worker_id: str) -> JobRecord:
        job = jobs_sql.held_job(conn, job_id, worker_id)
        if job is None:
            raise LeaseLostError(f"job {job_id} is no longer leased to {worker_id}")
        return job

    def complete_running(self, conn: Connection) -> None:
        """Record the job this thread's handler is running as done, in the handler's own
        transaction ``conn``, which then holds both its work and its completion: one
        commit where two would do the same. :class:`LeaseLostError` (rolling the
        handler's work back) if another worker holds the job now. Outside a job (a
        handler called directly) nothing is recorded."""
        running = _RUNNING.get()
        if running is None:
            return
        self._mark_done(conn, running.job_id, running.worker_id)
        running.completed = True

    def _mark_done(self, conn: Connection, job_id: int, worker_id: str) -> None:
        if not jobs_sql.mark_done_if_held(conn, job_id, worker_id, self.clock()):
            raise LeaseLostError(f"job {job_id} is no longer leased to {worker_id}")

    def get(self, job_id: int) -> JobRecord | None:
        with self.store.read() as conn:
            return jobs_sql.get_job(conn, job_id)

    def counts(self) -> dict[JobStatus, int]:
        """How many jobs are in each status (every status present, zero included)."""
        with self.store.read() as conn:
            return jobs_sql.count_by_status(conn)

    def purge_finished(self, older_than: timedelta) -> int:
        """Delete jobs that finished (done or failed) more than ``older_than`` ago."""
        with self.store.write() as conn:
            return jobs_sql.purge_finished(conn, self.clock() - older_than)


@dataclass
class _Running:
    """The job a thread's handler is running, and whether the handler recorded it done."""

    job_id: int
    worker_id: str
    completed: bool = False


# Per thread (per greenlet under gevent): each job runs in a thread of its own, or in turn.
_RUNNING: ContextVar[_Running | None] = ContextVar("pkigate_running_job", default=None)


class _Outcome(Enum):
    COMPLETED = "completed"
    RETRIED = "retried"
    FAILED = "failed"
    LEASE_LOST = "lease_lost"


@dataclass(frozen=True)
class RunCounts:
    """What :meth:`JobRunner.run_once` did."""

    #: Handlers that returned normally, recorded as done.
    completed: int = 0
    #: Handlers that raised, with attempts left: queued again after a delay.
    retried: int = 0
    #: Handlers that raised on their last attempt: the job is failed for good.
    failed: int = 0
    #: Jobs whose lease another worker had taken over before the outcome was recorded.
    lease_lost: int = 0

    @property
    def processed(self) -> int:
        return self.completed + self.retried + self.failed + self.lease_lost


def _default_worker_prefix() -> str:
    return f"{socket.gethostname()[:64]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class JobRunner:
    """Worker threads in this process that run the jobs ``handlers`` know how to do.

    Each thread claims one due job at a time (so no lease ticks away while a job waits
    behind another), runs its handler and records the outcome. A handler's exception
    fails that attempt and is logged with the job id; it never ends the thread. Handlers
    must finish within ``lease``, or another worker will start the same job again.

    With ``concurrency`` above 1, the threads claim only as many jobs as there are free
    slots and run each in a thread of its own (a greenlet in a gevent worker), so jobs that
    wait on the network (an ACME validation, a webhook delivery) run side by side at the
    cost of one poller, and none waits behind another after its claim.
    """

    def __init__(
        self,
        queue: JobQueue,
        handlers: Mapping[str, JobHandler],
        threads: int = 1,
        poll_interval: float = 0.5,
        lease: timedelta = DEFAULT_LEASE,
        concurrency: int = 1,
        name: str = "jobs",
    ) -> None:
        if threads < 1:
            raise ValueError("a runner needs at least one thread")
        if concurrency < 1:
            raise ValueError("a runner runs at least one job at a time")
        if not handlers:
            raise ValueError("a runner needs at least one handler")
        self.queue = queue
        self.handlers = dict(handlers)
        self.kinds = frozenset(handlers)
        self.thread_count = threads
        self.poll_interval = poll_interval
        self.lease = lease
        self.concurrency = concurrency
        self._running_jobs: set[threading.Thread] = set()
        self._running_lock = threading.Lock()
        self._claiming = threading.Lock()  # one poller counts and fills the free slots
        #: Its threads are ``pkigate-<name>-<index>`` (what `py-spy dump` shows).
        self.name = name
        self.worker_prefix = _default_worker_prefix()
        self._stopping = threading.Event()
        self._wakeup = threading.Event()
        self._told_due = threading.Event()  # notify() woke the poller: a job is due
        # The last claim filled every free slot, so more jobs may be due: a job that ends
        # wakes the poller to claim again (otherwise polls and notices find new ones).
        self._short_of_slots = False
        self._threads: list[threading.Thread] = []
        self._store_unavailable = threading.Event()  # said once in the log per outage

    def __enter__(self) -> JobRunner:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return any(thread.is_alive() for thread in self._threads)

    def start(self) -> None:
        """Start the worker threads (daemons, so they never keep the process alive)."""
        if self.running:
            raise RuntimeError("the job runner is already running")
        self._stopping = threading.Event()
        self.queue.subscribe(self._told, self.kinds)
        self._threads = [
            threading.Thread(
                target=self._work,
                args=(f"{self.worker_prefix}/{index}", self._stopping),
                name=f"pkigate-{self.name}-{index}",
                daemon=True,
            )
            for index in range(self.thread_count)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop claiming and wait (up to ``timeout`` s) for jobs in progress to finish."""
        self._stopping.set()
        self._wakeup.set()
        self.queue.unsubscribe(self._told)
        deadline = time.monotonic() + timeout

        def join(threads: list[threading.Thread]) -> None:
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
                if thread.is_alive():
                    logger.warning("job worker %s is still running a job after stop()", thread.name)

        # The pollers first: one in the middle of a claim starts what it claimed, in a
        # thread that a list taken before it ended would miss.
        join(self._threads)
        with self._running_lock:
            running = list(self._running_jobs)
        join(running)
        self._threads = [thread for thread in self._threads if thread.is_alive()]

    def _told(self) -> None:
        self._told_due.set()
        self._wakeup.set()

    def run_once(self, limit: int | None = None) -> RunCounts:
        """Run every job that is due now (at most ``limit``) in this thread; what happened.

        Jobs that become due meanwhile, such as ones the handlers queue, are run too.
        Errors from the store propagate, handlers' errors do not.
        """
        worker_id = f"{self.worker_prefix}/once"
        tally = dict.fromkeys(_Outcome, 0)
        while limit is None or sum(tally.values()) < limit:
            claimed = self.queue.claim(worker_id, self.kinds, 1, self.lease)
            if not claimed:
                break
            tally[self._process(claimed[0], worker_id)] += 1
        return RunCounts(
            completed=tally[_Outcome.COMPLETED],
            retried=tally[_Outcome.RETRIED],
            failed=tally[_Outcome.FAILED],
            lease_lost=tally[_Outcome.LEASE_LOST],
        )

    def _work(self, worker_id: str, stopping: threading.Event) -> None:
        while not stopping.is_set():
            told_due = self._told_due.is_set()
            self._told_due.clear()
            try:
                if self.concurrency == 1:
                    claimed = self.queue.claim(
                        worker_id, self.kinds, 1, self.lease, told_due=told_due
                    )
                else:
                    claimed = self._claim_and_start(worker_id, told_due)
                if self._store_unavailable.is_set():
                    self._store_unavailable.clear()
                    logger.warning("job worker %s: the store takes writes again", worker_id)
                if claimed:
                    # A claimed job is run even if stop() was called meanwhile: abandoning
                    # it would leave it waiting for its lease to expire.
                    if self.concurrency == 1:
                        self._process(claimed[0], worker_id)
                        continue
                    if self._short_of_slots:
                        continue  # more may be due: claim again while slots are free
            except StoreUnavailableError as exc:
                # A full disk: nothing was claimed; try again after the poll interval.
                if not self._store_unavailable.is_set():
                    self._store_unavailable.set()
                    logger.warning("job worker %s: %s", worker_id, exc.message)
            except Exception:
                # The store is unreachable, say; the job (if any) is retried after its
                # lease, and this thread tries again after the poll interval.
                logger.exception("job worker %s: could not claim or settle a job", worker_id)
            if self._wakeup.wait(self.poll_interval):
                self._wakeup.clear()

    def _claim_and_start(self, worker_id: str, told_due: bool) -> list[Job]:
        """Claim as many jobs as there are free slots and start each in a thread of its
        own. One poller at a time: two that counted the same free slots would each fill
        them (``threads`` times ``concurrency`` jobs at once)."""
        with self._claiming:
            with self._running_lock:
                free = self.concurrency - len(self._running_jobs)
            claimed = (
                self.queue.claim(worker_id, self.kinds, free, self.lease, told_due=told_due)
                if free
                else []
            )
            self._short_of_slots = len(claimed) >= free
            for job in claimed:
                self._start_job(job, worker_id)
        return claimed

    def _start_job(self, job: Job, worker_id: str) -> None:
        thread = threading.Thread(
            target=self._run_job,
            args=(job, worker_id),
            name=f"pkigate-{self.name}-job-{job.id}",
            daemon=True,
        )
        with self._running_lock:
            self._running_jobs.add(thread)
        try:
            thread.start()
        except RuntimeError:
            # No thread to be had (the process is at its limit): the slot is given back,
            # or it would stay taken for good; the job runs again once its lease runs out.
            with self._running_lock:
                self._running_jobs.discard(thread)
            logger.exception("job worker %s: no thread to run job %d in", worker_id, job.id)

    def _run_job(self, job: Job, worker_id: str) -> None:
        try:
            self._process(job, worker_id)
        except Exception:
            # The store failed to record the outcome: the job is retried after its lease.
            logger.exception("job worker %s: could not settle job %d", worker_id, job.id)
        finally:
            with self._running_lock:
                self._running_jobs.discard(threading.current_thread())
            if self._short_of_slots:
                self._wakeup.set()  # a slot is free for a job that may be waiting

    def _process(self, job: Job, worker_id: str) -> _Outcome:
        handler = self.handlers[job.kind]
        running = _Running(job.id, worker_id)
        token = _RUNNING.set(running)
        try:
            handler(dict(job.payload))
        except LeaseLostError:
            # Raised by complete_running inside the handler's transaction, which rolled
            # back: the new holder's outcome is the one that counts.
            logger.warning(
                "job %d (%s): lease lost before its outcome was recorded", job.id, job.kind
            )
            return _Outcome.LEASE_LOST
        except Exception as exc:
            if not isinstance(exc, RetryLater):
                logger.exception(
                    "job %d (%s) failed on attempt %d of %d",
                    job.id,
                    job.kind,
                    job.attempts,
                    job.max_attempts,
                )
            try:
                status = self.queue.fail(job.id, worker_id, f"{type(exc).__name__}: {exc}")
            except LeaseLostError:
                logger.warning(
                    "job %d (%s): lease lost before its failure was recorded", job.id, job.kind
                )
                return _Outcome.LEASE_LOST
            return _Outcome.FAILED if status is JobStatus.FAILED else _Outcome.RETRIED
        finally:
            _RUNNING.reset(token)
        if running.completed:
            return _Outcome.COMPLETED
        try:
            self.queue.complete(job.id, worker_id)
        except LeaseLostError:
            logger.warning(
                "job %d (%s): lease lost before completion was recorded", job.id, job.kind
            )
            return _Outcome.LEASE_LOST
        return _Outcome.COMPLETED
