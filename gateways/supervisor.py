"""What `pkigate serve` becomes once it has bootstrapped: the supervisor of the listeners.

``serve`` creates what the configuration names, prints the banner, then replaces itself
(``execv``, same process id, so a service manager's PID stays right) with::

    python -m pkigate.gateways.supervisor METRICS_DIR -- LISTENER_COMMAND...

which starts ``LISTENER_COMMAND --listener http`` and ``... --listener https`` (one gunicorn
arbiter each) and supervises them: SIGTERM or SIGINT stops both; when one exits on its own,
the other is stopped too and the exit status says so. It imports only the standard
library: the bootstrap's modules and heap (~90 MiB) do not stay resident for the life of
the server.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

LISTENERS = ("http", "https")


def supervise(children: list[subprocess.Popen[bytes]]) -> int:
    """Wait for the children; 0 when they ended because we were asked to stop, else the
    status of the one that ended on its own (1 if that was 0), after stopping the rest."""
    asked_to_stop = False
    lost: int | None = None  # the status of a listener that ended on its own

    def terminate_all() -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal asked_to_stop
        asked_to_stop = True
        terminate_all()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while True:
        codes = [child.poll() for child in children]
        if lost is None and not asked_to_stop and any(code is not None for code in codes):
            lost = next(code for code in codes if code is not None)
            print("pkigate: a listener exited; stopping the other", file=sys.stderr, flush=True)
            terminate_all()
        if all(code is not None for code in codes):
            return 0 if lost is None else abs(lost) or 1
        time.sleep(0.2)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print(
            "usage: python -m pkigate.gateways.supervisor METRICS_DIR -- LISTENER_COMMAND...",
            file=sys.stderr,
        )
        return 2
    metrics_dir, command = argv[0], argv[2:]
    # prometheus_client's multiprocess mode: one file set per worker, fresh for each start.
    shutil.rmtree(metrics_dir, ignore_errors=True)
    os.mkdir(metrics_dir, 0o700)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    children = [
        subprocess.Popen([*command, "--listener", listener], env=env) for listener in LISTENERS
    ]
    return supervise(children)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
