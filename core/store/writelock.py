"""One writer at a time for a SQLite database, handed over without sleeping.

SQLite serializes writers itself, but a writer that finds the database locked sleeps in
its busy handler (1, 2, 5, 10, ... up to 100 ms between tries) and does not notice when
the lock is released. Under concurrent load the write lock then sits idle while waiters
sleep, and every request pays those sleeps. :class:`WriterLock` queues writers instead:
a thread lock within the process and an ``flock`` on a lock file across processes, so the
next writer starts the moment the previous one commits. SQLite's own locking stays in
force underneath (for any other program that opens the database, and as the guarantee).
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pkigate.core.blocking import run_blocking


class WriterLock:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        # A forked child gets its own thread lock and its own open file description (an
        # flock belongs to the description, which a fork would share with the parent).
        self._thread_lock = threading.Lock()
        self._fd: int | None = None

    def _descriptor(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        return self._fd

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._thread_lock:
            fd = self._descriptor()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another process writes: wait off this thread
                # In a thread of its own where the server says so (core/blocking.py): the
                # process goes on serving while another process writes.
                run_blocking(lambda: fcntl.flock(fd, fcntl.LOCK_EX))
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
