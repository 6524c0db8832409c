"""The management API's teams and CA policies (core/access.py), on the API's registry.

Teams are made and deleted by admins of the default team (the operator's); a CA's policy is read and
set by its owning team, a PUT naming the version it replaces (409 on a stale one), every
version kept. Sharing a CA with another team is a statement of its policy.
"""

from __future__ import annotations

from typing import Any

from flask import Response, url_for

from pkigate.core.access import DEFAULT_TEAM, AccessDeniedError, Action
from pkigate.core.store import CARecord, TeamRecord
from pkigate.core.tenancy import PolicyVersion
from pkigate.gateways.api import ca_for, reply, route
from pkigate.gateways.http import actor, default_team_only, gateway, principal
from pkigate.gateways.openapi import Field, Operation, json_reply, ref, team_json
from pkigate.gateways.roles import Permission


@route(
    Operation(
        "POST",
        "/teams",
        "createTeam",
        "Create a team (token admins of the default team)",
        "Teams",
        Permission.MANAGE_TOKENS,
        (json_reply(201, "The team", ref("Team")),),
        body=(
            Field(
                "name",
                "1-64 lower-case letters, digits, '.', '_' or '-'",
                {"type": "string", "minLength": 1, "maxLength": 64},
                required=True,
            ),
        ),
        errors=(409,),
    )
)
def create_team(body: dict[str, Any]) -> Response:
    return reply(team_json(new_team(body["name"])), 201, url_for(".listTeams"))


def new_team(name: str) -> TeamRecord:
    """A team made by this request's token (the API's and the console's createTeam)."""
    default_team_only("create teams")
    return gateway().core.access.create_team(name, actor())  # type: ignore[no-any-return]


@route(
    Operation(
        "GET",
        "/teams",
        "listTeams",
        "Teams (a token of another team than the default sees its own)",
        "Teams",
        Permission.READ_CAS,
        (json_reply(200, "The teams", ref("TeamList")),),
    )
)
def list_teams() -> Response:
    return reply({"teams": [team_json(t) for t in visible_teams()]})


def visible_teams() -> list[TeamRecord]:
    """Every team for tokens of the default team, a token's own team for the others."""
    team = principal().team
    return [t for t in gateway().core.access.list_teams() if team in (DEFAULT_TEAM, t.name)]


@route(
    Operation(
        "DELETE",
        "/teams/{name}",
        "deleteTeam",
        "Delete a team (token admins of the default team); 409 naming what still depends "
        "on it: CAs it owns, live tokens, CA policies naming it. The default team stays.",
        "Teams",
        Permission.MANAGE_TOKENS,
        (json_reply(200, "What was deleted", ref("DeletedTeam")),),
        errors=(404, 409),
    )
)
def delete_team(name: str) -> Response:
    remove_team(name)
    return reply({"name": name, "deleted": True})


def remove_team(name: str) -> None:
    """Delete a team for this request's token (the API's and the console's deleteTeam):
    the core refuses (409, audited) while anything depends on it."""
    default_team_only("delete teams")
    gateway().core.access.delete_team(name, actor())


def owned_ca(ca_id: str, action: Action) -> CARecord:
    """The CA, for its owning team's tokens that may do ``action`` on it."""
    record = ca_for(ca_id, action)
    if principal().team != record.team:
        raise AccessDeniedError(
            f"the policy of CA {ca_id} is its owner's (team {record.team}) to read and set"
        )
    return record


@route(
    Operation(
        "GET",
        "/cas/{ca_id}/policy",
        "getCAPolicy",
        "The CA's current policy (version 0 and no statements: none was set)",
        "CAs",
        Permission.READ_CAS,
        (json_reply(200, "The policy", ref("CAPolicy")),),
    )
)
def get_ca_policy(ca_id: str) -> Response:
    owned_ca(ca_id, Action.READ)
    return reply(gateway().core.access.current_policy(ca_id).to_json())


@route(
    Operation(
        "PUT",
        "/cas/{ca_id}/policy",
        "setCAPolicy",
        "Replace the CA's policy; `replaces` is the version read (409 if it moved on)",
        "CAs",
        Permission.MANAGE_CAS,
        (json_reply(200, "The new policy version", ref("CAPolicy")),),
        body=(
            Field(
                "document",
                "{statements: [{id, principal: {team} or {token}, actions: [issue, revoke, "
                "read, approve-pending, manage], conditions: {templates, dns_suffixes, "
                "ip_ranges, email_domains, upn_suffixes, max_validity_days, connectors}}]}",
                {"type": "object"},
                required=True,
            ),
            Field(
                "replaces",
                "The version this replaces (0 for the first policy)",
                {"type": "integer", "minimum": 0},
                required=True,
            ),
        ),
        errors=(409,),
    )
)
def set_ca_policy(ca_id: str, body: dict[str, Any]) -> Response:
    return reply(replace_policy(ca_id, body["document"], body["replaces"]).to_json())


def replace_policy(ca_id: str, document: Any, replaces: int) -> PolicyVersion:
    """The CA's new policy version, set by its owning team (the API's and the console's
    setCAPolicy: the same checks, the same audit event)."""
    owned_ca(ca_id, Action.MANAGE)
    return gateway().core.access.set_policy(ca_id, document, replaces, actor())  # type: ignore[no-any-return]


@route(
    Operation(
        "GET",
        "/cas/{ca_id}/policy/history",
        "getCAPolicyHistory",
        "Every version of the CA's policy, oldest first",
        "CAs",
        Permission.READ_CAS,
        (json_reply(200, "The versions", ref("CAPolicyHistory")),),
    )
)
def get_ca_policy_history(ca_id: str) -> Response:
    owned_ca(ca_id, Action.READ)
    versions = gateway().core.access.policy_history(ca_id)
    return reply({"versions": [v.to_json() for v in versions]})
