"""Challenge validation by a webhook and outcome notifications (the Intune-style flow),
against a real HTTP server on 127.0.0.1 that records what it is sent."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from flask.testing import FlaskClient
from test_scep import Device, load_certs_only

from pkigate.core.jobs import JobRunner, RunCounts
from pkigate.core.store import scep as scep_store
from pkigate.gateways.app import create_app
from pkigate.gateways.config import ConfigError, parse_config
from pkigate.gateways.runtime import Gateway
from pkigate.scep.authorization import static_challenge_secret_name
from pkigate.scep.messages import CertRep, FailInfo, PkiStatus, parse_cert_rep

CHALLENGE = "intune-challenge-1"


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class MdmServer:
    """The MDM's webhook: answers /validate per ``validate`` and /validate/notify with the
    statuses in ``notify_statuses`` (then 204)."""

    url: str = ""
    validate: tuple[int, Any] = (200, {"allow": True})
    validate_delay: float = 0.0
    notify_statuses: list[int] = field(default_factory=list)
    requests: list[Recorded] = field(default_factory=list)

    def sent(self, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.path == path]


@pytest.fixture
def mdm() -> Iterator[MdmServer]:
    state = MdmServer()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            state.requests.append(Recorded(self.path, dict(self.headers.items()), body))
            if self.path == "/validate":
                time.sleep(state.validate_delay)
                status, answer = state.validate
            else:
                status = state.notify_statuses.pop(0) if state.notify_statuses else 204
                answer = None
            data = json.dumps(answer).encode() if answer is not None else b""
            try:
                self.send_response(status)
                if status in (301, 302, 307, 308):
                    self.send_header("Location", f"{state.url}/elsewhere")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                pass  # the client gave up (the timeout test)

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def open_gateway(tmp_path: Path, settings: str) -> Gateway:
    config = parse_config(f"""
data_dir = '{tmp_path / "data"}'
[[connectors]]
type = "scep"
name = "mdm"
mount = "/mdm"
[connectors.settings]
{settings}
""")
    return Gateway.open(config, bootstrap=True)


@dataclass
class Env:
    gateway: Gateway
    client: FlaskClient
    mdm: MdmServer

    def enroll(self, device: Device, challenge: str | None = CHALLENGE) -> tuple[str, CertRep]:
        ra = load_certs_only(self.client.get("/mdm?operation=GetCACert").data)[0]
        transaction_id = uuid.uuid4().hex
        body = device.message(ra, device.csr(challenge), transaction_id=transaction_id)
        response = self.client.post(
            "/mdm?operation=PKIOperation",
            data=body,
            headers={"Content-Type": "application/x-pki-message"},
        )
        assert response.status_code == 200, response.text
        return transaction_id, parse_cert_rep(response.data, device.key, [ra])

    def run_jobs(self) -> RunCounts:
        return JobRunner(self.gateway.core.jobs, self.gateway.job_handlers()).run_once()

    def enroll_audits(self) -> list[tuple[str, dict[str, Any]]]:
        return [
            (e.result, json.loads(e.parameters))
            for e in self.gateway.core.audit.events()
            if e.action == "scep.enroll"
        ]


@pytest.fixture
def env(tmp_path: Path, mdm: MdmServer) -> Iterator[Env]:
    gateway = open_gateway(
        tmp_path,
        f"""challenge = "webhook"
webhook_url = "{mdm.url}/validate"
webhook_secret = "s3cret-token"
webhook_timeout_seconds = 1
""",
    )
    yield Env(gateway, create_app(gateway, "http").test_client(), mdm)
    gateway.close()


def test_an_allowed_request_is_issued_and_the_success_is_notified_by_a_job(env: Env) -> None:
    device = Device.new()
    transaction_id, rep = env.enroll(device)
    assert rep.status is PkiStatus.SUCCESS, rep.fail_info_text
    issued = rep.certificates[0]

    (asked,) = env.mdm.sent("/validate")
    assert asked.headers["Authorization"] == "Bearer s3cret-token"
    assert asked.headers["Content-Type"] == "application/json"
    assert asked.body == {
        "transaction_id": transaction_id,
        "csr": base64.b64encode(device.csr(CHALLENGE)).decode(),
        "challenge": CHALLENGE,
        "caller": {"client_address": "127.0.0.1", "connector": "mdm"},
    }
    with env.gateway.core.store.read() as conn:
        record = scep_store.get_transaction(conn, "mdm", transaction_id)
    assert record is not None
    assert json.loads(record.evidence) == {
        "challenge": "webhook",
        "transaction_id": transaction_id,
    }

    # The notification is not sent with the reply, but by the job worker.
    assert env.mdm.sent("/validate/notify") == []
    assert env.run_jobs() == RunCounts(completed=1)
    (notified,) = env.mdm.sent("/validate/notify")
    assert notified.headers["Authorization"] == "Bearer s3cret-token"
    der = issued.public_bytes(serialization.Encoding.DER)
    assert notified.body == {
        "transaction_id": transaction_id,
        "status": "success",
        "serial": format(issued.serial_number, "x"),
        "thumbprint": hashlib.sha1(der, usedforsecurity=False).hexdigest().upper(),
        "not_after": issued.not_valid_after_utc.isoformat().replace("+00:00", "Z"),
        "issuer": issued.issuer.rfc4514_string(),
    }
    assert env.run_jobs().processed == 0


@pytest.mark.parametrize(
    ("answer", "delay", "text"),
    [
        ((200, {"allow": False, "reason": "unknown device"}), 0.0, "unknown device"),
        ((500, {"error": "boom"}), 0.0, "answered HTTP 500"),
        ((302, None), 0.0, "answered HTTP 302"),  # redirects are not followed
        ((200, {"maybe": True}), 0.0, 'did not answer {"allow": ...}'),
        ((200, {"allow": True}), 3.0, "did not answer within 1 s"),
    ],
    ids=["deny", "500", "redirect", "garbage", "timeout"],
)
def test_a_denied_or_failed_validation_is_a_failure_bad_request_audited_and_notified(
    env: Env, answer: tuple[int, Any], delay: float, text: str
) -> None:
    env.mdm.validate = answer
    env.mdm.validate_delay = delay
    started = time.monotonic()
    transaction_id, rep = env.enroll(Device.new())
    assert time.monotonic() - started < 2.9
    assert (rep.status, rep.fail_info) == (PkiStatus.FAILURE, FailInfo.BAD_REQUEST)
    assert rep.fail_info_text is not None and text in rep.fail_info_text
    assert len(env.mdm.sent("/validate")) == 1
    assert (
        "failure",
        {"reason": rep.fail_info_text, "transaction_id": transaction_id},
    ) in env.enroll_audits()

    assert env.run_jobs() == RunCounts(completed=1)
    (notified,) = env.mdm.sent("/validate/notify")
    assert notified.body == {
        "transaction_id": transaction_id,
        "status": "failure",
        "reason": rep.fail_info_text,
    }


def test_a_missing_challenge_is_refused_without_asking_the_webhook(env: Env) -> None:
    _, rep = env.enroll(Device.new(), challenge=None)
    assert (rep.status, rep.fail_info) == (PkiStatus.FAILURE, FailInfo.BAD_REQUEST)
    assert env.mdm.sent("/validate") == []


def test_denials_count_against_the_rate_limit_but_an_unavailable_webhook_does_not(
    env: Env,
) -> None:
    env.mdm.validate = (503, None)
    for _ in range(6):
        _, rep = env.enroll(Device.new())
        assert rep.fail_info_text is not None and "HTTP 503" in rep.fail_info_text
    env.mdm.validate = (200, {"allow": False})
    for _ in range(5):
        _, rep = env.enroll(Device.new())
        assert rep.fail_info_text == "denied by the validation webhook"
    _, rep = env.enroll(Device.new())
    assert rep.fail_info_text == "too many failed challenge attempts; try again later"
    assert len(env.mdm.sent("/validate")) == 11


def test_a_failed_notification_is_retried(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    env.mdm.notify_statuses = [503]
    transaction_id, rep = env.enroll(Device.new())
    assert rep.status is PkiStatus.SUCCESS
    assert env.run_jobs() == RunCounts(retried=1)
    # Not again before the retry delay.
    assert env.run_jobs().processed == 0
    later = datetime.now(UTC) + timedelta(minutes=1)
    monkeypatch.setattr(env.gateway.core.jobs, "clock", lambda: later)
    assert env.run_jobs() == RunCounts(completed=1)
    first, second = env.mdm.sent("/validate/notify")
    assert first.body == second.body
    assert second.body["transaction_id"] == transaction_id
    assert second.body["status"] == "success"


def test_a_separate_notify_url_can_be_configured(tmp_path: Path, mdm: MdmServer) -> None:
    gateway = open_gateway(
        tmp_path,
        f"""challenge = "webhook"
webhook_url = "{mdm.url}/validate"
webhook_notify_url = "{mdm.url}/outcomes"
""",
    )
    env = Env(gateway, create_app(gateway, "http").test_client(), mdm)
    _, rep = env.enroll(Device.new())
    assert rep.status is PkiStatus.SUCCESS
    assert "Authorization" not in mdm.sent("/validate")[0].headers
    assert env.run_jobs() == RunCounts(completed=1)
    assert [r.body["status"] for r in mdm.sent("/outcomes")] == ["success"]
    assert not (gateway.core.data_dir / "scep-mdm-challenge").exists()
    assert gateway.core.secrets.get(static_challenge_secret_name("mdm")) is None
    gateway.close()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ('challenge = "webhook"', r"settings.webhook_url: is required"),
        (
            'challenge = "webhook"\nwebhook_url = "ftp://mdm.example/hook"',
            r"settings.webhook_url: must be an http:// or https:// URL",
        ),
        (
            'challenge = "webhook"\nwebhook_url = "https://mdm.example/v"\n'
            "webhook_timeout_seconds = 0",
            r"settings.webhook_timeout_seconds: must be a number of seconds",
        ),
        (
            'challenge = "webhook"\nwebhook_url = "https://mdm.example/v"\npending = true',
            r"settings.pending: cannot be combined",
        ),
        (
            'challenge = "correct horse"\nwebhook_url = "https://mdm.example/v"',
            r'settings.webhook_url: only with challenge = "webhook"',
        ),
    ],
)
def test_bad_webhook_settings_stop_the_start(tmp_path: Path, settings: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        open_gateway(tmp_path, settings)
