"""Connector types come from entry points: a third-party package plugs in unmodified."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from helpers import make_csr

from pkigate.gateways.app import create_app
from pkigate.gateways.config import ConfigError, parse_config
from pkigate.gateways.connectors import discover
from pkigate.gateways.runtime import Gateway

THIRD_PARTY = '''
from flask import Blueprint, Response, request
from pkigate.core import Requester
from pkigate.core.errors import PkigateError
from pkigate.gateways.connectors import Connector, ConnectorSettingsError


class EchoConnector(Connector):
    """Issues to whoever knows the shared secret; the CN is the only name it certifies."""

    type_name = "echo"
    listener = "http"
    default_template = "EndEntityClientAuthCertificate/V1"
    default_validity = "7d"

    def __init__(self, context, settings):
        super().__init__(context, settings)
        if not isinstance(settings.get("secret", ""), str):
            raise ConnectorSettingsError("secret", "must be a string")
        self.secret = settings.get("secret", "s3cret")

    def blueprint(self):
        bp = Blueprint("echo", __name__)

        @bp.post("/enroll")
        def enroll():
            if request.headers.get("X-Secret") != self.secret:
                return Response("denied", status=403)
            try:
                issued = self.context.issue(request.get_data(),
                                            Requester("echo-client", self.context.name))
            except PkigateError as exc:
                return Response(exc.message, status=400)
            return Response(issued.pem(), mimetype="application/x-pem-file")

        return bp
'''


@pytest.fixture
def third_party_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An installed distribution (dist-info with entry points) that pkigate knows nothing of."""
    site = tmp_path / "site"
    (site / "echo_connector").mkdir(parents=True)
    (site / "echo_connector" / "__init__.py").write_text(THIRD_PARTY)
    dist = site / "echo_connector-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: echo-connector\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        textwrap.dedent("""\
        [pkigate.connectors]
        echo = echo_connector:EchoConnector
        """)
    )
    monkeypatch.syspath_prepend(str(site))
    yield site


def test_installed_connector_types_are_discovered_through_entry_points(
    third_party_package: Path,
) -> None:
    types = discover()
    assert types["echo"].__module__ == "echo_connector"


def test_default_configuration_mounts_every_installed_connector(
    third_party_package: Path, tmp_path: Path
) -> None:
    gateway = Gateway.open(parse_config(f"data_dir = '{tmp_path / 'data'}'"), bootstrap=True)
    app = create_app(gateway, "http")
    client = app.test_client()
    denied = client.post("/echo/enroll", data=make_csr("device-1"))
    assert denied.status_code == 403
    response = client.post(
        "/echo/enroll", data=make_csr("device-1"), headers={"X-Secret": "s3cret"}
    )
    assert response.status_code == 200, response.text
    certificate = x509.load_pem_x509_certificate(response.data)
    assert certificate.issuer.rfc4514_string() == "CN=pkigate Issuing CA,O=pkigate"
    with gateway.core.store.read() as conn:
        stored = gateway.core.store.list_certificates(conn, ca_id=gateway.ca_ids["issuing"])
    echo = [r for r in stored if r.connector == "echo"]
    assert [(r.template, r.requester) for r in echo] == [
        ("EndEntityClientAuthCertificate/V1", "echo-client")
    ]
    metrics = client.get("/metrics").text
    assert (
        'pkigate_issuance_total{connector="echo",result="success",'
        'template="EndEntityClientAuthCertificate/V1"} 1.0' in metrics
    )


def test_two_instances_of_one_type_run_side_by_side(
    third_party_package: Path, tmp_path: Path
) -> None:
    config = parse_config(f"""
data_dir = '{tmp_path / "data"}'
[[connectors]]
type = "echo"
name = "mdm-a"
mount = "/echo/a"
[connectors.settings]
secret = "alpha"
[[connectors]]
type = "echo"
name = "mdm-b"
mount = "/echo/b"
template = "EndEntityCertificate/V1"
[connectors.settings]
secret = "beta"
""")
    gateway = Gateway.open(config, bootstrap=True)
    client = create_app(gateway, "http").test_client()
    assert (
        client.post("/echo/a/enroll", data=make_csr(), headers={"X-Secret": "beta"}).status_code
        == 403
    )
    assert (
        client.post("/echo/a/enroll", data=make_csr(), headers={"X-Secret": "alpha"}).status_code
        == 200
    )
    assert (
        client.post("/echo/b/enroll", data=make_csr(), headers={"X-Secret": "beta"}).status_code
        == 200
    )
    with gateway.core.store.read() as conn:
        rows = gateway.core.store.list_certificates(conn, ca_id=gateway.ca_ids["issuing"])
    assert sorted((r.connector, r.template) for r in rows if r.connector.startswith("mdm")) == [
        ("mdm-a", "EndEntityClientAuthCertificate/V1"),
        ("mdm-b", "EndEntityCertificate/V1"),
    ]


def test_unknown_type_and_bad_connector_settings_stop_the_start(
    third_party_package: Path, tmp_path: Path
) -> None:
    base = f"data_dir = '{tmp_path / 'data'}'\n[[connectors]]\nname = 'x'\nmount = '/x'\n"
    with pytest.raises(
        ConfigError,
        match=r"connectors\[0\].type: unknown connector type "
        r"'nope'; installed: .*echo",
    ):
        Gateway.open(parse_config(base + "type = 'nope'\n"), bootstrap=True)
    with pytest.raises(ConfigError, match=r"connectors\[0\].settings.secret: must be a string"):
        Gateway.open(
            parse_config(base + "type = 'echo'\n[connectors.settings]\nsecret = 5\n"),
            bootstrap=True,
        )
    with pytest.raises(ConfigError, match=r"connectors\[0\].template: unknown template"):
        Gateway.open(parse_config(base + "type = 'echo'\ntemplate = 'Nope/V1'\n"), bootstrap=True)


def test_request_id_is_in_the_json_log_and_the_audit_event(tmp_path: Path) -> None:
    import io
    import json
    import logging

    from pkigate.core import Actor
    from pkigate.gateways.auth import Role
    from pkigate.gateways.logs import JsonFormatter

    gateway = Gateway.open(parse_config(f"data_dir = '{tmp_path / 'data'}'"), bootstrap=True)
    token = gateway.tokens.create("reader", Role.AUDITOR, Actor("test")).secret
    client = create_app(gateway, "https").test_client()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("pkigate.http")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        response = client.get(
            "/api/v1/templates",
            headers={"Authorization": f"Bearer {token}", "X-Request-Id": "req-4711"},
        )
    finally:
        logger.removeHandler(handler)
    assert response.status_code == 200
    assert response.headers["X-Request-Id"] == "req-4711"
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert any(
        line.get("request_id") == "req-4711" and line["path"] == "/api/v1/templates"
        for line in lines
    )
    events = [e for e in gateway.core.audit.events() if e.request_id == "req-4711"]
    assert [(e.action, e.actor.startswith("token:reader"), e.connector) for e in events] == [
        ("api.read", True, "api")
    ]


def test_a_connectors_jobs_cannot_hold_up_the_cas_own(tmp_path: Path) -> None:
    """Each connector's background jobs run on threads of their own: ACME validations a
    client holds up on purpose (found in review: 12 held-up names delayed every other
    job by their timeouts) do not delay a CRL, nor another connector's work."""
    import threading

    from helpers import wait_for

    from pkigate.core.revocation import CRL_JOB
    from pkigate.core.store.jobs import JobStatus

    gateway = Gateway.open(parse_config(f"data_dir = '{tmp_path / 'data'}'"), bootstrap=True)
    acme = next(c for c in gateway.connectors if c.type_name == "acme")
    held = threading.Event()
    release = threading.Event()

    def stuck(_payload: dict[str, object]) -> None:
        held.set()
        release.wait(30)

    acme.job_handlers = lambda: {"stuck": stuck}  # type: ignore[method-assign]
    jobs = gateway.core.jobs
    try:
        stuck_id = jobs.enqueue(f"{acme.context.name}:stuck", {})
        gateway.start_background_work()
        wait_for(held.is_set, 10)
        crl_id = jobs.enqueue(CRL_JOB, {"ca_id": gateway.ca_ids["issuing"], "partition": 0})

        def crl_done() -> bool:
            record = jobs.get(crl_id)
            return record is not None and record.status == JobStatus.DONE

        wait_for(crl_done, 20)
        stuck_job = jobs.get(stuck_id)
        assert stuck_job is not None and stuck_job.status == JobStatus.RUNNING
    finally:
        release.set()
        gateway.close()


def test_python_warnings_are_json_log_lines() -> None:
    """cryptography warns (to stderr, as plain text over two lines) when it reads a name
    attribute over its RFC 5280 bound, as the fuzzer's CSRs made it do in the server."""
    import json
    import subprocess
    import sys

    script = (
        "import warnings\n"
        "from pkigate.gateways.logs import configure_logging\n"
        "configure_logging()\n"
        'warnings.warn("Attribute\'s length must be >= 1 and <= 64", UserWarning)\n'
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    logged = json.loads(lines[0])
    assert logged["logger"] == "py.warnings" and "length must be" in logged["msg"]
