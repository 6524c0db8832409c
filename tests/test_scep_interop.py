"""Real SCEP clients against a real `pkigate serve`: micromdm's scepclient (Debian `scep`)
and certmonger's scep-submit (Debian `certmonger`)."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import time
import urllib.parse
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID
from helpers import scep_static_challenge
from serving import RunningServer, start_server

SCEPCLIENT = shutil.which("scepclient")
SCEP_SUBMIT = Path("/usr/lib/certmonger/scep-submit")
needs_scepclient = pytest.mark.skipif(
    SCEPCLIENT is None, reason="micromdm scepclient is not installed (Debian package `scep`)"
)
needs_scep_submit = pytest.mark.skipif(
    not SCEP_SUBMIT.exists(), reason="certmonger's scep-submit is not installed (`certmonger`)"
)


@dataclass
class Scep:
    server: RunningServer
    url: str
    challenge: str
    certificates: list[x509.Certificate]  # RA, issuing CA, root

    @property
    def ra_fingerprint(self) -> str:
        return hashlib.sha256(
            self.certificates[0].public_bytes(serialization.Encoding.DER)
        ).hexdigest()

    @property
    def root(self) -> x509.Certificate:
        return self.certificates[-1]


@pytest.fixture(scope="module")
def scep(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scep]:
    if SCEPCLIENT is None and not SCEP_SUBMIT.exists():
        pytest.skip("no SCEP client installed (Debian packages `scep`, `certmonger`)")
    server = start_server(tmp_path_factory.mktemp("scep") / "data")
    try:
        url = f"{server.http_url}/scep"
        challenge = scep_static_challenge(server.config)
        response = requests.get(f"{url}?operation=GetCACert", timeout=10)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # RA first: not DER SET order
            certificates = pkcs7.load_der_pkcs7_certificates(response.content)
        yield Scep(server, url, challenge, certificates)
    finally:
        server.stop()


def scepclient(
    scep: Scep, device: Path, cn: str, challenge: str | None
) -> subprocess.CompletedProcess[str]:
    """One run of scepclient for the device whose key and certificate live in ``device``.

    Without -ca-fingerprint it encrypts to every certificate GetCACert returned, which
    fails on our EC CA; the fingerprint selects the RA, as NDES deployments do."""
    device.mkdir(exist_ok=True)
    command = [
        str(SCEPCLIENT),
        "-server-url",
        scep.url,
        "-cn",
        cn,
        "-private-key",
        str(device / "key.pem"),
        "-certificate",
        str(device / "cert.pem"),
        "-ca-fingerprint",
        scep.ra_fingerprint,
    ]
    if challenge is not None:
        command += ["-challenge", challenge]
    return subprocess.run(
        command, cwd=device, capture_output=True, text=True, timeout=60, check=False
    )


def chains_to_root(certificate: x509.Certificate, scep: Scep) -> None:
    issuing, root = scep.certificates[1], scep.certificates[2]
    certificate.verify_directly_issued_by(issuing)
    issuing.verify_directly_issued_by(root)
    root.verify_directly_issued_by(root)


@needs_scepclient
def test_scepclient_enrolls_with_the_static_challenge(scep: Scep, tmp_path: Path) -> None:
    run = scepclient(scep, tmp_path / "device", "scep-device-1", scep.challenge)
    assert run.returncode == 0, run.stderr
    certificate = x509.load_pem_x509_certificate((tmp_path / "device" / "cert.pem").read_bytes())
    chains_to_root(certificate, scep)
    assert "CN=scep-device-1" in certificate.subject.rfc4514_string()
    eku = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


@needs_scepclient
def test_scepclient_with_a_wrong_challenge_is_refused(scep: Scep, tmp_path: Path) -> None:
    run = scepclient(scep, tmp_path / "device", "scep-device-2", "not-the-challenge")
    assert run.returncode != 0
    assert "badRequest" in run.stdout + run.stderr
    assert not (tmp_path / "device" / "cert.pem").exists()


@needs_scepclient
def test_scepclient_renews_with_its_existing_certificate(scep: Scep, tmp_path: Path) -> None:
    device = tmp_path / "device"
    assert scepclient(scep, device, "scep-device-3", scep.challenge).returncode == 0
    first = x509.load_pem_x509_certificate((device / "cert.pem").read_bytes())
    # No challenge this time: the RenewalReq is signed by the certificate being renewed.
    run = scepclient(scep, device, "scep-device-3", None)
    assert run.returncode == 0, run.stderr
    renewed = x509.load_pem_x509_certificate((device / "cert.pem").read_bytes())
    assert renewed.serial_number != first.serial_number
    assert renewed.subject == first.subject
    chains_to_root(renewed, scep)


@needs_scepclient
def test_scepclient_enrolls_with_a_one_time_challenge(scep: Scep, tmp_path: Path) -> None:
    session = scep.server.session()
    created = session.post(
        f"{scep.server.https_url}/api/v1/connectors/scep/challenges",
        json={"device_id": "C02XYZ"},
        timeout=10,
    )
    assert created.status_code == 201, created.text
    secret = created.json()["challenge"]
    run = scepclient(scep, tmp_path / "device", "scep-device-4", secret)
    assert run.returncode == 0, run.stderr
    # One time only: a second device with the same challenge is refused.
    again = scepclient(scep, tmp_path / "other", "scep-device-5", secret)
    assert again.returncode != 0


@needs_scep_submit
def test_scep_submit_reads_the_capabilities_and_ca_certificates(scep: Scep) -> None:
    caps = subprocess.run(
        [str(SCEP_SUBMIT), "-u", scep.url, "-c"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert caps.returncode == 0, caps.stderr
    assert {"AES", "SHA-256", "POSTPKIOperation", "Renewal"} <= set(caps.stdout.split())
    certs = subprocess.run(
        [str(SCEP_SUBMIT), "-u", scep.url, "-C"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert certs.returncode == 0, certs.stderr
    returned = x509.load_pem_x509_certificates(certs.stdout.encode())
    assert set(returned) == set(scep.certificates)


CERTMONGER = shutil.which("certmonger") or "/usr/sbin/certmonger"
DBUS_RUN_SESSION = shutil.which("dbus-run-session")


@needs_scep_submit
@pytest.mark.skipif(
    DBUS_RUN_SESSION is None or not Path(CERTMONGER).exists(),
    reason="certmonger's daemon or dbus-run-session is not installed",
)
def test_certmonger_enrolls_by_get_with_aes_256_and_a_decimal_transaction_id(
    scep: Scep, tmp_path: Path
) -> None:
    # certmonger generates the key and pkiMessage, and runs scep-submit for each step; a
    # session daemon on a private bus keeps its state in tmp_path, not /var/lib/certmonger.
    state = {name: tmp_path / name for name in ("home", "cas", "requests", "local-ca")}
    for directory in state.values():
        directory.mkdir()
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    script = f"""
export HOME={state["home"]} CERTMONGER_CONFIG_DIR={state["home"]}
export CERTMONGER_CAS_DIR={state["cas"]} CERTMONGER_REQUESTS_DIR={state["requests"]}
export CERTMONGER_LOCAL_CA_DIR={state["local-ca"]}
{CERTMONGER} -s -n > {tmp_path / "certmonger.log"} 2>&1 &
daemon=$!
trap 'kill $daemon' EXIT
sleep 1
getcert add-scep-ca -s -c pkigate -u {scep.url}
getcert request -s -c pkigate -k {key} -f {cert} -L '{scep.challenge}' -N CN=cm-device-1 -w
getcert list -s
"""
    log_start = len(scep.server.log.read_text())
    run = subprocess.run(
        [str(DBUS_RUN_SESSION), "--", "bash", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "status: MONITORING" in run.stdout, run.stdout + run.stderr
    certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    assert certificate.subject.rfc4514_string() == "CN=cm-device-1"
    chains_to_root(certificate, scep)
    requests_seen = [
        line
        for line in scep.server.log.read_text()[log_start:].splitlines()
        if '"path":"/scep"' in line
    ]
    assert requests_seen and all('"method":"GET"' in line for line in requests_seen)
    issued = [
        line
        for line in scep.server.log.read_text()[log_start:].splitlines()
        if '"msg":"SCEP certificate issued"' in line
    ]
    assert len(issued) == 1 and re.search(r'"transaction":"\d+"', issued[0]), issued
    assert '"cipher":"aes256"' in issued[0]


@needs_scepclient
def test_scepclient_waits_on_a_pending_connector_and_collects_the_approved_certificate(
    tmp_path: Path,
) -> None:
    """micromdm's scepclient resends its PKCSReq every 30 s while the answer is PENDING."""
    server = start_server(
        tmp_path / "data",
        extra_config="""
[[connectors]]
type = "scep"
name = "held"
mount = "/held"
[connectors.settings]
pending = true
challenge = "approve-me-please"
""",
    )
    try:
        url = f"{server.http_url}/held"
        response = requests.get(f"{url}?operation=GetCACert", timeout=10)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            certificates = pkcs7.load_der_pkcs7_certificates(response.content)
        held = Scep(server, url, "approve-me-please", certificates)
        device = tmp_path / "device"
        device.mkdir()
        command = [
            str(SCEPCLIENT),
            "-server-url",
            url,
            "-cn",
            "held-device",
            "-private-key",
            str(device / "key.pem"),
            "-certificate",
            str(device / "cert.pem"),
            "-ca-fingerprint",
            held.ra_fingerprint,
            "-challenge",
            held.challenge,
        ]
        client = subprocess.Popen(
            command, cwd=device, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            session = server.session()
            pending_url = f"{server.https_url}/api/v1/connectors/held/pending"
            deadline = time.monotonic() + 30
            waiting: list[dict[str, object]] = []
            while not waiting and time.monotonic() < deadline:
                time.sleep(0.3)
                waiting = session.get(pending_url, timeout=10).json()
            assert len(waiting) == 1, "scepclient's request never arrived"
            assert client.poll() is None  # still waiting for approval
            transaction_id = str(waiting[0]["transaction_id"])
            quoted = urllib.parse.quote(transaction_id, safe="")
            approved = session.post(f"{pending_url}/{quoted}/approve", timeout=10)
            assert approved.status_code == 200, approved.text
            output, _ = client.communicate(timeout=60)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
        assert client.returncode == 0, output
        assert "PENDING" in output
        certificate = x509.load_pem_x509_certificate((device / "cert.pem").read_bytes())
        assert format(certificate.serial_number, "x") == approved.json()["serial"]
        chains_to_root(certificate, held)
        assert "CN=held-device" in certificate.subject.rfc4514_string()
    finally:
        server.stop()
