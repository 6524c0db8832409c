"""OCSP over plain HTTP: ``POST /ocsp/<ca id>`` and ``GET /ocsp/<ca id>/<base64 request>``.

RFC 6960 appendix A.1 defines both forms; RFC 5019 section 6 the caching headers of GET
answers. Every answer is an ``application/ocsp-response`` (an unsuccessful OCSPResponse
for bad input) with status 200, except for a body over 64 KiB (413), another method (405)
or a POST to a longer path (404), which carry a malformedRequest body; never a 500.

The routes are a WSGI middleware in front of the Flask application rather than a
blueprint: relying parties poll OCSP far more often than anything else is asked of
pkigate, and Flask's request machinery (request context, before/after hooks, a JSON log
line per request) costs several times what answering from the store does. The middleware
keeps the request-duration metric and the X-Request-Id header; it logs only failures.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import re
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from urllib.parse import unquote
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from pkigate.core.ocsp import (
    INTERNAL_ERROR,
    MALFORMED,
    MAX_REQUEST_BYTES,
    UNAUTHORIZED,
    OCSPAnswer,
)
from pkigate.gateways import metrics

if TYPE_CHECKING:
    from flask import Flask

    from pkigate.core.ocsp import OCSPResponder
    from pkigate.gateways.runtime import Gateway

log = logging.getLogger("pkigate.http.ocsp")

PREFIX = "/ocsp/"
RESPONSE_TYPE = "application/ocsp-response"
ENDPOINT = "/ocsp/<ca_id>"
_CA_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_BASE64_URLSAFE = str.maketrans("-_", "+/")

Headers = list[tuple[str, str]]


def install(app: Flask, gw: Gateway, listener: str) -> None:
    """Answer ``/ocsp/...`` ahead of the Flask application ``app``."""
    app.wsgi_app = OCSPMiddleware(app.wsgi_app, gw.core.ocsp, listener)  # type: ignore[method-assign]


def decode_get_request(encoded: str) -> bytes | None:
    """The DER request in a GET path: URL-encoded base64 (RFC 6960 A.1.1).

    The WSGI server has already percent-decoded the path once. Clients differ in what they
    escape (some leave '+' and '/' raw, some also use the URL-safe alphabet or drop the
    padding), so all of these are accepted.
    """
    if "%" in encoded:
        encoded = unquote(encoded)
    text = encoded.strip().translate(_BASE64_URLSAFE)
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _http_date(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")


class OCSPMiddleware:
    def __init__(self, app: WSGIApplication, responder: OCSPResponder, listener: str) -> None:
        self._app = app
        self._responder = responder
        self._listener = listener

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path: str = environ.get("PATH_INFO", "")
        if not path.startswith(PREFIX):
            return self._app(environ, start_response)
        started = time.perf_counter()
        try:
            status, headers, answer = self._handle(environ, path[len(PREFIX) :])
        except Exception:
            log.exception("OCSP request failed", extra={"path": path[:200]})
            status, headers, answer = 200, [], INTERNAL_ERROR
        metrics.record_ocsp(answer.status.value, answer.cached)
        body = answer.der
        supplied = environ.get("HTTP_X_REQUEST_ID", "")
        headers += [
            ("Content-Type", RESPONSE_TYPE),
            ("Content-Length", str(len(body))),
            ("X-Request-Id", supplied if _REQUEST_ID.match(supplied) else os.urandom(16).hex()),
        ]
        start_response(_STATUS_LINES[status], headers)
        metrics.observe_request(self._listener, ENDPOINT, status, time.perf_counter() - started)
        # HEAD: the headers GET would send, no body (RFC 9110 9.3.2).
        return [b""] if environ.get("REQUEST_METHOD") == "HEAD" else [body]

    def _handle(self, environ: WSGIEnvironment, rest: str) -> tuple[int, Headers, OCSPAnswer]:
        method = environ.get("REQUEST_METHOD", "GET")
        ca_id, _, encoded = rest.partition("/")
        if method == "POST":
            if encoded:  # POST /ocsp/<ca id>/something: not a form RFC 6960 defines
                return 404, [], MALFORMED
            request = self._read_body(environ)
            if request is None:
                return 413, [], MALFORMED
            return 200, [("Cache-Control", "no-store")], self._answer(ca_id, request)
        if method in ("GET", "HEAD"):
            decoded = decode_get_request(encoded) if encoded else None
            if decoded is None:
                return 200, [("Cache-Control", "no-store")], MALFORMED
            answer = self._answer(ca_id, decoded)
            return 200, _cache_headers(answer), answer
        return 405, [("Allow", "GET, HEAD, POST"), ("Cache-Control", "no-store")], MALFORMED

    def _answer(self, ca_id: str, request: bytes) -> OCSPAnswer:
        if not _CA_ID.match(ca_id):
            return UNAUTHORIZED  # no CA has such an id
        return self._responder.answer(ca_id, request)

    @staticmethod
    def _read_body(environ: WSGIEnvironment) -> bytes | None:
        """The request body, or None when it is over MAX_REQUEST_BYTES."""
        declared = environ.get("CONTENT_LENGTH") or ""
        try:
            length = int(declared) if declared else None
        except ValueError:
            length = None
        if length is not None and (length < 0 or length > MAX_REQUEST_BYTES):
            return None
        body: bytes = environ["wsgi.input"].read(
            length if length is not None else MAX_REQUEST_BYTES + 1
        )
        return body if len(body) <= MAX_REQUEST_BYTES else None


def _cache_headers(answer: OCSPAnswer) -> Headers:
    """RFC 5019 section 6.2: let HTTP caches keep a nonce-less answer until nextUpdate."""
    if not answer.cacheable or answer.this_update is None or answer.next_update is None:
        return [("Cache-Control", "no-store")]
    max_age = int((answer.next_update - datetime.now(UTC)).total_seconds())
    if max_age <= 0:
        return [("Cache-Control", "no-cache")]
    return [
        ("Cache-Control", f"max-age={max_age}, public, no-transform, must-revalidate"),
        ("Last-Modified", _http_date(answer.this_update)),
        ("Expires", _http_date(answer.next_update)),
        ("ETag", '"' + hashlib.sha256(answer.der).hexdigest()[:32] + '"'),
    ]


_STATUS_LINES = {
    200: "200 OK",
    404: "404 Not Found",
    405: "405 Method Not Allowed",
    413: "413 Content Too Large",
}
