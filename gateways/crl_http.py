"""CRLs over plain HTTP at the CRL distribution point URLs (DER, application/pkix-crl)."""

from __future__ import annotations

from flask import Blueprint, Response

from pkigate.core.errors import NotFoundError
from pkigate.gateways.http import gateway

crl = Blueprint("crl", __name__)


def _serve(ca_id: str, partition: int) -> Response:
    core = gateway().core
    settings = core.authorities.describe(ca_id).record.settings
    if not settings.get("crl_enabled"):
        raise NotFoundError(f"CA {ca_id} does not publish CRLs")
    published = core.revocation.current_crl(ca_id, partition)
    max_age = max(0, int((published.next_update - core.clock()).total_seconds()))
    return Response(
        published.der,
        mimetype="application/pkix-crl",
        headers={
            "Cache-Control": f"public, max-age={min(max_age, 300)}",
            "Last-Modified": published.this_update.strftime("%a, %d %b %Y %H:%M:%S GMT"),
            "Expires": published.next_update.strftime("%a, %d %b %Y %H:%M:%S GMT"),
        },
    )


@crl.get("/crl/<ca_id>.crl")
def complete_crl(ca_id: str) -> Response:
    return _serve(ca_id, 0)


@crl.get("/crl/<ca_id>/<int:partition>.crl")
def partition_crl(ca_id: str, partition: int) -> Response:
    return _serve(ca_id, partition)
