"""Where AD keeps public key objects, relative to a domain's base DN ([MS-WCCE] 2.2.2.11)."""

from __future__ import annotations

from ldap3.core.exceptions import LDAPInvalidDnError
from ldap3.utils.dn import escape_rdn, parse_dn


class InvalidBaseDn(ValueError):
    """A base DN that is not a domain's: it must be DC components only."""


def domain_components(base: str) -> tuple[str, ...]:
    """The DC values of a domain base DN, "DC=example,DC=test" -> ("example", "test")."""
    try:
        parts = parse_dn(base)
    except LDAPInvalidDnError:
        raise InvalidBaseDn(f"not a DN: {base!r}") from None
    if not parts or any(attribute.upper() != "DC" or not value for attribute, value, _ in parts):
        raise InvalidBaseDn(f"a domain base DN has only DC components, not {base!r}")
    return tuple(value for _attribute, value, _separator in parts)


def dns_domain(base: str) -> str:
    """The DNS name of the domain: "DC=example,DC=test" -> "example.test"."""
    return ".".join(domain_components(base)).lower()


def rdn(value: str, attribute: str = "CN") -> str:
    """One RDN with ``value`` escaped (RFC 4514)."""
    return f"{attribute}={escape_rdn(value)}"


def configuration_dn(base: str) -> str:
    return f"CN=Configuration,{base}"


def public_key_services_dn(base: str, configuration: str | None = None) -> str:
    """``configuration``: the forest's configuration naming context, as the root DSE names it
    (configurationNamingContext); by default CN=Configuration under ``base``, which is right
    for the forest root domain only."""
    return f"CN=Public Key Services,CN=Services,{configuration or configuration_dn(base)}"


def certificate_templates_dn(base: str, configuration: str | None = None) -> str:
    """The container of pKICertificateTemplate objects."""
    return f"CN=Certificate Templates,{public_key_services_dn(base, configuration)}"


def enrollment_services_dn(base: str, configuration: str | None = None) -> str:
    """The container of pKIEnrollmentService objects (one per issuing CA)."""
    return f"CN=Enrollment Services,{public_key_services_dn(base, configuration)}"


def template_dn(base: str, name: str, configuration: str | None = None) -> str:
    return f"{rdn(name)},{certificate_templates_dn(base, configuration)}"


def enrollment_service_dn(base: str, name: str, configuration: str | None = None) -> str:
    return f"{rdn(name)},{enrollment_services_dn(base, configuration)}"
