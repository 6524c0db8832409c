"""SCEP pending mode: requests wait for an approver's approval; clients collect with CertPoll."""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from flask.testing import FlaskClient
from helpers import stale_first_scep_transaction_lookup
from test_scep import Device, load_certs_only

from pkigate.core import Actor, Requester
from pkigate.core.store import scep as scep_store
from pkigate.gateways.app import create_app
from pkigate.gateways.auth import Role
from pkigate.gateways.config import parse_config
from pkigate.gateways.runtime import Gateway
from pkigate.scep.messages import (
    CertRep,
    FailInfo,
    MessageType,
    PkiStatus,
    encode_issuer_and_subject,
    parse_cert_rep,
)

MOUNT = "/mdm"
CHALLENGE = "correct horse battery"
PENDING_API = "/api/v1/connectors/mdm/pending"


def pending_config(data_dir: Path) -> str:
    return f"""
data_dir = '{data_dir}'
[[connectors]]
type = "scep"
name = "mdm"
mount = "{MOUNT}"
[connectors.settings]
pending = true
challenge = "{CHALLENGE}"
"""


class PendingEnv:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.client: FlaskClient = create_app(gateway, "http").test_client()
        self.api: FlaskClient = create_app(gateway, "https").test_client()

    def ca_certs(self) -> list[x509.Certificate]:
        return load_certs_only(self.client.get(f"{MOUNT}?operation=GetCACert").data)

    def send(self, device: Device, payload: bytes, kind: MessageType, tid: str) -> CertRep:
        certs = self.ca_certs()
        body = device.message(certs[0], payload, kind=kind, transaction_id=tid)
        response = self.client.post(
            f"{MOUNT}?operation=PKIOperation",
            data=body,
            headers={"Content-Type": "application/x-pki-message"},
        )
        assert response.status_code == 200, response.text
        return parse_cert_rep(response.data, device.key, certs[:1])

    def enroll(self, device: Device, tid: str) -> CertRep:
        return self.send(device, device.csr(CHALLENGE), MessageType.PKCS_REQ, tid)

    def poll(self, device: Device, tid: str) -> CertRep:
        issuing = self.ca_certs()[1]
        payload = encode_issuer_and_subject(issuing.subject, device.certificate.subject)
        return self.send(device, payload, MessageType.CERT_POLL, tid)

    def headers(self, role: Role = Role.APPROVER) -> dict[str, str]:
        secret = self.gateway.tokens.create(f"approver-{role}", role, Actor("test")).secret
        return {"Authorization": f"Bearer {secret}"}

    def audit(self, action: str) -> list[dict[str, Any]]:
        return [
            {"result": e.result, "principal": e.actor, **json.loads(e.parameters or "{}")}
            for e in self.gateway.core.audit.events()
            if e.action == action
        ]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[PendingEnv]:
    gateway = Gateway.open(parse_config(pending_config(tmp_path / "data")), bootstrap=True)
    yield PendingEnv(gateway)
    gateway.close()


def test_pkcsreq_on_a_pending_connector_is_answered_pending_and_nothing_is_issued(
    env: PendingEnv,
) -> None:
    device = Device.new()
    rep = env.enroll(device, "tid-1")
    assert rep.status is PkiStatus.PENDING and rep.transaction_id == "tid-1"
    assert not rep.certificates
    with env.gateway.core.store.read() as conn:
        row = scep_store.get_transaction(conn, "mdm", "tid-1")
    assert row is not None and (row.status, row.serial) == ("PENDING", None)
    assert not [e for e in env.audit("certificate.issue") if e.get("correlation_id") == "tid-1"]
    assert [e["transaction_id"] for e in env.audit("scep.pending")] == ["tid-1"]
    (held,) = env.gateway.core.events.list(types=["enrollment.pending"])
    assert (held.event.data["connector"], held.event.data["request"]) == ("mdm", "tid-1")
    assert held.event.ca_id == env.gateway.ca_ids["issuing"]
    # The client polls while it waits.
    assert env.poll(device, "tid-1").status is PkiStatus.PENDING


@pytest.mark.parametrize("action", ["approve", "reject"])
def test_transaction_ids_with_any_base64_characters_can_be_approved_or_rejected(
    env: PendingEnv, action: str
) -> None:
    # scepclient's transactionIDs are base64 (of the SHA-1 of its key): "/", "//", "+" and
    # "=" reach the approval routes percent-encoded and must come out unchanged.
    transaction_id = f"/9I//czfH+uXk/MAC=={action}"  # a leading "/" too: 1 ID in 64
    assert env.enroll(Device.new(), transaction_id).status is PkiStatus.PENDING
    quoted = urllib.parse.quote(transaction_id, safe="")
    body = {"reason": "not ours"} if action == "reject" else None
    answer = env.api.post(f"{PENDING_API}/{quoted}/{action}", headers=env.headers(), json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json["transaction_id"] == transaction_id
    with env.gateway.core.store.read() as conn:
        row = scep_store.get_transaction(conn, "mdm", transaction_id)
    assert row is not None and row.status == ("ISSUED" if action == "approve" else "REJECTED")


def test_a_copy_held_meanwhile_by_its_twin_gets_the_pending_answer(
    env: PendingEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Copy B looked its transaction up, and checked the one-time challenge, before copy A
    # held the request and spent the challenge; B's hold then finds it spent. B is answered
    # PENDING like A, not refused for a spent challenge.
    created = env.api.post(
        "/api/v1/connectors/mdm/challenges", json={}, headers=env.headers(Role.ADMIN)
    )
    assert created.status_code == 201, created.text
    # Both copies checked the challenge before either spent it: B's check answers as A's did.
    from pkigate.scep.authorization import ChallengeAuthority

    checks: list[Any] = []
    real_check = ChallengeAuthority._find_dynamic

    def check_before_a_spent_it(self: Any, *args: Any) -> Any:
        checks.append(checks[0] if checks else real_check(self, *args))
        return checks[-1]

    monkeypatch.setattr(ChallengeAuthority, "_find_dynamic", check_before_a_spent_it)
    device = Device.new()
    csr = device.csr(created.json["challenge"])  # one-time: the twin spends it
    assert env.send(device, csr, MessageType.PKCS_REQ, "tid-twin").status is PkiStatus.PENDING
    stale_first_scep_transaction_lookup(monkeypatch)
    rep = env.send(device, csr, MessageType.PKCS_REQ, "tid-twin")
    assert rep.status is PkiStatus.PENDING, rep.fail_info_text
    listed = env.api.get(PENDING_API, headers=env.headers()).json
    assert [p["transaction_id"] for p in listed] == ["tid-twin"]
    assert len(checks) == 2  # B did get past the challenge check


def test_a_wrong_challenge_is_refused_before_anything_is_held(env: PendingEnv) -> None:
    device = Device.new()
    rep = env.send(device, device.csr("wrong one!"), MessageType.PKCS_REQ, "tid-bad")
    assert (rep.status, rep.fail_info) == (PkiStatus.FAILURE, FailInfo.BAD_REQUEST)
    listed = env.api.get(PENDING_API, headers=env.headers())
    assert listed.status_code == 200 and listed.json == []


def test_approved_request_is_collected_by_cert_poll_with_a_certificate_for_the_csr_key(
    env: PendingEnv,
) -> None:
    device = Device.new()
    assert env.enroll(device, "tid-2").status is PkiStatus.PENDING
    headers = env.headers()
    listed = env.api.get(PENDING_API, headers=headers).json
    assert [(p["transaction_id"], p["subject"]) for p in listed] == [("tid-2", "CN=device-1")]
    assert listed[0]["evidence"]["challenge"] == "static"

    approved = env.api.post(f"{PENDING_API}/tid-2/approve", headers=headers)
    assert approved.status_code == 200, approved.text
    assert approved.json["status"] == "ISSUED"
    assert env.api.get(PENDING_API, headers=headers).json == []

    rep = env.poll(device, "tid-2")
    assert rep.status is PkiStatus.SUCCESS, rep.fail_info_text
    issued = rep.certificates[0]
    assert issued.public_key() == device.key.public_key()
    assert issued.subject.rfc4514_string() == "CN=device-1"
    assert format(issued.serial_number, "x") == approved.json["serial"]
    issue = [e for e in env.audit("certificate.issue") if e.get("correlation_id") == "tid-2"]
    assert len(issue) == 1 and issue[0]["result"] == "success"
    assert issue[0]["approved_by"].startswith("token:approver-approver(")
    assert issue[0]["challenge"] == "static"
    # Approving twice is a conflict, not a second certificate.
    again = env.api.post(f"{PENDING_API}/tid-2/approve", headers=headers)
    assert again.status_code == 409
    # A PKCSReq retried after approval gets the same certificate.
    assert env.enroll(device, "tid-2").certificates[0] == issued


def test_rejected_request_gets_failure_bad_request_on_cert_poll(env: PendingEnv) -> None:
    device = Device.new()
    assert env.enroll(device, "tid-3").status is PkiStatus.PENDING
    headers = env.headers(Role.ADMIN)
    no_reason = env.api.post(f"{PENDING_API}/tid-3/reject", json={}, headers=headers)
    assert no_reason.status_code == 400
    rejected = env.api.post(
        f"{PENDING_API}/tid-3/reject", json={"reason": "unknown device"}, headers=headers
    )
    assert rejected.status_code == 200, rejected.text
    assert rejected.json["status"] == "REJECTED"
    rep = env.poll(device, "tid-3")
    assert (rep.status, rep.fail_info) == (PkiStatus.FAILURE, FailInfo.BAD_REQUEST)
    assert rep.fail_info_text is not None and "unknown device" in rep.fail_info_text
    assert [(e["transaction_id"], e["reason"]) for e in env.audit("scep.reject")] == [
        ("tid-3", "unknown device")
    ]
    assert not [e for e in env.audit("certificate.issue") if e.get("correlation_id") == "tid-3"]
    assert env.api.post(f"{PENDING_API}/tid-3/approve", headers=headers).status_code == 409


def test_pending_api_needs_the_approver_or_admin_role(env: PendingEnv) -> None:
    device = Device.new()
    env.enroll(device, "tid-4")
    for role in (Role.AUDITOR, Role.ISSUER):  # an issuer does not approve its own requests
        refused_role = env.headers(role)
        assert env.api.get(PENDING_API, headers=refused_role).status_code == 403
        approve = env.api.post(f"{PENDING_API}/tid-4/approve", headers=refused_role)
        assert approve.status_code == 403
        refused = env.api.post(
            f"{PENDING_API}/tid-4/reject", json={"reason": "x"}, headers=refused_role
        )
        assert refused.status_code == 403
    assert env.api.get(PENDING_API).status_code == 401
    unknown = env.api.post(f"{PENDING_API}/nope/approve", headers=env.headers())
    assert unknown.status_code == 404
    with env.gateway.core.store.read() as conn:
        row = scep_store.get_transaction(conn, "mdm", "tid-4")
    assert row is not None and row.status == "PENDING"


def test_approving_needs_approve_pending_on_the_connectors_ca(env: PendingEnv) -> None:
    """A token of another team than the CA's owner approves only what the CA's policy
    allows it (the approve-pending action, through this connector)."""
    device = Device.new()
    env.enroll(device, "tid-team")
    core = env.gateway.core
    core.access.create_team("ops", Actor("test"))
    secret = env.gateway.tokens.create("ops", Role.APPROVER, Actor("test"), team="ops").secret
    ops = {"Authorization": f"Bearer {secret}"}
    assert env.api.post(f"{PENDING_API}/tid-team/approve", headers=ops).status_code == 404
    ca_id = next(c for c in env.gateway.connectors if c.context.name == "mdm").context.ca_id
    statement = {"id": "ops", "principal": {"team": "ops"}, "actions": ["approve-pending"]}
    core.access.set_policy(
        ca_id,
        {"statements": [{**statement, "conditions": {"connectors": ["other"]}}]},
        0,
        Actor("test"),
    )
    refused = env.api.post(f"{PENDING_API}/tid-team/approve", headers=ops)
    assert refused.status_code == 403 and "connector mdm" in refused.json["error"]["message"]
    core.access.set_policy(ca_id, {"statements": [statement]}, 1, Actor("test"))
    assert env.api.post(f"{PENDING_API}/tid-team/approve", headers=ops).status_code == 200
    denied = env.audit("access.denied")
    assert [d["action"] for d in denied] == ["approve-pending", "approve-pending"]


@pytest.mark.parametrize("quote", [False, True], ids=["raw", "percent-encoded"])
def test_transaction_ids_with_slash_and_plus_are_approved_by_url(
    env: PendingEnv, quote: bool
) -> None:
    # micromdm's scepclient uses the standard base64 SHA-1 of the key as transactionID.
    transaction_id = "ab/c+d=="
    device = Device.new()
    assert env.enroll(device, transaction_id).status is PkiStatus.PENDING
    path = urllib.parse.quote(transaction_id, safe="") if quote else transaction_id
    approved = env.api.post(f"{PENDING_API}/{path}/approve", headers=env.headers())
    assert approved.status_code == 200, approved.text
    assert env.poll(device, transaction_id).status is PkiStatus.SUCCESS


def _interrupt_approval(env: PendingEnv, tid: str) -> None:
    """The state a process killed in the middle of approve() leaves: APPROVING, a while ago."""
    core = env.gateway.core
    with core.store.write() as conn:
        row = scep_store.get_transaction(conn, "mdm", tid)
        assert row is not None
        assert scep_store.settle_transaction(
            conn,
            connector="mdm",
            transaction_id=tid,
            from_status="PENDING",
            status="APPROVING",
            evidence=row.evidence,
            ca_id=None,
            serial=None,
            now=core.clock() - timedelta(minutes=2),
        )


def test_an_approval_interrupted_before_issuing_goes_back_to_the_queue(env: PendingEnv) -> None:
    device = Device.new()
    assert env.enroll(device, "tid-crash-1").status is PkiStatus.PENDING
    _interrupt_approval(env, "tid-crash-1")
    assert env.poll(device, "tid-crash-1").status is PkiStatus.PENDING
    headers = env.headers()
    listed = env.api.get(PENDING_API, headers=headers).json
    assert [p["transaction_id"] for p in listed] == ["tid-crash-1"]
    assert env.api.post(f"{PENDING_API}/tid-crash-1/approve", headers=headers).status_code == 200
    assert env.poll(device, "tid-crash-1").status is PkiStatus.SUCCESS


def test_an_approval_interrupted_after_issuing_delivers_that_certificate(env: PendingEnv) -> None:
    device = Device.new()
    assert env.enroll(device, "tid-crash-2").status is PkiStatus.PENDING
    (connector,) = env.gateway.connectors
    queue = connector.approvals  # type: ignore[attr-defined]
    with env.gateway.core.store.read() as conn:
        row = scep_store.get_transaction(conn, "mdm", "tid-crash-2")
    assert row is not None
    # The core issued under the approval's token; the process died before recording it.
    issued = connector.context.issue(
        row.csr_der,
        Requester("token:approver", "mdm"),
        correlation_id="tid-crash-2",
        idempotency_token=queue._token("tid-crash-2"),
    )
    _interrupt_approval(env, "tid-crash-2")
    rep = env.poll(device, "tid-crash-2")
    assert rep.status is PkiStatus.SUCCESS, rep.fail_info_text
    assert rep.certificates[0].serial_number == issued.certificate.serial_number
