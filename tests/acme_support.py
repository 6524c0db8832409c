"""What the ACME tests share: challenge responders a client would run (http-01 on a port,
tls-alpn-01 with the acmeIdentifier certificate), and the independent check of every
certificate an ACME client received."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import http.server
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pyhanko_certvalidator import CertificateValidator, ValidationContext

ACME_IDENTIFIER_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")


class Http01Responder:
    """Answers /.well-known/acme-challenge/<token> from ``tokens`` on 127.0.0.1.

    A token in ``held`` is answered only once its event is set (or after a minute): the
    validator's request is seen in ``requests`` while the test still holds the answer.
    """

    def __init__(self) -> None:
        self.tokens: dict[str, str] = {}
        self.held: dict[str, threading.Event] = {}
        self.requests: list[tuple[str, str]] = []  # (Host header, path)
        tokens, held, seen = self.tokens, self.held, self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append((self.headers.get("Host", ""), self.path))
                token = self.path.rsplit("/", 1)[-1]
                gate = held.get(token)
                if gate is not None:
                    gate.wait(timeout=60)
                body = tokens.get(token)
                if body is None or not self.path.startswith("/.well-known/acme-challenge/"):
                    self.send_response(404)
                    self.end_headers()
                    return
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class TlsAlpnResponder:
    """A TLS server on 127.0.0.1 that answers ALPN ``acme-tls/1`` with the RFC 8737
    validation certificate for the SNI name it was told about."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.key_authorizations: dict[str, str] = {}  # SNI name -> key authorization
        self._contexts: dict[str, ssl.SSLContext] = {}
        self.socket = socket.socket()
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(16)
        self.port = int(self.socket.getsockname()[1])
        self._default = self._context_for("default.invalid", None)
        self._default.sni_callback = self._pick
        self._stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _pick(self, conn: ssl.SSLSocket, name: str | None, _ctx: ssl.SSLContext) -> None:
        if name and name in self.key_authorizations:
            conn.context = self._context_for(name, self.key_authorizations[name])

    def _context_for(self, name: str, key_authorization: str | None) -> ssl.SSLContext:
        cached = self._contexts.get(f"{name}|{key_authorization}")
        if cached is not None:
            return cached
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        general: x509.GeneralName
        if name.endswith(".in-addr.arpa") or name.endswith(".ip6.arpa"):
            general = x509.IPAddress(_ip_from_reverse(name))
        else:
            general = x509.DNSName(name)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "acme-tls-alpn")]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "acme-tls-alpn")]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([general]), critical=False)
        )
        if key_authorization is not None:
            digest = hashlib.sha256(key_authorization.encode()).digest()
            builder = builder.add_extension(
                x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, b"\x04\x20" + digest),
                critical=True,
            )
        certificate = builder.sign(key, hashes.SHA256())
        stem = self.directory / hashlib.sha256(f"{name}|{key_authorization}".encode()).hexdigest()
        cert_path, key_path = stem.with_suffix(".crt"), stem.with_suffix(".key")
        cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert_path, key_path)
        context.set_alpn_protocols(["acme-tls/1"])
        self._contexts[f"{name}|{key_authorization}"] = context
        return context

    def _serve(self) -> None:
        while not self._stopping:
            try:
                raw, _ = self.socket.accept()
            except OSError:
                return
            threading.Thread(target=self._handshake, args=(raw,), daemon=True).start()

    def _handshake(self, raw: socket.socket) -> None:
        raw.settimeout(10)
        try:
            with self._default.wrap_socket(raw, server_side=True) as tls:
                tls.recv(1)  # the validator closes after the handshake
        except (OSError, ssl.SSLError):
            pass

    def close(self) -> None:
        self._stopping = True
        self.socket.close()


def _ip_from_reverse(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    labels = name.split(".")
    if name.endswith(".in-addr.arpa"):
        return ipaddress.IPv4Address(".".join(reversed(labels[:4])))
    nibbles = "".join(reversed(labels[:32]))
    return ipaddress.IPv6Address(int(nibbles, 16))


def check_issued(
    chain: list[x509.Certificate],
    root_pem: bytes,
    identifiers: Iterable[tuple[str, str]],
    purpose: str = "server_auth",
) -> x509.Certificate:
    """The leaf chains to ``root_pem`` (pyhanko-certvalidator, for ``purpose``: TLS server
    use by default) and names exactly ``identifiers``; returns the leaf."""
    leaf, intermediates = chain[0], chain[1:]
    root = x509.load_pem_x509_certificate(root_pem)

    def a1(certificate: x509.Certificate) -> asn1_x509.Certificate:
        return asn1_x509.Certificate.load(certificate.public_bytes(serialization.Encoding.DER))

    context = ValidationContext(
        trust_roots=[a1(root)],
        other_certs=[a1(c) for c in intermediates],
        allow_fetching=False,
        revocation_mode="soft-fail",
    )
    validator = CertificateValidator(a1(leaf), validation_context=context)
    asyncio.run(validator.async_validate_usage({"digital_signature"}, {purpose}))
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {("dns", n) for n in san.get_values_for_type(x509.DNSName)}
    names |= {("ip", a.compressed) for a in san.get_values_for_type(x509.IPAddress)}
    assert names == set(identifiers), (names, set(identifiers))
    assert len(list(san)) == len(names), "the certificate carries names of other kinds"
    return leaf
