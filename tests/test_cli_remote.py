"""`pkigate --server URL --token T --ca-bundle root.pem ...`: the console script on a server.

The server is the real HTTPS app (werkzeug's server on a loopback port, with the TLS
certificate the gateway issues itself); the CLI runs as a separate process, as a user
would run it, and must print what it prints against a local data directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from helpers import make_csr
from werkzeug.serving import BaseWSGIServer, make_server

from pkigate.core import Actor
from pkigate.devsim.spawn import free_port
from pkigate.gateways.app import create_app
from pkigate.gateways.config import parse_config
from pkigate.gateways.roles import LEGACY_ROLES
from pkigate.gateways.runtime import Gateway

PKIGATE = str(Path(sys.executable).parent / "pkigate")


def _clean_environment() -> dict[str, str]:
    """The caller's environment without pkigate's or requests' own settings."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PKIGATE_") and key not in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
    }


@dataclass
class RemoteServer:
    gw: Gateway
    url: str
    bundle: Path
    data_dir: Path
    work: Path
    secrets: dict[str, str]

    def run(
        self,
        *args: str,
        role: str | None = "admin",
        ok: bool = True,
        env: dict[str, str] | None = None,
        connection: tuple[str, ...] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """`pkigate --server ... --token <role's> --ca-bundle ... ARGS`."""
        if connection is None:
            connection = ("--server", self.url, "--ca-bundle", str(self.bundle))
            if role is not None:
                connection += ("--token", self.secrets[role])
        result = subprocess.run(
            [PKIGATE, *connection, *args],
            capture_output=True,
            text=True,
            cwd=self.work,
            env={**_clean_environment(), **(env or {})},
            timeout=120,
        )
        if ok:
            assert result.returncode == 0, result.stderr
        return result

    def json(self, *args: str, role: str = "admin") -> Any:
        return json.loads(self.run("--json", *args, role=role).stdout)

    def local(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The same verb on the server's data directory, without the server."""
        return self.run(*args, connection=("--data-dir", str(self.data_dir)))

    @property
    def issuing_id(self) -> str:
        return self.gw.ca_ids["issuing"]


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    base = tmp_path_factory.mktemp("remote")
    data_dir = base / "data"
    port = free_port()
    gw = Gateway.open(
        parse_config(f"data_dir = '{data_dir}'\n[listeners]\nhttps = '127.0.0.1:{port}'\n"),
        bootstrap=True,
    )
    certificate, key = gw.ensure_tls_certificate()
    server: BaseWSGIServer = make_server(
        "127.0.0.1",
        port,
        create_app(gw, "https"),
        threaded=True,
        ssl_context=(str(certificate), str(key)),
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    bundle = base / "root.pem"
    bundle.write_text(gw.core.authorities.certificate_pem(gw.ca_ids["root"])[0])
    secrets = {
        # The roles as before they were fine-grained (an issuer also approves).
        role: gw.tokens.create(f"{role}-cli", LEGACY_ROLES[role], Actor("test")).secret
        for role in ("admin", "issuer", "auditor")
    }
    work = base / "work"
    work.mkdir()
    try:
        yield RemoteServer(gw, f"https://127.0.0.1:{port}", bundle, data_dir, work, secrets)
    finally:
        server.shutdown()
        thread.join(10)
        gw.close()


def _principal(remote: RemoteServer, role: str) -> str:
    return f"token:{role}-cli({remote.secrets[role].split('_')[1]})"


def test_ca_verbs_on_a_server_act_there_and_print_what_they_print_locally(
    remote: RemoteServer,
) -> None:
    assert remote.run("ca", "list").stdout == remote.local("ca", "list").stdout

    created = remote.json(
        "ca",
        "create",
        "--type",
        "ROOT",
        "--subject",
        "CN=Remote Root,O=pkigate tests",
        "--key-algorithm",
        "EC_secp384r1",
        "--validity",
        "5y",
        "--crl-url",
        "http://pki.test/crl",
        "--tag",
        "team=pki",
    )
    ca_id = created["id"]
    assert created["status"] == "ACTIVE"
    assert created["signing_algorithm"] == "SHA384WITHECDSA"
    assert created["settings"]["crl_url"] == "http://pki.test/crl"
    view = remote.gw.core.authorities.describe(ca_id)
    assert dict(view.tags) == {"team": "pki"}
    creation = [e for e in remote.gw.core.audit.events() if e.action == "ca.create"][-1]
    assert (creation.actor, creation.connector) == (_principal(remote, "admin"), "api")

    assert (
        remote.run("ca", "describe", ca_id).stdout == remote.local("ca", "describe", ca_id).stdout
    )
    assert remote.json("ca", "tag", ca_id, "env=test", "--remove", "team") == {"env": "test"}
    assert remote.json("ca", "tag", ca_id) == {"env": "test"}
    pem = remote.run("ca", "certificate", ca_id).stdout
    assert x509.load_pem_x509_certificate(pem.encode()).subject.rfc4514_string() == (
        "CN=Remote Root,O=pkigate tests"
    )
    assert "DISABLED" in remote.run("ca", "update", ca_id, "--status", "DISABLED").stdout
    assert remote.json("ca", "delete", ca_id, "--restore-days", "7")["status"] == "DELETED"
    assert remote.json("ca", "restore", ca_id)["status"] == "DISABLED"


def test_certificates_are_issued_fetched_and_listed_through_the_server(
    remote: RemoteServer,
) -> None:
    csr = remote.work / "web.csr"
    csr.write_bytes(make_csr("web.remote.test"))
    issued = remote.run(
        "cert",
        "issue",
        "--ca",
        remote.issuing_id,
        "--csr",
        str(csr),
        "--template",
        "EndEntityServerAuthCertificate/V1",
        "--validity",
        "30d",
        "--out",
        "web.pem",
        "--chain-out",
        "chain.pem",
        role="issuer",
    ).stdout
    certificate = x509.load_pem_x509_certificate((remote.work / "web.pem").read_bytes())
    serial = format(certificate.serial_number, "x")
    assert issued.strip() == f"issued serial {serial} to CN=web.remote.test; wrote web.pem"
    chain = x509.load_pem_x509_certificates((remote.work / "chain.pem").read_bytes())
    certificate.verify_directly_issued_by(chain[0])

    # A DER request is converted to PEM by the client.
    der = remote.work / "der.csr"
    der.write_bytes(
        x509.load_pem_x509_csr(make_csr("der.remote.test")).public_bytes(serialization.Encoding.DER)
    )
    from_der = remote.json(
        "cert", "issue", "--ca", remote.issuing_id, "--csr", str(der), role="issuer"
    )
    assert from_der["subject"] == "CN=der.remote.test"

    for role in ("issuer", "auditor"):
        got = remote.run("cert", "get", "--ca", remote.issuing_id, "--serial", serial, role=role)
        local = remote.local("cert", "get", "--ca", remote.issuing_id, "--serial", serial)
        assert got.stdout == local.stdout
    listed = remote.run("cert", "list", "--ca", remote.issuing_id, role="auditor").stdout
    assert listed == remote.local("cert", "list", "--ca", remote.issuing_id).stdout
    assert serial in listed
    everywhere = remote.json("cert", "list", "--limit", "1000", role="auditor")
    assert {serial, from_der["serial"]} <= {c["serial"] for c in everywhere}
    one = remote.json("cert", "list", "--ca", remote.issuing_id, "--limit", "1", role="auditor")
    assert len(one) == 1


def test_audit_is_verified_and_reported_through_the_server(remote: RemoteServer) -> None:
    verified = remote.run("audit", "verify", role="auditor").stdout
    assert verified.startswith("audit log OK: ")
    for fmt in ("json", "csv"):
        report = remote.run(
            "audit", "report", "--ca", remote.issuing_id, "--format", fmt, role="auditor"
        )
        local = remote.local("audit", "report", "--ca", remote.issuing_id, "--format", fmt)
        assert report.stdout == local.stdout
    assert (
        remote.run("template", "list", role="auditor").stdout
        == remote.local("template", "list").stdout
    )


def test_tokens_are_managed_remotely_and_locally(remote: RemoteServer) -> None:
    created = remote.json(
        "token",
        "create",
        "--name",
        "ci",
        "--role",
        "issuer",
        "--role",
        "revoker",
        "--expires-in",
        "90d",
        "--allow-from",
        "127.0.0.0/8",
    )
    assert created["roles"] == ["issuer", "revoker"]
    assert created["expires_at"] is not None and created["allow_from"] == ["127.0.0.0/8"]
    old_secret = created["secret"]
    connection = ("--server", remote.url, "--ca-bundle", str(remote.bundle), "--token", old_secret)
    remote.run("template", "list", connection=connection)

    listed = remote.run("--json", "token", "list").stdout
    assert old_secret.removeprefix(f"pkigate_{created['id']}_") not in listed
    (shown,) = [t for t in json.loads(listed) if t["id"] == created["id"]]
    assert shown["last_used_at"] is not None
    table = remote.run("token", "list").stdout
    assert "issuer,revoker" in table and "LAST USED" in table

    # A rotation: the new secret works, and the old one for the overlap asked for.
    rotated = remote.json("token", "rotate", created["id"], "--overlap", "1h")
    secret = rotated["secret"]
    assert secret != old_secret and rotated["overlap_until"] is not None
    remote.run("template", "list", connection=connection)
    connection = ("--server", remote.url, "--ca-bundle", str(remote.bundle), "--token", secret)
    remote.run("template", "list", connection=connection)
    revoked = remote.json("token", "revoke", created["id"])
    assert revoked["revoked_at"] is not None
    refused = remote.run("template", "list", connection=connection, ok=False)
    assert refused.returncode == 1
    assert refused.stderr.strip() == "error: this token has been revoked [unauthenticated]"

    # A token made on the server's own machine (data directory) works over the API.
    local = json.loads(
        remote.local(
            "--json", "token", "create", "--name", "night-audit", "--role", "auditor"
        ).stdout
    )
    connection = (
        "--server",
        remote.url,
        "--ca-bundle",
        str(remote.bundle),
        "--token",
        local["secret"],
    )
    assert remote.run("audit", "verify", connection=connection).stdout.startswith("audit log OK")
    assert "night-audit" in remote.local("token", "list").stdout


def test_server_token_and_bundle_can_come_from_the_environment(remote: RemoteServer) -> None:
    result = remote.run(
        "--json",
        "ca",
        "list",
        connection=(),
        env={
            "PKIGATE_SERVER": remote.url,
            "PKIGATE_TOKEN": remote.secrets["auditor"],
            "PKIGATE_CA_BUNDLE": str(remote.bundle),
        },
    )
    assert remote.issuing_id in {c["id"] for c in json.loads(result.stdout)}


@pytest.mark.parametrize(
    ("connection_kind", "args", "expected"),
    [
        ("issuer", ("ca", "create", "--type", "ROOT", "--subject", "CN=No"), "[forbidden]"),
        ("auditor", ("cert", "issue", "--ca", "{issuing}", "--csr", "-"), "[forbidden]"),
        ("none", ("ca", "list"), "a token is required"),
        ("no-bundle", ("ca", "list"), "[tlsError]"),
        ("closed-port", ("ca", "list"), "[unreachable]"),
        ("admin", ("ca", "describe", "no-such-ca"), "error: no CA with id no-such-ca [notFound]"),
        ("admin", ("demo",), "local data directory"),
    ],
    ids=[
        "wrong-role",
        "wrong-role-issue",
        "no-token",
        "no-bundle",
        "closed-port",
        "not-found",
        "demo",
    ],
)
def test_remote_errors_are_one_line_on_stderr_and_exit_1(
    remote: RemoteServer, connection_kind: str, args: tuple[str, ...], expected: str
) -> None:
    admin = remote.secrets["admin"]
    connections = {
        "none": ("--server", remote.url, "--ca-bundle", str(remote.bundle)),
        "no-bundle": ("--server", remote.url, "--token", admin),
        "closed-port": ("--server", f"https://127.0.0.1:{free_port()}", "--token", admin),
    }
    connection = connections.get(connection_kind) or (
        "--server",
        remote.url,
        "--ca-bundle",
        str(remote.bundle),
        "--token",
        remote.secrets[connection_kind],
    )
    before = len(remote.gw.core.authorities.list_cas())
    result = subprocess.run(
        [PKIGATE, *connection, *(a.format(issuing=remote.issuing_id) for a in args)],
        input=make_csr().decode(),
        capture_output=True,
        text=True,
        cwd=remote.work,
        env=_clean_environment(),
        timeout=120,
    )
    assert result.returncode == 1, result.stdout
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: ")
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert len(remote.gw.core.authorities.list_cas()) == before


def test_server_and_data_dir_together_is_a_usage_error(remote: RemoteServer) -> None:
    result = remote.run("--data-dir", str(remote.data_dir), "ca", "list", ok=False)
    assert result.returncode == 2
    assert "--server acts on a server, not on --data-dir" in result.stderr


def test_scep_pending_requests_are_listed_approved_and_rejected_through_the_server(
    remote: RemoteServer,
) -> None:
    from pkigate.scep.connector import ScepConnector

    (connector,) = [c for c in remote.gw.connectors if isinstance(c, ScepConnector)]
    name = connector.context.name
    for transaction_id, cn in (("remote-1", "held-1"), ("remote-2", "held-2")):
        csr = x509.load_pem_x509_csr(make_csr(cn))
        connector.approvals.hold(
            transaction_id=transaction_id,
            csr_sha256=transaction_id,
            csr_der=csr.public_bytes(serialization.Encoding.DER),
            subject=csr.subject.rfc4514_string(),
            evidence={"challenge": "static"},
            client=Actor("scep-client:192.0.2.1", name),
        )
    listed = remote.json("scep", "pending", "list", "--connector", name, role="issuer")
    assert {p["transaction_id"] for p in listed} >= {"remote-1", "remote-2"}
    refused = remote.run("scep", "pending", "list", "--connector", name, role="auditor", ok=False)
    assert refused.returncode == 1 and refused.stderr.startswith("error: ")

    approved = remote.json("scep", "pending", "approve", "--connector", name, "remote-1")
    certificate = x509.load_pem_x509_certificate(approved["certificate"].encode())
    assert certificate.subject.rfc4514_string() == "CN=held-1"
    remote.run("scep", "pending", "reject", "--connector", name, "--reason", "unknown", "remote-2")
    left = remote.json("scep", "pending", "list", "--connector", name)
    assert not {p["transaction_id"] for p in left} & {"remote-1", "remote-2"}
    again = remote.run("scep", "pending", "approve", "--connector", name, "remote-2", ok=False)
    assert again.returncode == 1 and "not pending" in again.stderr


def test_tokens_are_changed_and_teams_deleted_remotely_and_locally(remote: RemoteServer) -> None:
    created = remote.json("token", "create", "--name", "changing", "--role", "auditor")
    changed = remote.json(
        "token", "update", created["id"], "--role", "revoker", "--allow-from", "127.0.0.0/8"
    )
    assert changed["roles"] == ["revoker"] and changed["allow_from"] == ["127.0.0.0/8"]
    local = remote.local(
        "token", "update", created["id"], "--allow-anywhere", "--expires-in", "1d"
    ).stdout
    assert f"token {created['id']}: roles revoker; from anywhere; expires 20" in local
    refused = remote.run("token", "update", created["id"], ok=False)
    assert "nothing to change" in refused.stderr

    assert remote.json("team", "create", "gone")["name"] == "gone"
    assert remote.json("team", "delete", "gone") == {"name": "gone", "deleted": True}
    remote.local("team", "create", "gone-too")
    assert remote.local("team", "delete", "gone-too").stdout.strip() == "team gone-too deleted"
    kept = remote.run("team", "delete", "default", ok=False)
    assert "team default is never deleted" in kept.stderr
