"""The management REST API under /api/v1: the CLI's verbs as resources, behind role tokens.

Roles separate duties: each operation needs one permission, and gateways/roles.py says
which roles grant it (``ca-admin`` creates and changes CAs, ``ca-deleter`` deletes them,
``issuer`` issues, ``revoker`` revokes, ``auditor`` reads the audit log, ``admin`` holds
every administrative power...). Each route is declared once as an
:class:`~pkigate.gateways.openapi.Operation`; :func:`route` turns the declaration into the
Flask view (authentication, role check, strict parsing of the body and query) and into
the operation of the OpenAPI document served at /api/v1/openapi.json.

Mutations go through the core with the token's identity (``http.actor()``), so the core
audits them; refusals by role are audited by ``http.requires``. Input is parsed at this
edge: an unknown field or parameter, a wrong type or value is a 400 that names it, before
anything is changed.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from functools import wraps
from importlib import metadata
from typing import Any, TypeVar
from urllib.parse import urlencode

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from flask import Blueprint, Response, current_app, g, jsonify, request, url_for

from pkigate.core import (
    CASettings,
    CASpec,
    CAStatus,
    CAType,
    IssuanceRequest,
    KeyAlgorithm,
    Requester,
    SigningAlgorithm,
    UsageMode,
    Validity,
    ValidityType,
)
from pkigate.core.access import DEFAULT_TEAM, Action, RequestFacts, decide
from pkigate.core.audit import render_report, report_rows
from pkigate.core.authorities import CAView
from pkigate.core.errors import BadRequestError, NotAuthorizedError, NotFoundError, PkigateError
from pkigate.core.events import EventType
from pkigate.core.keys import KeyStorage
from pkigate.core.model import CertificateStatus, RevocationReason
from pkigate.core.names import parse_dn
from pkigate.core.passthrough import parse_api_passthrough
from pkigate.core.readable import UNREADABLE
from pkigate.core.store import (
    ApiTokenRecord,
    AuditEventRecord,
    AuditScope,
    CARecord,
    CertificateRecord,
    CertificateScope,
    Store,
)
from pkigate.core.store.engine import MAX_POSITION
from pkigate.core.templates import Template
from pkigate.core.templates import describe as describe_template
from pkigate.gateways import metrics
from pkigate.gateways.auth import ForbiddenError, Principal, parse_networks, parse_span
from pkigate.gateways.http import (
    UnsupportedMediaType,
    actor,
    authorize_on_ca,
    gateway,
    json_body,
    principal,
    requires,
)
from pkigate.gateways.openapi import (
    API_PREFIX,
    SETTINGS_FIELDS,
    VALIDITY,
    Field,
    ForeignRoute,
    Operation,
    Param,
    Reply,
    build_document,
    certificate_json,
    certificate_pem,
    enum_values,
    json_reply,
    json_types,
    openapi_path,
    ref,
    token_json,
)
from pkigate.gateways.roles import LEGACY_ROLES, Permission, Role, parse_roles

api = Blueprint("api", __name__)

# Every declared operation, in declaration order: the OpenAPI document is built from this.
OPERATIONS: list[Operation] = []

# Tags under this prefix are how the gateway finds the CAs its configuration names
# (runtime.CONFIG_NAME_TAG); changing them remotely would make the next start create new
# CAs, so the API leaves them alone.
RESERVED_TAG_PREFIX = "pkigate:"
API_CONNECTOR = "api"
MAX_PAGE = 1000
_CURSOR = re.compile(r"^after:(\d{1,18})$")

View = Callable[..., Response]
T = TypeVar("T")


# -- declaration -> view ---------------------------------------------------------------------


def route(operation: Operation) -> Callable[[View], View]:
    """Register ``view`` for ``operation``: token and role first, then query, then body."""

    def register(view: View) -> View:
        @wraps(view)
        def handle(**path: str) -> Response:
            arguments: dict[str, Any] = dict(path)
            query = parse_query(operation.query)
            if operation.query:
                arguments["query"] = query
            if operation.body is not None:
                arguments["body"] = parse_body(operation.body)
            elif request.content_length:
                refuse_body()
            return view(**arguments)

        endpoint = requires(operation.permission)(handle) if operation.permission else handle
        api.add_url_rule(
            operation.flask_rule, operation.operation_id, endpoint, methods=[operation.method]
        )
        OPERATIONS.append(operation)
        return view

    return register


def refuse_body() -> None:
    """A body where none belongs: 415 if it is not JSON, else 400 naming its fields."""
    try:
        json_body({})
    except UnsupportedMediaType:
        raise
    except BadRequestError as exc:
        # json_body would go on to list the allowed fields, and here there are none.
        detail = exc.message.partition("; allowed")[0]
        raise BadRequestError(f"this request takes no body: {detail}") from None


def reply(data: Any, status: int = 200, location: str | None = None) -> Response:
    response = jsonify(data)
    response.status_code = status
    if location:
        response.headers["Location"] = location
    return response


# -- parsing at the edge ---------------------------------------------------------------------


@contextmanager
def field_errors(name: str, kind: str = "field") -> Iterator[None]:
    """Name the field in a parse error raised by the core, which does not know it."""
    try:
        yield
    except BadRequestError as exc:
        detail = exc.message.removeprefix(f"{name}: ")
        raise type(exc)(f"{kind} {name!r}: {detail}") from None


def parse_body(fields: tuple[Field, ...]) -> dict[str, Any]:
    """The JSON body checked against its declared fields (http.json_body does 415/400)."""
    body = json_body(
        {f.name: f.python_types() for f in fields}, tuple(f.name for f in fields if f.required)
    )
    return _check_object(body, fields, "")


def _type_names(schema: Mapping[str, Any]) -> str:
    return " or ".join(sorted(json_types(schema) - {"null"}))


def _check_object(data: Mapping[str, Any], fields: tuple[Field, ...], where: str) -> dict[str, Any]:
    """Refuse unknown keys and wrong types, recursively; fill in declared defaults.

    An explicit ``null`` stays ``None`` so that PATCH can reset a setting to its default.
    """
    known = {f.name: f for f in fields}
    for key in data:
        if key not in known:
            allowed = ", ".join(sorted(known)) or "none"
            raise BadRequestError(f"unknown field {where + key!r}; allowed: {allowed}")
    result: dict[str, Any] = {}
    for field in fields:
        name = where + field.name
        schema = field.checked_schema
        if data.get(field.name) is None:
            if field.required:
                raise BadRequestError(f"field {name!r} is required")
            if "default" in schema:
                result[field.name] = schema["default"]
            elif field.name in data:
                result[field.name] = None
            continue
        value = data[field.name]
        types = field.python_types()
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise BadRequestError(f"field {name!r} must be {_type_names(schema)}")
        if field.fields is not None and isinstance(value, dict):
            value = _check_object(value, field.fields, name + ".")
        else:
            _check_leaf(name, schema, value)
        result[field.name] = value
    return result


def _check_leaf(name: str, schema: Mapping[str, Any], value: Any) -> None:
    """Enforce the constraints the document declares (enum, bounds, element types)."""
    if "enum" in schema and value not in schema["enum"]:
        raise BadRequestError(
            f"field {name!r} must be one of {', '.join(map(str, schema['enum']))}, not {value!r}"
        )
    if isinstance(value, int) and not isinstance(value, bool):
        low, high = schema.get("minimum"), schema.get("maximum")
        if (low is not None and value < low) or (high is not None and value > high):
            raise BadRequestError(f"field {name!r} must be {_bounds(low, high)}, not {value}")
    if isinstance(value, str):
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise BadRequestError(f"field {name!r} is over {schema['maxLength']} characters")
        if len(value) < schema.get("minLength", 0):
            raise BadRequestError(f"field {name!r} must not be empty")
    if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), Mapping):
        for key, item in value.items():
            if not isinstance(item, str):
                raise BadRequestError(f"field {name + '.' + key!r} must be a string")
    if isinstance(value, list):
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            raise BadRequestError(f"field {name!r} has over {schema['maxItems']} items")
        items = schema.get("items")
        if isinstance(items, Mapping) and items.get("type") == "string":
            for index, item in enumerate(value):
                if not isinstance(item, str):
                    raise BadRequestError(f"field {name}[{index}] must be a string")
                _check_leaf(f"{name}[{index}]", items, item)


def _bounds(low: int | None, high: int | None) -> str:
    """A number's declared range in words (a field may declare one end only)."""
    if high is None:
        return f"at least {low}"
    if low is None:
        return f"at most {high}"
    return f"from {low} to {high}"


def parse_query(params: tuple[Param, ...]) -> dict[str, Any]:
    """Query parameters by their declarations; unknown or repeated ones are refused."""
    known = {p.name: p for p in params}
    for name in request.args:
        if name not in known:
            allowed = ", ".join(sorted(known)) or "none"
            raise BadRequestError(f"unknown query parameter {name!r}; allowed: {allowed}")
    values: dict[str, Any] = {}
    for param in params:
        raw = request.args.getlist(param.name)
        if not raw:
            if param.required:
                raise BadRequestError(f"query parameter {param.name!r} is required")
            values[param.name] = param.schema.get("default")
        elif param.schema.get("type") == "array":
            values[param.name] = [
                _query_scalar(param.name, param.schema.get("items", {}), v) for v in raw
            ]
        elif len(raw) > 1:
            raise BadRequestError(f"query parameter {param.name!r} is given more than once")
        else:
            values[param.name] = _query_scalar(param.name, param.schema, raw[0])
    return values


_POSITION = {"type": "integer", "minimum": 0, "maximum": MAX_POSITION}


def query_position(name: str, text: str) -> int:
    """A paging position from the query (the console's ``after``/``before``); a 400
    naming ``name`` unless it is a whole number a store can hold."""
    return int(_query_scalar(name, _POSITION, text))


_QUERY_INTEGER = re.compile(r"-?[0-9]{1,19}")


def _query_scalar(name: str, schema: Mapping[str, Any], text: str) -> Any:
    kind = schema.get("type", "string")
    if kind == "integer":
        low, high = schema.get("minimum"), schema.get("maximum")
        # ASCII digits only: int() also takes spaces, underscores and any script's digits.
        number = int(text) if _QUERY_INTEGER.fullmatch(text) else None
        if (
            number is None
            or (low is not None and number < low)
            or (high is not None and number > high)
        ):
            raise BadRequestError(
                f"query parameter {name!r} must be an integer {_bounds(low, high)}, not {text!r}"
            )
        return number
    if kind == "boolean":
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise BadRequestError(f"query parameter {name!r} must be true or false, not {text!r}")
    if not text:
        raise BadRequestError(f"query parameter {name!r} must not be empty")
    if "enum" in schema and text not in schema["enum"]:
        raise BadRequestError(
            f"query parameter {name!r} must be one of {', '.join(schema['enum'])}, not {text!r}"
        )
    return text


def parse_validity(value: str | Mapping[str, Any], name: str) -> Validity:
    """``"10y"`` or ``{"type": "DAYS", "value": 30}``."""
    if isinstance(value, str):
        with field_errors(name):
            return Validity.parse(value)
    unknown = sorted(set(value) - {"type", "value"})
    if unknown:
        raise BadRequestError(f"unknown field {name + '.' + unknown[0]!r}; allowed: type, value")
    kind, amount = value.get("type"), value.get("value")
    if kind not in enum_values(ValidityType):
        raise BadRequestError(
            f"field {name + '.type'!r} must be one of {', '.join(enum_values(ValidityType))}"
        )
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise BadRequestError(f"field {name + '.value'!r} must be integer")
    with field_errors(name):
        return Validity(ValidityType(kind), amount)


def parse_duration(text: str, name: str) -> timedelta:
    """``30d``, ``6m``, ``1y``: a span counted from now."""
    with field_errors(name, "query parameter"):
        validity = Validity.parse(text)
    if validity.type not in (ValidityType.DAYS, ValidityType.MONTHS, ValidityType.YEARS):
        raise BadRequestError(f"query parameter {name!r} must be a span like 30d, not {text!r}")
    now: datetime = gateway().core.clock()
    return validity.not_after(now) - now


def normalize_serial(serial: str) -> str:
    """Hex as the store keeps it: lower case, no colons, no ``0x``, no leading zeros."""
    cleaned = serial.replace(":", "").strip().lower().removeprefix("0x").lstrip("0") or "0"
    if not re.fullmatch(r"[0-9a-f]{1,40}", cleaned):
        raise BadRequestError(f"serial {serial!r} is not hexadecimal")
    return cleaned


def encode_cursor(row_id: int) -> str:
    return base64.urlsafe_b64encode(f"after:{row_id}".encode()).rstrip(b"=").decode()


def decode_cursor(cursor: str | None) -> int:
    if cursor is None:
        return 0
    try:
        text = base64.b64decode(cursor + "=" * (-len(cursor) % 4), b"-_", validate=True)
        match = _CURSOR.match(text.decode())
    except ValueError:  # not base64 (binascii.Error), not ASCII, not UTF-8 inside
        match = None
    if match is None:
        raise BadRequestError("query parameter 'cursor' is not one this server handed out")
    return int(match.group(1))


def checked_tags(tags: Mapping[str, str], name: str) -> dict[str, str]:
    for key in tags:
        if key.startswith(RESERVED_TAG_PREFIX):
            raise BadRequestError(
                f"field {name + '.' + key!r}: tag keys starting with "
                f"{RESERVED_TAG_PREFIX!r} are reserved for the gateway"
            )
    return dict(tags)


def checked_settings(settings: Mapping[str, Any] | None) -> CASettings:
    """Settings with nulls meaning the default, checked by the core."""
    present = {k: v for k, v in (settings or {}).items() if v is not None}
    with field_errors("settings"):
        return CASettings.from_json(present)


# -- CAs -------------------------------------------------------------------------------------

_STRING = {"type": "string"}
_DATE_TIME = {"type": "string", "format": "date-time", "examples": ["2026-12-01T00:00:00Z"]}
_TOKEN_FIELD = {"type": "string", "minLength": 1, "maxLength": 128}
_TAGS = {"type": "object", "additionalProperties": {"type": "string"}}
_CA_ID = "The CA's id"

CA_CREATE_FIELDS = (
    Field(
        "type",
        "ROOT (self-signed) or SUBORDINATE",
        {"type": "string", "enum": enum_values(CAType)},
        required=True,
    ),
    Field(
        "subject",
        "RFC 4514 distinguished name",
        {"type": "string", "examples": ["CN=Example Root,O=Example"]},
        required=True,
    ),
    Field(
        "key_algorithm",
        "The CA key's algorithm",
        {"type": "string", "enum": enum_values(KeyAlgorithm), "default": "EC_prime256v1"},
    ),
    Field(
        "key_storage",
        "software (sealed under the KEK) or pkcs11 (generated on the gateway's [pkcs11] "
        "token, never leaving it)",
        {"type": "string", "enum": enum_values(KeyStorage), "default": "software"},
    ),
    Field(
        "signing_algorithm",
        "Default: SHA-2 of the key's size with the key's family",
        {"type": "string", "enum": enum_values(SigningAlgorithm)},
    ),
    Field(
        "usage_mode",
        "SHORT_LIVED_CERTIFICATE caps leaves at 7 days",
        {"type": "string", "enum": enum_values(UsageMode), "default": "GENERAL_PURPOSE"},
    ),
    Field("validity", "Default 10y for a ROOT, 5y (within the parent) otherwise", VALIDITY),
    Field(
        "parent_id",
        "Sign the new SUBORDINATE with this pkigate CA; without it the CA waits in "
        "PENDING_CERTIFICATE for a certificate signed elsewhere",
        _STRING,
    ),
    Field(
        "path_length",
        "pathLenConstraint of the CA certificate",
        {"type": "integer", "minimum": 0, "maximum": 3},
    ),
    Field("settings", "What the CA puts in the certificates it issues", fields=SETTINGS_FIELDS),
    Field("tags", "Key/value labels (keys 'pkigate:*' are reserved)", _TAGS),
    Field(
        "idempotency_token",
        "The same token with the same body within 5 minutes returns the same CA",
        _TOKEN_FIELD,
    ),
    Field(
        "team",
        "The team that will own the CA (default: the token's; another team only for "
        "admins of the default team)",
        _STRING,
    ),
)


@route(
    Operation(
        "POST",
        "/cas",
        "createCA",
        "Create a ROOT or SUBORDINATE CA",
        "CAs",
        Permission.CREATE_CAS,
        (json_reply(201, "The CA (the earlier one on an idempotent repeat)", ref("CA")),),
        body=CA_CREATE_FIELDS,
        errors=(404, 409, 422, 503),
    )
)
def create_ca(body: dict[str, Any]) -> Response:
    with field_errors("subject"):
        subject = parse_dn(body["subject"])
    signing = body.get("signing_algorithm")
    spec = CASpec(
        type=CAType(body["type"]),
        subject=subject,
        key_algorithm=KeyAlgorithm(body["key_algorithm"]),
        signing_algorithm=SigningAlgorithm(signing) if signing else None,
        usage_mode=UsageMode(body["usage_mode"]),
        validity=parse_validity(body["validity"], "validity") if body.get("validity") else None,
        parent_ca_id=body.get("parent_id"),
        path_length=body.get("path_length"),
        settings=checked_settings(body.get("settings")),
        tags=checked_tags(body.get("tags") or {}, "tags"),
        key_storage=KeyStorage(body["key_storage"]),
        team=acting_for_team(body.get("team")),
    )
    if spec.parent_ca_id:
        ca_for(spec.parent_ca_id, Action.MANAGE)
    view = gateway().core.authorities.create(spec, actor(), body.get("idempotency_token"))
    return reply(view.to_json(), 201, url_for(".getCA", ca_id=view.record.id))


@route(
    Operation(
        "GET",
        "/cas",
        "listCAs",
        "List CAs with their status and expiry",
        "CAs",
        Permission.READ_CAS,
        (json_reply(200, "The CAs", ref("CAList")),),
        query=(
            Param(
                "status",
                "Only CAs in this state",
                {"type": "string", "enum": enum_values(CAStatus)},
            ),
        ),
    )
)
def list_cas(query: dict[str, Any]) -> Response:
    status = CAStatus(query["status"]) if query["status"] else None
    return reply({"cas": [v.to_json() for v in readable_cas(status)]})


def readable_cas(status: CAStatus | None = None) -> list[CAView]:
    """The CAs the token may read (the API's and the console's listings)."""
    core = gateway().core
    who = principal().facts
    return [
        v
        for v in core.authorities.list_cas(status)
        if decide(who, Action.READ, core.access.facts(v.record)).allowed
    ]


@route(
    Operation(
        "GET",
        "/cas/{ca_id}",
        "getCA",
        "Describe one CA",
        "CAs",
        Permission.READ_CAS,
        (json_reply(200, "The CA", ref("CA")),),
    )
)
def get_ca(ca_id: str) -> Response:
    ca_for(ca_id, Action.READ)
    return reply(gateway().core.authorities.describe(ca_id).to_json())


@route(
    Operation(
        "GET",
        "/cas/{ca_id}/csr",
        "getCACSR",
        "A SUBORDINATE CA's CSR, for signing by an outside parent",
        "CAs",
        Permission.READ_CAS,
        (json_reply(200, "The CSR", ref("CACSR")),),
        errors=(409,),
    )
)
def get_ca_csr(ca_id: str) -> Response:
    ca_for(ca_id, Action.READ)
    return reply({"ca_id": ca_id, "csr_pem": gateway().core.authorities.csr_pem(ca_id)})


@route(
    Operation(
        "POST",
        "/cas/{ca_id}/certificate",
        "importCACertificate",
        "Install a CA certificate signed elsewhere (bring your own parent)",
        "CAs",
        Permission.CREATE_CAS,
        (json_reply(200, "The CA, now ACTIVE", ref("CA")),),
        body=(
            Field("certificate_pem", "The CA's certificate (PEM)", _STRING, required=True),
            Field(
                "chain_pem",
                "The issuers, the direct issuer first, up to the root (PEM bundle)",
                _STRING,
            ),
        ),
        errors=(409,),
    )
)
def import_ca_certificate(ca_id: str, body: dict[str, Any]) -> Response:
    ca_for(ca_id, Action.MANAGE)
    chain = body.get("chain_pem")
    view = gateway().core.authorities.import_certificate(
        ca_id, body["certificate_pem"].encode(), chain.encode() if chain else None, actor()
    )
    return reply(view.to_json())


@route(
    Operation(
        "POST",
        "/cas/import-token-key",
        "importTokenKeyCA",
        "Make a CA of a certificate whose key is already on the [pkcs11] token",
        "CAs",
        Permission.CREATE_CAS,
        (json_reply(201, "The CA, ACTIVE, its key on the token", ref("CA")),),
        body=(
            Field("certificate_pem", "The CA's certificate (PEM)", _STRING, required=True),
            Field(
                "chain_pem",
                "The issuers, the direct issuer first, up to the root; none for a root",
                _STRING,
            ),
            Field("label", "The private key's CKA_LABEL on the token", _STRING),
            Field("id", "The private key's CKA_ID on the token, hex", _STRING),
            Field("tags", "Key/value labels (keys 'pkigate:*' are reserved)", _TAGS),
        ),
        errors=(422, 503),
    )
)
def import_token_key_ca(body: dict[str, Any]) -> Response:
    with field_errors("id"):
        try:
            token_id = bytes.fromhex(body["id"]) if body.get("id") else None
        except ValueError:
            raise BadRequestError("id: must be hex") from None
    chain = body.get("chain_pem")
    view = gateway().core.authorities.import_token_ca(
        body["certificate_pem"].encode(),
        chain.encode() if chain else None,
        body.get("label"),
        token_id,
        actor(),
        checked_tags(body.get("tags") or {}, "tags"),
    )
    return reply(view.to_json(), 201, url_for(".getCA", ca_id=view.record.id))


@route(
    Operation(
        "GET",
        "/cas/{ca_id}/certificate",
        "getCACertificate",
        "The CA's certificate and the chain above it",
        "CAs",
        Permission.READ_CAS,
        (json_reply(200, "PEM certificate and chain", ref("CACertificate")),),
        errors=(409,),
    )
)
def get_ca_certificate(ca_id: str) -> Response:
    ca_for(ca_id, Action.READ)
    certificate, chain = gateway().core.authorities.certificate_pem(ca_id)
    return reply({"certificate_pem": certificate, "chain_pem": chain})


@route(
    Operation(
        "PATCH",
        "/cas/{ca_id}",
        "updateCA",
        "Enable or disable a CA, or change its settings",
        "CAs",
        Permission.MANAGE_CAS,
        (json_reply(200, "The CA", ref("CA")),),
        body=(
            Field(
                "status",
                "ACTIVE or DISABLED",
                {"type": "string", "enum": [CAStatus.ACTIVE.value, CAStatus.DISABLED.value]},
            ),
            Field(
                "settings",
                "Settings to change; the others keep their values, and null resets one to "
                "its default",
                fields=SETTINGS_FIELDS,
            ),
        ),
        errors=(409,),
    )
)
def update_ca(ca_id: str, body: dict[str, Any]) -> Response:
    if body.get("status") is None and body.get("settings") is None:
        raise BadRequestError("give 'status', 'settings' or both")
    ca_for(ca_id, Action.MANAGE)
    authorities = gateway().core.authorities
    view = authorities.describe(ca_id)
    settings = None
    if body.get("settings") is not None:
        # Checked in full before anything changes; the status change (which may be refused
        # by the CA's state) goes first so that a refusal leaves the settings as they were.
        settings = checked_settings({**view.record.settings, **body["settings"]})
    if body.get("status") is not None:
        view = authorities.update_status(ca_id, CAStatus(body["status"]), actor())
    if settings is not None:
        view = authorities.update_settings(ca_id, settings, actor())
    return reply(view.to_json())


@route(
    Operation(
        "DELETE",
        "/cas/{ca_id}",
        "deleteCA",
        "Delete a CA that is not ACTIVE (restorable for restore_days)",
        "CAs",
        Permission.DELETE_CAS,
        (json_reply(200, "The CA, DELETED, with restore_until", ref("CA")),),
        query=(
            Param(
                "restore_days",
                "Days during which the deletion can be undone",
                {"type": "integer", "minimum": 7, "maximum": 30, "default": 30},
            ),
        ),
        errors=(409,),
    )
)
def delete_ca(ca_id: str, query: dict[str, Any]) -> Response:
    ca_for(ca_id, Action.MANAGE)
    view = gateway().core.authorities.delete(ca_id, query["restore_days"], actor())
    return reply(view.to_json())


@route(
    Operation(
        "POST",
        "/cas/{ca_id}/restore",
        "restoreCA",
        "Undo a deletion within its restore window",
        "CAs",
        Permission.DELETE_CAS,
        (json_reply(200, "The CA in its state before deletion", ref("CA")),),
        errors=(409,),
    )
)
def restore_ca(ca_id: str) -> Response:
    ca_for(ca_id, Action.MANAGE)
    return reply(gateway().core.authorities.restore(ca_id, actor()).to_json())


@route(
    Operation(
        "GET",
        "/cas/{ca_id}/tags",
        "getCATags",
        "A CA's tags",
        "CAs",
        Permission.READ_CAS,
        (json_reply(200, "The tags", ref("Tags")),),
    )
)
def get_ca_tags(ca_id: str) -> Response:
    ca_for(ca_id, Action.READ)
    return reply({"tags": dict(gateway().core.authorities.describe(ca_id).tags)})


@route(
    Operation(
        "PUT",
        "/cas/{ca_id}/tags",
        "setCATags",
        "Add or change tags (tags not named keep their values)",
        "CAs",
        Permission.MANAGE_CAS,
        (json_reply(200, "All the CA's tags afterwards", ref("Tags")),),
        body=(Field("tags", "Tags to set", _TAGS, required=True),),
    )
)
def set_ca_tags(ca_id: str, body: dict[str, Any]) -> Response:
    tags = checked_tags(body["tags"], "tags")
    ca_for(ca_id, Action.MANAGE)
    view = gateway().core.authorities.tag(ca_id, tags, [], actor())
    return reply({"tags": dict(view.tags)})


@route(
    Operation(
        "DELETE",
        "/cas/{ca_id}/tags",
        "removeCATags",
        "Remove tags by key",
        "CAs",
        Permission.MANAGE_CAS,
        (json_reply(200, "The tags that remain", ref("Tags")),),
        query=(
            Param(
                "key",
                "A tag key to remove (repeat for several)",
                {"type": "array", "items": {"type": "string"}},
                required=True,
            ),
        ),
    )
)
def remove_ca_tags(ca_id: str, query: dict[str, Any]) -> Response:
    keys: list[str] = query["key"]
    for key in keys:
        if key.startswith(RESERVED_TAG_PREFIX):
            raise BadRequestError(
                f"query parameter 'key': {key!r} is reserved for the gateway "
                f"(tags starting with {RESERVED_TAG_PREFIX!r})"
            )
    ca_for(ca_id, Action.MANAGE)
    view = gateway().core.authorities.tag(ca_id, {}, keys, actor())
    return reply({"tags": dict(view.tags)})


# -- certificates ----------------------------------------------------------------------------

ISSUE_FIELDS = (
    Field("csr", "The PKCS#10 request (PEM)", _STRING, required=True),
    Field(
        "template",
        "Certificate template (GET /templates)",
        {"type": "string", "default": "EndEntityCertificate/V1"},
    ),
    Field(
        "validity", "Requested lifetime, capped by template and CA", {**VALIDITY, "default": "30d"}
    ),
    Field(
        "api_passthrough",
        "Subject, SANs and extensions the caller vouches for (APIPassthrough templates): "
        "subject, sans, key_usage, extended_key_usage, certificate_policies, "
        "custom_extensions",
        {"type": "object"},
    ),
    Field(
        "signing_algorithm",
        "Default: the CA's",
        {"type": "string", "enum": enum_values(SigningAlgorithm)},
    ),
    Field(
        "idempotency_token",
        "The same token with the same request within 5 minutes returns the same certificate",
        _TOKEN_FIELD,
    ),
)


@route(
    Operation(
        "POST",
        "/cas/{ca_id}/certificates",
        "issueCertificate",
        "Issue a certificate from a PKCS#10 request",
        "Certificates",
        Permission.ISSUE,
        (json_reply(201, "The certificate and its chain", ref("Certificate")),),
        body=ISSUE_FIELDS,
        errors=(409, 422, 503),
    )
)
def issue_certificate(ca_id: str, body: dict[str, Any]) -> Response:
    who = principal()
    passthrough = None
    if body.get("api_passthrough") is not None:
        with field_errors("api_passthrough"):
            passthrough = parse_api_passthrough(body["api_passthrough"])
    signing = body.get("signing_algorithm")
    template = body["template"]
    templates = gateway().core.templates
    _check_ca_operation(  # an unknown template is the core's to refuse (and audit)
        template in templates and _privileged_template(templates.get(template)),
        f"template {template} makes a CA, OCSP responder or Blank-template certificate",
    )
    issuance = IssuanceRequest(
        ca_id=ca_id,
        csr=body["csr"].encode(),
        validity=parse_validity(body["validity"], "validity"),
        requester=Requester(
            actor().principal,
            API_CONNECTOR,
            {"token_id": who.token_id, "roles": " ".join(who.role_names)},
            g.request_id,
        ),
        template=template,
        api_passthrough=passthrough,
        signing_algorithm=SigningAlgorithm(signing) if signing else None,
        idempotency_token=body.get("idempotency_token"),
        principal=who.facts,
    )
    try:
        issued = gateway().core.issue(issuance)
    except PkigateError as exc:
        metrics.record_issuance(API_CONNECTOR, template, exc.code)
        raise
    metrics.record_issuance(API_CONNECTOR, template, "success")
    data = {
        **certificate_json(issued.record),
        "certificate_pem": issued.pem(),
        "chain_pem": issued.chain_pem(),
    }
    return reply(data, 201, url_for(".getCertificate", ca_id=ca_id, serial=issued.serial))


@route(
    Operation(
        "GET",
        "/cas/{ca_id}/certificates",
        "listCertificates",
        "List a CA's certificates, oldest first, a page at a time",
        "Certificates",
        Permission.READ_CERTIFICATES,
        (json_reply(200, "One page; follow `next` (or the Link header)", ref("CertificatePage")),),
        query=(
            Param(
                "status",
                "Only ISSUED or only REVOKED",
                {"type": "string", "enum": enum_values(CertificateStatus)},
            ),
            Param(
                "expiring_within",
                "Only certificates whose notAfter is that close, e.g. 30d",
                {"type": "string", "examples": ["30d"]},
            ),
            Param(
                "include_expired",
                "Include certificates past their notAfter",
                {"type": "boolean", "default": False},
            ),
            Param(
                "limit",
                "Page size",
                {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 100},
            ),
            Param("cursor", "Opaque: the next_cursor of the previous page", _STRING),
        ),
    )
)
def list_certificates(ca_id: str, query: dict[str, Any]) -> Response:
    core = gateway().core
    ca = ca_for(ca_id, Action.READ)
    now = core.clock()
    within = query["expiring_within"]
    limit: int = query["limit"]
    after = decode_cursor(query["cursor"])
    with core.store.read() as conn:
        records = core.store.list_certificates(
            conn,
            ca_id=ca_id,
            status=query["status"],
            expiring_before=now + parse_duration(within, "expiring_within") if within else None,
            not_expired_at=None if query["include_expired"] else now,
            limit=limit + 1,
            after_id=after,
            team=team_filter(ca),
        )
    page = records[:limit]
    return paged_reply(
        "certificates",
        [certificate_json(r) for r in page],
        page[-1].id if len(records) > limit else None,
    )


def paged_reply(name: str, items: list[Any], last: int | None) -> Response:
    """One page of ``items``; when ``last`` (the row the next page starts after) is given,
    the next page's cursor and URL, also as a Link header (RFC 8288)."""
    next_cursor = encode_cursor(last) if last is not None else None
    next_url = None
    if next_cursor:
        arguments = [(k, v) for k, v in request.args.items(multi=True) if k != "cursor"]
        next_url = f"{request.script_root}{request.path}?" + urlencode(
            [*arguments, ("cursor", next_cursor)]
        )
    response = reply({name: items, "next": next_url, "next_cursor": next_cursor})
    if next_url:
        response.headers["Link"] = f'<{next_url}>; rel="next"'
    return response


@route(
    Operation(
        "GET",
        "/cas/{ca_id}/certificates/{serial}",
        "getCertificate",
        "One certificate by serial (hex; colons and a 0x prefix allowed)",
        "Certificates",
        Permission.READ_CERTIFICATES,
        (json_reply(200, "The certificate, its PEM and chain", ref("Certificate")),),
    )
)
def get_certificate(ca_id: str, serial: str) -> Response:
    core = gateway().core
    ca = ca_for(ca_id, Action.READ)
    with core.store.read() as conn:
        record = core.store.get_certificate(conn, ca_id, normalize_serial(serial))
    if record is None or not own_or_owner(ca, record):
        raise NotFoundError(f"CA {ca_id} has issued no certificate with serial {serial}")
    ca_certificate, above = core.authorities.certificate_pem(ca_id)
    return reply(
        {
            **certificate_json(record),
            "certificate_pem": certificate_pem(record),
            "chain_pem": ca_certificate + above,
        }
    )


REVOKE_FIELDS = (
    Field(
        "reason",
        "RFC 5280 revocation reason",
        {"type": "string", "enum": enum_values(RevocationReason), "default": "unspecified"},
    ),
)


@route(
    Operation(
        "POST",
        "/cas/{ca_id}/certificates/{serial}/revoke",
        "revokeCertificate",
        "Revoke a certificate; CRLs are regenerated and OCSP answers 'revoked' at once",
        "Certificates",
        Permission.REVOKE,
        (json_reply(200, "The revoked certificate", ref("Certificate")),),
        body=REVOKE_FIELDS,
        errors=(409,),
    )
)
def revoke_certificate(ca_id: str, serial: str, body: dict[str, Any]) -> Response:
    core = gateway().core
    record = revoke(ca_id, normalize_serial(serial), RevocationReason(body["reason"]))
    ca_certificate, above = core.authorities.certificate_pem(ca_id)
    return reply(
        {
            **certificate_json(record),
            "certificate_pem": certificate_pem(record),
            "chain_pem": ca_certificate + above,
        }
    )


def revoke(ca_id: str, serial: str, reason: RevocationReason) -> CertificateRecord:
    """Revoke as the authenticated principal (the API's and the console's path): a CA or
    OCSP responder certificate only where CA operations are enabled."""
    core = gateway().core
    ca = core.authorities.get(ca_id)
    with core.store.read() as conn:
        target = core.store.get_certificate(conn, ca_id, serial)
    hidden = target is not None and not own_or_owner(ca, target)
    ca_for(ca_id, Action.REVOKE, certificate_facts(target) if target and not hidden else None)
    if hidden:
        # Another team's certificate on a shared CA: as if it did not exist.
        core.audit.record_alone(
            actor(),
            "access.denied",
            f"ca/{ca_id}",
            result="failure",
            parameters={"action": "revoke", "serial": serial, "reason": "another team's"},
            at=core.clock(),
        )
        raise NotFoundError(f"CA {ca_id} has issued no certificate with serial {serial}")
    if target is not None:
        _check_ca_operation(
            _signs_for_the_ca(target.template, target.der),
            f"certificate {target.serial} is a CA or OCSP responder certificate",
        )
    return core.revocation.revoke(ca_id, serial, reason, actor())  # type: ignore[no-any-return]


def ca_for(ca_id: str, action: Action, facts: RequestFacts | None = None) -> CARecord:
    """The CA, if the token may do ``action`` on it: decided (and refusals audited) by the
    core; a CA the token may not see is a 404, as if it did not exist."""
    return authorize_on_ca(ca_id, action, API_CONNECTOR, facts)


def certificate_facts(record: CertificateRecord) -> RequestFacts:
    """A stored certificate's template and names, for the conditions of revoke."""
    try:
        certificate = x509.load_der_x509_certificate(record.der)
        subject = certificate.subject
        try:
            sans = list(
                certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            )
        except x509.ExtensionNotFound:
            sans = []
    except UNREADABLE:
        # Names that cannot be read cannot be matched: only a statement without name
        # conditions allows it (has_names with a name nobody's patterns hold).
        return RequestFacts(
            template=record.template,
            connector=API_CONNECTOR,
            sans=[x509.UniformResourceIdentifier("unreadable:")],
            has_names=True,
        )
    return RequestFacts(
        template=record.template,
        subject=subject,
        sans=sans,
        connector=API_CONNECTOR,
        has_names=True,
    )


def own_or_owner(ca: CARecord, certificate: CertificateRecord) -> bool:
    """Tokens of the owning team see every certificate of the CA; a team it is shared with
    sees only those its own tokens asked for."""
    team = principal().team
    return team == ca.team or certificate.team == team


def team_filter(ca: CARecord) -> str | None:
    """Which team's certificates of the CA the token sees: all (None) for the owner's."""
    team = principal().team
    return None if team == ca.team else team


def acting_for_team(team: str | None) -> str:
    """The team a new resource is for: the token's own, or (admins of the default team
    only) another."""
    own = principal().team
    if team is None or team == own:
        return own
    if own != DEFAULT_TEAM:
        raise ForbiddenError(f"a token of team {own} acts for its own team only, not {team}")
    gateway().core.access.require_team(team)
    return team


def _check_ca_operation(privileged: bool, what: str) -> None:
    """CA powers through an API token only where the operator enabled them."""
    gw = gateway()
    if privileged and not gw.config.api_ca_operations:
        gw.core.audit.record_alone(
            principal().actor(g.request_id),
            "api.denied",
            f"{request.method} {request.path}"[:256],
            result="failure",
            parameters={"reason": what, "needs": "api_ca_operations"},
            at=gw.core.clock(),
        )
        raise NotAuthorizedError(
            f"{what}: API tokens may not do this unless the gateway configuration sets "
            "api_ca_operations = true (use `pkigate ca` on the CA host otherwise)"
        )


def _privileged_template(template: Template) -> bool:
    """CA certificates, OCSP responders (trusted to vouch for every certificate), and
    Blank templates (any key usage and EKU the caller passes through)."""
    ekus = template.extended_key_usage or ()
    return (
        template.is_ca
        or template.ocsp_no_check
        or ExtendedKeyUsageOID.OCSP_SIGNING in ekus
        or template.name.startswith("Blank")
    )


def _signs_for_the_ca(template_name: str, der: bytes) -> bool:
    """Whether a stored certificate is a CA's or an OCSP responder's: by what it carries
    (any template can be given those powers through passthrough), and when that cannot be
    read, by the template it was issued from."""
    try:
        extensions = x509.load_der_x509_certificate(der).extensions
        constraints = extensions.get_extension_for_class(x509.BasicConstraints).value
        if constraints.ca:
            return True
    except x509.ExtensionNotFound:
        pass
    except UNREADABLE:
        templates = gateway().core.templates
        return template_name not in templates or _privileged_template(templates.get(template_name))
    try:
        ekus = extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return ExtendedKeyUsageOID.OCSP_SIGNING in ekus


# -- templates -------------------------------------------------------------------------------


@route(
    Operation(
        "GET",
        "/templates",
        "listTemplates",
        "The certificate template catalogue",
        "Templates",
        Permission.READ_CAS,
        (json_reply(200, "Every template by name", ref("TemplateList")),),
    )
)
def list_templates() -> Response:
    return reply({"templates": [describe_template(t) for t in gateway().core.templates]})


# -- audit -----------------------------------------------------------------------------------


@route(
    Operation(
        "GET",
        "/audit/verify",
        "verifyAudit",
        "Check the audit log's hash chain; name every edited, inserted or deleted event",
        "Audit",
        Permission.AUDIT_REPORTS,
        (
            json_reply(
                200, "The verification (ok is false when tampered)", ref("AuditVerification")
            ),
        ),
    )
)
def verify_audit() -> Response:
    result = gateway().core.audit.verify()
    return reply(
        {
            "ok": result.ok,
            "events": result.events,
            "problems": [
                {"seq": p.seq, "kind": p.kind, "detail": p.detail} for p in result.problems
            ],
        }
    )


def parse_moment(text: str | None, name: str) -> datetime | None:
    """An ISO 8601 date and time (UTC when it names no offset), or None."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadRequestError(f"{name}: not an ISO 8601 date and time") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def find_audit_events(
    store: Store,
    filters: Mapping[str, str | None],
    limit: int,
    before: int | None = None,
    within: AuditScope | None = None,
) -> list[AuditEventRecord]:
    """Audit events newest first by the filters the API, the console and the CLI share;
    ``within``: what a token's team may see (:func:`audit_scope`)."""
    with store.read() as conn:
        return store.find_audit_events(
            conn,
            actor=filters.get("actor") or None,
            action=filters.get("action") or None,
            resource=filters.get("resource") or None,
            since=parse_moment(filters.get("since"), "since"),
            until=parse_moment(filters.get("until"), "until"),
            request_id=filters.get("request_id") or None,
            before_seq=before,
            limit=limit,
            within=within,
        )


def audit_scope() -> AuditScope | None:
    """None for the default team's tokens (they see everything, as before teams); for
    another team's: records about the CAs it owns and its own tokens' actions. On a CA
    shared with it, that is its own actions only: what the owner (or a third team) did
    there is the owner's (issue 20: "nothing else of the owner's")."""
    team = principal().team
    if team == DEFAULT_TEAM:
        return None
    return AuditScope(
        frozenset(f"ca/{ca_id}" for ca_id in owned_ca_ids() or ()),
        frozenset(
            Principal(t.id, t.name, (), t.team).actor(None).principal
            for t in gateway().tokens.list()
            if t.team == team
        ),
    )


def certificate_scope() -> CertificateScope | None:
    """None for the default team's tokens; for another team's, the certificates its
    listings show (see :func:`_own_or_owner`)."""
    team = principal().team
    if team == DEFAULT_TEAM:
        return None
    readable = [view.record for view in readable_cas()]
    return CertificateScope(
        team,
        frozenset(ca.id for ca in readable if ca.team == team),
        frozenset(ca.id for ca in readable if ca.team != team),
    )


def owned_ca_ids() -> set[str] | None:
    """None for the default team's tokens; the ids of the CAs another team's own. (The
    outbox's events carry no team: those of a CA shared with the team are the owner's.)"""
    team = principal().team
    if team == DEFAULT_TEAM:
        return None
    return {view.record.id for view in readable_cas() if view.record.team == team}


def audit_event_json(event: AuditEventRecord) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "event_id": event.event_id,
        "at": event.at.isoformat().replace("+00:00", "Z"),
        "actor": event.actor,
        "connector": event.connector,
        "action": event.action,
        "resource": event.resource,
        "parameters": json.loads(event.parameters or "{}"),
        "result": event.result,
        "request_id": event.request_id,
    }


AUDIT_FILTERS = (
    Param("actor", "Events whose actor contains this (case-insensitive)", _STRING),
    Param(
        "action",
        'This action, or every action under a prefix ending in "." (certificate.)',
        _STRING,
    ),
    Param("resource", "Events whose resource contains this (case-insensitive)", _STRING),
    Param("since", "From this time (ISO 8601; UTC without an offset)", _DATE_TIME),
    Param("until", "Before this time (ISO 8601; UTC without an offset)", _DATE_TIME),
    Param("request_id", "The X-Request-Id of the request that caused them", _STRING),
)


@route(
    Operation(
        "GET",
        "/audit/events",
        "listAuditEvents",
        "Audit events, newest first, filtered, a page at a time",
        "Audit",
        Permission.READ_AUDIT,
        (json_reply(200, "One page; follow `next` (or the Link header)", ref("AuditEventPage")),),
        query=(
            *AUDIT_FILTERS,
            Param(
                "limit",
                "Page size",
                {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 100},
            ),
            Param("cursor", "Opaque: the next_cursor of the previous page", _STRING),
        ),
    )
)
def list_audit_events(query: dict[str, Any]) -> Response:
    limit: int = query["limit"]
    before = decode_cursor(query["cursor"]) if query["cursor"] else None
    events = find_audit_events(gateway().core.store, query, limit + 1, before, audit_scope())
    page = events[:limit]
    return paged_reply(
        "events",
        [audit_event_json(e) for e in page],
        page[-1].seq if len(events) > limit else None,
    )


@route(
    Operation(
        "GET",
        "/audit/report",
        "auditReport",
        "Every certificate a CA issued or revoked, as JSON or CSV",
        "Audit",
        Permission.AUDIT_REPORTS,
        (
            Reply(
                200,
                "The report",
                {"application/json": ref("AuditReport"), "text/csv": {"type": "string"}},
            ),
        ),
        query=(
            Param("ca", _CA_ID, _STRING, required=True),
            Param(
                "format",
                "json or csv (text/csv)",
                {"type": "string", "enum": ["json", "csv"], "default": "json"},
            ),
        ),
        errors=(404,),
    )
)
def audit_report(query: dict[str, Any]) -> Response:
    core = gateway().core
    ca_id = query["ca"]
    ca = ca_for(ca_id, Action.READ)
    with core.store.read() as conn:
        rows = report_rows(core.store.list_certificates(conn, ca_id=ca_id, team=team_filter(ca)))
    if query["format"] == "csv":
        return Response(
            render_report(rows, "csv"),
            mimetype="text/csv",
            headers={"Content-Disposition": f'attachment; filename="audit-{ca_id}.csv"'},
        )
    return reply({"ca_id": ca_id, "certificates": rows})


# -- events ----------------------------------------------------------------------------------


@route(
    Operation(
        "GET",
        "/events",
        "listEvents",
        "Events from the outbox, oldest first, with their delivery to each destination",
        "Events",
        Permission.READ_EVENTS,
        (json_reply(200, "One page; pass next_after as ?after= for the next", ref("EventPage")),),
        query=(
            Param(
                "type",
                "Only events of this type",
                {"type": "string", "enum": enum_values(EventType)},
            ),
            Param("ca", "Only events about this CA (id)", _STRING),
            Param(
                "after",
                "Only events after this position",
                {**_POSITION, "default": 0},
            ),
            Param(
                "limit",
                "Page size",
                {"type": "integer", "minimum": 1, "maximum": MAX_PAGE, "default": 100},
            ),
        ),
    )
)
def list_events(query: dict[str, Any]) -> Response:
    limit: int = query["limit"]
    found = gateway().core.events.list(
        after=query["after"],
        types=[query["type"]] if query["type"] else (),
        ca_id=query["ca"],
        ca_ids=owned_ca_ids(),
        limit=limit,
    )
    return reply(
        {
            "events": [stored.to_json() for stored in found],
            "next_after": found[-1].id if len(found) == limit else None,
        }
    )


# -- tokens ----------------------------------------------------------------------------------


_ROLE_NAMES = {"type": "string", "enum": enum_values(Role)}
_SPAN_FIELD = {"type": "string", "pattern": r"^\d{1,9}(s|min|h|d)$", "examples": ["90d", "12h"]}


@route(
    Operation(
        "POST",
        "/tokens",
        "createToken",
        "Create an API token; its secret is in this response only",
        "Tokens",
        Permission.MANAGE_TOKENS,
        (json_reply(201, "The token with its secret", ref("NewToken")),),
        body=(
            Field("name", "Who or what will use it", _TOKEN_FIELD, required=True),
            Field(
                "roles",
                "Its roles; roles that separation_of_duties keeps apart are refused (400), "
                "and so are roles the caller does not hold itself unless it is admin (403)",
                {"type": "array", "items": _ROLE_NAMES, "minItems": 1},
            ),
            Field(
                "role",
                "Instead of roles, one role as before roles were fine-grained: admin, "
                "auditor, or issuer (which is issuer + approver)",
                {"type": "string", "enum": sorted(LEGACY_ROLES)},
            ),
            Field(
                "expires_in",
                "Lifetime (90d, 12h, 30min, 3600s); default and maximum from [tokens] "
                "in the configuration",
                _SPAN_FIELD,
            ),
            Field(
                "allow_from",
                "Client networks it may be used from (CIDRs); default: anywhere",
                {"type": "array", "items": _STRING, "maxItems": 32},
            ),
            Field(
                "team",
                "The team it acts for (default: the caller's; another team only for admins "
                "of the default team)",
                _STRING,
            ),
        ),
        errors=(404,),
    )
)
def create_token(body: dict[str, Any]) -> Response:
    if (body.get("roles") is None) == (body.get("role") is None):
        raise BadRequestError("give 'roles' (a list) or the single legacy 'role'")
    roles = (
        LEGACY_ROLES[body["role"]]
        if body.get("role") is not None
        else parsed("roles", _role_names, body["roles"])
    )
    expires_in = (
        parsed("expires_in", parse_span, body["expires_in"]) if body.get("expires_in") else None
    )
    issued = gateway().tokens.create(
        body["name"],
        roles,
        actor(),
        expires_in=expires_in,
        allow_from=parsed("allow_from", parse_networks, body.get("allow_from") or ()),
        team=acting_for_team(body.get("team")),
        caller=principal(),
    )
    return _secret_reply(issued, 201)


def _role_names(names: list[Any]) -> tuple[Role, ...]:
    if not all(isinstance(name, str) for name in names):
        raise ValueError("must be a list of role names")
    return parse_roles(names)


def parsed(name: str, parse: Callable[[Any], T], value: Any) -> T:
    """``parse(value)``, its ValueError a 400 naming the field."""
    try:
        return parse(value)
    except ValueError as exc:
        raise BadRequestError(f"field {name!r}: {exc}") from None


def _secret_reply(issued: Any, status: int) -> Response:
    """A token with its secret: never cached anywhere."""
    response = reply(
        {**token_json(issued.record), "secret": issued.secret}, status, url_for(".listTokens")
    )
    response.headers["Cache-Control"] = "no-store"
    return response


@route(
    Operation(
        "POST",
        "/tokens/{token_id}/rotate",
        "rotateToken",
        "A new secret for a token; the old one works for the overlap, then stops. Another "
        "token's only if the caller may give all its roles (403 otherwise)",
        "Tokens",
        Permission.MANAGE_TOKENS,
        (json_reply(200, "The token with its new secret", ref("NewToken")),),
        body=(
            Field(
                "overlap",
                "How long the old secret keeps working (at most [tokens] "
                "max_rotation_overlap); 0s stops it at once",
                {**_SPAN_FIELD, "default": "0s"},
            ),
        ),
        errors=(409,),
    )
)
def rotate_token(token_id: str, body: dict[str, Any]) -> Response:
    overlap = parsed("overlap", parse_span, body["overlap"])
    check_own_token(token_id)
    issued = gateway().tokens.rotate(token_id, overlap, actor(), principal())
    return _secret_reply(issued, 200)


@route(
    Operation(
        "PATCH",
        "/tokens/{token_id}",
        "updateToken",
        "Change a token's roles, client networks or expiry (never its secret or team); "
        "the audit record names each change, before and after",
        "Tokens",
        Permission.MANAGE_TOKENS,
        (json_reply(200, "The token as changed", ref("Token")),),
        body=(
            Field(
                "roles",
                "Its roles from now on; roles that separation_of_duties keeps apart are "
                "refused (400), and so are roles it would gain that the caller does not hold "
                "itself (403; admin gives any, but not to itself)",
                {"type": "array", "items": _ROLE_NAMES, "minItems": 1},
            ),
            Field(
                "allow_from",
                "Client networks it may be used from from now on (CIDRs); [] for anywhere",
                {"type": "array", "items": _STRING, "maxItems": 32},
            ),
            Field(
                "expires_in",
                "Expire this long from now (90d, 12h, 30min, 3600s); at most [tokens] max_lifetime",
                _SPAN_FIELD,
            ),
        ),
        errors=(404, 409),
    )
)
def update_token(token_id: str, body: dict[str, Any]) -> Response:
    roles = body.get("roles")
    allow_from = body.get("allow_from")
    expires_in = body.get("expires_in")
    check_own_token(token_id)
    record = gateway().tokens.update(
        token_id,
        actor(),
        roles=parsed("roles", _role_names, roles) if roles is not None else None,
        allow_from=parsed("allow_from", parse_networks, allow_from)
        if allow_from is not None
        else None,
        expires_in=parsed("expires_in", parse_span, expires_in) if expires_in else None,
        caller=principal(),
    )
    return reply(token_json(record))


def check_own_token(token_id: str) -> None:
    """To a token of a team other than the default, another team's token does not exist."""
    if not any(t.id == token_id for t in visible_tokens()):
        raise NotFoundError(f"no active token with id {token_id}")


def visible_tokens() -> list[ApiTokenRecord]:
    """The tokens this token manages: every one for the default team's, its own team's
    for another's (the API's and the console's)."""
    team = principal().team
    return [t for t in gateway().tokens.list() if team in (DEFAULT_TEAM, t.team)]


@route(
    Operation(
        "GET",
        "/tokens",
        "listTokens",
        "API tokens (never their secrets)",
        "Tokens",
        Permission.MANAGE_TOKENS,
        (json_reply(200, "Every token, revoked ones included", ref("TokenList")),),
    )
)
def list_tokens() -> Response:
    return reply({"tokens": [token_json(t) for t in visible_tokens()]})


@route(
    Operation(
        "DELETE",
        "/tokens/{token_id}",
        "revokeToken",
        "Revoke a token; it is refused from then on",
        "Tokens",
        Permission.MANAGE_TOKENS,
        (json_reply(200, "The revoked token", ref("Token")),),
    )
)
def revoke_token(token_id: str) -> Response:
    tokens = gateway().tokens
    check_own_token(token_id)
    tokens.revoke(token_id, actor())
    record = next(t for t in tokens.list() if t.id == token_id)
    return reply(token_json(record))


# -- the document ----------------------------------------------------------------------------


def foreign_routes() -> list[ForeignRoute]:
    """Routes under /api/v1 that connectors registered, with the roles their views need."""
    found = []
    for rule in current_app.url_map.iter_rules():
        if not rule.rule.startswith(API_PREFIX + "/") or rule.endpoint.startswith("api."):
            continue
        view = current_app.view_functions[rule.endpoint]
        roles = getattr(view, "required_roles", None)
        summary = (view.__doc__ or "").strip().split("\n")[0]
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            found.append(
                ForeignRoute(
                    method,
                    openapi_path(rule.rule.removeprefix(API_PREFIX)),
                    rule.endpoint,
                    tuple(roles) if roles is not None else None,
                    summary,
                )
            )
    return found


def _version() -> str:
    try:
        return metadata.version("pkigate")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0"


@route(
    Operation(
        "GET",
        "/openapi.json",
        "getOpenAPI",
        "This OpenAPI 3.1 document",
        "Meta",
        None,
        (json_reply(200, "The document", {"type": "object"}),),
    )
)
def openapi_document() -> Response:
    return reply(build_document(OPERATIONS, foreign_routes(), _version()))


# Resources in modules of their own, registered on this blueprint when it is imported.
from pkigate.gateways import api_notifications  # noqa: E402, F401
