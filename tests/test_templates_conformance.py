"""Every catalogue template issues RFC 5280-clean certificates whose chains validate.

Three independent judges look at what the core issues:

- pkilint's RFC 5280 certificate linter (the validator set of its ``lint_pkix_cert``
  command) and its issuer/subject pair checks (``lint_pkix_signer_signee_cert_chain``:
  issuer name, AKI/SKI match, policy chain, signature);
- ``openssl verify -x509_strict`` with the root as the only trust anchor, and the TLS
  purposes where a template's extended key usage claims them;
- pyhanko-certvalidator's RFC 5280 path validation, plus its key usage check.

pyhanko-certvalidator imports oscrypto only to read the operating system's trust list
(``registry._system_trust_roots``), and oscrypto cannot load OpenSSL >= 3.0.10. Passing
``trust_roots`` explicitly keeps that import from ever happening; signatures are checked
with ``cryptography``.

Root templates only self-sign and are refused by ``issue()``; a subordinate CA template
whose path length the issuing CA cannot certify is refused too. Those subordinate
templates are still linted and validated, issued by the root, whose path length is not
limited.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from pathlib import Path

import pytest
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID, ObjectIdentifier
from helpers import key_usage
from pkilint import document, loader, validation
from pkilint.bin import lint_pkix_signer_signee_cert_chain as pkilint_chain
from pkilint.pkix import certificate as pkilint_certificate
from pkilint.pkix import extension as pkilint_extension
from pkilint.pkix import name as pkilint_name
from pyhanko_certvalidator import CertificateValidator, ValidationContext
from pyhanko_certvalidator.errors import (
    InvalidCertificateError as PyhankoInvalidCertificateError,
)
from pyhanko_certvalidator.errors import PathBuildingError

from pkigate.core import (
    Actor,
    CASpec,
    CAType,
    Core,
    IssuanceRequest,
    IssuedCertificate,
    KeyAlgorithm,
    Requester,
    Validity,
)
from pkigate.core.errors import PolicyViolationError
from pkigate.core.passthrough import ApiPassthrough, CustomExtension, PolicyInformation
from pkigate.core.service import utc_now
from pkigate.core.store import sqlite_url
from pkigate.core.templates import Template, TemplateCatalogue, TemplateKind

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="the openssl CLI is not installed")

# Path length of the issuing (subordinate) CA in each hierarchy: it may certify
# PathLen0 CAs and nothing deeper.
ISSUING_CA_PATH_LENGTH = 1
# Under IANA enterprise number 32473, reserved for documentation (RFC 5612). Not the X.660
# example arc 2.999: pkilint's DER decoder (pyasn1-fasder 0.1.3) refuses OIDs whose second
# arc under 2 is 40 or more, although their encoding is valid.
EXAMPLE_POLICY = ObjectIdentifier("1.3.6.1.4.1.32473.1.1")
EE_DNS_NAME = "device-1.pkigate.test"
API_DNS_NAME = "api-device.pkigate.test"

# RFC 5280 key usage names (as the core's templates spell them) -> asn1crypto's names.
_KU_ASN1_NAMES = {
    "digitalSignature": "digital_signature",
    "contentCommitment": "non_repudiation",
    "keyEncipherment": "key_encipherment",
    "dataEncipherment": "data_encipherment",
    "keyAgreement": "key_agreement",
    "keyCertSign": "key_cert_sign",
    "cRLSign": "crl_sign",
    "encipherOnly": "encipher_only",
    "decipherOnly": "decipher_only",
}
# What openssl verify -purpose checks for each extended key usage it knows (OpenSSL 3.0
# has no code-signing purpose; pyhanko checks that one).
_OPENSSL_PURPOSES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "sslserver",
    ExtendedKeyUsageOID.CLIENT_AUTH: "sslclient",
}


def _name(common_name: str, organization: str = "pkigate conformance tests") -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


# -- what each template is asked for and should yield ------------------------------------


def api_passthrough_for(template: Template) -> ApiPassthrough | None:
    """What an authorizer would sensibly supply: names, and the usages a Blank lacks."""
    if not template.api_passthrough:
        return None
    if template.is_ca:
        return ApiPassthrough(subject=_name("API Subordinate CA"))
    return ApiPassthrough(
        subject=_name(API_DNS_NAME),
        sans=(x509.DNSName(API_DNS_NAME),),
        key_usage=frozenset({"digitalSignature"}) if template.key_usage is None else None,
        extended_key_usage=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
        if template.extended_key_usage is None
        else None,
        certificate_policies=(PolicyInformation(EXAMPLE_POLICY),),
    )


def expectedkey_usage(template: Template, subject_key: object) -> frozenset[str]:
    """The template's key usage, or the passthrough's for a Blank template.

    RFC 8813: an EC subject key cannot serve keyEncipherment, so end-entity templates drop it.
    """
    api = api_passthrough_for(template)
    usages = (
        template.key_usage
        if template.key_usage is not None
        else (api.key_usage if api is not None else None)
    )
    assert usages is not None, f"{template.name}: no key usage from template or passthrough"
    if not template.is_ca and isinstance(subject_key, ec.EllipticCurvePrivateKey):
        usages = usages - {"keyEncipherment", "dataEncipherment"}
    return usages


def expected_eku(template: Template) -> tuple[ObjectIdentifier, ...]:
    if template.extended_key_usage is not None:
        return template.extended_key_usage
    api = api_passthrough_for(template)
    return api.extended_key_usage if api is not None and api.extended_key_usage else ()


def csr_for(template: Template, key: CertificateIssuerPrivateKeyTypes) -> bytes:
    """A CSR as a real requester would send: a DNS SAN for end entities, a subject for CAs."""
    builder = x509.CertificateSigningRequestBuilder()
    if template.is_ca:
        builder = builder.subject_name(_name("Requested Subordinate CA"))
    else:
        builder = builder.subject_name(_name(EE_DNS_NAME)).add_extension(
            x509.SubjectAlternativeName([x509.DNSName(EE_DNS_NAME)]), critical=False
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def can_issue_from_subordinate(template: Template) -> bool:
    return not (
        template.kind == TemplateKind.SUBORDINATE_CA
        and (template.path_length or 0) >= ISSUING_CA_PATH_LENGTH
    )


# -- hierarchies -------------------------------------------------------------------------


@dataclass(frozen=True)
class Hierarchy:
    """A root and a one-step subordinate (path length 1) that issues."""

    label: str
    core: Core
    root_id: str
    issuing_id: str
    subject_key: CertificateIssuerPrivateKeyTypes

    @property
    def root(self) -> x509.Certificate:
        return self.core.authorities.signing_material(self.root_id, utc_now()).certificate

    def issue(self, template: Template, from_root: bool = False) -> IssuedCertificate:
        return self.core.issue(
            IssuanceRequest(
                ca_id=self.root_id if from_root else self.issuing_id,
                csr=csr_for(template, self.subject_key),
                validity=Validity.parse("30d"),
                requester=Requester("conformance-test"),
                template=template.name,
                api_passthrough=api_passthrough_for(template),
            )
        )


def _build_hierarchy(
    core: Core,
    label: str,
    key_algorithm: KeyAlgorithm,
    subject_key: CertificateIssuerPrivateKeyTypes,
) -> Hierarchy:
    actor = Actor("conformance-test")
    root = core.authorities.create(
        CASpec(CAType.ROOT, _name(f"{label} Root CA"), key_algorithm=key_algorithm), actor
    )
    issuing = core.authorities.create(
        CASpec(
            CAType.SUBORDINATE,
            _name(f"{label} Issuing CA"),
            key_algorithm=key_algorithm,
            parent_ca_id=root.record.id,
            path_length=ISSUING_CA_PATH_LENGTH,
        ),
        actor,
    )
    return Hierarchy(label, core, root.record.id, issuing.record.id, subject_key)


@pytest.fixture(scope="module")
def conformance_core(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Core]:
    # One SQLite core for the module (not conftest's per-test `core`): issuing ~100
    # certificates once and judging each three ways keeps the module to a few seconds.
    data_dir = tmp_path_factory.mktemp("conformance-data")
    opened = Core.open(data_dir, database_url=sqlite_url(data_dir / "pkigate.db"))
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def ec_hierarchy(conformance_core: Core) -> Hierarchy:
    return _build_hierarchy(
        conformance_core, "EC", KeyAlgorithm.EC_prime256v1, ec.generate_private_key(ec.SECP256R1())
    )


@pytest.fixture(scope="module")
def rsa_hierarchy(conformance_core: Core) -> Hierarchy:
    return _build_hierarchy(
        conformance_core,
        "RSA",
        KeyAlgorithm.RSA_2048,
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
    )


@pytest.fixture(scope="module")
def issued(
    ec_hierarchy: Hierarchy,
    rsa_hierarchy: Hierarchy,
) -> Callable[[str, Template], IssuedCertificate]:
    """Issue each (hierarchy, template) once; the lint and the validators share it."""
    hierarchies = {h.label: h for h in (ec_hierarchy, rsa_hierarchy)}

    @cache
    def issue(label: str, template: Template) -> IssuedCertificate:
        return hierarchies[label].issue(
            template, from_root=not can_issue_from_subordinate(template)
        )

    return issue


# -- the judges --------------------------------------------------------------------------


@cache
def _pkilint_certificate_validator() -> validation.ValidatorContainer:
    # The same container pkilint's lint_pkix_cert command builds.
    return pkilint_certificate.create_pkix_certificate_validator_container(
        pkilint_certificate.create_decoding_validators(
            pkilint_name.ATTRIBUTE_TYPE_MAPPINGS, pkilint_extension.EXTENSION_MAPPINGS
        ),
        [
            pkilint_certificate.create_issuer_validator_container([]),
            pkilint_certificate.create_validity_validator_container(),
            pkilint_certificate.create_subject_validator_container([]),
            pkilint_certificate.create_extensions_validator_container([]),
            pkilint_certificate.create_spki_validator_container([]),
        ],
    )


def _findings(
    results: list[validation.ValidationResult],
) -> list[tuple[validation.ValidationFindingSeverity, str]]:
    return [
        (
            description.finding.severity,
            f"{description.finding.severity.name} {description.finding.code}"
            f"{': ' + description.message if description.message else ''} @ {result.node.path}",
        )
        for result in results
        for description in result.finding_descriptions
    ]


def pkilint_findings(
    certificate: x509.Certificate,
    issuer: x509.Certificate,
) -> list[tuple[validation.ValidationFindingSeverity, str]]:
    """All findings for the certificate alone and for it as signee of ``issuer``."""
    der = certificate.public_bytes(serialization.Encoding.DER)
    alone = loader.RFC5280CertificateDocumentLoader().load_der_document(der, "certificate")
    results = _pkilint_certificate_validator().validate(alone.root)

    # The pair checks look each other up by name ("issuer", "subject") in a shared
    # collection, as pkilint's lint_pkix_signer_signee_cert_chain command arranges them.
    documents: dict[str, document.Document] = {}
    pair_loader = loader.RFC5280CertificateDocumentLoader()
    issuer_doc = pair_loader.load_der_document(
        issuer.public_bytes(serialization.Encoding.DER), "issuer", "issuer", documents
    )
    subject_doc = pair_loader.load_der_document(der, "subject", "subject", documents)
    documents.update(issuer=issuer_doc, subject=subject_doc)
    decoding = pkilint_chain.create_decoder_validation_container()
    results += decoding.validate(issuer_doc.root) + decoding.validate(subject_doc.root)
    results += pkilint_chain.create_issuer_validation_container().validate(issuer_doc.root)
    results += pkilint_chain.create_subject_validation_container().validate(subject_doc.root)
    return _findings(results)


def pkilint_errors(certificate: x509.Certificate, issuer: x509.Certificate) -> list[str]:
    """Findings of severity ERROR or FATAL (FATAL sorts below ERROR in pkilint)."""
    return [
        text
        for severity, text in pkilint_findings(certificate, issuer)
        if severity <= validation.ValidationFindingSeverity.ERROR
    ]


def assert_pkilint_clean(certificate: x509.Certificate, issuer: x509.Certificate) -> None:
    errors = pkilint_errors(certificate, issuer)
    assert not errors, "pkilint RFC 5280 errors:\n  " + "\n  ".join(errors)


def _pem(certificates: list[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def openssl_verify(
    workdir: Path,
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    root: x509.Certificate,
    purpose: str | None = None,
) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    (workdir / "root.pem").write_bytes(_pem([root]))
    (workdir / "intermediates.pem").write_bytes(_pem(intermediates))
    (workdir / "leaf.pem").write_bytes(_pem([leaf]))
    command = [OPENSSL, "verify", "-x509_strict", "-CAfile", "root.pem"]
    if intermediates:
        command += ["-untrusted", "intermediates.pem"]
    if purpose:
        command += ["-purpose", purpose]
    return subprocess.run(
        [*command, "leaf.pem"], cwd=workdir, capture_output=True, text=True, timeout=30, check=False
    )


def assert_openssl_accepts(
    workdir: Path,
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    root: x509.Certificate,
    purpose: str | None = None,
) -> None:
    result = openssl_verify(workdir, leaf, intermediates, root, purpose)
    assert result.returncode == 0 and result.stdout.strip() == "leaf.pem: OK", (
        f"openssl verify (purpose {purpose}) rejected the chain:\n{result.stdout}{result.stderr}"
    )


def _der(certificates: list[x509.Certificate]) -> list[bytes]:
    return [c.public_bytes(serialization.Encoding.DER) for c in certificates]


def _asn1(certificate: x509.Certificate) -> asn1_x509.Certificate:
    return asn1_x509.Certificate.load(certificate.public_bytes(serialization.Encoding.DER))


def pyhanko_validate(
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    root: x509.Certificate,
    key_usage: set[str] | None = None,
    extended_key_usage: set[str] | None = None,
) -> list[bytes]:
    """Validate the path (no revocation data: soft-fail); returns it as DER, root first."""
    # trust_roots given explicitly: the OS trust list (and so oscrypto) is never touched.
    context = ValidationContext(trust_roots=[_asn1(root)], revocation_mode="soft-fail")
    validator = CertificateValidator(
        _asn1(leaf), [_asn1(c) for c in intermediates], validation_context=context
    )
    path = asyncio.run(
        validator.async_validate_usage(
            key_usage or set(),
            extended_key_usage or set(),
            extended_optional=not extended_key_usage,
        )
    )
    return [cert.dump() for cert in path]


# -- parametrization ---------------------------------------------------------------------

CATALOGUE = list(TemplateCatalogue())
ISSUABLE = [t for t in CATALOGUE if t.kind != TemplateKind.ROOT_CA]
ROOT_TEMPLATES = [t for t in CATALOGUE if t.kind == TemplateKind.ROOT_CA]
TOO_DEEP_FOR_ISSUING_CA = [t for t in ISSUABLE if not can_issue_from_subordinate(t)]
# The base templates (no passthrough variant) also run under an RSA-2048 hierarchy.
BASE = [t for t in ISSUABLE if not t.csr_passthrough and not t.api_passthrough]

CASES = [pytest.param("EC", t, id=f"EC-{t.name}") for t in ISSUABLE] + [
    pytest.param("RSA", t, id=f"RSA-{t.name}") for t in BASE
]


def _chain_parts(
    result: IssuedCertificate,
) -> tuple[list[x509.Certificate], x509.Certificate]:
    return list(result.chain[:-1]), result.chain[-1]


def test_conformance_cases_span_the_whole_catalogue() -> None:
    # Guards against a vacuous pass: an empty or renamed catalogue would parametrize nothing.
    assert {t.kind for t in ISSUABLE} == {TemplateKind.END_ENTITY, TemplateKind.SUBORDINATE_CA}
    assert len(ISSUABLE) + len(ROOT_TEMPLATES) == len(CATALOGUE) >= 60
    assert {t.name for t in BASE} >= {
        "EndEntityCertificate/V1",
        "EndEntityClientAuthCertificate/V1",
        "EndEntityServerAuthCertificate/V1",
        "CodeSigningCertificate/V1",
        "OCSPSigningCertificate/V1",
        "SubordinateCACertificate_PathLen0/V1",
    }


@pytest.mark.parametrize(("hierarchy", "template"), CASES)
def test_template_output_has_no_pkilint_rfc5280_errors(
    hierarchy: str, template: Template, issued: Callable[[str, Template], IssuedCertificate]
) -> None:
    result = issued(hierarchy, template)
    assert_pkilint_clean(result.certificate, result.chain[0])


@pytest.mark.parametrize(("hierarchy", "template"), CASES)
def test_template_output_carries_the_templates_basic_constraints_and_usages(
    hierarchy: str,
    template: Template,
    issued: Callable[[str, Template], IssuedCertificate],
    ec_hierarchy: Hierarchy,
    rsa_hierarchy: Hierarchy,
) -> None:
    subject_key = (ec_hierarchy if hierarchy == "EC" else rsa_hierarchy).subject_key
    certificate = issued(hierarchy, template).certificate
    extensions = certificate.extensions

    bc = extensions.get_extension_for_class(x509.BasicConstraints)
    assert (bc.value.ca, bc.value.path_length) == (template.is_ca, template.path_length)
    ku = extensions.get_extension_for_class(x509.KeyUsage).value
    asserted = {
        name
        for name, attr in (
            ("digitalSignature", "digital_signature"),
            ("contentCommitment", "content_commitment"),
            ("keyEncipherment", "key_encipherment"),
            ("dataEncipherment", "data_encipherment"),
            ("keyAgreement", "key_agreement"),
            ("keyCertSign", "key_cert_sign"),
            ("cRLSign", "crl_sign"),
        )
        if getattr(ku, attr)
    }
    assert asserted == expectedkey_usage(template, subject_key)
    try:
        eku = tuple(extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        eku = ()
    assert eku == expected_eku(template)


@pytest.mark.parametrize(("hierarchy", "template"), CASES)
def test_template_output_names_come_from_passthrough_over_the_csr(
    hierarchy: str, template: Template, issued: Callable[[str, Template], IssuedCertificate]
) -> None:
    certificate = issued(hierarchy, template).certificate
    api = api_passthrough_for(template)
    try:
        sans = certificate.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        sans = []

    if template.is_ca:
        wanted_subject = api.subject if api else _name("Requested Subordinate CA")
        assert (certificate.subject, sans) == (wanted_subject, [])
    elif api is not None:
        assert (certificate.subject, sans) == (_name(API_DNS_NAME), [API_DNS_NAME])
        policies = certificate.extensions.get_extension_for_class(x509.CertificatePolicies)
        assert [p.policy_identifier for p in policies.value] == [EXAMPLE_POLICY]
    else:
        assert (certificate.subject, sans) == (_name(EE_DNS_NAME), [EE_DNS_NAME])


@needs_openssl
@pytest.mark.parametrize(("hierarchy", "template"), CASES)
def test_issued_chain_passes_openssl_verify_x509_strict(
    hierarchy: str,
    template: Template,
    issued: Callable[[str, Template], IssuedCertificate],
    tmp_path: Path,
) -> None:
    result = issued(hierarchy, template)
    intermediates, root = _chain_parts(result)
    assert_openssl_accepts(tmp_path, result.certificate, intermediates, root)
    for eku in expected_eku(template):
        if eku in _OPENSSL_PURPOSES:
            assert_openssl_accepts(
                tmp_path, result.certificate, intermediates, root, _OPENSSL_PURPOSES[eku]
            )


@pytest.mark.parametrize(("hierarchy", "template"), CASES)
def test_issued_chain_passes_pyhanko_certvalidator_path_and_usage_validation(
    hierarchy: str,
    template: Template,
    issued: Callable[[str, Template], IssuedCertificate],
    ec_hierarchy: Hierarchy,
    rsa_hierarchy: Hierarchy,
) -> None:
    subject_key = (ec_hierarchy if hierarchy == "EC" else rsa_hierarchy).subject_key
    result = issued(hierarchy, template)
    intermediates, root = _chain_parts(result)
    key_usage = {_KU_ASN1_NAMES[u] for u in expectedkey_usage(template, subject_key)}
    ekus = {asn1_x509.KeyPurposeId.map(o.dotted_string) for o in expected_eku(template)}

    path = pyhanko_validate(result.certificate, intermediates, root, key_usage, ekus)

    assert path == _der([root, *reversed(intermediates), result.certificate])


def test_hierarchy_ca_certificates_have_no_pkilint_rfc5280_errors(
    ec_hierarchy: Hierarchy, rsa_hierarchy: Hierarchy
) -> None:
    for hierarchy in (ec_hierarchy, rsa_hierarchy):
        chain = hierarchy.core.authorities.signing_material(hierarchy.issuing_id, utc_now()).chain
        issuing, root = chain[0], chain[-1]
        assert_pkilint_clean(root, root)
        assert_pkilint_clean(issuing, root)


@pytest.mark.parametrize("template", ROOT_TEMPLATES, ids=lambda t: t.name)
def test_root_templates_are_refused_by_issue(template: Template, ec_hierarchy: Hierarchy) -> None:
    for from_root in (False, True):
        with pytest.raises(PolicyViolationError, match="self-signed roots"):
            ec_hierarchy.issue(template, from_root=from_root)


@pytest.mark.parametrize("template", TOO_DEEP_FOR_ISSUING_CA, ids=lambda t: t.name)
def test_subordinate_template_deeper_than_issuing_ca_path_length_is_refused(
    template: Template, ec_hierarchy: Hierarchy
) -> None:
    with pytest.raises(PolicyViolationError, match="path length 1"):
        ec_hierarchy.issue(template)


# -- passthrough values that must not make a certificate non-conformant ------------------
# Both were found by pkilint: passthrough must not bypass key-usage fitting or policy.

_BLANK_EE = "BlankEndEntityCertificate_APICSRPassthrough/V1"


@pytest.mark.parametrize("source", ["api", "csr"])
def test_passthrough_key_usage_never_gives_an_ec_key_key_encipherment(
    source: str, ec_hierarchy: Hierarchy
) -> None:
    # A front-end may well ask for the usual TLS server pair whatever the key type.
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name(EE_DNS_NAME))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(EE_DNS_NAME)]), False)
    )
    if source == "csr":
        builder = builder.add_extension(
            key_usage("digital_signature", "key_encipherment"), critical=True
        )
    result = ec_hierarchy.core.issue(
        IssuanceRequest(
            ca_id=ec_hierarchy.issuing_id,
            csr=builder.sign(ec_hierarchy.subject_key, hashes.SHA256()).public_bytes(
                serialization.Encoding.PEM
            ),
            validity=Validity.parse("30d"),
            requester=Requester("conformance-test"),
            template=_BLANK_EE,
            api_passthrough=ApiPassthrough(
                key_usage=frozenset({"digitalSignature", "keyEncipherment"})
                if source == "api"
                else None,
                extended_key_usage=(ExtendedKeyUsageOID.SERVER_AUTH,),
            ),
        )
    )

    ku = result.certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    assert (ku.digital_signature, ku.key_encipherment) == (True, False)
    assert_pkilint_clean(result.certificate, result.chain[0])


def test_custom_extension_cannot_carry_a_key_usage_that_policy_would_refuse(
    ec_hierarchy: Hierarchy,
) -> None:
    template = TemplateCatalogue().get(_BLANK_EE)
    smuggled = CustomExtension(
        ExtensionOID.KEY_USAGE,
        key_usage("digital_signature", "key_cert_sign", "crl_sign").public_bytes(),
        critical=True,
    )

    with pytest.raises(PolicyViolationError, match="must be given as key_usage"):
        ec_hierarchy.core.issue(
            IssuanceRequest(
                ca_id=ec_hierarchy.issuing_id,
                csr=csr_for(template, ec_hierarchy.subject_key),
                validity=Validity.parse("30d"),
                requester=Requester("conformance-test"),
                template=template.name,
                api_passthrough=ApiPassthrough(
                    extended_key_usage=(ExtendedKeyUsageOID.SERVER_AUTH,),
                    custom_extensions=(smuggled,),
                ),
            )
        )


# -- the judges can say no ---------------------------------------------------------------


@pytest.fixture(scope="module")
def lookalike_hierarchy(conformance_core: Core) -> Hierarchy:
    """Another hierarchy whose CAs carry exactly the EC hierarchy's names, not its keys."""
    return _build_hierarchy(
        conformance_core, "EC", KeyAlgorithm.EC_prime256v1, ec.generate_private_key(ec.SECP256R1())
    )


def _server_template() -> Template:
    return TemplateCatalogue().get("EndEntityServerAuthCertificate/V1")


@needs_openssl
def test_openssl_rejects_certificate_under_another_root_with_the_same_names(
    ec_hierarchy: Hierarchy, lookalike_hierarchy: Hierarchy, tmp_path: Path
) -> None:
    result = ec_hierarchy.issue(_server_template())
    intermediates, root = _chain_parts(result)
    assert lookalike_hierarchy.root.subject == root.subject
    assert lookalike_hierarchy.root != root

    # The genuine chain, trusted under the look-alike root: the names match, the key
    # identifiers and signatures do not.
    rejected = openssl_verify(tmp_path, result.certificate, intermediates, lookalike_hierarchy.root)
    assert rejected.returncode != 0
    assert "unable to get local issuer certificate" in rejected.stdout + rejected.stderr
    assert "leaf.pem: OK" not in rejected.stdout
    # And the same files are accepted with the genuine root: only the anchor differs.
    assert_openssl_accepts(tmp_path, result.certificate, intermediates, root)


def test_pyhanko_rejects_certificate_under_another_root_with_the_same_names(
    ec_hierarchy: Hierarchy, lookalike_hierarchy: Hierarchy
) -> None:
    result = ec_hierarchy.issue(_server_template())
    intermediates, root = _chain_parts(result)

    with pytest.raises(PathBuildingError, match="no issuer matching"):
        pyhanko_validate(result.certificate, intermediates, lookalike_hierarchy.root)
    assert pyhanko_validate(result.certificate, intermediates, root) == _der(
        [root, *intermediates, result.certificate]
    )


@needs_openssl
def test_client_auth_certificate_fails_the_tls_server_purpose(
    ec_hierarchy: Hierarchy, tmp_path: Path
) -> None:
    template = TemplateCatalogue().get("EndEntityClientAuthCertificate/V1")
    result = ec_hierarchy.issue(template)
    intermediates, root = _chain_parts(result)

    rejected = openssl_verify(tmp_path, result.certificate, intermediates, root, "sslserver")
    assert rejected.returncode != 0
    assert "unsuitable certificate purpose" in rejected.stdout + rejected.stderr
    with pytest.raises(PyhankoInvalidCertificateError, match="server auth"):
        pyhanko_validate(
            result.certificate, intermediates, root, {"digital_signature"}, {"server_auth"}
        )


def test_pkilint_reports_errors_for_a_certificate_that_breaks_rfc5280() -> None:
    issuer_key, stray_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    now = utc_now()
    issuer = (
        x509.CertificateBuilder()
        .subject_name(_name("Hand-made Issuer"))
        .issuer_name(_name("Hand-made Issuer"))
        .public_key(issuer_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )
    # An end entity asserting keyCertSign, with no AKI, signed by a key that is not the
    # issuer's: three RFC 5280 violations the core never produces.
    broken = (
        x509.CertificateBuilder()
        .subject_name(_name("broken.pkigate.test"))
        .issuer_name(issuer.subject)
        .public_key(stray_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(stray_key, hashes.SHA256())
    )

    codes = {text.split(" @ ")[0] for text in pkilint_errors(broken, issuer)}

    assert codes >= {
        "ERROR pkix.ee_certificate_keycertsign_keyusage_set",
        "ERROR pkix.authority_key_identifier_extension_absent",
        "ERROR pkix.signature_verification_failed",
    }
