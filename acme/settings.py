"""One ACME connector instance's settings (the ``[connectors.settings]`` table)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from pkigate.acme.identifiers import IdentifierPolicy
from pkigate.core import Validity
from pkigate.gateways.connectors import ConnectorContext, ConnectorSettingsError, unknown_setting


@dataclass(frozen=True)
class Profile:
    """An ACME profile (draft-ietf-acme-profiles): what a client may ask for by name."""

    name: str
    template: str
    validity: Validity
    description: str


@dataclass(frozen=True)
class AcmeSettings:
    terms_of_service: str | None
    website: str | None
    caa_identities: tuple[str, ...]
    external_account_required: bool
    identifier_policy: IdentifierPolicy
    profiles: Mapping[str, Profile]
    default_profile: str
    http01_port: int
    tls_alpn01_port: int
    dns_resolver: tuple[str, int] | None
    """The DNS server every validation lookup asks (A/AAAA and TXT); None: the system's."""
    validation_timeout: float
    order_lifetime: timedelta
    pending_authorization_lifetime: timedelta
    valid_authorization_lifetime: timedelta
    authorization_reuse: timedelta
    """A valid authorization younger than this is reused by a new order of the account."""
    orders_per_account_per_hour: int
    failed_validations_per_identifier_per_hour: int
    orders_page_size: int
    ari_retry_after: timedelta
    alternate_chains: tuple[tuple[x509.Certificate, ...], ...] = field(default=())
    """Chains offered besides the default (Link rel="alternate"), e.g. via a cross-sign."""

    @classmethod
    def parse(cls, settings: Mapping[str, Any], context: ConnectorContext) -> AcmeSettings:
        known = {
            "terms_of_service",
            "website",
            "caa_identities",
            "external_account_required",
            "allowed_identifiers",
            "profiles",
            "default_profile",
            "http01_port",
            "tls_alpn01_port",
            "dns_resolver",
            "validation_timeout_seconds",
            "order_lifetime_seconds",
            "pending_authorization_lifetime_seconds",
            "valid_authorization_lifetime_seconds",
            "authorization_reuse_seconds",
            "orders_per_account_per_hour",
            "failed_validations_per_identifier_per_hour",
            "orders_page_size",
            "ari_retry_after_seconds",
            "alternate_chains",
        }
        for key in settings:
            if key not in known:
                raise unknown_setting(key, known)

        def text(key: str) -> str | None:
            value = settings.get(key)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConnectorSettingsError(key, "expected a non-empty string")
            return value

        def integer(key: str, default: int, low: int, high: int) -> int:
            value = settings.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConnectorSettingsError(key, f"expected an integer from {low} to {high}")
            return value

        def seconds(key: str, default: int) -> timedelta:
            return timedelta(seconds=integer(key, default, 1, 400 * 86400))

        required = settings.get("external_account_required", False)
        if not isinstance(required, bool):
            raise ConnectorSettingsError("external_account_required", "expected true or false")
        caa = settings.get("caa_identities", [])
        if not isinstance(caa, list) or not all(isinstance(c, str) and c for c in caa):
            raise ConnectorSettingsError("caa_identities", "expected a list of domain names")
        allowed = settings.get("allowed_identifiers")
        if allowed is not None and not isinstance(allowed, Mapping):
            raise ConnectorSettingsError(
                "allowed_identifiers", "expected a table with dns_suffixes and ip_networks"
            )
        try:
            policy = IdentifierPolicy.parse(allowed, "allowed_identifiers")
        except ValueError as exc:
            raise ConnectorSettingsError("allowed_identifiers", str(exc)) from None
        profiles = _profiles(settings.get("profiles"), context)
        default_profile = text("default_profile") or next(iter(profiles))
        if default_profile not in profiles:
            raise ConnectorSettingsError(
                "default_profile", f"no profile {default_profile!r}; have {', '.join(profiles)}"
            )
        resolver = text("dns_resolver")
        return cls(
            terms_of_service=text("terms_of_service"),
            website=text("website"),
            caa_identities=tuple(caa),
            external_account_required=required,
            identifier_policy=policy,
            profiles=profiles,
            default_profile=default_profile,
            http01_port=integer("http01_port", 80, 1, 65535),
            tls_alpn01_port=integer("tls_alpn01_port", 443, 1, 65535),
            dns_resolver=None if resolver is None else _host_port(resolver),
            validation_timeout=float(integer("validation_timeout_seconds", 10, 1, 120)),
            order_lifetime=seconds("order_lifetime_seconds", 7 * 86400),
            pending_authorization_lifetime=seconds(
                "pending_authorization_lifetime_seconds", 7 * 86400
            ),
            valid_authorization_lifetime=seconds(
                "valid_authorization_lifetime_seconds", 30 * 86400
            ),
            authorization_reuse=seconds("authorization_reuse_seconds", 7 * 86400),
            orders_per_account_per_hour=integer("orders_per_account_per_hour", 300, 1, 10**7),
            failed_validations_per_identifier_per_hour=integer(
                "failed_validations_per_identifier_per_hour", 30, 1, 10**7
            ),
            orders_page_size=integer("orders_page_size", 50, 1, 1000),
            ari_retry_after=seconds("ari_retry_after_seconds", 6 * 3600),
            alternate_chains=_alternate_chains(settings.get("alternate_chains")),
        )


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConnectorSettingsError("dns_resolver", f"expected HOST:PORT, not {value!r}")
    return host, int(port)


def _profiles(data: object, context: ConnectorContext) -> dict[str, Profile]:
    if data is None:
        return {
            "default": Profile(
                "default",
                context.template,
                context.validity,
                "The connector's template and validity",
            )
        }
    if not isinstance(data, Mapping) or not data:
        raise ConnectorSettingsError("profiles", "expected a table of profiles")
    profiles: dict[str, Profile] = {}
    for name, item in data.items():
        where = f"profiles.{name}"
        if not isinstance(item, Mapping):
            raise ConnectorSettingsError(where, "expected a table")
        unknown = set(item) - {"template", "validity", "description"}
        if unknown:
            first = sorted(unknown)[0]
            problem = unknown_setting(first, {"template", "validity", "description"})
            raise ConnectorSettingsError(f"{where}.{first}", problem.message)
        template = item.get("template", context.template)
        if not isinstance(template, str):
            raise ConnectorSettingsError(f"{where}.template", "expected a template name")
        try:
            context.core.templates.get(template)
        except Exception as exc:
            raise ConnectorSettingsError(f"{where}.template", str(exc)) from None
        validity = context.validity
        if "validity" in item:
            try:
                validity = Validity.parse(str(item["validity"]))
            except ValueError as exc:
                raise ConnectorSettingsError(f"{where}.validity", str(exc)) from None
        description = item.get("description", name)
        if not isinstance(description, str):
            raise ConnectorSettingsError(f"{where}.description", "expected a string")
        profiles[str(name)] = Profile(str(name), template, validity, description)
    return profiles


def _alternate_chains(data: object) -> tuple[tuple[x509.Certificate, ...], ...]:
    if data is None:
        return ()
    if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
        raise ConnectorSettingsError("alternate_chains", "expected a list of PEM file paths")
    chains = []
    for path in data:
        try:
            chains.append(tuple(x509.load_pem_x509_certificates(Path(path).read_bytes())))
        except (OSError, ValueError) as exc:
            raise ConnectorSettingsError("alternate_chains", f"{path}: {exc}") from None
    return tuple(chains)
