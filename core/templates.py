"""The certificate template catalogue and how a template turns a request into contents.

The catalogue follows the managed private CA's template names. Each base template has
``_CSRPassthrough`` (the CSR's extensions are copied), ``_APIPassthrough`` (the authorizer's
subject, names and extensions are used) and ``_APICSRPassthrough`` variants. On conflict
the template wins, then API passthrough, then CSR passthrough.

Connectors may register their own named templates (``TemplateCatalogue.register``), for
example a SCEP device template derived from ``EndEntityClientAuthCertificate/V1`` with an
allowed-names policy.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from functools import lru_cache

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa, x448, x25519
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, ObjectIdentifier

from pkigate.core.errors import PolicyViolationError, UnknownTemplateError
from pkigate.core.names import NamePolicy
from pkigate.core.passthrough import KEY_USAGE_NAMES, ApiPassthrough


class TemplateKind(StrEnum):
    END_ENTITY = "END_ENTITY"
    SUBORDINATE_CA = "SUBORDINATE_CA"
    ROOT_CA = "ROOT_CA"


# Extensions only the CA sets: never taken from a CSR or an API caller.
CA_CONTROLLED_EXTENSIONS = frozenset(
    {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        ExtensionOID.CRL_DISTRIBUTION_POINTS,
        ExtensionOID.AUTHORITY_INFORMATION_ACCESS,
        ExtensionOID.FRESHEST_CRL,
        ExtensionOID.PRECERT_POISON,
        ExtensionOID.PRECERT_SIGNED_CERTIFICATE_TIMESTAMPS,
        ExtensionOID.SIGNED_CERTIFICATE_TIMESTAMPS,
    }
)

OCSP_NO_CHECK = ExtensionOID.OCSP_NO_CHECK

# Microsoft's SID security extension: Windows maps a certificate carrying it to the account
# that SID names (KB5014754 strong mapping). A CSR never chooses it; an API caller may (the
# AD-style connector writes it from the directory).
MS_SECURITY_IDENTIFIER = ObjectIdentifier("1.3.6.1.4.1.311.25.2")

# Extensions that API passthrough supplies through a typed field, never as raw bytes.
TYPED_PASSTHROUGH_FIELDS = {
    ExtensionOID.KEY_USAGE: "key_usage",
    ExtensionOID.EXTENDED_KEY_USAGE: "extended_key_usage",
    ExtensionOID.CERTIFICATE_POLICIES: "certificate_policies",
    ExtensionOID.SUBJECT_ALTERNATIVE_NAME: "sans",
}


@dataclass(frozen=True)
class Template:
    """What a template puts in a certificate and what it lets requesters supply.

    ``key_usage``/``extended_key_usage`` of ``None`` mean the template does not define the
    extension (Blank templates), so passthrough may supply it.
    """

    name: str
    kind: TemplateKind
    path_length: int | None = None
    basic_constraints_critical: bool = True
    key_usage: frozenset[str] | None = None
    extended_key_usage: tuple[ObjectIdentifier, ...] | None = None
    extended_key_usage_critical: bool = False
    ocsp_no_check: bool = False
    csr_passthrough: bool = False
    api_passthrough: bool = False
    allowed_names: NamePolicy | None = None
    description: str = ""
    tags: tuple[str, ...] = field(default=(), compare=False)

    @property
    def is_ca(self) -> bool:
        return self.kind != TemplateKind.END_ENTITY


@dataclass(frozen=True)
class CertificateContents:
    """Subject and extensions resolved from template + API passthrough + CSR."""

    subject: x509.Name
    sans: tuple[x509.GeneralName, ...]
    extensions: tuple[x509.Extension[x509.ExtensionType], ...]


_EE_KU = frozenset({"digitalSignature", "keyEncipherment"})
_CA_KU = frozenset({"digitalSignature", "keyCertSign", "cRLSign"})
_VARIANTS = (
    ("", False, False),
    ("_CSRPassthrough", True, False),
    ("_APIPassthrough", False, True),
    ("_APICSRPassthrough", True, True),
)


def _base_templates() -> Iterator[Template]:
    ee = TemplateKind.END_ENTITY
    yield Template(
        "EndEntityCertificate",
        ee,
        key_usage=_EE_KU,
        extended_key_usage=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
        description="TLS server and client authentication",
    )
    yield Template(
        "EndEntityClientAuthCertificate",
        ee,
        key_usage=frozenset({"digitalSignature"}),
        extended_key_usage=(ExtendedKeyUsageOID.CLIENT_AUTH,),
        description="client authentication (devices, users)",
    )
    yield Template(
        "EndEntityServerAuthCertificate",
        ee,
        key_usage=_EE_KU,
        extended_key_usage=(ExtendedKeyUsageOID.SERVER_AUTH,),
        description="TLS server authentication",
    )
    yield Template(
        "CodeSigningCertificate",
        ee,
        key_usage=frozenset({"digitalSignature"}),
        extended_key_usage=(ExtendedKeyUsageOID.CODE_SIGNING,),
        extended_key_usage_critical=True,
        description="code signing",
    )
    yield Template(
        "OCSPSigningCertificate",
        ee,
        key_usage=frozenset({"digitalSignature"}),
        extended_key_usage=(ExtendedKeyUsageOID.OCSP_SIGNING,),
        extended_key_usage_critical=True,
        ocsp_no_check=True,
        description="delegated OCSP responder (id-pkix-ocsp-nocheck)",
    )
    for n in range(4):
        yield Template(
            f"SubordinateCACertificate_PathLen{n}",
            TemplateKind.SUBORDINATE_CA,
            path_length=n,
            key_usage=_CA_KU,
            description=f"subordinate CA, path length {n}",
        )
    yield Template(
        "RootCACertificate",
        TemplateKind.ROOT_CA,
        key_usage=_CA_KU,
        description="self-signed root CA",
    )


def _blank_templates() -> Iterator[Template]:
    ee = TemplateKind.END_ENTITY
    for suffix, csr in (("_APIPassthrough", False), ("_APICSRPassthrough", True)):
        yield Template(
            f"BlankEndEntityCertificate{suffix}/V1",
            ee,
            basic_constraints_critical=False,
            csr_passthrough=csr,
            api_passthrough=True,
            description="end entity, extensions from request",
        )
        yield Template(
            f"BlankEndEntityCertificate_CriticalBasicConstraints{suffix}/V1",
            ee,
            csr_passthrough=csr,
            api_passthrough=True,
            description="end entity with critical basic constraints",
        )
        for n in range(4):
            yield Template(
                f"BlankSubordinateCACertificate_PathLen{n}{suffix}/V1",
                TemplateKind.SUBORDINATE_CA,
                path_length=n,
                csr_passthrough=csr,
                api_passthrough=True,
                key_usage=frozenset({"keyCertSign", "cRLSign"}),
                description=f"subordinate CA, path length {n}, other extensions from request",
            )
        yield Template(
            f"BlankRootCACertificate{suffix}/V1",
            TemplateKind.ROOT_CA,
            csr_passthrough=csr,
            api_passthrough=True,
            key_usage=frozenset({"keyCertSign", "cRLSign"}),
            description="root CA, other extensions from request",
        )
        for n in range(4):
            yield Template(
                f"BlankRootCACertificate_PathLen{n}{suffix}/V1",
                TemplateKind.ROOT_CA,
                path_length=n,
                csr_passthrough=csr,
                api_passthrough=True,
                key_usage=frozenset({"keyCertSign", "cRLSign"}),
                description=f"root CA with path length {n}",
            )


def builtin_templates() -> Iterator[Template]:
    for base in _base_templates():
        for suffix, csr, api in _VARIANTS:
            yield replace(
                base, name=f"{base.name}{suffix}/V1", csr_passthrough=csr, api_passthrough=api
            )
    yield from _blank_templates()


class TemplateCatalogue:
    def __init__(self, templates: Iterable[Template] = ()) -> None:
        self._templates: dict[str, Template] = {}
        for template in (*builtin_templates(), *templates):
            self.register(template)

    def register(self, template: Template) -> None:
        self._templates[template.name] = template

    def get(self, name: str) -> Template:
        try:
            return self._templates[name]
        except KeyError:
            raise UnknownTemplateError(f"unknown template {name!r}") from None

    def __iter__(self) -> Iterator[Template]:
        return iter(sorted(self._templates.values(), key=lambda t: t.name))

    def __contains__(self, name: object) -> bool:
        return name in self._templates


def key_usage_extension(usages: Iterable[str]) -> x509.KeyUsage:
    chosen = set(usages)
    flags = {name: name in chosen for name in KEY_USAGE_NAMES}
    # encipherOnly/decipherOnly are meaningful only with keyAgreement (RFC 5280 4.2.1.3).
    if not flags["keyAgreement"]:
        flags["encipherOnly"] = flags["decipherOnly"] = False
    return x509.KeyUsage(
        digital_signature=flags["digitalSignature"],
        content_commitment=flags["contentCommitment"],
        key_encipherment=flags["keyEncipherment"],
        data_encipherment=flags["dataEncipherment"],
        key_agreement=flags["keyAgreement"],
        key_cert_sign=flags["keyCertSign"],
        crl_sign=flags["cRLSign"],
        encipher_only=flags["encipherOnly"],
        decipher_only=flags["decipherOnly"],
    )


def key_usage_names(usage: x509.KeyUsage) -> frozenset[str]:
    names = {
        "digitalSignature": usage.digital_signature,
        "contentCommitment": usage.content_commitment,
        "keyEncipherment": usage.key_encipherment,
        "dataEncipherment": usage.data_encipherment,
        "keyAgreement": usage.key_agreement,
        "keyCertSign": usage.key_cert_sign,
        "cRLSign": usage.crl_sign,
    }
    if usage.key_agreement:  # reading these raises otherwise
        names["encipherOnly"] = usage.encipher_only
        names["decipherOnly"] = usage.decipher_only
    return frozenset(name for name, asserted in names.items() if asserted)


def _fit_key_usage(usages: frozenset[str], key: CertificatePublicKeyTypes) -> frozenset[str]:
    """Drop usages the subject key cannot serve (RFC 8813: no keyEncipherment for EC keys)."""
    return _fit_usages(usages, _key_family(key))


def _fit_usages(usages: frozenset[str], family: type[CertificatePublicKeyTypes]) -> frozenset[str]:
    if issubclass(
        family, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
    ):
        return usages - {"keyEncipherment", "dataEncipherment", "encipherOnly", "decipherOnly"}
    if issubclass(family, x25519.X25519PublicKey | x448.X448PublicKey):
        return usages & {"keyAgreement", "encipherOnly", "decipherOnly"}
    return usages


def _key_family(key: CertificatePublicKeyTypes) -> type[CertificatePublicKeyTypes]:
    """The key's public type: all that ``_fit_key_usage`` looks at."""
    for family in _KEY_FAMILIES:
        if isinstance(key, family):
            return family
    return type(key)


_KEY_FAMILIES: tuple[type[CertificatePublicKeyTypes], ...] = (
    ec.EllipticCurvePublicKey,
    rsa.RSAPublicKey,
    ed25519.Ed25519PublicKey,
    ed448.Ed448PublicKey,
    x25519.X25519PublicKey,
    x448.X448PublicKey,
)


@lru_cache(maxsize=256)
def _template_extensions(
    template: Template, key_family: type[CertificatePublicKeyTypes]
) -> tuple[tuple[ObjectIdentifier, x509.Extension[x509.ExtensionType]], ...]:
    """The extensions a template defines, for a subject key of this family, in order.

    They depend only on the template and the kind of key, so each pair is built once.
    """
    extensions: list[tuple[ObjectIdentifier, x509.Extension[x509.ExtensionType]]] = []
    bc = x509.BasicConstraints(ca=template.is_ca, path_length=template.path_length)
    extensions.append(
        (
            ExtensionOID.BASIC_CONSTRAINTS,
            x509.Extension(ExtensionOID.BASIC_CONSTRAINTS, template.basic_constraints_critical, bc),
        )
    )
    if template.key_usage is not None:
        usages = (
            template.key_usage if template.is_ca else _fit_usages(template.key_usage, key_family)
        )
        ku = key_usage_extension(usages)
        extensions.append(
            (ExtensionOID.KEY_USAGE, x509.Extension(ExtensionOID.KEY_USAGE, True, ku))
        )
    if template.extended_key_usage is not None:
        eku = x509.ExtendedKeyUsage(list(template.extended_key_usage))
        extensions.append(
            (
                ExtensionOID.EXTENDED_KEY_USAGE,
                x509.Extension(
                    ExtensionOID.EXTENDED_KEY_USAGE, template.extended_key_usage_critical, eku
                ),
            )
        )
    if template.ocsp_no_check:
        extensions.append((OCSP_NO_CHECK, x509.Extension(OCSP_NO_CHECK, False, x509.OCSPNoCheck())))
    return tuple(extensions)


def resolve_contents(
    template: Template,
    csr: x509.CertificateSigningRequest,
    api: ApiPassthrough | None,
    public_key: CertificatePublicKeyTypes | None = None,
) -> CertificateContents:
    """Apply the template to the CSR and API passthrough, with template > API > CSR.

    ``public_key`` is the CSR's, when the caller has already extracted it.
    """
    if public_key is None:
        public_key = csr.public_key()
    if api is not None and not template.api_passthrough:
        raise PolicyViolationError(
            f"template {template.name} does not accept API passthrough values; use an "
            "_APIPassthrough variant"
        )
    extensions: dict[ObjectIdentifier, x509.Extension[x509.ExtensionType]] = {}

    csr_sans: tuple[x509.GeneralName, ...] = ()
    for ext in csr.extensions:
        if ext.oid == ExtensionOID.SUBJECT_ALTERNATIVE_NAME:
            csr_sans = tuple(ext.value)
        elif template.csr_passthrough and ext.oid not in CA_CONTROLLED_EXTENSIONS:
            if ext.oid == MS_SECURITY_IDENTIFIER:
                raise PolicyViolationError(
                    "the CSR carries a Windows security identifier (SID) extension: a "
                    "requester cannot choose the account a certificate maps to"
                )
            extensions[ext.oid] = ext

    if api is not None:
        _apply_api(extensions, api)
    passed_usage = extensions.get(ExtensionOID.KEY_USAGE)
    if (
        not template.is_ca
        and passed_usage is not None
        and isinstance(passed_usage.value, x509.KeyUsage)
    ):
        # Whatever the CSR or the API asked for, the subject key must be able to serve it.
        fitted = _fit_key_usage(key_usage_names(passed_usage.value), public_key)
        extensions[ExtensionOID.KEY_USAGE] = x509.Extension(
            ExtensionOID.KEY_USAGE, True, key_usage_extension(fitted)
        )

    # Template-defined extensions last: they win.
    extensions.update(_template_extensions(template, _key_family(public_key)))
    if template.is_ca:
        # CA certificates carry no SAN unless an explicit passthrough supplies one.
        csr_sans = csr_sans if template.csr_passthrough else ()

    subject = api.subject if api is not None and api.subject is not None else csr.subject
    sans = api.sans if api is not None and api.sans is not None else csr_sans
    extensions.pop(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, None)
    return CertificateContents(
        subject=subject, sans=tuple(sans), extensions=tuple(extensions.values())
    )


def _apply_api(
    extensions: dict[ObjectIdentifier, x509.Extension[x509.ExtensionType]], api: ApiPassthrough
) -> None:
    for custom in api.custom_extensions:
        if custom.oid in CA_CONTROLLED_EXTENSIONS:
            raise PolicyViolationError(
                f"extension {custom.oid.dotted_string} is set by the CA and cannot be supplied"
            )
        if custom.oid in TYPED_PASSTHROUGH_FIELDS:
            # Raw bytes would bypass the policy checks that the typed field gets.
            raise PolicyViolationError(
                f"extension {custom.oid.dotted_string} must be given as "
                f"{TYPED_PASSTHROUGH_FIELDS[custom.oid]}, not as a custom extension"
            )
        extensions[custom.oid] = x509.Extension(
            custom.oid, custom.critical, x509.UnrecognizedExtension(custom.oid, custom.value)
        )
    if api.key_usage is not None:
        extensions[ExtensionOID.KEY_USAGE] = x509.Extension(
            ExtensionOID.KEY_USAGE, True, key_usage_extension(api.key_usage)
        )
    if api.extended_key_usage is not None:
        extensions[ExtensionOID.EXTENDED_KEY_USAGE] = x509.Extension(
            ExtensionOID.EXTENDED_KEY_USAGE,
            False,
            x509.ExtendedKeyUsage(list(api.extended_key_usage)),
        )
    if api.certificate_policies is not None:
        extensions[ExtensionOID.CERTIFICATE_POLICIES] = x509.Extension(
            ExtensionOID.CERTIFICATE_POLICIES,
            False,
            x509.CertificatePolicies([p.to_x509() for p in api.certificate_policies]),
        )


def describe(template: Template) -> dict[str, object]:
    """A JSON-ready description for the CLI and API."""
    return {
        "name": template.name,
        "kind": template.kind.value,
        "path_length": template.path_length,
        "key_usage": sorted(template.key_usage) if template.key_usage is not None else None,
        "extended_key_usage": [o.dotted_string for o in template.extended_key_usage]
        if template.extended_key_usage is not None
        else None,
        "csr_passthrough": template.csr_passthrough,
        "api_passthrough": template.api_passthrough,
        "description": template.description,
    }


def template_names(templates: Sequence[Template]) -> list[str]:
    return [t.name for t in templates]
