"""HTTP plumbing shared by every route: JSON errors, request ids, auth, body parsing.

The core's typed errors map onto HTTP status codes here and only here.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from functools import wraps
from typing import Any, ParamSpec, TypeVar

from flask import Response, current_app, g, jsonify, request
from werkzeug.routing import BaseConverter

from pkigate.core.access import DEFAULT_TEAM, Action, RequestFacts
from pkigate.core.audit import Actor
from pkigate.core.errors import (
    AnchorWriteError,
    BadRequestError,
    ConflictError,
    IdempotencyConflictError,
    InvalidStateError,
    KeyBackendError,
    NotAuthorizedError,
    NotFoundError,
    PkigateError,
    PolicyViolationError,
    StoreIntegrityError,
    StoreUnavailableError,
)
from pkigate.core.store import CARecord
from pkigate.gateways.auth import AuthenticationError, ForbiddenError, Principal
from pkigate.gateways.roles import Permission, roles_with

P = ParamSpec("P")
R = TypeVar("R")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class UnsupportedMediaType(BadRequestError):
    code = "unsupportedMediaType"


def status_for(error: PkigateError) -> int:
    if isinstance(error, UnsupportedMediaType):
        return 415
    if isinstance(error, AuthenticationError):
        return 401
    if isinstance(error, NotAuthorizedError):
        return 403
    if isinstance(error, NotFoundError):
        return 404
    if isinstance(error, InvalidStateError | ConflictError | IdempotencyConflictError):
        return 409
    if isinstance(error, PolicyViolationError):
        return 422
    if isinstance(error, BadRequestError):
        return 400
    if isinstance(
        error, KeyBackendError | StoreIntegrityError | AnchorWriteError | StoreUnavailableError
    ):
        return 503
    return 500


def error_reply(error: PkigateError) -> Response:
    """The core's typed error as the API's JSON error: the one place it is mapped."""
    headers = {}
    if isinstance(error, StoreUnavailableError):
        # RFC 9110 10.2.3: when to try again; nothing was changed, the request may be resent.
        headers["Retry-After"] = str(error.retry_after_seconds)
    return error_response(status_for(error), error.code, error.message, headers)


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> Response:
    response = jsonify(
        {"error": {"code": code, "message": message, "request_id": getattr(g, "request_id", None)}}
    )
    response.status_code = status
    for key, value in (headers or {}).items():
        response.headers[key] = value
    return response


def assign_request_id() -> None:
    supplied = request.headers.get("X-Request-Id", "")
    g.request_id = supplied if _REQUEST_ID.match(supplied) else uuid.uuid4().hex


def gateway() -> Any:
    """The Gateway serving this request (set by the app factory)."""
    return current_app.config["PKIGATE_GATEWAY"]


def principal() -> Principal:
    return g.principal  # type: ignore[no-any-return]


def actor() -> Actor:
    return principal().actor(g.request_id)


def default_team_only(doing: str) -> None:
    """What belongs to the whole gateway, not to one team (teams themselves, notification
    destinations, which receive every CA's events), is for tokens of the default team."""
    if principal().team != DEFAULT_TEAM:
        raise ForbiddenError(f"only tokens of team {DEFAULT_TEAM} {doing}")


def authorize_on_ca(
    ca_id: str, action: Action, connector: str, held: RequestFacts | None = None
) -> CARecord:
    """The core's access decision for this request's token on a CA, through a connector's
    management calls: 403 with the reason, or 404 for a CA the token may not see.
    ``held``: the facts of the held request a decision is about (approve, reject), from
    :func:`~pkigate.core.access.held_request_facts`. The CA's record, when allowed."""
    facts = held or RequestFacts(connector=connector)
    return gateway().core.access.check(principal().facts, action, ca_id, actor(), facts)  # type: ignore[no-any-return]


def bearer_principal() -> Principal:
    """Who sent this request, by its bearer token (the API's authentication), from the
    connection's peer address (no proxy header is trusted)."""
    return gateway().tokens.authenticate(  # type: ignore[no-any-return]
        request.headers.get("Authorization"), request.remote_addr, g.request_id
    )


def requires(
    *permissions: Permission, authenticate: Callable[[], Principal] = bearer_principal
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Authenticate (by bearer token, unless ``authenticate`` says otherwise: the console
    signs in with a session) and allow only tokens whose roles grant one of
    ``permissions`` (gateways/roles.py); refusals and reads are audited."""
    roles = tuple(dict.fromkeys(r for p in permissions for r in roles_with(p)))
    needs = " or ".join(p.value for p in permissions)

    def decorate(view: Callable[P, R]) -> Callable[P, R]:
        @wraps(view)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            gw = gateway()
            who = authenticate()
            g.principal = who
            resource = f"{request.method} {request.path}"[:256]
            if not any(who.may(p) for p in permissions):
                gw.core.audit.record_alone(
                    who.actor(g.request_id),
                    "api.denied",
                    resource,
                    result="failure",
                    parameters={
                        "roles": who.role_names,
                        "needs": needs,
                        "allowed": [r.value for r in roles],
                    },
                    at=gw.core.clock(),
                )
                raise ForbiddenError(
                    f"roles {', '.join(who.role_names)} may not do this ({needs}); "
                    f"it needs {' or '.join(r.value for r in roles)}"
                )
            if request.method not in ("GET", "HEAD"):
                return view(*args, **kwargs)  # changes are audited by the core as they happen
            # Reads change nothing, so the core records nothing: the API records who looked.
            try:
                result = view(*args, **kwargs)
            except PkigateError as exc:
                gw.core.audit.record_alone(
                    who.actor(g.request_id),
                    "api.read",
                    resource,
                    result="failure",
                    at=gw.core.clock(),
                    parameters={"error": exc.code, "query": request.query_string.decode()},
                )
                raise
            gw.core.audit.record_alone(
                who.actor(g.request_id),
                "api.read",
                resource,
                result="success",
                at=gw.core.clock(),
                parameters={"query": request.query_string.decode()},
            )
            return result

        wrapper.required_roles = roles  # type: ignore[attr-defined]
        return wrapper

    return decorate


class AnyText(BaseConverter):
    """``<anytext:name>``: a path variable holding any characters, "/" included, even
    leading or doubled, and newlines. Werkzeug's ``<path:>`` refuses a leading "/" and
    stops at a newline; with slashes merged the router then redirects to another resource
    (a SCEP transactionID "/9I/cz..." became "9I/cz..."). Routes using it also set
    ``merge_slashes=False``. Registered on every app by ``create_app``."""

    regex = r"[\s\S]+?"
    part_isolating = False


class MalformedJson(ValueError):
    """A request body that is not JSON a handler can use."""


# No field takes a number anywhere near this long; Python's own limit (4,300 digits) would
# raise a bare ValueError from inside the decoder.
MAX_JSON_NUMBER_CHARS = 100


def _json_integer(text: str) -> int:
    if len(text) > MAX_JSON_NUMBER_CHARS:
        raise MalformedJson(f"malformed JSON: a number of {len(text)} characters")
    return int(text)


def _json_float(text: str) -> float:
    """A float that is finite: 1e999 reads as infinity, which no field can use (and
    int(inf) raises OverflowError wherever a handler converts it)."""
    if len(text) > MAX_JSON_NUMBER_CHARS:
        raise MalformedJson(f"malformed JSON: a number of {len(text)} characters")
    value = float(text)
    if not math.isfinite(value):
        raise MalformedJson(f"malformed JSON: {text} is out of range")
    return value


def _json_constant(name: str) -> Any:
    raise MalformedJson(f"malformed JSON: {name} is not JSON (RFC 8259 6)")


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose names are unique (RFC 8259 4: with duplicates, what a receiver reads
    is unpredictable; Python keeps the last, another reader of the same text the first)."""
    value = dict(pairs)
    if len(value) != len(pairs):
        twice = next(name for name, count in Counter(n for n, _ in pairs).items() if count > 1)
        raise MalformedJson(f"malformed JSON: the name {twice!r} appears twice in an object")
    return value


def parse_json(data: bytes) -> Any:
    """JSON (RFC 8259) from a request body, refused with :class:`MalformedJson` when it does
    not parse, is nested deeper than the parser's recursion limit, names a member twice in
    one object, or holds a string that is not Unicode text (a lone surrogate escape such
    as ``\\ud800``, RFC 8259 8.2), which would fail later wherever the string is encoded,
    or a NUL, which no field takes; or a number longer than any field takes, or out of a
    float's range."""
    try:
        value = json.loads(
            data,
            object_pairs_hook=_json_object,
            parse_int=_json_integer,
            parse_float=_json_float,
            parse_constant=_json_constant,
        )
    except RecursionError:
        raise MalformedJson("malformed JSON: nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MalformedJson(f"malformed JSON: {exc}") from None
    pending = [value]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            pending += node.keys()
            pending += node.values()
        elif isinstance(node, list):
            pending += node
        elif isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                raise MalformedJson(
                    "malformed JSON: a string is not Unicode text (a lone surrogate)"
                ) from None
            if "\x00" in node:
                # No field takes a NUL, and PostgreSQL text cannot store one (a DataError
                # wherever the string reaches a column, found by the fuzzer).
                raise MalformedJson("malformed JSON: a string holds NUL (\\u0000)")
    return value


def json_body(
    allowed: Mapping[str, type | tuple[type, ...]], required: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The request's JSON object, with unknown fields and wrong types named (400/415)."""
    mimetype = request.mimetype
    if mimetype != "application/json":
        raise UnsupportedMediaType("send application/json")
    try:
        body = parse_json(request.get_data(cache=False) or b"null")
    except MalformedJson as exc:
        raise BadRequestError(str(exc)) from None
    if not isinstance(body, dict):
        raise BadRequestError("the body must be a JSON object")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise BadRequestError(
            f"unknown field {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}"
        )
    for name in required:
        if name not in body:
            raise BadRequestError(f"field {name!r} is required")
    for name, value in body.items():
        expected = allowed[name]
        if value is not None and not isinstance(value, expected):
            names = (
                expected.__name__
                if isinstance(expected, type)
                else "/".join(t.__name__ for t in expected)
            )
            raise BadRequestError(f"field {name!r} must be {names}")
    return body
