"""The SQLite writer lock: one writer at a time across threads and processes, forks included."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pkigate.core import blocking
from pkigate.core.store.writelock import WriterLock


def _bump(counter: Path, lock: WriterLock, times: int) -> None:
    """A read-modify-write that loses updates unless the lock excludes every other writer."""
    for _ in range(times):
        with lock.held():
            value = int(counter.read_text())
            time.sleep(0.0005)
            counter.write_text(str(value + 1))


def test_threads_of_two_processes_never_write_at_once(tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    counter.write_text("0")
    lock = WriterLock(tmp_path / "db-writer.lock")
    with lock.held():
        pass  # the lock file is open before the fork
    pid = os.fork()
    if pid == 0:  # the child: same lock object, inherited; it must not share the parent's flock
        try:
            threads = [threading.Thread(target=_bump, args=(counter, lock, 25)) for _ in range(3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            os._exit(0)
    threads = [threading.Thread(target=_bump, args=(counter, lock, 25)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert _exit_code(pid) == 0
    assert int(counter.read_text()) == 150


def test_a_forked_child_waits_for_the_parents_writer(tmp_path: Path) -> None:
    lock = WriterLock(tmp_path / "db-writer.lock")
    stamp = tmp_path / "child-acquired"
    with lock.held():
        pid = os.fork()
        if pid == 0:
            try:
                with lock.held():
                    stamp.write_text(repr(time.monotonic()))
            finally:
                os._exit(0)
        time.sleep(0.3)
        assert not stamp.exists()  # the child is still waiting
        released = time.monotonic()
    assert _exit_code(pid) == 0
    assert float(stamp.read_text()) >= released


def _exit_code(pid: int, timeout: float = 20.0) -> int:
    """The child's exit code; a child still running after ``timeout`` (a deadlock) is
    killed and the test fails."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError("the child never got the lock")


def test_a_wait_for_another_holder_runs_in_the_blocking_runner_and_an_uncontended_one_not(
    tmp_path: Path,
) -> None:
    # Two locks on one file (two open file descriptions) exclude each other as two
    # processes' locks do.
    holder, waiter = WriterLock(tmp_path / "w.lock"), WriterLock(tmp_path / "w.lock")
    waits: list[str] = []

    def runner(call: Callable[[], object]) -> object:
        waits.append(threading.current_thread().name)
        returned: list[object] = []
        worker = threading.Thread(target=lambda: returned.append(call()), name="waiting-thread")
        worker.start()
        worker.join()
        return returned[0]

    blocking.set_blocking_runner(runner)
    try:
        with waiter.held():
            pass
        assert waits == []  # nobody else held it: no wait, no runner
        entered = threading.Event()
        with holder.held():
            thread = threading.Thread(target=lambda: _enter(waiter, entered))
            thread.start()
            time.sleep(0.2)
            assert not entered.is_set()  # it waits while the other holds the lock
        thread.join(5)
        assert entered.is_set()
        assert len(waits) == 1
    finally:
        blocking.set_blocking_runner(lambda call: call())


def _enter(lock: WriterLock, entered: threading.Event) -> None:
    with lock.held():
        entered.set()
