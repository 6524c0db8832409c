"""The benchmarks' load generator: a server that stops answering ends the run, not CI."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import revocation


def test_a_silent_server_ends_the_load_run_with_a_timeout() -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # connections are queued, never answered (as a spinning peer does)
    port = silent.getsockname()[1]
    request = revocation.http_post("127.0.0.1", port, "/", b"request")
    began = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            revocation.drive("127.0.0.1", port, [request], 2, 1.0, [], request_timeout=0.5)
    finally:
        silent.close()
    assert time.monotonic() - began < 10
