"""issue(IssuanceRequest): templates, passthrough precedence, validity, serials, policy."""

from __future__ import annotations

import base64
import ipaddress
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID, ObjectIdentifier
from helpers import ACTOR, create_root, create_sub, make_csr, make_key

from pkigate.core import (
    CASettings,
    CASpec,
    CAType,
    Core,
    IssuanceRequest,
    Requester,
    Validity,
    ValidityType,
)
from pkigate.core.errors import IdempotencyConflictError, InvalidValidityError, PolicyViolationError
from pkigate.core.names import NamePolicy, decode_upn, parse_dn
from pkigate.core.passthrough import ApiPassthrough, parse_api_passthrough
from pkigate.core.templates import Template, TemplateKind

REQUESTER = Requester("tester", "test", {"evidence": "unit"})


def issue(
    core: Core, ca_id: str, csr: bytes | None = None, validity: str = "30d", **kwargs: object
) -> x509.Certificate:
    return core.issue(
        IssuanceRequest(
            ca_id,
            csr or make_csr(),
            Validity.parse(validity),  # type: ignore[arg-type]
            REQUESTER,
            **kwargs,
        )
    ).certificate


def ext(cert: x509.Certificate, cls: type) -> x509.Extension:  # type: ignore[type-arg]
    return cert.extensions.get_extension_for_class(cls)


def test_default_template_is_a_tls_certificate_with_ski_aki_and_csr_names(
    core: Core, issuing
) -> None:
    cert = issue(core, issuing.record.id, make_csr("www.example.test"))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "www.example.test"
    assert ext(cert, x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName) == [
        "www.example.test"
    ]
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ca_cert = x509.load_der_x509_certificate(issuing.record.certificate_der)
    ca_ski = ext(ca_cert, x509.SubjectKeyIdentifier).value.digest
    assert ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == ca_ski
    assert ext(cert, x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier.from_public_key(
        cert.public_key()
    )


def test_ec_subject_key_gets_no_key_encipherment_but_rsa_does(core: Core, issuing) -> None:
    ec_cert = issue(core, issuing.record.id, make_csr(key=make_key("ec")))
    rsa_cert = issue(core, issuing.record.id, make_csr(key=make_key("rsa")))
    assert not ext(ec_cert, x509.KeyUsage).value.key_encipherment
    assert ext(rsa_cert, x509.KeyUsage).value.key_encipherment


def test_ed25519_csr_is_accepted(core: Core, issuing) -> None:
    cert = issue(core, issuing.record.id, make_csr(key=ed25519.Ed25519PrivateKey.generate()))
    assert isinstance(cert.public_key(), ed25519.Ed25519PublicKey)


def test_client_auth_template_has_only_client_auth(core: Core, issuing) -> None:
    cert = issue(core, issuing.record.id, template="EndEntityClientAuthCertificate/V1")
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    ku = ext(cert, x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_encipherment


def test_csr_passthrough_copies_csr_extensions_but_the_template_wins(core: Core, issuing) -> None:
    oid = ObjectIdentifier("1.3.6.1.4.1.55555.1")
    csr = make_csr(
        extensions=[
            (x509.UnrecognizedExtension(oid, b"\x0c\x03abc"), False),
            (x509.KeyUsage(True, True, True, True, True, True, True, False, False), True),
            (x509.BasicConstraints(ca=True, path_length=None), True),
        ]
    )
    plain = issue(core, issuing.record.id, csr)
    with pytest.raises(x509.ExtensionNotFound):
        plain.extensions.get_extension_for_oid(oid)
    passed = issue(core, issuing.record.id, csr, template="EndEntityCertificate_CSRPassthrough/V1")
    assert passed.extensions.get_extension_for_oid(oid).value.value == b"\x0c\x03abc"
    ku = ext(passed, x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign  # template's key usage, not the CSR's
    assert not ext(passed, x509.BasicConstraints).value.ca


def test_csr_passthrough_never_copies_a_windows_sid_extension(core: Core, issuing) -> None:
    """A certificate carrying 1.3.6.1.4.1.311.25.2 maps to the account that SID names in
    Windows (strong mapping): a requester must not choose it through its CSR."""
    sid = x509.UnrecognizedExtension(ObjectIdentifier("1.3.6.1.4.1.311.25.2"), b"\x30\x00")
    csr = make_csr(extensions=[(sid, False)])
    with core.store.read() as conn:
        before = core.store.count_certificates(conn, issuing.record.id)
    with pytest.raises(PolicyViolationError, match="security identifier"):
        issue(core, issuing.record.id, csr, template="EndEntityCertificate_CSRPassthrough/V1")
    with core.store.read() as conn:
        assert core.store.count_certificates(conn, issuing.record.id) == before
    refusals = [e for e in core.audit.events() if e.result == "failure"]
    assert "security identifier" in str(refusals[-1].parameters)


def test_api_passthrough_supplies_subject_names_and_extensions(core: Core, issuing) -> None:
    api = parse_api_passthrough(
        {
            "subject": [
                {"oid": "2.5.4.3", "value": "api-name"},
                {"oid": "1.3.6.1.4.1.55555.7", "value": "custom"},
            ],
            "sans": [
                {"dns": "api.example.test"},
                {"ip": "192.0.2.7"},
                {"email": "a@example.test"},
                {"uri": "https://example.test/x"},
                {"directory_name": "CN=dir,O=x"},
                {"upn": "alice@corp.example"},
            ],
            "extended_key_usage": ["codeSigning"],
            "certificate_policies": [
                {"oid": "1.3.6.1.4.1.55555.9", "cps_uri": "https://example.test/cps"}
            ],
            "custom_extensions": [
                {
                    "oid": "1.3.6.1.4.1.55555.2",
                    "value": base64.b64encode(b"\x05\x00").decode(),
                    "critical": True,
                }
            ],
        }
    )
    cert = issue(
        core,
        issuing.record.id,
        make_csr("csr-name"),
        template="EndEntityCertificate_APIPassthrough/V1",
        api_passthrough=api,
    )
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "api-name"
    assert (
        cert.subject.get_attributes_for_oid(ObjectIdentifier("1.3.6.1.4.1.55555.7"))[0].value
        == "custom"
    )
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["api.example.test"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.7")]
    assert san.get_values_for_type(x509.RFC822Name) == ["a@example.test"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["https://example.test/x"]
    assert decode_upn(san.get_values_for_type(x509.OtherName)[0].value) == "alice@corp.example"
    # The template defines EKU, so the API's codeSigning loses (template > API > CSR).
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    policies = ext(cert, x509.CertificatePolicies).value
    assert policies[0].policy_identifier.dotted_string == "1.3.6.1.4.1.55555.9"
    custom = cert.extensions.get_extension_for_oid(ObjectIdentifier("1.3.6.1.4.1.55555.2"))
    assert custom.critical and custom.value.value == b"\x05\x00"


def test_blank_template_takes_key_usage_and_eku_from_the_api(core: Core, issuing) -> None:
    api = parse_api_passthrough(
        {"key_usage": ["digitalSignature"], "extended_key_usage": ["emailProtection", "1.2.3.4.5"]}
    )
    cert = issue(
        core,
        issuing.record.id,
        template="BlankEndEntityCertificate_APIPassthrough/V1",
        api_passthrough=api,
    )
    assert [o.dotted_string for o in ext(cert, x509.ExtendedKeyUsage).value] == [
        ExtendedKeyUsageOID.EMAIL_PROTECTION.dotted_string,
        "1.2.3.4.5",
    ]
    assert not ext(cert, x509.BasicConstraints).critical


def test_api_passthrough_is_refused_for_a_template_without_it(core: Core, issuing) -> None:
    with pytest.raises(PolicyViolationError, match="does not accept API passthrough"):
        issue(core, issuing.record.id, api_passthrough=parse_api_passthrough({"subject": "CN=x"}))


def test_api_cannot_set_ca_controlled_extensions_or_ca_key_usage(core: Core, issuing) -> None:
    bc = base64.b64encode(x509.BasicConstraints(ca=True, path_length=None).public_bytes()).decode()
    api = parse_api_passthrough({"custom_extensions": [{"oid": "2.5.29.19", "value": bc}]})
    with pytest.raises(PolicyViolationError, match="set by the CA"):
        issue(
            core,
            issuing.record.id,
            template="BlankEndEntityCertificate_APIPassthrough/V1",
            api_passthrough=api,
        )
    api = parse_api_passthrough({"key_usage": ["keyCertSign"]})
    with pytest.raises(PolicyViolationError, match="only for CA certificates"):
        issue(
            core,
            issuing.record.id,
            template="BlankEndEntityCertificate_APIPassthrough/V1",
            api_passthrough=api,
        )


def test_empty_subject_needs_a_san_which_is_then_critical(core: Core, issuing) -> None:
    cert = issue(core, issuing.record.id, make_csr(None, [x509.DNSName("only-san.test")]))
    assert len(cert.subject) == 0
    assert ext(cert, x509.SubjectAlternativeName).critical
    with pytest.raises(PolicyViolationError, match="subject or a subject alternative name"):
        issue(core, issuing.record.id, make_csr(None, []))


@pytest.mark.parametrize(
    ("text", "delta"), [("DAYS:10", timedelta(days=10)), ("MONTHS:1", None), ("YEARS:1", None)]
)
def test_relative_validity_types(core: Core, issuing, text: str, delta) -> None:
    start = datetime.now(UTC)
    cert = issue(core, issuing.record.id, validity=text)
    lifetime = cert.not_valid_after_utc - start
    expected = {
        "DAYS:10": timedelta(days=10),
        "MONTHS:1": timedelta(days=30.5),
        "YEARS:1": timedelta(days=365.5),
    }[text]
    assert abs(lifetime - expected) < timedelta(days=1.6)


def test_end_date_and_absolute_validity_name_not_after(core: Core, issuing) -> None:
    target = (datetime.now(UTC) + timedelta(days=20)).replace(microsecond=0)
    cert = issue(core, issuing.record.id, validity=f"END_DATE:{target:%Y%m%d%H%M%S}")
    assert cert.not_valid_after_utc == target
    cert = issue(core, issuing.record.id, validity=f"ABSOLUTE:{int(target.timestamp())}")
    assert cert.not_valid_after_utc == target


def test_validity_beyond_the_ca_is_refused_unless_truncation_is_configured(core: Core) -> None:
    root = create_root(core, validity=Validity(ValidityType.YEARS, 2))
    with pytest.raises(InvalidValidityError, match="beyond the CA's notAfter"):
        issue(core, root.record.id, validity="3y")
    truncating = create_root(
        core,
        cn="Truncating",
        validity=Validity(ValidityType.YEARS, 2),
        settings=CASettings(truncate_validity=True),
    )
    cert = issue(core, truncating.record.id, validity="3y")
    assert cert.not_valid_after_utc == truncating.record.not_after


def test_not_before_is_backdated_by_the_configured_amount(core: Core) -> None:
    root = create_root(core, settings=CASettings(backdate_seconds=3600))
    before = datetime.now(UTC)
    cert = issue(core, root.record.id)
    backdate = before - cert.not_valid_before_utc
    # Never earlier than the CA itself, which was backdated by the same hour.
    assert timedelta(minutes=59) < backdate < timedelta(minutes=61)


def test_serials_are_random_positive_and_at_most_20_octets(core: Core, issuing) -> None:
    serials = [issue(core, issuing.record.id).serial_number for _ in range(40)]
    assert len(set(serials)) == 40
    assert all(0 < s < 2**159 for s in serials)
    # At least 64 bits of entropy: with 159 random bits, 40 serials below 2^96 would be absurd.
    assert max(s.bit_length() for s in serials) > 128
    assert sum(bin(s).count("1") for s in serials) / 40 > 64


def test_issue_idempotency_token_returns_the_same_certificate(core: Core, issuing) -> None:
    csr = make_csr()
    first = issue(core, issuing.record.id, csr, idempotency_token="abc")
    again = issue(core, issuing.record.id, csr, idempotency_token="abc")
    assert first.serial_number == again.serial_number
    with pytest.raises(IdempotencyConflictError):
        issue(core, issuing.record.id, make_csr(), idempotency_token="abc")
    with core.store.read() as conn:
        assert core.store.count_certificates(conn, issuing.record.id) == 1


def test_cdp_and_aia_urls_are_added_when_the_ca_has_them(core: Core, root) -> None:
    settings = CASettings(
        crl_url="http://pki.example.test/crl/1.crl",
        ocsp_url="http://pki.example.test/ocsp",
        ca_issuers_url="http://pki.example.test/ca/1.cer",
    )
    ca = create_sub(core, root, path_length=0, settings=settings)
    cert = issue(core, ca.record.id)
    cdp = ext(cert, x509.CRLDistributionPoints).value
    assert cdp[0].full_name[0].value == "http://pki.example.test/crl/1.crl"
    aia = {
        d.access_method._name: d.access_location.value
        for d in ext(cert, x509.AuthorityInformationAccess).value
    }
    assert aia == {
        "OCSP": "http://pki.example.test/ocsp",
        "caIssuers": "http://pki.example.test/ca/1.cer",
    }
    plain = issue(core, root.record.id)
    with pytest.raises(x509.ExtensionNotFound):
        plain.extensions.get_extension_for_oid(ExtensionOID.CRL_DISTRIBUTION_POINTS)


def test_ca_name_constraints_are_enforced(core: Core, root) -> None:
    policy = NamePolicy(
        permitted_dns=("corp.example",),
        excluded_dns=("secret.corp.example",),
        permitted_ip=(ipaddress.ip_network("10.0.0.0/8"),),
    )
    ca = create_sub(core, root, path_length=0, settings=CASettings(name_constraints=policy))
    issue(core, ca.record.id, make_csr("host.corp.example"))
    issue(
        core,
        ca.record.id,
        make_csr(
            "vpn.corp.example",
            [x509.DNSName("vpn.corp.example"), x509.IPAddress(ipaddress.ip_address("10.1.2.3"))],
        ),
    )
    for csr in (
        make_csr("host.other.example"),
        make_csr("x.secret.corp.example"),
        make_csr("ip.corp.example", [x509.IPAddress(ipaddress.ip_address("192.0.2.1"))]),
    ):
        with pytest.raises(PolicyViolationError, match="not allowed by the CA's name constraints"):
            issue(core, ca.record.id, csr)


def test_a_constrained_ca_writes_its_name_constraints_into_the_cas_it_issues(
    core: Core, root
) -> None:
    """Found in review: a CA below a CA with configured constraints carried none, and
    certified any name (here, and everywhere once run elsewhere)."""
    policy = NamePolicy(
        permitted_dns=("corp.example",), excluded_ip=(ipaddress.ip_network("10.0.0.0/8"),)
    )
    constrained = create_sub(
        core, root, "Constrained CA", path_length=1, settings=CASettings(name_constraints=policy)
    )
    below = create_sub(core, constrained, "Below CA", path_length=0)
    assert below.record.certificate_der is not None
    below_certificate = x509.load_der_x509_certificate(below.record.certificate_der)
    extension = below_certificate.extensions.get_extension_for_class(x509.NameConstraints)
    assert extension.critical
    assert extension.value.permitted_subtrees == [x509.DNSName("corp.example")]
    assert extension.value.excluded_subtrees == [x509.IPAddress(ipaddress.ip_network("10.0.0.0/8"))]
    issue(core, below.record.id, make_csr("host.corp.example"))
    with pytest.raises(PolicyViolationError, match="name constraints of this CA"):
        issue(core, below.record.id, make_csr("host.elsewhere.example"))
    # Leaf certificates carry no nameConstraints (RFC 5280: CA certificates only).
    leaf = issue(core, constrained.record.id, make_csr("www.corp.example"))
    with pytest.raises(x509.ExtensionNotFound):
        leaf.extensions.get_extension_for_class(x509.NameConstraints)


def test_a_constrained_ca_refuses_a_ca_request_bringing_its_own_name_constraints(
    core: Core, root
) -> None:
    constrained = create_sub(
        core,
        root,
        "Constrained CA",
        path_length=1,
        settings=CASettings(name_constraints=NamePolicy(permitted_dns=("corp.example",))),
    )
    wider = x509.NameConstraints(
        permitted_subtrees=[x509.DNSName("example")], excluded_subtrees=None
    )
    api = _constraints_passthrough(wider)
    pending = core.authorities.create(CASpec(CAType.SUBORDINATE, parse_dn("CN=Wide CA")), ACTOR)
    with core.store.read() as conn:
        before = core.store.count_certificates(conn, constrained.record.id)
    with pytest.raises(PolicyViolationError, match="cannot bring nameConstraints"):
        core.issue(
            IssuanceRequest(
                constrained.record.id,
                core.authorities.csr_pem(pending.record.id).encode(),
                Validity.parse("1y"),
                REQUESTER,
                template="BlankSubordinateCACertificate_PathLen0_APIPassthrough/V1",
                api_passthrough=api,
            )
        )
    with core.store.read() as conn:
        assert core.store.count_certificates(conn, constrained.record.id) == before


def _constraints_passthrough(constraints: x509.NameConstraints) -> ApiPassthrough:
    """API passthrough carrying ``constraints`` as a critical custom extension."""
    return parse_api_passthrough(
        {
            "custom_extensions": [
                {
                    "oid": "2.5.29.30",
                    "critical": True,
                    "value": base64.b64encode(constraints.public_bytes()).decode(),
                }
            ]
        }
    )


def _ca_under_constraints(core: Core, root, constraints: x509.NameConstraints) -> str:
    api = _constraints_passthrough(constraints)
    pending = core.authorities.create(
        CASpec(CAType.SUBORDINATE, parse_dn("O=Good,CN=Constrained CA")), ACTOR
    )
    issued = core.issue(
        IssuanceRequest(
            root.record.id,
            core.authorities.csr_pem(pending.record.id).encode(),
            Validity.parse("1y"),
            REQUESTER,
            template="BlankSubordinateCACertificate_PathLen0_APIPassthrough/V1",
            api_passthrough=api,
        )
    )
    core.authorities.import_certificate(
        pending.record.id, issued.pem().encode(), issued.chain_pem().encode(), ACTOR
    )
    return pending.record.id


def test_uri_directory_name_and_unjudged_constraints_of_the_ca_certificate_bind(
    core: Core, root, tmp_path: Path
) -> None:
    """Found in review: URI and directoryName subtrees were dropped, so the CA signed
    names that `openssl verify` then refused as a permitted subtree violation."""
    ca_id = _ca_under_constraints(
        core,
        root,
        x509.NameConstraints(
            permitted_subtrees=[
                x509.UniformResourceIdentifier(".good.example"),
                x509.DirectoryName(parse_dn("O=Good")),
                x509.DNSName("good.example"),
            ],
            excluded_subtrees=[x509.RegisteredID(x509.ObjectIdentifier("1.2.3.4"))],
        ),
    )

    def with_names(subject: str, sans: list[dict[str, object]]) -> x509.Certificate:
        return issue(
            core,
            ca_id,
            make_csr(None, []),
            template="EndEntityCertificate_APIPassthrough/V1",
            api_passthrough=parse_api_passthrough({"subject": subject, "sans": sans}),
        )

    ok = with_names(
        "CN=www.good.example,O=Good",
        [{"dns": "www.good.example"}, {"uri": "https://a.good.example/x"}],
    )
    assert ok.subject == parse_dn("CN=www.good.example,O=Good")
    # openssl, which refused what the CA signed before, accepts what it signs now.
    ca_pem, _ = core.authorities.certificate_pem(ca_id)
    (tmp_path / "root.pem").write_text(core.authorities.certificate_pem(root.record.id)[0])
    (tmp_path / "ca.pem").write_text(ca_pem)
    (tmp_path / "leaf.pem").write_bytes(ok.public_bytes(serialization.Encoding.PEM))
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", "root.pem", "-untrusted", "ca.pem", "leaf.pem"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert verified.stdout.strip() == "leaf.pem: OK", verified.stderr
    for subject, sans, what in (
        ("CN=www.good.example,O=Evil", [{"dns": "www.good.example"}], "directory name"),
        ("CN=x,O=Good", [{"uri": "https://evil.test/"}], "URI"),
        ("CN=x,O=Good", [{"uri": "https://good.example/"}], "URI"),  # ".x": below only
        ("CN=x,O=Good", [{"directory_name": "CN=x,O=Evil"}], "directory name"),
        ("CN=x,O=Good", [{"registered_id": "1.2.3.4"}], "RegisteredID"),
    ):
        with pytest.raises(PolicyViolationError, match=what):
            with_names(subject, sans)


@pytest.mark.parametrize(
    "name",
    [
        x509.DNSName("*.internal.example"),  # covers every host of the excluded subtree
        x509.DNSName("*.ok.example"),  # covers the excluded host vpn.ok.example
        x509.DNSName("x*.ok.example"),  # a partial wildcard, matched as one by some clients
        x509.IPAddress(ipaddress.ip_address("::ffff:10.1.2.3")),  # 10.1.2.3 to most stacks
        x509.RFC822Name('"ceo"@corp.example'),  # ceo@corp.example
    ],
    ids=str,
)
def test_name_constraints_are_not_bypassed_by_other_spellings(
    name: x509.GeneralName,
) -> None:
    """Found in review: each of these names passed the policy that refuses what it means."""
    policy = NamePolicy(
        excluded_dns=(".internal.example", "vpn.ok.example"),
        excluded_ip=(ipaddress.ip_network("10.0.0.0/8"),),
        excluded_email=("ceo@corp.example",),
        source="the test policy",
    )
    with pytest.raises(PolicyViolationError):
        policy.check(x509.Name([]), [name])
    # What the policy allows stays allowed.
    policy.check(
        x509.Name([]),
        [
            x509.DNSName("*.fine.example"),
            x509.DNSName("www.ok.example"),
            x509.IPAddress(ipaddress.ip_address("::ffff:192.0.2.1")),
            x509.RFC822Name("cfo@corp.example"),
        ],
    )


def test_name_constraints_in_the_ca_certificate_are_honoured(core: Core, root) -> None:
    constraints = x509.NameConstraints(
        permitted_subtrees=[x509.DNSName("only.example")], excluded_subtrees=None
    )
    ca_id = _ca_under_constraints(core, root, constraints)
    der = core.authorities.get(ca_id).certificate_der
    assert der is not None
    certificate = x509.load_der_x509_certificate(der)
    assert certificate.extensions.get_extension_for_oid(ExtensionOID.NAME_CONSTRAINTS).critical
    issue(core, ca_id, make_csr("www.only.example"))
    with pytest.raises(PolicyViolationError, match="name constraints of this CA"):
        issue(core, ca_id, make_csr("www.elsewhere.example"))


def test_template_allowed_names_restrict_what_a_connector_template_issues(
    core: Core, issuing
) -> None:
    core.templates.register(
        Template(
            "DeviceCertificate/V1",
            TemplateKind.END_ENTITY,
            key_usage=frozenset({"digitalSignature"}),
            extended_key_usage=(ExtendedKeyUsageOID.CLIENT_AUTH,),
            allowed_names=NamePolicy(
                permitted_dns=("devices.example",),
                allow_wildcards=False,
                source="template DeviceCertificate/V1",
            ),
        )
    )
    issue(
        core, issuing.record.id, make_csr("phone1.devices.example"), template="DeviceCertificate/V1"
    )
    with pytest.raises(PolicyViolationError, match="template DeviceCertificate/V1"):
        issue(
            core, issuing.record.id, make_csr("*.devices.example"), template="DeviceCertificate/V1"
        )


def test_issued_certificate_is_stored_with_its_fields_and_audited(core: Core, issuing) -> None:
    cert = issue(core, issuing.record.id, make_csr("stored.example.test"), correlation_id="order-7")
    with core.store.read() as conn:
        record = core.store.get_certificate(
            conn, issuing.record.id, format(cert.serial_number, "x")
        )
    assert record is not None
    assert (
        record.subject,
        list(record.sans),
        record.template,
        record.requester,
        record.connector,
        record.status,
        record.correlation_id,
    ) == (
        "CN=stored.example.test",
        ["DNS:stored.example.test"],
        "EndEntityCertificate/V1",
        "tester",
        "test",
        "ISSUED",
        "order-7",
    )
    assert record.not_after == cert.not_valid_after_utc
    assert x509.load_der_x509_certificate(record.der) == cert
    event = core.audit.events()[-1]
    assert (event.action, event.result, event.actor, event.connector) == (
        "certificate.issue",
        "success",
        "tester",
        "test",
    )
    assert format(cert.serial_number, "x") in event.parameters
    assert issuing.record.key_id in event.parameters  # which CA key was used


def test_certificates_are_searchable_by_ca_status_and_expiry(core: Core, issuing, root) -> None:
    soon = issue(core, issuing.record.id, validity="5d")
    issue(core, issuing.record.id, validity="90d")
    issue(core, root.record.id, validity="5d")
    now = datetime.now(UTC)
    with core.store.read() as conn:
        expiring = core.store.list_certificates(
            conn, ca_id=issuing.record.id, expiring_before=now + timedelta(days=30)
        )
        issued = core.store.list_certificates(conn, ca_id=issuing.record.id, status="ISSUED")
        revoked = core.store.list_certificates(conn, status="REVOKED")
    assert [r.serial for r in expiring] == [format(soon.serial_number, "x")]
    assert len(issued) == 2
    assert revoked == []
