"""Free space for a SQLite store: checked before a CA key signs, and a reserve kept for the
record of a signature that could not be stored.

A certificate must never exist without its row and its audit event. Two layers keep it so
on a disk that fills up:

* **The margin.** Before the CA key signs, the filesystem holding the database must have
  :data:`SIGNING_MARGIN_BYTES` free (more than a whole group-commit batch writes); with less,
  the issuance is refused as :class:`StorageFullError` and nothing is signed. Other writes
  (nonces, jobs, orders) may use the margin; they fail cleanly when the disk is full.
* **The reserve.** A file of :data:`RESERVE_BYTES` beside the database, fully allocated
  (``posix_fallocate``), that nothing else may use. When a commit fails after signing all
  the same (another process, or another program, took the margin between the check and the
  commit), the reserve is deleted inside the write transaction that records the discarded
  signature in the audit log: the store's writer lock is held, so no other writer of the
  database can take the space first. Signing is refused while there is no reserve and no
  room to make one again, so every signature has room for its discard record.

With PostgreSQL the database's disk is not ours to measure: a full disk there is SQLSTATE
53100, the discard record is attempted, and if that fails too it is logged with the serial
(the certificate itself is never handed out).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

from pkigate.core.errors import StorageFullError

log = logging.getLogger("pkigate.store")

SIGNING_MARGIN_BYTES = 2 * 1024 * 1024
RESERVE_BYTES = 1024 * 1024
RESERVE_SUFFIX = "-reserve"
# With this many times the margin and reserve free, the check is skipped for a moment.
ROOMY_FACTOR = 16
ROOMY_RECHECK_SECONDS = 0.25
LOW_SPACE_MESSAGE = (
    "the CA's storage is nearly full ({free} bytes free, {needed} needed to sign); nothing "
    "was signed or changed; try again later"
)


class SpaceGuard:
    """Free-space checks for the filesystem of one SQLite database (``database`` None: a
    PostgreSQL store, nothing to check here)."""

    def __init__(
        self,
        database: Path | None,
        *,
        margin: int = SIGNING_MARGIN_BYTES,
        reserve: int = RESERVE_BYTES,
    ) -> None:
        self.margin = margin
        self.reserve_bytes = reserve
        self._roomy_until = 0.0
        self.reserve_path = (
            None if database is None else database.with_name(database.name + RESERVE_SUFFIX)
        )

    def free_bytes(self) -> int | None:
        if self.reserve_path is None:
            return None
        stat = os.statvfs(self.reserve_path.parent)
        return stat.f_bavail * stat.f_frsize

    def check_before_signing(self) -> None:
        """StorageFullError unless a signature made now can be stored, or its discard
        recorded: the margin is free and the reserve exists (made here when missing)."""
        if self.reserve_path is None or time.monotonic() < self._roomy_until:
            return
        free = self.free_bytes()
        assert free is not None
        has_reserve = self._reserve_in_place()
        needed = self.margin + (0 if has_reserve else self.reserve_bytes)
        if free < needed:
            raise StorageFullError(LOW_SPACE_MESSAGE.format(free=free, needed=needed))
        if not has_reserve:
            self._make_reserve()
        if free >= ROOMY_FACTOR * (self.margin + self.reserve_bytes):
            # Far from full: two system calls per signature are not worth it (they cost
            # more than the rest of the check); look again a moment later.
            self._roomy_until = time.monotonic() + ROOMY_RECHECK_SECONDS

    def release_reserve(self) -> bool:
        """Give the reserve's space back (call with the store's writer lock held, just
        before the write that needs it); whether there was one."""
        if self.reserve_path is None:
            return False
        self._roomy_until = 0.0
        return _release(self.reserve_path, "record a discarded signature")

    def _reserve_in_place(self) -> bool:
        assert self.reserve_path is not None
        try:
            return self.reserve_path.stat().st_size >= self.reserve_bytes
        except FileNotFoundError:
            return False

    def _make_reserve(self) -> None:
        """Allocate the reserve under a temporary name, then rename it into place: another
        process never takes a half-made reserve for a whole one."""
        assert self.reserve_path is not None
        partial = self.reserve_path.with_name(f"{self.reserve_path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.reserve_bytes)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(partial, self.reserve_path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                partial.unlink()
            raise StorageFullError(
                f"the CA's storage reserve cannot be made ({exc.strerror}); nothing was "
                "signed or changed; try again later"
            ) from exc


def release_reserve(database: Path) -> bool:
    """Give up the reserve of the SQLite database at ``database`` so that it can be opened
    at all (its -wal and -shm files need room); whether there was one."""
    return _release(database.with_name(database.name + RESERVE_SUFFIX), "open the database")


def _release(path: Path, purpose: str) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    log.warning(
        "storage reserve %s released to %s; signing resumes once the disk has room again",
        path,
        purpose,
    )
    return True
