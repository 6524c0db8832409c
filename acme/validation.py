"""ACME challenge validation: the validation authority (RFC 8555 section 8, RFC 8737, RFC 8738).

:func:`validate` proves that an account controls an identifier by fetching the http-01 token
file, looking up the dns-01 TXT record or completing a tls-alpn-01 handshake. It is called
from a background job, never from a request: it blocks on the network for at most
``ValidationSettings.timeout`` seconds. It returns what was contacted (one
:class:`ValidationRecord` per connection, stored on the challenge like Boulder's
``validationRecord``) or raises :class:`~pkigate.acme.problems.AcmeProblem` whose detail says
which address was contacted and what it answered.

Every DNS lookup goes to the configured resolver, so that a test (or a split-horizon
deployment) sees the same answers as the CA. Addresses are not filtered: a private CA
validates internal names that resolve to private addresses.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import json
import re
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import dns.exception
import dns.name
import dns.rdtypes.txtbase
import dns.resolver
from cryptography import x509

from pkigate.acme.identifiers import Identifier
from pkigate.acme.jws import dns01_txt_value
from pkigate.acme.problems import AcmeProblem

HTTP01 = "http-01"
DNS01 = "dns-01"
TLS_ALPN01 = "tls-alpn-01"

ACME_TLS_ALPN_PROTOCOL = "acme-tls/1"
"""The only ALPN protocol a tls-alpn-01 validation offers (RFC 8737 section 6.2)."""

ID_PE_ACME_IDENTIFIER = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
"""id-pe-acmeIdentifier: the critical extension carrying SHA-256(key authorization)."""

DETAIL_EXCERPT_CHARS = 100
"""How much of a received body or TXT value a problem detail quotes."""

USER_AGENT = "pkigate-acme-validation"

_DEFAULT_PORTS = {"http": 80, "https": 443}
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# RFC 8555 section 8.1: tokens are base64url; anything else could escape the challenge path.
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_SHA256_OCTET_STRING_HEADER = b"\x04\x20"  # DER: OCTET STRING, 32 bytes


@dataclass(frozen=True)
class ValidationSettings:
    """How the validation authority reaches the applicant's servers."""

    resolver: tuple[str, int] | None = None
    """DNS server (IP address, port) asked for every lookup: A/AAAA for http-01 and
    tls-alpn-01, TXT for dns-01. None uses the system's resolver configuration."""
    http_port: int = 80
    """Port of the http-01 request (RFC 8555 section 8.3 says 80; tests use another)."""
    tls_port: int = 443
    """Port of the tls-alpn-01 handshake (RFC 8737 says 443); also allowed in https redirects."""
    timeout: float = 10.0
    """Seconds one validation may take in total: lookups, connections, redirects, reads."""
    max_redirects: int = 10
    """Redirects an http-01 validation follows before giving up."""
    max_body_bytes: int = 64 * 1024
    """Bytes of an http-01 response body read at most; a longer body fails validation."""
    dns_timeout: float = 5.0
    """Seconds one DNS query may take (within ``timeout``)."""

    def __post_init__(self) -> None:
        if self.resolver is not None:
            host, port = self.resolver
            ipaddress.ip_address(host)  # dnspython only asks servers by address
            _check_port(port, "resolver port")
        _check_port(self.http_port, "http_port")
        _check_port(self.tls_port, "tls_port")
        if self.timeout <= 0 or self.dns_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if self.max_redirects < 0 or self.max_body_bytes <= 0:
            raise ValueError("max_redirects must be >= 0 and max_body_bytes > 0")


def _check_port(port: int, name: str) -> None:
    if not 0 < port < 65536:
        raise ValueError(f"{name} {port} is not a TCP/UDP port")


@dataclass(frozen=True, kw_only=True)
class ValidationRecord:
    """One server the validation contacted; serialised like Boulder's ``validationRecord``."""

    url: str | None = None
    """The URL fetched (http-01 only, one record per redirect hop)."""
    hostname: str
    """The host name or IP address contacted, or the domain whose TXT record was read."""
    port: int | None = None
    addresses_resolved: tuple[str, ...] = ()
    """Every address the resolver returned for ``hostname`` (A records first, then AAAA)."""
    address_used: str | None = None
    """The address the validation connected to."""
    addresses_tried: tuple[str, ...] = ()
    """Addresses that refused or timed out before ``address_used`` answered."""

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {"hostname": self.hostname}
        if self.url is not None:
            document["url"] = self.url
        if self.port is not None:
            document["port"] = str(self.port)  # Boulder writes the port as a string
        if self.addresses_resolved:
            document["addressesResolved"] = list(self.addresses_resolved)
        if self.address_used is not None:
            document["addressUsed"] = self.address_used
        if self.addresses_tried:
            document["addressesTried"] = list(self.addresses_tried)
        return document

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> ValidationRecord:
        """A record stored on a challenge, read back."""
        port = document.get("port")
        return cls(
            url=document.get("url"),
            hostname=str(document.get("hostname", "")),
            port=int(port) if port not in (None, "") else None,
            addresses_resolved=tuple(document.get("addressesResolved", ())),
            address_used=document.get("addressUsed"),
            addresses_tried=tuple(document.get("addressesTried", ())),
        )


def validate(
    challenge_type: str,
    identifier: Identifier,
    token: str,
    key_authorization: str,
    settings: ValidationSettings,
) -> list[ValidationRecord]:
    """Validate one challenge; the records on success, :class:`AcmeProblem` on failure."""
    if challenge_type == HTTP01:
        return validate_http01(identifier, token, key_authorization, settings)
    if challenge_type == DNS01:
        return validate_dns01(identifier, key_authorization, settings)
    if challenge_type == TLS_ALPN01:
        return validate_tls_alpn01(identifier, key_authorization, settings)
    raise AcmeProblem("malformed", f"Unsupported challenge type {challenge_type!r}")


# --- Identifiers, deadlines and excerpts -------------------------------------------------


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parse_identifier(
    identifier: Identifier, *, allow_wildcard: bool
) -> tuple[str, IPAddress | None]:
    """The host to contact (lower-case name or compressed address) and its IP, if it is one."""
    if identifier.type == "ip":
        try:
            ip = ipaddress.ip_address(identifier.value)
        except ValueError:
            raise AcmeProblem(
                "malformed", f"IP identifier {_quote(identifier.value)} is not an IP address"
            ) from None
        return ip.compressed, ip
    if identifier.type != "dns":
        raise AcmeProblem(
            "unsupportedIdentifier", f"Identifier type {_quote(identifier.type)} is not supported"
        )
    name = identifier.value.lower()
    if name.startswith("*."):
        if not allow_wildcard:
            # RFC 8555 section 7.1.3: wildcard authorizations offer dns-01 only.
            raise AcmeProblem(
                "malformed",
                f"Wildcard identifier {_quote(name)} can only be validated with dns-01",
            )
        name = name[2:]
    if not _is_dns_name(name):
        raise AcmeProblem("malformed", f"Identifier {_quote(identifier.value)} is not a DNS name")
    return name, None


def _is_dns_name(name: str) -> bool:
    labels = name.split(".")
    return len(name) <= 253 and all(_DNS_LABEL.fullmatch(label) for label in labels)


class _Deadline:
    """The time left of ``ValidationSettings.timeout`` across every step of one validation."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds

    def left(self, problem_type: str, doing: str) -> float:
        remaining = self._end - time.monotonic()
        if remaining <= 0:
            raise AcmeProblem(problem_type, f"Validation timed out after {self.seconds:g}s {doing}")
        return remaining


def _quote(text: str, limit: int = DETAIL_EXCERPT_CHARS) -> str:
    """``text`` quoted (control characters escaped) and cut to ``limit`` characters."""
    quoted = json.dumps(text[:limit], ensure_ascii=False)
    return quoted + (f" (truncated, {len(text)} characters)" if len(text) > limit else "")


def _quote_bytes(data: bytes, limit: int = DETAIL_EXCERPT_CHARS) -> str:
    return _quote(data.decode("utf-8", "replace"), limit)


# --- DNS ---------------------------------------------------------------------------------


def _make_resolver(settings: ValidationSettings) -> dns.resolver.Resolver:
    if settings.resolver is None:
        try:
            return dns.resolver.Resolver()
        except dns.exception.DNSException as exc:
            raise AcmeProblem("dns", f"No system DNS resolver is configured: {exc}") from exc
    host, port = settings.resolver
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [host]
    resolver.port = port
    return resolver


def _resolver_label(settings: ValidationSettings) -> str:
    if settings.resolver is None:
        return "the system resolver"
    host, port = settings.resolver
    return f"resolver {_host_port(host, port)}"


def _lookup(name: str, rdtype: str, settings: ValidationSettings, deadline: _Deadline) -> list[Any]:
    """The rdata of ``name``/``rdtype`` (CNAMEs followed); empty for NXDOMAIN or no data."""
    doing = f"before the DNS query for {rdtype} records of {name}"
    lifetime = min(settings.dns_timeout, deadline.left("dns", doing))
    resolver = _make_resolver(settings)
    try:
        answer = resolver.resolve(dns.name.from_text(name), rdtype, lifetime=lifetime, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.exception.Timeout:
        raise AcmeProblem(
            "dns",
            f"DNS query for {rdtype} records of {name} timed out after {lifetime:g}s "
            f"({_resolver_label(settings)})",
        ) from None
    except dns.exception.DNSException as exc:
        # NoNameservers carries the server's rcode, e.g. "answered SERVFAIL".
        raise AcmeProblem(
            "dns", f"DNS query for {rdtype} records of {name} failed: {exc}"
        ) from None
    return list(answer)


def _resolve_addresses(
    host: str, settings: ValidationSettings, deadline: _Deadline
) -> tuple[str, ...]:
    """A then AAAA addresses of ``host``; a failed lookup only matters if both give nothing."""
    addresses: list[str] = []
    failure: AcmeProblem | None = None
    for rdtype in ("A", "AAAA"):
        try:
            addresses.extend(rdata.to_text() for rdata in _lookup(host, rdtype, settings, deadline))
        except AcmeProblem as problem:
            failure = failure or problem
    if addresses:
        return tuple(addresses)
    if failure is not None:
        raise failure
    raise AcmeProblem("dns", f"No A or AAAA records found for {host} ({_resolver_label(settings)})")


def _addresses_of(
    host: str, ip: IPAddress | None, settings: ValidationSettings, deadline: _Deadline
) -> tuple[str, ...]:
    found = (ip.compressed,) if ip is not None else _resolve_addresses(host, settings, deadline)
    usable = tuple(a for a in found if may_connect(a))
    if not usable:
        raise AcmeProblem(
            "connection",
            f"{host} has only addresses the validator does not connect to "
            f"({', '.join(found[:4])}: link-local, multicast, unspecified or reserved)",
        )
    return usable


def may_connect(address: str) -> bool:
    """Private and loopback addresses are where a private CA's servers are; link-local
    ones (169.254.169.254 is a cloud's metadata service) and the unroutable are not."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return True  # (::1 is in the reserved ::/8 too)
    return not (ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved)


# --- TCP ---------------------------------------------------------------------------------


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _connect_first(
    addresses: tuple[str, ...], port: int, what: str, deadline: _Deadline
) -> tuple[socket.socket, str, tuple[str, ...]]:
    """Connect to the first address that answers: (socket, address used, addresses tried).

    Each address gets an equal share of the time left, so one black-holed address does not
    use up the time of the next.
    """
    failures: list[str] = []
    for index, address in enumerate(addresses):
        doing = f"connecting to {what}"
        share = deadline.left("connection", doing) / (len(addresses) - index)
        try:
            sock = socket.create_connection((address, port), timeout=share)
        except TimeoutError:
            failures.append(f"{address}: timed out after {share:.3g}s")
        except ConnectionRefusedError:
            failures.append(f"{address}: connection refused")
        except OSError as exc:
            failures.append(f"{address}: {exc.strerror or exc}")
        else:
            return sock, address, tuple(addresses[:index])
    raise AcmeProblem("connection", f"Could not connect to {what}: " + "; ".join(failures))


# --- http-01 -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _HttpTarget:
    url: str
    scheme: str
    host: str
    """Host name (lower case) or IP address, without brackets."""
    ip: IPAddress | None
    port: int
    path: str
    """Path and query, as sent in the request line."""

    @property
    def host_header(self) -> str:
        return _authority(self.scheme, self.host, self.port)


def _authority(scheme: str, host: str, port: int) -> str:
    """``host[:port]`` as in a URL and a Host header (RFC 9110 section 7.2): IPv6 in
    brackets, the port only when it is not the scheme's default."""
    if port != _DEFAULT_PORTS[scheme]:
        return _host_port(host, port)
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True)
class _HttpResponse:
    status: int
    location: str | None
    body: bytes
    """At most ``max_body_bytes`` of the body."""
    oversized: bool


def validate_http01(
    identifier: Identifier, token: str, key_authorization: str, settings: ValidationSettings
) -> list[ValidationRecord]:
    """Fetch ``/.well-known/acme-challenge/<token>`` (RFC 8555 section 8.3)."""
    host, ip = _parse_identifier(identifier, allow_wildcard=False)
    if not _TOKEN.fullmatch(token):
        raise AcmeProblem("malformed", f"Token {_quote(token)} is not base64url")
    deadline = _Deadline(settings.timeout)
    path = f"/.well-known/acme-challenge/{token}"
    url = f"http://{_authority('http', host, settings.http_port)}{path}"
    target = _HttpTarget(url, "http", host, ip, settings.http_port, path)
    records: list[ValidationRecord] = []
    while True:
        record, response = _fetch(target, settings, deadline)
        records.append(record)
        if response.status not in _REDIRECT_STATUSES or response.location is None:
            break
        if len(records) > settings.max_redirects:
            raise AcmeProblem(
                "connection",
                f"Too many redirects: more than {settings.max_redirects} following {records[0].url}"
                f" (last hop {target.url} redirected to {_quote(response.location)})",
            )
        target = _redirect_target(target, response.location, settings)
    _check_http01_response(response, record, key_authorization, settings, len(records) > 1)
    return records


def _fetch(
    target: _HttpTarget, settings: ValidationSettings, deadline: _Deadline
) -> tuple[ValidationRecord, _HttpResponse]:
    addresses = _addresses_of(target.host, target.ip, settings, deadline)
    sock, address, tried = _connect_first(addresses, target.port, target.url, deadline)
    record = ValidationRecord(
        url=target.url,
        hostname=target.host,
        port=target.port,
        addresses_resolved=addresses,
        address_used=address,
        addresses_tried=tried,
    )
    where = f"{target.url} [{address}]"
    try:
        return record, _exchange(sock, target, settings, deadline, where)
    except ssl.SSLError as exc:
        raise AcmeProblem("tls", f"TLS error talking to {where}: {exc.reason or exc}") from None
    except TimeoutError:
        raise AcmeProblem("connection", f"Timed out waiting for the response of {where}") from None
    except OSError as exc:
        raise AcmeProblem(
            "connection", f"Connection to {where} failed: {exc.strerror or exc}"
        ) from None
    except http.client.HTTPException as exc:
        raise AcmeProblem("connection", f"Malformed HTTP response from {where}: {exc!r}") from None
    except ValueError as exc:  # a redirect path or host that http.client or ssl refuses
        raise AcmeProblem("connection", f"Cannot request {where}: {exc}") from None
    finally:
        sock.close()


def _exchange(
    sock: socket.socket,
    target: _HttpTarget,
    settings: ValidationSettings,
    deadline: _Deadline,
    where: str,
) -> _HttpResponse:
    """One GET over the connected socket; requests would connect (and proxy) on its own."""
    doing = f"fetching {where}"
    if target.scheme == "https":
        sock.settimeout(deadline.left("connection", doing))
        sni = None if target.ip is not None else target.host
        sock = _unverified_tls_context().wrap_socket(sock, server_hostname=sni)
    with sock:
        connection = http.client.HTTPConnection(target.host, target.port)
        connection.sock = sock
        sock.settimeout(deadline.left("connection", doing))
        connection.putrequest("GET", target.path, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", target.host_header)
        connection.putheader("User-Agent", USER_AGENT)
        connection.putheader("Accept", "*/*")
        connection.putheader("Connection", "close")
        connection.endheaders()
        with connection.getresponse() as response:
            chunks: list[bytes] = []
            size = 0
            # Read in pieces so that a server dripping bytes is still cut off at the deadline.
            while size <= settings.max_body_bytes:
                sock.settimeout(deadline.left("connection", doing))
                chunk = response.read1(settings.max_body_bytes + 1 - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            body = b"".join(chunks)
            return _HttpResponse(
                response.status,
                response.getheader("Location"),
                body[: settings.max_body_bytes],
                oversized=size > settings.max_body_bytes,
            )


def _unverified_tls_context() -> ssl.SSLContext:
    # RFC 8555 section 8.3: the server should not validate certificates when it follows a
    # redirect to https; the key authorization in the body is the proof.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _redirect_target(
    current: _HttpTarget, location: str, settings: ValidationSettings
) -> _HttpTarget:
    url = urljoin(current.url, location.strip())
    refused = f"Refusing the redirect from {current.url} to {_quote(url)}"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise AcmeProblem("connection", f"{refused}: not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise AcmeProblem(
            "connection", f"{refused}: only http and https are allowed, not {_quote(scheme)}"
        )
    # RFC 8555 section 8.3: redirects only to http on port 80 or https on port 443. The
    # configured ports are allowed too so that a test deployment can redirect to itself.
    allowed = {
        "http": {80, settings.http_port},
        "https": {443, settings.tls_port},
    }[scheme]
    port = port if port is not None else _DEFAULT_PORTS[scheme]
    if port not in allowed:
        ports = " or ".join(str(p) for p in sorted(allowed))
        raise AcmeProblem("connection", f"{refused}: {scheme} is only allowed on port {ports}")
    host = (parts.hostname or "").lower()
    try:
        ip: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        ip = None
        if not _is_dns_name(host.rstrip(".")):
            raise AcmeProblem(
                "connection", f"{refused}: {_quote(host)} is not a host name"
            ) from None
    path = parts.path or "/"
    if parts.query:
        path += f"?{parts.query}"
    return _HttpTarget(url, scheme, host, ip, port, path)


def _check_http01_response(
    response: _HttpResponse,
    record: ValidationRecord,
    key_authorization: str,
    settings: ValidationSettings,
    redirected: bool = False,
) -> None:
    where = f"{record.url} [{record.address_used}]"

    def shown(body: bytes) -> str:
        # After a redirect the body is from a URL the client chose, perhaps one only the
        # validator can reach: its contents are not echoed to the client (SSRF).
        if redirected:
            return f"{len(body)} bytes (not shown: the answer came after a redirect)"
        return _quote_bytes(body)

    if response.status != 200:
        raise AcmeProblem(
            "unauthorized",
            f"Invalid response from {where}: HTTP {response.status}, body {shown(response.body)}",
        )
    if response.oversized:
        raise AcmeProblem(
            "incorrectResponse",
            f"The response from {where} is larger than {settings.max_body_bytes} bytes; "
            f"it starts with {shown(response.body)}",
        )
    # RFC 8555 section 8.3: trailing whitespace (an editor's newline) is ignored.
    received = response.body.rstrip()
    if not hmac.compare_digest(received, key_authorization.encode()):
        raise AcmeProblem(
            "incorrectResponse",
            f"The key authorization from {where} is wrong: received {shown(received)}, "
            f"expected {_quote(key_authorization)}",
        )


# --- dns-01 ------------------------------------------------------------------------------


def validate_dns01(
    identifier: Identifier, key_authorization: str, settings: ValidationSettings
) -> list[ValidationRecord]:
    """Find dns01_txt_value(key_authorization) at ``_acme-challenge.<domain>`` (8.4)."""
    if identifier.type == "ip":
        # RFC 8738 section 7: IP identifiers have no DNS name to hold the TXT record.
        raise AcmeProblem(
            "malformed", f"dns-01 cannot validate the IP identifier {identifier.value}"
        )
    domain, _ = _parse_identifier(identifier, allow_wildcard=True)
    name = f"_acme-challenge.{domain}"
    deadline = _Deadline(settings.timeout)
    values = [
        b"".join(rdata.strings).decode("utf-8", "replace")
        for rdata in _lookup(name, "TXT", settings, deadline)
        if isinstance(rdata, dns.rdtypes.txtbase.TXTBase)
    ]
    if not values:
        raise AcmeProblem("dns", f"No TXT record found at {name} ({_resolver_label(settings)})")
    expected = dns01_txt_value(key_authorization)
    if expected not in values:
        shown = ", ".join(_quote(value) for value in values[:3])
        more = f" and {len(values) - 3} more" if len(values) > 3 else ""
        raise AcmeProblem(
            "unauthorized",
            f"Found {len(values)} TXT record(s) at {name}, none with the expected value "
            f"{_quote(expected)}: {shown}{more}",
        )
    return [ValidationRecord(hostname=domain)]


# --- tls-alpn-01 -------------------------------------------------------------------------


def validate_tls_alpn01(
    identifier: Identifier, key_authorization: str, settings: ValidationSettings
) -> list[ValidationRecord]:
    """Check the acme-tls/1 certificate served for the identifier (RFC 8737, RFC 8738)."""
    host, ip = _parse_identifier(identifier, allow_wildcard=False)
    # RFC 8738 section 6: for an IP the SNI is its reverse-mapping name (in-addr/ip6.arpa).
    sni = ip.reverse_pointer if ip is not None else host
    deadline = _Deadline(settings.timeout)
    addresses = _addresses_of(host, ip, settings, deadline)
    what = _host_port(host, settings.tls_port)
    sock, address, tried = _connect_first(addresses, settings.tls_port, what, deadline)
    where = f"{what} [{address}] (SNI {sni})"
    with sock:
        der = _acme_tls_handshake(sock, sni, where, deadline)
    _check_acme_tls_certificate(der, host, ip, key_authorization, where)
    return [
        ValidationRecord(
            hostname=host,
            port=settings.tls_port,
            addresses_resolved=addresses,
            address_used=address,
            addresses_tried=tried,
        )
    ]


def _acme_tls_handshake(sock: socket.socket, sni: str, where: str, deadline: _Deadline) -> bytes:
    """The DER certificate the server presents when asked for acme-tls/1 only."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # RFC 8737 section 3: the certificate is self-signed; its extension is the proof.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols([ACME_TLS_ALPN_PROTOCOL])
    try:
        sock.settimeout(deadline.left("connection", f"before the TLS handshake with {where}"))
        with context.wrap_socket(sock, server_hostname=sni) as tls:
            protocol = tls.selected_alpn_protocol()
            der = tls.getpeercert(binary_form=True)
    except ssl.SSLError as exc:
        raise AcmeProblem(
            "tls", f"TLS handshake with {where} failed: {exc.reason or exc}"
        ) from None
    except TimeoutError:
        raise AcmeProblem("connection", f"Timed out in the TLS handshake with {where}") from None
    except OSError as exc:
        raise AcmeProblem(
            "connection", f"TLS handshake with {where} failed: {exc.strerror or exc}"
        ) from None
    if protocol != ACME_TLS_ALPN_PROTOCOL:
        raise AcmeProblem(
            "tls",
            f"Cannot negotiate ALPN protocol {ACME_TLS_ALPN_PROTOCOL!r} with {where}: "
            f"the server selected {protocol!r}",
        )
    if not der:
        raise AcmeProblem("unauthorized", f"{where} presented no certificate")
    return der


def _check_acme_tls_certificate(
    der: bytes, host: str, ip: IPAddress | None, key_authorization: str, where: str
) -> None:
    wrong = f"Incorrect tls-alpn-01 certificate from {where}"
    try:
        certificate = x509.load_der_x509_certificate(der)
        extensions = certificate.extensions
    except (ValueError, x509.InvalidVersion) as exc:
        raise AcmeProblem("unauthorized", f"{wrong}: it cannot be parsed ({exc})") from None
    expected_name: x509.GeneralName = x509.IPAddress(ip) if ip is not None else x509.DNSName(host)
    expected_text = _describe_name(expected_name)
    try:
        names = list(extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        names = []
    # RFC 8737 section 3: exactly one subjectAltName, the identifier being validated.
    if len(names) != 1 or _describe_name(names[0]).lower() != expected_text.lower():
        received = ", ".join(_describe_name(name) for name in names) or "none"
        raise AcmeProblem(
            "unauthorized",
            f"{wrong}: expected exactly one subjectAltName {expected_text}, received {received}",
        )
    try:
        extension = extensions.get_extension_for_oid(ID_PE_ACME_IDENTIFIER)
    except x509.ExtensionNotFound:
        raise AcmeProblem(
            "unauthorized",
            f"{wrong}: it has no acmeIdentifier extension ({ID_PE_ACME_IDENTIFIER.dotted_string})",
        ) from None
    if not extension.critical:
        raise AcmeProblem(
            "unauthorized", f"{wrong}: its acmeIdentifier extension is not marked critical"
        )
    value = extension.value.public_bytes()
    digest = hashlib.sha256(key_authorization.encode()).digest()
    if not (len(value) == 34 and value.startswith(_SHA256_OCTET_STRING_HEADER)):
        raise AcmeProblem(
            "unauthorized",
            f"{wrong}: its acmeIdentifier extension is not a DER OCTET STRING of 32 bytes "
            f"(received {len(value)} bytes: {value[:40].hex()})",
        )
    if not hmac.compare_digest(value[2:], digest):
        raise AcmeProblem(
            "unauthorized",
            f"{wrong}: its acmeIdentifier holds SHA-256 {value[2:].hex()}, expected "
            f"{digest.hex()} (the SHA-256 of the key authorization)",
        )


def _describe_name(name: x509.GeneralName) -> str:
    if isinstance(name, x509.DNSName):
        return f"DNS:{name.value}"
    if isinstance(name, x509.IPAddress):
        return f"IP:{name.value}"
    return f"{type(name).__name__}:{name.value}"
