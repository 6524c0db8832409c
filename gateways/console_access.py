"""The console's pages for teams and CA policies, on the console's blueprint: what the API's
Teams operations and getCAPolicy / setCAPolicy do (gateways/api_access.py), through the same
functions, so a page refuses, decides and audits exactly as the API does.

A CA's access page shows its policy and every earlier version, and, for those the API lets
set it, three ways to change it: the JSON document itself, a form that shares the CA with a
team (one statement appended), and a button per statement that removes it. All three write
a new version that names the version the page was showing, so two operators editing at once
get a conflict rather than one silently undoing the other.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flask import redirect, request, url_for
from flask.typing import ResponseReturnValue

from pkigate.core.access import DEFAULT_TEAM, Action, Statement, decide
from pkigate.core.errors import BadRequestError, ConflictError, NotFoundError
from pkigate.gateways import api
from pkigate.gateways.api_access import (
    new_team,
    owned_ca,
    remove_team,
    replace_policy,
    visible_teams,
)
from pkigate.gateways.console import allowed, console, page, require_typed
from pkigate.gateways.http import (
    MalformedJson,
    default_team_only,
    gateway,
    parse_json,
    principal,
    status_for,
)
from pkigate.gateways.roles import Permission

# What the sharing form offers: every action but manage, which stays the owner's.
SHARED_ACTIONS = (Action.ISSUE, Action.REVOKE, Action.READ, Action.APPROVE_PENDING)
# Patterns typed into one field, one per line or separated by commas or spaces.
_SEPARATORS = re.compile(r"[\s,]+")
# More digits than a policy version or a day count has (a longer number is refused as the
# core refuses one out of range): int() raises ValueError past 4300 digits, a 500.
_MAX_DIGITS = 100


def whole_number(text: str) -> int | None:
    """A whole number typed into a form or the query (None: not one)."""
    return int(text) if text.isdecimal() and len(text) <= _MAX_DIGITS else None


# -- teams -----------------------------------------------------------------------------------


@console.get("/teams")
@allowed(Permission.READ_CAS)
def teams() -> str:
    """The teams the token may see, each with the CAs it owns that the token may read, and
    its active tokens for those who may list tokens (as the API's listTokens scopes them)."""
    who = principal()
    shown = visible_teams()
    owned: dict[str, list[Any]] = {}
    for view in api.readable_cas():
        owned.setdefault(view.record.team, []).append(view.record)
    tokens: dict[str, int] | None = None
    if who.may(Permission.MANAGE_TOKENS):
        tokens = {}
        for token in gateway().tokens.list():
            if token.revoked_at is None and who.team in (DEFAULT_TEAM, token.team):
                tokens[token.team] = tokens.get(token.team, 0) + 1
    return page(
        "teams.html",
        title="Teams",
        teams=shown,
        owned=owned,
        tokens=tokens,
        # Who the API lets create and delete teams; the default team is never deleted.
        may_manage=who.may(Permission.MANAGE_TOKENS) and who.team == DEFAULT_TEAM,
        default=DEFAULT_TEAM,
    )


@console.post("/teams")
@allowed(Permission.MANAGE_TOKENS)
def create_team() -> ResponseReturnValue:
    """The API's createTeam: token admins of the default team."""
    new_team(request.form.get("name", "").strip())
    return redirect(url_for("console.teams"))


@console.route("/teams/<name>/delete", methods=["GET", "POST"])
@allowed(Permission.MANAGE_TOKENS)
def delete_team(name: str) -> ResponseReturnValue:
    """A confirmation page naming the team (GET), then the API's deleteTeam (POST) once the
    operator has typed the team's name, as a CA's disabling is confirmed: a refusal shows
    the API's reason (409: the CAs, tokens and policies that still depend on it)."""
    default_team_only("delete teams")
    team = next((t for t in visible_teams() if t.name == name), None)
    if team is None:
        raise NotFoundError(f"no team named {name}")
    if request.method == "GET":
        return page("confirm_team.html", title="Delete team", team=team)
    require_typed(name, "the team's name")
    remove_team(name)
    return redirect(url_for("console.teams"))


# -- a CA's policy ---------------------------------------------------------------------------


@console.get("/cas/<ca_id>/policy")
@allowed(Permission.READ_CAS)
def ca_policy(ca_id: str) -> str:
    saved = whole_number(request.args.get("saved", ""))
    return policy_page(ca_id, saved=-1 if saved is None else saved)


def policy_page(
    ca_id: str, *, document: str | None = None, problem: str | None = None, saved: int = -1
) -> str:
    """The access page: the current policy, its history, and the editing forms for tokens
    the API would let set it (the owner's ca-admins and admins). ``document`` is the
    editor's text when it comes back refused; ``saved`` the version just written."""
    core = gateway().core
    record = owned_ca(ca_id, Action.READ)
    current = core.access.current_policy(ca_id)
    who = principal()
    editable = (
        who.may(Permission.MANAGE_CAS)
        and decide(who.facts, Action.MANAGE, core.access.facts(record)).allowed
    )
    return page(
        "ca_policy.html",
        title=f"Access to CA {record.subject}",
        record=record,
        current=current,
        statements=[StatementRow.of(s) for s in current.policy.statements],
        # Newest first, each with its document as the editor would show it.
        history=[
            (v, json.dumps(v.policy.to_json(), indent=2))
            for v in reversed(core.access.policy_history(ca_id))
        ],
        editable=editable,
        document=document
        if document is not None
        else json.dumps(current.policy.to_json(), indent=2),
        problem=problem,
        saved=saved == current.version,
        # The teams the API would list to this token: others can be typed in.
        teams=[t.name for t in visible_teams() if t.name != record.team],
        actions=[a.value for a in SHARED_ACTIONS],
        templates=[t.name for t in core.templates],
    )


@dataclass(frozen=True)
class StatementRow:
    """A statement as the page lists it; None: not limited by that condition."""

    id: str
    principal: str  # "team b" or "token <id>"
    actions: list[str]
    templates: list[str] | None
    names: list[str]  # one entry per kind of pattern: "DNS: .a.example, b.example"
    max_validity_days: int | None
    connectors: list[str] | None

    @classmethod
    def of(cls, statement: Statement) -> StatementRow:
        conditions = statement.conditions
        kinds = (
            ("DNS", conditions.dns_suffixes),
            ("IP", conditions.ip_ranges),
            ("email", conditions.email_domains),
            ("UPN", conditions.upn_suffixes),
        )
        return cls(
            id=statement.id,
            principal=statement.principal_text,
            actions=sorted(a.value for a in statement.actions),
            templates=sorted(conditions.templates) if conditions.templates is not None else None,
            names=[
                f"{kind}: {', '.join(str(p) for p in patterns)}"
                for kind, patterns in kinds
                if patterns is not None
            ],
            max_validity_days=conditions.max_validity_days,
            connectors=sorted(conditions.connectors) if conditions.connectors is not None else None,
        )


def replaces() -> int:
    version = whole_number(request.form.get("replaces", ""))
    if version is None:
        raise BadRequestError("replaces: the version the form was showing is missing")
    return version


def save(ca_id: str, build: Callable[[], tuple[Any, str]]) -> ResponseReturnValue:
    """Set the policy ``build`` makes (the document, and its text for the editor) as
    setCAPolicy does. Who may not set it is refused first, before anything about the form
    is said; a document the core refuses, or a version that moved on, comes back on the
    page with the reason and the text as it was sent."""
    owned_ca(ca_id, Action.MANAGE)
    shown = request.form.get("document")  # None: the editor shows the current document
    try:
        document, shown = build()
        version = replace_policy(ca_id, document, replaces())
    except (BadRequestError, ConflictError) as exc:
        return policy_page(ca_id, document=shown, problem=exc.message), status_for(exc)
    return redirect(url_for("console.ca_policy", ca_id=ca_id, saved=version.version))


@console.post("/cas/<ca_id>/policy")
@allowed(Permission.MANAGE_CAS)
def set_policy(ca_id: str) -> ResponseReturnValue:
    """The editor: the whole document as JSON."""

    def parsed() -> tuple[Any, str]:
        text = request.form.get("document", "")
        try:
            # The API's parser: a document nested past the recursion limit is a 400 here
            # too (json.loads raises RecursionError), and so are NULs and lone surrogates.
            return parse_json(text.encode()), text
        except MalformedJson as exc:
            raise BadRequestError(f"document: {exc}") from None

    return save(ca_id, parsed)


def edited(ca_id: str, change: Callable[[list[dict[str, Any]]], None]) -> ResponseReturnValue:
    """Save the current policy with its statements (as JSON) changed in place by
    ``change``."""

    def build() -> tuple[Any, str]:
        document = gateway().core.access.current_policy(ca_id).policy.to_json()
        change(document["statements"])
        return document, json.dumps(document, indent=2)

    return save(ca_id, build)


@console.post("/cas/<ca_id>/policy/share")
@allowed(Permission.MANAGE_CAS)
def share(ca_id: str) -> ResponseReturnValue:
    """One statement appended: the chosen team may do the chosen actions, within the
    templates, DNS suffixes and validity given (an empty field: not limited by it)."""
    form = request.form
    team = form.get("team", "")
    conditions: dict[str, Any] = {}
    if templates := form.getlist("templates"):
        conditions["templates"] = templates
    if suffixes := [s for s in _SEPARATORS.split(form.get("dns_suffixes", "")) if s]:
        conditions["dns_suffixes"] = suffixes
    if days := form.get("max_validity_days", "").strip():
        if (number := whole_number(days)) is None:
            raise BadRequestError("max validity: a whole number of days")
        conditions["max_validity_days"] = number

    def append(statements: list[dict[str, Any]]) -> None:
        taken = {s["id"] for s in statements}
        name = f"share-{team}"[:60]
        number = 1
        while (candidate := name if number == 1 else f"{name}-{number}") in taken:
            number += 1
        statements.append(
            {
                "id": candidate,
                "principal": {"team": team},
                "actions": form.getlist("actions"),
                "conditions": conditions,
            }
        )

    return edited(ca_id, append)


@console.post("/cas/<ca_id>/policy/statements/<statement_id>/remove")
@allowed(Permission.MANAGE_CAS)
def remove_statement(ca_id: str, statement_id: str) -> ResponseReturnValue:
    def remove(statements: list[dict[str, Any]]) -> None:
        kept = [s for s in statements if s["id"] != statement_id]
        if len(kept) == len(statements):
            raise ConflictError(f"the policy has no statement {statement_id} (any more)")
        statements[:] = kept

    return edited(ca_id, remove)
