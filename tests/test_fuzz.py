"""The protocol fuzzer (tests/fuzzing.py), bounded: a fixed seed and CI_COUNTS mutations per
target (at least 1,000 per endpoint over the SQLite and PostgreSQL runs together), against
`pkigate serve`. The long run is its own command (see the README's Fuzzing section):
``.venv/bin/python tests/fuzzing.py --total 100000``."""

from __future__ import annotations

import os
from pathlib import Path

from fuzzing import CI_COUNTS, SERVING_LAYER_TARGETS, TARGETS, report, run

SEED = int(os.environ.get("PKIGATE_FUZZ_SEED", "20261123"))
# PKIGATE_FUZZ_ITERATIONS=N runs N per target instead (a quicker local run).
ITERATIONS = os.environ.get("PKIGATE_FUZZ_ITERATIONS")


def test_mutated_requests_get_protocol_errors_and_change_nothing(
    tmp_path: Path, database_url: str | None
) -> None:
    counts = dict.fromkeys(TARGETS, int(ITERATIONS)) if ITERATIONS else CI_COUNTS
    results = run(tmp_path / "data", counts, SEED, database_url)
    # Every target ran every mutation.
    assert {t: results.sent[t] for t in TARGETS} == counts, report(results, 0)
    assert results.delivered  # some mutations left requests valid: the store check has work
    assert results.ok, report(results, 0)


def test_http_framing_that_broke_the_old_serving_layer_gets_a_4xx(tmp_path: Path) -> None:
    """Invalid chunk sizes, chunks without their CRLF, bodies cut short or never sent: a
    400 (or a 408 at the body deadline), never a 500, a traceback or a hang."""
    counts = dict.fromkeys(SERVING_LAYER_TARGETS, 8)
    results = run(tmp_path / "data", counts, SEED, None, tuple(SERVING_LAYER_TARGETS))
    assert results.ok, report(results, 0)
