"""A full disk under a real `pkigate serve`: writes are refused in each protocol's terms,
reads that need no write keep answering, no worker dies, and issuance resumes by itself
when space returns; no certificate exists that the store and the audit log do not know.

The data directory is a small tmpfs of its own (mounting needs root, as in CI)."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from ipaddress import ip_address
from pathlib import Path

import psycopg.errors
import pytest
import requests
from acme_support import Http01Responder
from adcs_directory_fixture import make_dev_directory_fixture
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID
from helpers import ACTOR, Clock, create_root, scep_static_challenge
from serving import PKIGATE, RunningServer, adcs_connector_config, child_pids, start_server
from sqlalchemy.exc import OperationalError

from pkigate.adcs import soap
from pkigate.adcs.directory import DevDirectory
from pkigate.core import CASettings, Core, IssuanceRequest, Requester, Validity
from pkigate.core.errors import StorageFullError
from pkigate.core.store.engine import storage_full
from pkigate.devsim.acme_client import AcmeClient, AcmeClientError
from pkigate.devsim.scep_client import (
    ScepClient,
    certificate_request,
    new_key,
    new_transaction_id,
    self_signed,
)
from pkigate.gateways.config import parse_config
from pkigate.gateways.runtime import MAINTENANCE_JOB, Gateway
from pkigate.scep.messages import FailInfo, PkiStatus

TMPFS_SIZE = "16m"
ISSUE = "EndEntityCertificate/V1"


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = TMPFS_SIZE) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for the data directory needs root (CI runs as root)")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path, leave: int = 0) -> Path:
    """Take every free byte of the filesystem but ``leave`` with a filler file."""
    filler = directory / "filler"
    stat = os.statvfs(directory)
    wanted = max(0, stat.f_bavail * stat.f_frsize - leave)
    chunk = b"\0" * (1 << 16)
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while wanted > 0:
            wanted -= os.write(fd, chunk[: min(len(chunk), wanted)])
        if leave == 0:
            while True:  # to the last byte, whatever statvfs did not count
                os.write(fd, chunk[:512])
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def csr_pem(name: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )


def worker_processes(server: RunningServer) -> set[int]:
    """The server's workers: the children of its arbiter (the `pkigate serve` process)."""
    assert server.process is not None
    return set(child_pids(server.process.pid))


class Issuing:
    """The management API as an issuer would use it, remembering every certificate received."""

    def __init__(self, server: RunningServer) -> None:
        admin = server.session()
        made = admin.post(
            f"{server.https_url}/api/v1/tokens", json={"name": "issuer", "role": "issuer"}
        )
        assert made.status_code == 201, made.text
        self.session = server.session(made.json()["secret"])
        cas = admin.get(f"{server.https_url}/api/v1/cas").json()["cas"]
        self.ca_id = next(c["id"] for c in cas if c["type"] == "SUBORDINATE")
        self.url = f"{server.https_url}/api/v1/cas/{self.ca_id}/certificates"
        self.received: list[x509.Certificate] = []
        self.count = 0

    def issue(self) -> requests.Response:
        self.count += 1
        body = {"csr": csr_pem(f"disk-{self.count}.example"), "validity": "1d", "template": ISSUE}
        response = self.session.post(self.url, json=body, timeout=60)
        if response.status_code == 201:
            pem = response.json()["certificate_pem"].encode()
            self.received.append(x509.load_pem_x509_certificate(pem))
        return response


def assert_try_later(response: requests.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "storageFull"
    assert int(response.headers["Retry-After"]) > 0


_static_challenges: dict[Path, str] = {}


def scep_enroll(
    server: RunningServer, name: str, challenge: str | None = None
) -> tuple[int, object]:
    """One PKCSReq with the static challenge (or ``challenge``): (HTTP status, CertRep)."""
    session = requests.Session()
    session.trust_env = False
    client = ScepClient(f"{server.http_url}/scep", session)
    ca = client.get_ca_cert()
    challenge = challenge or _static_challenges.get(server.config) or ""
    if not challenge:  # read once, while there is room to open the store
        challenge = _static_challenges[server.config] = scep_static_challenge(server.config)
    key = new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    reply = client.enroll(
        ca,
        self_signed(key, subject),
        key,
        certificate_request(key, subject, challenge),
        new_transaction_id(),
    )
    return 200, reply


def acme_new_account(server: RunningServer) -> object:
    session = requests.Session()
    session.verify = str(server.tls_bundle)
    client = AcmeClient(
        f"{server.https_url}/acme/directory", ec.generate_private_key(ec.SECP256R1()), session
    )
    try:
        return client.post(
            client.directory["newAccount"], {"termsOfServiceAgreed": True}, use_jwk=True
        )
    except AcmeClientError as exc:
        return exc


def ocsp_status(server: RunningServer, ca_id: str, issued: x509.Certificate) -> int:
    issuer = x509.load_der_x509_certificate(
        requests.get(f"{server.http_url}/ca/{ca_id}.cer", timeout=30).content
    )
    request = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(issued, issuer, hashes.SHA1())  # noqa: S303 - RFC 5019 CertID
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    answer = requests.post(
        f"{server.http_url}/ocsp/{ca_id}",
        data=request,
        headers={"Content-Type": "application/ocsp-request"},
        timeout=30,
    )
    assert answer.status_code == 200
    parsed = ocsp.load_der_ocsp_response(answer.content)
    assert parsed.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    return int(parsed.certificate_status.value)


def test_full_disk_refuses_writes_keeps_reads_and_workers_and_recovers(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "data") as data_dir:
        server = start_server(data_dir, workers=2)
        filler: Path | None = None
        try:
            api = Issuing(server)
            first = api.issue()
            assert first.status_code == 201, first.text
            # What must keep answering is made while there is room: the CRL, a cached
            # OCSP response.
            crl_url = f"{server.http_url}/crl/{api.ca_id}.crl"
            assert requests.get(crl_url, timeout=30).status_code == 200
            assert ocsp_status(server, api.ca_id, api.received[0]) == 0  # GOOD
            _, reply = scep_enroll(server, "scep-before")  # the SCEP RA is made at first use
            assert reply.status is PkiStatus.SUCCESS  # type: ignore[attr-defined]
            api.received.append(reply.certificates[0])  # type: ignore[attr-defined]
            workers = worker_processes(server)
            assert len(workers) == 2

            # Issue until the disk is (nearly) full.
            filler = fill(data_dir, leave=3 << 20)
            for _ in range(400):
                response = api.issue()
                if response.status_code != 201:
                    break
            assert_try_later(response)
            fill(data_dir)  # every last byte
            assert os.statvfs(data_dir).f_bavail == 0

            # Writes: refused in each protocol's terms, nothing half-written.
            assert_try_later(api.issue())
            status, reply = scep_enroll(server, "scep-while-full")
            assert status == 200
            assert reply.status is PkiStatus.FAILURE  # type: ignore[attr-defined]
            assert reply.fail_info is FailInfo.BAD_REQUEST  # type: ignore[attr-defined]
            assert "full" in (reply.fail_info_text or "")  # type: ignore[attr-defined]
            # A refusal that cannot be recorded (a wrong challenge) is still a CertRep.
            status, reply = scep_enroll(server, "scep-wrong-challenge", challenge="wrong")
            assert reply.status is PkiStatus.FAILURE  # type: ignore[attr-defined]
            refused = acme_new_account(server)
            assert isinstance(refused, AcmeClientError), refused
            assert refused.status == 503
            assert refused.type == "serverInternal"

            # Reads that need no write keep answering.
            assert requests.get(f"{server.http_url}/healthz", timeout=30).status_code == 200
            assert requests.get(crl_url, timeout=30).status_code == 200
            ca_cert = requests.get(f"{server.http_url}/ca/{api.ca_id}.cer", timeout=30)
            assert ca_cert.status_code == 200
            assert ocsp_status(server, api.ca_id, api.received[0]) == 0
            assert requests.get(f"{server.http_url}/metrics", timeout=30).status_code == 200

            # No worker died of it; and one started now, on the full disk, boots and serves.
            assert worker_processes(server) == workers
            victim = next(iter(workers))
            os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                now = worker_processes(server)
                if victim not in now and len(now) == len(workers):
                    break
                time.sleep(0.2)
            time.sleep(3)  # long enough for a replacement that fails to boot to be seen
            assert server.process is not None and server.process.poll() is None
            assert len(worker_processes(server)) == len(workers)
            for _ in range(4):  # reaches every worker of the listener, the new one too
                assert requests.get(f"{server.http_url}/healthz", timeout=30).status_code == 200
                assert_try_later(api.issue())

            # Space returns: writes resume without a restart.
            filler.unlink()
            filler = None
            resumed = api.issue()
            assert resumed.status_code == 201, resumed.text
            status, reply = scep_enroll(server, "scep-after")
            assert reply.status is PkiStatus.SUCCESS  # type: ignore[attr-defined]
            api.received.append(reply.certificates[0])  # type: ignore[attr-defined]
            account = acme_new_account(server)
            assert not isinstance(account, AcmeClientError), account
        finally:
            if filler is not None:
                filler.unlink(missing_ok=True)
            server.stop()
        log = server.log.read_text()
        assert "SIGBUS" not in log
        assert "could not audit" not in log
        assert "Worker failed to boot" not in log

        # Every certificate a client received is in the store and in the audit log.
        core = Core.open(data_dir)
        try:
            with core.store.read() as conn:
                for certificate in api.received:
                    serial = format(certificate.serial_number, "x")
                    stored = core.store.get_certificate(conn, api.ca_id, serial)
                    assert stored is not None
                    assert stored.der == certificate.public_bytes(serialization.Encoding.DER)
            issued = {
                e.parameters
                for e in core.audit.events()
                if e.action == "certificate.issue" and e.result == "success"
            }
            for certificate in api.received:
                assert any(f'"serial":"{certificate.serial_number:x}"' in p for p in issued)
        finally:
            core.close()
        verified = subprocess.run(
            [PKIGATE, "--data-dir", str(data_dir), "audit", "verify"],
            capture_output=True,
            text=True,
        )
        assert verified.returncode == 0, verified.stderr
        assert verified.stdout.startswith("audit log OK:")


def test_a_signature_the_full_store_cannot_keep_is_discarded_and_recorded(
    tmp_path: Path,
) -> None:
    """Free space was checked and the commit failed all the same (something else took the
    space): the certificate is not handed out, and its discard is in the audit log,
    written in the space of the storage reserve."""
    with small_tmpfs(tmp_path / "data", "8m") as data_dir:
        core = Core.open(data_dir, signing_margin_bytes=0)
        filler: Path | None = None
        try:
            root = create_root(core).record.id
            csr = csr_pem("discarded.example").encode()
            warm = core.issue(IssuanceRequest(root, csr, Validity.parse("1d"), Requester("t")))
            assert core.store.space.reserve_path is not None
            assert core.store.space.reserve_path.exists()  # made before the first signature
            filler = fill(data_dir)
            with pytest.raises(StorageFullError):
                core.issue(
                    IssuanceRequest(
                        root, csr_pem("lost.example").encode(), Validity.parse("1d"), Requester("t")
                    )
                )
            with core.store.read() as conn:
                stored = core.store.list_certificates(conn, ca_id=root)
            assert [c.serial for c in stored] == [warm.serial]
            discarded = [
                e
                for e in core.audit.events()
                if e.action == "certificate.issue" and e.result == "failure"
            ]
            assert len(discarded) == 1
            assert "certificate discarded" in discarded[0].parameters
            assert '"error":"storageFull"' in discarded[0].parameters
            assert not core.store.space.reserve_path.exists()  # spent on that record
            # No reserve and no room for one: the key does not sign again.
            with pytest.raises(StorageFullError):
                core.issue(
                    IssuanceRequest(
                        root,
                        csr_pem("again.example").encode(),
                        Validity.parse("1d"),
                        Requester("t"),
                    )
                )
            assert len([e for e in core.audit.events() if e.result == "failure"]) == 1
            filler.unlink()
            filler = None
            again = core.issue(
                IssuanceRequest(
                    root, csr_pem("later.example").encode(), Validity.parse("1d"), Requester("t")
                )
            )
            assert again.serial
            assert core.store.space.reserve_path.exists()
            assert core.audit.verify().ok
        finally:
            if filler is not None:
                filler.unlink(missing_ok=True)
            core.close()


def test_a_gateway_process_starts_on_a_full_disk(tmp_path: Path) -> None:
    """What a gunicorn worker does when it starts (open the core and the connectors, start
    the job threads, queue the maintenance job) succeeds on a full disk: a replacement
    worker that cannot start takes its whole listener down (gunicorn halts on a boot
    error). The maintenance job is running in another process, so queueing it again is an
    insert; that process (a sibling worker) keeps the database open."""
    with small_tmpfs(tmp_path / "data", "8m") as data_dir:
        config = parse_config(f'data_dir = "{data_dir}"\n')
        Gateway.open(config, bootstrap=True).close()
        sibling = Core.open(data_dir)
        filler: Path | None = None
        try:
            sibling.jobs.enqueue(MAINTENANCE_JOB, {}, dedupe_key=MAINTENANCE_JOB)
            assert sibling.jobs.claim("another-process", {MAINTENANCE_JOB})
            filler = fill(data_dir)
            gateway = Gateway.open(config)
            try:
                gateway.start_background_work()
                assert gateway._runners  # the job threads run, and wait for space
            finally:
                gateway.close()
            assert sibling.store.space.reserve_path is not None
            assert sibling.store.space.reserve_path.exists()  # not needed for that
        finally:
            if filler is not None:
                filler.unlink()
            sibling.close()


def test_the_store_opens_on_a_full_disk_with_nothing_else_running(tmp_path: Path) -> None:
    """The last connection to close deletes the database's -wal and -shm files; on a full
    disk they cannot be made again, and a cold start could not even read. The storage
    reserve gives up its room for them."""
    with small_tmpfs(tmp_path / "data", "8m") as data_dir:
        config = parse_config(f'data_dir = "{data_dir}"\n')
        Gateway.open(config, bootstrap=True).close()
        assert not (data_dir / "pkigate.db-shm").exists()
        filler = fill(data_dir)
        try:
            # The cold start is a new process, as a restarted service's is (in a test
            # process that had run hundreds of other tests, the open once went through
            # without giving up the reserve: not yet explained, see CHANGELOG).
            started = subprocess.run(
                [sys.executable, "-c", COLD_OPEN, str(data_dir)],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert started.returncode == 0, started.stderr
            assert started.stdout.split() == ["2"], started.stdout
            assert not (data_dir / "pkigate.db-reserve").exists()
        finally:
            filler.unlink()


# Open the gateway on a data directory, print how many CAs it reads, close it.
COLD_OPEN = """
import sys
from pkigate.gateways.config import parse_config
from pkigate.gateways.runtime import Gateway
gateway = Gateway.open(parse_config(f'data_dir = "{sys.argv[1]}"\\n'))
try:
    print(len(gateway.core.authorities.list_cas()))
finally:
    gateway.close()
"""


dev_directory = make_dev_directory_fixture()


def test_wstep_enrollment_on_a_full_disk_is_a_receiver_fault_to_retry(
    dev_directory: DevDirectory, tmp_path: Path
) -> None:
    with small_tmpfs(tmp_path / "data") as data_dir:
        server = start_server(
            data_dir,
            extra_config=adcs_connector_config(
                dev_directory.url,
                dev_directory.base,
                dev_directory.admin_dn,
                dev_directory.admin_password,
            ),
        )
        filler: Path | None = None
        try:
            published = subprocess.run(
                [
                    *(PKIGATE, "--data-dir", str(data_dir), "adcs", "--config", str(server.config)),
                    *(
                        "publish",
                        "--connector",
                        "adcs",
                        "--keep-existing-templates",
                        "--template",
                        "Machine",
                    ),
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert published.returncode == 0, published.stderr
            machine = next(a for n, a in dev_directory.accounts.items() if n.lower() == "ws01$")
            session = requests.Session()
            session.trust_env = False
            session.verify = str(server.tls_bundle)

            def enroll() -> tuple[requests.Response, soap.RstrResult]:
                key = rsa.generate_private_key(65537, 2048)
                der = (
                    x509.CertificateSigningRequestBuilder()
                    .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ws01")]))
                    .sign(key, hashes.SHA256())
                    .public_bytes(serialization.Encoding.DER)
                )
                url = f"{server.https_url}/adcs/ces"
                body = soap.build_rst_issue(
                    url,
                    der,
                    f"urn:uuid:{uuid.uuid4()}",
                    "ws01$",
                    str(machine.password),
                    additional_context=(("CertificateTemplate", "Machine"),),
                )
                response = session.post(
                    url,
                    data=body,
                    headers={"Content-Type": "application/soap+xml; charset=utf-8"},
                    timeout=60,
                )
                return response, soap.parse_rstr(response.content)

            response, result = enroll()
            assert response.status_code == 200 and result.status == "issued", response.text
            filler = fill(data_dir)
            response, result = enroll()
            assert response.status_code == 503, response.text
            assert int(response.headers["Retry-After"]) > 0
            assert result.status == "fault"
            assert "storeUnavailable" in (result.fault_reason or "")
            assert b"Receiver" in response.content
            assert str(0x80070070 - (1 << 32)).encode() in response.content  # ERROR_DISK_FULL
            filler.unlink()
            filler = None
            response, result = enroll()
            assert response.status_code == 200 and result.status == "issued", response.text
        finally:
            if filler is not None:
                filler.unlink(missing_ok=True)
            server.stop()


def test_a_lapsed_crl_is_served_while_the_next_cannot_be_stored(tmp_path: Path) -> None:
    """The next CRL cannot be kept (nor is it signed): the last one is served, not an error."""
    with small_tmpfs(tmp_path / "data", "8m") as data_dir:
        clock = Clock()
        core = Core.open(data_dir, clock=clock)
        filler: Path | None = None
        try:
            root = create_root(core).record.id
            core.authorities.update_settings(root, CASettings(crl_enabled=True), ACTOR)
            first = core.revocation.current_crl(root)
            clock.advance(timedelta(days=8))  # past its nextUpdate (seven days)
            filler = fill(data_dir)
            served = core.revocation.current_crl(root)
            assert served.der == first.der
            filler.unlink()
            filler = None
            fresh = core.revocation.current_crl(root)
            assert fresh.der != first.der and fresh.next_update > clock()
        finally:
            if filler is not None:
                filler.unlink(missing_ok=True)
            core.close()


def test_an_acme_order_refused_for_space_stays_ready_for_a_later_finalize(
    tmp_path: Path,
) -> None:
    """Finalize while the disk has too little room to sign: 503 serverInternal with
    Retry-After, the order still "ready" (not "invalid"), and the same finalize succeeds
    once there is room."""
    http01 = Http01Responder()
    try:
        with small_tmpfs(tmp_path / "data") as data_dir:
            server = start_server(
                data_dir,
                extra_config=f"""
[[connectors]]
type = "acme"
name = "acme"
mount = "/acme"
[connectors.settings]
http01_port = {http01.port}
""",
            )
            filler: Path | None = None
            try:
                client = AcmeClient(
                    f"{server.https_url}/acme/directory",
                    ec.generate_private_key(ec.SECP256R1()),
                    server.session(),
                )
                client.register()
                order = client.new_order([("ip", "127.0.0.1")])
                authorization = client.get(order.body["authorizations"][0])
                challenge = next(
                    c for c in authorization.body["challenges"] if c["type"] == "http-01"
                )
                http01.tokens[challenge["token"]] = f"{challenge['token']}.{client.thumbprint}"
                client.respond(challenge["url"])
                assert order.location is not None
                ready = client.wait(order.location, ("ready", "invalid"))
                assert ready.body["status"] == "ready", ready.body
                key = ec.generate_private_key(ec.SECP256R1())
                csr = (
                    x509.CertificateSigningRequestBuilder()
                    .subject_name(x509.Name([]))
                    .add_extension(
                        x509.SubjectAlternativeName([x509.IPAddress(ip_address("127.0.0.1"))]),
                        critical=False,
                    )
                    .sign(key, hashes.SHA256())
                )
                filler = fill(data_dir, leave=1 << 20)  # room to write, not to sign
                with pytest.raises(AcmeClientError) as refused:
                    client.finalize(ready, csr)
                assert refused.value.status == 503
                assert refused.value.type == "serverInternal"
                assert client.get(order.location).body["status"] == "ready"
                filler.unlink()
                filler = None
                client.finalize(ready, csr)
                done = client.wait(order.location, ("valid", "invalid"))
                assert done.body["status"] == "valid", done.body
            finally:
                if filler is not None:
                    filler.unlink(missing_ok=True)
                server.stop()
    finally:
        http01.close()


def test_what_each_database_says_for_a_full_disk_is_storage_full() -> None:
    """PostgreSQL's disk_full (SQLSTATE 53100, as psycopg raises it, bare or wrapped by
    SQLAlchemy) and an OSError ENOSPC are the same typed error as SQLite's SQLITE_FULL (which
    the tests above meet on a real full tmpfs); other database errors are not."""
    disk_full = psycopg.errors.DiskFull("could not extend file: No space left on device")
    assert isinstance(storage_full(disk_full), StorageFullError)
    assert isinstance(storage_full(OperationalError("INSERT", {}, disk_full)), StorageFullError)
    assert isinstance(storage_full(OSError(errno.ENOSPC, "No space")), StorageFullError)
    assert storage_full(psycopg.errors.UniqueViolation("duplicate key")) is None
    assert storage_full(OSError(errno.EACCES, "Permission denied")) is None
