"""The `pkigate` console script, run as a user would run it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from pkigate.core import Core

PKIGATE = str(Path(sys.executable).parent / "pkigate")


class Cli:
    def __init__(self, home: Path) -> None:
        self.home = home

    def run(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [PKIGATE, "--data-dir", str(self.home), *args],
            capture_output=True,
            text=True,
            cwd=self.home.parent,
        )
        if ok:
            assert result.returncode == 0, result.stderr
        return result

    def json(self, *args: str) -> object:
        return json.loads(self.run("--json", *args).stdout)


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path / "home")


@pytest.fixture
def hierarchy(cli: Cli) -> tuple[str, str]:
    root = cli.json(
        "ca",
        "create",
        "--type",
        "ROOT",
        "--subject",
        "CN=CLI Root,O=Tests",
        "--key-algorithm",
        "EC_secp384r1",
        "--tag",
        "team=pki",
    )
    sub = cli.json(
        "ca",
        "create",
        "--type",
        "SUBORDINATE",
        "--subject",
        "CN=CLI Issuing",
        "--parent",
        root["id"],
        "--path-length",
        "0",  # type: ignore[index]
        "--crl-url",
        "http://pki.test/crl",
        "--validity",
        "2y",
    )
    return root["id"], sub["id"]  # type: ignore[index]


def _csr(directory: Path, cn: str = "cli.example.test") -> Path:
    subprocess.run(
        [
            "openssl",
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "key.pem",
            "-out",
            "req.csr",
            "-subj",
            f"/CN={cn}",
            "-addext",
            f"subjectAltName=DNS:{cn}",
        ],
        cwd=directory,
        check=True,
        capture_output=True,
    )
    return directory / "req.csr"


def test_ca_create_list_describe_and_certificate(cli: Cli, hierarchy: tuple[str, str]) -> None:
    root_id, sub_id = hierarchy
    listing = cli.json("ca", "list")
    assert {c["id"]: c["status"] for c in listing} == {root_id: "ACTIVE", sub_id: "ACTIVE"}  # type: ignore[union-attr,index]
    described = cli.json("ca", "describe", root_id)
    assert described["key_algorithm"] == "EC_secp384r1"  # type: ignore[index]
    assert described["signing_algorithm"] == "SHA384WITHECDSA"  # type: ignore[index]
    assert described["tags"] == {"team": "pki"}  # type: ignore[index]
    human = cli.run("ca", "list").stdout
    assert root_id in human and "CN=CLI Root,O=Tests" in human
    pem = cli.run("ca", "certificate", sub_id).stdout
    certificates = x509.load_pem_x509_certificates(pem.encode())
    assert [c.subject.rfc4514_string() for c in certificates] == [
        "CN=CLI Issuing",
        "CN=CLI Root,O=Tests",
    ]


def test_cert_issue_get_list_and_openssl_verifies_the_chain(
    cli: Cli, hierarchy: tuple[str, str], tmp_path: Path
) -> None:
    root_id, sub_id = hierarchy
    csr = _csr(tmp_path)
    issued = cli.json(
        "cert",
        "issue",
        "--ca",
        sub_id,
        "--csr",
        str(csr),
        "--template",
        "EndEntityServerAuthCertificate/V1",
        "--validity",
        "10d",
        "--out",
        str(tmp_path / "leaf.pem"),
        "--chain-out",
        str(tmp_path / "chain.pem"),
    )
    serial = issued["serial"]  # type: ignore[index]
    (tmp_path / "root.pem").write_text(cli.run("ca", "certificate", root_id).stdout + "\n")
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", "root.pem", "-untrusted", "chain.pem", "leaf.pem"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert verify.stdout.strip() == "leaf.pem: OK", verify.stderr
    openssl_serial = subprocess.run(
        ["openssl", "x509", "-in", "leaf.pem", "-noout", "-serial"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    ).stdout
    colon_serial = ":".join(
        openssl_serial.split("=")[1].strip()[i : i + 2]
        for i in range(0, len(openssl_serial.split("=")[1].strip()), 2)
    )
    got = cli.json("cert", "get", "--ca", sub_id, "--serial", colon_serial)
    assert got["serial"] == serial and got["sans"] == ["DNS:cli.example.test"]  # type: ignore[index]
    assert (
        "http://pki.test/crl"
        in subprocess.run(
            ["openssl", "x509", "-in", "leaf.pem", "-noout", "-ext", "crlDistributionPoints"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
        ).stdout
    )
    soon = cli.json("cert", "list", "--ca", sub_id, "--expiring-within", "30d")
    later = cli.json("cert", "list", "--ca", sub_id, "--expiring-within", "5d")
    assert [c["serial"] for c in soon] == [serial] and later == []  # type: ignore[union-attr,index]
    assert cli.json("cert", "list", "--status", "REVOKED") == []


def test_api_passthrough_from_a_json_file(
    cli: Cli, hierarchy: tuple[str, str], tmp_path: Path
) -> None:
    _, sub_id = hierarchy
    (tmp_path / "api.json").write_text(
        json.dumps(
            {
                "subject": "CN=from-api,O=Tests",
                "sans": [{"dns": "from-api.test"}, {"ip": "10.9.8.7"}],
            }
        )
    )
    issued = cli.json(
        "cert",
        "issue",
        "--ca",
        sub_id,
        "--csr",
        str(_csr(tmp_path)),
        "--template",
        "EndEntityCertificate_APIPassthrough/V1",
        "--api-passthrough",
        str(tmp_path / "api.json"),
    )
    assert issued["subject"] == "CN=from-api,O=Tests"  # type: ignore[index]
    assert issued["sans"] == ["DNS:from-api.test", "IP:10.9.8.7"]  # type: ignore[index]


def test_errors_are_one_line_with_a_non_zero_exit(
    cli: Cli, hierarchy: tuple[str, str], tmp_path: Path
) -> None:
    _, sub_id = hierarchy
    (tmp_path / "junk.csr").write_text("not a csr")
    result = cli.run("cert", "issue", "--ca", sub_id, "--csr", str(tmp_path / "junk.csr"), ok=False)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: CSR cannot be parsed") and "[badCSR]" in result.stderr
    assert "Traceback" not in result.stderr
    missing = cli.run("ca", "describe", "no-such-id", ok=False)
    assert missing.returncode == 1 and "[notFound]" in missing.stderr
    usage = cli.run("ca", "create", "--type", "ROOT", ok=False)
    assert usage.returncode == 2 and "--subject" in usage.stderr


def test_file_problems_are_one_line_and_nothing_is_issued_for_an_unwritable_out(
    cli: Cli, hierarchy: tuple[str, str], tmp_path: Path
) -> None:
    """Found in review: these ended in tracebacks, and `cert issue --out /nonexistent/x`
    issued and stored the certificate before failing to write it."""
    _, sub_id = hierarchy

    def one_line_error(result: subprocess.CompletedProcess[str], text: str) -> None:
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr
        assert result.stderr.count("\n") == 1 and text in result.stderr, result.stderr

    count = len(cli.json("cert", "list", "--ca", sub_id))  # type: ignore[arg-type]
    csr = _csr(tmp_path)
    missing_dir = str(tmp_path / "no-such-dir" / "x.pem")
    one_line_error(
        cli.run("cert", "issue", "--ca", sub_id, "--csr", str(csr), "--out", missing_dir, ok=False),
        "no directory",
    )
    assert len(cli.json("cert", "list", "--ca", sub_id)) == count  # type: ignore[arg-type]
    one_line_error(
        cli.run("audit", "report", "--ca", sub_id, "--out", missing_dir, ok=False), "no directory"
    )
    bad_json, a_list, unknown, latin1 = (tmp_path / n for n in ("bad", "list", "unknown", "latin1"))
    bad_json.write_text("{not json")
    a_list.write_text("[1, 2]")
    unknown.write_text('{"permitted": ["corp.example"]}')
    latin1.write_bytes('{"subject": "CN=caf\xe9"}'.encode("latin-1"))
    for path, text in (
        (bad_json, "invalid JSON"),
        (a_list, "a JSON object"),
        (unknown, "unknown name constraint key(s) permitted"),
    ):
        one_line_error(
            cli.run(
                "ca",
                "create",
                "--type",
                "ROOT",
                "--subject",
                "CN=NC",
                "--name-constraints",
                str(path),
                ok=False,
            ),
            text,
        )
    one_line_error(
        cli.run(
            "cert",
            "issue",
            "--ca",
            sub_id,
            "--csr",
            str(csr),
            "--template",
            "EndEntityCertificate_APIPassthrough/V1",
            "--api-passthrough",
            str(latin1),
            ok=False,
        ),
        "not UTF-8",
    )


def test_refusals_of_what_the_command_line_says_are_audited(
    cli: Cli, hierarchy: tuple[str, str], tmp_path: Path
) -> None:
    """Found in review: a bad subject, validity or tag was refused in one line but never
    reached the audit log (it was read before the core's audited call)."""
    _, sub_id = hierarchy
    refused = [
        ("ca.create", ("ca", "create", "--type", "ROOT", "--subject", "CN=" + "x" * 65)),
        ("ca.create", ("ca", "create", "--type", "ROOT", "--subject", "CN=x", "--validity", "0d")),
        ("ca.tag", ("ca", "tag", sub_id, "=x")),
        (
            "certificate.issue",
            ("cert", "issue", "--ca", sub_id, "--csr", str(_csr(tmp_path)), "--validity", "bogus"),
        ),
    ]
    for _, args in refused:
        result = cli.run(*args, ok=False)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    core = Core.open(cli.home)
    try:
        failures = [e for e in core.audit.events() if e.result == "failure"]
        assert [e.action for e in failures[-len(refused) :]] == [a for a, _ in refused]
        assert core.audit.verify().ok
    finally:
        core.close()


def test_bring_your_own_parent_through_the_cli(
    cli: Cli, hierarchy: tuple[str, str], tmp_path: Path
) -> None:
    root_id, _ = hierarchy
    pending = cli.json("ca", "create", "--type", "SUBORDINATE", "--subject", "CN=BYO")
    assert pending["status"] == "PENDING_CERTIFICATE"  # type: ignore[index]
    cli.run("ca", "csr", pending["id"], "--out", str(tmp_path / "byo.csr"))  # type: ignore[index]
    signed = cli.json(
        "cert",
        "issue",
        "--ca",
        root_id,
        "--csr",
        str(tmp_path / "byo.csr"),
        "--template",
        "SubordinateCACertificate_PathLen0/V1",
        "--validity",
        "1y",
        "--out",
        str(tmp_path / "byo.pem"),
        "--chain-out",
        str(tmp_path / "byo-chain.pem"),
    )
    assert signed["template"] == "SubordinateCACertificate_PathLen0/V1"  # type: ignore[index]
    imported = cli.json(
        "ca",
        "import-certificate",
        pending["id"],
        "--certificate",  # type: ignore[index]
        str(tmp_path / "byo.pem"),
        "--chain",
        str(tmp_path / "byo-chain.pem"),
    )
    assert imported["status"] == "ACTIVE"  # type: ignore[index]


def test_lifecycle_and_tags_through_the_cli(cli: Cli, hierarchy: tuple[str, str]) -> None:
    _, sub_id = hierarchy
    refused = cli.run("ca", "delete", sub_id, ok=False)
    assert refused.returncode == 1 and "disable it before deleting" in refused.stderr
    assert cli.json("ca", "update", sub_id, "--status", "DISABLED")["status"] == "DISABLED"  # type: ignore[index]
    assert cli.json("ca", "delete", sub_id, "--restore-days", "7")["status"] == "DELETED"  # type: ignore[index]
    assert cli.json("ca", "restore", sub_id)["status"] == "DISABLED"  # type: ignore[index]
    assert cli.json("ca", "tag", sub_id, "env=prod", "owner=me") == {"env": "prod", "owner": "me"}
    assert cli.json("ca", "tag", sub_id, "--remove", "env") == {"owner": "me"}


def test_audit_list_filters_events_newest_first(cli: Cli, hierarchy: tuple[str, str]) -> None:
    listed = cli.json("audit", "list", "--action", "ca.create")
    assert isinstance(listed, dict)
    events = listed["events"]
    assert [e["action"] for e in events] == ["ca.create", "ca.create"]
    assert events[0]["seq"] > events[1]["seq"]
    assert events[1]["resource"] == f"ca/{hierarchy[0]}"
    text = cli.run("audit", "list", "--resource", hierarchy[1], "--limit", "1").stdout
    assert len(text.splitlines()) == 1 and hierarchy[1] in text
    assert "no event matches" in cli.run("audit", "list", "--actor", "nobody-at-all").stdout


def test_audit_verify_and_report(cli: Cli, hierarchy: tuple[str, str], tmp_path: Path) -> None:
    _, sub_id = hierarchy
    cli.run("cert", "issue", "--ca", sub_id, "--csr", str(_csr(tmp_path)))
    verified = cli.run("audit", "verify")
    assert verified.stdout.startswith("audit log OK:")
    report = cli.json("audit", "report", "--ca", sub_id)
    assert len(report) == 1  # type: ignore[arg-type]
    csv_text = cli.run("audit", "report", "--ca", sub_id, "--format", "csv").stdout
    assert csv_text.splitlines()[0].startswith("serial,subject,notBefore,notAfter,issuedAt")
    import sqlite3

    with sqlite3.connect(cli.home / "pkigate.db") as db:
        db.execute("UPDATE audit_events SET actor = 'x' WHERE seq = 2")
    tampered = cli.run("audit", "verify", ok=False)
    assert tampered.returncode == 1 and "event 2: edited" in tampered.stdout


def test_template_list_names_the_catalogue(cli: Cli) -> None:
    names = [t["name"] for t in cli.json("template", "list")]  # type: ignore[union-attr,index]
    for name in (
        "EndEntityCertificate/V1",
        "EndEntityClientAuthCertificate/V1",
        "EndEntityServerAuthCertificate/V1",
        "CodeSigningCertificate/V1",
        "OCSPSigningCertificate/V1",
        "RootCACertificate/V1",
        "SubordinateCACertificate_PathLen3/V1",
        "BlankEndEntityCertificate_APICSRPassthrough/V1",
        "EndEntityServerAuthCertificate_APICSRPassthrough/V1",
    ):
        assert name in names


def test_demo_creates_the_hierarchy_once_and_issues_each_time(cli: Cli) -> None:
    first = cli.json("demo")
    second = cli.json("demo")
    assert first["root CA"] == second["root CA"]  # type: ignore[index]
    assert first["certificate serial"] != second["certificate serial"]  # type: ignore[index]
    verify = subprocess.run(second["check it with"].split(), capture_output=True, text=True)  # type: ignore[index]
    assert verify.stdout.strip().endswith(": OK")


def test_revoke_and_crl_through_the_cli(cli: Cli, tmp_path: Path) -> None:
    root = cli.json(
        "ca",
        "create",
        "--type",
        "ROOT",
        "--subject",
        "CN=CLI CRL Root",
        "--crl-url",
        "http://pki.test/crl/root.crl",
    )
    issued = cli.json("cert", "issue", "--ca", root["id"], "--csr", str(_csr(tmp_path)))  # type: ignore[index]
    serial = issued["serial"]  # type: ignore[index]
    revoked = cli.json(
        "cert",
        "revoke",
        "--ca",
        root["id"],
        "--serial",
        serial,  # type: ignore[index]
        "--reason",
        "keyCompromise",
    )
    assert (revoked["status"], revoked["revocation_reason"]) == ("REVOKED", "keyCompromise")  # type: ignore[index]
    again = cli.run("cert", "revoke", "--ca", root["id"], "--serial", serial, ok=False)  # type: ignore[index]
    assert again.returncode == 1 and "already revoked" in again.stderr
    crl_path = tmp_path / "root.crl"
    crl_info = cli.json("ca", "crl", root["id"], "--out", str(crl_path))  # type: ignore[index]
    assert crl_info["entries"] == 1  # type: ignore[index]
    text = subprocess.run(
        ["openssl", "crl", "-inform", "DER", "-in", str(crl_path), "-noout", "-text"],
        capture_output=True,
        text=True,
    ).stdout
    assert serial.upper().zfill(len(serial) + len(serial) % 2) in text.replace(":", "")
    assert "Key Compromise" in text
    assert cli.json("cert", "list", "--status", "REVOKED")[0]["serial"] == serial  # type: ignore[index]
