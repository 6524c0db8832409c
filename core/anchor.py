"""The audit chain's anchor: an append-only journal beside the database it protects.

The chain's head lives in the same database as the events, so a store that lost its tail
(a WAL cut short by a bad disk, an old backup restored) is a shorter chain that verifies.
The anchor is a file of its own, one line per audit event, each line MAC'd with a subkey
of the key-encryption key: the event as stored (so its chain MAC checks against the store)
and, for an issued certificate, the certificate row with its DER, so what a client holds
can be put back into the store (:meth:`pkigate.core.audit.AuditLog.recover`).

Lines are appended after the database commit and made durable (fsync) before the
transaction's writer lock is released, so before any client sees an answer; a crash
between the two leaves the anchor behind the store, which is caught up from the store on
the next write. The writers of one SQLite database take turns under its writer lock, so
lines from every process are in sequence order. A final line without its newline is a
write the crash cut short: it is ignored, and cut off before the next append. A damaged
line before the last is never ignored.

A PostgreSQL store is written by processes on several hosts with no file system in
common, so each host keeps a journal of its own (:class:`HostJournal`, same lines, same
MAC): the events its processes committed. Lost events of the store are a suffix of its
sequence, so a host that wrote any of them finds its highest journaled event missing or
different in the store; events of other hosts in between need not be known.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import json
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from pkigate.core.errors import AnchorWriteError, StoreIntegrityError

ANCHOR_SUFFIX = "-audit-anchor.jsonl"
# In each host's data directory, for a PostgreSQL store (a SQLite anchor keeps its name).
HOST_JOURNAL_NAME = "pkigate-audit-journal.jsonl"
_TAIL_CHUNK = 64 * 1024
# A certificate of a few KiB, base64 and JSON: far below this. A longer "line" is damage.
MAX_LINE_BYTES = 1024 * 1024
_EVENT_FIELDS = (
    "seq",
    "event_id",
    "at",
    "actor",
    "connector",
    "action",
    "resource",
    "parameters",
    "result",
    "request_id",
    "prev_mac",
    "mac",
)
_CERTIFICATE_TIMES = ("not_before", "not_after", "issued_at", "revoked_at")
_LINE_JSON = json.JSONEncoder(separators=(",", ":"), sort_keys=True)


class AnchorCorruptError(StoreIntegrityError):
    code = "anchorCorrupt"


@dataclass(frozen=True)
class AnchoredEvent:
    """One anchor line: the audit event row, and the certificate row it issued, if any."""

    seq: int
    mac: str
    event: Mapping[str, Any]
    certificate: Mapping[str, Any] | None

    @property
    def issued_certificate(self) -> bool:
        return (
            self.certificate is not None
            and self.event["action"] == "certificate.issue"
            and self.event["result"] == "success"
        )


def anchor_path(database: str | None) -> Path | None:
    """Where a SQLite database's anchor lives (None for PostgreSQL or in-memory SQLite)."""
    if not database or database == ":memory:":
        return None
    path = Path(database)
    return path.with_name(path.stem + ANCHOR_SUFFIX)


def _json_ready(row: Mapping[str, Any]) -> dict[str, Any]:
    ready: dict[str, Any] = {}
    for name, value in row.items():
        if isinstance(value, datetime):
            value = value.isoformat(timespec="microseconds")
        elif isinstance(value, bytes | memoryview):
            value = base64.b64encode(bytes(value)).decode()
        ready[name] = value
    return ready


def event_row(event: Mapping[str, Any]) -> dict[str, Any]:
    """An anchored event as an ``audit_events`` row again."""
    row = {name: event[name] for name in _EVENT_FIELDS}
    row["at"] = datetime.fromisoformat(row["at"])
    return row


def certificate_row(certificate: Mapping[str, Any]) -> dict[str, Any]:
    """An anchored certificate as a ``certificates`` row again (without its id)."""
    row = dict(certificate)
    row.pop("id", None)
    for name in _CERTIFICATE_TIMES:
        if row.get(name) is not None:
            row[name] = datetime.fromisoformat(row[name])
    row["der"] = base64.b64decode(row["der"])
    return row


class AuditAnchor:
    """The anchor file of one SQLite database. Appends must hold the database's writer
    lock (they run inside its write transactions); reads take no lock."""

    def __init__(self, path: Path, key: bytes) -> None:
        self.path = path
        self._key = key
        self._fd: int | None = None
        self._inode: int | None = None
        self._size = 0
        self._last: AnchoredEvent | None = None
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._fd, self._inode, self._size, self._last = None, None, 0, None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._forget()

    # -- lines --------------------------------------------------------------------------

    def encode(
        self, event: Mapping[str, Any], certificate: Mapping[str, Any] | None = None
    ) -> bytes:
        body: dict[str, Any] = {"event": _json_ready(event)}
        if certificate is not None:
            body["certificate"] = _json_ready(certificate)
        data = _LINE_JSON.encode(body).encode()
        mac = hmac.digest(self._key, data, hashlib.sha256).hex().encode()
        return data + b"\t" + mac + b"\n"

    def decode(self, line: bytes, where: str) -> AnchoredEvent:
        data, _, mac = line.rstrip(b"\n").rpartition(b"\t")
        expected = hmac.digest(self._key, data, hashlib.sha256).hex().encode()
        if not data or not hmac.compare_digest(mac, expected):
            raise AnchorCorruptError(
                f"the audit anchor {self.path} is damaged at {where} (its MAC does not verify)"
            )
        body = json.loads(data)
        event = body["event"]
        return AnchoredEvent(int(event["seq"]), str(event["mac"]), event, body.get("certificate"))

    # -- reading (no lock) --------------------------------------------------------------

    def exists(self) -> bool:
        return self.path.exists()

    def tail(self) -> AnchoredEvent | None:
        """The last complete line (None for an empty file); a torn final line is ignored."""
        with open(self.path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            _end, last = self._last_line(handle.fileno(), size)
        return last

    def events(self) -> Iterator[AnchoredEvent]:
        """Every complete line in order; a damaged line that is not the last raises."""
        with open(self.path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.endswith(b"\n"):
                    return  # torn by a crash while it was written: never acknowledged
                if len(line) > MAX_LINE_BYTES:
                    raise AnchorCorruptError(
                        f"the audit anchor {self.path}: line {number} is damaged"
                    )
                yield self.decode(line, f"line {number}")

    def _last_line(
        self, fd: int, size: int, boundary: int = 0, known: AnchoredEvent | None = None
    ) -> tuple[int, AnchoredEvent | None]:
        """(where the complete lines end, the last complete line); ``boundary`` is where a
        line is known to start, with ``known`` the line before it (what other processes
        appended since this one last looked is all that is read)."""
        chunk = _TAIL_CHUNK
        while True:
            start = max(boundary, size - chunk)
            data = os.pread(fd, size - start, start)
            end = data.rfind(b"\n")
            if end < 0 and start == boundary:
                return boundary, known
            begin = data.rfind(b"\n", 0, end) if end >= 0 else -1
            if begin >= 0 or start == boundary:
                line = data[begin + 1 : end + 1]
                return start + end + 1, self.decode(line, "its last line")
            if chunk >= MAX_LINE_BYTES * 2:
                raise AnchorCorruptError(f"the audit anchor {self.path} ends in a damaged line")
            chunk *= 2

    # -- appending (under the writer lock) ----------------------------------------------

    def last_for_append(self) -> tuple[bool, AnchoredEvent | None]:
        """(whether the file exists, its last line), read again if another process
        appended since; a torn final line is cut off so the next append starts clean."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            self.close()
            return False, None
        if self._fd is None or stat.st_ino != self._inode or stat.st_size != self._size:
            boundary, known = self._size, self._last  # appended to since: read only that
            if self._fd is None or stat.st_ino != self._inode or stat.st_size < self._size:
                self.close()
                self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
                self._inode = stat.st_ino
                boundary, known = 0, None
            end, self._last = self._last_line(self._fd, stat.st_size, boundary, known)
            if end != stat.st_size:
                os.ftruncate(self._fd, end)
                os.fsync(self._fd)
            self._size = end
        return True, self._last

    def append(self, lines: list[bytes], create: bool = False) -> None:
        """Write lines and make them durable; ``create`` starts a new file."""
        if not lines:
            return
        if self._fd is None:
            if not create:
                raise AnchorWriteError(f"the audit anchor {self.path} is gone")
            flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            self._fd = os.open(self.path, flags, 0o600)
            self._inode = os.fstat(self._fd).st_ino
            self._size = 0
            sync_directory(self.path.parent)
        data = b"".join(lines)
        written = 0
        while written < len(data):
            written += os.write(self._fd, data[written:])
        os.fdatasync(self._fd)
        self._size += len(data)
        self._last = self.decode(lines[-1], "the line just written")


def sync_directory(directory: Path) -> None:
    # A new file's name is durable only once its directory is.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class HostJournal(AuditAnchor):
    """One host's journal of a PostgreSQL store: the events this host's processes committed.

    No writer lock is shared by the processes of a host (the database's locks are not held
    while they append), so lines of concurrent transactions land out of sequence order: a
    reader goes by each line's sequence number, never by its position. Each append is one
    ``O_APPEND`` write taken under ``flock`` (so a line torn by a crash is cut off before
    the next one lands after it), then synced outside the lock."""

    def __init__(self, path: Path, key: bytes) -> None:
        super().__init__(path, key)
        self._scan_lock = threading.Lock()
        self._scan_inode: int | None = None
        self._scan_offset = 0
        self._highest: AnchoredEvent | None = None

    def _forget(self) -> None:
        super()._forget()
        self._scan_inode, self._scan_offset, self._highest = None, 0, None

    def append(self, lines: list[bytes], create: bool = False) -> None:
        """Append lines (one write) and make them durable; the file is created if needed."""
        if not lines:
            return
        if self._fd is None or not self._same_file():
            self.close()
            flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
            self._fd = os.open(self.path, flags, 0o600)
            self._inode = os.fstat(self._fd).st_ino
            sync_directory(self.path.parent)
        fd = self._fd
        data = b"".join(lines)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                end, _last = self._last_line(fd, size)
                os.ftruncate(fd, end)  # a line a crash cut short: never acknowledged
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.fdatasync(fd)

    def _same_file(self) -> bool:
        try:
            return os.stat(self.path).st_ino == self._inode
        except FileNotFoundError:
            return False

    def highest(self) -> AnchoredEvent | None:
        """The journaled event with the highest sequence number (None: no journal, or an
        empty one). Reads only what was appended since the last call."""
        with self._scan_lock:
            try:
                with open(self.path, "rb") as handle:
                    return self._scan(handle)
            except FileNotFoundError:
                self._scan_inode, self._scan_offset, self._highest = None, 0, None
                return None

    def _scan(self, handle: BinaryIO) -> AnchoredEvent | None:
        stat = os.fstat(handle.fileno())
        if stat.st_ino != self._scan_inode or stat.st_size < self._scan_offset:
            self._scan_inode, self._scan_offset, self._highest = stat.st_ino, 0, None
        handle.seek(self._scan_offset)
        for line in handle:
            if not line.endswith(b"\n"):
                break  # being written, or torn: read again next time
            if len(line) > MAX_LINE_BYTES:
                raise AnchorCorruptError(f"the audit journal {self.path} is damaged")
            event = self.decode(line, f"offset {self._scan_offset}")
            if self._highest is None or event.seq > self._highest.seq:
                self._highest = event
            self._scan_offset += len(line)
        return self._highest
