"""The web console at /console/ on the HTTPS listener: server-rendered pages for the API's
three roles.

* Sign-in is with an API token; it starts a server-side session kept in the store (so
  every worker and host sees it, and a sign-out, a revoked token or a timeout ends it
  everywhere). The browser holds a signed cookie (HttpOnly, Secure, SameSite=Strict, path
  /console) with the session id and Flask-WTF's CSRF secret; the signing key is a shared
  secret in the store (core/secrets.py), the same on every host.
* Roles are enforced by the API's own decorator (``http.requires`` with the session as the
  way to authenticate): the same refusals, the same audit events, and each page allows
  what the matching API operation allows.
* Every POST carries a CSRF token (Flask-WTF); every page is a Jinja template with
  autoescaping, under a Content-Security-Policy that allows nothing but pkigate's own
  stylesheet (there is no script at all: confirmations are pages of their own).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, ParamSpec, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from flask import (
    Blueprint,
    Flask,
    Response,
    abort,
    g,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from flask.sessions import SecureCookieSessionInterface
from flask.typing import ResponseReturnValue
from flask_wtf.csrf import CSRFError, generate_csrf, validate_csrf
from wtforms.validators import ValidationError

from pkigate.core import CAStatus
from pkigate.core.access import DEFAULT_TEAM, Action
from pkigate.core.errors import BadRequestError, PkigateError
from pkigate.core.model import CertificateStatus, RevocationReason
from pkigate.core.store import CertificateRecord, CertificateScope
from pkigate.core.store import console as console_store
from pkigate.gateways import api
from pkigate.gateways.auth import (
    AuthenticationError,
    Principal,
    format_span,
    parse_networks,
    parse_span,
)
from pkigate.gateways.connectors import Connector
from pkigate.gateways.http import default_team_only, gateway, principal, requires, status_for
from pkigate.gateways.roles import Permission, Role, parse_roles

log = logging.getLogger("pkigate.console")

PREFIX = "/console"
COOKIE = "pkigate_console"
SECRET_NAME = "console:cookie-signing-key"  # noqa: S105 - the name, not the secret
# A session ends after this long without a request, and this long after sign-in at most.
IDLE_TIMEOUT = timedelta(minutes=30)
ABSOLUTE_TIMEOUT = timedelta(hours=8)
# last_seen_at is written at most this often: a page view is not a store write each time.
TOUCH_EVERY = timedelta(seconds=30)
PAGE = 50
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)

console = Blueprint(
    "console",
    __name__,
    template_folder="console_templates",
    static_folder="console_static",
    static_url_path="/static",
)

P = ParamSpec("P")
R = TypeVar("R")


class ConsoleCookies(SecureCookieSessionInterface):
    """Flask's signed-cookie session for /console only (the API, ACME and the rest never
    open one), signed with a key every host reads from the store."""

    def open_session(self, app: Flask, request: Any) -> Any:
        if not request.path.startswith(PREFIX + "/"):
            return None  # a null session: nothing outside the console reads or sets one
        if app.secret_key is None:
            from pkigate.core.audit import Actor

            app.secret_key = app.config["PKIGATE_GATEWAY"].core.secrets.get_or_create(
                SECRET_NAME, lambda: secrets.token_urlsafe(32), Actor("pkigate", "console")
            )
        return super().open_session(app, request)


def install(app: Flask) -> None:
    """Mount the console on the HTTPS app."""
    app.session_interface = ConsoleCookies()
    app.config.update(
        SESSION_COOKIE_NAME=COOKIE,
        SESSION_COOKIE_PATH=PREFIX,
        SESSION_COOKIE_SECURE=True,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        # The CSRF token lives as long as the session may; the session decides.
        WTF_CSRF_TIME_LIMIT=int(ABSOLUTE_TIMEOUT.total_seconds()),
    )
    from pkigate.gateways import console_access  # noqa: F401 - registers its pages

    app.register_blueprint(console, url_prefix=PREFIX)


# -- sessions --------------------------------------------------------------------------------


def _digest(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


def session_principal() -> Principal:
    """Who holds this console session: its token, while the session is within both
    timeouts and the token is not revoked (the console's ``authenticate`` for
    ``http.requires``)."""
    session_id = session.get("sid")
    if not isinstance(session_id, str):
        raise AuthenticationError("sign in to use the console")
    gw = gateway()
    now = gw.core.clock()
    digest = _digest(session_id)
    with gw.core.store.read() as conn:
        record = console_store.get_session(conn, digest)
    if record is None:
        raise AuthenticationError("this session has ended; sign in again")
    if now - record.last_seen_at > IDLE_TIMEOUT or now - record.created_at > ABSOLUTE_TIMEOUT:
        with gw.core.store.write() as conn:
            console_store.delete_session(conn, digest)
        raise AuthenticationError("this session has expired; sign in again")
    who: Principal = gw.tokens.principal(record.token_id, request.remote_addr, g.request_id)
    if now - record.last_seen_at > TOUCH_EVERY:
        with gw.core.store.write() as conn:
            console_store.touch_session(conn, digest, now)
    return who


def allowed(*permissions: Permission) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """The API's role check (and audit), with the console session as the credential: a
    page allows what the matching API operation allows (gateways/roles.py)."""
    return requires(*permissions, authenticate=session_principal)


@console.before_request
def check_csrf() -> None:
    """Every state-changing request carries the form's CSRF token (Flask-WTF)."""
    if request.method in ("GET", "HEAD"):
        return
    try:
        validate_csrf(request.form.get("csrf_token"))
    except ValidationError as exc:
        log.warning("console request refused: %s", exc, extra={"path": request.path})
        raise CSRFError(str(exc)) from None


@console.after_request
def security_headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Frame-Options"] = "DENY"
    if request.endpoint != "console.static":
        response.headers["Cache-Control"] = "no-store"
    return response


@console.errorhandler(CSRFError)
def csrf_refused(exc: CSRFError) -> tuple[str, int]:
    return page("error.html", title="Refused", message=f"Refused: {exc.description}"), 400


@console.errorhandler(PkigateError)
def pkigate_error(exc: PkigateError) -> ResponseReturnValue:
    if isinstance(exc, AuthenticationError) and request.method == "GET":
        session.pop("sid", None)
        return redirect(
            url_for("console.signin", next=request.full_path.rstrip("?"), reason=exc.message)
        )
    status = status_for(exc)
    return page("error.html", title="Refused" if status < 500 else "Error", message=exc.message), (
        status
    )


@console.app_template_global()
def csrf_token() -> str:
    return generate_csrf()  # type: ignore[no-any-return]


def page(template: str, **context: Any) -> str:
    """A console page, with the signed-in principal (if any) and the navigation its role
    may follow."""
    who: Principal | None = getattr(g, "principal", None)
    navigation = []
    if who is not None:
        for endpoint, label, permissions in NAVIGATION:
            if endpoint in DEFAULT_TEAM_PAGES and who.team != DEFAULT_TEAM:
                continue
            if any(who.may(p) for p in permissions):
                navigation.append((url_for(endpoint), label, request.endpoint == endpoint))
    return render_template(template, who=who, navigation=navigation, **context)


# The enrollment page: held requests for approvers, challenges and profiles for issuers.
ENROLLMENT = (Permission.APPROVE, Permission.ENROLL)
NAVIGATION = (
    ("console.home", "Dashboard", (Permission.READ_CAS,)),
    ("console.cas", "CAs", (Permission.READ_CAS,)),
    ("console.teams", "Teams", (Permission.READ_CAS,)),
    ("console.certificates", "Certificates", (Permission.READ_CERTIFICATES,)),
    ("console.enrollment", "Enrollment", ENROLLMENT),
    ("console.acme", "ACME", (Permission.READ_EAB,)),
    ("console.audit", "Audit", (Permission.READ_AUDIT,)),
    ("console.notifications", "Notifications", (Permission.MANAGE_NOTIFICATIONS,)),
    ("console.tokens", "Tokens", (Permission.MANAGE_TOKENS,)),
)
# Pages of what belongs to the whole gateway (http.default_team_only).
DEFAULT_TEAM_PAGES = frozenset({"console.notifications"})


@console.app_template_global()
def may(permission: str) -> bool:
    """Whether the signed-in token may do this (what a page shows it), by permission name."""
    who: Principal | None = getattr(g, "principal", None)
    return who is not None and who.may(Permission(permission))


# -- sign in and out -------------------------------------------------------------------------


EXPIRY_WINDOWS = (7, 30, 90)
CHART_DAYS = 14


@console.get("/")
@allowed(Permission.READ_CAS)
def home() -> str:
    """The dashboard: counts only (no certificate's details), so every role sees it, as
    /metrics shows the same figures without a token."""
    from pkigate.core.store.jobs import JobStatus

    gw = gateway()
    core = gw.core
    now = core.clock()
    start = (now - timedelta(days=CHART_DAYS - 1)).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    within = api.certificate_scope()
    readable = {view.record.id for view in api.readable_cas()}
    with core.store.read() as conn:
        expiring = [
            (
                days,
                core.store.count_certificates(
                    conn,
                    status=CertificateStatus.ISSUED.value,
                    not_expired_at=now,
                    expiring_before=now + timedelta(days=days),
                    within=within,
                ),
            )
            for days in EXPIRY_WINDOWS
        ]
        per_day = core.store.issued_per_day(conn, start, within)
    days = [(start + timedelta(days=i)).date().isoformat() for i in range(CHART_DAYS)]
    highest = max(per_day.values(), default=0) or 1
    # Bar lengths in twentieths: the stylesheet has a class for each (no inline styles).
    chart = [(day, per_day.get(day, 0), round(20 * per_day.get(day, 0) / highest)) for day in days]
    pending = sum(
        len(c.approvals.pending())
        for c in scep_connectors().values()
        if c.context.ca_id in readable
    )
    return page(
        "dashboard.html",
        title="Dashboard",
        rows=ca_rows(),
        expiring=expiring,
        chart=chart,
        pending=pending,
        failed_jobs=core.jobs.counts()[JobStatus.FAILED],
        anchor=core.audit.anchor_status(),
    )


@console.route("/signin", methods=["GET", "POST"])
def signin() -> ResponseReturnValue:
    reason = request.args.get("reason", "")[:200]
    if request.method == "GET":
        return page("signin.html", title="Sign in", reason=reason)
    gw = gateway()
    token = request.form.get("token", "").strip()
    try:
        who: Principal = gw.tokens.authenticate(f"Bearer {token}")
    except AuthenticationError as exc:
        log.info("console sign-in refused: %s", exc.message)
        return page("signin.html", title="Sign in", reason=exc.message), 401
    now = gw.core.clock()
    session_id = secrets.token_urlsafe(32)
    with gw.core.store.write() as conn:
        console_store.delete_stale_sessions(conn, now - IDLE_TIMEOUT, now - ABSOLUTE_TIMEOUT)
        console_store.insert_session(conn, _digest(session_id), who.token_id, now)
        gw.core.audit.record(
            conn, who.actor(g.request_id), "console.signin", f"token/{who.token_id}", at=now
        )
    # A new session, a new CSRF secret: nothing from before sign-in carries over.
    session.clear()
    session["sid"] = session_id
    target = request.args.get("next", "")
    if not target.startswith(PREFIX + "/") or target.startswith("//"):
        target = url_for("console.home")
    return redirect(target)


@console.post("/signout")
@allowed(Permission.READ_CAS)
def signout() -> ResponseReturnValue:
    gw = gateway()
    now = gw.core.clock()
    with gw.core.store.write() as conn:
        console_store.delete_session(conn, _digest(session["sid"]))
        gw.core.audit.record(
            conn,
            principal().actor(g.request_id),
            "console.signout",
            f"token/{principal().token_id}",
            at=now,
        )
    session.clear()
    return redirect(url_for("console.signin"))


# -- CAs -------------------------------------------------------------------------------------


def _tree(views: list[Any]) -> list[tuple[int, Any]]:
    """CAs in hierarchy order with their depth (roots first, each followed by its
    subordinates)."""
    children: dict[str | None, list[Any]] = {}
    ids = {v.record.id for v in views}
    for view in views:
        parent = view.record.parent_id if view.record.parent_id in ids else None
        children.setdefault(parent, []).append(view)

    def walk(parent: str | None, depth: int) -> Iterator[tuple[int, Any]]:
        for view in sorted(children.get(parent, []), key=lambda v: v.record.subject):
            yield depth, view
            yield from walk(view.record.id, depth + 1)

    return list(walk(None, 0))


def ca_rows() -> list[tuple[int, Any, int | None]]:
    """The CAs in hierarchy order: depth, view, and days until the certificate expires."""
    core = gateway().core
    now = core.clock()
    return [
        (depth, view, (view.record.not_after - now).days if view.record.not_after else None)
        for depth, view in _tree(api.readable_cas())
    ]


@console.get("/cas")
@allowed(Permission.READ_CAS)
def cas() -> str:
    return page("cas.html", title="CAs", rows=ca_rows())


def decode(der: bytes) -> dict[str, Any]:
    """A certificate's fields as the pages show them."""
    certificate = x509.load_der_x509_certificate(der)
    extensions = []
    for extension in certificate.extensions:
        name = getattr(extension.oid, "_name", None) or extension.oid.dotted_string
        value = extension.value
        if isinstance(value, x509.SubjectAlternativeName | x509.IssuerAlternativeName):
            text = ", ".join(str(n.value) for n in value)
        elif isinstance(value, x509.SubjectKeyIdentifier):
            text = value.digest.hex(":").upper()
        elif isinstance(value, x509.AuthorityKeyIdentifier) and value.key_identifier:
            text = value.key_identifier.hex(":").upper()
        elif isinstance(value, x509.ExtendedKeyUsage):
            text = ", ".join(getattr(u, "_name", u.dotted_string) for u in value)
        else:
            text = repr(value).removeprefix("<").removesuffix(">")
        extensions.append((name, "critical" if extension.critical else "", text))
    key = certificate.public_key()
    return {
        "subject": certificate.subject.rfc4514_string(),
        "issuer": certificate.issuer.rfc4514_string(),
        "serial": format(certificate.serial_number, "x"),
        "not_before": certificate.not_valid_before_utc,
        "not_after": certificate.not_valid_after_utc,
        "public_key": f"{type(key).__name__.removeprefix('_')} "
        f"{getattr(key, 'key_size', '')}".strip(),
        "signature_algorithm": getattr(certificate.signature_algorithm_oid, "_name", "unknown"),
        "sha256": certificate.fingerprint(hashes.SHA256()).hex(":").upper(),
        "pem": certificate.public_bytes(serialization.Encoding.PEM).decode(),
        "extensions": extensions,
    }


@console.get("/cas/<ca_id>")
@allowed(Permission.READ_CAS)
def ca_page(ca_id: str) -> str:
    core = gateway().core
    api.ca_for(ca_id, Action.READ)
    view = core.authorities.describe(ca_id)
    with core.store.read() as conn:
        partitions = core.store.current_crl_partition(conn, ca_id) or 0
    crls = [
        published
        for partition in range(partitions + 1)
        if (published := core.revocation.latest_crl(ca_id, partition)) is not None
    ]
    decoded = decode(view.record.certificate_der) if view.record.certificate_der else None
    # The policy, read-only, for its owning team (the API shows it to them alone too).
    policy = core.access.current_policy(ca_id) if principal().team == view.record.team else None
    return page(
        "ca.html",
        title=f"CA {view.record.subject}",
        view=view,
        certificate=decoded,
        crls=crls,
        settings=sorted(view.record.settings.items()),
        policy=policy,
        policy_json=json.dumps(policy.policy.to_json(), indent=2) if policy else "",
    )


@console.route("/cas/<ca_id>/<any(disable,enable):action>", methods=["GET", "POST"])
@allowed(Permission.MANAGE_CAS)
def ca_status_action(ca_id: str, action: str) -> ResponseReturnValue:
    return ca_action(ca_id, action)


@console.route("/cas/<ca_id>/<any(delete,restore):action>", methods=["GET", "POST"])
@allowed(Permission.DELETE_CAS)
def ca_delete_action(ca_id: str, action: str) -> ResponseReturnValue:
    return ca_action(ca_id, action)


def ca_action(ca_id: str, action: str) -> ResponseReturnValue:
    """A confirmation page naming the CA (GET), then the change (POST) once the operator
    has typed the CA's id. Disabling and enabling is a ca-admin's, deleting and restoring
    a ca-deleter's."""
    authorities = gateway().core.authorities
    api.ca_for(ca_id, Action.MANAGE)
    view = authorities.describe(ca_id)
    if request.method == "GET":
        return page("confirm_ca.html", title=f"{action.title()} CA", view=view, action=action)
    require_typed(ca_id, "the CA's id")
    who = principal().actor(g.request_id)
    if action == "disable":
        authorities.update_status(ca_id, CAStatus.DISABLED, who)
    elif action == "enable":
        authorities.update_status(ca_id, CAStatus.ACTIVE, who)
    elif action == "delete":
        authorities.delete(ca_id, 30, who)
    else:
        authorities.restore(ca_id, who)
    return redirect(url_for("console.ca_page", ca_id=ca_id))


def require_typed(expected: str, what: str) -> None:
    """The confirmation form's typed text is ``expected`` (a CA's id, a team's name), or a
    400. Not a secret, so a plain comparison: compare_digest refuses non-ASCII text with a
    TypeError, a 500 for whoever typed an accented letter."""
    if request.form.get("confirm", "").strip() != expected:
        raise BadRequestError(f"type {what} ({expected}) to confirm")


# -- certificates ----------------------------------------------------------------------------

FILTERS = ("ca", "status", "q", "serial", "template", "requester", "expiring_within")


@console.get("/certificates")
@allowed(Permission.READ_CERTIFICATES)
def certificates() -> str:
    core = gateway().core
    now = core.clock()
    wanted = {name: request.args.get(name, "").strip() for name in FILTERS}
    status = wanted["status"].upper()
    if status and status not in {s.value for s in CertificateStatus}:
        raise BadRequestError(f"unknown status {wanted['status']!r}")
    within = wanted["expiring_within"]
    after = api.query_position("after", request.args.get("after", "0"))
    # What the token may read: the CAs it may read, and of a CA shared with its team only
    # its team's certificates (the API's rules), chosen by the query before its page limit.
    readable = {v.record.id: v for v in api.readable_cas()}
    team = principal().team
    scope = CertificateScope(
        team,
        frozenset(ca_id for ca_id, v in readable.items() if v.record.team == team),
        frozenset(ca_id for ca_id, v in readable.items() if v.record.team != team),
    )
    with core.store.read() as conn:
        found = core.store.list_certificates(
            conn,
            ca_id=wanted["ca"] or None,
            status=status or None,
            text=wanted["q"] or None,
            serial=api.normalize_serial(wanted["serial"]) if wanted["serial"] else None,
            template=wanted["template"] or None,
            requester=wanted["requester"] or None,
            expiring_before=now + api.parse_duration(within, "expiring_within") if within else None,
            not_expired_at=now if within else None,
            limit=PAGE + 1,
            after_id=after,
            within=scope,
        )
    shown = found[:PAGE]
    next_page = None
    if len(found) > PAGE:
        arguments: dict[str, Any] = {k: v for k, v in wanted.items() if v}
        next_page = url_for("console.certificates", after=shown[-1].id, **arguments)
    return page(
        "certificates.html",
        title="Certificates",
        certificates=shown,
        wanted=wanted,
        next_page=next_page,
        authorities=list(readable.values()),
        statuses=[s.value for s in CertificateStatus],
    )


def certificate_events(record: CertificateRecord) -> list[Any]:
    """The audit events about this certificate (its issuance and revocation)."""
    core = gateway().core
    with core.store.read() as conn:
        events = core.store.find_audit_events(
            conn, action="certificate.", resource=f"ca/{record.ca_id}", limit=1000
        )
    mine = []
    for event in events:
        parameters = json.loads(event.parameters or "{}")
        if parameters.get("serial") == record.serial or (
            record.correlation_id and parameters.get("correlation_id") == record.correlation_id
        ):
            mine.append(event)
    return mine


@console.get("/certificates/<ca_id>/<serial>")
@allowed(Permission.READ_CERTIFICATES)
def certificate_page(ca_id: str, serial: str) -> str:
    core = gateway().core
    ca = api.ca_for(ca_id, Action.READ)
    with core.store.read() as conn:
        record = core.store.get_certificate(conn, ca_id, serial)
    if record is None or not api.own_or_owner(ca, record):
        abort(404)
    ca_pem, above = core.authorities.certificate_pem(ca_id)
    return page(
        "certificate.html",
        title=f"Certificate {record.subject}",
        record=record,
        certificate=decode(record.der),
        chain=ca_pem + above,
        events=certificate_events(record),
        reasons=[r.value for r in RevocationReason if r.value != "removeFromCRL"],
        may_revoke=principal().may(Permission.REVOKE),
    )


@console.post("/certificates/<ca_id>/<serial>/revoke")
@allowed(Permission.REVOKE)
def revoke_certificate(ca_id: str, serial: str) -> ResponseReturnValue:
    try:
        reason = RevocationReason(request.form.get("reason", ""))
    except ValueError:
        raise BadRequestError("choose a revocation reason") from None
    api.revoke(ca_id, serial, reason)
    return redirect(url_for("console.certificate_page", ca_id=ca_id, serial=serial))


# -- enrollment ------------------------------------------------------------------------------


def connectors_of(kind: type[Connector]) -> dict[str, Any]:
    """The configured connectors of one type, by name."""
    found: list[Connector] = gateway().connectors
    return {c.context.name: c for c in found if isinstance(c, kind)}


def connector_named(kind: type[Connector], name: str) -> Any:
    found = connectors_of(kind).get(name)
    if found is None:
        abort(404)
    return found


def scep_connectors() -> dict[str, Any]:
    from pkigate.scep.connector import ScepConnector

    return connectors_of(ScepConnector)


def scep_connector(name: str) -> Any:
    from pkigate.scep.connector import ScepConnector

    return connector_named(ScepConnector, name)


def adcs_connectors() -> dict[str, Any]:
    from pkigate.adcs.connector import AdcsConnector

    return connectors_of(AdcsConnector)


def enrollment_page(challenge: tuple[str, Any] | None = None) -> str:
    scep = scep_connectors()
    pending = [(name, held) for name, c in scep.items() for held in c.approvals.pending()]
    held_adcs = [
        (name, held.to_json())
        for name, c in adcs_connectors().items()
        for held in c.service.pending()
    ]
    return page(
        "enrollment.html",
        title="Enrollment",
        connectors=gateway().connectors,
        scep=scep,
        pending=pending,
        adcs_pending=held_adcs,
        challenge=challenge,
    )


@console.get("/enrollment")
@allowed(*ENROLLMENT)
def enrollment() -> str:
    return enrollment_page()


@console.post("/enrollment/scep/<name>/pending/approve")
@allowed(Permission.APPROVE)
def approve(name: str) -> ResponseReturnValue:
    transaction_id = request.form.get("transaction_id", "")
    connector = scep_connector(name)
    connector.authorize_decision(transaction_id)
    connector.approvals.approve(transaction_id, principal().actor(g.request_id))
    return redirect(url_for("console.enrollment"))


@console.post("/enrollment/scep/<name>/pending/reject")
@allowed(Permission.APPROVE)
def reject(name: str) -> ResponseReturnValue:
    transaction_id = request.form.get("transaction_id", "")
    reason = request.form.get("reason", "")
    connector = scep_connector(name)
    connector.authorize_decision(transaction_id)
    connector.approvals.reject(transaction_id, principal().actor(g.request_id), reason)
    return redirect(url_for("console.enrollment"))


def adcs_request(name: str) -> tuple[Any, int]:
    connector = adcs_connectors().get(name)
    if connector is None:
        abort(404)
    try:
        return connector, int(request.form.get("request_id", ""))
    except ValueError:
        raise BadRequestError("request_id must be a number") from None


@console.post("/enrollment/adcs/<name>/pending/approve")
@allowed(Permission.APPROVE)
def approve_adcs(name: str) -> ResponseReturnValue:
    from pkigate.adcs.connector import unavailable_message
    from pkigate.adcs.ldapdir import DirectoryError

    connector, request_id = adcs_request(name)
    try:
        connector.authorize_decision(request_id)
        connector.approve_pending(request_id, principal().actor(g.request_id))
    except DirectoryError as exc:
        return page("error.html", title="Unavailable", message=unavailable_message(exc)), 503
    return redirect(url_for("console.enrollment"))


@console.post("/enrollment/adcs/<name>/pending/reject")
@allowed(Permission.APPROVE)
def reject_adcs(name: str) -> ResponseReturnValue:
    from pkigate.adcs.connector import unavailable_message
    from pkigate.adcs.ldapdir import DirectoryError

    connector, request_id = adcs_request(name)
    reason = request.form.get("reason", "")
    try:
        connector.authorize_decision(request_id)
    except DirectoryError as exc:
        return page("error.html", title="Unavailable", message=unavailable_message(exc)), 503
    connector.service.reject(request_id, principal().actor(g.request_id), reason)
    return redirect(url_for("console.enrollment"))


@console.post("/enrollment/scep/<name>/challenges")
@allowed(Permission.ENROLL)
def create_challenge(name: str) -> str:
    connector = scep_connector(name)
    if not connector.options.dynamic_challenges:
        raise BadRequestError("this connector does not accept one-time challenges")
    subject = request.form.get("subject", "").strip() or None
    issued = connector.authority.create_challenge(
        principal().actor(g.request_id),
        ttl=connector.options.dynamic_challenge_ttl,
        subject=subject,
    )
    return enrollment_page((name, issued))


@console.post("/enrollment/scep/<name>/profile")
@allowed(Permission.ENROLL)
def download_profile(name: str) -> Response:
    connector = scep_connector(name)
    subject = request.form.get("subject", "").strip() or "CN=device"
    document = connector.profile(
        principal().actor(g.request_id),
        subject,
        request.form.get("one_time") == "on",
        "org.pkigate.scep",
    )
    return Response(
        document,
        mimetype="application/x-apple-aspen-config",
        headers={"Content-Disposition": f'attachment; filename="{name}.mobileconfig"'},
    )


def acme_connector(name: str) -> Any:
    from pkigate.acme.connector import AcmeConnector

    return connector_named(AcmeConnector, name)


@console.get("/acme")
@allowed(Permission.READ_EAB)
def acme() -> str:
    """ACME accounts and EAB keys, as the EAB API allows them to be read (admins and
    auditors)."""
    return acme_page()


def acme_page(created: tuple[str, Any, str] | None = None) -> str:
    from pkigate.acme.connector import AcmeConnector
    from pkigate.core.store import acme as acme_store

    core = gateway().core
    with core.store.read() as conn:
        listed = [
            (connector, acme_store.accounts(conn, name, PAGE), acme_store.eab_keys(conn, name))
            for name, connector in connectors_of(AcmeConnector).items()
        ]
    return page("acme.html", title="ACME", connectors=listed, created=created)


@console.post("/acme/<name>/eab-keys")
@allowed(Permission.MANAGE_EAB)
def create_eab_key(name: str) -> str:
    label = request.form.get("label", "").strip()[:256] or None
    record, secret = acme_connector(name).create_eab_key(
        principal().actor(g.request_id), label=label, allowed=None, default_profile=None
    )
    return acme_page((name, record, secret))


@console.post("/acme/<name>/eab-keys/<kid>/revoke")
@allowed(Permission.MANAGE_EAB)
def revoke_eab_key(name: str, kid: str) -> ResponseReturnValue:
    acme_connector(name).revoke_eab_key(principal().actor(g.request_id), kid)
    return redirect(url_for("console.acme"))


# -- audit -----------------------------------------------------------------------------------


AUDIT_FILTERS = ("actor", "action", "resource", "since", "until", "request_id")


@console.get("/audit")
@allowed(Permission.READ_AUDIT)
def audit() -> str:
    core = gateway().core
    wanted = {name: request.args.get(name, "").strip() for name in AUDIT_FILTERS}
    before = (
        api.query_position("before", request.args["before"]) if request.args.get("before") else None
    )
    events = api.find_audit_events(core.store, wanted, PAGE + 1, before, api.audit_scope())
    shown = events[:PAGE]
    next_page = None
    if len(events) > PAGE:
        arguments: dict[str, Any] = {k: v for k, v in wanted.items() if v}
        next_page = url_for("console.audit", before=shown[-1].seq, **arguments)
    verification = None
    if request.args.get("verify") and principal().may(Permission.AUDIT_REPORTS):
        verification = core.audit.verify()
    return page(
        "audit.html",
        title="Audit",
        events=shown,
        wanted=wanted,
        next_page=next_page,
        verification=verification,
        is_auditor=principal().may(Permission.AUDIT_REPORTS),
        authorities=api.readable_cas(),
    )


@console.get("/audit/report")
@allowed(Permission.AUDIT_REPORTS)
def audit_report() -> Response:
    from pkigate.core.audit import render_report, report_rows

    core = gateway().core
    ca_id = request.args.get("ca", "")
    kind = request.args.get("format", "json")
    if kind not in ("json", "csv"):
        raise BadRequestError("format is json or csv")
    ca = api.ca_for(ca_id, Action.READ)
    with core.store.read() as conn:
        rows = report_rows(
            core.store.list_certificates(conn, ca_id=ca_id, team=api.team_filter(ca))
        )
    body = (
        render_report(rows, "csv")
        if kind == "csv"
        else json.dumps({"ca_id": ca_id, "certificates": rows}, indent=2, default=str)
    )
    return Response(
        body,
        mimetype="text/csv" if kind == "csv" else "application/json",
        headers={"Content-Disposition": f'attachment; filename="audit-{ca_id}.{kind}"'},
    )


# -- notifications ---------------------------------------------------------------------------


@console.get("/notifications")
@allowed(Permission.MANAGE_NOTIFICATIONS)
def notifications() -> str:
    """Where events go, read-only: the configuration's and the API's destinations (made and
    changed with the API or `pkigate notifications`), with their delivery counts."""
    default_team_only("see notification destinations")
    return page(
        "notifications.html",
        title="Notifications",
        destinations=gateway().destinations.list(),
    )


# -- tokens ----------------------------------------------------------------------------------


@console.route("/tokens", methods=["GET", "POST"])
@allowed(Permission.MANAGE_TOKENS)
def tokens() -> str:
    """The tokens this token manages (its team's, or every one for the default team's)
    with their roles, expiry and last use; a new one for its team with one or more
    roles, a lifetime and client networks (the API's createToken)."""
    service = gateway().tokens
    created = None
    if request.method == "POST":
        roles, expires_in, allow_from = _token_form()
        created = service.create(
            request.form.get("name", "").strip(),
            roles,
            principal().actor(g.request_id),
            expires_in=expires_in,
            allow_from=allow_from,
            team=principal().team,
            caller=principal(),
        )
    return tokens_page(created)


def _token_form() -> tuple[tuple[Role, ...], timedelta | None, tuple[str, ...]]:
    """The roles, lifetime (None: not given) and client networks (separated by commas or
    spaces) of the create and change forms."""
    form = request.form
    try:
        lifetime = form.get("expires_in", "").strip()
        return (
            parse_roles(form.getlist("roles")),
            parse_span(lifetime) if lifetime else None,
            parse_networks(form.get("allow_from", "").replace(",", " ").split()),
        )
    except ValueError as exc:
        raise BadRequestError(str(exc)) from None


def tokens_page(created: Any = None) -> str:
    service = gateway().tokens
    return page(
        "tokens.html",
        title="Tokens",
        tokens=api.visible_tokens(),
        created=created,
        roles=[r.value for r in Role],
        now=gateway().core.clock(),
        max_overlap=format_span(service.policy.max_rotation_overlap),
    )


@console.post("/tokens/<token_id>/rotate")
@allowed(Permission.MANAGE_TOKENS)
def rotate_token(token_id: str) -> str:
    """A new secret, shown once; the old one works for the overlap asked for."""
    try:
        overlap = parse_span(request.form.get("overlap", "").strip() or "0s")
    except ValueError as exc:
        raise BadRequestError(str(exc)) from None
    api.check_own_token(token_id)
    rotated = gateway().tokens.rotate(
        token_id, overlap, principal().actor(g.request_id), principal()
    )
    return tokens_page(rotated)


@console.post("/tokens/<token_id>/update")
@allowed(Permission.MANAGE_TOKENS)
def update_token(token_id: str) -> ResponseReturnValue:
    """New roles, client networks (empty: anywhere) and, if given, a new expiry (the
    API's updateToken)."""
    roles, expires_in, allow_from = _token_form()
    api.check_own_token(token_id)
    gateway().tokens.update(
        token_id,
        principal().actor(g.request_id),
        roles=roles,
        allow_from=allow_from,
        expires_in=expires_in,
        caller=principal(),
    )
    return redirect(url_for("console.tokens"))


@console.post("/tokens/<token_id>/revoke")
@allowed(Permission.MANAGE_TOKENS)
def revoke_token(token_id: str) -> ResponseReturnValue:
    api.check_own_token(token_id)
    gateway().tokens.revoke(token_id, principal().actor(g.request_id))
    return redirect(url_for("console.tokens"))
