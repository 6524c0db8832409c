"""The protocol fuzzer (tests/fuzzing.py), bounded: a fixed seed, a few hundred mutations
per target, against `pkigate serve` on SQLite and on PostgreSQL. The long run is its own
command (see the README): ``.venv/bin/python tests/fuzzing.py --iterations 20000``."""

from __future__ import annotations

import os
from pathlib import Path

from fuzzing import TARGETS, report, run

SEED = int(os.environ.get("PKIGATE_FUZZ_SEED", "20261123"))
ITERATIONS = int(os.environ.get("PKIGATE_FUZZ_ITERATIONS", "300"))


def test_mutated_requests_get_protocol_errors_and_change_nothing(
    tmp_path: Path, database_url: str | None
) -> None:
    results = run(tmp_path / "data", ITERATIONS, SEED, database_url)
    # Every target ran every mutation.
    assert sum(results.sent.values()) == len(TARGETS) * ITERATIONS
    assert results.delivered  # some mutations left requests valid: the store check has work
    assert results.ok, report(results, 0)
