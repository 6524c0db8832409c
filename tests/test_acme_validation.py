"""ACME challenge validation against real servers on loopback.

http-01 fetches from a threading http.server, tls-alpn-01 handshakes with an ssl server
presenting certificates made here, and every DNS lookup (A/AAAA and TXT) goes to a real
pebble-challtestsrv, which answers A queries for any name with 127.0.0.1.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from challtestsrv import ChallTestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pkigate.acme.problems import AcmeProblem
from pkigate.acme.validation import (
    ID_PE_ACME_IDENTIFIER,
    Identifier,
    ValidationRecord,
    ValidationSettings,
    dns01_txt_value,
    validate,
    validate_dns01,
    validate_http01,
    validate_tls_alpn01,
)
from pkigate.devsim.spawn import free_port

# The token and key authorization of RFC 8555 section 8.3's example.
TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
KEY_AUTHORIZATION = f"{TOKEN}.nP1qzpXGymHBrUEepNY9HCsQk7K8KhOypzEt62jcerQ"
CHALLENGE_PATH = f"/.well-known/acme-challenge/{TOKEN}"
LOCALHOST = Identifier("ip", "127.0.0.1")


def problem_of(call: Any, *args: Any) -> AcmeProblem:
    with pytest.raises(AcmeProblem) as caught:
        call(*args)
    return caught.value


# --- Servers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int = 200
    body: bytes = b""
    location: str | None = None


class _ChallengeHandler(BaseHTTPRequestHandler):
    server: ChallengeHTTPServer

    def do_GET(self) -> None:
        self.server.seen.append((self.path, self.headers.get("Host")))
        reply = self.server.replies.get(self.path, Reply(404, b"no such file"))
        self.send_response(reply.status)
        if reply.location is not None:
            self.send_header("Location", reply.location)
        self.send_header("Content-Length", str(len(reply.body)))
        self.end_headers()
        self.wfile.write(reply.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class ChallengeHTTPServer(ThreadingHTTPServer):
    """Answers GETs from ``replies`` (path -> Reply), remembering (path, Host) of each."""

    daemon_threads = True

    def __init__(self, host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, 0), _ChallengeHandler)
        if tls is not None:
            self.socket = tls.wrap_socket(self.socket, server_side=True)
        self.port = int(self.server_address[1])
        self.replies: dict[str, Reply] = {}
        self.seen: list[tuple[str, str | None]] = []
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # the validator hangs up on oversized bodies: a broken pipe here is expected

    def __enter__(self) -> ChallengeHTTPServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(5)


class AcmeTlsServer:
    """Completes TLS handshakes with ``context``, remembering the SNI of each."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.sni: list[str | None] = []
        context.sni_callback = self._record_sni
        self._context = context
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)
        self.port = int(self._listener.getsockname()[1])
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _record_sni(self, _socket: Any, name: str | None, _context: Any) -> None:
        self.sni.append(name)

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(2)
                try:
                    with self._context.wrap_socket(connection, server_side=True) as tls:
                        tls.recv(1)  # until the validator hangs up
                except OSError:
                    pass

    def __enter__(self) -> AcmeTlsServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()
        self._thread.join(5)
        self._listener.close()


# --- Certificates -------------------------------------------------------------------------

KEY = ec.generate_private_key(ec.SECP256R1())


def acme_identifier_value(key_authorization: str = KEY_AUTHORIZATION) -> bytes:
    """DER OCTET STRING of SHA-256(key authorization), as RFC 8737 section 3 requires."""
    return b"\x04\x20" + hashlib.sha256(key_authorization.encode()).digest()


def self_signed(
    sans: list[x509.GeneralName],
    acme_identifier: bytes | None = None,
    *,
    critical: bool = True,
) -> x509.Certificate:
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "acme validation test")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(KEY.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
    )
    if acme_identifier is not None:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(ID_PE_ACME_IDENTIFIER, acme_identifier), critical=critical
        )
    return builder.sign(KEY, hashes.SHA256())


def server_context(
    tmp_path: Path, certificate: x509.Certificate, *, alpn: bool = True
) -> ssl.SSLContext:
    cert_file, key_file = tmp_path / f"{uuid.uuid4().hex}.pem", tmp_path / "key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    if alpn:
        context.set_alpn_protocols(["acme-tls/1"])
    return context


# --- Fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def challtestsrv() -> Iterator[ChallTestServer]:
    if not ChallTestServer.available():
        pytest.skip("pebble-challtestsrv is not installed (Debian package pebble)")
    with ChallTestServer() as server:
        yield server


@pytest.fixture
def domain() -> str:
    """A name of this test's own: challtestsrv records outlive a test."""
    return f"{uuid.uuid4().hex[:12]}.example.test"


@pytest.fixture
def web() -> Iterator[ChallengeHTTPServer]:
    with ChallengeHTTPServer() as server:
        yield server


def settings_for(
    challtestsrv: ChallTestServer | None = None, **overrides: Any
) -> ValidationSettings:
    values: dict[str, Any] = {"timeout": 3.0, "dns_timeout": 1.0}
    if challtestsrv is not None:
        values["resolver"] = challtestsrv.dns_address
    values.update(overrides)
    return ValidationSettings(**values)


# --- http-01 ------------------------------------------------------------------------------


def test_http01_passes_when_the_token_file_holds_the_key_authorization(
    web: ChallengeHTTPServer,
) -> None:
    web.replies[CHALLENGE_PATH] = Reply(body=KEY_AUTHORIZATION.encode())

    records = validate_http01(LOCALHOST, TOKEN, KEY_AUTHORIZATION, settings_for(http_port=web.port))

    url = f"http://127.0.0.1:{web.port}{CHALLENGE_PATH}"
    assert records == [
        ValidationRecord(
            url=url,
            hostname="127.0.0.1",
            port=web.port,
            addresses_resolved=("127.0.0.1",),
            address_used="127.0.0.1",
        )
    ]
    assert web.seen == [(CHALLENGE_PATH, f"127.0.0.1:{web.port}")]


def test_http01_ignores_trailing_whitespace_after_the_key_authorization(
    web: ChallengeHTTPServer,
) -> None:
    web.replies[CHALLENGE_PATH] = Reply(body=KEY_AUTHORIZATION.encode() + b"\r\n \t\n")

    records = validate_http01(LOCALHOST, TOKEN, KEY_AUTHORIZATION, settings_for(http_port=web.port))

    assert len(records) == 1


def test_http01_wrong_body_is_incorrect_response_quoting_what_was_received(
    web: ChallengeHTTPServer,
) -> None:
    received = "<html>" + "x" * 150
    web.replies[CHALLENGE_PATH] = Reply(body=received.encode())

    problem = problem_of(
        validate_http01, LOCALHOST, TOKEN, KEY_AUTHORIZATION, settings_for(http_port=web.port)
    )

    assert problem.type == "incorrectResponse"
    assert f"http://127.0.0.1:{web.port}{CHALLENGE_PATH} [127.0.0.1]" in problem.detail
    assert f'received "{received[:100]}" (truncated, 156 characters)' in problem.detail
    assert received[:101] not in problem.detail


def test_http01_not_found_is_unauthorized_with_the_status(web: ChallengeHTTPServer) -> None:
    problem = problem_of(
        validate_http01, LOCALHOST, TOKEN, KEY_AUTHORIZATION, settings_for(http_port=web.port)
    )

    assert problem.type == "unauthorized"
    assert "HTTP 404" in problem.detail
    assert "no such file" in problem.detail


def test_http01_follows_redirects_and_records_every_hop(web: ChallengeHTTPServer) -> None:
    web.replies[CHALLENGE_PATH] = Reply(301, location="/hop1")
    web.replies["/hop1"] = Reply(307, location=f"http://127.0.0.1:{web.port}/hop2?x=1")
    web.replies["/hop2?x=1"] = Reply(body=KEY_AUTHORIZATION.encode())

    records = validate_http01(LOCALHOST, TOKEN, KEY_AUTHORIZATION, settings_for(http_port=web.port))

    base = f"http://127.0.0.1:{web.port}"
    assert [r.url for r in records] == [
        f"{base}{CHALLENGE_PATH}",
        f"{base}/hop1",
        f"{base}/hop2?x=1",
    ]
    assert [path for path, _ in web.seen] == [CHALLENGE_PATH, "/hop1", "/hop2?x=1"]


def test_http01_redirect_to_a_port_other_than_80_or_443_is_refused(
    web: ChallengeHTTPServer,
) -> None:
    other = free_port()
    web.replies[CHALLENGE_PATH] = Reply(302, location=f"http://127.0.0.1:{other}/elsewhere")

    problem = problem_of(
        validate_http01, LOCALHOST, TOKEN, KEY_AUTHORIZATION, settings_for(http_port=web.port)
    )

    assert problem.type == "connection"
    assert f"127.0.0.1:{other}/elsewhere" in problem.detail
    assert "only allowed on port 80" in problem.detail
    assert len(web.seen) == 1


def test_http01_does_not_echo_what_it_was_redirected_to(web: ChallengeHTTPServer) -> None:
    """Found in review: a client's redirect to a URL only the validator reaches (an internal
    service) had its body quoted back in the problem detail. Without a redirect the body
    of the challenge URL itself is still quoted, for the client's debugging."""
    web.replies[CHALLENGE_PATH] = Reply(302, location="/admin/config")
    web.replies["/admin/config"] = Reply(body=b"db_password=hunter2")
    problem = problem_of(
        validate_http01, LOCALHOST, TOKEN, KEY_AUTHORIZATION, settings_for(http_port=web.port)
    )
    assert problem.type == "incorrectResponse"
    assert "hunter2" not in problem.detail
    assert "19 bytes (not shown: the answer came after a redirect)" in problem.detail
    web.replies["/admin/config"] = Reply(403, body=b"forbidden: hunter2")
    refused = problem_of(
        validate_http01, LOCALHOST, TOKEN, KEY_AUTHORIZATION, settings_for(http_port=web.port)
    )
    assert refused.type == "unauthorized" and "hunter2" not in refused.detail
    web.replies[CHALLENGE_PATH] = Reply(body=b"not the key authorization")
    direct = problem_of(
        validate_http01, LOCALHOST, TOKEN, KEY_AUTHORIZATION, settings_for(http_port=web.port)
    )
    assert '"not the key authorization"' in direct.detail


UNREACHABLE = ["169.254.169.254", "fe80::1", "0.0.0.0", "::ffff:169.254.169.254", "224.0.0.1"]  # noqa: S104


@pytest.mark.parametrize("address", UNREACHABLE)
def test_the_validator_never_connects_to_link_local_or_unroutable_addresses(
    web: ChallengeHTTPServer, address: str
) -> None:
    """A cloud's metadata service is at 169.254.169.254: neither an identifier nor a
    redirect takes the validator to a link-local, multicast, unspecified or reserved
    address (private and loopback ones are where a private CA's servers are)."""
    direct = problem_of(
        validate_http01,
        Identifier("ip", address),
        TOKEN,
        KEY_AUTHORIZATION,
        settings_for(http_port=web.port),
    )
    assert direct.type == "connection" and "does not connect to" in direct.detail
    host = f"[{address}]" if ":" in address else address
    web.replies[CHALLENGE_PATH] = Reply(302, location=f"http://{host}:{web.port}/latest")
    redirected = problem_of(
        validate_http01, LOCALHOST, TOKEN, KEY_AUTHORIZATION, settings_for(http_port=web.port)
    )
    assert redirected.type == "connection" and "does not connect to" in redirected.detail
    assert [path for path, _ in web.seen] == [CHALLENGE_PATH]


def test_http01_redirect_to_a_scheme_other_than_http_or_https_is_refused(
    web: ChallengeHTTPServer,
) -> None:
    web.replies[CHALLENGE_PATH] = Reply(302, location="ftp://127.0.0.1/key")

    problem = problem_of(
        validate_http01, LOCALHOST, TOKEN, KEY_AUTHORIZATION, settings_for(http_port=web.port)
    )

    assert problem.type == "connection"
    assert 'not "ftp"' in problem.detail


def test_http01_redirect_loop_stops_after_max_redirects(web: ChallengeHTTPServer) -> None:
    web.replies[CHALLENGE_PATH] = Reply(302, location="/loop-a")
    web.replies["/loop-a"] = Reply(302, location="/loop-b")
    web.replies["/loop-b"] = Reply(302, location="/loop-a")

    problem = problem_of(
        validate_http01,
        LOCALHOST,
        TOKEN,
        KEY_AUTHORIZATION,
        settings_for(http_port=web.port, max_redirects=3),
    )

    assert problem.type == "connection"
    assert "Too many redirects: more than 3" in problem.detail
    assert len(web.seen) == 4  # the first request and three redirects


def test_http01_body_larger_than_max_body_bytes_is_incorrect_response(
    web: ChallengeHTTPServer,
) -> None:
    web.replies[CHALLENGE_PATH] = Reply(body=KEY_AUTHORIZATION.encode() + b" " * 4096)

    problem = problem_of(
        validate_http01,
        LOCALHOST,
        TOKEN,
        KEY_AUTHORIZATION,
        settings_for(http_port=web.port, max_body_bytes=1024),
    )

    assert problem.type == "incorrectResponse"
    assert "larger than 1024 bytes" in problem.detail


def test_http01_connection_refused_is_a_connection_problem() -> None:
    port = free_port()

    problem = problem_of(
        validate_http01, LOCALHOST, TOKEN, KEY_AUTHORIZATION, settings_for(http_port=port)
    )

    assert problem.type == "connection"
    url = f"http://127.0.0.1:{port}{CHALLENGE_PATH}"
    assert f"{url}: 127.0.0.1: connection refused" in problem.detail


def test_http01_server_that_never_answers_times_out_within_the_timeout() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # listens, never accepts
        started = time.monotonic()
        problem = problem_of(
            validate_http01,
            LOCALHOST,
            TOKEN,
            KEY_AUTHORIZATION,
            settings_for(http_port=silent.getsockname()[1], timeout=0.5),
        )

    assert problem.type == "connection"
    assert "timed out" in problem.detail.lower()
    assert time.monotonic() - started < 2


def test_http01_resolves_the_name_with_the_configured_resolver(
    web: ChallengeHTTPServer, challtestsrv: ChallTestServer, domain: str
) -> None:
    web.replies[CHALLENGE_PATH] = Reply(body=KEY_AUTHORIZATION.encode())

    records = validate_http01(
        Identifier("dns", domain),
        TOKEN,
        KEY_AUTHORIZATION,
        settings_for(challtestsrv, http_port=web.port),
    )

    assert records[0].hostname == domain
    assert records[0].addresses_resolved == ("127.0.0.1",)
    assert records[0].url == f"http://{domain}:{web.port}{CHALLENGE_PATH}"
    assert web.seen == [(CHALLENGE_PATH, f"{domain}:{web.port}")]


def test_http01_tries_the_next_address_when_one_refuses(
    web: ChallengeHTTPServer, challtestsrv: ChallTestServer, domain: str
) -> None:
    challtestsrv.add_a(domain, ["127.0.0.2", "127.0.0.1"])  # the server listens on .1 only
    web.replies[CHALLENGE_PATH] = Reply(body=KEY_AUTHORIZATION.encode())

    [record] = validate_http01(
        Identifier("dns", domain),
        TOKEN,
        KEY_AUTHORIZATION,
        settings_for(challtestsrv, http_port=web.port),
    )

    assert record.addresses_resolved == ("127.0.0.2", "127.0.0.1")
    assert record.addresses_tried == ("127.0.0.2",)
    assert record.address_used == "127.0.0.1"


def test_http01_redirect_to_another_name_resolves_it_and_sends_its_host(
    web: ChallengeHTTPServer, challtestsrv: ChallTestServer, domain: str
) -> None:
    challtestsrv.add_a(f"www.{domain}", ["127.0.0.1"])
    web.replies[CHALLENGE_PATH] = Reply(
        302, location=f"http://www.{domain}:{web.port}/moved/{TOKEN}"
    )
    web.replies[f"/moved/{TOKEN}"] = Reply(body=KEY_AUTHORIZATION.encode())

    records = validate_http01(
        Identifier("dns", domain),
        TOKEN,
        KEY_AUTHORIZATION,
        settings_for(challtestsrv, http_port=web.port),
    )

    assert [r.hostname for r in records] == [domain, f"www.{domain}"]
    assert web.seen[1] == (f"/moved/{TOKEN}", f"www.{domain}:{web.port}")


def test_http01_redirect_to_https_does_not_verify_the_certificate(
    web: ChallengeHTTPServer, challtestsrv: ChallTestServer, domain: str, tmp_path: Path
) -> None:
    untrusted = self_signed([x509.DNSName("not-the-right-name.example")])
    context = server_context(tmp_path, untrusted, alpn=False)
    sni: list[str | None] = []
    context.sni_callback = lambda _socket, name, _context: sni.append(name)
    with ChallengeHTTPServer(tls=context) as secure:
        web.replies[CHALLENGE_PATH] = Reply(
            302, location=f"https://secure.{domain}:{secure.port}/key"
        )
        secure.replies["/key"] = Reply(body=KEY_AUTHORIZATION.encode())

        records = validate_http01(
            Identifier("dns", domain),
            TOKEN,
            KEY_AUTHORIZATION,
            settings_for(challtestsrv, http_port=web.port, tls_port=secure.port),
        )

    assert records[1].url == f"https://secure.{domain}:{secure.port}/key"
    assert sni == [f"secure.{domain}"]
    assert secure.seen == [("/key", f"secure.{domain}:{secure.port}")]


def test_http01_ipv6_identifier_is_fetched_with_the_address_in_brackets() -> None:
    try:
        server = ChallengeHTTPServer("::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    with server:
        server.replies[CHALLENGE_PATH] = Reply(body=KEY_AUTHORIZATION.encode())

        [record] = validate_http01(
            Identifier("ip", "::1"), TOKEN, KEY_AUTHORIZATION, settings_for(http_port=server.port)
        )

    assert record.url == f"http://[::1]:{server.port}{CHALLENGE_PATH}"
    assert server.seen == [(CHALLENGE_PATH, f"[::1]:{server.port}")]


def test_http01_name_whose_lookup_fails_is_a_dns_problem(
    challtestsrv: ChallTestServer, domain: str
) -> None:
    challtestsrv.set_servfail(domain)

    problem = problem_of(
        validate_http01,
        Identifier("dns", domain),
        TOKEN,
        KEY_AUTHORIZATION,
        settings_for(challtestsrv),
    )

    assert problem.type == "dns"
    assert "SERVFAIL" in problem.detail


def test_http01_refuses_wildcards_and_tokens_that_are_not_base64url() -> None:
    wildcard = problem_of(
        validate_http01, Identifier("dns", "*.example.test"), TOKEN, KEY_AUTHORIZATION,
        settings_for(),
    )  # fmt: skip
    traversal = problem_of(
        validate_http01, LOCALHOST, "../../etc/passwd", KEY_AUTHORIZATION, settings_for()
    )

    assert (wildcard.type, traversal.type) == ("malformed", "malformed")
    assert "dns-01" in wildcard.detail


# --- dns-01 -------------------------------------------------------------------------------


def test_dns01_txt_value_is_unpadded_base64url_of_the_sha256() -> None:
    assert dns01_txt_value("abc") == "ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0"
    expected = base64.urlsafe_b64encode(hashlib.sha256(KEY_AUTHORIZATION.encode()).digest())
    assert dns01_txt_value(KEY_AUTHORIZATION) == expected.decode().rstrip("=")


def test_dns01_passes_when_the_txt_record_holds_the_digest(
    challtestsrv: ChallTestServer, domain: str
) -> None:
    challtestsrv.set_txt(f"_acme-challenge.{domain}", dns01_txt_value(KEY_AUTHORIZATION))

    records = validate_dns01(
        Identifier("dns", domain), KEY_AUTHORIZATION, settings_for(challtestsrv)
    )

    assert records == [ValidationRecord(hostname=domain)]


def test_dns01_wildcard_is_validated_at_the_base_domain(
    challtestsrv: ChallTestServer, domain: str
) -> None:
    challtestsrv.set_txt(f"_acme-challenge.{domain}", dns01_txt_value(KEY_AUTHORIZATION))

    records = validate_dns01(
        Identifier("dns", f"*.{domain}"), KEY_AUTHORIZATION, settings_for(challtestsrv)
    )

    assert records[0].hostname == domain


def test_dns01_passes_when_one_of_several_txt_records_matches(
    challtestsrv: ChallTestServer, domain: str
) -> None:
    challtestsrv.set_txt(f"_acme-challenge.{domain}", "left over from last month")
    challtestsrv.set_txt(f"_acme-challenge.{domain}", dns01_txt_value(KEY_AUTHORIZATION))

    validate_dns01(Identifier("dns", domain), KEY_AUTHORIZATION, settings_for(challtestsrv))


def test_dns01_wrong_values_are_unauthorized_and_counted(
    challtestsrv: ChallTestServer, domain: str
) -> None:
    challtestsrv.set_txt(f"_acme-challenge.{domain}", "stale-one")
    challtestsrv.set_txt(f"_acme-challenge.{domain}", "stale-two")

    problem = problem_of(
        validate_dns01, Identifier("dns", domain), KEY_AUTHORIZATION, settings_for(challtestsrv)
    )

    assert problem.type == "unauthorized"
    assert f"Found 2 TXT record(s) at _acme-challenge.{domain}" in problem.detail
    assert '"stale-one", "stale-two"' in problem.detail
    assert dns01_txt_value(KEY_AUTHORIZATION) in problem.detail


def test_dns01_missing_record_is_a_dns_problem(challtestsrv: ChallTestServer, domain: str) -> None:
    problem = problem_of(
        validate_dns01, Identifier("dns", domain), KEY_AUTHORIZATION, settings_for(challtestsrv)
    )

    assert problem.type == "dns"
    assert f"No TXT record found at _acme-challenge.{domain}" in problem.detail


def test_dns01_follows_a_cname_to_the_delegated_record(
    challtestsrv: ChallTestServer, domain: str
) -> None:
    delegated = f"_acme-challenge.{domain}.acme-delegation.test"
    challtestsrv.set_cname(f"_acme-challenge.{domain}", delegated)
    challtestsrv.set_txt(delegated, dns01_txt_value(KEY_AUTHORIZATION))

    validate_dns01(Identifier("dns", domain), KEY_AUTHORIZATION, settings_for(challtestsrv))


def test_dns01_servfail_is_a_dns_problem(challtestsrv: ChallTestServer, domain: str) -> None:
    challtestsrv.set_servfail(f"_acme-challenge.{domain}")

    problem = problem_of(
        validate_dns01, Identifier("dns", domain), KEY_AUTHORIZATION, settings_for(challtestsrv)
    )

    assert problem.type == "dns"
    assert "SERVFAIL" in problem.detail


def test_dns01_resolver_that_never_answers_times_out_as_a_dns_problem() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        started = time.monotonic()
        problem = problem_of(
            validate_dns01,
            Identifier("dns", "example.test"),
            KEY_AUTHORIZATION,
            settings_for(resolver=silent.getsockname(), dns_timeout=0.3),
        )

    assert problem.type == "dns"
    assert "timed out" in problem.detail
    assert time.monotonic() - started < 2


def test_dns01_refuses_ip_identifiers() -> None:
    problem = problem_of(validate_dns01, LOCALHOST, KEY_AUTHORIZATION, settings_for())

    assert problem.type == "malformed"


# --- tls-alpn-01 --------------------------------------------------------------------------


def test_tls_alpn01_passes_with_the_acme_identifier_certificate(
    challtestsrv: ChallTestServer, domain: str, tmp_path: Path
) -> None:
    certificate = self_signed([x509.DNSName(domain)], acme_identifier_value())
    with AcmeTlsServer(server_context(tmp_path, certificate)) as server:
        records = validate_tls_alpn01(
            Identifier("dns", domain),
            KEY_AUTHORIZATION,
            settings_for(challtestsrv, tls_port=server.port),
        )

    assert records == [
        ValidationRecord(
            hostname=domain,
            port=server.port,
            addresses_resolved=("127.0.0.1",),
            address_used="127.0.0.1",
        )
    ]
    assert server.sni == [domain]


def test_tls_alpn01_ip_identifier_uses_the_reverse_name_as_sni(tmp_path: Path) -> None:
    certificate = self_signed(
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))], acme_identifier_value()
    )
    with AcmeTlsServer(server_context(tmp_path, certificate)) as server:
        validate_tls_alpn01(LOCALHOST, KEY_AUTHORIZATION, settings_for(tls_port=server.port))

    assert server.sni == ["1.0.0.127.in-addr.arpa"]


@pytest.mark.parametrize(
    ("sans", "extension", "critical", "expected"),
    [
        ([x509.DNSName("a.test")], None, True, "has no acmeIdentifier extension"),
        ([x509.DNSName("a.test")], acme_identifier_value(), False, "not marked critical"),
        (
            [x509.DNSName("a.test")],
            acme_identifier_value("someone else's key authorization"),
            True,
            "expected " + hashlib.sha256(KEY_AUTHORIZATION.encode()).hexdigest(),
        ),
        (
            [x509.DNSName("a.test")],
            hashlib.sha256(KEY_AUTHORIZATION.encode()).digest(),  # not wrapped in DER
            True,
            "not a DER OCTET STRING of 32 bytes",
        ),
        (
            [x509.DNSName("a.test"), x509.DNSName("b.test")],
            acme_identifier_value(),
            True,
            "expected exactly one subjectAltName DNS:a.test, received DNS:a.test, DNS:b.test",
        ),
        (
            [x509.DNSName("b.test")],
            acme_identifier_value(),
            True,
            "received DNS:b.test",
        ),
    ],
    ids=["no-extension", "not-critical", "wrong-digest", "raw-digest", "two-sans", "wrong-san"],
)
def test_tls_alpn01_wrong_certificate_is_unauthorized(
    challtestsrv: ChallTestServer,
    tmp_path: Path,
    sans: list[x509.GeneralName],
    extension: bytes | None,
    critical: bool,
    expected: str,
) -> None:
    certificate = self_signed(sans, extension, critical=critical)
    with AcmeTlsServer(server_context(tmp_path, certificate)) as server:
        problem = problem_of(
            validate_tls_alpn01,
            Identifier("dns", "a.test"),
            KEY_AUTHORIZATION,
            settings_for(challtestsrv, tls_port=server.port),
        )

    assert problem.type == "unauthorized"
    assert expected in problem.detail
    assert f"a.test:{server.port} [127.0.0.1]" in problem.detail


def test_tls_alpn01_server_without_acme_tls_alpn_is_a_tls_problem(tmp_path: Path) -> None:
    certificate = self_signed(
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))], acme_identifier_value()
    )
    with AcmeTlsServer(server_context(tmp_path, certificate, alpn=False)) as server:
        problem = problem_of(
            validate_tls_alpn01, LOCALHOST, KEY_AUTHORIZATION, settings_for(tls_port=server.port)
        )

    assert problem.type == "tls"
    assert "acme-tls/1" in problem.detail


def test_tls_alpn01_against_a_plain_http_server_is_a_tls_problem(
    web: ChallengeHTTPServer,
) -> None:
    problem = problem_of(
        validate_tls_alpn01, LOCALHOST, KEY_AUTHORIZATION, settings_for(tls_port=web.port)
    )

    assert problem.type == "tls"
    assert f"127.0.0.1:{web.port}" in problem.detail


def test_tls_alpn01_server_that_never_answers_times_out_as_a_connection_problem() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:
        problem = problem_of(
            validate_tls_alpn01,
            LOCALHOST,
            KEY_AUTHORIZATION,
            settings_for(tls_port=silent.getsockname()[1], timeout=0.5),
        )

    assert problem.type == "connection"


def test_tls_alpn01_refuses_wildcards() -> None:
    problem = problem_of(
        validate_tls_alpn01, Identifier("dns", "*.example.test"), KEY_AUTHORIZATION, settings_for()
    )

    assert problem.type == "malformed"


# --- Dispatch, records, settings ----------------------------------------------------------


def test_validate_runs_the_named_challenge(web: ChallengeHTTPServer) -> None:
    web.replies[CHALLENGE_PATH] = Reply(body=KEY_AUTHORIZATION.encode())

    records = validate(
        "http-01", LOCALHOST, TOKEN, KEY_AUTHORIZATION, settings_for(http_port=web.port)
    )

    assert records[0].url is not None and records[0].url.endswith(CHALLENGE_PATH)


def test_validate_refuses_unknown_challenge_and_identifier_types() -> None:
    challenge = problem_of(validate, "http-02", LOCALHOST, TOKEN, KEY_AUTHORIZATION, settings_for())
    identifier = problem_of(
        validate, "http-01", Identifier("email", "a@b.test"), TOKEN, KEY_AUTHORIZATION,
        settings_for(),
    )  # fmt: skip

    assert challenge.type == "malformed"
    assert identifier.type == "unsupportedIdentifier"


def test_validation_record_json_uses_boulder_field_names() -> None:
    record = ValidationRecord(
        url="http://a.test/.well-known/acme-challenge/x",
        hostname="a.test",
        port=80,
        addresses_resolved=("192.0.2.1", "2001:db8::1"),
        address_used="2001:db8::1",
        addresses_tried=("192.0.2.1",),
    )

    document = record.to_json()

    assert document == {
        "url": "http://a.test/.well-known/acme-challenge/x",
        "hostname": "a.test",
        "port": "80",
        "addressesResolved": ["192.0.2.1", "2001:db8::1"],
        "addressUsed": "2001:db8::1",
        "addressesTried": ["192.0.2.1"],
    }
    assert ValidationRecord.from_json(document) == record
    assert ValidationRecord(hostname="a.test").to_json() == {"hostname": "a.test"}


def test_settings_refuse_a_resolver_given_by_name() -> None:
    with pytest.raises(ValueError):
        ValidationSettings(resolver=("dns.example.test", 53))


def test_the_connector_validates_on_the_standard_ports_unless_configured(
    sqlite_core: Any,
) -> None:
    """http-01 on port 80 and tls-alpn-01 on 443 (RFC 8555 8.3, RFC 8737 3) by default; the
    ports are settings only so that tests and labs can run validators without privileges."""
    from pkigate.acme.connector import AcmeConnector
    from pkigate.acme.settings import AcmeSettings
    from pkigate.core import Validity
    from pkigate.gateways.connectors import ConnectorContext

    context = ConnectorContext(
        name="acme",
        type="acme",
        mount="/acme",
        ca_id="unused",
        template=AcmeConnector.default_template,
        validity=Validity.parse(AcmeConnector.default_validity),
        core=sqlite_core,
        base_url="https://127.0.0.1:8443",
    )
    defaults = AcmeSettings.parse({}, context)
    assert (defaults.http01_port, defaults.tls_alpn01_port) == (80, 443)
    configured = AcmeSettings.parse({"http01_port": 5002, "tls_alpn01_port": 5001}, context)
    assert (configured.http01_port, configured.tls_alpn01_port) == (5002, 5001)
