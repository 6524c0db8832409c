"""`pkigate team`, `pkigate ca policy|share` and `pkigate token update`: teams, CA policies
(core/access.py) and what a token may do, on the CA host's store or, with --server,
through the management API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from pkigate.core.access import Action
from pkigate.core.errors import BadRequestError
from pkigate.gateways.auth import parse_span
from pkigate.gateways.cli import CAReference, State, ca, main, pass_state, reports_errors, token
from pkigate.gateways.openapi import team_json, token_json
from pkigate.gateways.roles import Role


@main.group()
def team() -> None:
    """Teams own CAs and hold tokens; "default" holds everything made before teams.

    \b
    Example:
      pkigate team create web
    """


@team.command("create")
@click.argument("name")
@pass_state
@reports_errors
def team_create(state: State, name: str) -> None:
    """Create a team (then give it tokens with `pkigate token create --team`).

    \b
    Example:
      pkigate team create web
    """
    if state.remote is not None:
        data = state.remote.create_team(name)
    else:
        data = team_json(state.core.access.create_team(name, state.actor))
    state.emit(data, lambda: f"team {data['name']} created")


@team.command("delete")
@click.argument("name")
@pass_state
@reports_errors
def team_delete(state: State, name: str) -> None:
    """Delete a team that nothing depends on: refused, naming why, while it owns CAs,
    has live tokens or a CA policy names it. The default team is never deleted; teams
    are not renamed (CAs, tokens and policies refer to them by name).

    \b
    Example:
      pkigate team delete web
    """
    if state.remote is not None:
        data = state.remote.delete_team(name)
    else:
        state.core.access.delete_team(name, state.actor)
        data = {"name": name, "deleted": True}
    state.emit(data, lambda: f"team {name} deleted")


@team.command("list")
@pass_state
@reports_errors
def team_list(state: State) -> None:
    """List the teams.

    \b
    Example:
      pkigate team list
    """
    if state.remote is not None:
        teams = state.remote.teams()
    else:
        teams = [team_json(t) for t in state.core.access.list_teams()]
    state.emit(teams, lambda: "\n".join(t["name"] for t in teams))


@ca.group("policy")
def policy() -> None:
    """A CA's policy: who besides its owning team may do what with it.

    \b
    Example:
      pkigate ca policy show issuing
    """


def _current(state: State, ca_id: str) -> dict[str, Any]:
    if state.remote is not None:
        return state.remote.ca_policy(ca_id)
    return state.core.access.current_policy(ca_id).to_json()


def _set(state: State, ca_id: str, document: Any, replaces: int) -> dict[str, Any]:
    if state.remote is not None:
        return state.remote.set_ca_policy(ca_id, document, replaces)
    return state.core.access.set_policy(ca_id, document, replaces, state.actor).to_json()


def _show(state: State, data: dict[str, Any]) -> None:
    state.emit(
        data,
        lambda: f"version {data['version']}\n" + json.dumps(data["document"], indent=2),
    )


@policy.command("show")
@click.argument("ca_id", type=CAReference())
@pass_state
@reports_errors
def policy_show(state: State, ca_id: str) -> None:
    """Show the CA's current policy and its version.

    \b
    Example:
      pkigate ca policy show 94872d91-8a93-41e9-a02b-d071477df881
    """
    _show(state, _current(state, ca_id))


@policy.command("set")
@click.argument("ca_id", type=CAReference())
@click.option(
    "--file",
    "path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The policy document (JSON: {statements: [...]}).",
)
@click.option(
    "--replaces",
    type=click.IntRange(min=0),
    required=True,
    help="The version this replaces (from `policy show`); refused if it moved on.",
)
@pass_state
@reports_errors
def policy_set(state: State, ca_id: str, path: Path, replaces: int) -> None:
    """Replace the CA's policy.

    \b
    Example:
      pkigate ca policy set 94872d91-8a93-41e9-a02b-d071477df881 --file p.json --replaces 0
    """
    try:
        document = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"{path} is not JSON: {exc}") from None
    _show(state, _set(state, ca_id, document, replaces))


@policy.command("history")
@click.argument("ca_id", type=CAReference())
@pass_state
@reports_errors
def policy_history(state: State, ca_id: str) -> None:
    """List every version of the CA's policy, oldest first.

    \b
    Example:
      pkigate ca policy history 94872d91-8a93-41e9-a02b-d071477df881
    """
    if state.remote is not None:
        versions = state.remote.ca_policy_history(ca_id)
    else:
        versions = [v.to_json() for v in state.core.access.policy_history(ca_id)]
    state.emit(
        versions,
        lambda: (
            "\n".join(
                f"{v['version']}  {v['created_at']}  {v['created_by']}  {v['sha256']}"
                for v in versions
            )
            or "no policy was ever set"
        ),
    )


@ca.command("share")
@click.argument("ca_id", type=CAReference())
@click.option("--team", "team_name", required=True, help="The team to share the CA with.")
@click.option(
    "--action",
    "actions",
    multiple=True,
    type=click.Choice([a.value for a in Action]),
    default=("issue", "read"),
    show_default=True,
    help="What the team may do (repeatable).",
)
@click.option("--template", "templates", multiple=True, help="A template it may use (repeatable).")
@click.option(
    "--dns-suffix",
    "dns_suffixes",
    multiple=True,
    help="DNS names it may certify: '.x.example' below x.example, 'x.example' it and below.",
)
@click.option("--ip-range", "ip_ranges", multiple=True, help="An IP CIDR range (repeatable).")
@click.option("--email-domain", "email_domains", multiple=True, help="An email domain.")
@click.option("--upn-suffix", "upn_suffixes", multiple=True, help="A UPN domain suffix.")
@click.option("--max-validity-days", type=click.IntRange(min=1), help="The longest validity.")
@click.option("--connector", "connectors", multiple=True, help="A connector it may use.")
@pass_state
@reports_errors
def ca_share(
    state: State,
    ca_id: str,
    team_name: str,
    actions: tuple[str, ...],
    templates: tuple[str, ...],
    dns_suffixes: tuple[str, ...],
    ip_ranges: tuple[str, ...],
    email_domains: tuple[str, ...],
    upn_suffixes: tuple[str, ...],
    max_validity_days: int | None,
    connectors: tuple[str, ...],
) -> None:
    """Share a CA with another team: its statement "share-TEAM" in the CA's policy is
    added or replaced (the other statements are kept).

    \b
    Example:
      pkigate ca share 94872d91-8a93-41e9-a02b-d071477df881 --team b \\
        --template EndEntityServerAuthCertificate/V1 --dns-suffix .b.example
    """
    lists = {
        "templates": templates,
        "dns_suffixes": dns_suffixes,
        "ip_ranges": ip_ranges,
        "email_domains": email_domains,
        "upn_suffixes": upn_suffixes,
        "connectors": connectors,
    }
    conditions: dict[str, Any] = {key: list(value) for key, value in lists.items() if value}
    if max_validity_days is not None:
        conditions["max_validity_days"] = max_validity_days
    current = _current(state, ca_id)
    statement_id = f"share-{team_name}"
    statements = [s for s in current["document"]["statements"] if s["id"] != statement_id]
    statements.append(
        {
            "id": statement_id,
            "principal": {"team": team_name},
            "actions": list(actions),
            "conditions": conditions,
        }
    )
    _show(state, _set(state, ca_id, {"statements": statements}, current["version"]))


@token.command("update")
@click.argument("token_id")
@click.option(
    "--role",
    "roles",
    type=click.Choice([r.value for r in Role]),
    multiple=True,
    help="Its roles from now on (repeat for several); the others it held are removed.",
)
@click.option(
    "--allow-from",
    multiple=True,
    help="A client network (CIDR) it may be used from from now on; repeat for several.",
)
@click.option("--allow-anywhere", is_flag=True, help="Let it be used from any address from now on.")
@click.option(
    "--expires-in",
    help="Expire this long from now: 90d, 12h, 30min or 3600s (at most [tokens] max_lifetime).",
)
@pass_state
@reports_errors
def token_update(
    state: State,
    token_id: str,
    roles: tuple[str, ...],
    allow_from: tuple[str, ...],
    allow_anywhere: bool,
    expires_in: str | None,
) -> None:
    """Change a token's roles, client networks or expiry; its secret stays as it is.

    \b
    Example:
      pkigate token update 3f2a9c1e0b6d4f43 --role auditor --expires-in 30d
    """
    if allow_from and allow_anywhere:
        raise BadRequestError("give --allow-from or --allow-anywhere, not both")
    networks = [] if allow_anywhere else list(allow_from) or None
    if state.remote is not None:
        body: dict[str, Any] = {"roles": list(roles) or None, "allow_from": networks}
        body["expires_in"] = expires_in
        data = state.remote.update_token(
            token_id, {key: value for key, value in body.items() if value is not None}
        )
    else:
        try:
            lifetime = parse_span(expires_in) if expires_in else None
        except ValueError as exc:
            raise BadRequestError(f"--expires-in: {exc}") from None
        record = state.tokens.update(
            token_id,
            state.actor,
            roles=[Role(r) for r in roles] or None,
            allow_from=networks,
            expires_in=lifetime,
        )
        data = token_json(record)
    state.emit(
        data,
        lambda: (
            f"token {data['id']}: roles {', '.join(data['roles'])}; "
            f"from {', '.join(data['allow_from']) or 'anywhere'}; "
            f"expires {data['expires_at'] or 'never'}"
        ),
    )
