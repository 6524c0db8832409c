"""The management API's OpenAPI 3.1 document, built from the route declarations themselves.

Every route in :mod:`pkigate.gateways.api` is declared once as an :class:`Operation`
(method, path, roles, body fields, query parameters, replies). That one declaration
registers the Flask view, drives the parsing of the request (unknown fields and
parameters refused, types checked) and becomes the operation in this document, so the
document cannot describe a body, parameter or role that the server does not enforce.
Routes that connectors add under ``/api/v1/connectors/<name>/`` are listed from the
running app with the roles their views require. tests/test_api.py checks that the set
of (method, path) here equals the app's, and validates real responses against the
schemas below.

This module also renders the resources whose shape it defines (certificates, tokens), so
that the API and the CLI print the same fields as the schema names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from types import MappingProxyType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pkigate.core.audit import REPORT_FIELDS
from pkigate.core.events import EventType
from pkigate.core.keys import KeyStorage
from pkigate.core.model import (
    CAStatus,
    CAType,
    CertificateStatus,
    KeyAlgorithm,
    SigningAlgorithm,
    UsageMode,
    ValidityType,
)
from pkigate.core.names import NAME_CONSTRAINT_LISTS
from pkigate.core.store import ApiTokenRecord, CertificateRecord, TeamRecord
from pkigate.core.templates import TemplateKind
from pkigate.gateways.roles import Permission, Role, roles_with

JSON = Mapping[str, Any]
API_PREFIX = "/api/v1"
SECURITY_SCHEME = "bearerToken"
_PATH_PARAMETER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_PYTHON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
    "null": (),
}


def enum_values(enum: Iterable[Any]) -> list[str]:
    return [member.value for member in enum]


def ref(name: str) -> JSON:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: JSON) -> JSON:
    kind = schema["type"]
    return {**schema, "type": [*(kind if isinstance(kind, list) else [kind]), "null"]}


def json_types(schema: JSON) -> set[str]:
    """The JSON types a schema admits (following oneOf/anyOf one level at a time)."""
    found: set[str] = set()
    kind = schema.get("type")
    if isinstance(kind, str):
        found.add(kind)
    elif isinstance(kind, list):
        found.update(kind)
    for key in ("oneOf", "anyOf"):
        for branch in schema.get(key, ()):
            found |= json_types(branch)
    return found


# -- declarations ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One member of a JSON request object.

    A leaf has a JSON Schema in ``schema``; a nested object lists its own ``fields``
    instead, so that an unknown key deep inside is refused with its full name.
    """

    name: str
    description: str
    schema: JSON | None = None
    required: bool = False
    fields: tuple[Field, ...] | None = None

    def json_schema(self) -> dict[str, Any]:
        if self.fields is not None:
            return {**object_schema(self.fields), "description": self.description}
        assert self.schema is not None, f"field {self.name} has neither schema nor fields"
        return {**self.schema, "description": self.description}

    def python_types(self) -> tuple[type, ...]:
        return self._python_types

    # Made once per field: request bodies are checked against these on every request.
    @cached_property
    def _python_types(self) -> tuple[type, ...]:
        types = {"object"} if self.fields is not None else json_types(self.json_schema())
        return tuple(t for kind in sorted(types) for t in _PYTHON_TYPES[kind])

    @cached_property
    def checked_schema(self) -> Mapping[str, Any]:
        """:meth:`json_schema`, read-only, for checking values."""
        return MappingProxyType(self.json_schema())


def object_schema(fields: Iterable[Field]) -> dict[str, Any]:
    fields = tuple(fields)
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {f.name: f.json_schema() for f in fields},
        "additionalProperties": False,
    }
    required = [f.name for f in fields if f.required]
    if required:
        schema["required"] = required
    return schema


@dataclass(frozen=True)
class Param:
    """A query parameter; scalar unless its schema is an array (then it may repeat)."""

    name: str
    description: str
    schema: JSON
    required: bool = False


@dataclass(frozen=True)
class Reply:
    """A successful response: status, description, and its body by media type."""

    status: int
    description: str
    content: Mapping[str, JSON] | None = None


def json_reply(status: int, description: str, schema: JSON) -> Reply:
    return Reply(status, description, {"application/json": schema})


@dataclass(frozen=True)
class Operation:
    """One route of the management API, as declared, parsed and documented."""

    method: str  # GET, POST, PUT, PATCH, DELETE
    path: str  # under /api/v1, with {name} placeholders
    operation_id: str  # also the Flask endpoint name
    summary: str
    tag: str
    permission: Permission | None  # what it needs (gateways/roles.py); None: no token
    replies: tuple[Reply, ...]
    body: tuple[Field, ...] | None = None
    query: tuple[Param, ...] = ()
    errors: tuple[int, ...] = ()  # statuses beyond those the declaration implies
    description: str = ""

    @property
    def roles(self) -> tuple[Role, ...]:
        """The roles that may call it; () = no token needed."""
        return roles_with(self.permission) if self.permission else ()

    @property
    def path_parameters(self) -> list[str]:
        return _PATH_PARAMETER.findall(self.path)

    @property
    def flask_rule(self) -> str:
        return _PATH_PARAMETER.sub(r"<\1>", self.path)


@dataclass(frozen=True)
class ForeignRoute:
    """A route under /api/v1 that a connector registered (it has no declaration here)."""

    method: str
    path: str
    endpoint: str
    roles: tuple[Role, ...] | None  # None: the view does not use http.requires
    description: str


def openapi_path(rule: str) -> str:
    """A Flask rule (``/cas/<ca_id>``, ``/x/<int:n>``) in OpenAPI form (``/cas/{ca_id}``)."""
    return re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule)


# -- component schemas ---------------------------------------------------------------------

_TIME = {"type": "string", "format": "date-time"}
_OPTIONAL_TIME = nullable(_TIME)
_STRING = {"type": "string"}
_OPTIONAL_STRING = nullable(_STRING)
_PEM = {"type": "string", "description": "PEM text"}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}

VALIDITY = {
    "oneOf": [
        {
            "type": "string",
            "description": "Shorthand: 30d, 6m, 10y, DAYS:30, END_DATE:20351231235959, "
            "ABSOLUTE:<unix seconds>",
            "examples": ["10y", "30d"],
        },
        {
            "type": "object",
            "properties": {
                "type": {"type": "string", "enum": enum_values(ValidityType)},
                "value": {"type": "integer", "minimum": 1},
            },
            "required": ["type", "value"],
            "additionalProperties": False,
        },
    ]
}

NAME_CONSTRAINT_FIELDS = (
    *(
        Field(name, f"{name.replace('_', ' ')} (list)", {"type": "array", "items": _STRING})
        for name in NAME_CONSTRAINT_LISTS
    ),
    Field("allow_wildcards", "Whether wildcard DNS names may be issued", {"type": "boolean"}),
)

_NOTICE_DAYS = {
    "type": "array",
    "items": {"type": "integer", "minimum": 1, "maximum": 3650},
    "maxItems": 16,
    "default": [45, 30, 7, 1],
}

SETTINGS_FIELDS = (
    Field("crl_url", "CRL distribution point put in issued certificates", _STRING),
    Field("ocsp_url", "OCSP responder URL put in issued certificates (AIA)", _STRING),
    Field("ca_issuers_url", "caIssuers URL put in issued certificates (AIA)", _STRING),
    Field(
        "name_constraints",
        "Names this CA may certify, enforced on every request",
        fields=NAME_CONSTRAINT_FIELDS,
    ),
    Field(
        "backdate_seconds",
        "How far notBefore is set in the past (clock skew)",
        {"type": "integer", "minimum": 0, "maximum": 86400},
    ),
    Field(
        "truncate_validity",
        "Cut leaf validity at the CA's notAfter instead of refusing",
        {"type": "boolean"},
    ),
    Field(
        "crl_enabled",
        "Generate and publish CRLs (default: when crl_url is set)",
        {"type": "boolean"},
    ),
    Field(
        "crl_mode",
        "One complete CRL, or partitions named in each certificate's CDP",
        {"type": "string", "enum": ["COMPLETE", "PARTITIONED"]},
    ),
    Field(
        "crl_validity_days",
        "Days between thisUpdate and nextUpdate",
        {"type": "integer", "minimum": 1, "maximum": 365},
    ),
    Field(
        "crl_partition_size",
        "Certificates per CRL partition",
        {"type": "integer", "minimum": 1, "maximum": 10_000_000},
    ),
    Field(
        "crl_regenerate_delay_seconds",
        "Delay between a revocation and the new CRL",
        {"type": "integer", "minimum": 0, "maximum": 86400},
    ),
    Field("ocsp_enabled", "Answer OCSP requests for this CA", {"type": "boolean"}),
    Field(
        "ocsp_response_validity_seconds",
        "Lifetime of a signed OCSP response",
        {"type": "integer", "minimum": 60, "maximum": 604800},
    ),
    Field(
        "expiry_notice_days",
        "Days before notAfter that certificate.expiring and ca.expiring are emitted",
        _NOTICE_DAYS,
    ),
    Field(
        "expiry_notice_days_by_template",
        "Lead times of their own for the certificates of the templates named",
        {"type": "object", "additionalProperties": _NOTICE_DAYS},
    ),
)

_SETTINGS_OUT = {
    "type": "object",
    "properties": {
        "crl_url": _OPTIONAL_STRING,
        "ocsp_url": _OPTIONAL_STRING,
        "ca_issuers_url": _OPTIONAL_STRING,
        "name_constraints": {"type": ["object", "null"]},
        "backdate_seconds": {"type": "integer"},
        "truncate_validity": {"type": "boolean"},
        "crl_enabled": {"type": "boolean"},
        "crl_mode": {"type": "string", "enum": ["COMPLETE", "PARTITIONED"]},
        "crl_validity_days": {"type": "integer"},
        "crl_partition_size": {"type": "integer"},
        "crl_regenerate_delay_seconds": {"type": "integer"},
        "ocsp_enabled": {"type": "boolean"},
        "ocsp_response_validity_seconds": {"type": "integer"},
        "expiry_notice_days": _NOTICE_DAYS,
        "expiry_notice_days_by_template": {"type": "object", "additionalProperties": _NOTICE_DAYS},
    },
}

_CA: dict[str, JSON] = {
    "id": _STRING,
    "type": {"type": "string", "enum": enum_values(CAType)},
    "status": {"type": "string", "enum": enum_values(CAStatus)},
    "subject": _STRING,
    "key_algorithm": {"type": "string", "enum": enum_values(KeyAlgorithm)},
    "signing_algorithm": {"type": "string", "enum": enum_values(SigningAlgorithm)},
    "usage_mode": {"type": "string", "enum": enum_values(UsageMode)},
    "parent_id": _OPTIONAL_STRING,
    "not_before": _OPTIONAL_TIME,
    "not_after": _OPTIONAL_TIME,
    "created_at": _TIME,
    "updated_at": _TIME,
    "restore_until": _OPTIONAL_TIME,
    "failure_reason": _OPTIONAL_STRING,
    "settings": ref("CASettings"),
    "serial": {**_OPTIONAL_STRING, "description": "The CA certificate's serial (hex)"},
    "tags": _STRING_MAP,
    "team": {**_STRING, "description": "The team that owns the CA"},
    "key_storage": {
        "type": "string",
        "enum": enum_values(KeyStorage),
        "description": "software: sealed under the KEK in the store; pkcs11: on the token",
    },
    "token_key": {
        "oneOf": [
            {"type": "null"},
            {
                "type": "object",
                "description": "Where the key is on the PKCS#11 token (the store keeps only this)",
                "properties": {
                    "token_label": _STRING,
                    "label": {**_STRING, "description": "The key's CKA_LABEL"},
                    "id": {**_STRING, "description": "The key's CKA_ID, hex"},
                },
                "required": ["token_label", "label", "id"],
            },
        ]
    },
}

_CERTIFICATE: dict[str, JSON] = {
    "ca_id": _STRING,
    "serial": {"type": "string", "description": "Lower-case hex, no leading zeros"},
    "subject": _STRING,
    "sans": {"type": "array", "items": _STRING},
    "not_before": _TIME,
    "not_after": _TIME,
    "issued_at": _TIME,
    "template": _STRING,
    "requester": _STRING,
    "connector": _STRING,
    "status": {"type": "string", "enum": enum_values(CertificateStatus)},
    "revoked_at": _OPTIONAL_TIME,
    "revocation_reason": _OPTIONAL_STRING,
    "fingerprint_sha256": _STRING,
}

_TOKEN: dict[str, JSON] = {
    "id": _STRING,
    "name": _STRING,
    "roles": {"type": "array", "items": {"type": "string", "enum": enum_values(Role)}},
    "created_at": _TIME,
    "created_by": _STRING,
    "revoked_at": _OPTIONAL_TIME,
    "expires_at": {**_OPTIONAL_TIME, "description": "null: it does not expire"},
    "last_used_at": {
        **_OPTIONAL_TIME,
        "description": "When it was last used, to the minute (null: never)",
    },
    "allow_from": {
        "type": "array",
        "items": _STRING,
        "description": "Client networks it may be used from (empty: anywhere)",
    },
    "overlap_until": {
        **_OPTIONAL_TIME,
        "description": "Until when the one replaced by the last rotation still works",
    },
    "team": {**_STRING, "description": "The team the token acts for"},
}


def _closed(properties: Mapping[str, JSON], description: str = "") -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "properties": dict(properties),
        "required": list(properties),
    }
    if description:
        schema["description"] = description
    return schema


SCHEMAS: dict[str, JSON] = {
    "Event": {
        **_closed(
            {
                "version": {"type": "integer", "const": 1},
                "id": {**_STRING, "description": "Unique (UUIDv7): de-duplicate by it"},
                "type": {"type": "string", "enum": enum_values(EventType)},
                "occurred_at": _TIME,
                "ca_id": _OPTIONAL_STRING,
                "serial": _OPTIONAL_STRING,
                "template": _OPTIONAL_STRING,
                "data": {
                    "type": "object",
                    "description": "By type: subject, sans, not_after, requester, connector "
                    "(certificates); days_before (expiring, 0 when expired); reason, "
                    "revoked_by (revoked); from, to (ca.status_changed); partition, error "
                    "(crl.publish_failed)",
                },
            },
            "What a webhook receives as its POST body (version 1), signed in the "
            "X-Pkigate-Signature header (sha256=HMAC-SHA256 of the body, hex) and named "
            "in X-Pkigate-Event-Id. Delivery is at least once.",
        ),
    },
    "StoredEvent": {
        "allOf": [ref("Event")],
        "properties": {
            "position": {"type": "integer"},
            "deliveries": {
                "type": "array",
                "items": _closed(
                    {
                        "destination": _STRING,
                        "status": {
                            "type": "string",
                            "enum": ["pending", "delivered", "dead", "cancelled"],
                        },
                        "attempts": {"type": "integer"},
                        "last_error": _OPTIONAL_STRING,
                        "updated_at": _TIME,
                    }
                ),
            },
        },
    },
    "EventPage": _closed(
        {
            "events": {"type": "array", "items": ref("StoredEvent")},
            "next_after": {
                **nullable({"type": "integer"}),
                "description": "Pass as ?after= for the next page",
            },
        }
    ),
    "Error": _closed(
        {
            "error": _closed(
                {
                    "code": {"type": "string", "description": "Stable machine-readable code"},
                    "message": _STRING,
                    "request_id": _OPTIONAL_STRING,
                }
            )
        }
    ),
    "Validity": VALIDITY,
    "CASettings": _SETTINGS_OUT,
    "CA": _closed(_CA),
    "CAList": _closed({"cas": {"type": "array", "items": ref("CA")}}),
    "CACSR": _closed({"ca_id": _STRING, "csr_pem": _PEM}),
    "CACertificate": _closed(
        {"certificate_pem": _PEM, "chain_pem": {**_PEM, "description": "Issuers, nearest first"}}
    ),
    "Tags": _closed({"tags": _STRING_MAP}),
    "CertificateSummary": _closed(_CERTIFICATE),
    "Certificate": _closed(
        {
            **_CERTIFICATE,
            "certificate_pem": _PEM,
            "chain_pem": {**_PEM, "description": "The issuing CA first, up to the root"},
        }
    ),
    "CertificatePage": _closed(
        {
            "certificates": {"type": "array", "items": ref("CertificateSummary")},
            "next": {
                **_OPTIONAL_STRING,
                "description": "URL of the next page (also in the Link header), or null",
            },
            "next_cursor": {**_OPTIONAL_STRING, "description": "Opaque; pass as ?cursor="},
        }
    ),
    "Template": _closed(
        {
            "name": _STRING,
            "kind": {"type": "string", "enum": enum_values(TemplateKind)},
            "path_length": {"type": ["integer", "null"]},
            "key_usage": {"type": ["array", "null"], "items": _STRING},
            "extended_key_usage": {"type": ["array", "null"], "items": _STRING},
            "csr_passthrough": {"type": "boolean"},
            "api_passthrough": {"type": "boolean"},
            "description": _STRING,
        }
    ),
    "TemplateList": _closed({"templates": {"type": "array", "items": ref("Template")}}),
    "AuditEvent": _closed(
        {
            "seq": {"type": "integer"},
            "event_id": _STRING,
            "at": {"type": "string", "format": "date-time"},
            "actor": _STRING,
            "connector": _STRING,
            "action": _STRING,
            "resource": _STRING,
            "parameters": {"type": "object"},
            "result": _STRING,
            "request_id": _OPTIONAL_STRING,
        }
    ),
    "AuditEventPage": _closed(
        {
            "events": {"type": "array", "items": ref("AuditEvent")},
            "next": {
                **_OPTIONAL_STRING,
                "description": "URL of the next (older) page (also in the Link header), or null",
            },
            "next_cursor": {**_OPTIONAL_STRING, "description": "Opaque; pass as ?cursor="},
        }
    ),
    "AuditVerification": _closed(
        {
            "ok": {"type": "boolean"},
            "events": {"type": "integer"},
            "problems": {
                "type": "array",
                "items": _closed(
                    {
                        "seq": {"type": "integer"},
                        "kind": {"type": "string"},
                        "detail": {"type": "string"},
                    }
                ),
            },
        }
    ),
    "AuditReport": _closed(
        {
            "ca_id": _STRING,
            "certificates": {
                "type": "array",
                "items": _closed({name: _OPTIONAL_STRING for name in REPORT_FIELDS}),
            },
        }
    ),
    "NotificationDestination": _closed(
        {
            "name": _STRING,
            "type": {"type": "string", "enum": ["webhook", "email"]},
            "source": {
                "type": "string",
                "enum": ["config", "api"],
                "description": "config: a [[notifications]] entry of the server's "
                "configuration (read-only here); api: made through this API",
            },
            "read_only": {"type": "boolean"},
            "url": _OPTIONAL_STRING,
            "allow_reserved_addresses": nullable({"type": "boolean"}),
            "smtp_host": _OPTIONAL_STRING,
            "smtp_port": nullable({"type": "integer"}),
            "tls": _OPTIONAL_STRING,
            "from": _OPTIONAL_STRING,
            "to": {"type": ["array", "null"], "items": _STRING},
            "username": _OPTIONAL_STRING,
            "tls_ca_pem": _OPTIONAL_STRING,
            "timeout_seconds": {"type": "integer"},
            "max_attempts": {"type": "integer"},
            "events": {"type": "array", "items": _STRING},
            "cas": {"type": "array", "items": _STRING},
            "templates": {"type": "array", "items": _STRING},
            "secret_set": {
                "type": "boolean",
                "description": "webhook: it has an HMAC secret (never shown)",
            },
            "password_set": {
                "type": "boolean",
                "description": "email: it has an SMTP password (never shown)",
            },
            "version": {
                **nullable({"type": "integer"}),
                "description": "One more with each change; null for the configuration's",
            },
            "created_at": _OPTIONAL_TIME,
            "created_by": _OPTIONAL_STRING,
            "updated_at": _OPTIONAL_TIME,
            "updated_by": _OPTIONAL_STRING,
            "deliveries": {
                **_closed(
                    {
                        state: {"type": "integer"}
                        for state in ("pending", "delivered", "dead", "cancelled")
                    }
                ),
                "description": "Its deliveries by state; dead: dead-lettered",
            },
        },
        "Where events are delivered: a webhook (the Event schema is its POST body) or an "
        "email address list",
    ),
    "NotificationDestinationList": _closed(
        {"notifications": {"type": "array", "items": ref("NotificationDestination")}}
    ),
    "DeletedNotification": _closed({"name": _STRING, "deleted": {"type": "boolean"}}),
    "Token": _closed(_TOKEN),
    "NewToken": _closed(
        {**_TOKEN, "secret": {"type": "string", "description": "The bearer token; shown once"}}
    ),
    "TokenList": _closed({"tokens": {"type": "array", "items": ref("Token")}}),
    "Team": _closed({"name": _STRING, "created_at": _TIME, "created_by": _STRING}),
    "TeamList": _closed({"teams": {"type": "array", "items": ref("Team")}}),
    "DeletedTeam": _closed({"name": _STRING, "deleted": {"type": "boolean"}}),
    "CAPolicy": _closed(
        {
            "ca_id": _STRING,
            "version": {"type": "integer", "description": "0: no policy was ever set"},
            "sha256": {**_OPTIONAL_STRING, "description": "SHA-256 of the canonical document"},
            "document": {
                "type": "object",
                "description": "{statements: [{id, principal: {team|token}, actions, conditions}]}",
            },
            "created_at": _OPTIONAL_TIME,
            "created_by": _OPTIONAL_STRING,
        }
    ),
    "CAPolicyHistory": _closed({"versions": {"type": "array", "items": ref("CAPolicy")}}),
}

_ERRORS = {
    400: "Malformed JSON, an unknown or mistyped field or parameter (named in the message)",
    401: "No bearer token, or one that is malformed, unknown, revoked or expired",
    403: "The token's roles may not do this (audited as api.denied), or the token is used "
    "from outside its allowed networks or holds roles kept apart (audited as token.refused)",
    404: "No such resource",
    409: "The resource's state does not allow this, or an idempotency token conflicts",
    413: "The body is over the server's max_body_bytes",
    415: "The body is not application/json",
    422: "Well formed, but the CA's or template's policy forbids it",
    503: "The key backend cannot use the CA key",
}


# -- the document ----------------------------------------------------------------------------


def _error_statuses(operation: Operation) -> list[int]:
    # Every operation refuses unknown query parameters (400); any but GET refuses a body it
    # does not expect, or one that is too large or not JSON.
    statuses = {400, *operation.errors}
    if operation.roles:
        statuses |= {401, 403}
    if operation.path_parameters:
        statuses.add(404)
    if operation.body is not None or operation.method != "GET":
        statuses |= {413, 415}
    return sorted(statuses)


def _error_reply(status: int) -> JSON:
    return {
        "description": _ERRORS.get(status, "Error"),
        "content": {"application/json": {"schema": ref("Error")}},
    }


def _security(roles: tuple[Role, ...] | None) -> list[dict[str, list[str]]]:
    # OpenAPI 3.1 (4.8.30): for non-OAuth schemes the list names the roles required.
    if roles is None:
        return [{SECURITY_SCHEME: []}]
    return [{SECURITY_SCHEME: [r.value for r in roles]}] if roles else []


def _operation(operation: Operation) -> dict[str, Any]:
    roles = ", ".join(r.value for r in operation.roles) or "none (no token needed)"
    description = (operation.description + "\n\n" if operation.description else "") + (
        f"Roles: {roles}."
    )
    document: dict[str, Any] = {
        "operationId": operation.operation_id,
        "summary": operation.summary,
        "description": description,
        "tags": [operation.tag],
        "security": _security(operation.roles),
    }
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in operation.path_parameters
    ]
    parameters += [
        {
            "name": p.name,
            "in": "query",
            "required": p.required,
            "description": p.description,
            "schema": dict(p.schema),
            **({"explode": True} if p.schema.get("type") == "array" else {}),
        }
        for p in operation.query
    ]
    if parameters:
        document["parameters"] = parameters
    if operation.body is not None:
        document["requestBody"] = {
            "required": any(f.required for f in operation.body),
            "content": {"application/json": {"schema": object_schema(operation.body)}},
        }
    responses: dict[str, Any] = {}
    for reply in operation.replies:
        entry: dict[str, Any] = {"description": reply.description}
        if reply.content:
            entry["content"] = {
                media: {"schema": dict(schema)} for media, schema in reply.content.items()
            }
        responses[str(reply.status)] = entry
    for status in _error_statuses(operation):
        responses.setdefault(str(status), _error_reply(status))
    responses["default"] = {
        "description": "Unexpected error (details only in the server log, by request id)",
        "content": {"application/json": {"schema": ref("Error")}},
    }
    document["responses"] = responses
    return document


def _foreign_operation(route: ForeignRoute) -> dict[str, Any]:
    roles = (
        ", ".join(r.value for r in route.roles) or "none"
        if route.roles is not None
        else "decided by the connector"
    )
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _PATH_PARAMETER.findall(route.path)
    ]
    document: dict[str, Any] = {
        "operationId": route.endpoint.replace(".", "_"),
        "summary": route.description or f"Connector admin resource ({route.endpoint})",
        "description": f"Added by a connector. Roles: {roles}.",
        "tags": ["Connectors"],
        "security": _security(route.roles),
        "responses": {
            "default": {
                "description": "See the connector's documentation",
                "content": {"application/json": {"schema": {}}},
            }
        },
    }
    if parameters:
        document["parameters"] = parameters
    return document


def build_document(
    operations: Iterable[Operation], foreign: Iterable[ForeignRoute] = (), version: str = ""
) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for operation in operations:
        paths.setdefault(operation.path, {})[operation.method.lower()] = _operation(operation)
    for route in foreign:
        paths.setdefault(route.path, {})[route.method.lower()] = _foreign_operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "pkigate management API",
            "version": version or "1",
            "description": "CAs, certificates, templates, audit and API tokens. "
            "Authenticate with `Authorization: Bearer pkigate_<id>_<secret>`; each "
            "operation's security requirement names the roles allowed to call it.",
        },
        "servers": [{"url": API_PREFIX}],
        "tags": [
            {"name": name}
            for name in (
                "CAs",
                "Certificates",
                "Templates",
                "Audit",
                "Events",
                "Notifications",
                "Tokens",
                "Teams",
                "Meta",
            )
        ]
        + ([{"name": "Connectors"}] if any(True for _ in foreign) else []),
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                SECURITY_SCHEME: {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "pkigate_<16 hex id>_<43 character secret>",
                }
            },
        },
    }


# -- resources in the shapes above ---------------------------------------------------------


def certificate_json(record: CertificateRecord) -> dict[str, Any]:
    """A stored certificate as ``CertificateSummary``."""

    def iso(moment: Any) -> str | None:
        return moment.isoformat() if moment else None

    return {
        "ca_id": record.ca_id,
        "serial": record.serial,
        "subject": record.subject,
        "sans": list(record.sans),
        "not_before": record.not_before.isoformat(),
        "not_after": record.not_after.isoformat(),
        "issued_at": record.issued_at.isoformat(),
        "template": record.template,
        "requester": record.requester,
        "connector": record.connector,
        "status": record.status,
        "revoked_at": iso(record.revoked_at),
        "revocation_reason": record.revocation_reason,
        "fingerprint_sha256": record.fingerprint_sha256,
    }


def certificate_pem(record: CertificateRecord) -> str:
    certificate = x509.load_der_x509_certificate(record.der)
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def token_json(record: ApiTokenRecord) -> dict[str, Any]:
    """An API token as ``Token`` (never its secret, which is not stored)."""
    return {
        "id": record.id,
        "name": record.name,
        "roles": list(record.roles),
        "created_at": record.created_at.isoformat(),
        "created_by": record.created_by,
        "revoked_at": _moment(record.revoked_at),
        "expires_at": _moment(record.expires_at),
        "last_used_at": _moment(record.last_used_at),
        "allow_from": list(record.allow_from),
        "overlap_until": _moment(record.previous_secret_until),
        "team": record.team,
    }


def team_json(record: TeamRecord) -> dict[str, Any]:
    """A team as ``Team``."""
    return {
        "name": record.name,
        "created_at": record.created_at.isoformat(),
        "created_by": record.created_by,
    }


def _moment(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None
