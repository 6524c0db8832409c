"""Granting roles (issue 20): a token gives a token, new or changed, only roles it holds
itself, ``admin`` any (to another token); the local CLI gives any. Every caller against
every role, through the API, and the console's tokens page on the same path."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from test_access import _console_client
from test_api import Service, _open_service

from pkigate.core.audit import Actor
from pkigate.gateways.auth import Role
from pkigate.gateways.cli import main

ROLES = [r.value for r in Role]
# Who may give which role, written out (not computed from gateways/roles.py): single-role
# callers without tokens:manage give nothing (the role check refuses them first).
GRANTS: dict[tuple[str, ...], frozenset[str]] = {
    ("admin",): frozenset(ROLES),
    ("token-admin",): frozenset({"token-admin"}),
    ("token-admin", "issuer"): frozenset({"token-admin", "issuer", "revoker"}),
    ("token-admin", "auditor"): frozenset({"token-admin", "auditor"}),
    ("token-admin", "ca-admin", "ca-deleter"): frozenset({"token-admin", "ca-admin", "ca-deleter"}),
    **{
        (role,): frozenset()
        for role in ("ca-admin", "ca-deleter", "issuer", "revoker", "approver", "auditor")
    },
}
START = "approver"  # what each changed token holds before: keeping it is no grant


@pytest.fixture(scope="module")
def granting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    service = _open_service(tmp_path_factory.mktemp("grants"), None)
    for roles in GRANTS:
        created = service.gw.tokens.create("+".join(roles), [Role(r) for r in roles], Actor("t"))
        service.secrets["+".join(roles)] = created.secret
    yield service
    service.gw.close()


def _manages(caller: tuple[str, ...]) -> bool:
    return bool({"admin", "token-admin"} & set(caller))


def _by_request(service: Service) -> dict[str, list[Any]]:
    """The audit records, by request (read once per table: the log grows with it)."""
    found: dict[str, list[Any]] = {}
    for event in service.gw.core.audit.events():
        found.setdefault(event.request_id or "", []).append(event)
    return found


def _check_audit(
    records: list[Any], response: Any, caller: tuple[str, ...], role: str, success: str
) -> None:
    """A success leaves one ``success`` record; a refusal one api.denied naming the role
    (or, for a caller that manages no tokens, what it lacks), and its 403 says so."""
    if response.status_code < 400:
        assert [e.action for e in records] == [success]
        return
    assert response.status_code == 403, response.get_data(as_text=True)
    message = response.get_json()["error"]["message"]
    (denial,) = records
    assert denial.action == "api.denied"
    parameters = json.loads(denial.parameters)
    if _manages(caller):
        assert f"may not grant {role}:" in message
        assert parameters["refused"] == [role] and parameters["roles"] == list(caller)
    else:
        assert "tokens:manage" in message and parameters["needs"] == "tokens:manage"


def test_each_role_creates_tokens_of_exactly_the_roles_it_may_grant(granting: Service) -> None:
    responses = {}
    for caller in GRANTS:
        for role in ROLES:
            body = {"name": f"new-{'+'.join(caller)}-{role}", "roles": [role]}
            responses[caller, role] = granting.call("POST", "/tokens", "+".join(caller), json=body)
    assert {case: r.status_code for case, r in responses.items()} == {
        (caller, role): 201 if role in GRANTS[caller] else 403
        for caller in GRANTS
        for role in ROLES
    }
    made = {t.name: t.roles for t in granting.gw.tokens.list() if t.name.startswith("new-")}
    assert made == {
        f"new-{'+'.join(caller)}-{role}": (role,)
        for (caller, role), response in responses.items()
        if response.status_code == 201
    }
    audit = _by_request(granting)
    for (caller, role), response in responses.items():
        records = audit[response.headers["X-Request-Id"]]
        _check_audit(records, response, caller, role, "token.create")


def test_each_role_gives_an_existing_token_exactly_the_roles_it_may_grant(
    granting: Service,
) -> None:
    responses, targets = {}, {}
    for caller in GRANTS:
        for role in ROLES:
            target = granting.gw.tokens.create("changed", Role(START), Actor("t")).record.id
            body = {"roles": [START, role]}
            targets[caller, role] = target
            responses[caller, role] = granting.call(
                "PATCH", f"/tokens/{target}", "+".join(caller), json=body
            )
    # Keeping a role the token holds is no grant.
    assert {case: r.status_code for case, r in responses.items()} == {
        (caller, role): 200 if _manages(caller) and role in GRANTS[caller] | {START} else 403
        for caller in GRANTS
        for role in ROLES
    }
    held = {t.id: set(t.roles) for t in granting.gw.tokens.list()}
    audit = _by_request(granting)
    for (caller, role), response in responses.items():
        changed = response.status_code == 200
        assert held[targets[caller, role]] == ({START, role} if changed else {START})
        records = audit[response.headers["X-Request-Id"]]
        _check_audit(records, response, caller, role, "token.update")


def test_each_role_rotates_exactly_the_tokens_whose_roles_it_may_grant_and_its_own(
    granting: Service,
) -> None:
    """A rotation hands the new secret to the caller: judged as making that token."""
    responses, targets = {}, {}
    for caller in GRANTS:
        for role in ROLES:
            target = granting.gw.tokens.create("rotated", Role(role), Actor("t"))
            targets[caller, role] = target
            responses[caller, role] = granting.call(
                "POST", f"/tokens/{target.record.id}/rotate", "+".join(caller), json={}
            )
    assert {case: r.status_code for case, r in responses.items()} == {
        (caller, role): 200 if role in GRANTS[caller] else 403
        for caller in GRANTS
        for role in ROLES
    }
    audit = _by_request(granting)
    for (caller, role), response in responses.items():
        records = audit[response.headers["X-Request-Id"]]
        _check_audit(records, response, caller, role, "token.rotate")
        if response.status_code == 403:  # the old secret is still the one
            secret = targets[caller, role].secret
            assert granting.gw.tokens.authenticate(f"Bearer {secret}").roles == (Role(role),)
    own = granting.gw.tokens.authenticate(f"Bearer {granting.secrets['token-admin']}").token_id
    mine = granting.call("POST", f"/tokens/{own}/rotate", "token-admin", json={}, expect=200)
    granting.secrets["token-admin"] = mine.get_json()["secret"]


def test_a_refusal_names_only_the_roles_refused_and_a_token_admin_still_tends_any_token(
    granting: Service,
) -> None:
    body = {"name": "mixed", "roles": ["issuer", "admin", "approver"]}
    mixed = granting.call("POST", "/tokens", "token-admin+issuer", json=body, expect=403)
    message = mixed.get_json()["error"]["message"]
    assert "may not grant admin, approver:" in message and "issuer," not in message
    # Changes that give nothing: networks, expiry, a role taken away, on a token it
    # could not have made.
    admin = granting.gw.tokens.create("tended", (Role.ADMIN, Role.AUDITOR), Actor("t")).record.id
    body = {"allow_from": ["127.0.0.0/8"], "expires_in": "10d", "roles": ["admin"]}
    tended = granting.call("PATCH", f"/tokens/{admin}", "token-admin", json=body, expect=200)
    assert tended.get_json()["roles"] == ["admin"]
    assert tended.get_json()["allow_from"] == ["127.0.0.0/8"]


def test_an_admin_gives_any_role_to_another_token_but_not_to_itself(granting: Service) -> None:
    own = granting.gw.tokens.authenticate(f"Bearer {granting.secrets['admin']}").token_id
    body = {"roles": ["admin", "issuer"]}
    raised = granting.call("PATCH", f"/tokens/{own}", "admin", json=body, expect=403)
    assert "may not grant issuer:" in raised.get_json()["error"]["message"]
    (record,) = [t for t in granting.gw.tokens.list() if t.id == own]
    assert record.roles == ("admin",)


def test_the_console_refuses_what_the_api_refuses(granting: Service) -> None:
    client = _console_client(granting, granting.secrets["token-admin"])
    listing = client.get("/console/tokens").get_data(as_text=True)
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', listing)
    assert csrf is not None
    form = {"csrf_token": csrf.group(1), "name": "console-admin", "roles": "admin"}
    refused = client.post("/console/tokens", data=form)
    assert refused.status_code == 403
    assert "may not grant admin:" in refused.get_data(as_text=True)
    assert not [t for t in granting.gw.tokens.list() if t.name == "console-admin"]
    events = granting.gw.core.audit.events()
    assert events[-1].action == "api.denied" and events[-1].resource == "tokens"
    form["name"], form["roles"] = "console-token-admin", "token-admin"
    assert client.post("/console/tokens", data=form).status_code == 200


def test_the_local_cli_is_the_operator_and_gives_any_role(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main,
        [
            "--data-dir",
            str(tmp_path / "home"),
            "--json",
            "token",
            "create",
            "--name",
            "first",
            "--role",
            "admin",
            "--role",
            "issuer",
        ],
        prog_name="pkigate",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["roles"] == ["admin", "issuer"]
