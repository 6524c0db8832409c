"""Notifications: events delivered to a loopback webhook by a real `pkigate serve`."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from helpers import make_csr, wait_for
from serving import RunningServer, issuer_token_and_issuing_ca, start_server
from webhook_receiver import SECRET, Receiver

from pkigate.core import Core, IssuanceRequest, Requester, Validity
from pkigate.gateways.config import ConfigError, parse_config
from pkigate.gateways.notifications import (
    WebhookError,
    WebhookTarget,
    check_webhook_url,
    post_webhook,
)


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for receiver in made:
        receiver.close()


def _destination(name: str, url: str, events: str, extra: str = "") -> str:
    return f"""
[[notifications]]
name = "{name}"
type = "webhook"
url = "{url}"
secret_env = "HOOK_SECRET"
events = [{events}]
{extra}
"""


def _start(data_dir: Path, config: str, workers: int = 1) -> RunningServer:
    return start_server(
        data_dir,
        workers=workers,
        top_config="notifications_poll_seconds = 1\n",
        extra_config=config,
        environment={"HOOK_SECRET": SECRET},
    )


def _events(server: RunningServer, event_type: str) -> list[dict[str, Any]]:
    response = server.session().get(
        f"{server.https_url}/api/v1/events", params={"type": event_type}, timeout=10
    )
    assert response.status_code == 200, response.text
    return list(response.json()["events"])


def _issue_twenty_days_ago(data_dir: Path, ca_id: str) -> str:
    """A 40-day certificate issued 20 days ago (by a core whose clock is behind, on the
    server's store): it crossed its 30-day lead time 10 days ago. That core scans for
    expiry too, as a third host would, racing the server's two workers."""

    def clock() -> datetime:
        return datetime.now(UTC) - timedelta(days=20)

    core = Core.open(data_dir, clock=clock)
    try:
        issued = core.issue(
            IssuanceRequest(
                ca_id, make_csr("old.example.test"), Validity.parse("40d"), Requester("ops")
            )
        )
    finally:
        core.close()
    other = Core.open(data_dir)
    try:
        other.expiry.scan()
    finally:
        other.close()
    return issued.serial


def test_expiring_is_delivered_once_under_two_workers(
    tmp_path: Path, receivers: list[Receiver]
) -> None:
    data_dir = tmp_path / "data"
    receiver = Receiver()
    receivers.append(receiver)
    server = start_server(
        data_dir,
        workers=2,
        # Both workers scan for expiry every second: they race on every certificate.
        top_config="notifications_poll_seconds = 1\nexpiry_scan_seconds = 1\n",
        extra_config=_destination("hook", receiver.url, '"certificate.expiring"'),
        environment={"HOOK_SECRET": SECRET},
    )
    try:
        _token, ca_id = issuer_token_and_issuing_ca(server, "expiry")
        serial = _issue_twenty_days_ago(data_dir, ca_id)

        def delivered() -> bool:
            found = _events(server, "certificate.expiring")
            return bool(found) and all(
                e["deliveries"] and all(d["status"] == "delivered" for d in e["deliveries"])
                for e in found
            )

        wait_for(delivered, timeout=60)
        time.sleep(3)  # three more rounds of both workers' scans and dispatches
        stored = _events(server, "certificate.expiring")
        assert [(e["serial"], e["data"]["days_before"]) for e in stored] == [(serial, 30)]
        sent = receiver.events()
        assert [e["id"] for e in sent] == [stored[0]["id"]]
        event = sent[0]
        assert event["version"] == 1 and event["type"] == "certificate.expiring"
        assert event["data"]["subject"] == "CN=old.example.test"
        assert event["data"]["requester"] == "ops"
        assert event["template"] == "EndEntityCertificate/V1"
    finally:
        server.stop()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_failing_receivers_get_the_event_later_or_dead_letter_it(
    tmp_path: Path, receivers: list[Receiver]
) -> None:
    flaky = Receiver(answer=lambda n: 500 if n <= 2 else 200)
    slow = Receiver(delay=3)
    never = Receiver(answer=lambda _n: 500)
    receivers.extend([flaky, slow, never])
    down_port = _free_port()
    issued = '"certificate.issued"'
    # Not the server's own TLS certificate (EndEntityServerAuthCertificate/V1).
    only_api = 'templates = ["EndEntityCertificate/V1"]\n'
    config = (
        _destination("flaky", flaky.url, issued, only_api)
        + _destination("slow", slow.url, issued, only_api + "timeout_seconds = 1")
        + _destination("never", never.url, issued, only_api + "max_attempts = 2")
        + _destination("down", f"http://127.0.0.1:{down_port}/hook", issued, only_api)
    )
    server = _start(tmp_path / "data", config)
    try:
        token, ca_id = issuer_token_and_issuing_ca(server, "notify")
        response = server.session(token).post(
            f"{server.https_url}/api/v1/cas/{ca_id}/certificates",
            json={"csr": make_csr("notify.example.test").decode(), "validity": "30d"},
            timeout=30,
        )
        assert response.status_code == 201, response.text
        serial = response.json()["serial"]

        def states() -> dict[str, tuple[str, int]]:
            (event,) = [e for e in _events(server, "certificate.issued") if e["serial"] == serial]
            return {d["destination"]: (d["status"], d["attempts"]) for d in event["deliveries"]}

        wait_for(lambda: states().get("down", ("", 0))[1] >= 1, timeout=60)
        down = Receiver()  # the receiver that was down comes up on its port
        down.server.server_close()
        down.server = ThreadingHTTPServer(("127.0.0.1", down_port), down.server.RequestHandlerClass)
        down.thread = threading.Thread(target=down.server.serve_forever, daemon=True)
        down.thread.start()
        receivers.append(down)
        wait_for(
            lambda: all(
                states().get(name, ("",))[0] == want
                for name, want in (
                    ("flaky", "delivered"),
                    ("slow", "delivered"),
                    ("never", "dead"),
                    ("down", "delivered"),
                )
            ),
            timeout=120,
        )
        final = states()
        assert final["flaky"] == ("delivered", 3)
        assert final["slow"] == ("delivered", 2)
        assert final["never"] == ("dead", 2)
        for receiver in (flaky, down):
            assert [e["serial"] for e in receiver.events()] == [serial]
        # The slow receiver took the first attempt in after pkigate gave up on it: at least
        # once, it has the event twice, under one id to de-duplicate by.
        copies = slow.events()
        assert [e["serial"] for e in copies] == [serial, serial]
        assert copies[0]["id"] == copies[1]["id"]
        assert never.received == []
        (event,) = [e for e in _events(server, "certificate.issued") if e["serial"] == serial]
        error = next(d["last_error"] for d in event["deliveries"] if d["destination"] == "never")
        assert error.startswith("HTTP 500") and len(error) < 300  # a snippet, not the page
        metrics = server.session().get(f"{server.http_url}/metrics", timeout=10).text
        assert 'pkigate_notification_deliveries{destination="never",status="dead"} 1.0' in metrics
        # Each failed attempt is logged once, by the delivery in its own terms; the job
        # runner that retries it adds no error line or traceback.
        log = server.log.read_text()
        assert log.count("notification never of event") == 2, log
        assert "(events:deliver) failed on attempt" not in log, log
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ('url = "http://169.254.169.254/latest"', "link-local"),
        ('url = "ftp://hooks.example.test/"', "http:// or https://"),
        ('url = "https://hooks.example.test/"\ncolour = "red"', "unknown key"),
    ],
)
def test_a_bad_destination_is_a_config_error(entry: str, problem: str) -> None:
    text = f'[[notifications]]\nname = "n"\ntype = "webhook"\nsecret_env = "S"\n{entry}\n'
    with pytest.raises(ConfigError, match=problem):
        parse_config(text)


def test_a_reserved_address_may_be_allowed_explicitly() -> None:
    config = parse_config(
        '[[notifications]]\nname = "n"\ntype = "webhook"\nsecret_env = "S"\n'
        'url = "http://169.254.10.10/"\nallow_reserved_addresses = true\n'
    )
    assert config.notifications[0].allow_reserved_addresses


class _RawReceiver:
    """One connection on loopback, answered by ``answer`` (given the socket once the
    request is read); keeps the request's bytes."""

    def __init__(self, host: str, answer: Callable[[socket.socket], None]) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.listener = socket.create_server((host, 0), family=family)
        self.port = self.listener.getsockname()[1]
        self.request = b""
        self.thread = threading.Thread(target=self._serve, args=(answer,), daemon=True)
        self.thread.start()

    def _serve(self, answer: Callable[[socket.socket], None]) -> None:
        peer, _ = self.listener.accept()
        with peer:
            self.request = peer.recv(65536)
            answer(peer)

    def close(self) -> None:
        self.thread.join()
        self.listener.close()


def test_a_receiver_that_never_finishes_its_answer_fails_the_attempt() -> None:
    """A header line now and then, each well within the per-read timeout: the attempt
    still ends after timeout_seconds instead of holding the worker."""
    stop = threading.Event()

    def drip(peer: socket.socket) -> None:
        peer.sendall(b"HTTP/1.1 200 OK\r\n")
        while not stop.wait(0.2):
            try:
                peer.sendall(b"X-Still: coming\r\n")
            except OSError:
                return

    receiver = _RawReceiver("127.0.0.1", drip)
    url = f"http://127.0.0.1:{receiver.port}/"
    target = WebhookTarget(url, secret_value=b"k", timeout_seconds=1)
    try:
        with pytest.raises(WebhookError, match="no whole answer within 1s"):
            post_webhook(target, b"{}", "event-1")
    finally:
        stop.set()
        receiver.close()


def test_a_webhook_on_an_ipv6_address_is_sent_a_bracketed_host_header() -> None:
    def ok(peer: socket.socket) -> None:
        peer.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")

    receiver = _RawReceiver("::1", ok)
    target = WebhookTarget(f"http://[::1]:{receiver.port}/hook", secret_value=b"k")
    try:
        assert post_webhook(target, b"{}", "event-1") == 204
    finally:
        receiver.close()
    assert f"\r\nHost: [::1]:{receiver.port}\r\n".encode() in receiver.request


def test_a_webhook_host_name_is_sent_in_its_idna_form() -> None:
    assert check_webhook_url("https://bücher.example/hook", False)[1] == "xn--bcher-kva.example"
    with pytest.raises(ValueError, match="neither an IP address nor a host name"):
        check_webhook_url("https://hooks!.example/", False)


def test_a_redirect_is_a_failed_attempt_and_is_never_followed() -> None:
    """A receiver answering 302 to another address: the attempt fails on the 3xx,
    and nothing goes to where it points."""
    followed = _RawReceiver(
        "127.0.0.1", lambda peer: peer.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
    )

    def redirect(peer: socket.socket) -> None:
        peer.sendall(
            f"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{followed.port}/\r\n"
            "Content-Length: 0\r\n\r\n".encode()
        )

    receiver = _RawReceiver("127.0.0.1", redirect)
    target = WebhookTarget(f"http://127.0.0.1:{receiver.port}/", secret_value=b"k")
    try:
        with pytest.raises(WebhookError, match="302"):
            post_webhook(target, b"{}", "event-1")
    finally:
        receiver.close()
    assert followed.request == b""  # never connected to
    followed.listener.close()
