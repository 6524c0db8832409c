"""Issuing many certificates at once: the shared transaction keeps every row, id and event."""

from __future__ import annotations

import json
import threading

from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtensionOID
from helpers import make_csr

from pkigate.core import Core, IssuanceRequest, IssuedCertificate, Requester, Validity

REQUESTER = Requester("tester", "test", {"evidence": "unit"})
THREADS = 16
PER_THREAD = 4


def issue_concurrently(core: Core, ca_id: str) -> list[IssuedCertificate]:
    csrs = [make_csr(f"host{i}.example.test") for i in range(THREADS * PER_THREAD)]
    issued: list[IssuedCertificate] = []
    lock = threading.Lock()
    start = threading.Barrier(THREADS)

    def worker(chunk: list[bytes]) -> None:
        start.wait()
        for csr in chunk:
            result = core.issue(IssuanceRequest(ca_id, csr, Validity.parse("30d"), REQUESTER))
            with lock:
                issued.append(result)

    threads = [threading.Thread(target=worker, args=(csrs[i::THREADS],)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return issued


def test_concurrent_issues_each_get_the_id_of_their_own_row(core: Core, issuing) -> None:
    issued = issue_concurrently(core, issuing.record.id)

    assert len(issued) == THREADS * PER_THREAD
    assert len({i.serial for i in issued}) == len(issued)
    assert len({i.record.id for i in issued}) == len(issued)
    with core.store.read() as conn:
        for result in issued:
            stored = core.store.get_certificate_by_id(conn, result.record.id)
            assert stored is not None
            assert stored.serial == result.serial
            assert stored.der == result.certificate.public_bytes(Encoding.DER)
            assert stored.sans == result.record.sans
            assert len(stored.sans) == 1


def test_concurrent_issues_are_each_audited_on_a_chain_that_verifies(core: Core, issuing) -> None:
    issued = issue_concurrently(core, issuing.record.id)

    assert core.audit.verify().ok
    audited = [
        event
        for event in core.audit.events()
        if event.action == "certificate.issue"
        and event.result == "success"
        and event.resource == f"ca/{issuing.record.id}"
    ]
    audited_serials = [json.loads(event.parameters)["serial"] for event in audited]
    assert sorted(audited_serials) == sorted(i.serial for i in issued)


def test_issued_extensions_keep_pkigate_order(core: Core, issuing) -> None:
    result = core.issue(
        IssuanceRequest(
            issuing.record.id, make_csr("order.example.test"), Validity.parse("30d"), REQUESTER
        )
    )

    assert [e.oid for e in result.certificate.extensions] == [
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    ]


def test_record_with_commits_with_its_certificate_and_a_refusal_drops_only_its_own(
    core: Core, issuing
) -> None:
    """The front-end's record_with runs in the transaction that stores the certificate,
    shared with other requests by group commit: one that raises loses its certificate
    (audited as discarded) and nothing else."""
    from sqlalchemy import func, insert, select

    from pkigate.core.store import schema

    ca_id = issuing.record.id
    with core.store.read() as conn:
        before = conn.execute(select(func.count()).select_from(schema.certificates)).scalar_one()
    results: dict[int, IssuedCertificate | Exception] = {}
    start = threading.Barrier(THREADS)

    def record(index: int):  # type: ignore[no-untyped-def]
        def write(conn, issued: IssuedCertificate) -> None:  # type: ignore[no-untyped-def]
            if index == 3:
                raise LookupError("the front-end refuses this one")
            tag = {"resource_id": ca_id, "key": f"issued-{index}", "value": issued.serial}
            conn.execute(insert(schema.tags).values(**tag))

        return write

    def worker(index: int) -> None:
        request = IssuanceRequest(
            ca_id,
            make_csr(f"host{index}.example.test"),
            Validity.parse("30d"),
            REQUESTER,
            record_with=record(index),
        )
        start.wait()
        try:
            results[index] = core.issue(request)
        except LookupError as exc:
            results[index] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert isinstance(results.pop(3), LookupError)
    assert len(results) == THREADS - 1
    with core.store.read() as conn:
        tags = dict(
            conn.execute(
                select(schema.tags.c.key, schema.tags.c.value).where(
                    schema.tags.c.key.like("issued-%")
                )
            ).all()
        )
        stored = conn.execute(select(func.count()).select_from(schema.certificates)).scalar_one()
        failures = [
            json.loads(p)
            for p in conn.execute(
                select(schema.audit_events.c.parameters).where(
                    schema.audit_events.c.result == "failure"
                )
            ).scalars()
        ]
    assert tags == {f"issued-{i}": r.serial for i, r in results.items()}  # type: ignore[union-attr]
    assert stored == before + THREADS - 1
    assert [f["error"] for f in failures] == ["LookupError"]
    assert core.audit.verify().ok
