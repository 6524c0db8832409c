"""Group commit: threads that finish their work at the same moment share one transaction.

A durable commit (an fsync) costs more than the rest of an issuance. The first thread to
arrive becomes the leader and commits its own item together with whatever other threads
have queued meanwhile; followers wait for their result. With one thread this is simply
an inline commit; under concurrency, one fsync covers many certificates. Leadership passes
to the oldest waiting thread after each batch, so no leader works for others forever.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Slot(Generic[T, R]):
    item: T
    done: threading.Event = field(default_factory=threading.Event)
    lead: bool = False
    finished: bool = False
    result: R | None = None
    error: BaseException | None = None


class GroupCommit(Generic[T, R]):
    """``commit_batch`` receives items in arrival order and returns, for each, a result or
    the exception that item should raise."""

    def __init__(
        self,
        commit_batch: Callable[[Sequence[T]], Sequence[R | BaseException]],
        max_batch: int = 128,
    ) -> None:
        self._commit_batch = commit_batch
        self._max_batch = max_batch
        self._lock = threading.Lock()
        self._queue: list[_Slot[T, R]] = []
        self._leading = False

    def submit(self, item: T) -> R:
        slot: _Slot[T, R] = _Slot(item)
        with self._lock:
            self._queue.append(slot)
            if not self._leading:
                self._leading = slot.lead = True
        if not slot.lead:
            slot.done.wait()
        if not slot.finished:  # leader now (first, or promoted): our slot heads the queue
            self._lead()
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]

    def _lead(self) -> None:
        with self._lock:
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
        try:
            outcomes: Sequence[R | BaseException] = self._commit_batch([s.item for s in batch])
            if len(outcomes) != len(batch):
                raise RuntimeError("commit_batch returned the wrong number of outcomes")
        except BaseException as exc:  # the whole batch shares the failure
            outcomes = [exc] * len(batch)
        for slot, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                slot.error = outcome
            else:
                slot.result = outcome
            slot.finished = True
        with self._lock:
            if self._queue:
                successor = self._queue[0]
                successor.lead = True
                successor.done.set()
            else:
                self._leading = False
        for slot in batch:
            slot.done.set()
