"""Access control after the first cut of issue 20: held requests approved on their own
facts, tokens changed after creation, teams deleted, and what a team sharing a CA sees of
its audit log. Through the management API (and the console, the CLI where they offer it)."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from helpers import make_csr
from test_access import _console_client, _make_ca
from test_api import Service, _open_service

from pkigate.core.audit import Actor
from pkigate.core.store import scep as scep_store

PENDING_CONNECTOR = """
[[connectors]]
type = "scep"
name = "mdm"
mount = "/mdm"
[connectors.settings]
pending = true
challenge = "correct horse battery"
"""
PENDING = "/connectors/mdm/pending"


@pytest.fixture(scope="module")
def held(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A gateway whose SCEP connector "mdm" holds requests, on the default team's issuing
    CA, shared with teams a and b for approving requests of their own names only."""
    service = _open_service(tmp_path_factory.mktemp("held"), None, PENDING_CONNECTOR)
    for team in ("a", "b"):
        service.call("POST", "/teams", "admin", json={"name": team}, expect=201)
        for role in ("approver", "admin", "issuer", "auditor"):
            created = service.call(
                "POST",
                "/tokens",
                "admin",
                json={"name": f"{team}-{role}", "roles": [role], "team": team},
                expect=201,
            ).get_json()
            service.secrets[f"{team}-{role}"] = created["secret"]
    statements = [
        {
            "id": f"approve-{team}",
            "principal": {"team": team},
            "actions": ["approve-pending", "read"],
            "conditions": {"dns_suffixes": [f".{team}.example"], "connectors": ["mdm"]},
        }
        for team in ("a", "b")
    ]
    body = {"document": {"statements": statements}, "replaces": 0}
    service.call("PUT", f"/cas/{service.issuing_id}/policy", "admin", json=body, expect=200)
    yield service
    service.gw.close()


def _hold(service: Service, transaction_id: str, name: str) -> None:
    """A request held by the connector, as a device's PKCSReq leaves it."""
    (connector,) = (c for c in service.gw.connectors if c.context.name == "mdm")
    der = x509.load_pem_x509_csr(make_csr(name)).public_bytes(serialization.Encoding.DER)
    connector.approvals.hold(
        transaction_id=transaction_id,
        csr_sha256=hashlib.sha256(der).hexdigest(),
        csr_der=der,
        subject=f"CN={name}",
        evidence={"challenge": "static"},
        client=Actor("scep:device", "mdm"),
    )


def _status(service: Service, transaction_id: str) -> str:
    with service.gw.core.store.read() as conn:
        row = scep_store.get_transaction(conn, "mdm", transaction_id)
    assert row is not None
    return row.status


def _denials(service: Service, response: Any) -> list[dict[str, Any]]:
    return [
        json.loads(e.parameters) for e in service.events(response) if e.action == "access.denied"
    ]


def _decide(service: Service, role: str, transaction_id: str, decision: str) -> Any:
    """The connector's own route (its replies are outside the API's document)."""
    return service.client.post(
        f"/api/v1{PENDING}/{transaction_id}/{decision}",
        headers={"Authorization": f"Bearer {service.secrets[role]}"},
        json={"reason": "not expected"} if decision == "reject" else {},
    )


@pytest.mark.parametrize("decision", ["approve", "reject"])
def test_a_team_decides_only_held_requests_for_its_own_names(held: Service, decision: str) -> None:
    foreign, own = f"a-www-{decision}", f"b-www-{decision}"
    _hold(held, foreign, "www.a.example")
    _hold(held, own, "www.b.example")
    refused = _decide(held, "b-approver", foreign, decision)
    assert refused.status_code == 403
    message = refused.get_json()["error"]["message"]
    assert "www.a.example" in message and ".b.example" in message
    (denial,) = _denials(held, refused)  # audited once, with the reason
    assert denial["action"] == "approve-pending" and "www.a.example" in denial["reason"]
    assert _status(held, foreign) == "PENDING"  # nothing decided

    assert _decide(held, "b-approver", own, decision).status_code == 200
    assert _status(held, own) == ("ISSUED" if decision == "approve" else "REJECTED")
    # The team the names belong to decides its own.
    assert _decide(held, "a-approver", foreign, decision).status_code == 200
    assert _status(held, foreign) == ("ISSUED" if decision == "approve" else "REJECTED")


def test_the_console_decides_held_requests_on_their_facts_too(held: Service) -> None:
    _hold(held, "a-console", "console.a.example")
    client = _console_client(held, held.secrets["b-approver"])
    page = client.get("/console/enrollment").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert csrf is not None
    refused = client.post(
        "/console/enrollment/scep/mdm/pending/approve",
        data={"transaction_id": "a-console", "csrf_token": csrf.group(1)},
    )
    assert refused.status_code == 403
    assert "console.a.example" in refused.get_data(as_text=True)
    assert _status(held, "a-console") == "PENDING"


# -- what a team sharing a CA sees of the audit log ---------------------------------------------


def test_a_team_sees_its_own_actions_on_a_shared_ca_and_nothing_of_the_owners(
    held: Service,
) -> None:
    shared = _make_ca(held, "CN=A audited")
    document = {
        "statements": [
            {
                "id": "share-b",
                "principal": {"team": "b"},
                "actions": ["issue", "read"],
                "conditions": {"dns_suffixes": [".b.example"]},
            }
        ]
    }
    held.call(
        "PUT",
        f"/cas/{shared}/policy",
        "a-admin",
        json={"document": document, "replaces": 0},
        expect=200,
    )

    def issue(role: str, name: str, expect: int) -> Any:
        body = {"csr": make_csr(name).decode()}
        return held.call("POST", f"/cas/{shared}/certificates", role, json=body, expect=expect)

    owners = issue("a-issuer", "owner.a.example", 201).get_json()["serial"]
    own = issue("b-issuer", "mine.b.example", 201).get_json()["serial"]
    issue("b-issuer", "theirs.a.example", 403)

    def audit(role: str) -> list[dict[str, Any]]:
        found = held.call("GET", "/audit/events?limit=1000", role, expect=200)
        return [e for e in found.get_json()["events"] if e["resource"] == f"ca/{shared}"]

    seen = audit("b-auditor")
    actors = {e["actor"] for e in seen}
    assert actors and all(a.startswith("token:b-") for a in actors), actors
    issued = {
        e["parameters"]["serial"]
        for e in seen
        if e["action"] == "certificate.issue" and e["result"] == "success"
    }
    assert issued == {own}  # its own issuance, not the owner's
    assert any("theirs.a.example" in json.dumps(e["parameters"]) for e in seen)  # its refusal
    # The outbox's events carry no team: a shared CA's are the owner's.
    events = held.client.get(
        "/api/v1/events?limit=1000",
        headers={"Authorization": f"Bearer {held.secrets['b-auditor']}"},
    ).get_json()["events"]
    assert not [e for e in events if e["ca_id"] == shared]
    # The owner sees every record of its CA, team b's included.
    owner_issued = {
        e["parameters"].get("serial")
        for e in audit("a-auditor")
        if e["action"] == "certificate.issue"
    }
    assert {owners, own} <= owner_issued


# -- changing another team's tokens, deleting teams -----------------------------------------------


def test_a_team_changes_only_its_own_tokens(held: Service) -> None:
    target = held.gw.tokens.authenticate(f"Bearer {held.secrets['a-approver']}").token_id
    body = {"roles": ["approver", "auditor"]}
    refused = held.call("PATCH", f"/tokens/{target}", "b-admin", json=body, expect=404)
    assert "no active token" in refused.get_json()["error"]["message"]
    changed = held.call("PATCH", f"/tokens/{target}", "a-admin", json=body, expect=200)
    assert changed.get_json()["roles"] == ["approver", "auditor"]
    assert changed.get_json()["team"] == "a"


def test_a_team_is_deleted_only_once_nothing_depends_on_it(held: Service) -> None:
    def delete(name: str, expect: int, role: str = "admin") -> str:
        response = held.call("DELETE", f"/teams/{name}", role, expect=expect)
        return str(response.get_json().get("error", {}).get("message", ""))

    assert "never deleted" in delete("default", 409)
    assert "only tokens of team default" in delete("b", 403, "a-admin")
    assert "no team named" in delete("nobody", 404)
    held.call("POST", "/teams", "admin", json={"name": "owner"}, expect=201)
    owned = _make_ca(held, "CN=Owned by a team", "admin", "owner")
    assert f"it owns CA {owned}" in delete("owner", 409)

    held.call("POST", "/teams", "admin", json={"name": "c"}, expect=201)
    issuer = held.call(
        "POST", "/tokens", "admin", json={"name": "c-issuer", "roles": ["issuer"], "team": "c"}
    ).get_json()
    held.secrets["c-issuer"] = issuer["secret"]
    ca = _make_ca(held, "CN=Shared with c", "admin")
    share = {"statements": [{"id": "share-c", "principal": {"team": "c"}, "actions": ["issue"]}]}
    policy = {"document": share, "replaces": 0}
    held.call("PUT", f"/cas/{ca}/policy", "admin", json=policy, expect=200)
    body = {"csr": make_csr("host.c.example").decode()}
    held.call("POST", f"/cas/{ca}/certificates", "c-issuer", json=body, expect=201)
    message = delete("c", 409)
    assert f"its tokens {issuer['id']} are live" in message
    assert f"the policies of CA {ca} name it" in message
    held.call("DELETE", f"/tokens/{issuer['id']}", "admin", expect=200)
    policy = {"document": {"statements": []}, "replaces": 1}
    held.call("PUT", f"/cas/{ca}/policy", "admin", json=policy, expect=200)

    deleted = held.call("DELETE", "/teams/c", "admin", expect=200).get_json()
    assert deleted == {"name": "c", "deleted": True}
    teams = held.call("GET", "/teams", "admin", expect=200).get_json()["teams"]
    assert "c" not in {t["name"] for t in teams}
    records = [
        (e.result, json.loads(e.parameters).get("message", ""))
        for e in held.gw.core.audit.events()
        if e.action == "team.delete" and e.resource == "team/c"
    ]
    assert records[-1] == ("success", "") and "are live" in records[0][1]
    # Certificates name the team that asked for them: the name is not given out again.
    again = held.call("POST", "/teams", "admin", json={"name": "c"}, expect=409)
    assert "deleted team c" in again.get_json()["error"]["message"]


def test_the_console_tokens_page_is_the_teams_own_and_changes_a_token(held: Service) -> None:
    client = _console_client(held, held.secrets["b-admin"])
    listing = client.get("/console/tokens").get_data(as_text=True)
    names = set(re.findall(r"<tr>\s*<td>([^<]+)</td>", listing))
    assert "b-auditor" in names and not names & {"a-approver", "auditor-token"}, names
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', listing)
    assert csrf is not None
    b_auditor = held.gw.tokens.authenticate(f"Bearer {held.secrets['b-auditor']}").token_id
    a_approver = held.gw.tokens.authenticate(f"Bearer {held.secrets['a-approver']}").token_id
    form = {
        "csrf_token": csrf.group(1),
        "roles": ["auditor", "revoker"],
        "allow_from": "127.0.0.0/8, 10.0.0.0/8",
    }
    changed = client.post(f"/console/tokens/{b_auditor}/update", data=form)
    assert changed.status_code == 302, changed.get_data(as_text=True)
    (record,) = [t for t in held.gw.tokens.list() if t.id == b_auditor]
    assert record.roles == ("revoker", "auditor")
    assert record.allow_from == ("127.0.0.0/8", "10.0.0.0/8")
    assert client.post(f"/console/tokens/{a_approver}/update", data=form).status_code == 404
    assert client.post(f"/console/tokens/{a_approver}/revoke", data=form).status_code == 404
    assert client.post(f"/console/tokens/{b_auditor}/update", data={}).status_code == 400  # CSRF
    # What the console creates is the team's own.
    created = client.post(
        "/console/tokens", data={"csrf_token": csrf.group(1), "name": "b-new", "roles": "auditor"}
    )
    assert created.status_code == 200
    (new,) = [t for t in held.gw.tokens.list() if t.name == "b-new"]
    assert new.team == "b"


def test_notification_destinations_are_the_default_teams(held: Service) -> None:
    """A destination receives every CA's events: another team's admin neither makes one
    (it would receive team a's issuances) nor reads or redirects the default team's."""
    body = {"name": "ops", "type": "webhook", "url": "https://hooks.example.com/pki", "secret": "s"}
    held.call("POST", "/notifications", "admin", json=body, expect=201)
    before = held.gw.destinations.list()
    for method, path, sent in (
        ("POST", "/notifications", {**body, "name": "b-hook"}),
        ("GET", "/notifications", None),
        ("GET", "/notifications/ops", None),
        ("PATCH", "/notifications/ops", {"url": "https://b.example/steal"}),
        ("DELETE", "/notifications/ops", None),
    ):
        refused = held.call(method, path, "b-admin", json=sent, expect=403)
        assert "only tokens of team default" in refused.get_json()["error"]["message"]
    assert held.gw.destinations.list() == before
    client = _console_client(held, held.secrets["b-admin"])
    assert client.get("/console/notifications").status_code == 403
    assert "/console/notifications" not in client.get("/console/").get_data(as_text=True)
    held.call("DELETE", "/notifications/ops", "admin", expect=200)


def test_the_console_deletes_a_team_as_the_api_does_after_its_name_is_typed(
    held: Service,
) -> None:
    held.call("POST", "/teams", "admin", json={"name": "gone"}, expect=201)
    held.call("POST", "/teams", "admin", json={"name": "kept"}, expect=201)
    kept = held.call(
        "POST",
        "/tokens",
        "admin",
        json={"name": "kept-auditor", "roles": ["auditor"], "team": "kept"},
    ).get_json()
    client = _console_client(held, held.secrets["admin"])
    listing = client.get("/console/teams").get_data(as_text=True)
    buttons = set(re.findall(r'id="delete-team-([^"]+)"', listing))
    assert {"a", "b", "gone", "kept"} <= buttons and "default" not in buttons
    confirm = client.get("/console/teams/gone/delete").get_data(as_text=True)
    assert '<strong id="confirm-team">gone</strong>' in confirm
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', confirm)
    assert csrf is not None

    def delete(name: str, typed: str, **form: str) -> Any:
        data = {"csrf_token": csrf.group(1), "confirm": typed, **form}
        return client.post(f"/console/teams/{name}/delete", data=data)

    mistyped = delete("gone", "gon\u00e9")
    assert mistyped.status_code == 400 and "type the team&#39;s name (gone)" in mistyped.text
    assert client.post("/console/teams/gone/delete", data={"confirm": "gone"}).status_code == 400
    # What the API would say, audited as the API's refusal is.
    refused = delete("kept", "kept")
    assert refused.status_code == 409
    assert f"its tokens {kept['id']} are live" in refused.get_data(as_text=True)
    assert delete("nobody", "nobody").status_code == 404
    never = delete("default", "default")  # not offered; the API's answer if sent anyway
    assert never.status_code == 409 and "never deleted" in never.get_data(as_text=True)
    deleted = delete("gone", "gone")
    assert deleted.status_code == 302, deleted.get_data(as_text=True)
    teams = {t["name"] for t in held.call("GET", "/teams", "admin").get_json()["teams"]}
    assert "gone" not in teams and "kept" in teams
    records = [
        (e.resource, e.result, e.actor)
        for e in held.gw.core.audit.events()
        if e.action == "team.delete" and e.resource in ("team/gone", "team/kept")
    ]
    admin_id = held.gw.tokens.authenticate(f"Bearer {held.secrets['admin']}").token_id
    assert [(r, res) for r, res, _ in records] == [
        ("team/kept", "failure"),
        ("team/gone", "success"),
    ]
    assert all(admin_id in actor for _, _, actor in records)
    # Another team's admin is offered nothing and refused as the API refuses it.
    b_admin = _console_client(held, held.secrets["b-admin"])
    assert "delete-team-" not in b_admin.get("/console/teams").get_data(as_text=True)
    other = b_admin.get("/console/teams/kept/delete")
    assert other.status_code == 403 and "only tokens of team default" in other.get_data(
        as_text=True
    )


def test_a_confirmation_typed_with_an_accented_letter_is_a_400_not_a_500(held: Service) -> None:
    """A CA's id is compared as text: compare_digest raised TypeError on non-ASCII."""
    client = _console_client(held, held.secrets["admin"])
    page = client.get(f"/console/cas/{held.issuing_id}/disable").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert csrf is not None
    form = {"csrf_token": csrf.group(1), "confirm": "\u00e9"}
    refused = client.post(f"/console/cas/{held.issuing_id}/disable", data=form)
    assert refused.status_code == 400 and "type the CA&#39;s id" in refused.get_data(as_text=True)
    (ca,) = [
        c for c in held.call("GET", "/cas", "admin").get_json()["cas"] if c["id"] == held.issuing_id
    ]
    assert ca["status"] == "ACTIVE"


def test_the_console_pages_past_certificates_a_team_may_not_see(held: Service) -> None:
    """A page of the console's certificate list is chosen among what the token may see:
    team b's one certificate after more than a page of the default team's is listed."""
    own_ca = _make_ca(held, "CN=B Paging Root", role="b-admin")
    for n in range(55):
        body = {"csr": make_csr(f"paging-{n}.example.test").decode(), "validity": "1d"}
        held.call("POST", f"/cas/{held.issuing_id}/certificates", "issuer", json=body, expect=201)
    body = {"csr": make_csr("paging.b.example").decode(), "validity": "1d"}
    mine = held.call("POST", f"/cas/{own_ca}/certificates", "b-issuer", json=body)
    assert mine.status_code == 201, mine.get_data(as_text=True)
    reader = held.call(
        "POST", "/tokens", "admin", json={"name": "b-pager", "roles": ["auditor"], "team": "b"}
    ).get_json()["secret"]
    listing = _console_client(held, reader).get("/console/certificates")
    page = listing.get_data(as_text=True)
    assert listing.status_code == 200 and mine.get_json()["serial"] in page
    assert "paging-0.example.test" not in page
