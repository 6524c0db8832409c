"""Two processes issuing concurrently against one SQLite file.

What the embedded default promises when more than one process opens the same data
directory (two `pkigate` commands, or gunicorn workers on SQLite): no duplicate serials,
no lost certificates, and the audit chain still verifies.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pkigate.core import Actor, CASpec, CAType, Core, KeyAlgorithm
from pkigate.core.names import parse_dn

PROCESSES = 2
CERTIFICATES_PER_PROCESS = 150
WORKER_TIMEOUT_S = 120

# Each worker opens the data directory itself, waits until every worker is ready (so that
# they really overlap), then issues as fast as it can and writes one serial per line.
WORKER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pkigate.core import Core, IssuanceRequest, Requester, Validity

    data_dir, ca_id, csr_file, serials_file, ready_dir, name, processes = sys.argv[1:8]
    blocks = Path(csr_file).read_text().split("-----END CERTIFICATE REQUEST-----")
    csrs = [(b + "-----END CERTIFICATE REQUEST-----").strip().encode()
            for b in blocks if b.strip()]
    core = Core.open(Path(data_dir))
    (Path(ready_dir) / name).touch()
    deadline = time.monotonic() + 60
    while len(list(Path(ready_dir).iterdir())) < int(processes):
        if time.monotonic() > deadline:
            sys.exit("the other worker never became ready")
        time.sleep(0.01)
    serials = []
    for csr in csrs:
        issued = core.issue(IssuanceRequest(
            ca_id, csr, Validity.parse("30d"), Requester(name, connector="test")))
        serials.append(issued.serial)
    Path(serials_file).write_text("\\n".join(serials) + "\\n")
    core.close()
""")


def _csr_pem(common_name: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(common_name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _create_issuing_ca(data_dir: Path) -> str:
    core = Core.open(data_dir)
    try:
        actor = Actor("test")
        root = core.authorities.create(
            CASpec(
                CAType.ROOT,
                parse_dn("CN=Concurrency Root"),
                key_algorithm=KeyAlgorithm.EC_prime256v1,
            ),
            actor,
        )
        issuing = core.authorities.create(
            CASpec(
                CAType.SUBORDINATE,
                parse_dn("CN=Concurrency Issuing CA"),
                key_algorithm=KeyAlgorithm.EC_prime256v1,
                parent_ca_id=root.record.id,
            ),
            actor,
        )
        return issuing.record.id
    finally:
        core.close()


def test_two_processes_issuing_concurrently_lose_nothing_and_keep_the_audit_chain(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "data"
    ca_id = _create_issuing_ca(data_dir)
    ready_dir = tmp_path / "ready"
    ready_dir.mkdir()

    workers = []
    serial_files = []
    for index in range(PROCESSES):
        name = f"worker{index}"
        csr_file = tmp_path / f"{name}.csr.pem"
        csr_file.write_text(
            "".join(_csr_pem(f"{name}-{n}.example") for n in range(CERTIFICATES_PER_PROCESS))
        )
        serial_files.append(tmp_path / f"{name}.serials")
        workers.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    WORKER,
                    str(data_dir),
                    ca_id,
                    str(csr_file),
                    str(serial_files[-1]),
                    str(ready_dir),
                    name,
                    str(PROCESSES),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )

    for worker in workers:
        _, stderr = worker.communicate(timeout=WORKER_TIMEOUT_S)
        assert worker.returncode == 0, stderr

    received = [line for f in serial_files for line in f.read_text().split()]
    total = PROCESSES * CERTIFICATES_PER_PROCESS
    assert len(received) == total
    assert len(set(received)) == total, "a serial number was handed out twice"

    core = Core.open(data_dir)
    try:
        with core.store.read() as conn:
            assert core.store.count_certificates(conn, ca_id) == total
            stored = {record.serial for record in core.store.list_certificates(conn, ca_id=ca_id)}
        assert stored == set(received)

        verification = core.audit.verify()
        assert verification.ok, verification.problems
        issue_events = [
            event
            for event in core.audit.events()
            if event.action == "certificate.issue"
            and event.result == "success"
            and event.resource == f"ca/{ca_id}"
        ]
        assert len(issue_events) == total
        assert {e.actor for e in issue_events} == {f"worker{i}" for i in range(PROCESSES)}
        # The chain order shows the writers really took turns, so the test exercised the
        # cross-process locking rather than two runs one after the other.
        actors = [event.actor for event in issue_events]
        turns = sum(1 for a, b in itertools.pairwise(actors) if a != b)
        assert turns >= 2, "the workers did not overlap"
    finally:
        core.close()
