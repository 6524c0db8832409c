"""With no notification destination a process runs no notification job runner (nothing
polls the job queue for deliveries that never come); one made through the API while the
workers run starts delivery in every worker, the ones that did not take the API call
included, without a restart."""

from __future__ import annotations

import threading
from pathlib import Path

from helpers import make_csr, wait_for
from webhook_receiver import SECRET, Receiver

from pkigate.core import Actor, IssuanceRequest, Requester, Validity
from pkigate.gateways.config import parse_config
from pkigate.gateways.notifications import WATCH_THREAD, DestinationWatch
from pkigate.gateways.runtime import Gateway

RUNNER_THREAD = "pkigate-notifications-0"  # the notifier's runner, job_threads = 1


def _config(tmp_path: Path, poll_seconds: int) -> str:
    """A gateway with one root CA and no connector, looking for destinations this often."""
    return f"""
data_dir = "{tmp_path / "data"}"
notifications_poll_seconds = {poll_seconds}
connectors = []
[[cas]]
name = "root"
type = "ROOT"
subject = "CN=Idle Notifications Root"
"""


def _threads(name: str) -> int:
    return sum(thread.name == name for thread in threading.enumerate())


def test_no_notifier_runner_without_a_destination_and_every_worker_starts_one_when_made(
    tmp_path: Path,
) -> None:
    text = _config(tmp_path, poll_seconds=1)
    receiver = Receiver()
    # Two workers of one `pkigate serve`: one store, a Gateway each.
    idle = Gateway.open(parse_config(text), bootstrap=True)
    api = Gateway.open(parse_config(text))
    running = [idle, api]
    try:
        for worker in (idle, api):
            worker.start_background_work()
        # Each worker's watch has looked at the store: nothing to deliver to, so no
        # notifier runner exists in either, only the watches.
        for worker in (idle, api):
            assert worker.destination_watch is not None
            wait_for(lambda worker=worker: worker.destination_watch.looks >= 1)
        assert _threads(WATCH_THREAD) == 2
        assert _threads(RUNNER_THREAD) == 0
        assert _threads("pkigate-jobs-0") == 2  # the CA's own jobs, in each

        assert api.destinations is not None
        api.destinations.create(
            {"name": "late-hook", "type": "webhook", "url": receiver.url, "secret": SECRET},
            Actor("tests"),
        )
        # The worker that made it starts at once; the other finds it in the store. Both
        # watches end.
        wait_for(lambda: (_threads(RUNNER_THREAD), _threads(WATCH_THREAD)) == (2, 0), timeout=30)
        # The API's worker goes away: the other delivers on its own.
        running.remove(api)
        api.close()
        issued = idle.core.issue(
            IssuanceRequest(
                idle.ca_ids["root"], make_csr(), Validity.parse("30d"), Requester("ops")
            )
        )
        wait_for(
            lambda: any(
                event["type"] == "certificate.issued" and event["serial"] == str(issued.serial)
                for event in receiver.events()
            ),
            timeout=30,
        )
    finally:
        for worker in running:
            worker.close()
        receiver.close()
    assert _threads(RUNNER_THREAD) == 0 and _threads(WATCH_THREAD) == 0


def test_the_watch_looks_when_this_process_makes_a_destination_not_when_jobs_are_queued(
    tmp_path: Path,
) -> None:
    """Woken by a creation in its own process, the watch starts the notifier at once (its
    timed look is an hour away here); the jobs this process queues (a CRL, an ACME
    validation) do not make it look."""
    answers = iter([False, True])
    started = threading.Event()
    watch = DestinationWatch(lambda: next(answers), started.set, interval=3600.0)
    watch.start()
    try:
        wait_for(lambda: watch.looks == 1)
        watch.wake()
        assert started.wait(30)
        assert watch.looks == 2
    finally:
        watch.stop()

    gateway = Gateway.open(parse_config(_config(tmp_path, poll_seconds=3600)), bootstrap=True)
    try:
        gateway.start_background_work()
        assert gateway.destination_watch is not None
        wait_for(lambda: gateway.destination_watch.looks == 1)
        ca_id = gateway.ca_ids["root"]
        revocation = gateway.core.revocation
        before = revocation.latest_crl(ca_id)
        revocation.schedule_crl(ca_id, 0, gateway.core.clock())
        gateway.core.jobs.notify()
        wait_for(lambda: revocation.latest_crl(ca_id) != before, timeout=30)
        assert gateway.destination_watch.looks == 1
    finally:
        gateway.close()
