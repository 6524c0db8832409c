"""CA creation, lifecycle, bring-your-own-parent and hierarchies."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import ACTOR, create_root, create_sub, make_csr

from pkigate.core import (
    CASpec,
    CAStatus,
    CAType,
    Core,
    IssuanceRequest,
    KeyAlgorithm,
    Requester,
    SigningAlgorithm,
    UsageMode,
    Validity,
)
from pkigate.core.errors import (
    BadRequestError,
    CANotActiveError,
    IdempotencyConflictError,
    InvalidCertificateError,
    InvalidStateError,
    InvalidValidityError,
    PolicyViolationError,
    UnsupportedAlgorithmError,
)
from pkigate.core.model import ValidityType
from pkigate.core.names import parse_dn

COMPATIBLE = [
    (key, signing)
    for key in KeyAlgorithm
    for signing in SigningAlgorithm
    if key.family == signing.family
]


def _issue(core: Core, ca_id: str, validity: str = "30d") -> x509.Certificate:
    return core.issue(
        IssuanceRequest(ca_id, make_csr(), Validity.parse(validity), Requester("tester"))
    ).certificate


def _last_event(core: Core):
    return core.audit.events()[-1]


@pytest.mark.parametrize(
    ("key_algorithm", "signing_algorithm"), COMPATIBLE, ids=[f"{k}-{s}" for k, s in COMPATIBLE]
)
def test_root_with_every_key_and_signing_algorithm_issues(
    sqlite_core: Core, key_algorithm: KeyAlgorithm, signing_algorithm: SigningAlgorithm
) -> None:
    view = create_root(
        sqlite_core, key_algorithm=key_algorithm, signing_algorithm=signing_algorithm
    )
    assert view.status == CAStatus.ACTIVE
    ca_cert = x509.load_der_x509_certificate(view.record.certificate_der or b"")
    assert KeyAlgorithm.of_key(ca_cert.public_key()) == key_algorithm
    assert ca_cert.signature_hash_algorithm is not None
    assert ca_cert.signature_hash_algorithm.name == signing_algorithm.value[:6].lower()
    leaf = _issue(sqlite_core, view.record.id)
    leaf.verify_directly_issued_by(ca_cert)
    assert leaf.signature_hash_algorithm is not None
    assert leaf.signature_hash_algorithm.name == signing_algorithm.value[:6].lower()


def test_signing_algorithm_of_the_wrong_family_is_refused_and_audited(core: Core) -> None:
    with pytest.raises(UnsupportedAlgorithmError, match="cannot be used with"):
        create_root(
            core,
            key_algorithm=KeyAlgorithm.EC_prime256v1,
            signing_algorithm=SigningAlgorithm.SHA256WITHRSA,
        )
    event = _last_event(core)
    assert (event.action, event.result) == ("ca.create", "failure")
    assert core.authorities.list_cas() == []


def test_root_certificate_carries_the_subject_and_ca_extensions(core: Core) -> None:
    view = core.authorities.create(
        CASpec(
            CAType.ROOT,
            parse_dn("CN=Root,OU=Ops,O=Example,L=Berlin,ST=Berlin,C=DE,serialNumber=42"),
        ),
        ACTOR,
    )
    cert = x509.load_der_x509_certificate(view.record.certificate_der or b"")
    assert cert.subject == cert.issuer
    assert (
        cert.subject.rfc4514_string()
        == "CN=Root,OU=Ops,O=Example,L=Berlin,ST=Berlin,C=DE,2.5.4.5=42"
    )
    assert cert.subject.get_attributes_for_oid(x509.NameOID.SERIAL_NUMBER)[0].value == "42"
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign


def test_empty_subject_is_refused(core: Core) -> None:
    with pytest.raises(BadRequestError, match="subject"):
        core.authorities.create(CASpec(CAType.ROOT, x509.Name([])), ACTOR)


def test_disable_enable_and_a_disabled_ca_does_not_issue(core: Core, issuing) -> None:
    ca_id = issuing.record.id
    assert (
        core.authorities.update_status(ca_id, CAStatus.DISABLED, ACTOR).status == CAStatus.DISABLED
    )
    with pytest.raises(CANotActiveError):
        _issue(core, ca_id)
    assert core.authorities.update_status(ca_id, CAStatus.ACTIVE, ACTOR).status == CAStatus.ACTIVE
    _issue(core, ca_id)
    actions = [(e.action, e.result) for e in core.audit.events()]
    assert ("ca.update", "success") in actions
    assert ("certificate.issue", "failure") in actions


def test_delete_is_refused_while_active_and_restore_returns_the_earlier_state(
    core: Core, issuing
) -> None:
    ca_id = issuing.record.id
    with pytest.raises(InvalidStateError, match="ACTIVE"):
        core.authorities.delete(ca_id, 7, ACTOR)
    core.authorities.update_status(ca_id, CAStatus.DISABLED, ACTOR)
    for days in (6, 31):
        with pytest.raises(BadRequestError, match="7-30"):
            core.authorities.delete(ca_id, days, ACTOR)
    deleted = core.authorities.delete(ca_id, 7, ACTOR)
    assert deleted.status == CAStatus.DELETED
    assert deleted.record.restore_until is not None
    restored = core.authorities.restore(ca_id, ACTOR)
    assert restored.status == CAStatus.DISABLED


def test_a_ca_with_cas_below_it_is_not_deleted(core: Core, root, issuing) -> None:
    """Found in review: the parent's key was destroyed after the window while the CA below
    stayed ACTIVE, leaving nothing to sign a CRL revoking it."""
    core.authorities.update_status(root.record.id, CAStatus.DISABLED, ACTOR)
    with pytest.raises(InvalidStateError, match="CAs below it"):
        core.authorities.delete(root.record.id, 7, ACTOR)
    assert core.authorities.describe(root.record.id).status == CAStatus.DISABLED
    assert _last_event(core).result == "failure"
    core.authorities.update_status(issuing.record.id, CAStatus.DISABLED, ACTOR)
    core.authorities.delete(issuing.record.id, 7, ACTOR)
    assert core.authorities.delete(root.record.id, 7, ACTOR).status == CAStatus.DELETED


def test_after_the_restore_window_the_key_is_destroyed(core: Core, issuing, clock) -> None:
    ca_id = issuing.record.id
    core.authorities.update_status(ca_id, CAStatus.DISABLED, ACTOR)
    core.authorities.delete(ca_id, 7, ACTOR)
    clock.advance(timedelta(days=7, seconds=1))
    assert core.authorities.purge_expired_deletions(ACTOR) == [ca_id]
    with core.store.read() as conn:
        assert core.store.key_blob(conn, issuing.record.key_id) is None
    with pytest.raises(InvalidStateError, match="restore window"):
        core.authorities.restore(ca_id, ACTOR)
    assert _last_event(core).action == "ca.restore"


def test_expired_ca_reports_expired_and_does_not_issue(core: Core, clock) -> None:
    view = create_root(core, validity=Validity.parse("30d"))
    clock.advance(timedelta(days=31))
    assert core.authorities.describe(view.record.id).status == CAStatus.EXPIRED
    with pytest.raises(CANotActiveError, match="EXPIRED"):
        _issue(core, view.record.id, "1d")


def test_tags_are_added_replaced_and_removed(core: Core, root) -> None:
    ca_id = root.record.id
    view = core.authorities.tag(ca_id, {"team": "infra", "env": "prod"}, [], ACTOR)
    assert dict(view.tags) == {"env": "prod", "team": "infra"}
    view = core.authorities.tag(ca_id, {"env": "dev"}, ["team"], ACTOR)
    assert dict(view.tags) == {"env": "dev"}


def test_create_with_tags_and_idempotency_token(core: Core) -> None:
    spec = CASpec(CAType.ROOT, parse_dn("CN=Idem Root"), tags={"k": "v"})
    first = core.authorities.create(spec, ACTOR, idempotency_token="tok-1")
    again = core.authorities.create(spec, ACTOR, idempotency_token="tok-1")
    assert first.record.id == again.record.id
    assert dict(again.tags) == {"k": "v"}
    assert len(core.authorities.list_cas()) == 1
    other = CASpec(CAType.ROOT, parse_dn("CN=Other Root"))
    with pytest.raises(IdempotencyConflictError):
        core.authorities.create(other, ACTOR, idempotency_token="tok-1")


def test_idempotency_token_expires_after_five_minutes(core: Core, clock) -> None:
    spec = CASpec(CAType.ROOT, parse_dn("CN=Idem Root"))
    first = core.authorities.create(spec, ACTOR, idempotency_token="tok-2")
    clock.advance(timedelta(minutes=5, seconds=1))
    second = core.authorities.create(spec, ACTOR, idempotency_token="tok-2")
    assert first.record.id != second.record.id


def test_hierarchy_of_five_levels_and_no_sixth(core: Core) -> None:
    parent = create_root(core)
    for level, path_length in zip(range(2, 6), (3, 2, 1, 0), strict=True):
        parent = create_sub(core, parent, cn=f"Level {level}", path_length=path_length)
        assert parent.status == CAStatus.ACTIVE
    leaf_issuer = parent
    cert = _issue(core, leaf_issuer.record.id)
    chain = core.authorities.signing_material(leaf_issuer.record.id, core.issuer._clock()).chain
    assert len(chain) == 5
    assert cert.issuer == chain[0].subject
    with pytest.raises(PolicyViolationError, match="at most 5 levels"):
        create_sub(core, leaf_issuer, cn="Level 6")


def test_hierarchy_depth_limit_is_enforced_whatever_the_path_lengths(
    core: Core, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pkigate.core.authorities.MAX_HIERARCHY_DEPTH", 3)
    level2 = create_sub(core, create_root(core), cn="Level 2", path_length=3)
    level3 = create_sub(core, level2, cn="Level 3", path_length=2)
    with pytest.raises(PolicyViolationError, match="at most 3 levels"):
        create_sub(core, level3, cn="Level 4")


def test_subordinate_cannot_exceed_its_parents_path_length(core: Core, root) -> None:
    middle = create_sub(core, root, cn="Middle", path_length=1)
    with pytest.raises(PolicyViolationError, match="path length"):
        create_sub(core, middle, cn="Too deep", path_length=1)
    below = create_sub(core, middle, cn="Below", path_length=0)
    with pytest.raises(PolicyViolationError, match="path length 0"):
        create_sub(core, below, cn="Under pathlen 0")


def test_subordinate_that_the_parent_would_refuse_is_refused_before_anything_is_stored(
    core: Core,
) -> None:
    root = create_root(core, validity=Validity.parse("1y"))
    with pytest.raises(InvalidValidityError, match="outlive its parent"):
        create_sub(core, root, validity=Validity.parse("5y"))
    assert [v for v in core.authorities.list_cas() if v.record.type == "SUBORDINATE"] == []


def test_subordinate_that_the_parent_refuses_while_signing_is_marked_failed(
    core: Core, root, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the checks before storing cannot foresee (the parent disabled meanwhile, say)
    leaves the new CA FAILED with the reason, never half-made."""

    def refuse(*_args: object) -> tuple[bytes, str]:
        raise CANotActiveError("the parent was disabled meanwhile")

    monkeypatch.setattr(core.authorities, "subordinate_signer", refuse)
    with pytest.raises(CANotActiveError):
        create_sub(core, root, path_length=0)
    (failed,) = [v for v in core.authorities.list_cas() if v.record.type == "SUBORDINATE"]
    assert failed.status == CAStatus.FAILED
    assert "disabled meanwhile" in (failed.record.failure_reason or "")


def test_short_lived_ca_issues_at_most_seven_days(core: Core, root) -> None:
    short = create_sub(
        core, root, cn="Short", path_length=0, usage_mode=UsageMode.SHORT_LIVED_CERTIFICATE
    )
    cert = _issue(core, short.record.id, "7d")
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= timedelta(days=7, minutes=5)
    from pkigate.core.errors import InvalidValidityError

    with pytest.raises(InvalidValidityError, match="SHORT_LIVED"):
        _issue(core, short.record.id, "8d")


# -- bring your own parent, signed by a real outside CA (the openssl command line) ----------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def outside_root(tmp_path: Path) -> Path:
    """A root CA made with openssl, outside pkigate."""
    ext = tmp_path / "ca.cnf"
    ext.write_text(
        "[v3_sub]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
        "[v3_sub0]\nbasicConstraints=critical,CA:TRUE,pathlen:0\n"
        "keyUsage=critical,keyCertSign,cRLSign\n"
        "[v3_leaf]\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
    )
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "root.key",
        "-out",
        "root.pem",
        "-days",
        "3650",
        "-subj",
        "/CN=Outside Root/O=Elsewhere",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        cwd=tmp_path,
    )
    return tmp_path


def _sign_outside(
    directory: Path, csr_pem: str, section: str, name: str, ca: str = "root"
) -> bytes:
    (directory / f"{name}.csr").write_text(csr_pem)
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.pem",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-days",
        "1000",
        "-extfile",
        "ca.cnf",
        "-extensions",
        section,
        "-out",
        f"{name}.pem",
        cwd=directory,
    )
    return (directory / f"{name}.pem").read_bytes()


def _pending_sub(core: Core) -> str:
    view = core.authorities.create(
        CASpec(CAType.SUBORDINATE, parse_dn("CN=BYO Issuing,O=pkigate tests")), ACTOR
    )
    assert view.status == CAStatus.PENDING_CERTIFICATE
    return view.record.id


def test_csr_export_and_import_of_a_certificate_signed_elsewhere(
    core: Core, outside_root: Path
) -> None:
    ca_id = _pending_sub(core)
    csr_pem = core.authorities.csr_pem(ca_id)
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    assert csr.is_signature_valid
    cert = _sign_outside(outside_root, csr_pem, "v3_sub", "sub")
    root_pem = (outside_root / "root.pem").read_bytes()
    view = core.authorities.import_certificate(ca_id, cert, root_pem, ACTOR)
    assert view.status == CAStatus.ACTIVE
    issued = core.issue(IssuanceRequest(ca_id, make_csr(), Validity.parse("30d"), Requester("t")))
    leaf = outside_root / "leaf.pem"
    leaf.write_bytes(issued.certificate.public_bytes(serialization.Encoding.PEM))
    (outside_root / "chain.pem").write_text(issued.chain_pem())
    result = subprocess.run(
        [
            "openssl",
            "verify",
            "-x509_strict",
            "-CAfile",
            "root.pem",
            "-untrusted",
            "chain.pem",
            "leaf.pem",
        ],
        cwd=outside_root,
        capture_output=True,
        text=True,
    )
    assert result.stdout.strip() == "leaf.pem: OK", result.stderr


def test_import_refuses_a_certificate_for_another_key(core: Core, outside_root: Path) -> None:
    ca_id = _pending_sub(core)
    other_csr = make_csr("Someone Else").decode()
    cert = _sign_outside(outside_root, other_csr, "v3_sub", "other")
    with pytest.raises(InvalidCertificateError, match="not this CA's key"):
        core.authorities.import_certificate(
            ca_id, cert, (outside_root / "root.pem").read_bytes(), ACTOR
        )
    assert core.authorities.describe(ca_id).status == CAStatus.PENDING_CERTIFICATE
    event = _last_event(core)
    assert (event.action, event.result) == ("ca.import_certificate", "failure")


def test_import_refuses_a_chain_that_does_not_validate(
    core: Core, outside_root: Path, tmp_path_factory
) -> None:
    ca_id = _pending_sub(core)
    cert = _sign_outside(outside_root, core.authorities.csr_pem(ca_id), "v3_sub", "sub")
    stranger = tmp_path_factory.mktemp("stranger")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "root.key",
        "-out",
        "root.pem",
        "-days",
        "10",
        "-subj",
        "/CN=Outside Root/O=Elsewhere",
        cwd=stranger,
    )
    with pytest.raises(InvalidCertificateError, match="not signed by"):
        core.authorities.import_certificate(
            ca_id, cert, (stranger / "root.pem").read_bytes(), ACTOR
        )
    with pytest.raises(InvalidCertificateError, match="chain up to the root is required"):
        core.authorities.import_certificate(ca_id, cert, None, ACTOR)


def test_import_refuses_a_certificate_that_is_not_a_ca(core: Core, outside_root: Path) -> None:
    ca_id = _pending_sub(core)
    cert = _sign_outside(outside_root, core.authorities.csr_pem(ca_id), "v3_leaf", "leaf")
    with pytest.raises(InvalidCertificateError, match="not a CA certificate"):
        core.authorities.import_certificate(
            ca_id, cert, (outside_root / "root.pem").read_bytes(), ACTOR
        )


def test_import_refuses_when_an_issuers_path_length_forbids_this_ca(
    core: Core, outside_root: Path
) -> None:
    # root -> intermediate (pathlen 0) -> our CA: the intermediate allows no CA below it.
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "mid.key",
        "-out",
        "mid.csr",
        "-subj",
        "/CN=Outside Intermediate",
        cwd=outside_root,
    )
    mid = _sign_outside(outside_root, (outside_root / "mid.csr").read_text(), "v3_sub0", "mid")
    ca_id = _pending_sub(core)
    cert = _sign_outside(outside_root, core.authorities.csr_pem(ca_id), "v3_sub", "sub", ca="mid")
    chain = mid + (outside_root / "root.pem").read_bytes()
    with pytest.raises(InvalidCertificateError, match="path length 0"):
        core.authorities.import_certificate(ca_id, cert, chain, ACTOR)


_CA_KEY_USAGE = x509.KeyUsage(False, False, False, False, False, True, True, False, False)


def _certify(
    subject: x509.Name,
    public_key: object,
    issuer: x509.Name,
    signer: ec.EllipticCurvePrivateKey,
    days: int,
) -> x509.Certificate:
    """A CA certificate made elsewhere (no path length)."""
    now = datetime.now(UTC)
    return x509.CertificateBuilder(
        issuer_name=issuer,
        subject_name=subject,
        public_key=public_key,  # type: ignore[arg-type]
        serial_number=x509.random_serial_number(),
        not_valid_before=now - timedelta(hours=1),
        not_valid_after=now + timedelta(days=days),
        extensions=[
            x509.Extension(
                x509.BasicConstraints.oid, True, x509.BasicConstraints(ca=True, path_length=None)
            ),
            x509.Extension(x509.KeyUsage.oid, True, _CA_KEY_USAGE),
        ],
    ).sign(signer, hashes.SHA256())


def _outside_chain(levels: int, days: int = 3650) -> tuple[list[x509.Certificate], list]:
    """Root first; each certificate signed by the one before."""
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(levels)]
    names = [
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Outside {n}")]) for n in range(levels)
    ]
    chain = [
        _certify(names[n], keys[n].public_key(), names[max(n - 1, 0)], keys[max(n - 1, 0)], days)
        for n in range(levels)
    ]
    return chain, keys


def _pem_of(*certificates: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def _import_below(
    core: Core, chain: list[x509.Certificate], keys: list, days: int = 100
) -> tuple[str, x509.Certificate]:
    ca_id = _pending_sub(core)
    csr = x509.load_pem_x509_csr(core.authorities.csr_pem(ca_id).encode())
    ours = _certify(csr.subject, csr.public_key(), chain[-1].subject, keys[len(chain) - 1], days)
    core.authorities.import_certificate(ca_id, _pem_of(ours), _pem_of(*reversed(chain)), ACTOR)
    return ca_id, ours


def test_import_refuses_a_chain_deeper_than_five_levels(core: Core) -> None:
    """Found in review: a six-certificate chain put the CA at level 7, and it then certified
    a CA at level 8."""
    chain, keys = _outside_chain(5)
    with pytest.raises(InvalidCertificateError, match="at most 5 levels"):
        _import_below(core, chain, keys)
    pending = [v for v in core.authorities.list_cas() if v.status == CAStatus.PENDING_CERTIFICATE]
    assert len(pending) == 1
    # One level less is accepted, and that CA at level 5 certifies no CA below it.
    ca_id, _ = _import_below(core, chain[:4], keys)
    with pytest.raises(PolicyViolationError, match="at most 5 levels"):
        core.issue(
            IssuanceRequest(
                ca_id,
                make_csr("Level Six"),
                Validity.parse("30d"),
                Requester("t"),
                template="SubordinateCACertificate_PathLen0/V1",
            )
        )


def test_nothing_issued_outlives_a_ca_above_the_issuer(core: Core) -> None:
    """Found in review: an imported CA certificate valid past its root's end issued
    leaves outliving the root."""
    chain, keys = _outside_chain(1, days=10)
    ca_id, ours = _import_below(core, chain, keys, days=3000)
    assert ours.not_valid_after_utc > chain[0].not_valid_after_utc
    with pytest.raises(BadRequestError):
        _issue(core, ca_id, "365d")
    leaf = _issue(core, ca_id, "5d")
    assert leaf.not_valid_after_utc <= chain[0].not_valid_after_utc


def test_validity_out_of_range_is_a_typed_error() -> None:
    """Found in review: 9000y raised ValueError (year out of range) from deep inside."""
    now = datetime.now(UTC)
    assert Validity.parse("100y").not_after(now).year == now.year + 100
    for text in ("101y", "1201m", "36601d", "9000y"):
        with pytest.raises(InvalidValidityError, match="at most 100 years"):
            Validity.parse(text)
    with pytest.raises(InvalidValidityError, match="out of range"):
        Validity.parse(f"ABSOLUTE:{10**15}").not_after(now)


def test_refused_creations_store_nothing(core: Core, root, issuing) -> None:
    """Found in review: a ROOT whose notAfter was in the past was created (EXPIRED), and
    refusals of a CA below a parent left a FAILED CA with a sealed key behind."""

    def count() -> int:
        return len(core.authorities.list_cas())

    before = count()
    with pytest.raises(InvalidValidityError, match="end before it begins"):
        core.authorities.create(
            CASpec(
                CAType.ROOT,
                parse_dn("CN=Past Root"),
                validity=Validity.parse("END_DATE:20200101000000"),
            ),
            ACTOR,
        )
    with pytest.raises(PolicyViolationError, match="path length"):
        create_sub(core, issuing, "Too Deep", path_length=1)  # below a pathLen 0 CA
    root_certificate = core.authorities.get(root.record.id).certificate_der
    assert root_certificate is not None
    parent_ends = x509.load_der_x509_certificate(root_certificate).not_valid_after_utc
    with pytest.raises(InvalidValidityError, match="outlive its parent"):
        create_sub(
            core,
            root,
            "Too Long",
            path_length=0,
            validity=Validity(ValidityType.ABSOLUTE, int(parent_ends.timestamp()) + 86400),
        )
    assert count() == before
    failures = [e for e in core.audit.events() if e.action == "ca.create"][-3:]
    assert [e.result for e in failures] == ["failure"] * 3


@pytest.mark.parametrize(
    ("tags", "token"),
    [({"k" * 129: "v"}, None), ({"k": "v" * 257}, None), ({"": "v"}, None), ({}, "t" * 129)],
    ids=["long key", "long value", "empty key", "long token"],
)
def test_creation_bounds_tags_and_tokens_as_tagging_does(
    core: Core, tags: dict[str, str], token: str | None
) -> None:
    """Found in review: `ca tag` bounded tags, `ca create --tag` did not."""
    with pytest.raises(BadRequestError, match="characters"):
        core.authorities.create(
            CASpec(CAType.ROOT, parse_dn("CN=Tagged"), tags=tags), ACTOR, idempotency_token=token
        )
    assert core.authorities.list_cas() == []


def test_a_creation_interrupted_by_a_killed_process_is_settled_as_failed(
    core: Core, clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: `kill -9` during `ca create` left the CA CREATING for ever, with no
    audit event at all."""

    def killed(*_args: object) -> bytes:
        raise KeyboardInterrupt  # what the process gets no chance to clean up after

    monkeypatch.setattr(core.authorities._keys, "generate", killed)
    with pytest.raises(KeyboardInterrupt):
        core.authorities.create(CASpec(CAType.ROOT, parse_dn("CN=Interrupted")), ACTOR)
    monkeypatch.undo()
    (stuck,) = core.authorities.list_cas()
    assert stuck.status == CAStatus.CREATING
    assert core.authorities.settle_interrupted_creations(ACTOR) == []  # may still be running
    clock.advance(timedelta(minutes=11))
    assert core.authorities.settle_interrupted_creations(ACTOR) == [stuck.record.id]
    settled = core.authorities.describe(stuck.record.id)
    assert settled.status == CAStatus.FAILED and "interrupted" in (
        settled.record.failure_reason or ""
    )
    event = _last_event(core)
    assert (event.action, event.result, event.resource) == (
        "ca.create",
        "failure",
        f"ca/{stuck.record.id}",
    )
    assert core.audit.verify().ok


def test_root_has_no_csr_and_pending_ca_has_no_certificate(core: Core, root) -> None:
    with pytest.raises(InvalidStateError):
        core.authorities.csr_pem(root.record.id)
    pending = _pending_sub(core)
    with pytest.raises(InvalidStateError):
        core.authorities.certificate_pem(pending)
    with pytest.raises(CANotActiveError):
        _issue(core, pending)
