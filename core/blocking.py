"""Where a call that blocks its thread runs: a wait for another process's SQLite write
lock, a signature on a PKCS#11 token (a network HSM answers in milliseconds).

A server whose requests share one thread (gevent's workers) sets a runner that makes the
call in a thread of its own, so that the process goes on serving meanwhile; by default
the call runs in the calling thread."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

T = TypeVar("T")
BlockingRunner = Callable[[Callable[[], Any]], Any]


def _run_here(call: Callable[[], Any]) -> Any:
    return call()


_runner: BlockingRunner = _run_here


def set_blocking_runner(runner: BlockingRunner) -> None:
    """``runner(call)`` makes the call and returns what it returns (or raises)."""
    global _runner
    _runner = runner


def run_blocking(call: Callable[[], T]) -> T:
    """What ``call`` returns, or the exception it raised, raised here. The exception comes
    back as a value, so that the runner's thread does not report it as its own (gevent's
    pool prints a traceback for a task that raises)."""

    def caught() -> tuple[T | None, BaseException | None]:
        try:
            return call(), None
        except BaseException as exc:  # handed to the caller, raised there
            return None, exc

    result, error = _runner(caught)
    if error is not None:
        raise error
    return cast(T, result)
