"""The management API's notification destinations (admin): the routes under
/api/v1/notifications, registered on :mod:`pkigate.gateways.api`'s blueprint.

The body's shape (types, sizes, unknown fields) is checked by the declarations below, then
the destination by the TOML's own rules (gateways/destinations.py): a 400 names the field.
Secrets are write-only: no reply, audit record or log line carries them.
"""

from __future__ import annotations

from typing import Any

from flask import Response, url_for

from pkigate.core.events import EventType
from pkigate.gateways.api import reply, route
from pkigate.gateways.http import actor, default_team_only, gateway
from pkigate.gateways.openapi import Field, Operation, enum_values, json_reply, ref
from pkigate.gateways.roles import Permission

_TAG = "Notifications"
_NAME = {
    "type": "string",
    "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
    "maxLength": 64,
    "examples": ["ops-webhook"],
}
_SECRET = {"type": "string", "minLength": 1, "maxLength": 1024, "writeOnly": True}
_NAMES = {"type": "array", "items": {"type": "string", "maxLength": 128}, "maxItems": 100}

# Every setting of a destination; which apply depends on its type (others are refused).
SETTINGS_FIELDS = (
    Field(
        "url",
        "webhook: http:// or https:// URL to POST each event to; link-local, multicast "
        "and reserved addresses are refused unless allow_reserved_addresses",
        {"type": "string", "maxLength": 2048, "examples": ["https://hooks.example.com/pki"]},
    ),
    Field(
        "secret",
        "webhook: the HMAC-SHA256 key of the X-Pkigate-Signature header; sealed in the "
        "store, never returned (PATCH: left out, the old one is kept)",
        _SECRET,
    ),
    Field(
        "allow_reserved_addresses",
        "webhook: post to link-local or reserved addresses all the same (default false)",
        {"type": "boolean"},
    ),
    Field("smtp_host", "email: the SMTP server", {"type": "string", "maxLength": 253}),
    Field(
        "smtp_port",
        "email: default 587 (starttls) or 465 (implicit)",
        {"type": "integer", "minimum": 1, "maximum": 65535},
    ),
    Field(
        "tls",
        "email: STARTTLS (default) or implicit TLS; never in the clear",
        {"type": "string", "enum": ["starttls", "implicit"]},
    ),
    Field("from", "email: the sender address", {"type": "string", "maxLength": 320}),
    Field(
        "to",
        "email: the recipients",
        {"type": "array", "items": {"type": "string", "maxLength": 320}, "maxItems": 50},
    ),
    Field("username", "email: SMTP login name", {"type": "string", "maxLength": 256}),
    Field(
        "password",
        "email: SMTP password; sealed in the store, never returned (PATCH: left out, the "
        "old one is kept; null removes it)",
        _SECRET,
    ),
    Field(
        "tls_ca_pem",
        "email: PEM certificates the SMTP server's chains to (default: the system's)",
        {"type": "string", "maxLength": 65536},
    ),
    Field(
        "timeout_seconds",
        "Per attempt (default 10)",
        {"type": "integer", "minimum": 1, "maximum": 120},
    ),
    Field(
        "max_attempts",
        "Then the delivery is dead-lettered (default 8)",
        {"type": "integer", "minimum": 1, "maximum": 50},
    ),
    Field(
        "events",
        "Only these event types (empty: all)",
        {
            "type": "array",
            "items": {"type": "string", "enum": enum_values(EventType)},
            "maxItems": 20,
        },
    ),
    Field("cas", "Only events about these CAs (ids or configured names; empty: all)", _NAMES),
    Field("templates", "Only events about certificates of these templates (empty: all)", _NAMES),
)
CREATE_FIELDS = (
    Field("name", "Unique among the configuration's and the API's", _NAME, required=True),
    Field(
        "type", "webhook or email", {"type": "string", "enum": ["webhook", "email"]}, required=True
    ),
    *SETTINGS_FIELDS,
)


@route(
    Operation(
        "POST",
        "/notifications",
        "createNotification",
        "Create a webhook or email destination for events",
        _TAG,
        Permission.MANAGE_NOTIFICATIONS,
        (json_reply(201, "The destination (without its secret)", ref("NotificationDestination")),),
        body=CREATE_FIELDS,
        errors=(409,),
        description="Checked as a [[notifications]] entry of the configuration is; its "
        "dispatcher starts at the newest event. A name the configuration uses is a 409.",
    )
)
def create_notification(body: dict[str, Any]) -> Response:
    default_team_only("create notification destinations")
    created = gateway().destinations.create(body, actor())
    location = url_for(".getNotification", name=created["name"])
    return reply(created, 201, location)


@route(
    Operation(
        "GET",
        "/notifications",
        "listNotifications",
        "Every destination, the configuration's (read-only) and the API's, with delivery counts",
        _TAG,
        Permission.MANAGE_NOTIFICATIONS,
        (json_reply(200, "By name", ref("NotificationDestinationList")),),
    )
)
def list_notifications() -> Response:
    default_team_only("see notification destinations")
    return reply({"notifications": gateway().destinations.list()})


@route(
    Operation(
        "GET",
        "/notifications/{name}",
        "getNotification",
        "One destination with its delivery counts",
        _TAG,
        Permission.MANAGE_NOTIFICATIONS,
        (json_reply(200, "The destination", ref("NotificationDestination")),),
    )
)
def get_notification(name: str) -> Response:
    default_team_only("see notification destinations")
    return reply(gateway().destinations.get(name))


@route(
    Operation(
        "PATCH",
        "/notifications/{name}",
        "updateNotification",
        "Change a destination made through the API (null: back to the default)",
        _TAG,
        Permission.MANAGE_NOTIFICATIONS,
        (
            json_reply(
                200, "The destination, its version one higher", ref("NotificationDestination")
            ),
        ),
        body=SETTINGS_FIELDS,
        errors=(409,),
        description="The result is checked as a new destination would be. Every worker "
        "uses it from its next poll. The configuration's destinations are a 409.",
    )
)
def update_notification(name: str, body: dict[str, Any]) -> Response:
    default_team_only("change notification destinations")
    return reply(gateway().destinations.update(name, body, actor()))


@route(
    Operation(
        "DELETE",
        "/notifications/{name}",
        "deleteNotification",
        "Delete a destination made through the API; its pending deliveries are cancelled",
        _TAG,
        Permission.MANAGE_NOTIFICATIONS,
        (json_reply(200, "What was deleted", ref("DeletedNotification")),),
        errors=(409,),
    )
)
def delete_notification(name: str) -> Response:
    default_team_only("delete notification destinations")
    gateway().destinations.delete(name, actor())
    return reply({"name": name, "deleted": True})
