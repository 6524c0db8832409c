"""The OCSP responder (RFC 6960): in process, over the gateway's HTTP routes, and judged by
`openssl ocsp` and pyhanko-certvalidator against a running `pkigate serve`."""

from __future__ import annotations

import asyncio
import base64
import shutil
import subprocess
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import pytest
import requests
from asn1crypto import ocsp as asn1_ocsp
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID
from flask.testing import FlaskClient
from helpers import ACTOR, Clock, create_sub, make_csr
from pyhanko_certvalidator import CertificateValidator, ValidationContext
from pyhanko_certvalidator.errors import RevokedError
from pyhanko_certvalidator.policy_decl import (
    CertRevTrustPolicy,
    RevocationCheckingPolicy,
    RevocationCheckingRule,
)
from serving import RunningServer, start_server
from sqlalchemy import func, select
from werkzeug.test import TestResponse

from pkigate.core import CASettings, CAStatus, CAView, Core, IssuanceRequest, Requester, Validity
from pkigate.core.errors import CANotActiveError, InvalidStateError, PolicyViolationError
from pkigate.core.model import RevocationReason
from pkigate.core.ocsp import MAX_REQUEST_BYTES
from pkigate.core.store import ocsp as ocsp_store
from pkigate.core.store import schema
from pkigate.gateways.app import create_app
from pkigate.gateways.config import parse_config
from pkigate.gateways.runtime import CONFIG_NAME_TAG, Gateway

Status = ocsp.OCSPCertStatus
ResponseStatus = ocsp.OCSPResponseStatus


# -- helpers ----------------------------------------------------------------------------------


def enable_ocsp(core: Core, ca: CAView, validity_seconds: int = 3600) -> None:
    core.authorities.update_settings(
        ca.record.id,
        CASettings(
            ocsp_enabled=True,
            ocsp_url=f"http://ocsp.example.test/ocsp/{ca.record.id}",
            ocsp_response_validity_seconds=validity_seconds,
        ),
        ACTOR,
    )


def ca_certificate(core: Core, ca_id: str) -> x509.Certificate:
    der = core.authorities.get(ca_id).certificate_der
    assert der is not None
    return x509.load_der_x509_certificate(der)


def issue(core: Core, ca_id: str, cn: str = "leaf.example.test") -> x509.Certificate:
    issued = core.issue(
        IssuanceRequest(ca_id, make_csr(cn), Validity.parse("30d"), Requester("test"))
    )
    return issued.certificate


def ocsp_request(
    certificate: x509.Certificate,
    issuer: x509.Certificate,
    nonce: bytes | None = None,
    algorithm: hashes.HashAlgorithm | None = None,
) -> bytes:
    # SHA-1 CertIDs are what clients send by default (RFC 5019 2.1.1 requires them).
    algorithm = algorithm or hashes.SHA1()  # noqa: S303
    builder = ocsp.OCSPRequestBuilder().add_certificate(certificate, issuer, algorithm)
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    return builder.build().public_bytes(serialization.Encoding.DER)


def serial_request(known: bytes, serial: int) -> bytes:
    """A request naming ``serial`` under the same issuer hashes as the request ``known``."""
    parsed = ocsp.load_der_ocsp_request(known)
    return (
        ocsp.OCSPRequestBuilder()
        .add_certificate_by_hash(
            parsed.issuer_name_hash, parsed.issuer_key_hash, serial, parsed.hash_algorithm
        )
        .build()
        .public_bytes(serialization.Encoding.DER)
    )


def _sha1(data: bytes) -> bytes:
    digest = hashes.Hash(hashes.SHA1())  # noqa: S303 - the responder key hash (RFC 6960 4.2.1)
    digest.update(data)
    return digest.finalize()


def signed_by_responder(response: ocsp.OCSPResponse, ca: x509.Certificate) -> x509.Certificate:
    """The responder certificate in the response, checked to have signed it for ``ca``."""
    assert response.response_status == ResponseStatus.SUCCESSFUL
    (responder,) = response.certificates
    responder.verify_directly_issued_by(ca)
    public_key = responder.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert response.responder_key_hash == _sha1(
        public_key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    )
    assert response.signature_hash_algorithm is not None
    public_key.verify(
        response.signature,
        response.tbs_response_bytes,
        ec.ECDSA(response.signature_hash_algorithm),
    )
    return responder


def cached_rows(core: Core) -> int:
    with core.store.read() as conn:
        return int(
            conn.execute(select(func.count()).select_from(schema.ocsp_responses)).scalar_one()
        )


def responder_rows(core: Core, ca_id: str) -> int:
    with core.store.read() as conn:
        return int(
            conn.execute(
                select(func.count())
                .select_from(schema.ocsp_responders)
                .where(schema.ocsp_responders.c.ca_id == ca_id)
            ).scalar_one()
        )


@pytest.fixture
def ocsp_ca(core: Core, issuing: CAView) -> CAView:
    enable_ocsp(core, issuing)
    return issuing


def ask(core: Core, ca_id: str, request: bytes) -> ocsp.OCSPResponse:
    return ocsp.load_der_ocsp_response(core.ocsp.respond(ca_id, request))


# -- the responder in process ----------------------------------------------------------------


def test_good_revoked_with_time_and_reason_and_unknown(core: Core, ocsp_ca: CAView) -> None:
    ca_id = ocsp_ca.record.id
    ca = ca_certificate(core, ca_id)
    leaf = issue(core, ca_id)
    good = ask(core, ca_id, ocsp_request(leaf, ca))
    signed_by_responder(good, ca)
    assert good.certificate_status == Status.GOOD
    assert good.serial_number == leaf.serial_number
    assert good.next_update_utc is not None
    assert good.next_update_utc - good.this_update_utc == timedelta(hours=1)

    revoked = core.revocation.revoke(
        ca_id, format(leaf.serial_number, "x"), RevocationReason.keyCompromise, ACTOR
    )
    answer = ask(core, ca_id, ocsp_request(leaf, ca))
    signed_by_responder(answer, ca)
    assert answer.certificate_status == Status.REVOKED
    assert answer.revocation_reason == x509.ReasonFlags.key_compromise
    assert revoked.revoked_at is not None
    assert answer.revocation_time_utc == revoked.revoked_at.replace(microsecond=0)

    unknown = ask(core, ca_id, serial_request(ocsp_request(leaf, ca), 0x1234567890ABCDEF))
    signed_by_responder(unknown, ca)
    assert unknown.certificate_status == Status.UNKNOWN
    assert unknown.serial_number == 0x1234567890ABCDEF


def test_unspecified_reason_is_left_out(core: Core, ocsp_ca: CAView) -> None:
    ca_id = ocsp_ca.record.id
    leaf = issue(core, ca_id)
    core.revocation.revoke(
        ca_id, format(leaf.serial_number, "x"), RevocationReason.unspecified, ACTOR
    )
    answer = ask(core, ca_id, ocsp_request(leaf, ca_certificate(core, ca_id)))
    assert answer.certificate_status == Status.REVOKED
    assert answer.revocation_reason is None


def test_nonce_is_echoed_and_such_responses_are_never_cached(core: Core, ocsp_ca: CAView) -> None:
    ca_id = ocsp_ca.record.id
    ca = ca_certificate(core, ca_id)
    leaf = issue(core, ca_id)
    nonces = [bytes([n]) * 16 for n in (1, 2)]
    answers = [ask(core, ca_id, ocsp_request(leaf, ca, nonce=n)) for n in nonces]
    for nonce, answer in zip(nonces, answers, strict=True):
        assert answer.certificate_status == Status.GOOD
        echoed = answer.extensions.get_extension_for_class(x509.OCSPNonce).value
        assert echoed.nonce == nonce
    assert cached_rows(core) == 0
    # RFC 8954: nonces of more than 32 octets are refused.
    refused = ask(core, ca_id, ocsp_request(leaf, ca, nonce=b"n" * 33))
    assert refused.response_status == ResponseStatus.MALFORMED_REQUEST


@pytest.mark.parametrize(
    "request_der",
    [b"", b"garbage", b"\x30\x82\xff\xff", b"\x30" * 10, b"\x30\x03\x02\x01\x01"],
    ids=["empty", "garbage", "truncated-length", "zeros", "wrong-structure"],
)
def test_malformed_requests_get_malformed_request(
    core: Core, ocsp_ca: CAView, request_der: bytes
) -> None:
    answer = ask(core, ocsp_ca.record.id, request_der)
    assert answer.response_status == ResponseStatus.MALFORMED_REQUEST


def test_a_request_for_a_negative_serial_number_is_malformed(
    core: Core, ocsp_ca: CAView, caplog: pytest.LogCaptureFixture
) -> None:
    ca_id = ocsp_ca.record.id
    good = ocsp_request(issue(core, ca_id), ca_certificate(core, ca_id))
    serial = ocsp.load_der_ocsp_request(good).serial_number
    encoded = serial.to_bytes((serial.bit_length() + 8) // 8, "big")  # DER: leading 0 if needed
    field = bytes([0x02, len(encoded)]) + encoded
    assert good.count(field) == 1
    negative = good.replace(field, bytes([0x02, len(encoded), encoded[0] | 0x80]) + encoded[1:])
    assert ocsp.load_der_ocsp_request(negative).serial_number < 0
    assert ask(core, ca_id, negative).response_status == ResponseStatus.MALFORMED_REQUEST
    assert not [r for r in caplog.records if r.exc_info]  # refused, not an internal error


def test_a_request_with_two_nonces_is_malformed(
    core: Core, ocsp_ca: CAView, caplog: pytest.LogCaptureFixture
) -> None:
    """Found in review: two nonce extensions got internalError and a logged traceback."""
    ca_id = ocsp_ca.record.id
    one = asn1_ocsp.OCSPRequest.load(
        ocsp_request(issue(core, ca_id), ca_certificate(core, ca_id), nonce=b"n" * 16)
    )
    extensions = one["tbs_request"]["request_extensions"]
    twice = asn1_ocsp.TBSRequestExtensions([extensions[0], extensions[0]])
    one["tbs_request"]["request_extensions"] = twice
    request = asn1_ocsp.OCSPRequest({"tbs_request": one["tbs_request"]}).dump(force=True)
    assert ask(core, ca_id, request).response_status == ResponseStatus.MALFORMED_REQUEST
    assert not [r for r in caplog.records if r.exc_info]


def test_truncated_and_oversized_requests_are_malformed(core: Core, ocsp_ca: CAView) -> None:
    ca_id = ocsp_ca.record.id
    good = ocsp_request(issue(core, ca_id), ca_certificate(core, ca_id))
    for cut in (1, 10, len(good) // 2, len(good) - 1):
        assert ask(core, ca_id, good[:cut]).response_status == ResponseStatus.MALFORMED_REQUEST
    oversized = good + b"\x00" * MAX_REQUEST_BYTES
    assert ask(core, ca_id, oversized).response_status == ResponseStatus.MALFORMED_REQUEST


def test_requests_this_responder_cannot_answer_are_unauthorized(
    core: Core, root: CAView, ocsp_ca: CAView
) -> None:
    ca_id = ocsp_ca.record.id
    issuing_certificate = ca_certificate(core, ca_id)
    root_certificate = ca_certificate(core, root.record.id)
    # The issuing CA's own certificate was issued by the root: another CA's certificate.
    for_root = ocsp_request(issuing_certificate, root_certificate)
    assert ask(core, ca_id, for_root).response_status == ResponseStatus.UNAUTHORIZED
    # An unknown CA id, and a CA that does not run a responder (the root here).
    leaf = ocsp_request(issue(core, ca_id), issuing_certificate)
    assert ask(core, "no-such-ca", leaf).response_status == ResponseStatus.UNAUTHORIZED
    assert ask(core, root.record.id, for_root).response_status == ResponseStatus.UNAUTHORIZED
    enable_ocsp(core, root)
    assert ask(core, root.record.id, for_root).certificate_status == Status.GOOD
    core.authorities.update_settings(ca_id, CASettings(ocsp_enabled=False), ACTOR)
    assert ask(core, ca_id, leaf).response_status == ResponseStatus.UNAUTHORIZED


def test_sha256_cert_ids_are_answered_with_sha256(core: Core, ocsp_ca: CAView) -> None:
    ca_id = ocsp_ca.record.id
    ca = ca_certificate(core, ca_id)
    leaf = issue(core, ca_id)
    sha1 = ask(core, ca_id, ocsp_request(leaf, ca))
    sha256 = ask(core, ca_id, ocsp_request(leaf, ca, algorithm=hashes.SHA256()))
    assert sha1.hash_algorithm.name == "sha1"
    assert sha256.hash_algorithm.name == "sha256"
    assert sha256.certificate_status == Status.GOOD
    # Both cached flavours keep answering with their own hash algorithm.
    assert ask(core, ca_id, ocsp_request(leaf, ca)).hash_algorithm.name == "sha1"


def test_cached_response_is_reused_without_a_new_signature(
    core: Core, ocsp_ca: CAView, clock: Clock
) -> None:
    ca_id = ocsp_ca.record.id
    request = ocsp_request(issue(core, ca_id), ca_certificate(core, ca_id))
    first = core.ocsp.answer(ca_id, request)
    assert not first.cached and cached_rows(core) == 1
    clock.advance(timedelta(minutes=10))
    second = core.ocsp.answer(ca_id, request)
    # ECDSA signatures are randomized: the same bytes mean no new signature was made.
    assert second.cached and second.der == first.der
    assert ocsp.load_der_ocsp_response(second.der).this_update_utc == first.this_update
    # Shortly before nextUpdate (here: in its last tenth) a fresh response replaces it.
    clock.advance(timedelta(minutes=45))
    third = core.ocsp.answer(ca_id, request)
    assert not third.cached and third.der != first.der
    assert third.this_update is not None and first.this_update is not None
    assert third.this_update > first.this_update
    assert cached_rows(core) == 1


def test_revocation_after_a_cached_good_is_visible_at_once(core: Core, ocsp_ca: CAView) -> None:
    ca_id = ocsp_ca.record.id
    leaf = issue(core, ca_id)
    request = ocsp_request(leaf, ca_certificate(core, ca_id))
    assert ask(core, ca_id, request).certificate_status == Status.GOOD
    assert core.ocsp.answer(ca_id, request).cached
    core.revocation.revoke(
        ca_id, format(leaf.serial_number, "x"), RevocationReason.superseded, ACTOR
    )
    answer = ask(core, ca_id, request)
    assert answer.certificate_status == Status.REVOKED
    assert answer.revocation_reason == x509.ReasonFlags.superseded


def test_revocation_by_another_process_is_visible_at_once(
    core: Core, ocsp_ca: CAView, clock: Clock, database_url: str | None
) -> None:
    ca_id = ocsp_ca.record.id
    leaf = issue(core, ca_id)
    request = ocsp_request(leaf, ca_certificate(core, ca_id))
    assert ask(core, ca_id, request).certificate_status == Status.GOOD
    other = Core.open(core.data_dir, database_url, clock=clock)  # as a second gunicorn worker
    try:
        seen_there = ocsp.load_der_ocsp_response(other.ocsp.respond(ca_id, request))
        assert seen_there.certificate_status == Status.GOOD
        other.revocation.revoke(
            ca_id, format(leaf.serial_number, "x"), RevocationReason.cACompromise, ACTOR
        )
    finally:
        other.close()
    assert ask(core, ca_id, request).certificate_status == Status.REVOKED


def test_responder_certificate_is_a_delegated_ocsp_signer_issued_and_audited_by_the_ca(
    core: Core, ocsp_ca: CAView
) -> None:
    ca_id = ocsp_ca.record.id
    ca = ca_certificate(core, ca_id)
    answer = ask(core, ca_id, ocsp_request(issue(core, ca_id), ca))
    responder = signed_by_responder(answer, ca)
    eku = responder.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert eku.critical and list(eku.value) == [ExtendedKeyUsageOID.OCSP_SIGNING]
    responder.extensions.get_extension_for_class(x509.OCSPNoCheck)
    assert not responder.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = responder.not_valid_after_utc - responder.not_valid_before_utc
    assert timedelta(days=29) < lifetime <= timedelta(days=31)
    serial = format(responder.serial_number, "x")
    with core.store.read() as conn:
        record = core.store.get_certificate(conn, ca_id, serial)
        row = conn.execute(select(schema.ocsp_responders)).one()
        blob = core.store.key_blob(conn, row.key_id)
    assert record is not None and record.requester == "system:ocsp"
    assert record.template == "OCSPSigningCertificate/V1"
    assert bytes(row.certificate_der) == responder.public_bytes(serialization.Encoding.DER)
    # Sealed at rest like CA keys: the key backend's envelope, no PKCS#8 in clear.
    assert blob is not None and blob.startswith(b"PKG1") and b"\x30\x81\x87\x02\x01\x00" not in blob
    issued = [
        e
        for e in core.audit.events()
        if e.action == "certificate.issue" and e.actor == "system:ocsp" and serial in e.parameters
    ]
    assert len(issued) == 1
    assert any(e.action == "ocsp.responder.create" for e in core.audit.events())


def test_responder_is_renewed_when_a_third_of_its_lifetime_remains(
    core: Core, ocsp_ca: CAView, clock: Clock, database_url: str | None
) -> None:
    ca_id = ocsp_ca.record.id
    ca = ca_certificate(core, ca_id)
    leaf = issue(core, ca_id)

    def responder_now() -> x509.Certificate:
        return signed_by_responder(ask(core, ca_id, ocsp_request(leaf, ca, nonce=b"r" * 16)), ca)

    first = responder_now()
    clock.advance(timedelta(days=15))
    assert responder_now().serial_number == first.serial_number
    clock.advance(timedelta(days=6))  # 21 days in: less than a third of 30 days remains
    renewed = responder_now()
    assert renewed.serial_number != first.serial_number
    assert renewed.not_valid_after_utc > first.not_valid_after_utc + timedelta(days=20)
    assert responder_rows(core, ca_id) == 2
    (event,) = [s.event for s in core.events.list(types=["ocsp.responder_renewed"])]
    assert (event.ca_id, event.serial) == (ca_id, format(renewed.serial_number, "x"))
    # Another process (a second worker) finds the renewed responder instead of making one.
    other = Core.open(core.data_dir, database_url, clock=clock)
    try:
        again = ocsp.load_der_ocsp_response(
            other.ocsp.respond(ca_id, ocsp_request(leaf, ca, nonce=b"s" * 16))
        )
        assert again.certificates[0].serial_number == renewed.serial_number
    finally:
        other.close()
    assert responder_rows(core, ca_id) == 2


def test_concurrent_first_requests_create_one_responder(
    core: Core, ocsp_ca: CAView, clock: Clock, database_url: str | None
) -> None:
    ca_id = ocsp_ca.record.id
    ca = ca_certificate(core, ca_id)
    request = ocsp_request(issue(core, ca_id), ca, nonce=b"c" * 16)
    other = Core.open(core.data_dir, database_url, clock=clock)
    start = threading.Barrier(8)
    answers: list[bytes] = []

    def ask_from(instance: Core) -> None:
        start.wait()
        answers.append(instance.ocsp.respond(ca_id, request))

    try:
        threads = [
            threading.Thread(target=ask_from, args=(core if n % 2 else other,)) for n in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        other.close()
    responders = {
        signed_by_responder(ocsp.load_der_ocsp_response(a), ca).serial_number for a in answers
    }
    assert len(answers) == 8 and len(responders) == 1
    assert responder_rows(core, ca_id) == 1


def test_a_creation_claim_left_by_a_killed_process_is_taken_over(
    core: Core, ocsp_ca: CAView, clock: Clock
) -> None:
    """A process killed between claiming the first responder's key and storing it leaves a
    claim behind; requests wait for it, then take it over: OCSP is not held back."""
    ca_id = ocsp_ca.record.id
    ca = ca_certificate(core, ca_id)
    request = ocsp_request(issue(core, ca_id), ca)
    with core.store.write() as conn:
        assert ocsp_store.claim_key(
            conn, f"ocsp-{ca_id}-1", "software", "EC_prime256v1", clock(), clock()
        )
    # The dead process's claim becomes abandoned while this request waits for it.
    timer = threading.Timer(0.5, clock.advance, args=(timedelta(seconds=11),))
    timer.start()
    try:
        response = ask(core, ca_id, request)
    finally:
        timer.cancel()
    signed_by_responder(response, ca)
    assert response.certificate_status == ocsp.OCSPCertStatus.GOOD
    assert responder_rows(core, ca_id) == 1


def test_a_creator_overtaken_as_abandoned_cannot_complete_its_claim(
    core: Core, ocsp_ca: CAView, clock: Clock
) -> None:
    """Only the claim's current holder stores the key: a slow creator whose claim another
    process took over must not overwrite the key that goes with the other's certificate."""
    ca_id = ocsp_ca.record.id
    key_id = f"ocsp-{ca_id}-1"
    slow_at = clock()
    with core.store.write() as conn:
        assert ocsp_store.claim_key(conn, key_id, "software", "EC_prime256v1", slow_at, slow_at)
    clock.advance(timedelta(seconds=11))
    taker_at = clock()
    with core.store.write() as conn:
        assert not ocsp_store.claim_key(
            conn, key_id, "software", "EC_prime256v1", taker_at, taker_at - timedelta(seconds=20)
        )
        assert ocsp_store.claim_key(
            conn, key_id, "software", "EC_prime256v1", taker_at, taker_at - timedelta(seconds=10)
        )

    def complete(claimed_at: datetime, blob: bytes, responder_id: str) -> bool:
        with core.store.write() as conn:
            return ocsp_store.complete_responder(
                conn,
                responder_id=responder_id,
                ca_id=ca_id,
                key_id=key_id,
                claimed_at=claimed_at,
                blob=blob,
                certificate_der=b"certificate",
                not_before=taker_at,
                not_after=taker_at + timedelta(days=1),
                now=claimed_at,
            )

    assert not complete(slow_at, b"slow key", "slow")
    with core.store.write() as conn:
        ocsp_store.release_claim(conn, key_id, slow_at)  # not the slow one's to release
    assert complete(taker_at, b"taker key", "taker")
    with core.store.read() as conn:
        assert core.store.key_blob(conn, key_id) == b"taker key"
    assert responder_rows(core, ca_id) == 1


def test_a_disabled_ca_still_answers_for_what_it_issued(core: Core, ocsp_ca: CAView) -> None:
    ca_id = ocsp_ca.record.id
    ca = ca_certificate(core, ca_id)
    leaf = issue(core, ca_id)
    assert ask(core, ca_id, ocsp_request(leaf, ca)).certificate_status == Status.GOOD
    core.authorities.update_status(ca_id, CAStatus.DISABLED, ACTOR)
    answer = ask(core, ca_id, ocsp_request(leaf, ca, nonce=b"d" * 16))
    assert answer.certificate_status == Status.GOOD


def test_a_revoked_responder_certificate_is_replaced_in_every_process(
    core: Core, ocsp_ca: CAView, clock: Clock, database_url: str | None
) -> None:
    """Found in review: after its certificate was revoked (keyCompromise) the responder
    went on signing, even that its own certificate was revoked; with id-pkix-ocsp-nocheck
    no client could ever notice."""
    ca_id = ocsp_ca.record.id
    ca = ca_certificate(core, ca_id)
    leaf = issue(core, ca_id)
    request = ocsp_request(leaf, ca)
    first = signed_by_responder(ask(core, ca_id, request), ca)
    assert core.ocsp.answer(ca_id, request).cached
    other = Core.open(core.data_dir, database_url, clock=clock)  # a second gunicorn worker
    try:
        assert (
            signed_by_responder(ocsp.load_der_ocsp_response(other.ocsp.respond(ca_id, request)), ca)
            == first
        )
        core.revocation.revoke(
            ca_id, format(first.serial_number, "x"), RevocationReason.keyCompromise, ACTOR
        )
        for process in (core, other):
            answer = ocsp.load_der_ocsp_response(process.ocsp.respond(ca_id, request))
            assert answer.certificate_status == Status.GOOD
            assert signed_by_responder(answer, ca) != first
        about_itself = ask(core, ca_id, serial_request(request, first.serial_number))
        assert about_itself.certificate_status == Status.REVOKED
        assert signed_by_responder(about_itself, ca) != first
    finally:
        other.close()
    assert responder_rows(core, ca_id) == 2


def test_a_ca_whose_certificate_is_revoked_is_disabled_and_stays_so(
    core: Core, root: CAView
) -> None:
    """Found in review: a CA below went on issuing after its issuer revoked its
    certificate (cACompromise)."""
    below = create_sub(core, root, "Below CA", path_length=0)
    certificate = ca_certificate(core, below.record.id)
    issue(core, below.record.id)
    core.revocation.revoke(
        root.record.id,
        format(certificate.serial_number, "x"),
        RevocationReason.cACompromise,
        ACTOR,
    )
    assert core.authorities.describe(below.record.id).status == CAStatus.DISABLED
    with pytest.raises(CANotActiveError):
        issue(core, below.record.id)
    with pytest.raises(InvalidStateError, match="was revoked"):
        core.authorities.update_status(below.record.id, CAStatus.ACTIVE, ACTOR)
    events = [e for e in core.audit.events() if e.resource == f"ca/{below.record.id}"]
    assert any(
        e.action == "ca.update" and "its certificate was revoked" in e.parameters for e in events
    )


def test_a_ca_disabled_before_its_first_ocsp_request_still_answers(
    core: Core, ocsp_ca: CAView
) -> None:
    """Found in review: with no responder certificate yet, a DISABLED CA answered tryLater
    forever (it could not certify its responder), revoked certificates included."""
    ca_id = ocsp_ca.record.id
    ca = ca_certificate(core, ca_id)
    leaf = issue(core, ca_id)
    core.authorities.update_status(ca_id, CAStatus.DISABLED, ACTOR)
    answer = ask(core, ca_id, ocsp_request(leaf, ca))
    signed_by_responder(answer, ca)
    assert answer.certificate_status == Status.GOOD
    core.revocation.revoke(
        ca_id, format(leaf.serial_number, "x"), RevocationReason.keyCompromise, ACTOR
    )
    assert ask(core, ca_id, ocsp_request(leaf, ca)).certificate_status == Status.REVOKED
    # The exception is for the responder only: the DISABLED CA issues nothing else, by
    # that route or any other.
    for template in ("EndEntityCertificate/V1", "OCSPSigningCertificate/V1"):
        with pytest.raises(CANotActiveError):
            core.issue(
                IssuanceRequest(
                    ca_id, make_csr(), Validity.parse("1d"), Requester("t"), template=template
                )
            )
    with pytest.raises(PolicyViolationError, match="OCSP responder takes"):
        core.issue(
            IssuanceRequest(
                ca_id, make_csr(), Validity.parse("1d"), Requester("t"), for_ocsp_responder=True
            )
        )


# -- HTTP routes (Flask test client) ---------------------------------------------------------


@pytest.fixture
def http(tmp_path: Path) -> Iterator[tuple[Gateway, FlaskClient]]:
    config = parse_config(
        f"data_dir = '{tmp_path / 'gw'}'\n[listeners]\nhttp = '127.0.0.1:18080'\n"
    )
    gw = Gateway.open(config, bootstrap=True)
    yield gw, create_app(gw, "http").test_client()
    gw.close()


def _default_cas(gw: Gateway) -> tuple[str, str]:
    ids = {
        v.tags[CONFIG_NAME_TAG]: v.record.id
        for v in gw.core.authorities.list_cas()
        if CONFIG_NAME_TAG in v.tags
    }
    root = next(i for i in ids.values() if gw.core.authorities.get(i).type == "ROOT")
    issuing = next(i for i in ids.values() if i != root)
    return root, issuing


def test_http_post_and_get_in_every_encoding_clients_use(http: tuple[Gateway, FlaskClient]) -> None:
    gw, client = http
    _, ca_id = _default_cas(gw)
    ca = ca_certificate(gw.core, ca_id)
    # Find a certificate whose request's base64 has '+' and '/', which clients escape
    # differently (some leave them raw).
    for n in range(200):
        request = ocsp_request(issue(gw.core, ca_id, f"h{n}.example.test"), ca)
        encoded = base64.b64encode(request).decode()
        if "+" in encoded and "/" in encoded:
            break
    else:
        pytest.fail("no request with both '+' and '/' in its base64")
    posted = client.post(f"/ocsp/{ca_id}", data=request, content_type="application/ocsp-request")
    assert posted.status_code == 200
    assert posted.headers["Content-Type"] == "application/ocsp-response"
    assert ocsp.load_der_ocsp_response(posted.data).certificate_status == Status.GOOD
    forms = {
        "url-encoded": quote(encoded, safe=""),
        "raw": encoded,
        "url-safe": base64.urlsafe_b64encode(request).decode().rstrip("="),
    }
    for name, form in forms.items():
        got = client.get(f"/ocsp/{ca_id}/{form}")
        assert got.status_code == 200, name
        answer = ocsp.load_der_ocsp_response(got.data)
        assert answer.response_status == ResponseStatus.SUCCESSFUL, name
        assert answer.certificate_status == Status.GOOD, name
        # RFC 5019 6.2: a nonce-less GET answer may be cached until its nextUpdate.
        assert "max-age=" in got.headers["Cache-Control"] and "ETag" in got.headers, name
    # HEAD: GET's headers and no body (found in review: a 405 with a body).
    head = client.head(f"/ocsp/{ca_id}/{forms['url-encoded']}")
    assert head.status_code == 200 and head.data == b""
    assert int(head.headers["Content-Length"]) == len(got.data)


def test_http_bad_input_is_answered_never_a_500(http: tuple[Gateway, FlaskClient]) -> None:
    gw, client = http
    root_id, ca_id = _default_cas(gw)
    ca = ca_certificate(gw.core, ca_id)
    request = ocsp_request(issue(gw.core, ca_id), ca)

    def status_of(response: TestResponse) -> ResponseStatus:
        assert response.headers["Content-Type"] == "application/ocsp-response"
        return ocsp.load_der_ocsp_response(response.data).response_status

    post, get = client.post, client.get
    assert status_of(post(f"/ocsp/{ca_id}", data=b"junk")) == ResponseStatus.MALFORMED_REQUEST
    assert status_of(get(f"/ocsp/{ca_id}/not*base64")) == ResponseStatus.MALFORMED_REQUEST
    assert get(f"/ocsp/{ca_id}/not*base64").headers["Cache-Control"] == "no-store"
    assert status_of(get(f"/ocsp/{ca_id}")) == ResponseStatus.MALFORMED_REQUEST
    assert status_of(post(f"/ocsp/{root_id}", data=request)) == ResponseStatus.UNAUTHORIZED
    assert status_of(post("/ocsp/%00%ff", data=request)) == ResponseStatus.UNAUTHORIZED
    assert status_of(post("/ocsp/" + "x" * 300, data=request)) == ResponseStatus.UNAUTHORIZED
    too_big = post(f"/ocsp/{ca_id}", data=b"\x30" * (MAX_REQUEST_BYTES + 1))
    assert too_big.status_code == 413
    assert status_of(too_big) == ResponseStatus.MALFORMED_REQUEST
    wrong_method = client.put(f"/ocsp/{ca_id}", data=request)
    assert wrong_method.status_code == 405 and "POST" in wrong_method.headers["Allow"]
    # Everything else on the listener is still Flask's.
    assert get("/healthz").status_code == 200


# -- a running server, judged by independent clients -----------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_server(tmp_path_factory.mktemp("ocsp") / "data", workers=2)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def served_core(server: RunningServer) -> Iterator[Core]:
    """The server's data directory opened in the test process: same database, as an operator
    running `pkigate` commands beside the server would."""
    core = Core.open(server.data_dir)
    yield core
    core.close()


def _served_cas(core: Core) -> tuple[x509.Certificate, str, x509.Certificate]:
    views = {v.tags.get(CONFIG_NAME_TAG): v for v in core.authorities.list_cas()}
    root = next(v for v in views.values() if v.record.type == "ROOT")
    issuing = next(v for v in views.values() if v.record.type == "SUBORDINATE")
    assert issuing.record.settings["ocsp_enabled"] and root.record.settings["ocsp_enabled"]
    return (
        ca_certificate(core, root.record.id),
        issuing.record.id,
        ca_certificate(core, issuing.record.id),
    )


def _pem(*certificates: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def openssl_ocsp(
    directory: Path, url: str, issuer: x509.Certificate, root: x509.Certificate, *args: str
) -> str:
    (directory / "issuing.pem").write_bytes(_pem(issuer))
    (directory / "root.pem").write_bytes(_pem(root))
    result = subprocess.run(
        ["openssl", "ocsp", "-issuer", "issuing.pem", "-url", url, "-CAfile", "root.pem", *args],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_openssl_ocsp_reports_good_then_revoked_and_unknown(
    server: RunningServer, served_core: Core, tmp_path: Path
) -> None:
    root, ca_id, issuing = _served_cas(served_core)
    leaf = issue(served_core, ca_id, "openssl-ocsp.example.test")
    # The URL the certificate itself names (AIA), as a relying party would use.
    aia = leaf.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    url = next(
        str(d.access_location.value)
        for d in aia
        if d.access_method == x509.oid.AuthorityInformationAccessOID.OCSP
    )
    assert url == f"{server.http_url}/ocsp/{ca_id}"
    (tmp_path / "leaf.pem").write_bytes(_pem(leaf))

    output = openssl_ocsp(tmp_path, url, issuing, root, "-cert", "leaf.pem")
    assert "Response verify OK" in output and "leaf.pem: good" in output, output
    for _ in range(3):  # without a nonce: signed once, then answered from the shared cache
        output = openssl_ocsp(tmp_path, url, issuing, root, "-cert", "leaf.pem", "-no_nonce")
        assert "Response verify OK" in output and "leaf.pem: good" in output, output

    # Revoked by another process (an operator's `pkigate` beside the server).
    served_core.revocation.revoke(
        ca_id, format(leaf.serial_number, "x"), RevocationReason.keyCompromise, ACTOR
    )
    for extra in (["-no_nonce"], []):
        output = openssl_ocsp(tmp_path, url, issuing, root, "-cert", "leaf.pem", *extra)
        assert "Response verify OK" in output and "leaf.pem: revoked" in output, output
        assert "Reason: keyCompromise" in output, output

    output = openssl_ocsp(tmp_path, url, issuing, root, "-serial", "0x1234567890abcdef")
    assert "Response verify OK" in output and "0x1234567890abcdef: unknown" in output, output


def _a1(certificate: x509.Certificate) -> asn1_x509.Certificate:
    return asn1_x509.Certificate.load(certificate.public_bytes(serialization.Encoding.DER))


# Revocation checked by OCSP alone, for the leaf and for the issuing CA (the root's responder
# answers for it), with the responses fetched from the URLs in the certificates' AIA.
OCSP_REQUIRED = CertRevTrustPolicy(
    RevocationCheckingPolicy(
        ee_certificate_rule=RevocationCheckingRule.OCSP_REQUIRED,
        intermediate_ca_cert_rule=RevocationCheckingRule.OCSP_REQUIRED,
    )
)


def test_pyhanko_requires_ocsp_and_honours_it(served_core: Core) -> None:
    root, ca_id, issuing = _served_cas(served_core)

    def validate(leaf: x509.Certificate) -> None:
        context = ValidationContext(
            trust_roots=[_a1(root)],
            other_certs=[_a1(issuing)],
            allow_fetching=True,
            revinfo_policy=OCSP_REQUIRED,
        )
        validator = CertificateValidator(_a1(leaf), validation_context=context)

        async def run() -> None:
            try:
                await validator.async_validate_path()
            finally:
                await context.aclose()  # the HTTP session its fetchers opened

        asyncio.run(run())

    good = issue(served_core, ca_id, "pyhanko-good.example.test")
    validate(good)
    revoked = issue(served_core, ca_id, "pyhanko-revoked.example.test")
    validate(revoked)
    served_core.revocation.revoke(
        ca_id, format(revoked.serial_number, "x"), RevocationReason.affiliationChanged, ACTOR
    )
    with pytest.raises(RevokedError):
        validate(revoked)
    validate(good)


def test_the_server_answers_get_requests_with_cache_headers(
    server: RunningServer, served_core: Core
) -> None:
    _, ca_id, issuing = _served_cas(served_core)
    leaf = issue(served_core, ca_id, "get.example.test")
    encoded = quote(base64.b64encode(ocsp_request(leaf, issuing)).decode(), safe="")
    got = requests.get(f"{server.http_url}/ocsp/{ca_id}/{encoded}", timeout=10)
    assert got.status_code == 200
    assert got.headers["Content-Type"] == "application/ocsp-response"
    assert ocsp.load_der_ocsp_response(got.content).certificate_status == Status.GOOD
    assert "max-age=" in got.headers["Cache-Control"]
    again = requests.get(f"{server.http_url}/ocsp/{ca_id}/{encoded}", timeout=10)
    assert again.content == got.content  # served from the shared cache, whichever worker
