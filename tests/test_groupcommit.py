"""Group commit (core/groupcommit.py) hands each batch to the blocking runner: in a gevent
worker that is a thread of the hub's pool, so that fsyncs never hold up the requests that
share the worker's thread. Each submitter still gets its own outcome, or the batch's error,
only once the batch's commit has returned."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence

import pytest

from pkigate.core import blocking
from pkigate.core.groupcommit import GroupCommit


@pytest.fixture
def committer_threads() -> Iterator[list[str]]:
    """A runner that makes each call in a thread of its own, as gevent's pool does; the
    names of the threads that ran calls."""
    names: list[str] = []

    def runner(call: Callable[[], object]) -> object:
        returned: list[object] = []
        thread = threading.Thread(target=lambda: returned.append(call()))
        thread.start()
        thread.join()
        names.append(thread.name)
        return returned[0]

    blocking.set_blocking_runner(runner)
    try:
        yield names
    finally:
        blocking.set_blocking_runner(lambda call: call())


def _submit_all(commits: GroupCommit[int, str], items: range) -> dict[int, str | BaseException]:
    outcomes: dict[int, str | BaseException] = {}

    def submit(item: int) -> None:
        try:
            outcomes[item] = commits.submit(item)
        except Exception as exc:
            outcomes[item] = exc

    threads = [threading.Thread(target=submit, args=(i,)) for i in items]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def test_batches_commit_in_the_blocking_runners_thread_one_at_a_time_in_order(
    committer_threads: list[str],
) -> None:
    committed: list[int] = []
    running = threading.Lock()
    submitters = set()

    def commit_batch(items: Sequence[int]) -> list[str]:
        assert running.acquire(blocking=False), "two batches committed at once"
        try:
            submitters.add(threading.current_thread().name)
            committed.extend(items)
            return [f"stored {i}" for i in items]
        finally:
            running.release()

    outcomes = _submit_all(GroupCommit(commit_batch), range(40))
    assert outcomes == {i: f"stored {i}" for i in range(40)}
    assert sorted(committed) == list(range(40))  # each item once
    assert submitters == set(committer_threads)  # never in a submitter's own thread


def test_a_batch_whose_commit_fails_in_the_runner_fails_each_of_its_submitters(
    committer_threads: list[str],
) -> None:
    def commit_batch(items: Sequence[int]) -> list[str]:
        raise OSError(28, "No space left on device")

    outcomes = _submit_all(GroupCommit(commit_batch), range(8))
    assert committer_threads
    assert set(outcomes) == set(range(8))
    assert all(isinstance(o, OSError) and o.errno == 28 for o in outcomes.values())
