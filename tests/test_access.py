"""Access control (core/access.py): the policy engine case by case, strict policy documents
(fuzzed with hypothesis), teams sharing a CA end to end through the management API, and a
store from before teams keeping every token working."""

from __future__ import annotations

import ipaddress
import json
import re
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import NameOID
from helpers import ACTOR, create_root, make_csr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_api import Service, _open_service
from werkzeug.test import TestResponse

from pkigate.core import Core
from pkigate.core.access import (
    Action,
    CAFacts,
    PolicyDocumentError,
    PrincipalFacts,
    RequestFacts,
    decide,
    parse_policy,
)
from pkigate.core.errors import ConflictError
from pkigate.core.names import upn_other_name
from pkigate.gateways.auth import Role
from pkigate.gateways.cli import main

CA = "ca-a"
A1 = PrincipalFacts("a1a1a1a1a1a1a1a1", "a")
A2 = PrincipalFacts("a2a2a2a2a2a2a2a2", "a")
B1 = PrincipalFacts("b1b1b1b1b1b1b1b1", "b")
C1 = PrincipalFacts("c1c1c1c1c1c1c1c1", "c")

POLICY = parse_policy(
    {
        "statements": [
            {
                "id": "share-web",
                "principal": {"team": "b"},
                "actions": ["issue", "read"],
                "conditions": {
                    "templates": ["EndEntityServerAuthCertificate/V1"],
                    "dns_suffixes": [".web.a.example"],
                    "ip_ranges": ["10.1.0.0/16"],
                    "email_domains": ["a.example"],
                    "upn_suffixes": ["corp.a.example"],
                    "max_validity_days": 90,
                    "connectors": ["api"],
                },
            },
            {"id": "a2-read-only", "principal": {"token": A2.token_id}, "actions": ["read"]},
        ]
    }
)
FACTS = CAFacts(CA, "a", POLICY)
WEB = "EndEntityServerAuthCertificate/V1"


def _request(
    cn: str | None = "x.web.a.example",
    sans: list[x509.GeneralName] | None = None,
    template: str = WEB,
    days: int = 30,
    connector: str = "api",
) -> RequestFacts:
    return RequestFacts(
        template=template,
        # Built, not parsed: a commonName may hold what no DN string could (a NUL).
        subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []),
        sans=sans if sans is not None else [x509.DNSName(cn or "x.web.a.example")],
        validity=timedelta(days=days),
        connector=connector,
        has_names=True,
    )


def _ip(text: str) -> x509.IPAddress:
    return x509.IPAddress(ipaddress.ip_address(text))


CASES: list[tuple[str, PrincipalFacts, Action, RequestFacts | None, bool, str]] = [
    ("owner token, any action", A1, Action.MANAGE, None, True, "owns"),
    ("owner token, any names", A1, Action.ISSUE, _request("x.evil.com"), True, "owns"),
    ("confined owner token, its action", A2, Action.READ, None, True, "a2-read-only"),
    ("confined owner token, other action", A2, Action.ISSUE, _request(), False, "may not issue"),
    ("shared team, all conditions met", B1, Action.ISSUE, _request(), True, "share-web"),
    ("shared team, action not shared", B1, Action.REVOKE, None, False, "may not revoke"),
    ("unshared team: deny by default", C1, Action.READ, None, False, "not shared with team c"),
    (
        "template not shared",
        B1,
        Action.ISSUE,
        _request(template="WebServer"),
        False,
        "template WebServer is not shared with team b",
    ),
    ("deeper DNS name allowed", B1, Action.ISSUE, _request("a.b.web.a.example"), True, ""),
    (
        "DNS outside the suffixes",
        B1,
        Action.ISSUE,
        _request("web.a.example", [x509.DNSName("x.evil.com")]),
        False,
        "outside the allowed names",
    ),
    (
        "DNS SAN outside the suffixes",
        B1,
        Action.ISSUE,
        _request(None, [x509.DNSName("x.evil.com")]),
        False,
        "dNSName x.evil.com is outside the allowed DNS suffixes .web.a.example",
    ),
    (
        "wildcard below the suffix",
        B1,
        Action.ISSUE,
        _request(None, [x509.DNSName("*.web.a.example")]),
        True,
        "",
    ),
    (
        "wildcard above the suffix",
        B1,
        Action.ISSUE,
        _request(None, [x509.DNSName("*.a.example")]),
        False,
        "*.a.example is outside",
    ),
    (
        "a NUL in a DNS name that ends like the suffix",
        B1,
        Action.ISSUE,
        _request(None, [x509.DNSName("evil.com\x00.web.a.example")]),
        False,
        "dNSName evil.com\\x00.web.a.example is outside",
    ),
    (
        "a NUL in a commonName that ends like the suffix",
        B1,
        Action.ISSUE,
        _request("evil.com\x00.web.a.example", [x509.DNSName("x.web.a.example")]),
        False,
        "commonName evil.com\\x00.web.a.example is outside",
    ),
    (
        "a DNS name with an empty label",
        B1,
        Action.ISSUE,
        _request(None, [x509.DNSName("..web.a.example")]),
        False,
        "dNSName ..web.a.example is outside",
    ),
    (
        "a DNS name with a space",
        B1,
        Action.ISSUE,
        _request(None, [x509.DNSName("evil.com x.web.a.example")]),
        False,
        "dNSName evil.com x.web.a.example is outside",
    ),
    (
        "a commonName that lower-cases into the suffix (Kelvin sign)",
        B1,
        Action.ISSUE,
        _request("x.\u212a.web.a.example", [x509.DNSName("x.web.a.example")]),
        False,
        "commonName x.\u212a.web.a.example is outside",
    ),
    (
        "a wildcard is one label, not an email domain",
        B1,
        Action.ISSUE,
        _request(None, [x509.RFC822Name("u@*.a.example")]),
        False,
        "rfc822Name u@*.a.example is outside",
    ),
    (
        "mixed case and a trailing dot",
        B1,
        Action.ISSUE,
        _request(None, [x509.DNSName("X.Web.A.Example.")]),
        True,
        "",
    ),
    ("IP in range", B1, Action.ISSUE, _request(None, [_ip("10.1.2.3")]), True, ""),
    (
        "IP out of range",
        B1,
        Action.ISSUE,
        _request(None, [_ip("10.2.0.1")]),
        False,
        "iPAddress 10.2.0.1",
    ),
    ("IPv6 vs IPv4 range", B1, Action.ISSUE, _request(None, [_ip("::1")]), False, "iPAddress ::1"),
    ("email domain", B1, Action.ISSUE, _request(None, [x509.RFC822Name("u@a.example")]), True, ""),
    (
        "email elsewhere",
        B1,
        Action.ISSUE,
        _request(None, [x509.RFC822Name("u@evil.com")]),
        False,
        "rfc822Name u@evil.com",
    ),
    (
        "UPN suffix",
        B1,
        Action.ISSUE,
        _request(None, [upn_other_name("u@corp.a.example")]),
        True,
        "",
    ),
    (
        "UPN elsewhere",
        B1,
        Action.ISSUE,
        _request(None, [upn_other_name("u@a.example")]),
        False,
        "userPrincipalName u@a.example is outside the allowed UPN suffixes",
    ),
    (
        "a kind of name no condition allows",
        B1,
        Action.ISSUE,
        _request(None, [x509.UniformResourceIdentifier("https://x.web.a.example")]),
        False,
        "not among the allowed name kinds",
    ),
    ("validity at the maximum", B1, Action.ISSUE, _request(days=90), True, ""),
    (
        "validity over the maximum",
        B1,
        Action.ISSUE,
        _request(days=91),
        False,
        "exceeds the 90 days",
    ),
    (
        "connector not allowed",
        B1,
        Action.ISSUE,
        _request(connector="console"),
        False,
        "connector console",
    ),
]


@pytest.mark.parametrize(
    ("principal", "action", "request_facts", "allowed", "reason"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_policy_engine_decides_each_condition(
    principal: PrincipalFacts,
    action: Action,
    request_facts: RequestFacts | None,
    allowed: bool,
    reason: str,
) -> None:
    decision = decide(principal, action, FACTS, request_facts)
    assert decision.allowed is allowed, decision.reason
    assert reason in decision.reason
    assert decision.reason  # every decision says why


def test_statement_without_conditions_allows_any_names() -> None:
    policy = parse_policy(
        {"statements": [{"id": "all", "principal": {"team": "b"}, "actions": ["issue"]}]}
    )
    decision = decide(B1, Action.ISSUE, CAFacts(CA, "a", policy), _request("anything.else"))
    assert decision.allowed and decision.statement_id == "all"


# -- documents ---------------------------------------------------------------------------------

BAD_DOCUMENTS = [
    ([], "document: must be an object"),
    ({"statements": [], "extra": 1}, "document.extra: unknown key"),
    ({"statements": [{"id": "s", "actions": ["read"]}]}, "statements[0].principal: is required"),
    (
        {
            "statements": [
                {"id": "s", "principal": {"team": "b", "token": "0" * 16}, "actions": ["read"]}
            ]
        },
        "statements[0].principal: names exactly one",
    ),
    (
        {"statements": [{"id": "s", "principal": {"team": "b"}, "actions": ["fly"]}]},
        "statements[0].actions[0]",
    ),
    (
        {
            "statements": [
                {"id": "s", "principal": {"team": "b"}, "actions": ["read"]},
                {
                    "id": "t",
                    "principal": {"team": "b"},
                    "actions": ["issue"],
                    "conditions": {"dns_suffixes": ["ok.example", "bad..example"]},
                },
            ]
        },
        "statements[1].conditions.dns_suffixes[1]",
    ),
    (
        {
            "statements": [
                {
                    "id": "s",
                    "principal": {"team": "b"},
                    "actions": ["issue"],
                    "conditions": {"ip_ranges": ["10.0.0.1/8"]},
                }
            ]
        },
        "statements[0].conditions.ip_ranges[0]: '10.0.0.1/8' is not a CIDR range",
    ),
    (
        {
            "statements": [
                {
                    "id": "s",
                    "principal": {"team": "b"},
                    "actions": ["issue"],
                    "conditions": {"max_validity_days": True},
                }
            ]
        },
        "statements[0].conditions.max_validity_days",
    ),
    (
        {"statements": [{"id": "s", "principal": {"team": "b"}, "actions": ["read"] * 101}]},
        "statements[0].actions: must hold 1 to 100 items",
    ),
    (
        {"statements": [{"id": "s", "principal": {"team": "b"}, "actions": ["read"]}] * 2},
        "statements[1].id: 's' is used twice",
    ),
]


@pytest.mark.parametrize(("document", "path"), BAD_DOCUMENTS)
def test_bad_policy_documents_name_the_failing_path(document: Any, path: str) -> None:
    with pytest.raises(PolicyDocumentError) as raised:
        parse_policy(document)
    assert path in raised.value.message


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "statements",
                    "id",
                    "principal",
                    "team",
                    "token",
                    "actions",
                    "conditions",
                    "templates",
                    "dns_suffixes",
                    "ip_ranges",
                    "email_domains",
                    "upn_suffixes",
                    "max_validity_days",
                    "connectors",
                    "x",
                ]
            ),
            children,
            max_size=5,
        )
    ),
    max_leaves=30,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_JSON)
def test_fuzzed_documents_parse_or_fail_with_a_path(document: Any) -> None:
    try:
        policy = parse_policy(document)
    except PolicyDocumentError as exc:
        assert exc.message.startswith("policy ")
        return
    assert parse_policy(policy.to_json()) == policy  # what is kept reads back the same


# -- end to end through the management API ------------------------------------------------------


@pytest.fixture(scope="module")
def teams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, dict[str, str]]]:
    """One gateway with teams a (owning the demo CAs' copies below) and b."""
    service = _open_service(tmp_path_factory.mktemp("teams"), None)
    service.call("POST", "/teams", "admin", json={"name": "a"}, expect=201)
    service.call("POST", "/teams", "admin", json={"name": "b"}, expect=201)
    tokens = {}
    for team in ("a", "b"):
        for role in ("admin", "issuer", "auditor"):
            created = service.call(
                "POST",
                "/tokens",
                "admin",
                json={"name": f"{team}-{role}", "role": role, "team": team},
                expect=201,
            ).get_json()
            assert created["team"] == team
            tokens[f"{team}-{role}"] = created["secret"]
    service.secrets.update(tokens)
    yield service, tokens
    service.gw.close()


def _make_ca(service: Service, subject: str, role: str = "a-admin", team: str | None = None) -> str:
    """A ROOT made by ``role`` (team a's admin): owned by its token's team, or ``team``."""
    body = {
        "type": "ROOT",
        "subject": subject,
        "key_algorithm": "EC_prime256v1",
        "usage_mode": "GENERAL_PURPOSE",
        "key_storage": "software",
        "validity": "365d",
        **({"team": team} if team else {}),
    }
    return str(service.call("POST", "/cas", role, json=body, expect=201).get_json()["id"])


def _put_policy(
    service: Service, ca_id: str, role: str, document: Any, replaces: int, expect: int
) -> TestResponse:
    body = {"document": document, "replaces": replaces}
    return service.call("PUT", f"/cas/{ca_id}/policy", role, json=body, expect=expect)


def _issue_audit(service: Service, serial: str) -> dict[str, Any]:
    """The parameters of the audit event that recorded this certificate's issuance."""
    for event in service.gw.core.audit.events():
        parameters = json.loads(event.parameters)
        if event.action == "certificate.issue" and parameters.get("serial") == serial:
            return dict(parameters)
    raise AssertionError(f"no issuance of {serial} in the audit log")


def _issue(
    service: Service, ca_id: str, role: str, csr: bytes, expect: int, **fields: Any
) -> dict[str, Any]:
    response = service.call(
        "POST",
        f"/cas/{ca_id}/certificates",
        role,
        json={"csr": csr.decode(), **fields},
        expect=expect,
    )
    return dict(response.get_json())


def test_team_b_uses_team_a_shared_ca_only_within_the_policy(
    teams: tuple[Service, dict[str, str]],
) -> None:
    service, _ = teams
    shared = _make_ca(service, "CN=A shared")
    private = _make_ca(service, "CN=A private")
    cas = service.call("GET", f"/cas/{shared}", "a-admin", expect=200).get_json()
    assert cas["team"] == "a"
    # Before sharing: team b cannot see nor use it.
    assert service.call("GET", f"/cas/{shared}", "b-issuer", expect=404)
    refused = _issue(service, shared, "b-issuer", make_csr("x.web.a.example"), 403)
    assert f"CA {shared} is not shared with team b" in refused["error"]["message"]

    document = {
        "statements": [
            {
                "id": "share-web",
                "principal": {"team": "b"},
                "actions": ["issue", "read", "revoke"],
                "conditions": {
                    "templates": ["EndEntityServerAuthCertificate/V1"],
                    "dns_suffixes": [".web.a.example"],
                },
            }
        ]
    }
    # Only the owner's admin sets the policy, naming the version it replaces.
    _put_policy(service, shared, "b-admin", document, 0, 404)
    set_ = _put_policy(service, shared, "a-admin", document, 0, 200).get_json()
    assert set_["version"] == 1 and set_["document"]["statements"][0]["id"] == "share-web"
    stale = _put_policy(service, shared, "a-admin", {"statements": []}, 0, 409)
    assert "version 1" in stale.get_json()["error"]["message"]

    # Within the policy: allowed, and the audit event names the statement.
    issued = _issue(service, shared, "b-issuer", make_csr("host.web.a.example"), 201, template=WEB)
    assert _issue_audit(service, issued["serial"])["access"] == "share-web"
    # Outside it: 403 with the reason, audited with it.
    wrong_template = _issue(service, shared, "b-issuer", make_csr("host.web.a.example"), 403)
    assert (
        "template EndEntityCertificate/V1 is not shared with team b"
        in wrong_template["error"]["message"]
    )
    wrong_name = _issue(service, shared, "b-issuer", make_csr("x.evil.com"), 403, template=WEB)
    message = wrong_name["error"]["message"]
    assert "x.evil.com" in message and ".web.a.example" in message
    failures = [
        json.loads(e.parameters).get("message", "")
        for e in service.gw.core.audit.events()
        if e.action == "certificate.issue" and e.result == "failure"
    ]
    assert any("x.evil.com" in m for m in failures) and any(
        "template EndEntityCertificate/V1" in m for m in failures
    )

    # Team b sees the shared CA and only its own certificates on it; never the private CA.
    owner_cert = _issue(service, shared, "a-issuer", make_csr("owner.a.example"), 201)
    assert _issue_audit(service, owner_cert["serial"])["access"] == "owner"
    listed = {
        c["id"] for c in service.call("GET", "/cas", "b-issuer", expect=200).get_json()["cas"]
    }
    assert shared in listed and private not in listed and service.issuing_id not in listed
    serials = {
        c["serial"]
        for c in service.call(
            "GET", f"/cas/{shared}/certificates", "b-issuer", expect=200
        ).get_json()["certificates"]
    }
    assert serials == {issued["serial"]}
    service.call(
        "GET", f"/cas/{shared}/certificates/{owner_cert['serial']}", "b-issuer", expect=404
    )
    service.call("GET", f"/cas/{private}/certificates", "b-issuer", expect=404)
    service.call(
        "POST",
        f"/cas/{shared}/certificates/{owner_cert['serial']}/revoke",
        "b-issuer",
        json={},
        expect=404,
    )
    service.call(
        "POST",
        f"/cas/{shared}/certificates/{issued['serial']}/revoke",
        "b-issuer",
        json={},
        expect=200,
    )
    # Management stays the owner's; the owner's view is unchanged.
    denied = service.call(
        "PATCH", f"/cas/{shared}", "b-admin", json={"status": "DISABLED"}, expect=403
    )
    assert "may not manage" in denied.get_json()["error"]["message"]
    assert {
        c["id"] for c in service.call("GET", "/cas", "a-issuer", expect=200).get_json()["cas"]
    } >= {shared, private}
    denials = [e for e in service.gw.core.audit.events() if e.action == "access.denied"]
    assert any("may not manage" in json.loads(e.parameters)["reason"] for e in denials)

    history = service.call(
        "GET", f"/cas/{shared}/policy/history", "a-auditor", expect=200
    ).get_json()
    assert [v["version"] for v in history["versions"]] == [1]
    assert any(e.action == "ca.policy.set" for e in service.gw.core.audit.events())


def test_owner_confines_one_of_its_tokens_by_naming_it(
    teams: tuple[Service, dict[str, str]],
) -> None:
    service, tokens = teams
    ca = _make_ca(service, "CN=A confined")
    issuer_id = tokens["a-issuer"].split("_")[1]
    document = {
        "statements": [
            {
                "id": "only-dev",
                "principal": {"token": issuer_id},
                "actions": ["issue"],
                "conditions": {"dns_suffixes": [".dev.a.example"]},
            }
        ]
    }
    _put_policy(service, ca, "a-admin", document, 0, 200)
    _issue(service, ca, "a-issuer", make_csr("x.dev.a.example"), 201)
    refused = _issue(service, ca, "a-issuer", make_csr("x.prod.a.example"), 403)
    assert "x.prod.a.example" in refused["error"]["message"]


def test_bad_policy_documents_are_400_naming_the_path(
    teams: tuple[Service, dict[str, str]],
) -> None:
    service, _ = teams
    ca = _make_ca(service, "CN=A fuzzed")
    bad = {
        "statements": [
            {
                "id": "s",
                "principal": {"team": "b"},
                "actions": ["issue"],
                "conditions": {"ip_ranges": ["300.0.0.0/8"]},
            }
        ]
    }
    response = _put_policy(service, ca, "a-admin", bad, 0, 400)
    assert "statements[0].conditions.ip_ranges[0]" in response.get_json()["error"]["message"]
    for body in (
        b'{"document": {"statements": [' * 3000 + b"",
        b'{"document": "\xff\xfe", "replaces": 0}',
    ):
        raw = service.client.put(
            f"/api/v1/cas/{ca}/policy",
            data=body,
            content_type="application/json",
            headers={"Authorization": f"Bearer {service.secrets['a-admin']}"},
        )
        assert raw.status_code == 400, raw.get_data(as_text=True)


def test_a_negative_policy_version_to_replace_is_refused_in_words(
    teams: tuple[Service, dict[str, str]],
) -> None:
    """``replaces`` declares a minimum only: the 400 says so (it said "from 0 to None")."""
    service, _ = teams
    refused = _put_policy(service, service.issuing_id, "admin", {"statements": []}, -1, 400)
    assert refused.get_json()["error"]["message"] == "field 'replaces' must be at least 0, not -1"


def test_a_policy_naming_a_team_that_does_not_exist_is_refused(
    teams: tuple[Service, dict[str, str]],
) -> None:
    """Such a statement would grant nothing now and everything to whoever later creates a
    team of that name: refused (400, the failing path), the policy left as it was."""
    service, _ = teams
    ca = _make_ca(service, "CN=A shared with a typo")
    document = {
        "statements": [
            {"id": "b", "principal": {"team": "b"}, "actions": ["read"]},
            {"id": "typo", "principal": {"team": "bb"}, "actions": ["issue"]},
        ]
    }
    refused = _put_policy(service, ca, "a-admin", document, 0, 400).get_json()["error"]
    assert refused["code"] == "badPolicy"
    assert refused["message"] == "policy statements[1].principal.team: no team named bb"
    assert service.gw.core.access.current_policy(ca).version == 0
    service.call("POST", "/teams", "admin", json={"name": "bb"}, expect=201)
    _put_policy(service, ca, "a-admin", document, 0, 200)


def test_a_team_is_not_deleted_while_a_policy_naming_it_is_written(
    core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The policy's transaction holds its team's row (shared), so a delete of that team
    waits for it and then finds the policy naming the team (409). On PostgreSQL (READ
    COMMITTED, no lock) each saw the other's change absent: the team was deleted and the
    policy kept naming it. The policy's write is held open inside its transaction here."""
    core.access.create_team("b", ACTOR)
    root = create_root(core, "Team Race Root")
    inside, release = threading.Event(), threading.Event()
    insert = core.store.insert_ca_policy

    def insert_and_hold(conn: Any, **values: Any) -> None:
        insert(conn, **values)
        inside.set()
        assert release.wait(30)

    monkeypatch.setattr(core.store, "insert_ca_policy", insert_and_hold)
    document = {"statements": [{"id": "b", "principal": {"team": "b"}, "actions": ["read"]}]}
    outcome: dict[str, object] = {}

    def run(name: str, call: Callable[[], object]) -> None:
        try:
            outcome[name] = call()
        except Exception as exc:
            outcome[name] = exc

    access = core.access
    writer = threading.Thread(
        target=run,
        args=("policy", lambda: access.set_policy(root.record.id, document, 0, ACTOR)),
    )
    writer.start()
    assert inside.wait(30)
    deleter = threading.Thread(target=run, args=("delete", lambda: access.delete_team("b", ACTOR)))
    deleter.start()
    deleter.join(0.5)  # unlocked, the delete is done by now
    release.set()
    writer.join(30)
    deleter.join(30)
    assert not isinstance(outcome["policy"], Exception), outcome["policy"]
    refused = outcome["delete"]
    assert isinstance(refused, ConflictError), refused
    assert refused.message.endswith(f"the policies of CA {root.record.id} name it")
    assert "b" in [team.name for team in access.list_teams()]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(document=_JSON)
def test_fuzzed_documents_through_the_api_are_400_with_a_path_never_500(
    teams: tuple[Service, dict[str, str]], document: Any
) -> None:
    service, _ = teams
    ca = service.issuing_id
    current = service.gw.core.access.current_policy(ca).version
    response = service.call(
        "PUT",
        f"/cas/{ca}/policy",
        "admin",
        json={"document": document, "replaces": current},
    )
    assert response.status_code in (200, 400), response.get_data(as_text=True)
    if response.status_code == 400:
        message = response.get_json()["error"]["message"]
        # NUL in a string, or NaN/Infinity, is refused by the API's JSON parsing first.
        assert any(
            part in message for part in ("policy ", "field 'document'", "malformed JSON: ")
        ), message


def test_another_teams_auditor_sees_no_audit_record_or_event_of_an_unshared_ca(
    teams: tuple[Service, dict[str, str]],
) -> None:
    """Team b's auditor sees audit records of the CAs b may read and of b's own tokens,
    and outbox events of those CAs only; the default team's auditor still sees everything."""
    service, _ = teams
    hidden = _make_ca(service, "CN=A's unshared CA")
    service.call("PATCH", f"/cas/{hidden}", "a-admin", json={"status": "DISABLED"}, expect=200)
    own = service.call(
        "POST", "/tokens", "b-admin", json={"name": "b-extra", "role": "auditor"}, expect=201
    ).get_json()

    def seen(role: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        audit = service.call("GET", "/audit/events?limit=1000", role, expect=200)
        # Unchecked by the strict schemas here: an event page's items are an allOf.
        events = service.client.get(
            "/api/v1/events?limit=1000",
            headers={"Authorization": f"Bearer {service.secrets[role]}"},
        )
        assert events.status_code == 200, events.get_data(as_text=True)
        return audit.get_json()["events"], events.get_json()["events"]

    b_audit, b_events = seen("b-auditor")
    assert not [e for e in b_audit if hidden in e["resource"]]
    assert not [e for e in b_events if e["ca_id"] == hidden]
    assert f"token/{own['id']}" in {e["resource"] for e in b_audit}  # b's own admin's act
    assert all(
        e["actor"].startswith("token:b-") or e["resource"].startswith("ca/") for e in b_audit
    )
    for role in ("auditor", "a-auditor"):  # the default team's, and the owner's
        audit, events = seen(role)
        assert [e for e in audit if e["resource"] == f"ca/{hidden}"], role
        assert [e for e in events if e["ca_id"] == hidden], role


# -- migration -----------------------------------------------------------------------------------


def test_a_store_from_before_teams_keeps_every_token_and_ca(tmp_path: Path) -> None:
    from helpers import downgrade_store

    from pkigate.core.store import sqlite_url

    data = tmp_path / "data"
    service = _open_service(data, None)
    before = {
        role: service.call("GET", "/cas", role, expect=200).get_json()["cas"]
        for role in ("admin", "issuer", "auditor")
    }
    service.gw.close()
    downgrade_store(sqlite_url(data / "pkigate.db"), "0017")
    Core.open(data, upgrade_schema=True).close()
    upgraded = _open_service(data, None)
    try:
        for role, secret in service.secrets.items():
            upgraded.secrets[role] = secret  # the tokens made before the migration
            who = upgraded.gw.tokens.authenticate(f"Bearer {secret}")
            assert who.team == "default" and who.roles == (Role(role),)
            after = upgraded.call("GET", "/cas", role, expect=200).get_json()["cas"]
            assert {c["id"] for c in after} >= {c["id"] for c in before[role]}
            assert all(c["team"] == "default" for c in after)
        upgraded.call(
            "POST",
            f"/cas/{upgraded.issuing_id}/certificates",
            "issuer",
            json={"csr": make_csr().decode()},
            expect=201,
        )
        upgraded.call("POST", "/cas", "auditor", json={}, expect=403)
        tags = {"tags": {"migrated": "yes"}}
        upgraded.call("PUT", f"/cas/{upgraded.issuing_id}/tags", "admin", json=tags, expect=200)
        upgraded.call("GET", f"/cas/{upgraded.issuing_id}/certificates", "auditor", expect=200)
    finally:
        upgraded.gw.close()


# -- console and CLI -----------------------------------------------------------------------------


def test_console_lists_only_what_the_team_may_read(teams: tuple[Service, dict[str, str]]) -> None:
    service, tokens = teams
    shared = _make_ca(service, "CN=A console shared")
    private = _make_ca(service, "CN=A console private")
    document = {"statements": [{"id": "read", "principal": {"team": "b"}, "actions": ["read"]}]}
    _put_policy(service, shared, "a-admin", document, 0, 200)
    owner_cert = _issue(service, shared, "a-issuer", make_csr("owner.a.example"), 201)
    client = _console_client(service, tokens["b-issuer"])
    cas = client.get("/console/cas").get_data(as_text=True)
    assert "CN=A console shared" in cas and "CN=A console private" not in cas
    assert client.get(f"/console/cas/{private}").status_code == 404
    page = client.get(f"/console/cas/{shared}").get_data(as_text=True)
    assert 'id="ca-team">a<' in page and "ca-policy" not in page  # the policy is the owner's
    listed = client.get("/console/certificates").get_data(as_text=True)
    assert owner_cert["serial"] not in listed
    assert client.get(f"/console/certificates/{shared}/{owner_cert['serial']}").status_code == 404

    def issued_in_chart(dashboard: Any) -> int:
        return sum(map(int, re.findall(r'<span class="count">(\d+)<', dashboard.get_data(True))))

    # The dashboard counts as the listings show: the owner's new certificate on the shared
    # CA is not b's, while the default team's admin counts it.
    admin = _console_client(service, service.secrets["admin"])
    before, admin_before = (issued_in_chart(c.get("/console/")) for c in (client, admin))
    _issue(service, shared, "a-issuer", make_csr("owner2.a.example"), 201)
    assert issued_in_chart(client.get("/console/")) == before
    assert issued_in_chart(admin.get("/console/")) == admin_before + 1


def test_console_access_pages_answer_each_token_as_the_api_does(
    teams: tuple[Service, dict[str, str]],
) -> None:
    """Reading and setting a CA's policy in the console: the API's status for every token
    (the owner's roles, another team it is shared with, a team it is not shared with)."""
    service, _ = teams
    shared = _make_ca(service, "CN=A console policy shared")
    private = _make_ca(service, "CN=A console policy private")
    document = {"statements": [{"id": "read", "principal": {"team": "b"}, "actions": ["read"]}]}
    _put_policy(service, shared, "a-admin", document, 0, 200)
    seen = {}
    for role in ("admin", "a-admin", "a-issuer", "a-auditor", "b-admin", "b-auditor"):
        client = _console_client(service, service.secrets[role])
        teams_page = client.get("/console/teams").get_data(as_text=True)
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', teams_page)
        assert csrf is not None
        for ca_id in (shared, private):
            read = service.call("GET", f"/cas/{ca_id}/policy", role).status_code
            assert client.get(f"/console/cas/{ca_id}/policy").status_code == read, (role, ca_id)
            # Each write sets the same statements again, as a new version.
            current = service.gw.core.access.current_policy(ca_id)
            body = {"document": current.policy.to_json(), "replaces": current.version}
            written = service.call("PUT", f"/cas/{ca_id}/policy", role, json=body).status_code
            form = {"csrf_token": csrf.group(1), "document": json.dumps(body["document"])}
            version = service.gw.core.access.current_policy(ca_id).version
            answer = client.post(
                f"/console/cas/{ca_id}/policy", data={**form, "replaces": str(version)}
            )
            # The API answers 200 with the new version; the console redirects (302) to it.
            assert (answer.status_code, written) in ((302, 200), (written, written)), role
            seen[role, ca_id == shared] = (read, written)
        # Teams are made by the default team's token admins, and listed as the API does.
        made = client.post(
            "/console/teams", data={"csrf_token": csrf.group(1), "name": "x-" + role}
        )
        api_made = service.call("POST", "/teams", role, json={"name": "y-" + role}).status_code
        assert (made.status_code, api_made) in ((302, 201), (api_made, api_made)), role
        listed = [t["name"] for t in service.call("GET", "/teams", role).get_json()["teams"]]
        shown = re.findall(r'<td class="team">([^<]+)</td>', client.get("/console/teams").text)
        assert shown == listed, role
    # Bad input is a 400 (or the conflict) with the reason, never a 500, and writes nothing.
    client = _console_client(service, service.secrets["a-admin"])
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/console/teams").text)
    assert csrf is not None
    version = service.gw.core.access.current_policy(shared).version
    share = {"csrf_token": csrf.group(1), "team": "b", "actions": "read"}
    for url, form, status, said in (
        ("policy", {"document": "{", "replaces": str(version)}, 400, "document: malformed JSON"),
        # Past the recursion limit, past int()'s 4300 digits: a 400, not a 500.
        ("policy", {"document": "[" * 50_000, "replaces": str(version)}, 400, "nested too deeply"),
        ("policy", {"document": "{}", "replaces": "9" * 5000}, 400, "replaces"),
        (
            "policy/share",
            {**share, "replaces": str(version), "max_validity_days": "9" * 5000},
            400,
            "whole number",
        ),
        ("policy", {"document": "[]", "replaces": str(version)}, 400, "policy document:"),
        ("policy", {"document": "{}", "replaces": "\u00b2"}, 400, "replaces"),
        (
            "policy/share",
            {**share, "replaces": str(version), "max_validity_days": "\u00b2"},
            400,
            "whole number",
        ),
        (
            "policy/share",
            {**share, "replaces": str(version), "max_validity_days": "9" * 30},
            400,
            "statements[1].conditions.max_validity_days",
        ),
        (
            "policy/share",
            {**share, "replaces": str(version), "dns_suffixes": "a..b"},
            400,
            "statements[1].conditions.dns_suffixes[0]",
        ),
        ("policy/share", {**share, "replaces": "9" * 30}, 409, "read it again"),
        ("policy/statements/nope/remove", {"replaces": str(version)}, 409, "no statement nope"),
    ):
        answer = client.post(
            f"/console/cas/{shared}/{url}", data={"csrf_token": csrf.group(1), **form}
        )
        assert answer.status_code == status and said in answer.text, (url, form, answer.text)
    assert service.gw.core.access.current_policy(shared).version == version
    assert client.get(f"/console/cas/{shared}/policy?saved=\u00b2").status_code == 200
    assert client.get(f"/console/cas/{shared}/policy?saved={'9' * 5000}").status_code == 200

    assert seen == {
        ("admin", True): (404, 404),
        ("admin", False): (404, 404),
        ("a-admin", True): (200, 200),
        ("a-admin", False): (200, 200),
        ("a-issuer", True): (200, 403),
        ("a-issuer", False): (200, 403),
        ("a-auditor", True): (200, 403),
        ("a-auditor", False): (200, 403),
        ("b-admin", True): (403, 403),
        ("b-admin", False): (404, 404),
        ("b-auditor", True): (403, 403),
        ("b-auditor", False): (404, 403),  # the role is checked before the CA is looked up
    }


def _console_client(service: Service, secret: str) -> Any:
    """A client of its own (its own cookies) signed in with ``secret``, over https as the
    console's cookies require."""
    client = service.app.test_client()
    client.environ_base["wsgi.url_scheme"] = "https"
    form = client.get("/console/signin").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', form)
    assert csrf is not None
    signed_in = client.post(
        "/console/signin",
        data={"token": secret, "csrf_token": csrf.group(1)},
        follow_redirects=True,
    )
    assert signed_in.status_code == 200, signed_in.get_data(as_text=True)
    return client


def test_cli_creates_a_team_and_shares_a_ca(tmp_path: Path) -> None:
    home = str(tmp_path / "home")
    runner = CliRunner()

    def pkigate(*args: str, ok: bool = True) -> Any:
        result = runner.invoke(main, ["--data-dir", home, "--json", *args], prog_name="pkigate")
        assert (result.exit_code == 0) is ok, result.output
        return json.loads(result.stdout)

    assert pkigate("team", "create", "web")["name"] == "web"
    assert [t["name"] for t in pkigate("team", "list")] == ["default", "web"]
    root = pkigate("ca", "create", "--type", "ROOT", "--subject", "CN=CLI Shared")
    shared = pkigate(
        "ca",
        "share",
        root["id"],
        "--team",
        "web",
        "--template",
        WEB,
        "--dns-suffix",
        ".web.example",
    )
    assert shared["version"] == 1
    (statement,) = shared["document"]["statements"]
    assert statement["principal"] == {"team": "web"}
    assert statement["conditions"] == {"templates": [WEB], "dns_suffixes": [".web.example"]}
    again = pkigate("ca", "share", root["id"], "--team", "web", "--action", "read")
    assert again["version"] == 2 and len(again["document"]["statements"]) == 1
    assert [v["version"] for v in pkigate("ca", "policy", "history", root["id"])] == [1, 2]
    bad = tmp_path / "bad.json"
    bad.write_text(
        '{"statements": [{"id": "x", "principal": {"team": "web"}, "actions": ["fly"]}]}'
    )
    refused = pkigate(
        "ca", "policy", "set", root["id"], "--file", str(bad), "--replaces", "2", ok=False
    )
    assert "statements[0].actions[0]" in refused["error"]["message"]
    token = pkigate("token", "create", "--name", "w", "--role", "issuer", "--team", "web")
    assert token["team"] == "web"
