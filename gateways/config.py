"""The gateway's TOML configuration, parsed into typed settings with precise errors.

Example (every key optional; without a file `pkigate serve` runs the embedded default)::

    data_dir = "/var/lib/pkigate"
    database_url = "postgresql://pkigate@db/pkigate"
    workers = 4                       # worker processes, each serving both listeners
    max_body_bytes = 1048576
    max_connections = 1000            # per worker and listener; slow clients cost memory only
    header_timeout_seconds = 10       # TLS handshake + request line + headers; idle keep-alive
    body_timeout_seconds = 30         # the whole request body
    keepalive_requests = 1000         # requests served on one connection
    notifications_poll_seconds = 5    # how soon a new event is handed to its destinations
    expiry_scan_seconds = 3600        # how often expiring certificates and CAs are looked for
    # Roles that one API token may not hold together (gateways/roles.py); default none.
    separation_of_duties = ["ca-admin:ca-deleter", "issuer:approver"]

    [tokens]                          # API token hygiene (every key optional)
    default_lifetime = "90d"          # a token created without expires_in; default: none
    max_lifetime = "365d"             # the longest expires_in; default: no limit
    max_rotation_overlap = "7d"       # how long a rotated-out secret may keep working

    [listeners]
    http = "127.0.0.1:8080"           # CA certificates, CRLs, OCSP, SCEP
    https = "127.0.0.1:8443"          # ACME, AD-style enrollment, management API
    tls_from_ca = "issuing"           # or tls_certificate / tls_key files
    public_http_url = "http://pki.example.com"    # what goes into CDP/AIA URLs

    [pkcs11]                          # a token for CA keys (key_storage = "pkcs11")
    module = "/usr/lib/softhsm/libsofthsm2.so"
    token_label = "pkigate"
    pin_env = "PKIGATE_PKCS11_PIN"    # or pin_file = "/etc/pkigate/pin" (mode 0600)

    [[cas]]
    name = "root"
    type = "ROOT"
    subject = "CN=Example Root"
    key_algorithm = "EC_secp384r1"
    key_storage = "pkcs11"            # generated on the token; default "software"

    [[cas]]
    name = "issuing"
    type = "SUBORDINATE"
    parent = "root"
    subject = "CN=Example Issuing CA"
    path_length = 0

    [[connectors]]
    type = "scep"
    name = "intune"
    mount = "/scep/intune"
    ca = "issuing"
    template = "EndEntityClientAuthCertificate/V1"
    [connectors.settings]                 # the connector type's own settings
    static_challenge = true           # one shared challenge, generated and kept in the store
    dynamic_challenges = false        # no one-time challenges from the API

    [[notifications]]                 # events to a webhook (gateways/notifications.py)
    name = "chat"
    type = "webhook"
    url = "https://hooks.example.com/pki"
    secret_env = "PKIGATE_CHAT_SECRET"   # or secret_file; signs the body (HMAC-SHA256)
    events = ["certificate.expiring", "ca.expiring"]   # filters; empty or absent: all
    cas = ["issuing"]
    templates = []
    timeout_seconds = 10
    max_attempts = 8                  # then the delivery is dead-lettered

    [[notifications]]                 # the same events by mail
    name = "pki-team"
    type = "email"
    smtp_host = "smtp.example.com"
    smtp_port = 587
    tls = "starttls"                  # or "implicit" (port 465)
    from = "pkigate@example.com"
    to = ["pki-team@example.com"]
    username = "pkigate"
    password_env = "PKIGATE_SMTP_PASSWORD"   # or password_file
    events = ["certificate.expiring"]

A wrong key, type or value is reported as ``FILE:LINE: key.path: problem`` and the server
does not start; `pkigate config check FILE` reports the same without starting anything.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from pkigate.core.events import EventType
from pkigate.core.keys import KeyStorage
from pkigate.core.model import CAType, KeyAlgorithm, SigningAlgorithm, UsageMode, Validity
from pkigate.core.names import parse_dn
from pkigate.core.pkcs11_settings import Pkcs11Settings
from pkigate.gateways.auth import TokenPolicy, parse_span
from pkigate.gateways.mail import EmailTarget
from pkigate.gateways.notifications import check_host, check_webhook_url
from pkigate.gateways.roles import Role, parse_roles

DEFAULT_HTTP = "127.0.0.1:8080"
DEFAULT_HTTPS = "127.0.0.1:8443"
DEFAULT_MAX_BODY = 1024 * 1024
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConfigError(Exception):
    """A configuration problem, with where it is."""

    def __init__(self, message: str, key: str = "", source: str = "", line: int | None = None):
        self.message, self.key, self.source, self.line = message, key, source, line
        where = source + (f":{line}" if line else "")
        super().__init__(": ".join(part for part in (where, key, message) if part))


@dataclass(frozen=True)
class Listeners:
    http: str = DEFAULT_HTTP
    https: str = DEFAULT_HTTPS
    tls_certificate: Path | None = None
    tls_key: Path | None = None
    tls_from_ca: str | None = "issuing"  # resolved by parse_config
    public_http_url: str | None = None
    public_https_url: str | None = None

    @property
    def http_url(self) -> str:
        return (self.public_http_url or f"http://{self.http}").rstrip("/")

    @property
    def https_url(self) -> str:
        return (self.public_https_url or f"https://{self.https}").rstrip("/")


@dataclass(frozen=True)
class CAConfig:
    """A CA the gateway creates on first start and finds again by ``name`` afterwards."""

    name: str
    type: CAType
    subject: str
    key_algorithm: KeyAlgorithm = KeyAlgorithm.EC_prime256v1
    signing_algorithm: SigningAlgorithm | None = None
    usage_mode: UsageMode = UsageMode.GENERAL_PURPOSE
    parent: str | None = None
    path_length: int | None = None
    validity: Validity | None = None
    publish_revocation: bool = True
    key_storage: KeyStorage = KeyStorage.SOFTWARE


@dataclass(frozen=True)
class ConnectorConfig:
    type: str
    name: str
    mount: str
    ca: str
    template: str | None = None
    validity: Validity | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NotificationConfig:
    """A ``[[notifications]]`` entry: where events go (gateways/notifications.py)."""

    name: str
    type: str  # "webhook" or "email"
    url: str = ""
    #: type "email": the SMTP server, sender and recipients (gateways/mail.py).
    email: EmailTarget | None = None
    secret_file: Path | None = None
    secret_env: str | None = None
    #: The HMAC key itself: a destination made through the API (unsealed from the store).
    secret: str | None = field(default=None, repr=False)
    timeout_seconds: int = 10
    max_attempts: int = 8
    allow_reserved_addresses: bool = False
    # Filters (empty: everything): event types, CA names from [[cas]], template names.
    events: tuple[str, ...] = ()
    cas: tuple[str, ...] = ()
    templates: tuple[str, ...] = ()


@dataclass(frozen=True)
class GatewayConfig:
    data_dir: Path | None = None
    database_url: str | None = None
    workers: int = 1
    # The HTTP layer (server.py): connections held per worker and listener, and how long
    # a client may take to send a request's headers (also the idle keep-alive limit) and
    # its body; requests served on one connection.
    max_connections: int = 1000
    header_timeout_seconds: int = 10
    body_timeout_seconds: int = 30
    keepalive_requests: int = 1000
    job_threads: int = 1  # per process, for the CA's own jobs and again for each connector's
    # Jobs of each connector (and of notifications) one process runs at once.
    job_concurrency: int = 8
    max_body_bytes: int = DEFAULT_MAX_BODY
    log_level: str = "INFO"
    # Whether issuer tokens may issue CA, OCSP responder and Blank-template certificates
    # and revoke CA and responder certificates through the API (the CA operator's powers).
    api_ca_operations: bool = False
    listeners: Listeners = field(default_factory=Listeners)
    cas: tuple[CAConfig, ...] = ()
    connectors: tuple[ConnectorConfig, ...] | None = None  # None: every installed type
    pkcs11: Pkcs11Settings | None = None
    notifications: tuple[NotificationConfig, ...] = ()
    # How often the outbox is looked at for events to deliver.
    notifications_poll_seconds: int = 5
    # How often certificates and CAs are looked at for expiry events (core/expiry.py).
    expiry_scan_seconds: int = 3600
    # separation_of_duties and [tokens]: the rules for API tokens (gateways/auth.py).
    token_policy: TokenPolicy = field(default_factory=TokenPolicy)
    source: str = "embedded default"
    text: str = field(default="", repr=False, compare=False)  # to locate later problems

    def error(self, key: str, message: str) -> ConfigError:
        """A problem found after parsing (a connector's settings, a stored CA that differs),
        with the line of ``key`` in the file."""
        return _Reader(self.text, self.source).error(key, message)


def default_cas() -> tuple[CAConfig, ...]:
    return (
        CAConfig(
            "root", CAType.ROOT, "CN=pkigate Root CA,O=pkigate", validity=Validity.parse("10y")
        ),
        CAConfig(
            "issuing",
            CAType.SUBORDINATE,
            "CN=pkigate Issuing CA,O=pkigate",
            parent="root",
            path_length=0,
            validity=Validity.parse("5y"),
        ),
    )


class _Reader:
    """Walks the parsed TOML, knowing the text so that errors can name their line."""

    def __init__(self, text: str, source: str) -> None:
        self.lines = text.splitlines()
        self.source = source

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(message, key, self.source, self._line_of(key))

    def _line_of(self, key: str) -> int | None:
        """The line where ``key`` (``a.b``, ``connectors[1].settings.mount``) is set, or else
        the line of the nearest table that holds it (a required key that is missing).

        tomllib keeps no positions and tomlkit exposes none either, so the key is found in
        the source text: each line that opens a table or sets a key is given the path it
        defines (with the element number inside an array of tables), and the line whose
        path is the longest prefix of ``key``'s wins. Inline tables are found by their key."""
        wanted = re.findall(r"[^.\[\]]+|\[\d+\]", key)
        counters: dict[str, int] = {}
        header: list[str] = []
        best, best_length = None, 0
        for number, raw in enumerate(self.lines, start=1):
            line = raw.strip()
            table = re.match(r"^(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$", line)
            if table:
                names = _dotted(table.group(2))
                if table.group(1) == "[[":
                    counters[".".join(names)] = counters.get(".".join(names), -1) + 1
                header = _with_indexes(names, counters)
                path = header
            else:
                assignment = re.match(r"^([A-Za-z0-9_\-.\"' ]+?)\s*=", line)
                if not assignment:
                    continue
                path = [*header, *_dotted(assignment.group(1))]
            length = len(path)
            if length > best_length and wanted[:length] == path:
                best, best_length = number, length
        return best

    # typed getters -------------------------------------------------------------------

    def table(self, data: Mapping[str, Any], key: str, allowed: Sequence[str]) -> None:
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(allowed), n=1)
            raise self.error(
                f"{key}.{unknown[0]}" if key else unknown[0],
                f"unknown key; did you mean {close[0]!r}?"
                if close
                else f"unknown key; expected one of {', '.join(sorted(allowed))}",
            )

    def string(
        self,
        data: Mapping[str, Any],
        name: str,
        key: str,
        default: str | None = None,
        required: bool = False,
    ) -> str | None:
        if name not in data:
            if required:
                raise self.error(key, "is required")
            return default
        value = data[name]
        if not isinstance(value, str) or not value:
            raise self.error(key, f"must be a non-empty string, not {value!r}")
        return value

    def integer(
        self, data: Mapping[str, Any], name: str, key: str, default: int, low: int, high: int
    ) -> int:
        value = data.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.error(key, f"must be an integer from {low} to {high}, not {value!r}")
        return value

    def boolean(self, data: Mapping[str, Any], name: str, key: str, default: bool) -> bool:
        value = data.get(name, default)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, not {value!r}")
        return value

    def choice(
        self, data: Mapping[str, Any], name: str, key: str, enum: Any, default: Any = None
    ) -> Any:
        raw = self.string(data, name, key)
        if raw is None:
            return default
        try:
            return enum(raw)
        except ValueError:
            raise self.error(
                key, f"must be one of {', '.join(m.value for m in enum)}, not {raw!r}"
            ) from None


def _dotted(text: str) -> list[str]:
    """The parts of a TOML dotted key (``a."b.c"`` is two parts)."""
    return [part.strip().strip("\"'") for part in re.findall(r'"[^"]*"|\'[^\']*\'|[^.]+', text)]


def _with_indexes(names: list[str], counters: Mapping[str, int]) -> list[str]:
    """A table's path with the current element number after each array of tables in it
    (``connectors.settings`` inside the second ``[[connectors]]``: connectors, [1], settings)."""
    path: list[str] = []
    for position, name in enumerate(names):
        path.append(name)
        prefix = ".".join(names[: position + 1])
        if prefix in counters:
            path.append(f"[{counters[prefix]}]")
    return path


def _address(reader: _Reader, value: str | None, key: str, default: str) -> str:
    value = value or default
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise reader.error(key, f"must be HOST:PORT, not {value!r}")
    return value


def parse_config(text: str, source: str = "pkigate.toml") -> GatewayConfig:
    reader = _Reader(text, source)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = re.search(r"line (\d+)", str(exc))
        raise ConfigError(
            f"not valid TOML: {exc}", "", source, int(match.group(1)) if match else None
        ) from None
    reader.table(
        data,
        "",
        [
            "data_dir",
            "database_url",
            "workers",
            "max_connections",
            "header_timeout_seconds",
            "body_timeout_seconds",
            "keepalive_requests",
            "job_threads",
            "job_concurrency",
            "max_body_bytes",
            "log_level",
            "api_ca_operations",
            "listeners",
            "cas",
            "connectors",
            "pkcs11",
            "notifications",
            "notifications_poll_seconds",
            "expiry_scan_seconds",
            "separation_of_duties",
            "tokens",
        ],
    )
    pkcs11 = _parse_pkcs11(reader, data)
    listeners_data = data.get("listeners", {})
    if not isinstance(listeners_data, dict):
        raise reader.error("listeners", "must be a table")
    reader.table(
        listeners_data,
        "listeners",
        [
            "http",
            "https",
            "tls_certificate",
            "tls_key",
            "tls_from_ca",
            "public_http_url",
            "public_https_url",
        ],
    )
    certificate = reader.string(listeners_data, "tls_certificate", "listeners.tls_certificate")
    key = reader.string(listeners_data, "tls_key", "listeners.tls_key")
    if bool(certificate) != bool(key):
        raise reader.error("listeners.tls_certificate", "tls_certificate and tls_key go together")
    listeners = Listeners(
        http=_address(
            reader,
            reader.string(listeners_data, "http", "listeners.http"),
            "listeners.http",
            DEFAULT_HTTP,
        ),
        https=_address(
            reader,
            reader.string(listeners_data, "https", "listeners.https"),
            "listeners.https",
            DEFAULT_HTTPS,
        ),
        tls_certificate=Path(certificate) if certificate else None,
        tls_key=Path(key) if key else None,
        tls_from_ca=None
        if certificate
        else reader.string(listeners_data, "tls_from_ca", "listeners.tls_from_ca"),
        public_http_url=reader.string(
            listeners_data, "public_http_url", "listeners.public_http_url"
        ),
        public_https_url=reader.string(
            listeners_data, "public_https_url", "listeners.public_https_url"
        ),
    )
    cas = tuple(_parse_ca(reader, item, i) for i, item in enumerate(_array(reader, data, "cas")))
    names = [c.name for c in cas]
    for i, ca in enumerate(cas):
        if names.count(ca.name) > 1:
            raise reader.error(f"cas[{i}].name", f"duplicate CA name {ca.name!r}")
        if ca.parent is not None and ca.parent not in names[:i]:
            raise reader.error(
                f"cas[{i}].parent", f"{ca.parent!r} is not a CA defined before this one"
            )
    for i, ca in enumerate(cas):
        if ca.key_storage == KeyStorage.PKCS11 and pkcs11 is None:
            raise reader.error(
                f"cas[{i}].key_storage", "pkcs11 needs a [pkcs11] table naming the token"
            )
    cas = cas or default_cas()
    names = [c.name for c in cas]
    if listeners.tls_from_ca and listeners.tls_from_ca not in names:
        raise reader.error("listeners.tls_from_ca", f"no CA named {listeners.tls_from_ca!r}")
    if not certificate and not listeners.tls_from_ca:
        # The server certificate comes from the last CA defined: the issuing one.
        listeners = replace(listeners, tls_from_ca=names[-1])
    connectors = None
    if "connectors" in data:
        connectors = tuple(
            _parse_connector(reader, item, i, names)
            for i, item in enumerate(_array(reader, data, "connectors"))
        )
        seen: set[str] = set()
        for i, connector in enumerate(connectors):
            if connector.name in seen:
                raise reader.error(
                    f"connectors[{i}].name", f"duplicate connector name {connector.name!r}"
                )
            seen.add(connector.name)
    notifications = tuple(
        _parse_notification(reader, item, f"notifications[{i}]", names)
        for i, item in enumerate(_array(reader, data, "notifications"))
    )
    for i, notification in enumerate(notifications):
        if [n.name for n in notifications].count(notification.name) > 1:
            raise reader.error(
                f"notifications[{i}].name", f"duplicate notification name {notification.name!r}"
            )
    data_dir = reader.string(data, "data_dir", "data_dir")
    return GatewayConfig(
        data_dir=Path(data_dir) if data_dir else None,
        database_url=reader.string(data, "database_url", "database_url"),
        workers=reader.integer(data, "workers", "workers", 1, 1, 64),
        max_connections=reader.integer(
            data, "max_connections", "max_connections", 1000, 10, 100_000
        ),
        header_timeout_seconds=reader.integer(
            data, "header_timeout_seconds", "header_timeout_seconds", 10, 1, 300
        ),
        body_timeout_seconds=reader.integer(
            data, "body_timeout_seconds", "body_timeout_seconds", 30, 1, 3600
        ),
        keepalive_requests=reader.integer(
            data, "keepalive_requests", "keepalive_requests", 1000, 1, 1_000_000
        ),
        job_threads=reader.integer(data, "job_threads", "job_threads", 1, 0, 32),
        job_concurrency=reader.integer(data, "job_concurrency", "job_concurrency", 8, 1, 256),
        max_body_bytes=reader.integer(
            data, "max_body_bytes", "max_body_bytes", DEFAULT_MAX_BODY, 1024, 64 * 1024 * 1024
        ),
        log_level=reader.string(data, "log_level", "log_level", "INFO") or "INFO",
        api_ca_operations=reader.boolean(data, "api_ca_operations", "api_ca_operations", False),
        listeners=listeners,
        cas=cas,
        connectors=connectors,
        pkcs11=pkcs11,
        notifications=notifications,
        notifications_poll_seconds=reader.integer(
            data, "notifications_poll_seconds", "notifications_poll_seconds", 5, 1, 3600
        ),
        expiry_scan_seconds=reader.integer(
            data, "expiry_scan_seconds", "expiry_scan_seconds", 3600, 1, 86400
        ),
        token_policy=_parse_token_policy(reader, data),
        source=source,
        text=text,
    )


def _parse_token_policy(reader: _Reader, data: Mapping[str, Any]) -> TokenPolicy:
    """``separation_of_duties`` (pairs "role:role") and the ``[tokens]`` table."""
    pairs = data.get("separation_of_duties", [])
    if not isinstance(pairs, list):
        raise reader.error("separation_of_duties", 'must be a list of "role:role" pairs')
    separated: list[tuple[Role, Role]] = []
    for index, pair in enumerate(pairs):
        key = f"separation_of_duties[{index}]"
        names = pair.split(":") if isinstance(pair, str) else []
        if len(names) != 2:
            raise reader.error(
                key, f'must be "role:role" (e.g. "ca-admin:ca-deleter"), not {pair!r}'
            )
        try:
            first, second = parse_roles(names[:1]) + parse_roles(names[1:])
        except ValueError as exc:
            raise reader.error(key, str(exc)) from None
        if first is second:
            raise reader.error(key, f"names {first.value} twice")
        if {first, second} in [set(p) for p in separated]:
            raise reader.error(key, f"{pair!r} is given twice")
        separated.append((first, second))
    table = data.get("tokens", {})
    if not isinstance(table, dict):
        raise reader.error("tokens", "must be a table")
    reader.table(table, "tokens", ["default_lifetime", "max_lifetime", "max_rotation_overlap"])

    def span(name: str) -> timedelta | None:
        text = reader.string(table, name, f"tokens.{name}")
        try:
            return parse_span(text) if text is not None else None
        except ValueError as exc:
            raise reader.error(f"tokens.{name}", str(exc)) from None

    default, longest = span("default_lifetime"), span("max_lifetime")
    if default is not None and longest is not None and default > longest:
        raise reader.error("tokens.default_lifetime", "is longer than max_lifetime")
    overlap = span("max_rotation_overlap")
    return TokenPolicy(
        separated=tuple(separated),
        default_lifetime=default,
        max_lifetime=longest,
        max_rotation_overlap=TokenPolicy.max_rotation_overlap if overlap is None else overlap,
    )


def _parse_pkcs11(reader: _Reader, data: Mapping[str, Any]) -> Pkcs11Settings | None:
    """The ``[pkcs11]`` table: the token, never its PIN (from ``pin_env`` or the 0600
    ``pin_file``, read when the token is opened)."""
    if "pkcs11" not in data:
        return None
    table = data["pkcs11"]
    if not isinstance(table, dict):
        raise reader.error("pkcs11", "must be a table")
    reader.table(table, "pkcs11", ["module", "token_label", "pin_env", "pin_file"])
    module = reader.string(table, "module", "pkcs11.module", required=True) or ""
    if not Path(module).is_absolute():
        raise reader.error("pkcs11.module", f"must be an absolute path, not {module!r}")
    pin_env = reader.string(table, "pin_env", "pkcs11.pin_env")
    pin_file = reader.string(table, "pin_file", "pkcs11.pin_file")
    if (pin_env is None) == (pin_file is None):
        raise reader.error("pkcs11", "set exactly one of pin_env and pin_file")
    return Pkcs11Settings(
        module=Path(module),
        token_label=reader.string(table, "token_label", "pkcs11.token_label", required=True) or "",
        pin_env=pin_env,
        pin_file=Path(pin_file) if pin_file else None,
    )


def _array(reader: _Reader, data: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise reader.error(key, f"must be an array of tables ([[{key}]])")
    return value


def _parse_ca(reader: _Reader, item: dict[str, Any], index: int) -> CAConfig:
    where = f"cas[{index}]"
    reader.table(
        item,
        where,
        [
            "name",
            "type",
            "subject",
            "key_algorithm",
            "signing_algorithm",
            "usage_mode",
            "parent",
            "path_length",
            "validity",
            "publish_revocation",
            "key_storage",
        ],
    )
    name = reader.string(item, "name", f"{where}.name", required=True) or ""
    if not _NAME.match(name):
        raise reader.error(f"{where}.name", "use letters, digits, '.', '_' or '-'")
    subject = reader.string(item, "subject", f"{where}.subject", required=True) or ""
    try:
        parse_dn(subject)
    except Exception as exc:  # the core's error names the problem
        raise reader.error(f"{where}.subject", str(exc)) from None
    ca_type = reader.choice(item, "type", f"{where}.type", CAType)
    if ca_type is None:
        raise reader.error(f"{where}.type", "is required (ROOT or SUBORDINATE)")
    validity = reader.string(item, "validity", f"{where}.validity")
    try:
        parsed_validity = Validity.parse(validity) if validity else None
    except Exception as exc:
        raise reader.error(f"{where}.validity", str(exc)) from None
    parent = reader.string(item, "parent", f"{where}.parent")
    if ca_type == CAType.ROOT and parent:
        raise reader.error(f"{where}.parent", "a ROOT CA has no parent")
    return CAConfig(
        name=name,
        type=ca_type,
        subject=subject,
        key_algorithm=reader.choice(
            item,
            "key_algorithm",
            f"{where}.key_algorithm",
            KeyAlgorithm,
            KeyAlgorithm.EC_prime256v1,
        ),
        signing_algorithm=reader.choice(
            item, "signing_algorithm", f"{where}.signing_algorithm", SigningAlgorithm
        ),
        usage_mode=reader.choice(
            item, "usage_mode", f"{where}.usage_mode", UsageMode, UsageMode.GENERAL_PURPOSE
        ),
        parent=parent,
        path_length=reader.integer(item, "path_length", f"{where}.path_length", 0, 0, 3)
        if "path_length" in item
        else None,
        validity=parsed_validity,
        publish_revocation=bool(item.get("publish_revocation", True)),
        key_storage=reader.choice(
            item, "key_storage", f"{where}.key_storage", KeyStorage, KeyStorage.SOFTWARE
        ),
    )


def _parse_connector(
    reader: _Reader, item: dict[str, Any], index: int, ca_names: Sequence[str]
) -> ConnectorConfig:
    where = f"connectors[{index}]"
    reader.table(item, where, ["type", "name", "mount", "ca", "template", "validity", "settings"])
    name = reader.string(item, "name", f"{where}.name", required=True) or ""
    if not _NAME.match(name):
        raise reader.error(f"{where}.name", "use letters, digits, '.', '_' or '-'")
    mount = reader.string(item, "mount", f"{where}.mount", required=True) or ""
    if not re.match(r"^(/[A-Za-z0-9._~-]+)+$", mount) or mount.startswith(
        ("/api", "/ca/", "/crl", "/ocsp")
    ):
        raise reader.error(
            f"{where}.mount",
            f"must be a path like /scep/mdm outside reserved prefixes, not {mount!r}",
        )
    ca = reader.string(item, "ca", f"{where}.ca", "issuing") or "issuing"
    if ca not in ca_names:
        raise reader.error(f"{where}.ca", f"no CA named {ca!r}")
    settings = item.get("settings", {})
    if not isinstance(settings, dict):
        raise reader.error(f"{where}.settings", "must be a table")
    validity = reader.string(item, "validity", f"{where}.validity")
    try:
        parsed_validity = Validity.parse(validity) if validity else None
    except Exception as exc:
        raise reader.error(f"{where}.validity", str(exc)) from None
    return ConnectorConfig(
        type=reader.string(item, "type", f"{where}.type", required=True) or "",
        name=name,
        mount=mount,
        ca=ca,
        template=reader.string(item, "template", f"{where}.template"),
        validity=parsed_validity,
        settings=settings,
    )


def _strings(reader: _Reader, item: Mapping[str, Any], name: str, key: str) -> tuple[str, ...]:
    value = item.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise reader.error(key, "must be a list of strings")
    return tuple(value)


_COMMON_NOTIFICATION_KEYS = (
    "name",
    "type",
    "timeout_seconds",
    "max_attempts",
    "events",
    "cas",
    "templates",
)
_NOTIFICATION_KEYS = {
    "webhook": ("url", "allow_reserved_addresses"),
    "email": ("smtp_host", "smtp_port", "tls", "from", "to", "username"),
}
# In the TOML a secret is named (a file, an environment variable); through the API it is
# sent, then sealed in the store (gateways/destinations.py). So is the SMTP server's CA.
_NAMED_SECRET_KEYS = {
    "webhook": ("secret_file", "secret_env"),
    "email": ("password_file", "password_env", "tls_ca_file"),
}
_SENT_SECRET_KEYS = {"webhook": ("secret",), "email": ("password", "tls_ca_pem")}


def _under(where: str) -> Callable[[str], str]:
    """How a key inside an entry is named: ``notifications[0].url`` in the TOML, ``url``
    in an API body."""
    return lambda name: f"{where}.{name}" if where else name


_NOT_IN_ADDRESS = re.compile(r"[\x00-\x20\x7f]")


def _parse_email(
    reader: _Reader, item: Mapping[str, Any], where: str, sent_secrets: bool
) -> EmailTarget:
    at = _under(where)
    tls = reader.string(item, "tls", at("tls"), "starttls")
    if tls not in ("starttls", "implicit"):
        raise reader.error(at("tls"), f"must be starttls or implicit, not {tls!r}")
    recipients = _strings(reader, item, "to", at("to"))
    sender = reader.string(item, "from", at("from"), required=True) or ""
    for key, address in (("from", sender), *(("to", r) for r in recipients)):
        # No space or control character: a CR or LF would start a header of its own.
        if "@" not in address or _NOT_IN_ADDRESS.search(address):
            raise reader.error(at(key), f"{address!r} is not an email address")
    if not recipients:
        raise reader.error(at("to"), "name at least one recipient")
    password_file, password_env, ca_file, password, ca_pem = None, None, None, None, None
    if sent_secrets:
        password = reader.string(item, "password", at("password"))
        ca_pem = reader.string(item, "tls_ca_pem", at("tls_ca_pem"))
        if ca_pem is not None:
            try:
                x509.load_pem_x509_certificates(ca_pem.encode())
            except ValueError:
                raise reader.error(at("tls_ca_pem"), "is not PEM certificates") from None
    else:
        password_file = reader.string(item, "password_file", at("password_file"))
        password_env = reader.string(item, "password_env", at("password_env"))
        if password_file and password_env:
            raise reader.error(at("password_file"), "name password_file or password_env")
        ca_file = reader.string(item, "tls_ca_file", at("tls_ca_file"))
    host = reader.string(item, "smtp_host", at("smtp_host"), required=True) or ""
    try:
        check_host(host)
    except ValueError as exc:
        raise reader.error(at("smtp_host"), str(exc)) from None
    return EmailTarget(
        host=host,
        port=reader.integer(
            item, "smtp_port", at("smtp_port"), 465 if tls == "implicit" else 587, 1, 65535
        ),
        tls=tls,
        sender=sender,
        recipients=recipients,
        username=reader.string(item, "username", at("username")),
        password_file=Path(password_file) if password_file else None,
        password_env=password_env,
        password_value=password,
        tls_ca_file=Path(ca_file) if ca_file else None,
        tls_ca_pem=ca_pem,
        timeout_seconds=reader.integer(item, "timeout_seconds", at("timeout_seconds"), 10, 1, 120),
    )


def _parse_notification(
    reader: _Reader,
    item: Mapping[str, Any],
    where: str,
    ca_names: Collection[str],
    *,
    sent_secrets: bool = False,
    secret_kept: bool = False,
) -> NotificationConfig:
    """One destination, from the TOML (secrets named) or from an API body
    (``sent_secrets``; ``secret_kept``: an update that leaves the stored secret as it is)."""
    at = _under(where)
    name = reader.string(item, "name", at("name"), required=True) or ""
    if not _NAME.match(name):
        raise reader.error(at("name"), "use letters, digits, '.', '_' or '-'")
    kind = reader.string(item, "type", at("type"), required=True)
    if kind not in ("webhook", "email"):
        raise reader.error(at("type"), f"must be webhook or email, not {kind!r}")
    secret_keys = (_SENT_SECRET_KEYS if sent_secrets else _NAMED_SECRET_KEYS)[kind]
    reader.table(item, where, [*_COMMON_NOTIFICATION_KEYS, *_NOTIFICATION_KEYS[kind], *secret_keys])
    url, secret_file, secret_env, secret, allow_reserved, email = "", None, None, None, False, None
    if kind == "webhook":
        url = reader.string(item, "url", at("url"), required=True) or ""
        allow_reserved = reader.boolean(
            item, "allow_reserved_addresses", at("allow_reserved_addresses"), False
        )
        try:
            check_webhook_url(url, allow_reserved)
        except ValueError as exc:
            raise reader.error(at("url"), str(exc)) from None
        if sent_secrets:
            secret = reader.string(item, "secret", at("secret"), required=not secret_kept)
        else:
            secret_file = reader.string(item, "secret_file", at("secret_file"))
            secret_env = reader.string(item, "secret_env", at("secret_env"))
            if bool(secret_file) == bool(secret_env):
                raise reader.error(
                    at("secret_file"), "name exactly one of secret_file and secret_env"
                )
    else:
        email = _parse_email(reader, item, where, sent_secrets)
    events = _strings(reader, item, "events", at("events"))
    known = {t.value for t in EventType}
    for event in events:
        if event not in known:
            raise reader.error(
                at("events"),
                f"unknown event type {event!r}; known: {', '.join(sorted(known))}",
            )
    cas = _strings(reader, item, "cas", at("cas"))
    for ca in cas:
        if ca not in ca_names:
            raise reader.error(at("cas"), f"no CA named {ca!r}")
    return NotificationConfig(
        name=name,
        type=kind,
        url=url,
        email=email,
        secret_file=Path(secret_file) if secret_file else None,
        secret_env=secret_env,
        secret=secret,
        timeout_seconds=reader.integer(item, "timeout_seconds", at("timeout_seconds"), 10, 1, 120),
        max_attempts=reader.integer(item, "max_attempts", at("max_attempts"), 8, 1, 50),
        allow_reserved_addresses=allow_reserved,
        events=events,
        cas=cas,
        templates=_strings(reader, item, "templates", at("templates")),
    )


def check_sent_notification(
    item: Mapping[str, Any], ca_names: Collection[str], *, secret_kept: bool = False
) -> NotificationConfig:
    """A destination sent to the API (its secrets in it), checked by the TOML's rules;
    ConfigError naming the field (``key``) otherwise."""
    return _parse_notification(
        _Reader("", ""), item, "", ca_names, sent_secrets=True, secret_kept=secret_kept
    )


def load_config(path: Path) -> GatewayConfig:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", "", str(path)) from None
    return parse_config(text, str(path))


def connector_configs(
    config: GatewayConfig, installed: Sequence[str]
) -> tuple[ConnectorConfig, ...]:
    """The configured connectors; without a ``[[connectors]]`` array, one of every installed
    type, mounted at its type name and issuing from the last CA."""
    if config.connectors is not None:
        return config.connectors
    return tuple(
        ConnectorConfig(type=name, name=name, mount=f"/{name}", ca=config.cas[-1].name)
        for name in sorted(installed)
    )


def unknown_connector_type(
    config: GatewayConfig, index: int, name: str, installed: Sequence[str]
) -> ConfigError:
    close = difflib.get_close_matches(name, sorted(installed), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return config.error(
        f"connectors[{index}].type",
        f"unknown connector type {name!r}; {hint}installed: "
        f"{', '.join(sorted(installed)) or 'none'}",
    )


def check_connectors(config: GatewayConfig) -> None:
    """Everything a connector would refuse at start (its type, template and own settings),
    checked before any store is opened: `pkigate config check`, and `pkigate serve` before
    it creates or changes anything. Raises :class:`ConfigError` with the setting's line."""
    from pkigate.core.service import default_data_dir
    from pkigate.core.templates import TemplateCatalogue
    from pkigate.gateways.connectors import (
        ConnectorSettingsError,
        OfflineCore,
        discover,
        offline_context,
    )

    types = discover()
    offline = OfflineCore(
        templates=TemplateCatalogue(),
        data_dir=config.data_dir or default_data_dir(),
        key_algorithms={ca.name: ca.key_algorithm.value for ca in config.cas},
    )
    for index, item in enumerate(connector_configs(config, list(types))):
        where = f"connectors[{index}]"
        connector_type = types.get(item.type)
        if connector_type is None:
            raise unknown_connector_type(config, index, item.type, list(types))
        template = item.template or connector_type.default_template
        try:
            offline.templates.get(template)
        except Exception as exc:  # UnknownTemplateError names the template
            raise config.error(f"{where}.template", str(exc)) from None
        context = offline_context(
            item.name,
            item.type,
            item.mount,
            item.ca,
            template,
            item.validity or Validity.parse(connector_type.default_validity),
            offline,
        )
        try:
            connector_type.check_settings(item.settings, context, offline)
        except ConnectorSettingsError as exc:
            raise config.error(f"{where}.settings.{exc.key}", exc.message) from None


def check_file(path: Path) -> GatewayConfig:
    """`pkigate config check`: the whole file, touching nothing."""
    config = load_config(path)
    check_connectors(config)
    return config
