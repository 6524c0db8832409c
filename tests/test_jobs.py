"""The background job queue and its workers, on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from helpers import Clock

from pkigate.core import Core
from pkigate.core.jobs import (
    Job,
    JobQueue,
    JobRecord,
    JobRunner,
    JobStatus,
    LeaseLostError,
    RetryLater,
    RunCounts,
    retry_delay,
)
from pkigate.core.store.jobs import LEASE_EXPIRED_ON_LAST_ATTEMPT

JOBS_IN_BULK = 200
WAIT_S = 60


@pytest.fixture
def queue(core: Core, clock: Clock) -> JobQueue:
    return JobQueue(core.store, clock)


def _record(queue: JobQueue, job_id: int) -> JobRecord:
    record = queue.get(job_id)
    assert record is not None
    return record


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.02)


def _recorder() -> tuple[list[dict[str, Any]], Callable[[dict[str, Any]], None]]:
    seen: list[dict[str, Any]] = []
    return seen, seen.append


# -- Queueing and running ------------------------------------------------------------------


def test_enqueued_job_runs_its_handler_with_the_payload_and_is_done(queue: JobQueue) -> None:
    seen, handler = _recorder()
    job_id = queue.enqueue("crl.regenerate", {"ca_id": "ca-1", "partitions": [0, 1]})

    counts = JobRunner(queue, {"crl.regenerate": handler}).run_once()

    assert counts == RunCounts(completed=1)
    assert seen == [{"ca_id": "ca-1", "partitions": [0, 1]}]
    record = _record(queue, job_id)
    assert record.status is JobStatus.DONE
    assert record.attempts == 1
    assert record.finished_at is not None
    assert record.locked_by is None
    assert JobRunner(queue, {"crl.regenerate": handler}).run_once().processed == 0


def test_workers_only_claim_the_kinds_they_have_handlers_for(queue: JobQueue) -> None:
    crl_id = queue.enqueue("crl.regenerate", {"ca_id": "ca-1"})
    webhook_id = queue.enqueue("webhook.deliver", {"url": "https://mdm.example/hook"})

    claimed = queue.claim("worker-a", ["webhook.deliver"], limit=10)

    assert [job.id for job in claimed] == [webhook_id]
    assert _record(queue, crl_id).status is JobStatus.PENDING


def test_job_scheduled_in_the_future_waits_for_the_clock(queue: JobQueue, clock: Clock) -> None:
    seen, handler = _recorder()
    runner = JobRunner(queue, {"notify.expiry": handler})
    queue.enqueue("notify.expiry", {"serial": "1f"}, run_at=clock() + timedelta(hours=1))

    assert runner.run_once().processed == 0
    clock.advance(timedelta(minutes=59))
    assert runner.run_once().processed == 0
    assert seen == []

    clock.advance(timedelta(minutes=1, seconds=1))
    assert runner.run_once() == RunCounts(completed=1)
    assert seen == [{"serial": "1f"}]


# -- Transactions ----------------------------------------------------------------------------


def test_job_enqueued_in_a_rolled_back_transaction_never_runs(core: Core, queue: JobQueue) -> None:
    seen, handler = _recorder()

    with pytest.raises(RuntimeError, match="revocation failed"), core.store.write() as conn:
        queue.enqueue("crl.regenerate", {"ca_id": "ca-1"}, dedupe_key="crl:ca-1", conn=conn)
        raise RuntimeError("revocation failed")

    assert JobRunner(queue, {"crl.regenerate": handler}).run_once().processed == 0
    assert seen == []
    assert sum(queue.counts().values()) == 0
    # The dedupe key was never taken either.
    assert queue.enqueue("crl.regenerate", {"ca_id": "ca-1"}, dedupe_key="crl:ca-1") > 0


def test_job_enqueued_in_the_callers_transaction_is_invisible_until_it_commits(
    core: Core, queue: JobQueue
) -> None:
    seen, handler = _recorder()

    with core.store.write() as conn:
        queue.enqueue("crl.regenerate", {"ca_id": "ca-1"}, conn=conn)
        # Another connection (a worker's) cannot see it yet.
        assert queue.counts()[JobStatus.PENDING] == 0

    assert queue.counts()[JobStatus.PENDING] == 1
    assert JobRunner(queue, {"crl.regenerate": handler}).run_once() == RunCounts(completed=1)
    assert seen == [{"ca_id": "ca-1"}]


# -- Dedupe ----------------------------------------------------------------------------------


def test_enqueueing_a_pending_dedupe_key_returns_that_job_and_only_moves_it_earlier(
    queue: JobQueue, clock: Clock
) -> None:
    now = clock()
    first = queue.enqueue("crl.regenerate", {"n": 1}, now + timedelta(minutes=10), "crl:ca-1")

    earlier = queue.enqueue("crl.regenerate", {"n": 2}, now + timedelta(minutes=1), "crl:ca-1")
    later = queue.enqueue("crl.regenerate", {"n": 3}, now + timedelta(hours=1), "crl:ca-1")
    other = queue.enqueue("crl.regenerate", {"n": 4}, now + timedelta(hours=1), "crl:ca-2")

    assert earlier == first
    assert later == first
    assert other != first
    record = _record(queue, first)
    assert record.run_at == now + timedelta(minutes=1)
    assert record.payload == {"n": 1}
    assert queue.counts()[JobStatus.PENDING] == 2


def test_finished_job_releases_its_dedupe_key_for_new_work(queue: JobQueue, clock: Clock) -> None:
    seen, handler = _recorder()
    runner = JobRunner(queue, {"crl.regenerate": handler})
    first = queue.enqueue("crl.regenerate", {"n": 1}, dedupe_key="crl:ca-1")
    assert runner.run_once() == RunCounts(completed=1)
    assert _record(queue, first).dedupe_key is None

    second = queue.enqueue("crl.regenerate", {"n": 2}, dedupe_key="crl:ca-1")

    assert second != first
    assert _record(queue, second).dedupe_key == "crl:ca-1"
    assert runner.run_once() == RunCounts(completed=1)
    assert seen == [{"n": 1}, {"n": 2}]


def test_enqueue_while_the_keyed_job_runs_queues_one_follow_up(queue: JobQueue) -> None:
    # The running CRL job may already have read the revocations; a revocation committed
    # now must still reach a CRL, so it gets a follow-up job rather than the running one.
    running = queue.enqueue("crl.regenerate", {"n": 1}, dedupe_key="crl:ca-1")
    [job] = queue.claim("worker-a", ["crl.regenerate"])

    follow_up = queue.enqueue("crl.regenerate", {"n": 2}, dedupe_key="crl:ca-1")
    again = queue.enqueue("crl.regenerate", {"n": 3}, dedupe_key="crl:ca-1")

    assert job.id == running
    assert follow_up != running
    assert again == follow_up
    assert _record(queue, running).dedupe_key is None
    assert _record(queue, running).status is JobStatus.RUNNING
    assert _record(queue, follow_up).dedupe_key == "crl:ca-1"
    queue.complete(running, "worker-a")
    assert [j.id for j in queue.claim("worker-a", ["crl.regenerate"])] == [follow_up]


def test_concurrent_enqueues_of_one_dedupe_key_make_one_job(queue: JobQueue) -> None:
    ids: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def enqueue_many() -> None:
        try:
            start.wait()
            for _ in range(10):
                ids.append(queue.enqueue("crl.regenerate", {}, dedupe_key="crl:ca-1"))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=enqueue_many) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)

    assert errors == []
    assert len(ids) == 80
    assert len(set(ids)) == 1
    assert queue.counts()[JobStatus.PENDING] == 1


# -- Failures and retries --------------------------------------------------------------------


def test_failing_job_is_retried_with_backoff_then_failed_with_the_last_error(
    queue: JobQueue, clock: Clock
) -> None:
    calls: list[dict[str, Any]] = []

    def deliver(payload: dict[str, Any]) -> None:
        calls.append(payload)
        raise ConnectionError(f"{payload['url']} answered 503 (call {len(calls)})")

    runner = JobRunner(queue, {"webhook.deliver": deliver})
    job_id = queue.enqueue(
        "webhook.deliver", {"url": "https://mdm.example/hook"}, dedupe_key="hook:1", max_attempts=3
    )

    for attempt, delay in ((1, timedelta(seconds=2)), (2, timedelta(seconds=4))):
        before = clock()
        assert runner.run_once() == RunCounts(retried=1)
        after = clock()
        record = _record(queue, job_id)
        assert record.status is JobStatus.PENDING
        assert record.attempts == attempt
        assert before + delay <= record.run_at <= after + delay
        assert (
            record.last_error
            == f"ConnectionError: https://mdm.example/hook answered 503 (call {attempt})"
        )
        # Not due again before the backoff has passed.
        clock.advance(delay - timedelta(milliseconds=500))
        assert runner.run_once().processed == 0
        clock.advance(timedelta(milliseconds=500))

    assert runner.run_once() == RunCounts(failed=1)
    record = _record(queue, job_id)
    assert record.status is JobStatus.FAILED
    assert record.attempts == 3
    assert record.last_error == "ConnectionError: https://mdm.example/hook answered 503 (call 3)"
    assert record.finished_at is not None
    assert record.dedupe_key is None
    assert len(calls) == 3
    clock.advance(timedelta(hours=1))
    assert runner.run_once().processed == 0


def test_backoff_doubles_from_two_seconds_and_is_capped_at_five_minutes() -> None:
    delays = [retry_delay(attempts).total_seconds() for attempts in range(1, 12)]
    assert delays == [2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]
    assert retry_delay(10_000) == timedelta(minutes=5)


# -- Leases ----------------------------------------------------------------------------------


def test_expired_lease_is_reclaimed_and_the_old_worker_cannot_settle_the_job(
    queue: JobQueue, clock: Clock
) -> None:
    job_id = queue.enqueue("acme.validate", {"authz": "a1"})
    [first] = queue.claim("worker-a", ["acme.validate"], lease=timedelta(seconds=30))
    assert isinstance(first, Job)
    assert (first.id, first.locked_by, first.attempts) == (job_id, "worker-a", 1)

    # While the lease holds, nobody else gets the job.
    clock.advance(timedelta(seconds=29))
    assert queue.claim("worker-b", ["acme.validate"]) == []

    clock.advance(timedelta(seconds=2))
    [second] = queue.claim("worker-b", ["acme.validate"], lease=timedelta(seconds=30))
    assert (second.id, second.locked_by, second.attempts) == (job_id, "worker-b", 2)

    with pytest.raises(LeaseLostError):
        queue.complete(job_id, "worker-a")
    with pytest.raises(LeaseLostError):
        queue.fail(job_id, "worker-a", "timed out")
    record = _record(queue, job_id)
    assert (record.status, record.locked_by, record.last_error) == (
        JobStatus.RUNNING,
        "worker-b",
        None,
    )

    queue.complete(job_id, "worker-b")
    assert _record(queue, job_id).status is JobStatus.DONE
    with pytest.raises(LeaseLostError):
        queue.complete(job_id, "worker-b")


def test_handler_records_its_work_and_the_jobs_completion_in_one_transaction(
    core: Core, queue: JobQueue, clock: Clock
) -> None:
    attempts: list[int] = []

    def validate(payload: dict[str, Any]) -> None:
        attempts.append(len(attempts) + 1)
        with core.store.write() as conn:
            queue.enqueue("acme.issue", {"order": payload["order"]}, conn=conn)
            queue.complete_running(conn)
            if len(attempts) == 1:
                raise ConnectionError("the store went away before the commit")

    job_id = queue.enqueue("acme.validate", {"order": "o1"})
    runner = JobRunner(queue, {"acme.validate": validate})

    # The first attempt's transaction rolled back: neither its work nor the completion.
    assert runner.run_once() == RunCounts(retried=1)
    assert _record(queue, job_id).status is JobStatus.PENDING
    assert queue.claim("w", ["acme.issue"]) == []

    clock.advance(retry_delay(1))
    assert runner.run_once() == RunCounts(completed=1)
    record = _record(queue, job_id)
    assert (record.status, record.attempts, record.locked_by) == (JobStatus.DONE, 2, None)
    assert [job.payload for job in queue.claim("w", ["acme.issue"])] == [{"order": "o1"}]
    # Outside a runner's job there is nothing to complete.
    with core.store.write() as conn:
        queue.complete_running(conn)


def test_handler_whose_lease_was_taken_over_records_neither_work_nor_completion(
    core: Core, queue: JobQueue, clock: Clock
) -> None:
    def validate(payload: dict[str, Any]) -> None:
        clock.advance(timedelta(seconds=61))  # the lease ran out while it waited
        assert [job.id for job in queue.claim("worker-b", ["acme.validate"])] == [job_id]
        with core.store.write() as conn:
            queue.enqueue("acme.issue", {"order": payload["order"]}, conn=conn)
            queue.complete_running(conn)

    job_id = queue.enqueue("acme.validate", {"order": "o1"})

    assert JobRunner(queue, {"acme.validate": validate}).run_once() == RunCounts(lease_lost=1)
    record = _record(queue, job_id)
    assert (record.status, record.locked_by) == (JobStatus.RUNNING, "worker-b")
    assert queue.claim("w", ["acme.issue"]) == []


def test_a_notice_of_one_kind_wakes_only_the_listeners_for_it(queue: JobQueue) -> None:
    heard: list[str] = []
    queue.subscribe(lambda: heard.append("acme"), ["acme.validate"])
    queue.subscribe(lambda: heard.append("crl"), ["crl.regenerate", "maintenance"])
    queue.subscribe(lambda: heard.append("every"))

    queue.notify("acme.validate")
    assert heard == ["acme", "every"]
    heard.clear()
    queue.notify()
    assert heard == ["acme", "crl", "every"]


def test_job_whose_lease_expires_on_its_last_attempt_is_failed(
    queue: JobQueue, clock: Clock
) -> None:
    job_id = queue.enqueue("acme.validate", {"authz": "a1"}, max_attempts=1)
    assert len(queue.claim("worker-a", ["acme.validate"], lease=timedelta(seconds=30))) == 1

    clock.advance(timedelta(seconds=31))

    assert queue.claim("worker-b", ["acme.validate"]) == []
    record = _record(queue, job_id)
    assert record.status is JobStatus.FAILED
    assert record.last_error == LEASE_EXPIRED_ON_LAST_ATTEMPT


# -- Runner threads and processes ------------------------------------------------------------


def test_two_runner_threads_run_each_of_many_jobs_exactly_once(core: Core, queue: JobQueue) -> None:
    ran: list[int] = []
    threads_used: set[str] = set()

    def count(payload: dict[str, Any]) -> None:
        ran.append(payload["n"])
        threads_used.add(threading.current_thread().name)
        time.sleep(0.001)  # let the other thread in

    with JobRunner(queue, {"count": count}, threads=2, poll_interval=0.01):
        with core.store.write() as conn:
            for n in range(JOBS_IN_BULK):
                queue.enqueue("count", {"n": n}, conn=conn)
        _wait_until(lambda: queue.counts()[JobStatus.DONE] == JOBS_IN_BULK, "every job is done")

    assert len(ran) == JOBS_IN_BULK, "a job ran twice"
    assert sorted(ran) == list(range(JOBS_IN_BULK))
    assert len(threads_used) == 2, "the threads did not share the work"


def test_one_poller_runs_up_to_its_concurrency_of_jobs_side_by_side(
    core: Core, queue: JobQueue
) -> None:
    # Four jobs that each wait for the other three: they finish only if all run at once.
    together = threading.Barrier(4, timeout=20)
    running = 0
    most = 0
    lock = threading.Lock()
    ran: list[int] = []

    def meet(payload: dict[str, Any]) -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        if payload["n"] < 4:
            together.wait()
        time.sleep(0.005)
        with lock:
            running -= 1
            ran.append(payload["n"])

    runner = JobRunner(queue, {"meet": meet}, threads=1, poll_interval=0.05, concurrency=4)
    with runner:
        with core.store.write() as conn:
            for n in range(12):
                queue.enqueue("meet", {"n": n}, conn=conn)
        _wait_until(lambda: queue.counts()[JobStatus.DONE] == 12, "every job is done")
    assert sorted(ran) == list(range(12)), "a job ran twice or not at all"
    assert most == 4, f"at most {most} ran at once; the concurrency is 4"
    assert queue.counts()[JobStatus.FAILED] == 0  # the barrier never broke


class _MeetingQueue(JobQueue):
    """A queue whose first claims wait (up to ``patience`` s) until ``parties`` pollers are
    inside claim() together: what two pollers of one runner do when both counted the free
    slots before either started a job."""

    def __init__(self, queue: JobQueue, parties: int, patience: float) -> None:
        super().__init__(queue.store, queue.clock)
        self._meeting = threading.Barrier(parties, timeout=patience)

    def claim(self, *args: Any, **kwargs: Any) -> list[Job]:
        if not self._meeting.broken:
            # Broken: nobody else came, the pollers claim one at a time.
            with contextlib.suppress(threading.BrokenBarrierError):
                self._meeting.wait()
        return super().claim(*args, **kwargs)


def test_pollers_of_one_runner_share_its_concurrency(core: Core, queue: JobQueue) -> None:
    release = threading.Event()
    running = 0
    most = 0
    lock = threading.Lock()

    def hold(payload: dict[str, Any]) -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        release.wait(WAIT_S)
        with lock:
            running -= 1

    with core.store.write() as conn:
        for n in range(4):
            queue.enqueue("hold", {"n": n}, conn=conn)
    meeting = _MeetingQueue(queue, parties=2, patience=0.5)
    runner = JobRunner(meeting, {"hold": hold}, threads=2, poll_interval=0.01, concurrency=2)
    with runner:
        # Two pollers that both claimed run all four; one poller that claimed alone (the
        # other waiting its turn, then finding no free slot), two.
        _wait_until(lambda: running == 4 or (meeting._meeting.broken and running == 2), "jobs run")
        release.set()
        _wait_until(lambda: queue.counts()[JobStatus.DONE] == 4, "every job is done")
    assert most == 2, f"{most} jobs ran at once; the runner's concurrency is 2"


def test_a_job_thread_that_cannot_start_gives_its_slot_back(
    core: Core, queue: JobQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    start = threading.Thread.start
    refused: list[str] = []

    def start_or_refuse(thread: threading.Thread) -> None:
        if "-job-" in thread.name and not refused:
            refused.append(thread.name)
            raise RuntimeError("can't start new thread")
        start(thread)

    monkeypatch.setattr(threading.Thread, "start", start_or_refuse)
    together = threading.Barrier(2, timeout=5)
    handlers = {"first": lambda payload: None, "meet": lambda payload: together.wait()}
    first = queue.enqueue("first", {})
    with JobRunner(queue, handlers, poll_interval=0.01, concurrency=2):
        _wait_until(lambda: bool(refused), "the first job's thread was refused")
        # Both slots are free again: two jobs that wait for each other both finish.
        with core.store.write() as conn:
            for n in range(2):
                queue.enqueue("meet", {"n": n}, conn=conn)
        _wait_until(lambda: queue.counts()[JobStatus.DONE] == 2, "both jobs ran", timeout=10)
    assert _record(queue, first).status is JobStatus.RUNNING  # leased until its lease ends


def test_stop_waits_for_a_job_claimed_while_it_was_stopping(core: Core, queue: JobQueue) -> None:
    """A poller in the middle of a claim when stop() is called starts the job it claimed:
    stop() returns only once that job is settled, not with it still running."""

    class ClaimsAsItStops(JobQueue):
        def claim(self, *args: Any, **kwargs: Any) -> list[Job]:
            runner._stopping.wait(WAIT_S)
            unsubscribed.wait(WAIT_S)
            return super().claim(*args, **kwargs)

        def unsubscribe(self, listener: Callable[[], None]) -> None:
            super().unsubscribe(listener)
            unsubscribed.set()

    unsubscribed = threading.Event()
    job_id = queue.enqueue("slow", {})
    runner = JobRunner(
        ClaimsAsItStops(queue.store, queue.clock),
        {"slow": lambda payload: time.sleep(0.2)},
        poll_interval=0.01,
        concurrency=2,
    )
    runner.start()
    runner.stop()
    assert _record(queue, job_id).status is JobStatus.DONE


# Opens the store, runs two worker threads, says it is ready, and stops when stdin closes.
# Each handler call appends one line (a single O_APPEND write) to this process's file.
WORKER_PROCESS = textwrap.dedent("""
    import os, sys, time
    from datetime import UTC, datetime
    from pathlib import Path
    from pkigate.core.jobs import JobQueue, JobRunner
    from pkigate.core.store import Store

    url, ran_file, ready_file = sys.argv[1:4]
    store = Store.open(url)
    fd = os.open(ran_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def count(payload):
        os.write(fd, f"{payload['n']}\\n".encode())
        time.sleep(0.002)

    runner = JobRunner(JobQueue(store, lambda: datetime.now(UTC)), {"count": count},
                       threads=2, poll_interval=0.02)
    runner.start()
    Path(ready_file).touch()
    sys.stdin.read()
    runner.stop()
    os.close(fd)
    store.close()
""")


def test_two_processes_run_each_of_many_jobs_exactly_once(
    core: Core, queue: JobQueue, tmp_path: Path
) -> None:
    url = core.store.engine.url.render_as_string(hide_password=False)
    workers: list[subprocess.Popen[str]] = []
    ran_files = [tmp_path / f"worker{index}.ran" for index in range(2)]
    ready_files = [tmp_path / f"worker{index}.ready" for index in range(2)]
    try:
        for ran_file, ready_file in zip(ran_files, ready_files, strict=True):
            workers.append(
                subprocess.Popen(
                    [sys.executable, "-c", WORKER_PROCESS, url, str(ran_file), str(ready_file)],
                    stdin=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )

        def ready() -> bool:
            for worker in workers:
                if worker.poll() is not None:
                    pytest.fail(f"a worker exited early: {worker.communicate()[1]}")
            return all(f.exists() for f in ready_files)

        _wait_until(ready, "both worker processes are running")
        with core.store.write() as conn:
            for n in range(JOBS_IN_BULK):
                queue.enqueue("count", {"n": n}, conn=conn)
        _wait_until(
            lambda: ready() and queue.counts()[JobStatus.DONE] == JOBS_IN_BULK,
            "every job is done",
        )
        for worker in workers:
            _, stderr = worker.communicate("", timeout=WAIT_S)
            assert worker.returncode == 0, stderr
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait()

    per_worker = [[int(line) for line in f.read_text().split()] for f in ran_files]
    ran = [n for numbers in per_worker for n in numbers]
    assert len(ran) == JOBS_IN_BULK, "a job ran twice"
    assert sorted(ran) == list(range(JOBS_IN_BULK))
    assert all(per_worker), "one process did all the work, so nothing overlapped"


def test_handler_exception_is_logged_with_the_job_id_and_the_thread_carries_on(
    sqlite_core: Core, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    queue = JobQueue(sqlite_core.store, clock)
    seen, handler = _recorder()

    def explode(payload: dict[str, Any]) -> None:
        raise ValueError("malformed webhook answer")

    caplog.set_level(logging.ERROR, logger="pkigate.core.jobs")
    with JobRunner(queue, {"explode": explode, "ok": handler}, poll_interval=0.01) as runner:
        bad = queue.enqueue("explode", {}, max_attempts=1)
        queue.enqueue("ok", {"after": "explode"})
        _wait_until(lambda: len(seen) == 1, "the job after the failing one ran")
        assert runner.running

    record = _record(queue, bad)
    assert record.status is JobStatus.FAILED
    assert record.last_error == "ValueError: malformed webhook answer"
    assert f"job {bad} (explode) failed on attempt 1 of 1" in caplog.text
    assert "malformed webhook answer" in caplog.text


def test_a_retry_the_handler_has_logged_is_retried_without_a_line_of_the_runners(
    sqlite_core: Core, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A webhook receiver that is down: the handler logs the failure once, in its terms;
    the runner records it and retries with backoff, adding no error line or traceback."""
    queue = JobQueue(sqlite_core.store, clock)
    attempts: list[int] = []

    def receiver_down(payload: dict[str, Any]) -> None:
        attempts.append(1)
        raise RetryLater("receiver answered HTTP 503")

    caplog.set_level(logging.DEBUG, logger="pkigate.core.jobs")
    with JobRunner(queue, {"deliver": receiver_down}, poll_interval=0.01):
        job = queue.enqueue("deliver", {}, max_attempts=2)
        _wait_until(lambda: _record(queue, job).last_error is not None, "the attempt failed")

    record = _record(queue, job)
    assert record.status is JobStatus.PENDING  # to be retried after its backoff
    assert record.last_error == "RetryLater: receiver answered HTTP 503"
    assert attempts == [1]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "Traceback" not in caplog.text


def test_stop_returns_promptly_even_with_a_long_poll_interval(
    sqlite_core: Core, clock: Clock
) -> None:
    runner = JobRunner(
        JobQueue(sqlite_core.store, clock), {"count": lambda _: None}, threads=3, poll_interval=60
    )
    runner.start()
    time.sleep(0.2)  # every thread is now waiting out its poll interval
    assert runner.running

    started = time.monotonic()
    runner.stop()

    assert time.monotonic() - started < 2
    assert not runner.running


def test_idle_poll_does_not_wait_for_the_sqlite_write_lock(sqlite_core: Core, clock: Clock) -> None:
    # Worker threads in every process poll all the time; if an empty poll took the write
    # lock, each poll would queue behind (and hold up) certificate issuance on SQLite.
    queue = JobQueue(sqlite_core.store, clock)
    queue.enqueue("count", {}, run_at=clock() + timedelta(hours=1))
    claimed: list[list[Job]] = []
    poller = threading.Thread(target=lambda: claimed.append(queue.claim("worker-a", ["count"])))

    with sqlite_core.store.write():
        started = time.monotonic()
        poller.start()
        poller.join(2)
        assert not poller.is_alive(), "an idle poll waited for the write lock"
        assert time.monotonic() - started < 2
    assert claimed == [[]]


# -- Housekeeping ----------------------------------------------------------------------------


def test_purge_removes_only_jobs_finished_long_enough_ago(queue: JobQueue, clock: Clock) -> None:
    def explode(payload: dict[str, Any]) -> None:
        raise RuntimeError("no")

    runner = JobRunner(queue, {"ok": lambda _: None, "explode": explode})
    done = queue.enqueue("ok", {})
    failed = queue.enqueue("explode", {}, max_attempts=1)
    assert runner.run_once() == RunCounts(completed=1, failed=1)
    clock.advance(timedelta(days=8))
    recent = queue.enqueue("ok", {})
    assert runner.run_once() == RunCounts(completed=1)
    pending = queue.enqueue("ok", {}, run_at=clock() + timedelta(days=1))

    assert queue.purge_finished(older_than=timedelta(days=7)) == 2

    assert queue.get(done) is None
    assert queue.get(failed) is None
    assert _record(queue, recent).status is JobStatus.DONE
    assert _record(queue, pending).status is JobStatus.PENDING
