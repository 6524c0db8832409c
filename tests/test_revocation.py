"""Revoking certificates and the CRLs that say so (complete and partitioned)."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtensionOID
from helpers import ACTOR, create_root, create_sub, downgrade_store, make_csr

from pkigate.core import CASettings, Core, IssuanceRequest, Requester, Validity
from pkigate.core.crl import reason_flag
from pkigate.core.der import element as der_element
from pkigate.core.errors import (
    BadRequestError,
    CANotActiveError,
    ConflictError,
    InvalidStateError,
    NotFoundError,
)
from pkigate.core.jobs import JobRunner
from pkigate.core.model import CAStatus, KeyAlgorithm, RevocationReason
from pkigate.core.revocation import CRL_JOB
from pkigate.core.store import sqlite_url

CRL_SETTINGS = CASettings(
    crl_url="http://pki.test/crl/issuing.crl", crl_validity_days=3, crl_regenerate_delay_seconds=0
)


def _issue(core: Core, ca_id: str, validity: str = "30d") -> x509.Certificate:
    return core.issue(
        IssuanceRequest(ca_id, make_csr(), Validity.parse(validity), Requester("tester"))
    ).certificate


def _serial(certificate: x509.Certificate) -> str:
    return format(certificate.serial_number, "x")


def _crl(der: bytes) -> x509.CertificateRevocationList:
    return x509.load_der_x509_crl(der)


@pytest.fixture
def crl_ca(core: Core, root):
    return create_sub(core, root, cn="CRL Issuing", path_length=0, settings=CRL_SETTINGS)


@pytest.mark.parametrize("reason", list(RevocationReason))
def test_revoke_records_reason_time_and_actor(sqlite_core: Core, reason: RevocationReason) -> None:
    ca = create_root(sqlite_core)
    certificate = _issue(sqlite_core, ca.record.id)
    record = sqlite_core.revocation.revoke(ca.record.id, _serial(certificate), reason, ACTOR)
    assert (record.status, record.revocation_reason) == ("REVOKED", reason.value)
    assert record.revoked_at is not None
    event = sqlite_core.audit.events()[-1]
    assert (event.action, event.result, event.actor) == (
        "certificate.revoke",
        "success",
        ACTOR.principal,
    )
    assert reason.value in event.parameters


def test_revoking_twice_or_an_unknown_serial_is_a_clear_error(core: Core, issuing) -> None:
    serial = _serial(_issue(core, issuing.record.id))
    core.revocation.revoke(issuing.record.id, serial, RevocationReason.superseded, ACTOR)
    with pytest.raises(ConflictError, match="already revoked"):
        core.revocation.revoke(issuing.record.id, serial, RevocationReason.keyCompromise, ACTOR)
    with pytest.raises(NotFoundError, match="no certificate with serial"):
        core.revocation.revoke(issuing.record.id, "abc123", RevocationReason.keyCompromise, ACTOR)
    failures = [
        e for e in core.audit.events() if e.action == "certificate.revoke" and e.result == "failure"
    ]
    assert len(failures) == 2


def test_a_roots_own_certificate_cannot_be_revoked(core: Core, root) -> None:
    serial = _serial(x509.load_der_x509_certificate(root.record.certificate_der))
    with pytest.raises(InvalidStateError, match="root's own certificate"):
        core.revocation.revoke(root.record.id, serial, RevocationReason.cACompromise, ACTOR)


def test_a_subordinate_ca_certificate_can_be_revoked_by_its_parent(
    core: Core, root, issuing
) -> None:
    serial = _serial(x509.load_der_x509_certificate(issuing.record.certificate_der))
    record = core.revocation.revoke(root.record.id, serial, RevocationReason.cACompromise, ACTOR)
    assert record.revocation_reason == "cACompromise"


def test_complete_crl_lists_revoked_certificates_with_reasons(core: Core, crl_ca) -> None:
    ca_id = crl_ca.record.id
    good = _issue(core, ca_id)
    compromised = _issue(core, ca_id)
    plain = _issue(core, ca_id)
    core.revocation.revoke(ca_id, _serial(compromised), RevocationReason.keyCompromise, ACTOR)
    core.revocation.revoke(ca_id, _serial(plain), RevocationReason.unspecified, ACTOR)
    published = core.revocation.generate_crl(ca_id)
    crl = _crl(published.der)
    ca_certificate = x509.load_der_x509_certificate(crl_ca.record.certificate_der)
    assert crl.is_signature_valid(ca_certificate.public_key())
    assert crl.issuer == ca_certificate.subject
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1
    assert crl.next_update_utc - crl.last_update_utc == timedelta(days=3)
    entries = {e.serial_number: e for e in crl}
    assert set(entries) == {compromised.serial_number, plain.serial_number}
    assert good.serial_number not in entries
    reason = entries[compromised.serial_number].extensions.get_extension_for_class(x509.CRLReason)
    assert reason.value.reason == x509.ReasonFlags.key_compromise
    with pytest.raises(x509.ExtensionNotFound):  # unspecified: the reason code is left out
        entries[plain.serial_number].extensions.get_extension_for_class(x509.CRLReason)
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca_certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    signed = [e for e in core.audit.events() if e.action == "crl.sign"]
    assert signed and crl_ca.record.key_id in signed[-1].parameters


def test_crl_numbers_increase_and_a_revocation_schedules_regeneration(core: Core, crl_ca) -> None:
    ca_id = crl_ca.record.id
    first = core.revocation.generate_crl(ca_id)
    certificate = _issue(core, ca_id)
    core.revocation.revoke(ca_id, _serial(certificate), RevocationReason.superseded, ACTOR)
    runner = JobRunner(core.jobs, core.revocation.job_handlers())
    counts = runner.run_once()
    assert counts.completed >= 1
    latest = core.revocation.latest_crl(ca_id)
    assert latest is not None and latest.number == first.number + 1
    assert certificate.serial_number in {e.serial_number for e in _crl(latest.der)}
    pending = [
        j
        for j in (core.jobs.get(i) for i in range(1, 50))
        if j is not None and j.kind == CRL_JOB and j.status == "pending"
    ]
    # The next regeneration is already planned, well before nextUpdate.
    assert pending and all(j.run_at < latest.next_update for j in pending)


def test_an_expired_entry_is_dropped_after_one_more_crl(core: Core, crl_ca, clock) -> None:
    ca_id = crl_ca.record.id
    short = _issue(core, ca_id, "2d")
    core.revocation.revoke(ca_id, _serial(short), RevocationReason.keyCompromise, ACTOR)
    assert short.serial_number in {
        e.serial_number for e in _crl(core.revocation.generate_crl(ca_id).der)
    }
    clock.advance(timedelta(days=3))  # the certificate has expired
    assert short.serial_number in {
        e.serial_number for e in _crl(core.revocation.generate_crl(ca_id).der)
    }  # listed once more after expiry
    assert short.serial_number not in {
        e.serial_number for e in _crl(core.revocation.generate_crl(ca_id).der)
    }


def test_current_crl_is_generated_on_first_request_and_when_it_lapses(
    core: Core, crl_ca, clock
) -> None:
    ca_id = crl_ca.record.id
    assert core.revocation.latest_crl(ca_id) is None
    first = core.revocation.current_crl(ca_id)
    assert core.revocation.current_crl(ca_id).number == first.number  # reused
    clock.advance(timedelta(days=3, seconds=1))
    assert core.revocation.current_crl(ca_id).number == first.number + 1


def test_crls_need_crl_enabled(core: Core, issuing) -> None:
    with pytest.raises(InvalidStateError, match="does not publish CRLs"):
        core.revocation.generate_crl(issuing.record.id)


def test_partitioned_crls_name_their_partition_and_list_only_its_certificates(
    core: Core, root
) -> None:
    settings = CASettings(
        crl_url="http://pki.test/crl/part/{partition}.crl",
        crl_mode="PARTITIONED",
        crl_partition_size=2,
        crl_regenerate_delay_seconds=0,
    )
    ca = create_sub(core, root, cn="Partitioned", path_length=0, settings=settings)
    ca_id = ca.record.id
    certificates = [_issue(core, ca_id) for _ in range(5)]
    cdps = [
        c.extensions.get_extension_for_class(x509.CRLDistributionPoints).value[0].full_name[0].value
        for c in certificates
    ]
    assert cdps == [f"http://pki.test/crl/part/{n}.crl" for n in (1, 1, 2, 2, 3)]
    assert core.revocation.partitions(ca_id) == [1, 2, 3]
    in_two = certificates[2]
    core.revocation.revoke(ca_id, _serial(in_two), RevocationReason.keyCompromise, ACTOR)
    crls = {n: _crl(core.revocation.generate_crl(ca_id, n).der) for n in (1, 2, 3)}
    assert [e.serial_number for e in crls[2]] == [in_two.serial_number]
    assert list(crls[1]) == [] and list(crls[3]) == []
    for number, crl in crls.items():
        idp = crl.extensions.get_extension_for_oid(ExtensionOID.ISSUING_DISTRIBUTION_POINT)
        assert idp.critical
        assert idp.value.full_name[0].value == f"http://pki.test/crl/part/{number}.crl"
    # Numbers are per partition.
    assert core.revocation.generate_crl(ca_id, 2).number == 2
    assert core.revocation.generate_crl(ca_id, 1).number == 2
    with pytest.raises(BadRequestError):
        core.revocation.generate_crl(ca_id, 0)
    # Found in review: any partition number was served, each request making the CA key
    # sign (and store, and audit) a CRL for a partition no certificate names.
    signed = len([e for e in core.audit.events() if e.action == "crl.sign"])
    for unused in (0, 4, 777, 2**40):
        with pytest.raises(NotFoundError):
            core.revocation.current_crl(ca_id, unused)
    assert len([e for e in core.audit.events() if e.action == "crl.sign"]) == signed


def test_a_disabled_ca_still_publishes_what_it_revokes(core: Core, crl_ca) -> None:
    """Found in review: revoking on a DISABLED CA succeeded but its CRL could no longer be
    signed, so the revocation never showed (OCSP went on answering for such CAs)."""
    ca_id = crl_ca.record.id
    certificate = _issue(core, ca_id)
    core.authorities.update_status(ca_id, CAStatus.DISABLED, ACTOR)
    core.revocation.revoke(ca_id, _serial(certificate), RevocationReason.keyCompromise, ACTOR)
    crl = _crl(core.revocation.generate_crl(ca_id).der)
    assert [e.serial_number for e in crl] == [certificate.serial_number]


def test_the_crl_mode_cannot_change_once_certificates_name_its_crls(core: Core, root) -> None:
    """Found in review: switching COMPLETE -> PARTITIONED left the certificates issued
    before (whose CDP is the complete CRL) out of every CRL published after the switch."""
    complete = CASettings(crl_url="http://pki.test/crl/c.crl", crl_regenerate_delay_seconds=0)
    partitioned = CASettings(
        crl_url="http://pki.test/crl/p/{partition}.crl", crl_mode="PARTITIONED"
    )
    fresh = create_sub(core, root, cn="Fresh", path_length=0, settings=complete)
    # Before the first certificate the mode is still open.
    core.authorities.update_settings(fresh.record.id, partitioned, ACTOR)
    core.authorities.update_settings(fresh.record.id, complete, ACTOR)
    certificate = _issue(core, fresh.record.id)
    with pytest.raises(InvalidStateError, match="CRL mode is chosen before"):
        core.authorities.update_settings(fresh.record.id, partitioned, ACTOR)
    assert CASettings.from_json(core.authorities.get(fresh.record.id).settings) == complete
    # Other settings still change.
    core.authorities.update_settings(
        fresh.record.id,
        CASettings(crl_url="http://pki.test/crl/c2.crl", crl_regenerate_delay_seconds=0),
        ACTOR,
    )
    core.revocation.revoke(
        fresh.record.id, _serial(certificate), RevocationReason.keyCompromise, ACTOR
    )
    crl = _crl(core.revocation.generate_crl(fresh.record.id).der)
    assert [e.serial_number for e in crl] == [certificate.serial_number]


def test_a_deleted_ca_refuses_revocations_it_could_not_publish(core: Core, crl_ca) -> None:
    """Found in review: the revocation was acknowledged, but its CRL job failed five times
    and OCSP answered unauthorized: nobody would ever learn of it."""
    ca_id = crl_ca.record.id
    certificate = _issue(core, ca_id)
    core.authorities.update_status(ca_id, CAStatus.DISABLED, ACTOR)
    core.authorities.delete(ca_id, 7, ACTOR)
    with pytest.raises(CANotActiveError, match="DELETED"):
        core.revocation.revoke(ca_id, _serial(certificate), RevocationReason.keyCompromise, ACTOR)
    with core.store.read() as conn:
        record = core.store.get_certificate(conn, ca_id, _serial(certificate))
    assert record is not None and record.status == "ISSUED"
    assert core.audit.events()[-1].result == "failure"


def test_partitioned_settings_are_checked() -> None:
    with pytest.raises(BadRequestError, match="must contain"):
        CASettings.from_json({"crl_mode": "PARTITIONED", "crl_url": "http://x/crl.crl"})
    with pytest.raises(BadRequestError, match="needs crl_mode PARTITIONED"):
        CASettings.from_json({"crl_url": "http://x/{partition}.crl"})
    with pytest.raises(BadRequestError, match="crl_validity_days"):
        CASettings.from_json({"crl_validity_days": 0})


def test_large_crl_is_built_in_one_pass(sqlite_core: Core) -> None:
    ca = create_root(sqlite_core, settings=CASettings(crl_url="http://pki.test/big.crl"))
    now = sqlite_core.clock()
    rows = [
        {
            "ca_id": ca.record.id,
            "serial": format(10_000 + i, "x"),
            "subject": "CN=x",
            "sans": "[]",
            "not_before": now,
            "not_after": now + timedelta(days=30),
            "issued_at": now,
            "template": "EndEntityCertificate/V1",
            "requester": "bulk",
            "connector": "test",
            "correlation_id": None,
            "status": "REVOKED",
            "revoked_at": now,
            "revocation_reason": "keyCompromise",
            "fingerprint_sha256": "0" * 64,
            "der": b"x",
            "crl_partition": None,
            "team": None,
        }
        for i in range(5000)
    ]
    with sqlite_core.store.write() as conn:
        sqlite_core.store.insert_certificates(conn, rows)
    published = sqlite_core.revocation.generate_crl(ca.record.id)
    crl = _crl(published.der)
    assert published.entries == len(crl) == 5000
    assert crl.get_revoked_certificate_by_serial_number(10_000 + 4999) is not None


def test_after_the_restore_window_the_responder_keys_are_destroyed_too(
    core: Core, root, clock
) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509 import ocsp

    from pkigate.core.model import CAStatus

    ca = create_sub(core, root, cn="OCSP CA", path_length=0, settings=CASettings(ocsp_enabled=True))
    leaf = _issue(core, ca.record.id)
    ca_certificate = x509.load_der_x509_certificate(ca.record.certificate_der)
    request = ocsp.OCSPRequestBuilder().add_certificate(leaf, ca_certificate, hashes.SHA1()).build()  # noqa: S303 - RFC 6960 default CertID
    from cryptography.hazmat.primitives import serialization

    response = ocsp.load_der_ocsp_response(
        core.ocsp.respond(ca.record.id, request.public_bytes(serialization.Encoding.DER))
    )
    assert response.certificate_status == ocsp.OCSPCertStatus.GOOD
    with core.store.read() as conn:
        responder_keys = core.store.responder_key_ids(conn, ca.record.id)
    assert len(responder_keys) == 1
    core.authorities.update_status(ca.record.id, CAStatus.DISABLED, ACTOR)
    core.authorities.delete(ca.record.id, 7, ACTOR)
    clock.advance(timedelta(days=8))
    assert core.authorities.purge_expired_deletions(ACTOR) == [ca.record.id]
    with core.store.read() as conn:
        assert core.store.key_blob(conn, ca.record.key_id) is None
        assert core.store.key_blob(conn, responder_keys[0]) is None


def test_concurrent_first_requests_for_a_crl_all_get_one(core: Core, crl_ca) -> None:
    """Workers asking at once for a CA's first CRL (PostgreSQL lets them all read "none"
    before one stores it): each gets a CRL, numbers stay unique, nothing fails."""
    import threading

    barrier = threading.Barrier(4)
    results: list[object] = []

    def fetch() -> None:
        barrier.wait()
        try:
            results.append(core.revocation.current_crl(crl_ca.record.id))
        except Exception as exc:
            results.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(not isinstance(r, Exception) for r in results), results
    numbers = [r.number for r in results]  # type: ignore[attr-defined]
    assert min(numbers) == 1


def test_a_deleted_ca_publishes_no_crl(core: Core, crl_ca) -> None:
    """A deleted CA signs nothing, CRLs included; it is refused before its key is read."""
    ca_id = crl_ca.record.id
    core.authorities.update_status(ca_id, CAStatus.DISABLED, ACTOR)
    core.authorities.delete(ca_id, 7, ACTOR)
    with pytest.raises(CANotActiveError, match="publishes no CRLs"):
        core.revocation.generate_crl(ca_id)


def _revoked_rows(ca_id: str, now: datetime) -> list[dict[str, object]]:
    """Rows that exercise every shape of a hand-encoded entry: serials with and without
    the top bit set (a leading zero octet), every stored reason (``unspecified`` has no
    extension), and revocation times either side of 2050 (UTCTime, then GeneralizedTime)."""
    serials = [0x01, 0x7F, 0x80, 0xFF00, 0x7FFF_FFFF_FFFF_FFFF, 2**159 - 1000, 2**158 + 1]
    times = [
        datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC),
        datetime(2049, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2050, 1, 1, tzinfo=UTC),
        now,
    ]
    reasons = list(RevocationReason)
    rows = []
    for i in range(60):
        serial = format(serials[i % len(serials)] + (i // len(serials)) * 2, "x")
        rows.append(
            {
                "ca_id": ca_id,
                "serial": serial,
                "subject": f"CN=entry {i}",
                "sans": "[]",
                "not_before": now - timedelta(days=1),
                "not_after": now + timedelta(days=30),
                "issued_at": now - timedelta(days=1),
                "template": "EndEntityCertificate/V1",
                "requester": "bulk",
                "connector": "test",
                "correlation_id": None,
                "status": "REVOKED",
                "revoked_at": times[i % len(times)],
                "revocation_reason": reasons[i % len(reasons)].value,
                "fingerprint_sha256": serial.rjust(64, "0")[:64],
                "der": b"x",
                "crl_partition": None,
                "team": None,
            }
        )
    return rows


@pytest.mark.parametrize("algorithm", [KeyAlgorithm.RSA_2048, KeyAlgorithm.EC_prime256v1])
def test_a_crl_is_what_cryptographys_builder_makes_byte_for_byte(
    core: Core, algorithm: KeyAlgorithm, tmp_path: Path
) -> None:
    """The revoked-certificate list is encoded by hand (pkigate.core.crl): the TBSCertList
    must be exactly what cryptography's builder makes of the same entries, and the whole
    CRL too where the signature is deterministic (RSA PKCS#1 v1.5)."""
    ca = create_root(core, key_algorithm=algorithm, settings=CRL_SETTINGS)
    now = core.clock()
    rows = _revoked_rows(ca.record.id, now)
    with core.store.write() as conn:
        core.store.insert_certificates(conn, rows)
    published = core.revocation.generate_crl(ca.record.id)
    crl = _crl(published.der)
    assert published.entries == len(crl) == len(rows)

    material = core.authorities.signing_material(ca.record.id, now)
    entries = []
    for row in rows:
        builder = x509.RevokedCertificateBuilder(
            serial_number=int(str(row["serial"]), 16),
            revocation_date=row["revoked_at"],  # type: ignore[arg-type]
        )
        flag = reason_flag(RevocationReason(row["revocation_reason"]))
        if flag is not None:
            builder = builder.add_extension(x509.CRLReason(flag), critical=False)
        entries.append(builder.build())
    # The store may hand the rows back in another order than inserted: compare in the
    # order the CRL lists them.
    order = [r.serial_number for r in crl]
    expected = x509.CertificateRevocationListBuilder(
        issuer_name=material.certificate.subject,
        last_update=crl.last_update_utc,
        next_update=crl.next_update_utc,
        extensions=list(crl.extensions),
        revoked_certificates=sorted(entries, key=lambda e: order.index(e.serial_number)),
    ).sign(material.private_key, material.signing_algorithm.hash_algorithm())
    assert crl.tbs_certlist_bytes == expected.tbs_certlist_bytes
    assert crl.signature_algorithm_oid == expected.signature_algorithm_oid
    assert crl.is_signature_valid(material.certificate.public_key())  # type: ignore[arg-type]
    if algorithm.family == "RSA":
        assert published.der == expected.public_bytes(serialization.Encoding.DER)
    # And OpenSSL reads it the same way.
    text = subprocess.run(
        ["openssl", "crl", "-inform", "DER", "-noout", "-text"],
        input=published.der,
        capture_output=True,
        check=True,
    ).stdout.decode()
    assert text.count("Serial Number:") == len(rows)
    assert "Dec 31 23:59:59 2049 GMT" in text and "Jan  1 00:00:00 2050 GMT" in text
    # And pkilint's RFC 5280 CRL profile finds nothing at WARNING or above.
    crl_file = tmp_path / "entries.crl"
    crl_file.write_bytes(published.der)
    lint = subprocess.run(
        [
            *(sys.executable, "-m", "pkilint.bin.lint_crl", "lint", "-t", "CRL", "-p", "PKIX"),
            *("-s", "WARNING", "--document-format", "DER", str(crl_file)),
        ],
        capture_output=True,
        text=True,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_a_published_crl_is_read_from_the_store_once_per_number(core: Core, crl_ca) -> None:
    first = core.revocation.current_crl(crl_ca.record.id)
    again = core.revocation.current_crl(crl_ca.record.id)
    assert again is first  # the same object: no second read of its DER
    certificate = _issue(core, crl_ca.record.id)
    core.revocation.revoke(
        crl_ca.record.id, _serial(certificate), RevocationReason.superseded, ACTOR
    )
    newer = core.revocation.generate_crl(crl_ca.record.id)
    latest = core.revocation.latest_crl(crl_ca.record.id)
    assert latest is not None and latest.number == newer.number == first.number + 1
    assert len(_crl(latest.der)) == 1


def _entries(crl_der: bytes) -> list[bytes]:
    """The revokedCertificates elements of a CRL as encoded, sorted (their order is the
    store's)."""
    _, content, _ = der_element(crl_der, 0)
    _, position, tbs_end = der_element(crl_der, content)
    while position < tbs_end:  # version, signature, issuer, thisUpdate, nextUpdate, ...
        tag, start, stop = der_element(crl_der, position)
        if tag == 0x30 and der_element(crl_der, start)[0] == 0x30:  # SEQUENCE OF SEQUENCE
            break
        position = stop
    else:
        return []
    found = []
    while start < stop:
        _, _, end = der_element(crl_der, start)
        found.append(crl_der[start:end])
        start = end
    return sorted(found)


def test_migration_0019_gives_a_0018_stores_revocations_the_entries_its_crl_listed(
    tmp_path: Path, clock, database_url: str | None
) -> None:
    """A store at 0018 (no stored entries) with revoked certificates of every entry shape,
    revoked in bulk and through the service: once upgraded, its next CRL lists exactly the
    entries (byte for byte) that the CRL before the upgrade listed."""
    data = tmp_path / "data"
    core = Core.open(data, database_url, clock=clock)
    try:
        ca = create_root(core, settings=CRL_SETTINGS)
        ca_id = ca.record.id
        with core.store.write() as conn:
            core.store.insert_certificates(conn, _revoked_rows(ca_id, core.clock()))
        for reason in (RevocationReason.keyCompromise, RevocationReason.unspecified):
            revoked = _serial(_issue(core, ca_id))
            core.revocation.revoke(ca_id, revoked, reason, ACTOR)
        kept_good = _serial(_issue(core, ca_id))
        before = core.revocation.generate_crl(ca_id)
    finally:
        core.close()
    downgrade_store(database_url or sqlite_url(data / "pkigate.db"), "0018")

    upgraded = Core.open(data, database_url, clock=clock, upgrade_schema=True)
    try:
        after = upgraded.revocation.generate_crl(ca_id)
        material = upgraded.authorities.signing_material(ca_id, clock())
    finally:
        upgraded.close()
    assert (after.number, after.entries) == (before.number + 1, before.entries)
    assert _entries(after.der) == _entries(before.der)
    assert len(_entries(after.der)) == before.entries == 62
    crl = _crl(after.der)
    assert crl.is_signature_valid(material.certificate.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(int(kept_good, 16)) is None


def test_a_revoked_certificate_is_stored_with_the_entry_its_crl_lists(
    sqlite_core: Core, clock
) -> None:
    """The entry is encoded once, with the revocation, and the CRL is those entries: a
    revocation written without one is refused, not left out of CRLs."""
    ca = create_root(sqlite_core, settings=CRL_SETTINGS)
    serial = _serial(_issue(sqlite_core, ca.record.id))
    with sqlite_core.store.write() as conn:
        record = sqlite_core.store.get_certificate(conn, ca.record.id, serial)
        assert record is not None
        with pytest.raises(ValueError, match="needs its CRL entry"):
            sqlite_core.store.update_certificate(
                conn, record.id, status="REVOKED", revoked_at=clock(), revocation_reason=None
            )
    revoked = sqlite_core.revocation.revoke(
        ca.record.id, serial, RevocationReason.superseded, ACTOR
    )
    assert revoked.revoked_at is not None
    with sqlite_core.store.read() as conn:
        count, joined = sqlite_core.store.crl_entries(conn, ca.record.id, None, None)
    (listed,) = _entries(sqlite_core.revocation.generate_crl(ca.record.id).der)
    assert (count, joined) == (1, listed)
    entry = _crl(sqlite_core.revocation.latest_crl(ca.record.id).der)[0]  # type: ignore[union-attr]
    assert entry.serial_number == int(serial, 16)
    assert entry.revocation_date_utc == revoked.revoked_at.replace(microsecond=0)
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == (
        x509.ReasonFlags.superseded
    )
    # Any other status takes the entry off the next CRL (no path un-revokes today; the
    # store keeps the rule so that none can leave a stale entry behind).
    with sqlite_core.store.write() as conn:
        sqlite_core.store.update_certificate(conn, record.id, status="ISSUED")
    assert len(_crl(sqlite_core.revocation.generate_crl(ca.record.id).der)) == 0
