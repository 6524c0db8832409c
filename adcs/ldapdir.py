"""The AD-style connector's view of the directory: templates, enrollment services, principals.

Everything goes over LDAP with ldap3 to an Active Directory domain controller or to the
development directory (:mod:`pkigate.adcs.directory`).

Thread safety: every operation opens its own connection, binds, works and unbinds, so that
gunicorn threads never share an ldap3 Connection (which is not safe to share). The template
and enrollment-service caches are snapshots swapped under a lock; a refresh happens outside
the lock, so a slow directory delays only the threads that need fresh data.

Authentication is a simple bind as the principal's own DN. Use an ldaps:// URL to keep the
password off the wire in clear, except towards a directory on loopback.
"""

from __future__ import annotations

import logging
import math
import re
import ssl
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, Literal

from ldap3 import BASE, LEVEL, NONE, Connection, Server, Tls
from ldap3.core.exceptions import (
    LDAPException,
    LDAPPasswordIsMandatoryError,
    LDAPSASLPrepError,
)
from ldap3.protocol.microsoft import security_descriptor_control
from ldap3.utils.conv import escape_filter_chars

from pkigate.adcs import layout
from pkigate.adcs.principals import (
    DirectorySearchFailed,
    Principal,
    PrincipalLookupError,
    find_principal,
    find_principal_by_sid,
    find_principal_by_upn,
    resolve_token,
)
from pkigate.adcs.templates import (
    TEMPLATE_ATTRIBUTES,
    CertificateTemplate,
    TemplateError,
    merge_attribute_options,
)

__all__ = [
    "AuthenticationFailed",
    "Directory",
    "DirectoryError",
    "DirectoryUnavailable",
    "EnrollmentService",
    "InvalidCredentials",
    "Principal",
    "PrincipalDisabled",
    "RootDse",
]

logger = logging.getLogger(__name__)

DEFAULT_CACHE_TTL_SECONDS = 30.0
DEFAULT_TIMEOUT_SECONDS = 5.0
# Longer than any sAMAccountName (20), UPN or DOMAIN\name AD accepts; longer input is refused
# before it reaches a filter.
MAX_ACCOUNT_NAME_CHARS = 256
# Owner, group and DACL, not the SACL: AD returns no nTSecurityDescriptor at all to an account
# without SeSecurityPrivilege unless the request asks for less than the default 0xF
# ([MS-ADTS] 3.1.1.3.4.1.11). Not critical, so slapd ignores it.
SD_FLAGS_OWNER_GROUP_DACL = 0x07
# cACertificate is written with the ;binary option to slapd only (pkigate.adcs.publish), and
# read by its plain name, which both return (slapd with ;binary, merged when read).
ENROLLMENT_SERVICE_ATTRIBUTES = ("cn", "dNSHostName", "certificateTemplates", "cACertificate")

# LDAP_CAP_ACTIVE_DIRECTORY_OID in the root DSE's supportedCapabilities: AD or Samba AD.
ACTIVE_DIRECTORY_CAPABILITY = "1.2.840.113556.1.4.800"
# A well-formed base for a Directory that only reads the root DSE (see Directory.discover).
DISCOVERY_BASE = "DC=invalid"
ROOT_DSE_ATTRIBUTES = (
    "defaultNamingContext",
    "configurationNamingContext",
    "supportedCapabilities",
)

LDAP_SUCCESS = 0
LDAP_NO_SUCH_OBJECT = 32
LDAP_INVALID_CREDENTIALS = 49
LDAP_UNAVAILABLE_RESULTS = frozenset({3, 51, 52, 80})  # timeLimit, busy, unavailable, other

# One message for an unknown account, a wrong password and an empty one: the answer must not
# tell which names exist.
INVALID_CREDENTIALS_MESSAGE = "unknown account or wrong password"
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")

BindOutcome = Literal["bound", "disabled", "refused"]
# AD (and Samba) refuse a disabled account's bind even with the right password, saying so in
# the diagnostic message: "AcceptSecurityContext error, data 533" (ERROR_ACCOUNT_DISABLED).
# A wrong password says "data 52e" whatever the account's state, so this discloses nothing
# to one who lacks the password.
AD_ACCOUNT_DISABLED = re.compile(r"\bdata 533\b")


class DirectoryError(RuntimeError):
    """The directory holds something the connector cannot use, or refused an operation."""


class DirectoryUnavailable(DirectoryError):
    """The directory cannot be reached, did not answer in time, or refused the service bind."""


class AuthenticationFailed(Exception):
    """A principal could not be authenticated."""


class InvalidCredentials(AuthenticationFailed):
    """Unknown account, wrong password or empty password (deliberately not told apart)."""


class PrincipalDisabled(AuthenticationFailed):
    """The password is right but the account is disabled (userAccountControl 0x2)."""


@dataclass(frozen=True)
class EnrollmentService:
    """A pKIEnrollmentService object: an issuing CA and the templates it offers."""

    cn: str
    """The CA's name, as clients name it in a request."""
    dn: str
    dns_host_name: str | None
    """The host clients contact for this CA."""
    certificate_templates: tuple[str, ...]
    """Names (cn) of the templates the CA issues from."""
    ca_certificate_der: bytes | None
    """cACertificate: the CA's own certificate."""


@dataclass(frozen=True)
class RootDse:
    """What the directory's root DSE says about itself."""

    default_naming_context: str | None
    configuration_naming_context: str | None
    active_directory: bool
    """An AD domain controller (Windows or Samba), as against the development directory."""


@dataclass(frozen=True)
class _TemplateSnapshot:
    templates: Mapping[str, CertificateTemplate]
    errors: Mapping[str, str]
    expires: float
    by_folded_name: Mapping[str, CertificateTemplate] = field(repr=False)


class Directory:
    """Templates, enrollment services and principals of one domain, over LDAP."""

    def __init__(
        self,
        url: str,
        base: str,
        bind_dn: str,
        bind_password: str,
        *,
        cache_ttl: float = DEFAULT_CACHE_TTL_SECONDS,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        netbios_domain: str | None = None,
        ca_file: str | None = None,
    ) -> None:
        """``bind_dn``/``bind_password``: the service account that reads the directory (and
        writes the CA's objects through :meth:`writer`).

        ``netbios_domain``: the name accepted before a backslash in DOMAIN\\name; by default
        the first DC label of ``base`` in upper case (DC=example,DC=test -> EXAMPLE).

        ``ca_file``: PEM file of the CAs that issue the directory's ldaps:// certificate (the
        system's trust store when None). The certificate and host name are always verified:
        ldap3 alone would verify nothing.
        """
        components = layout.domain_components(base)
        if not bind_dn or not bind_password:
            # An empty password makes an unauthenticated bind, which "succeeds" as nobody.
            raise ValueError("the service account needs a DN and a password")
        self.url = url
        self.base = base
        self.bind_dn = bind_dn
        self._bind_password = bind_password
        self.cache_ttl = cache_ttl
        self.timeout = timeout
        self.netbios_domain = (netbios_domain or components[0]).upper()
        self.dns_domain = layout.dns_domain(base)
        self._tls = Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=ca_file)
        self._lock = threading.Lock()
        # Bumped by invalidate(): a load that began before must not be cached.
        self._generation = 0
        self._templates: _TemplateSnapshot | None = None
        self._services: dict[str, tuple[float, EnrollmentService | None]] = {}
        self._root_dse: RootDse | None = None

    @classmethod
    def discover(cls, url: str, bind_dn: str, bind_password: str, **options: Any) -> Directory:
        """A Directory on the domain the root DSE names (defaultNamingContext), as AD
        clients find it; ``options`` as for the constructor.

        Raises :class:`DirectoryUnavailable` when the directory does not answer, and
        :class:`DirectoryError` when its root DSE names no domain.
        """
        probe = cls(url, DISCOVERY_BASE, bind_dn, bind_password, **options)
        root = probe.root_dse()  # reads only the root DSE, never under the placeholder base
        if root.default_naming_context is None:
            raise DirectoryError(f"{url} names no defaultNamingContext in its root DSE: set base")
        directory = cls(url, root.default_naming_context, bind_dn, bind_password, **options)
        directory._root_dse = root
        return directory

    def __repr__(self) -> str:
        return f"Directory({self.url!r}, {self.base!r}, bind_dn={self.bind_dn!r})"

    def root_dse(self) -> RootDse:
        """The root DSE's naming contexts and kind, read once (they do not change)."""
        with self._lock:
            if self._root_dse is not None:
                return self._root_dse
        with self._service() as connection:
            entries = _search(connection, "", "(objectClass=*)", BASE, ROOT_DSE_ATTRIBUTES)
        raw = entries[0][1] if entries else {}

        def single(attribute: str) -> str | None:
            values = raw.get(attribute) or []
            return bytes(values[0]).decode(errors="replace") if len(values) == 1 else None

        capabilities = {bytes(value).decode(errors="replace") for value in
                        raw.get("supportedCapabilities") or []}  # fmt: skip
        root = RootDse(
            default_naming_context=single("defaultNamingContext"),
            configuration_naming_context=single("configurationNamingContext"),
            active_directory=ACTIVE_DIRECTORY_CAPABILITY in capabilities,
        )
        with self._lock:
            self._root_dse = root
        return root

    def configuration_naming_context(self) -> str | None:
        """The configuration naming context the root DSE names (None: derive it from base)."""
        return self.root_dse().configuration_naming_context

    # --- certificate templates --------------------------------------------------------------

    def templates(self) -> dict[str, CertificateTemplate]:
        """Every well-formed template, by name; at most ``cache_ttl`` seconds old."""
        return dict(self._template_snapshot().templates)

    def template(self, name: str) -> CertificateTemplate | None:
        """The well-formed template named ``name`` (case-insensitive, as AD), or None."""
        return self._template_snapshot().by_folded_name.get(name.casefold())

    def template_errors(self) -> dict[str, str]:
        """Templates left out of :meth:`templates` because they are malformed: name -> why."""
        return dict(self._template_snapshot().errors)

    def invalidate(self) -> None:
        """Forget cached templates and enrollment services: the next call reads LDAP."""
        with self._lock:
            self._generation += 1
            self._templates = None
            self._services.clear()

    def _template_snapshot(self) -> _TemplateSnapshot:
        with self._lock:
            snapshot, generation = self._templates, self._generation
        if snapshot is not None and time.monotonic() < snapshot.expires:
            return snapshot
        fresh = self._load_templates(previous=snapshot)
        with self._lock:
            if generation == self._generation:
                self._templates = fresh
        return fresh

    def _load_templates(self, previous: _TemplateSnapshot | None) -> _TemplateSnapshot:
        container = layout.certificate_templates_dn(self.base, self.configuration_naming_context())
        with self._service() as connection:
            entries = _search(
                connection,
                container,
                "(objectClass=pKICertificateTemplate)",
                LEVEL,
                TEMPLATE_ATTRIBUTES,
                controls=security_descriptor_control(sdflags=SD_FLAGS_OWNER_GROUP_DACL),
            )
        if entries is None:
            raise DirectoryError(f"no certificate templates container at {container}")
        templates: dict[str, CertificateTemplate] = {}
        errors: dict[str, str] = {}
        for dn, raw in entries:
            try:
                template = CertificateTemplate.from_entry(dn, raw)
            except TemplateError as exc:
                errors[exc.template_name] = str(exc)
                if previous is None or previous.errors.get(exc.template_name) != str(exc):
                    logger.warning("refusing a malformed template: %s", exc)
                continue
            templates[template.name] = template
        return _TemplateSnapshot(
            templates=templates,
            errors=errors,
            expires=time.monotonic() + self.cache_ttl,
            by_folded_name={name.casefold(): value for name, value in templates.items()},
        )

    # --- enrollment services ----------------------------------------------------------------

    def enrollment_service(self, ca_name: str) -> EnrollmentService | None:
        """The pKIEnrollmentService named ``ca_name``, or None; cached as templates are."""
        key = ca_name.casefold()
        with self._lock:
            cached, generation = self._services.get(key), self._generation
        if cached is not None and time.monotonic() < cached[0]:
            return cached[1]
        service = self._load_enrollment_service(ca_name)
        with self._lock:
            if generation == self._generation:
                self._services[key] = (time.monotonic() + self.cache_ttl, service)
        return service

    def _load_enrollment_service(self, ca_name: str) -> EnrollmentService | None:
        with self._service() as connection:
            entries = _search(
                connection,
                layout.enrollment_services_dn(self.base, self.configuration_naming_context()),
                f"(&(objectClass=pKIEnrollmentService)(cn={escape_filter_chars(ca_name)}))",
                LEVEL,
                ENROLLMENT_SERVICE_ATTRIBUTES,
            )
        if not entries:
            return None
        if len(entries) > 1:
            raise DirectoryError(f"{len(entries)} enrollment services are named {ca_name!r}")
        return _enrollment_service(*entries[0])

    @contextmanager
    def writer(self) -> Iterator[Connection]:
        """A connection bound as the service account that may write, for `pkigate adcs
        publish` (:mod:`pkigate.adcs.publish`). The caches are dropped afterwards, whatever
        was written: the next read sees the directory as it is now."""
        try:
            with self._service(read_only=False) as connection:
                yield connection
        finally:
            self.invalidate()

    # --- principals -------------------------------------------------------------------------

    def authenticate(self, username: str, password: str) -> Principal:
        """The principal ``username`` names, once ``password`` binds as it.

        ``username`` is a sAMAccountName ("alice", "WS01$"), a UPN ("alice@example.test", or
        the implicit "name@<dns domain>"), or DOMAIN\\name where DOMAIN is this domain's
        NetBIOS or DNS name (case-insensitive); another domain's prefix names no account here.

        Raises :class:`InvalidCredentials` for an unknown account, a wrong or an empty password
        (an empty password would make an unauthenticated bind, which succeeds), then
        :class:`PrincipalDisabled` for a disabled account: slapd does not enforce
        userAccountControl, AD refuses the bind saying why (:data:`AD_ACCOUNT_DISABLED`), and
        disclosing it only to the holder of the password is harmless.
        """
        if not password:
            raise InvalidCredentials(INVALID_CREDENTIALS_MESSAGE)
        with self._service() as connection:
            try:
                principal = self._find(connection, username)
            except DirectorySearchFailed:
                raise
            except PrincipalLookupError as exc:
                logger.warning("refusing to authenticate %r: %s", username, exc)
                principal = None
            if principal is None:
                raise InvalidCredentials(INVALID_CREDENTIALS_MESSAGE)
            bind = self._password_bind(principal.dn, password)
            if bind == "refused":
                raise InvalidCredentials(INVALID_CREDENTIALS_MESSAGE)
            if bind == "disabled" or principal.disabled:
                raise PrincipalDisabled(f"the account {principal.sam_account_name} is disabled")
            return self._with_token(connection, principal)

    def principal_by_sid(self, sid: str) -> Principal | None:
        """The account whose objectSid is ``sid``, with its token; None if none (or not a SID).

        Disabled accounts are returned too (``disabled`` says so): the caller decides.
        """
        with self._service() as connection:
            principal = find_principal_by_sid(connection, self.base, sid)
            return None if principal is None else self._with_token(connection, principal)

    def principal_by_name(self, name: str) -> Principal | None:
        """The account ``name`` names (any form :meth:`authenticate` takes), with its token."""
        with self._service() as connection:
            principal = self._find(connection, name)
            return None if principal is None else self._with_token(connection, principal)

    def _with_token(self, connection: Connection, principal: Principal) -> Principal:
        token_groups = self.root_dse().active_directory
        return resolve_token(connection, self.base, principal, token_groups=token_groups)

    def _find(self, connection: Connection, name: str) -> Principal | None:
        if not name or len(name) > MAX_ACCOUNT_NAME_CHARS or _CONTROL_CHARACTERS.search(name):
            return None
        if "\\" in name:
            domain, _, account = name.partition("\\")
            if domain.casefold() not in (self.netbios_domain.casefold(), self.dns_domain):
                return None
            if not account or "\\" in account or "@" in account:
                return None
            return find_principal(connection, self.base, account)
        if "@" in name:
            principal = find_principal_by_upn(connection, self.base, name)
            local, _, suffix = name.rpartition("@")
            if principal is None and local and suffix.casefold() == self.dns_domain:
                # AD's implicit UPN: sAMAccountName@<DNS domain> names an account without one.
                principal = find_principal(connection, self.base, local)
            return principal
        return find_principal(connection, self.base, name)

    def _password_bind(self, dn: str, password: str) -> BindOutcome:
        connection = self._connection(dn, password)
        try:
            if connection.bind():
                return "bound"
            result = connection.result.get("result")
            if result in LDAP_UNAVAILABLE_RESULTS:
                raise DirectoryUnavailable(f"{self.url} did not verify a password: {result}")
            if result == LDAP_INVALID_CREDENTIALS and AD_ACCOUNT_DISABLED.search(
                connection.result.get("message") or ""
            ):
                return "disabled"
            return "refused"  # invalidCredentials, or any other refusal
        except (LDAPSASLPrepError, LDAPPasswordIsMandatoryError):
            # RFC 4013: a password SASLprep prohibits (or maps to nothing) is no password
            # of any account: wrong credentials, not an unavailable directory.
            return "refused"
        except LDAPException as exc:
            raise DirectoryUnavailable(f"{self.url}: {exc}") from None
        finally:
            _close(connection)

    # --- connections ------------------------------------------------------------------------

    def _connection(self, user: str, password: str, *, read_only: bool = True) -> Connection:
        server = Server(self.url, connect_timeout=self.timeout, get_info=NONE, tls=self._tls)
        return Connection(
            server,
            user=user,
            password=password,
            # ldap3 packs it into SO_RCVTIMEO as whole seconds: it must be an int.
            receive_timeout=max(1, math.ceil(self.timeout)),
            raise_exceptions=False,
            read_only=read_only,
            return_empty_attributes=False,
        )

    @contextmanager
    def _service(self, *, read_only: bool = True) -> Iterator[Connection]:
        """A connection bound as the service account, unbound afterwards.

        ldap3's network errors and failed searches inside the block become
        :class:`DirectoryUnavailable`; an account that cannot be decoded, DirectoryError.
        """
        connection = self._connection(self.bind_dn, self._bind_password, read_only=read_only)
        try:
            if not connection.bind():
                raise DirectoryUnavailable(
                    f"the service account cannot bind to {self.url}: {_describe(connection)}"
                )
            yield connection
        except LDAPException as exc:
            raise DirectoryUnavailable(f"{self.url}: {exc}") from None
        except DirectorySearchFailed as exc:
            raise DirectoryUnavailable(str(exc)) from None
        except PrincipalLookupError as exc:
            raise DirectoryError(str(exc)) from None
        finally:
            _close(connection)


def _search(
    connection: Connection,
    base: str,
    search_filter: str,
    scope: Any,
    attributes: Sequence[str],
    *,
    controls: Any = None,
) -> list[tuple[str, dict[str, list[bytes]]]] | None:
    """Entries found (raw values), or None when ``base`` does not exist."""
    if not connection.search(
        base, search_filter, scope, attributes=list(attributes), controls=controls
    ):
        result = connection.result.get("result")
        if result == LDAP_SUCCESS:
            return []  # ldap3 says False when nothing matched
        if result == LDAP_NO_SUCH_OBJECT:
            return None
        raise DirectoryUnavailable(f"search under {base} failed: {_describe(connection)}")
    return [
        (item["dn"], item["raw_attributes"])
        for item in connection.response or []
        if item.get("type") == "searchResEntry"
    ]


def _enrollment_service(dn: str, raw: Mapping[str, list[bytes]]) -> EnrollmentService:
    values = merge_attribute_options(raw)

    def texts(attribute: str) -> tuple[str, ...]:
        try:
            return tuple(value.decode() for value in values.get(attribute.lower(), []))
        except UnicodeDecodeError:
            raise DirectoryError(f"{dn}: {attribute} is not UTF-8") from None

    names = texts("cn")
    hosts = texts("dNSHostName")
    certificates = values.get("cacertificate", [])
    if len(names) != 1 or len(hosts) > 1 or len(certificates) > 1:
        raise DirectoryError(f"{dn}: cn, dNSHostName and cACertificate take one value each")
    return EnrollmentService(
        cn=names[0],
        dn=dn,
        dns_host_name=hosts[0] if hosts else None,
        certificate_templates=texts("certificateTemplates"),
        ca_certificate_der=bytes(certificates[0]) if certificates else None,
    )


def _describe(connection: Connection) -> str:
    result = connection.result or {}
    message = result.get("message") or ""
    return f"{result.get('description', 'no answer')} {message}".strip()


def _close(connection: Connection) -> None:
    with suppress(LDAPException):  # the socket is gone already: nothing to release
        connection.unbind()
