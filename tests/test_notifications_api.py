"""Notification destinations made through the management API on a running `pkigate serve`:
delivered to as the TOML's are, changed and deleted without a restart, admin only, their
secrets never shown; bad bodies refused naming the field."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from helpers import make_csr, wait_for
from serving import RunningServer, console_signin, issuer_token_and_issuing_ca, start_server
from webhook_receiver import SECRET, Receiver

API_SECRET = "api-destination-secret-7f3a9c"
ONLY_API_CERTIFICATES = ["EndEntityCertificate/V1"]  # not the server's own TLS certificate


class _Served:
    def __init__(self, server: RunningServer, witness: Receiver, hook: Receiver) -> None:
        self.server, self.witness, self.hook = server, witness, hook
        self.issuer, self.ca_id = issuer_token_and_issuing_ca(server, "issuer")
        self.auditor = self.admin.post(
            self.url("/tokens"), json={"name": "auditor", "role": "auditor"}, timeout=10
        ).json()["secret"]
        self.responses: list[str] = []  # every API answer, searched for secrets

    @property
    def admin(self) -> requests.Session:
        return self.server.session()

    def url(self, path: str) -> str:
        return f"{self.server.https_url}/api/v1{path}"

    def call(self, method: str, path: str, token: str | None = None, **kw: Any) -> Any:
        response = self.server.session(token).request(method, self.url(path), timeout=30, **kw)
        self.responses.append(response.text)
        return response

    def issue(self, name: str) -> str:
        response = self.call(
            "POST",
            f"/cas/{self.ca_id}/certificates",
            self.issuer,
            json={"csr": make_csr(name).decode(), "validity": "30d"},
        )
        assert response.status_code == 201, response.text
        return str(response.json()["serial"])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Served]:
    witness, hook = Receiver(), Receiver()
    # A destination of the configuration that takes every issued certificate: once it has
    # an event, the dispatcher has matched that event against every destination.
    config = f"""
[[notifications]]
name = "witness"
type = "webhook"
url = "{witness.url}"
secret_env = "HOOK_SECRET"
events = ["certificate.issued", "certificate.revoked"]
templates = {json.dumps(ONLY_API_CERTIFICATES)}
"""
    server = start_server(
        tmp_path_factory.mktemp("notifications-api") / "data",
        top_config="notifications_poll_seconds = 1\n",
        extra_config=config,
        environment={"HOOK_SECRET": SECRET},
    )
    try:
        yield _Served(server, witness, hook)
    finally:
        server.stop()
        witness.close()
        hook.close()


def _signed(receiver: Receiver, secret: str) -> list[dict[str, Any]]:
    """What ``receiver`` was sent, each body's signature checked against ``secret``."""
    found = []
    for headers, body in receiver.received:
        expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["X-Pkigate-Signature"], expected)
        found.append(json.loads(body))
    return found


def _witnessed(served: _Served, serial: str, event_type: str) -> None:
    wait_for(
        lambda: any(
            (e["serial"], e["type"]) == (serial, event_type) for e in served.witness.events()
        ),
        timeout=60,
    )


def _deliveries(served: _Served, serial: str, event_type: str) -> dict[str, str]:
    events = served.call("GET", "/events", params={"type": event_type}).json()["events"]
    (event,) = [e for e in events if e["serial"] == serial]
    return {d["destination"]: d["status"] for d in event["deliveries"]}


def test_a_destination_made_through_the_api_is_delivered_to_changed_and_deleted(
    served: _Served,
) -> None:
    created = served.call(
        "POST",
        "/notifications",
        json={
            "name": "api-hook",
            "type": "webhook",
            "url": served.hook.url,
            "secret": API_SECRET,
            "events": ["certificate.issued"],
            "templates": ONLY_API_CERTIFICATES,
        },
    )
    assert created.status_code == 201, created.text
    view = created.json()
    assert created.headers["Location"].endswith("/api/v1/notifications/api-hook")
    assert (view["source"], view["version"], view["secret_set"]) == ("api", 1, True)
    assert view["created_by"] == view["updated_by"] and view["read_only"] is False

    # Issued: delivered, signed with the secret sent at creation.
    first = served.issue("first.example.test")
    wait_for(lambda: any(e["serial"] == first for e in _signed(served.hook, API_SECRET)), 60)
    assert _deliveries(served, first, "certificate.issued")["api-hook"] == "delivered"

    # The filter changed to revocations: the next issuance is not sent, its revocation is.
    patched = served.call(
        "PATCH", "/notifications/api-hook", json={"events": ["certificate.revoked"]}
    )
    assert patched.status_code == 200, patched.text
    assert (patched.json()["version"], patched.json()["events"]) == (2, ["certificate.revoked"])
    second = served.issue("second.example.test")
    _witnessed(served, second, "certificate.issued")
    assert "api-hook" not in _deliveries(served, second, "certificate.issued")
    revoked = served.call(
        "POST",
        f"/cas/{served.ca_id}/certificates/{second}/revoke",
        served.issuer,
        json={"reason": "keyCompromise"},
    )
    assert revoked.status_code == 200, revoked.text
    wait_for(
        lambda: any(e["type"] == "certificate.revoked" for e in _signed(served.hook, API_SECRET)),
        60,
    )
    assert [(e["type"], e["serial"]) for e in _signed(served.hook, API_SECRET)] == [
        ("certificate.issued", first),
        ("certificate.revoked", second),
    ]

    listed = served.call("GET", "/notifications").json()["notifications"]
    by_name = {v["name"]: v for v in listed}
    assert by_name["witness"]["source"] == "config" and by_name["witness"]["read_only"]
    assert by_name["api-hook"]["deliveries"] == {
        "pending": 0,
        "delivered": 2,
        "dead": 0,
        "cancelled": 0,
    }

    # Deleted: the next revocation reaches the witness only.
    assert served.call("DELETE", "/notifications/api-hook").status_code == 200
    assert served.call("GET", "/notifications/api-hook").status_code == 404
    third = served.issue("third.example.test")
    served.call(
        "POST",
        f"/cas/{served.ca_id}/certificates/{third}/revoke",
        served.issuer,
        json={"reason": "superseded"},
    )
    _witnessed(served, third, "certificate.revoked")
    assert "api-hook" not in _deliveries(served, third, "certificate.revoked")
    assert len(served.hook.received) == 2

    # The configuration's destination is read-only here, and its name taken.
    for method, path, body in (
        (
            "POST",
            "/notifications",
            {"name": "witness", "type": "webhook", "url": served.hook.url, "secret": "x"},
        ),
        ("PATCH", "/notifications/witness", {"max_attempts": 2}),
        ("DELETE", "/notifications/witness", None),
    ):
        refused = served.call(method, path, json=body)
        assert refused.status_code == 409, refused.text

    # The secret is in no answer, no audit record and no log line.
    audit = served.call("GET", "/audit/events", served.auditor, params={"limit": 1000})
    actions = [e["action"] for e in audit.json()["events"]]
    for action in ("notification.create", "notification.update", "notification.delete"):
        assert action in actions
    console, _csrf = console_signin(served.server, served.server.admin_token)
    page = console.get(f"{served.server.https_url}/console/notifications", timeout=10)
    assert page.status_code == 200 and "witness" in page.text and "api-hook" not in page.text
    served.responses.append(page.text)
    assert all(API_SECRET not in text for text in served.responses)
    assert API_SECRET not in served.server.log_path.read_text()


def test_only_admins_manage_destinations(served: _Served) -> None:
    for token in (served.issuer, served.auditor):
        for method, path, body in (
            (
                "POST",
                "/notifications",
                {"name": "x", "type": "webhook", "url": served.hook.url, "secret": "s"},
            ),
            ("GET", "/notifications", None),
            ("GET", "/notifications/witness", None),
            ("PATCH", "/notifications/witness", {"max_attempts": 2}),
            ("DELETE", "/notifications/witness", None),
        ):
            response = served.call(method, path, token, json=body)
            assert response.status_code == 403, (method, path, response.text)
    assert "x" not in {
        v["name"] for v in served.call("GET", "/notifications").json()["notifications"]
    }


_WEBHOOK = {
    "name": "bad",
    "type": "webhook",
    "url": "https://hooks.example.test/",
    "secret": API_SECRET,
}
_EMAIL = {
    "name": "bad",
    "type": "email",
    "smtp_host": "smtp.example.test",
    "from": "pkigate@example.test",
    "to": ["pki@example.test"],
}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**_WEBHOOK, "colour": "red"}, "colour"),
        ({**_WEBHOOK, "url": "http://169.254.169.254/latest/meta-data"}, "url"),
        ({**_WEBHOOK, "url": "http://[fe80::1]/"}, "url"),
        # The metadata address as inet_aton(3), and so the resolver, also reads it.
        ({**_WEBHOOK, "url": "http://2852039166/latest/meta-data"}, "url"),
        ({**_WEBHOOK, "url": "http://0xa9.0xfe.0xa9.0xfe/"}, "url"),
        ({**_WEBHOOK, "url": "http://0251.0376.0251.0376/"}, "url"),
        ({**_WEBHOOK, "url": "http://169.254.43518/"}, "url"),
        ({**_WEBHOOK, "url": "http://[::ffff:169.254.169.254]/"}, "url"),
        ({**_WEBHOOK, "url": "http://[fe80::1%25eth0]/"}, "url"),
        ({**_WEBHOOK, "url": "http://hooks .example.test/"}, "url"),
        ({**_WEBHOOK, "url": "http://hooks!.example.test/"}, "url"),
        ({**_WEBHOOK, "url": "https://hooks.example.test/a b"}, "url"),
        ({**_WEBHOOK, "url": "https://hooks.example.test/\tx"}, "url"),
        ({**_WEBHOOK, "url": "ftp://hooks.example.test/"}, "url"),
        ({**_WEBHOOK, "type": "sms"}, "type"),
        ({**_WEBHOOK, "url": "https://hooks.example.test/" + "a" * 5000}, "url"),
        ({**_WEBHOOK, "secret": "s" * 5000}, "secret"),
        ({**_WEBHOOK, "templates": ["t"] * 500}, "templates"),
        ({**_WEBHOOK, "timeout_seconds": "10"}, "timeout_seconds"),
        ({**_WEBHOOK, "timeout_seconds": 100000}, "timeout_seconds"),
        ({**_WEBHOOK, "events": "certificate.issued"}, "events"),
        ({**_WEBHOOK, "events": ["certificate.nope"]}, "events[0]"),
        ({**_WEBHOOK, "allow_reserved_addresses": "yes"}, "allow_reserved_addresses"),
        ({**_WEBHOOK, "cas": ["no-such-ca"]}, "cas"),
        ({**_WEBHOOK, "name": "../etc"}, "name"),
        ({k: v for k, v in _WEBHOOK.items() if k != "secret"}, "secret"),
        ({**_EMAIL, "to": ["nobody"]}, "to"),
        ({**_EMAIL, "from": "pkigate@example.test\r\nBcc: x@example.test"}, "from"),
        ({**_EMAIL, "to": ["pki@example.test", "a b@example.test"]}, "to"),
        ({**_EMAIL, "smtp_host": "smtp.example.test\r\nx"}, "smtp_host"),
        ({**_EMAIL, "smtp_host": "smtp example"}, "smtp_host"),
        ({**_EMAIL, "url": "https://hooks.example.test/"}, "url"),
        ({**_EMAIL, "tls": "none"}, "tls"),
        ({**_EMAIL, "tls_ca_pem": "not a certificate"}, "tls_ca_pem"),
    ],
)
def test_a_bad_body_is_refused_naming_the_field_and_nothing_is_kept(
    served: _Served, body: dict[str, Any], field: str
) -> None:
    response = served.call("POST", "/notifications", json=body)
    assert response.status_code == 400, response.text
    assert f"'{field}'" in response.json()["error"]["message"], response.text
    assert API_SECRET not in response.text
    listed = served.call("GET", "/notifications").json()["notifications"]
    assert "bad" not in {v["name"] for v in listed}


def test_a_bad_change_is_refused_and_the_destination_kept_as_it_was(served: _Served) -> None:
    body = {**_WEBHOOK, "name": "kept"}
    assert served.call("POST", "/notifications", json=body).status_code == 201
    for change, field in (
        ({"url": "http://169.254.169.254/"}, "url"),
        ({"type": "email"}, "type"),
        ({"smtp_host": "smtp.example.test"}, "smtp_host"),
        ({"max_attempts": [1]}, "max_attempts"),
        ({"secret": None}, "secret"),
    ):
        response = served.call("PATCH", "/notifications/kept", json=change)
        assert response.status_code == 400, response.text
        assert f"'{field}'" in response.json()["error"]["message"]
    kept = served.call("GET", "/notifications/kept").json()
    assert (kept["url"], kept["version"], kept["secret_set"]) == (_WEBHOOK["url"], 1, True)
    # A change without the secret keeps it; null puts a setting back to its default.
    changed = served.call("PATCH", "/notifications/kept", json={"max_attempts": 3}).json()
    assert (changed["max_attempts"], changed["version"], changed["secret_set"]) == (3, 2, True)
    reset = served.call("PATCH", "/notifications/kept", json={"max_attempts": None}).json()
    assert reset["max_attempts"] == 8
    assert served.call("DELETE", "/notifications/kept").status_code == 200
    assert served.call("DELETE", "/notifications/kept").status_code == 404
