"""The management REST API under /api/v1, through Flask's test client, on SQLite and PostgreSQL.

Every response is checked against the OpenAPI document the server publishes (its status
must be declared for the operation, its body must match the declared schema with no field
the schema does not name), so the document and the routes cannot drift apart unnoticed.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
from conftest import fresh_postgres_database
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flask import Blueprint, Flask, Response, jsonify
from flask.testing import FlaskClient
from helpers import make_csr
from werkzeug.exceptions import HTTPException
from werkzeug.test import TestResponse

from pkigate.core import Actor
from pkigate.core.store import AuditEventRecord
from pkigate.gateways import runtime
from pkigate.gateways.app import create_app
from pkigate.gateways.auth import TOKEN_RECORD_SECONDS, AuthenticationError, Role, TokenService
from pkigate.gateways.config import parse_config
from pkigate.gateways.connectors import Connector
from pkigate.gateways.http import requires
from pkigate.gateways.roles import Permission
from pkigate.gateways.runtime import Gateway

API = "/api/v1"
ROLES = ("admin", "issuer", "auditor")


def _strict(schema: Any) -> Any:
    """The schema with every object closed: a response field the document omits fails."""
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: _strict(value) for key, value in schema.items()}
    if "properties" in closed and "additionalProperties" not in closed:
        closed["additionalProperties"] = False
    return closed


@dataclass
class Service:
    """A gateway, its HTTPS app, a test client and one token per role."""

    gw: Gateway
    app: Flask
    client: FlaskClient
    secrets: dict[str, str]
    document: dict[str, Any]

    @property
    def root_id(self) -> str:
        return self.gw.ca_ids["root"]

    @property
    def issuing_id(self) -> str:
        return self.gw.ca_ids["issuing"]

    def call(
        self,
        method: str,
        path: str,
        role: str | None = None,
        *,
        expect: int | None = None,
        headers: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> TestResponse:
        all_headers = dict(headers or {})
        if role is not None:
            all_headers["Authorization"] = f"Bearer {self.secrets[role]}"
        response = self.client.open(API + path, method=method, headers=all_headers, **kwargs)
        if expect is not None:
            assert response.status_code == expect, response.get_data(as_text=True)
        self.check_against_document(method, API + path, response)
        return response

    def check_against_document(self, method: str, url: str, response: TestResponse) -> None:
        body = response.get_data(as_text=True)
        assert "Traceback" not in body
        path = urlsplit(url).path
        try:
            endpoint, _ = self.app.url_map.bind("localhost").match(path, method)
        except HTTPException:
            endpoint = None
        if endpoint is None or not endpoint.startswith("api."):
            assert response.mimetype == "application/json"
            self.validate(response.get_json(), {"$ref": "#/components/schemas/Error"})
            return
        operation = self.operation(endpoint.removeprefix("api."))
        status = str(response.status_code)
        assert status in operation["responses"] or response.status_code >= 500, (
            f"{method} {path} answered {status}, which its operation does not declare"
        )
        entry = operation["responses"].get(status) or operation["responses"]["default"]
        content = entry.get("content", {})
        assert response.mimetype in content, (method, path, response.mimetype)
        if response.mimetype == "application/json":
            self.validate(response.get_json(), content["application/json"]["schema"])

    def operation(self, operation_id: str) -> dict[str, Any]:
        for operations in self.document["paths"].values():
            for operation in operations.values():
                if operation["operationId"] == operation_id:
                    return dict(operation)
        raise AssertionError(f"operation {operation_id} is not in the document")

    def validate(self, instance: Any, schema: Mapping[str, Any]) -> None:
        root = _strict({**schema, "components": self.document["components"]})
        jsonschema.Draft202012Validator(root).validate(instance)

    # -- observing the store ---------------------------------------------------------------

    def counts(self) -> tuple[int, int, int]:
        """CAs, certificates and tokens: what a refused request must leave as it was."""
        core = self.gw.core
        with core.store.read() as conn:
            certificates = core.store.count_certificates(conn)
        return len(core.authorities.list_cas()), certificates, len(self.gw.tokens.list())

    def events(self, response: TestResponse) -> list[AuditEventRecord]:
        request_id = response.headers["X-Request-Id"]
        return [e for e in self.gw.core.audit.events() if e.request_id == request_id]

    def principal(self, role: str) -> str:
        token_id = self.secrets[role].split("_")[1]
        return f"token:{role}-token({token_id})"


def _open_service(data_dir: Path, database_url: str | None, extra: str = "") -> Service:
    toml = f"data_dir = '{data_dir}'\n"
    if database_url:
        toml += f"database_url = '{database_url}'\n"
    gw = Gateway.open(parse_config(toml + extra), bootstrap=True)
    app = create_app(gw, "https")
    secrets = {
        role: gw.tokens.create(f"{role}-token", Role(role), Actor("test")).secret for role in ROLES
    }
    client = app.test_client()
    document = client.get(f"{API}/openapi.json").get_json()
    return Service(gw, app, client, secrets, document)


def _database_url(request: pytest.FixtureRequest) -> str | None:
    if request.param == "sqlite":
        return None
    return fresh_postgres_database(request.getfixturevalue("postgres_server"))


@pytest.fixture(params=["sqlite", "postgres"])
def service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Service]:
    opened = _open_service(tmp_path / "data", _database_url(request))
    yield opened
    opened.gw.close()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def shared(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    """One service for the many refusal cases, which must change nothing anyway."""
    opened = _open_service(tmp_path_factory.mktemp("shared"), _database_url(request))
    yield opened
    opened.gw.close()


def _csr_pem(cn: str = "host.example.test") -> str:
    return make_csr(cn).decode()


def _issue(service: Service, cn: str = "host.example.test", **fields: Any) -> dict[str, Any]:
    response = service.call(
        "POST",
        f"/cas/{service.issuing_id}/certificates",
        "issuer",
        json={"csr": _csr_pem(cn), **fields},
        expect=201,
    )
    return dict(response.get_json())


# -- the OpenAPI document ----------------------------------------------------------------------


def _registered_routes(app: Flask) -> set[tuple[str, str]]:
    routes = set()
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith(API + "/"):
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule.removeprefix(API))
        routes |= {
            (method, path) for method in rule.methods or () if method not in ("HEAD", "OPTIONS")
        }
    return routes


def _documented_routes(document: Mapping[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, operations in document["paths"].items()
        for method in operations
    }


def test_openapi_document_lists_exactly_the_registered_routes_with_their_roles(
    service: Service,
) -> None:
    document = service.call("GET", "/openapi.json", expect=200).get_json()
    assert document["openapi"].startswith("3.1")
    assert document["servers"] == [{"url": API}]
    assert _documented_routes(document) == _registered_routes(service.app)
    scheme = next(iter(document["components"]["securitySchemes"]))
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            if path == "/openapi.json":
                assert operation["security"] == [], "the document itself needs no token"
                continue
            (requirement,) = operation["security"]
            roles = requirement[scheme]
            assert roles and set(roles) <= {r.value for r in Role}, (method, path, roles)
    security = {
        (m.upper(), p): ops[m]["security"][0][scheme]
        for p, ops in document["paths"].items()
        for m in ops
        if ops[m]["security"]
    }
    assert security[("POST", "/cas")] == ["admin", "ca-admin"]
    assert security[("DELETE", "/cas/{ca_id}")] == ["admin", "ca-deleter"]
    assert security[("POST", "/cas/{ca_id}/certificates")] == ["issuer"]
    assert security[("GET", "/audit/verify")] == ["auditor"]
    assert set(security[("GET", "/cas")]) == {r.value for r in Role}
    assert set(security[("GET", "/cas/{ca_id}/certificates")]) == {
        "admin",
        "issuer",
        "revoker",
        "auditor",
    }


def test_openapi_document_is_a_valid_openapi_3_1_document(service: Service) -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(service.document)


class ChallengeConnector(Connector):
    """A connector with an admin resource under /api/v1/connectors/<name>/."""

    type_name = "challenge"

    def blueprint(self) -> Blueprint:
        return Blueprint("challenge", __name__)

    def admin_blueprint(self) -> Blueprint:
        admin = Blueprint("challenge_admin", __name__)

        @admin.post("/challenges")
        @requires(Permission.ISSUE)
        def create_challenge() -> Response:
            """Create a one-time enrollment challenge."""
            return jsonify({"challenge": "x"})

        return admin


def test_openapi_document_lists_connector_admin_routes_with_their_roles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runtime, "discover", lambda: {"challenge": ChallengeConnector})
    opened = _open_service(tmp_path / "data", None)
    try:
        document = opened.call("GET", "/openapi.json", expect=200).get_json()
        assert _documented_routes(document) == _registered_routes(opened.app)
        operation = document["paths"]["/connectors/challenge/challenges"]["post"]
        assert operation["security"] == [{"bearerToken": ["issuer"]}]
        assert operation["summary"] == "Create a one-time enrollment challenge."
        pytest.importorskip("openapi_spec_validator").validate(document)
    finally:
        opened.gw.close()


# -- CAs ---------------------------------------------------------------------------------------


def _outside_root() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Outside Root")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _sign_outside(
    csr_pem: str, key: ec.EllipticCurvePrivateKey, root: x509.Certificate
) -> x509.Certificate:
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(root.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )


def _pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def test_admin_creates_a_root_and_every_role_reads_it(service: Service) -> None:
    response = service.call(
        "POST",
        "/cas",
        "admin",
        json={
            "type": "ROOT",
            "subject": "CN=API Root,O=pkigate tests",
            "key_algorithm": "EC_secp384r1",
            "validity": {"type": "YEARS", "value": 5},
            "settings": {"crl_url": "http://pki.test/crl", "backdate_seconds": 60},
            "tags": {"team": "pki"},
        },
        expect=201,
    )
    ca = response.get_json()
    assert response.headers["Location"] == f"{API}/cas/{ca['id']}"
    assert ca["status"] == "ACTIVE"
    assert ca["key_algorithm"] == "EC_secp384r1"
    assert ca["signing_algorithm"] == "SHA384WITHECDSA"
    assert ca["settings"]["crl_url"] == "http://pki.test/crl"
    assert ca["tags"] == {"team": "pki"}
    not_after = datetime.fromisoformat(ca["not_after"])
    assert timedelta(days=365 * 5 - 2) < not_after - datetime.now(UTC) < timedelta(days=1830)
    (event,) = [e for e in service.events(response) if e.action == "ca.create"]
    assert event.actor == service.principal("admin")
    assert event.connector == "api"

    for role in ROLES:
        assert service.call("GET", f"/cas/{ca['id']}", role, expect=200).get_json() == ca
        listed = service.call("GET", "/cas?status=ACTIVE", role, expect=200).get_json()["cas"]
        assert ca["id"] in {c["id"] for c in listed}
        certificate = service.call("GET", f"/cas/{ca['id']}/certificate", role, expect=200)
        parsed = x509.load_pem_x509_certificate(certificate.get_json()["certificate_pem"].encode())
        assert parsed.subject.rfc4514_string() == "CN=API Root,O=pkigate tests"
    assert service.call("GET", "/cas?status=PENDING_CERTIFICATE", "admin").get_json() == {"cas": []}


def test_subordinate_signed_elsewhere_is_exported_and_imported_through_the_api(
    service: Service,
) -> None:
    pending = service.call(
        "POST",
        "/cas",
        "admin",
        json={"type": "SUBORDINATE", "subject": "CN=BYO Issuing,O=pkigate tests"},
        expect=201,
    ).get_json()
    assert pending["status"] == "PENDING_CERTIFICATE"
    ca_id = pending["id"]
    service.call("GET", f"/cas/{ca_id}/certificate", "admin", expect=409)
    csr_pem = service.call("GET", f"/cas/{ca_id}/csr", "auditor", expect=200).get_json()["csr_pem"]
    key, root = _outside_root()
    signed = _sign_outside(csr_pem, key, root)

    wrong = service.call(
        "POST",
        f"/cas/{ca_id}/certificate",
        "admin",
        json={"certificate_pem": _pem(signed)},
        expect=400,
    )
    assert "chain" in wrong.get_json()["error"]["message"]
    imported = service.call(
        "POST",
        f"/cas/{ca_id}/certificate",
        "admin",
        json={"certificate_pem": _pem(signed), "chain_pem": _pem(root)},
        expect=200,
    ).get_json()
    assert imported["status"] == "ACTIVE"
    chain = service.call("GET", f"/cas/{ca_id}/certificate", "issuer", expect=200).get_json()
    assert chain == {"certificate_pem": _pem(signed), "chain_pem": _pem(root)}


def test_disable_change_settings_delete_and_restore(service: Service) -> None:
    ca_id = service.issuing_id
    path = f"/cas/{ca_id}"
    service.call("DELETE", path, "admin", expect=409)  # ACTIVE CAs are not deleted

    updated = service.call(
        "PATCH",
        path,
        "admin",
        json={"status": "DISABLED", "settings": {"ocsp_url": "http://pki.test/ocsp"}},
        expect=200,
    ).get_json()
    assert updated["status"] == "DISABLED"
    assert updated["settings"]["ocsp_url"] == "http://pki.test/ocsp"
    # Settings not named keep their values (the gateway set caIssuers on first start).
    assert updated["settings"]["ca_issuers_url"].endswith(f"/ca/{ca_id}.cer")
    reset = service.call(
        "PATCH", path, "admin", json={"settings": {"ocsp_url": None}}, expect=200
    ).get_json()
    assert reset["settings"]["ocsp_url"] is None
    assert reset["settings"]["ca_issuers_url"] == updated["settings"]["ca_issuers_url"]

    deleted = service.call("DELETE", f"{path}?restore_days=7", "admin", expect=200).get_json()
    assert deleted["status"] == "DELETED"
    restore_until = datetime.fromisoformat(deleted["restore_until"])
    assert timedelta(days=6) < restore_until - datetime.now(UTC) <= timedelta(days=7)
    restored = service.call("POST", f"{path}/restore", "admin", expect=200).get_json()
    assert restored["status"] == "DISABLED"
    service.call("POST", f"{path}/restore", "admin", expect=409)
    active = service.call("PATCH", path, "admin", json={"status": "ACTIVE"}, expect=200)
    assert active.get_json()["status"] == "ACTIVE"
    results = [
        (e.action, e.result)
        for e in service.gw.core.audit.events()
        if e.resource == f"ca/{ca_id}" and e.actor == service.principal("admin")
    ]
    assert results == [
        ("ca.delete", "failure"),
        ("ca.update", "success"),
        ("ca.update", "success"),
        ("ca.update", "success"),
        ("ca.delete", "success"),
        ("ca.restore", "success"),
        ("ca.restore", "failure"),
        ("ca.update", "success"),
    ]


def test_tags_are_read_set_and_removed(service: Service) -> None:
    path = f"/cas/{service.root_id}/tags"
    assert service.call("GET", path, "auditor", expect=200).get_json() == {
        "tags": {"pkigate:config-name": "root"}
    }
    set_response = service.call(
        "PUT", path, "admin", json={"tags": {"team": "pki", "env": "test"}}, expect=200
    )
    assert set_response.get_json()["tags"] == {
        "pkigate:config-name": "root",
        "team": "pki",
        "env": "test",
    }
    removed = service.call("DELETE", f"{path}?key=team&key=env", "admin", expect=200)
    assert removed.get_json() == {"tags": {"pkigate:config-name": "root"}}
    assert [e.action for e in service.events(removed)] == ["ca.tag"]


# -- certificates ------------------------------------------------------------------------------


def test_issuer_issues_and_gets_a_certificate_with_its_chain(service: Service) -> None:
    response = service.call(
        "POST",
        f"/cas/{service.issuing_id}/certificates",
        "issuer",
        json={
            "csr": _csr_pem("web.example.test"),
            "template": "EndEntityServerAuthCertificate/V1",
            "validity": {"type": "DAYS", "value": 10},
        },
        expect=201,
    )
    issued = response.get_json()
    assert response.headers["Location"] == (
        f"{API}/cas/{service.issuing_id}/certificates/{issued['serial']}"
    )
    certificate = x509.load_pem_x509_certificate(issued["certificate_pem"].encode())
    assert format(certificate.serial_number, "x") == issued["serial"]
    assert len(issued["sans"]) == 1
    assert "web.example.test" in issued["sans"][0]
    lifetime = certificate.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(days=9) < lifetime <= timedelta(days=10)
    chain = x509.load_pem_x509_certificates(issued["chain_pem"].encode())
    assert [c.subject for c in chain] == [certificate.issuer, chain[-1].issuer]
    certificate.verify_directly_issued_by(chain[0])
    assert issued["requester"] == service.principal("issuer")
    assert issued["connector"] == "api"
    (event,) = [e for e in service.events(response) if e.action == "certificate.issue"]
    assert event.actor == service.principal("issuer")
    assert event.result == "success"

    with_colons = ":".join(re.findall("..", issued["serial"].zfill(40)))
    for role in ("issuer", "auditor"):
        got = service.call(
            "GET",
            f"/cas/{service.issuing_id}/certificates/{with_colons}",
            role,
            expect=200,
        ).get_json()
        assert got["certificate_pem"] == issued["certificate_pem"]
        assert got["chain_pem"] == issued["chain_pem"]
        assert got["fingerprint_sha256"] == issued["fingerprint_sha256"]
    service.call("GET", f"/cas/{service.issuing_id}/certificates/abc123", "issuer", expect=404)


def test_api_passthrough_names_go_into_the_certificate(service: Service) -> None:
    issued = _issue(
        service,
        "ignored.example.test",
        template="EndEntityCertificate_APIPassthrough/V1",
        validity="7d",
        api_passthrough={
            "subject": "CN=vouched.example.test",
            "sans": [{"dns": "vouched.example.test"}],
        },
    )
    certificate = x509.load_pem_x509_certificate(issued["certificate_pem"].encode())
    assert certificate.subject.rfc4514_string() == "CN=vouched.example.test"
    sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["vouched.example.test"]


def test_the_same_idempotency_token_returns_the_same_certificate(service: Service) -> None:
    csr = _csr_pem()
    path = f"/cas/{service.issuing_id}/certificates"
    body = {"csr": csr, "idempotency_token": "once"}
    before = service.counts()
    first = service.call("POST", path, "issuer", json=body, expect=201).get_json()
    again = service.call("POST", path, "issuer", json=body, expect=201).get_json()
    assert again["serial"] == first["serial"]
    assert service.counts()[1] == before[1] + 1
    conflict = service.call(
        "POST", path, "issuer", json={**body, "csr": _csr_pem("other.example.test")}, expect=409
    )
    assert conflict.get_json()["error"]["code"] == "idempotencyConflict"


def test_certificates_are_listed_a_page_at_a_time_with_filters(service: Service) -> None:
    serials = [_issue(service, f"host{i}.example.test")["serial"] for i in range(5)]
    short = _issue(service, "short.example.test", validity="2d")["serial"]
    path = f"/cas/{service.issuing_id}/certificates"

    seen: list[str] = []
    url = f"{path}?limit=2"
    pages = 0
    while url:
        response = service.call("GET", url, "auditor", expect=200)
        page = response.get_json()
        assert len(page["certificates"]) <= 2
        seen += [c["serial"] for c in page["certificates"]]
        pages += 1
        if page["next"]:
            assert response.headers["Link"] == f'<{page["next"]}>; rel="next"'
            assert "limit=2" in page["next"]
            url = page["next"].removeprefix(API)
        else:
            assert "Link" not in response.headers
            url = ""
    assert seen == [*serials, short]
    assert pages == 3

    expiring = service.call("GET", f"{path}?expiring_within=3d", "issuer", expect=200)
    assert [c["serial"] for c in expiring.get_json()["certificates"]] == [short]
    revoked = service.call("GET", f"{path}?status=REVOKED", "issuer", expect=200)
    assert revoked.get_json() == {"certificates": [], "next": None, "next_cursor": None}
    service.call("GET", "/cas/no-such-ca/certificates", "issuer", expect=404)


def test_templates_are_listed_for_every_role(service: Service) -> None:
    for role in ROLES:
        templates = service.call("GET", "/templates", role, expect=200).get_json()["templates"]
        names = {t["name"] for t in templates}
        assert {"EndEntityCertificate/V1", "SubordinateCACertificate_PathLen0/V1"} <= names


# -- audit -------------------------------------------------------------------------------------


def test_audit_events_are_filtered_paged_newest_first_for_auditors_and_admins(
    service: Service,
) -> None:
    first, second = _issue(service, "one.example.test"), _issue(service, "two.example.test")
    revoked = service.call(
        "POST",
        f"/cas/{service.issuing_id}/certificates/{second['serial']}/revoke",
        "issuer",
        json={"reason": "keyCompromise"},
        expect=200,
    )
    found = service.call(
        "GET", "/audit/events?action=certificate.revoke", "auditor", expect=200
    ).get_json()
    assert [e["parameters"]["serial"] for e in found["events"]] == [second["serial"]]
    assert found["events"][0]["actor"] == service.principal("issuer")
    assert found["next"] is None
    # An action prefix and an actor substring; newest first.
    query = "/audit/events?action=certificate.&actor=issuer-token"
    events = service.call("GET", query, "admin", expect=200).get_json()["events"]
    assert [(e["action"], e["parameters"].get("serial")) for e in events] == [
        ("certificate.revoke", second["serial"]),
        ("certificate.issue", second["serial"]),
        ("certificate.issue", first["serial"]),
    ]
    # A page at a time, by the cursor (and the Link header).
    page = service.call("GET", query + "&limit=2", "auditor", expect=200)
    assert [e["seq"] for e in page.get_json()["events"]] == [e["seq"] for e in events[:2]]
    assert page.headers["Link"].endswith('>; rel="next"')
    rest = service.call(
        "GET", f"{query}&limit=2&cursor={page.get_json()['next_cursor']}", "auditor", expect=200
    ).get_json()
    assert [e["seq"] for e in rest["events"]] == [events[2]["seq"]] and rest["next"] is None
    # By the request that caused them, and by time.
    request_id = revoked.headers["X-Request-Id"]
    by_request = service.call(
        "GET", f"/audit/events?request_id={request_id}", "auditor", expect=200
    ).get_json()["events"]
    assert {e["action"] for e in by_request} >= {"certificate.revoke"}
    assert all(e["request_id"] == request_id for e in by_request)
    later = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S")
    assert (
        service.call("GET", f"/audit/events?since={later}", "auditor", expect=200).get_json()[
            "events"
        ]
        == []
    )
    service.call("GET", "/audit/events?until=yesterday", "auditor", expect=400)
    service.call("GET", "/audit/events", "issuer", expect=403)


def test_auditor_verifies_the_log_and_exports_reports_as_json_and_csv(service: Service) -> None:
    serial = _issue(service)["serial"]
    verified = service.call("GET", "/audit/verify", "auditor", expect=200).get_json()
    assert verified["ok"] is True
    assert verified["problems"] == []
    # The verification itself is then recorded as one more event (api.read).
    events = service.gw.core.audit.events()
    assert verified["events"] == len(events) - 1
    assert (events[-1].action, events[-1].resource) == ("api.read", "GET /api/v1/audit/verify")

    report = service.call(
        "GET", f"/audit/report?ca={service.issuing_id}", "auditor", expect=200
    ).get_json()
    assert report["ca_id"] == service.issuing_id
    assert serial in {row["serial"] for row in report["certificates"]}

    as_csv = service.call(
        "GET", f"/audit/report?ca={service.issuing_id}&format=csv", "auditor", expect=200
    )
    assert as_csv.mimetype == "text/csv"
    rows = list(csv.DictReader(io.StringIO(as_csv.get_data(as_text=True))))
    assert serial in {row["serial"] for row in rows}
    assert len(rows) == len(report["certificates"])
    service.call("GET", "/audit/report?ca=no-such-ca", "auditor", expect=404)
    missing = service.call("GET", "/audit/report", "auditor", expect=400)
    assert "'ca'" in missing.get_json()["error"]["message"]


# -- tokens ------------------------------------------------------------------------------------


def test_tokens_are_created_listed_without_secrets_and_revoked(service: Service) -> None:
    created = service.call(
        "POST", "/tokens", "admin", json={"name": "ci-pipeline", "role": "issuer"}, expect=201
    )
    assert created.headers["Cache-Control"] == "no-store"
    token = created.get_json()
    assert token["secret"].startswith(f"pkigate_{token['id']}_")
    bearer = {"Authorization": f"Bearer {token['secret']}"}
    service.call("GET", "/templates", headers=bearer, expect=200)

    listed = service.call("GET", "/tokens", "admin", expect=200)
    text = listed.get_data(as_text=True)
    assert token["secret"].removeprefix(f"pkigate_{token['id']}_") not in text
    assert "secret" not in text
    assert token["id"] in {t["id"] for t in listed.get_json()["tokens"]}

    revoked = service.call("DELETE", f"/tokens/{token['id']}", "admin", expect=200).get_json()
    assert revoked["revoked_at"] is not None
    refused = service.call("GET", "/templates", headers=bearer, expect=401)
    assert "revoked" in refused.get_json()["error"]["message"]
    service.call("DELETE", f"/tokens/{token['id']}", "admin", expect=404)
    actions = [
        (e.action, e.actor)
        for e in service.gw.core.audit.events()
        if e.resource == f"token/{token['id']}"
    ]
    assert actions == [
        ("token.create", service.principal("admin")),
        ("token.revoke", service.principal("admin")),
    ]


def test_a_token_revoked_through_another_worker_is_refused_once_the_bound_has_passed(
    shared: Service,
) -> None:
    """Each worker (or host) remembers a token's record for TOKEN_RECORD_SECONDS instead of
    reading the store per request; a revocation made elsewhere is seen within that bound."""
    core = shared.gw.core
    now = [0.0]
    other_worker = TokenService(core.store, core.audit, core.clock, monotonic=lambda: now[0])
    issued = shared.gw.tokens.create("elsewhere", Role.ISSUER, Actor("test"))
    bearer = f"Bearer {issued.secret}"
    assert other_worker.authenticate(bearer).token_id == issued.record.id
    with pytest.raises(AuthenticationError, match="invalid"):  # the secret is checked each time
        other_worker.authenticate(bearer[:-1] + ("A" if bearer[-1] != "A" else "B"))

    shared.gw.tokens.revoke(issued.record.id, Actor("test"))
    with pytest.raises(AuthenticationError, match="revoked"):  # where it was revoked: at once
        shared.gw.tokens.authenticate(bearer)
    now[0] = TOKEN_RECORD_SECONDS / 2
    assert other_worker.authenticate(bearer).token_id == issued.record.id  # its record
    now[0] = TOKEN_RECORD_SECONDS
    with pytest.raises(AuthenticationError, match="revoked"):
        other_worker.authenticate(bearer)
    with pytest.raises(AuthenticationError, match="revoked"):
        other_worker.principal(issued.record.id)


def test_a_secret_rotated_in_elsewhere_works_at_once_in_a_worker_that_remembers_the_token(
    shared: Service,
) -> None:
    """A worker that remembers a token's record re-reads it when a secret does not match,
    so a rotation made through another worker does not turn the new secret away for the
    remembering bound; the last use it writes does not make it write again."""
    core = shared.gw.core
    now = [0.0]
    other_worker = TokenService(core.store, core.audit, core.clock, monotonic=lambda: now[0])
    issued = shared.gw.tokens.create("rotating", Role.ISSUER, Actor("test"))
    assert other_worker.authenticate(f"Bearer {issued.secret}").token_id == issued.record.id
    rotated = shared.gw.tokens.rotate(issued.record.id, timedelta(0), Actor("test"))
    assert other_worker.authenticate(f"Bearer {rotated.secret}").token_id == issued.record.id
    with pytest.raises(AuthenticationError, match="replaced by a rotation"):
        other_worker.authenticate(f"Bearer {issued.secret}")  # no overlap was given
    with core.store.read() as conn:
        record = core.store.get_api_token(conn, issued.record.id)
    assert record is not None and record.last_used_at is not None


# -- separation of duties ----------------------------------------------------------------------

# (role that may not, method, path, body); {root}/{issuing} are filled in.
OUTSIDE_THE_ROLE = [
    ("issuer", "POST", "/cas", {"type": "ROOT", "subject": "CN=Nope"}),
    ("auditor", "POST", "/cas", {"type": "ROOT", "subject": "CN=Nope"}),
    ("issuer", "PATCH", "/cas/{issuing}", {"status": "DISABLED"}),
    ("auditor", "DELETE", "/cas/{issuing}", None),
    ("issuer", "PUT", "/cas/{root}/tags", {"tags": {"a": "b"}}),
    ("admin", "POST", "/cas/{issuing}/certificates", "CSR"),
    ("auditor", "POST", "/cas/{issuing}/certificates", "CSR"),
    ("issuer", "GET", "/audit/verify", None),
    ("admin", "GET", "/audit/report?ca={issuing}", None),
    ("issuer", "POST", "/tokens", {"name": "x", "role": "admin"}),
    ("auditor", "GET", "/tokens", None),
]


@pytest.mark.parametrize(
    ("role", "method", "path", "body"),
    OUTSIDE_THE_ROLE,
    ids=[f"{r}-{m}-{p}" for r, m, p, _ in OUTSIDE_THE_ROLE],
)
def test_a_call_outside_the_role_is_403_audited_and_changes_nothing(
    shared: Service, role: str, method: str, path: str, body: object
) -> None:
    path = path.format(root=shared.root_id, issuing=shared.issuing_id)
    payload = {"csr": _csr_pem()} if body == "CSR" else body
    before = shared.counts()
    response = shared.call(method, path, role, json=payload, expect=403)
    error = response.get_json()["error"]
    assert error["code"] == "forbidden"
    assert f"roles {role} may not" in error["message"]
    assert shared.counts() == before
    (event,) = shared.events(response)
    assert event.action == "api.denied"
    assert event.result == "failure"
    assert event.actor == shared.principal(role)
    assert json.loads(event.parameters)["roles"] == [role]


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Basic dXNlcjpwYXNz",
        "Bearer not-a-pkigate-token",
        "Bearer pkigate_0123456789abcdef_" + "A" * 43,
        "WRONG_SECRET",
    ],
    ids=["missing", "not-bearer", "malformed", "unknown-id", "wrong-secret"],
)
def test_a_missing_or_invalid_token_is_401_and_changes_nothing(
    shared: Service, authorization: str | None
) -> None:
    if authorization == "WRONG_SECRET":
        token_id = shared.secrets["admin"].split("_")[1]
        authorization = f"Bearer pkigate_{token_id}_" + "B" * 43
    headers = {"Authorization": authorization} if authorization else {}
    before = shared.counts()
    response = shared.call(
        "POST",
        "/cas",
        headers=headers,
        json={"type": "ROOT", "subject": "CN=Nope"},
        expect=401,
    )
    assert response.get_json()["error"]["code"] == "unauthenticated"
    assert shared.counts() == before


# -- bad input ---------------------------------------------------------------------------------

_ROOT = {"type": "ROOT", "subject": "CN=Bad Input Root"}


@dataclass(frozen=True)
class Bad:
    """A refused request: who sends it, where, the status, and what the message must name."""

    role: str
    method: str
    path: str
    status: int
    names: str
    request: Mapping[str, Any]


def bad(role: str, method: str, path: str, status: int, names: str, **request: Any) -> Bad:
    return Bad(role, method, path, status, names, request)


_ISSUE = "/cas/{issuing}/certificates"
_PASSTHROUGH = "EndEntityCertificate_APIPassthrough/V1"


def bad_passthrough(names: str, passthrough: dict[str, Any]) -> Bad:
    """An issuer's issuance whose api_passthrough is refused (400) naming ``names``."""
    return bad(
        "issuer",
        "POST",
        _ISSUE,
        400,
        names,
        json={"csr": "CSR", "template": _PASSTHROUGH, "api_passthrough": passthrough},
    )


BAD_INPUT = {
    "text-plain": bad("admin", "POST", "/cas", 415, "json", data="x", content_type="text/plain"),
    "no-content-type": bad("admin", "POST", "/cas", 415, "json", data=json.dumps(_ROOT)),
    "malformed-json": bad(
        "admin",
        "POST",
        "/cas",
        400,
        "malformed JSON",
        data='{"type": "ROOT",',
        content_type="application/json",
    ),
    "json-array": bad("admin", "POST", "/cas", 400, "JSON object", json=[_ROOT]),
    "json-nested-too-deeply": bad(
        "issuer",
        "POST",
        _ISSUE,
        400,
        "nested too deeply",
        data='{"csr": ' + "[" * 100_000 + "]" * 100_000 + "}",
        content_type="application/json",
    ),
    "json-lone-surrogate": bad(
        "issuer",
        "POST",
        _ISSUE,
        400,
        "not Unicode text",
        data='{"csr": "\\ud800-----BEGIN"}',
        content_type="application/json",
    ),
    "unknown-field": bad("admin", "POST", "/cas", 400, "'colour'", json={**_ROOT, "colour": 1}),
    "unknown-setting": bad(
        "admin", "POST", "/cas", 400, "'settings.crl'", json={**_ROOT, "settings": {"crl": "x"}}
    ),
    "unknown-name-constraint": bad(
        "admin",
        "POST",
        "/cas",
        400,
        "'settings.name_constraints.permitted'",
        json={**_ROOT, "settings": {"name_constraints": {"permitted": ["a"]}}},
    ),
    "bad-setting-value": bad(
        "admin",
        "POST",
        "/cas",
        400,
        "'settings'",
        json={**_ROOT, "settings": {"crl_url": "ftp://x"}},
    ),
    "missing-subject": bad("admin", "POST", "/cas", 400, "'subject'", json={"type": "ROOT"}),
    "null-subject": bad(
        "admin", "POST", "/cas", 400, "'subject'", json={"type": "ROOT", "subject": None}
    ),
    "bad-subject": bad(
        "admin", "POST", "/cas", 400, "'subject'", json={"type": "ROOT", "subject": "CN"}
    ),
    "string-for-integer": bad(
        "admin", "POST", "/cas", 400, "'path_length'", json={**_ROOT, "path_length": "1"}
    ),
    "boolean-for-integer": bad(
        "admin", "POST", "/cas", 400, "'path_length'", json={**_ROOT, "path_length": True}
    ),
    "out-of-range": bad(
        "admin", "POST", "/cas", 400, "'path_length'", json={**_ROOT, "path_length": 9}
    ),
    "unknown-enum": bad(
        "admin",
        "POST",
        "/cas",
        400,
        "'key_algorithm'",
        json={**_ROOT, "key_algorithm": "RSA_1024"},
    ),
    "bad-validity-text": bad(
        "admin", "POST", "/cas", 400, "'validity'", json={**_ROOT, "validity": "forever"}
    ),
    "bad-validity-object": bad(
        "admin",
        "POST",
        "/cas",
        400,
        "'validity.unit'",
        json={**_ROOT, "validity": {"type": "DAYS", "value": 3, "unit": "d"}},
    ),
    "non-string-tag": bad(
        "admin", "POST", "/cas", 400, "'tags.team'", json={**_ROOT, "tags": {"team": 7}}
    ),
    "reserved-tag": bad(
        "admin",
        "PUT",
        "/cas/{root}/tags",
        400,
        "'tags.pkigate:config-name'",
        json={"tags": {"pkigate:config-name": "evil"}},
    ),
    "reserved-tag-removal": bad(
        "admin", "DELETE", "/cas/{root}/tags?key=pkigate:config-name", 400, "reserved"
    ),
    "empty-patch": bad("admin", "PATCH", "/cas/{issuing}", 400, "'status'", json={}),
    "patch-bad-status": bad(
        "admin", "PATCH", "/cas/{issuing}", 400, "'status'", json={"status": "DELETED"}
    ),
    "body-where-none-belongs": bad(
        "admin", "POST", "/cas/{issuing}/restore", 400, "'now'", json={"now": True}
    ),
    "unknown-query-parameter": bad("admin", "GET", "/cas?colour=red", 400, "'colour'"),
    "bad-query-enum": bad("admin", "GET", "/cas?status=SLEEPING", 400, "'status'"),
    "repeated-query-parameter": bad(
        "admin", "GET", "/cas?status=ACTIVE&status=DISABLED", 400, "'status'"
    ),
    "restore-days-out-of-range": bad(
        "admin", "DELETE", "/cas/{root}?restore_days=3", 400, "'restore_days'"
    ),
    "garbage-csr": bad("issuer", "POST", _ISSUE, 400, "CSR", json={"csr": "hello"}),
    "unknown-passthrough-field": bad(
        "issuer",
        "POST",
        _ISSUE,
        400,
        "'api_passthrough'",
        json={"csr": "CSR", "template": _PASSTHROUGH, "api_passthrough": {"colour": "red"}},
    ),
    # Found in review: each of these was a 500 (at signing time, unaudited).
    "non-string-cps-uri": bad_passthrough(
        "cps_uri", {"certificate_policies": [{"oid": "1.2.3.4", "cps_uri": 7}]}
    ),
    "non-ascii-cps-uri": bad_passthrough(
        "cps_uri",
        {"certificate_policies": [{"oid": "1.2.3.4", "cps_uri": "https://é.example"}]},
    ),
    "other-name-not-der": bad_passthrough(
        "sans[0].value", {"sans": [{"other_name": {"oid": "1.2.3.4", "value": "AAEC"}}]}
    ),
    "critical-not-a-boolean": bad_passthrough(
        "critical",
        {"custom_extensions": [{"oid": "1.2.3.4", "value": "BQA=", "critical": "no"}]},
    ),
    "unknown-template": bad(
        "issuer",
        "POST",
        _ISSUE,
        404,
        "NoSuchTemplate",
        json={"csr": "CSR", "template": "NoSuchTemplate/V1"},
    ),
    "issue-from-unknown-ca": bad(
        "issuer", "POST", "/cas/no-such-ca/certificates", 404, "no-such-ca", json={"csr": "CSR"}
    ),
    "bad-cursor": bad("issuer", "GET", _ISSUE + "?cursor=bm9wZQ", 400, "'cursor'"),
    "non-ascii-cursor": bad("issuer", "GET", _ISSUE + "?cursor=%C3%A9", 400, "'cursor'"),
    "zero-limit": bad("issuer", "GET", _ISSUE + "?limit=0", 400, "'limit'"),
    # int() would take each of these as 10 (or 1)
    "spaced-limit": bad("issuer", "GET", _ISSUE + "?limit=%201", 400, "'limit'"),
    "underscored-limit": bad("issuer", "GET", _ISSUE + "?limit=1_0", 400, "'limit'"),
    "arabic-digit-limit": bad("issuer", "GET", _ISSUE + "?limit=%D9%A1%D9%A0", 400, "'limit'"),
    "fullwidth-digit-limit": bad("issuer", "GET", _ISSUE + "?limit=%EF%BC%91", 400, "'limit'"),
    "bad-expiring-within": bad(
        "issuer", "GET", _ISSUE + "?expiring_within=soon", 400, "'expiring_within'"
    ),
    "bad-serial": bad("issuer", "GET", _ISSUE + "/xyz", 400, "xyz"),
    "unknown-role": bad(
        "admin", "POST", "/tokens", 400, "'role'", json={"name": "x", "role": "root"}
    ),
    "name-given-twice": bad(
        "admin",
        "POST",
        "/tokens",
        400,
        "'role' appears twice",
        data=b'{"name": "x", "role": "auditor", "role": "admin"}',
        content_type="application/json",
    ),
    "empty-token-name": bad(
        "admin", "POST", "/tokens", 400, "'name'", json={"name": "", "role": "issuer"}
    ),
    "unknown-route": bad("admin", "GET", "/no/such/route", 404, "not found"),
    "wrong-method": bad("admin", "PUT", "/cas", 405, "not allowed", json=_ROOT),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_a_json_error_naming_the_problem_and_changes_nothing(
    shared: Service, case: str
) -> None:
    refused = BAD_INPUT[case]
    path = refused.path.format(root=shared.root_id, issuing=shared.issuing_id)
    request = dict(refused.request)
    if isinstance(request.get("json"), dict) and request["json"].get("csr") == "CSR":
        request["json"] = {**request["json"], "csr": _csr_pem()}
    before = shared.counts()
    response = shared.call(refused.method, path, refused.role, expect=refused.status, **request)
    error = response.get_json()["error"]
    assert refused.names.lower() in error["message"].lower(), error
    assert error["request_id"] == response.headers["X-Request-Id"]
    assert shared.counts() == before


def test_a_body_over_the_configured_limit_is_413_and_changes_nothing(tmp_path: Path) -> None:
    opened = _open_service(tmp_path / "data", None, "max_body_bytes = 1024\n")
    try:
        before = opened.counts()
        big = {**_ROOT, "tags": {f"k{i}": "v" * 40 for i in range(40)}}
        response = opened.call("POST", "/cas", "admin", json=big, expect=413)
        assert response.get_json()["error"]["code"] == "payloadTooLarge"
        assert "1024" in response.get_json()["error"]["message"]
        assert opened.counts() == before
        opened.call("POST", "/cas", "admin", json=_ROOT, expect=201)
    finally:
        opened.gw.close()


def test_an_unexpected_failure_is_a_500_without_details(
    shared: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*_: object, **__: object) -> None:
        raise RuntimeError("secret internals at /srv/pkigate/key.pem")

    authorities = shared.gw.core.authorities
    monkeypatch.setattr(authorities, "list_cas", explode)
    response = shared.call("GET", "/cas", "admin", expect=500)
    text = response.get_data(as_text=True)
    assert "secret internals" not in text
    assert "RuntimeError" not in text
    assert response.get_json()["error"]["code"] == "internalError"


@pytest.mark.parametrize(
    "template",
    [
        "SubordinateCACertificate_PathLen0/V1",
        "OCSPSigningCertificate/V1",
        "BlankEndEntityCertificate_APIPassthrough/V1",
    ],
)
def test_ca_powers_need_the_operator_to_enable_them_for_issuer_tokens(
    tmp_path: Path, template: str
) -> None:
    """Found in review: an issuer token could make a subordinate CA (outside the root's
    name constraints), an OCSP responder (whose 'good' answers cannot be revoked) or any
    certificate at all (Blank templates), and revoke a CA's certificate. These are the CA
    operator's powers: refused, audited, unless `api_ca_operations = true`."""
    csr = make_csr().decode()
    for enabled, expect in ((False, 403), (True, 201)):
        opened = _open_service(
            tmp_path / f"data-{enabled}", None, f"api_ca_operations = {str(enabled).lower()}\n"
        )
        try:
            root = opened.gw.ca_ids["root"]
            before = opened.counts()
            response = opened.call(
                "POST",
                f"/cas/{root}/certificates",
                "issuer",
                json={"csr": csr, "template": template, "validity": "30d"},
                expect=expect,
            )
            if not enabled:
                assert "api_ca_operations" in response.get_json()["error"]["message"]
                assert opened.counts() == before
                denied = [e for e in opened.gw.core.audit.events() if e.action == "api.denied"]
                assert denied and template in denied[-1].parameters
                # Nor may an issuer token revoke a CA's certificate.
                issuing = opened.gw.core.authorities.get(opened.gw.ca_ids["issuing"])
                assert issuing.certificate_der is not None
                serial = format(
                    x509.load_der_x509_certificate(issuing.certificate_der).serial_number,
                    "x",
                )
                opened.call(
                    "POST",
                    f"/cas/{root}/certificates/{serial}/revoke",
                    "issuer",
                    json={"reason": "superseded"},
                    expect=403,
                )
        finally:
            opened.gw.close()


def test_a_crl_partition_beyond_any_integer_column_is_not_found(tmp_path: Path) -> None:
    """Found in review: /crl/<ca>/<20 digits>.crl overflowed SQLite's integer (a 500)."""
    opened = _open_service(tmp_path / "data", None)
    try:
        issuing = opened.gw.ca_ids["issuing"]
        for partition in ("99999999999999999999", str(2**63), "7"):
            response = opened.client.get(f"/crl/{issuing}/{partition}.crl")
            assert response.status_code == 404, (partition, response.get_data(as_text=True))
        assert opened.client.get(f"/crl/{issuing}.crl").status_code == 200
    finally:
        opened.gw.close()


def test_a_certificate_whose_extensions_cannot_be_read_can_be_revoked(tmp_path: Path) -> None:
    """Found in review: revocation through the API read the certificate's extensions to
    tell a CA's from a leaf's, and a leaf with an unreadable one (issued through
    passthrough) could not be revoked: a 500. Its template decides then."""
    opened = _open_service(tmp_path / "data", None)
    try:
        issuing = opened.gw.ca_ids["issuing"]
        tls_feature = {"oid": "1.3.6.1.5.5.7.1.24", "value": "BAEA", "critical": False}
        issued = opened.call(
            "POST",
            f"/cas/{issuing}/certificates",
            "issuer",
            json={
                "csr": make_csr().decode(),
                "template": "EndEntityCertificate_APIPassthrough/V1",
                "api_passthrough": {"custom_extensions": [tls_feature]},
            },
            expect=201,
        ).get_json()
        revoked = opened.call(
            "POST",
            f"/cas/{issuing}/certificates/{issued['serial']}/revoke",
            "issuer",
            json={"reason": "superseded"},
            expect=200,
        )
        assert revoked.get_json()["status"] == "REVOKED"
    finally:
        opened.gw.close()
