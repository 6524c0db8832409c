"""`pkigate notifications create | list | show | update | delete`: destinations made
through the management API's service (gateways/destinations.py), on a local data
directory or with ``--server`` on a running server.

A secret is read from a file or an environment variable, never from the command line
(where `ps` and the shell's history would keep it), and is never printed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pkigate.core.errors import BadRequestError
from pkigate.core.events import EventType
from pkigate.gateways.cli import State, notifications, pass_state, reports_errors

if TYPE_CHECKING:
    from pkigate.gateways.config import GatewayConfig
    from pkigate.gateways.destinations import NotificationDestinations

MAX_SECRET_CHARS = 1024  # as the API's


def destination_service(state: State) -> tuple[NotificationDestinations, GatewayConfig]:
    """The service the API uses, knowing the configuration's destinations (read-only),
    and that configuration."""
    from pkigate.gateways.config import ConfigError
    from pkigate.gateways.destinations import NotificationDestinations
    from pkigate.gateways.serve import effective_config

    try:
        config = effective_config(state.config_path, state.data_dir, state.database_url, None)
    except ConfigError as exc:
        raise BadRequestError(str(exc)) from None
    return NotificationDestinations(state.core, config.notifications), config


def _service(state: State) -> NotificationDestinations:
    return destination_service(state)[0]


def _read_secret(path: Path | None, variable: str | None, what: str) -> str | None:
    if path is not None and variable is not None:
        raise BadRequestError(f"give the {what} by file or by environment variable, not both")
    if path is not None:
        value = path.read_text().strip()
    elif variable is not None:
        value = os.environ.get(variable, "")
    else:
        return None
    if not value:
        raise BadRequestError(f"the {what} is empty")
    if len(value) > MAX_SECRET_CHARS:
        raise BadRequestError(f"the {what} is over {MAX_SECRET_CHARS} characters")
    return value


_OPTIONS: list[Callable[[Any], Any]] = [
    click.option("--url", help="webhook: the http(s) URL each event is POSTed to."),
    click.option(
        "--secret-file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="webhook: a file holding the HMAC-SHA256 key (read now, sealed in the store).",
    ),
    click.option(
        "--secret-env",
        metavar="VARIABLE",
        help="webhook: an environment variable holding the HMAC-SHA256 key (read now).",
    ),
    click.option(
        "--allow-reserved-addresses/--refuse-reserved-addresses",
        default=None,
        help="webhook: post to link-local or reserved addresses all the same.",
    ),
    click.option("--smtp-host", help="email: the SMTP server."),
    click.option("--smtp-port", type=int, help="email: default 587, or 465 with --tls implicit."),
    click.option(
        "--tls", type=click.Choice(["starttls", "implicit"]), help="email: how TLS is begun."
    ),
    click.option("--from", "sender", help="email: the sender address."),
    click.option("--to", "recipients", multiple=True, help="email: a recipient (repeatable)."),
    click.option("--username", help="email: the SMTP login name."),
    click.option(
        "--password-file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="email: a file holding the SMTP password (read now, sealed in the store).",
    ),
    click.option(
        "--password-env",
        metavar="VARIABLE",
        help="email: an environment variable holding the SMTP password (read now).",
    ),
    click.option(
        "--tls-ca-file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="email: PEM certificates the SMTP server's chains to (default: the system's).",
    ),
    click.option("--timeout-seconds", type=int, help="Per attempt (default 10)."),
    click.option(
        "--max-attempts", type=int, help="Then the delivery is dead-lettered (default 8)."
    ),
    click.option(
        "--event",
        "events",
        multiple=True,
        type=click.Choice([t.value for t in EventType]),
        help="Only this event type (repeatable; none: all).",
    ),
    click.option(
        "--ca",
        "cas",
        multiple=True,
        help="Only events about this CA, id or configured name (repeatable).",
    ),
    click.option(
        "--template",
        "templates",
        multiple=True,
        help="Only certificates of this template (repeatable).",
    ),
]


def _destination_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(_OPTIONS):
        command = option(command)
    return command


def _body(options: dict[str, Any]) -> dict[str, Any]:
    """The API body of what the command line gave (an option left out is left out)."""
    body: dict[str, Any] = {
        "url": options["url"],
        "allow_reserved_addresses": options["allow_reserved_addresses"],
        "smtp_host": options["smtp_host"],
        "smtp_port": options["smtp_port"],
        "tls": options["tls"],
        "from": options["sender"],
        "username": options["username"],
        "timeout_seconds": options["timeout_seconds"],
        "max_attempts": options["max_attempts"],
        "secret": _read_secret(options["secret_file"], options["secret_env"], "secret"),
        "password": _read_secret(options["password_file"], options["password_env"], "password"),
        "tls_ca_pem": options["tls_ca_file"].read_text() if options["tls_ca_file"] else None,
    }
    for key, option in (("to", "recipients"), ("events", "events"), ("cas", "cas")):
        if options[option]:
            body[key] = list(options[option])
    if options["templates"]:
        body["templates"] = list(options["templates"])
    return {key: value for key, value in body.items() if value is not None}


def _line(view: dict[str, Any]) -> str:
    where = view["url"] or ", ".join(view["to"] or [])
    counts = view["deliveries"]
    return (
        f"{view['name']:<20} {view['type']:<8} {view['source']:<7} "
        f"dead={counts['dead']} pending={counts['pending']}  {where}"
    )


def _details(view: dict[str, Any]) -> str:
    shown = {key: value for key, value in view.items() if value not in (None, [], "")}
    shown["deliveries"] = " ".join(f"{k}={n}" for k, n in view["deliveries"].items())
    return "\n".join(
        f"{key + ':':<26}{', '.join(value) if isinstance(value, list) else value}"
        for key, value in shown.items()
    )


@notifications.command("create")
@click.argument("name")
@click.option(
    "--type",
    "kind",
    type=click.Choice(["webhook", "email"]),
    required=True,
    help="webhook (signed POSTs) or email (SMTP).",
)
@_destination_options
@pass_state
@reports_errors
def notifications_create(state: State, /, name: str, kind: str, **options: Any) -> None:
    """Make a destination NAME in the store, checked as a [[notifications]] entry is.

    \b
    Example:
      pkigate notifications create ops --type webhook \\
        --url https://hooks.example.com/pki --secret-file /etc/pkigate/ops.key \\
        --event certificate.expiring
    """
    body = {"name": name, "type": kind, **_body(options)}
    if state.remote is not None:
        view = state.remote.json("POST", "/notifications", body=body)
    else:
        view = _service(state).create(body, state.actor)
    state.emit(view, lambda: _details(view))


@notifications.command("list")
@pass_state
@reports_errors
def notifications_list(state: State) -> None:
    """Every destination, the configuration's and the store's, with delivery counts.

    \b
    Example:
      pkigate notifications --config pkigate.toml list
    """
    if state.remote is not None:
        views = state.remote.json("GET", "/notifications")["notifications"]
    else:
        views = _service(state).list()
    state.emit(views, lambda: "\n".join(_line(v) for v in views) or "no notifications")


@notifications.command("show")
@click.argument("name")
@pass_state
@reports_errors
def notifications_show(state: State, name: str) -> None:
    """One destination's settings and delivery counts (never its secret).

    \b
    Example:
      pkigate notifications show ops
    """
    from pkigate.gateways.remote import _segment

    if state.remote is not None:
        view = state.remote.json("GET", f"/notifications/{_segment(name)}")
    else:
        view = _service(state).get(name)
    state.emit(view, lambda: _details(view))


@notifications.command("update")
@click.argument("name")
@_destination_options
@click.option(
    "--reset",
    multiple=True,
    metavar="SETTING",
    help="Put this setting back to its default (repeatable), e.g. --reset events.",
)
@pass_state
@reports_errors
def notifications_update(
    state: State, /, name: str, reset: tuple[str, ...], **options: Any
) -> None:
    """Change a destination made in the store; a secret not given is kept.

    \b
    Example:
      pkigate notifications update ops --event certificate.revoked --secret-env NEW_KEY
    """
    from pkigate.gateways.remote import _segment

    body: dict[str, Any] = {key: None for key in reset}
    body.update(_body(options))
    if state.remote is not None:
        view = state.remote.json("PATCH", f"/notifications/{_segment(name)}", body=body)
    else:
        view = _service(state).update(name, body, state.actor)
    state.emit(view, lambda: _details(view))


@notifications.command("delete")
@click.argument("name")
@pass_state
@reports_errors
def notifications_delete(state: State, name: str) -> None:
    """Delete a destination made in the store; its pending deliveries are cancelled.

    \b
    Example:
      pkigate notifications delete ops
    """
    from pkigate.gateways.remote import _segment

    if state.remote is not None:
        state.remote.json("DELETE", f"/notifications/{_segment(name)}")
    else:
        _service(state).delete(name, state.actor)
    state.emit({"name": name, "deleted": True}, f"deleted notification {name}")
