"""The Flask application factory: one WSGI app per listener (plain HTTP, HTTPS)."""

from __future__ import annotations

import logging
import time
from typing import Literal

from flask import Blueprint, Flask, Response, g, request
from werkzeug.exceptions import HTTPException

from pkigate.core.errors import BadRequestError, PkigateError
from pkigate.core.signing import is_software
from pkigate.gateways import metrics
from pkigate.gateways.http import (
    AnyText,
    assign_request_id,
    error_reply,
    error_response,
    gateway,
)
from pkigate.gateways.runtime import Gateway

log = logging.getLogger("pkigate.http")

publication = Blueprint("publication", __name__)


@publication.get("/ca/<ca_id>.cer")
def ca_certificate_der(ca_id: str) -> Response:
    """The CA certificate at its AIA caIssuers URL (RFC 5280 4.2.2.1: DER)."""
    record = gateway().core.authorities.get(ca_id)
    if record.certificate_der is None:
        return error_response(404, "notFound", f"CA {ca_id} has no certificate yet")
    return Response(
        record.certificate_der,
        mimetype="application/pkix-cert",
        headers={"Cache-Control": "public, max-age=3600"},
    )


@publication.get("/ca/<ca_id>.pem")
def ca_certificate_pem(ca_id: str) -> Response:
    certificate, chain = gateway().core.authorities.certificate_pem(ca_id)
    return Response(certificate + chain, mimetype="application/x-pem-file")


@publication.get("/healthz")
def healthz() -> Response:
    return Response('{"status":"ok"}', mimetype="application/json")


@publication.get("/readyz")
def readyz() -> Response:
    gw = gateway()
    problems = []
    try:
        gw.core.store.ping()
        anchored = gw.core.audit.anchor_status()
        if anchored.message is not None:
            problems.append(anchored.message)
    except Exception as exc:
        problems.append(f"store: {type(exc).__name__}")
    for name, ca_id in gw.ca_ids.items():
        try:
            key = gw.core.authorities.signing_material(ca_id, gw.core.clock()).private_key
            if not is_software(key):  # on the token now, not just in the store
                key.check()
        except PkigateError as exc:
            problems.append(f"ca {name}: {exc.message}")
    if problems:
        return error_response(503, "notReady", "; ".join(problems))
    return Response('{"status":"ready"}', mimetype="application/json")


@publication.get("/metrics")
def prometheus_metrics() -> Response:
    return Response(metrics.render(gateway().core), content_type=metrics.CONTENT_TYPE)


# Where a NUL in the URL is refused before routing (see start() below).
_NUL_CHECKED = ("/api/", "/console")


def create_app(gw: Gateway, listener: Literal["http", "https"]) -> Flask:
    app = Flask(f"pkigate-{listener}")
    app.config["PKIGATE_GATEWAY"] = gw
    app.config["MAX_CONTENT_LENGTH"] = gw.config.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.url_map.strict_slashes = False
    app.url_map.converters["anytext"] = AnyText

    @app.before_request
    def start() -> None:
        g.started = time.perf_counter()
        assign_request_id()
        # No name or filter of the management API or the console holds a NUL, and
        # PostgreSQL text cannot (a DataError, a 500, where one reaches a query). The
        # enrollment protocols answer a NUL in their own error formats (ACME's
        # problem+json, SCEP's and WSTEP's), so they are left to do so.
        if request.path.startswith(_NUL_CHECKED) and (
            "\x00" in request.path
            or any("\x00" in k + v for k, v in request.args.items(multi=True))
        ):
            raise BadRequestError("the URL holds a NUL (%00)")

    @app.after_request
    def finish(response: Response) -> Response:
        response.headers["X-Request-Id"] = getattr(g, "request_id", "")
        elapsed = time.perf_counter() - getattr(g, "started", time.perf_counter())
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.observe_request(listener, endpoint, response.status_code, elapsed)
        log.info(
            "request",
            extra={
                "method": request.method,
                "path": request.path,
                "status": response.status_code,
                "ms": round(elapsed * 1000, 2),
                "listener": listener,
            },
        )
        return response

    @app.errorhandler(PkigateError)
    def pkigate_error(exc: PkigateError) -> Response:
        return error_reply(exc)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        code = {
            404: "notFound",
            405: "methodNotAllowed",
            413: "payloadTooLarge",
            415: "unsupportedMediaType",
        }.get(exc.code or 500, "badRequest")
        headers = dict(exc.get_response().headers) if exc.code == 405 else {}
        allow = {"Allow": headers["Allow"]} if "Allow" in headers else {}
        message = exc.description or exc.name
        if exc.code == 413:
            message = f"request body over {gw.config.max_body_bytes} bytes"
        return error_response(exc.code or 500, code, message, allow)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        log.exception("unhandled error")
        return error_response(
            500, "internalError", "internal error; the request id is in the server log"
        )

    app.register_blueprint(publication)
    from pkigate.gateways.crl_http import crl

    app.register_blueprint(crl)
    from pkigate.gateways.ocsp_http import install as install_ocsp

    install_ocsp(app, gw, listener)
    if listener == "https":
        from pkigate.gateways import api_access  # noqa: F401 - registers its routes
        from pkigate.gateways.api import api

        app.register_blueprint(api, url_prefix="/api/v1")
        from pkigate.gateways import console

        console.install(app)
    for connector in gw.connectors:
        if connector.listener == listener:
            app.register_blueprint(
                connector.blueprint(),
                url_prefix=connector.context.mount,
                name=f"connector_{connector.context.name}",
            )
        elif (elsewhere := connector.elsewhere_blueprint()) is not None:
            app.register_blueprint(
                elsewhere,
                url_prefix=connector.context.mount,
                name=f"elsewhere_{connector.context.name}",
            )
        admin = connector.admin_blueprint()
        if admin is not None and listener == "https":
            app.register_blueprint(
                admin,
                url_prefix=f"/api/v1/connectors/{connector.context.name}",
                name=f"admin_{connector.context.name}",
            )
    return app
