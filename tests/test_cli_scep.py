"""`pkigate scep pending` and `pkigate scep profile`, run as an administrator would."""

from __future__ import annotations

import hashlib
import json
import plistlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from test_scep import Device
from test_scep_pending import CHALLENGE, PendingEnv, pending_config

from pkigate.core.store import scep as scep_store
from pkigate.gateways.config import parse_config
from pkigate.gateways.runtime import Gateway
from pkigate.scep.messages import FailInfo, MessageType, PkiStatus

PKIGATE = str(Path(sys.executable).parent / "pkigate")


class ScepCli:
    def __init__(self, data_dir: Path, config: Path) -> None:
        self.data_dir = data_dir
        self.config = config

    def run(self, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        command = [PKIGATE, "--data-dir", str(self.data_dir)]
        if args and args[0] == "--json":
            command.append(args[0])
            args = args[1:]
        result = subprocess.run(
            [*command, "scep", "--config", str(self.config), *args],
            capture_output=True,
            text=True,
        )
        if ok:
            assert result.returncode == 0, result.stderr
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.run("--json", *args).stdout)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[PendingEnv, ScepCli]]:
    data_dir = tmp_path / "data"
    config = tmp_path / "pkigate.toml"
    config.write_text(pending_config(data_dir))
    gateway = Gateway.open(parse_config(config.read_text()), bootstrap=True)
    yield PendingEnv(gateway), ScepCli(data_dir, config)
    gateway.close()


def test_cli_lists_and_approves_a_pending_request_which_cert_poll_then_returns(
    setup: tuple[PendingEnv, ScepCli],
) -> None:
    env, cli = setup
    device = Device.new()
    assert env.enroll(device, "cli-1").status is PkiStatus.PENDING
    listed = cli.json("pending", "list", "--connector", "mdm")
    assert [(p["transaction_id"], p["subject"]) for p in listed] == [("cli-1", "CN=device-1")]
    assert "cli-1" in cli.run("pending", "list", "--connector", "mdm").stdout

    approved = cli.json("pending", "approve", "--connector", "mdm", "cli-1")
    assert approved["status"] == "ISSUED"
    rep = env.poll(device, "cli-1")
    assert rep.status is PkiStatus.SUCCESS
    assert rep.certificates[0].public_key() == device.key.public_key()
    assert format(rep.certificates[0].serial_number, "x") == approved["serial"]
    issue = [e for e in env.audit("certificate.issue") if e.get("correlation_id") == "cli-1"]
    assert issue[0]["approved_by"].startswith("cli:")
    assert cli.run("pending", "list", "--connector", "mdm").stdout.strip() == "no pending requests"


def test_cli_rejects_a_pending_request_and_refuses_unknown_ones(
    setup: tuple[PendingEnv, ScepCli],
) -> None:
    env, cli = setup
    device = Device.new()
    env.enroll(device, "cli-2")
    cli.run("pending", "reject", "--connector", "mdm", "--reason", "not ours", "cli-2")
    rep = env.poll(device, "cli-2")
    assert (rep.status, rep.fail_info) == (PkiStatus.FAILURE, FailInfo.BAD_REQUEST)
    with env.gateway.core.store.read() as conn:
        row = scep_store.get_transaction(conn, "mdm", "cli-2")
    assert row is not None and row.status == "REJECTED"
    assert json.loads(row.evidence)["rejection_reason"] == "not ours"

    again = cli.run("pending", "approve", "--connector", "mdm", "cli-2", ok=False)
    assert again.returncode == 1 and "not pending" in again.stderr
    missing = cli.run("pending", "list", "--connector", "nope", ok=False)
    assert missing.returncode == 1 and "no SCEP connector 'nope'" in missing.stderr


def test_profile_carries_the_scep_payload_with_the_ca_fingerprint(
    setup: tuple[PendingEnv, ScepCli], tmp_path: Path
) -> None:
    env, cli = setup
    out = tmp_path / "enroll.mobileconfig"
    cli.run("profile", "--connector", "mdm", "--subject", "CN=laptop-7,O=Acme", "--out", str(out))
    profile = plistlib.loads(out.read_bytes())
    assert profile["PayloadType"] == "Configuration"
    assert profile["PayloadVersion"] == 1
    assert profile["PayloadIdentifier"] and profile["PayloadUUID"]
    (payload,) = profile["PayloadContent"]
    assert payload["PayloadType"] == "com.apple.security.scep"
    assert payload["PayloadVersion"] == 1
    assert payload["PayloadUUID"] != profile["PayloadUUID"]
    assert payload["PayloadIdentifier"].startswith(profile["PayloadIdentifier"])
    content = payload["PayloadContent"]
    assert content["URL"] == env.gateway.connectors[0].context.url
    assert content["URL"].endswith("/mdm")
    assert content["Name"] == "mdm"
    assert content["Subject"] == [[["O", "Acme"]], [["CN", "laptop-7"]]]
    assert content["Challenge"] == CHALLENGE
    assert (content["Keysize"], content["Key Type"], content["Key Usage"]) == (2048, "RSA", 5)
    ca_id = env.gateway.connectors[0].context.ca_id
    ca_pem, _ = env.gateway.core.authorities.certificate_pem(ca_id)
    ca_der = x509.load_pem_x509_certificate(ca_pem.encode()).public_bytes(
        serialization.Encoding.DER
    )
    assert isinstance(content["CAFingerprint"], bytes)
    assert content["CAFingerprint"] == hashlib.sha256(ca_der).digest()


def test_profile_with_one_time_embeds_a_fresh_challenge_bound_to_the_subject(
    setup: tuple[PendingEnv, ScepCli],
) -> None:
    env, cli = setup
    first = plistlib.loads(cli.run("profile", "--connector", "mdm", "--one-time").stdout.encode())
    second = plistlib.loads(cli.run("profile", "--connector", "mdm", "--one-time").stdout.encode())
    challenges = [p["PayloadContent"][0]["PayloadContent"]["Challenge"] for p in (first, second)]
    assert CHALLENGE not in challenges and challenges[0] != challenges[1]
    assert first["PayloadContent"][0]["PayloadContent"]["Subject"] == [[["CN", "device"]]]
    # The one-time challenge enrolls the profile's subject (held for approval here).
    device = Device.new("device")
    rep = env.send(device, device.csr(challenges[0], cn="device"), MessageType.PKCS_REQ, "otp-1")
    assert rep.status is PkiStatus.PENDING, rep.fail_info_text
