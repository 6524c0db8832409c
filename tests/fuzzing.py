"""Protocol fuzzing against a real ``pkigate serve``.

Valid requests made by pkigate's own clients are mutated and sent over HTTP(S):

* SCEP PKIOperation (a PKCSReq with the static challenge): bytes of the CMS mutated, sent
  by POST and by GET (base64 ``message``);
* ACME: newAccount (``jwk``), newOrder and the account (``kid``); the payload or the
  protected header mutated as JSON and signed correctly (so the request gets past the
  signature into validation), or the signed body's bytes mutated; and finalize of a ready
  order for 127.0.0.1 (http-01 answered by the fuzzer) with mutated CSRs: their bytes, or
  validly signed ones asking for other names, a CA certificate, the account key. What is
  issued must name exactly 127.0.0.1, certify the CSR's key and not be a CA; and
  renewalInfo with a mutated certificate ID, revokeCert with a mutated certificate or
  payload, keyChange with a mutated inner JWS;
* OCSP: a request for the issuing CA mutated as bytes, by POST and by GET;
* the management API: a certificate request (``POST /cas/{id}/certificates``, issuer
  token) mutated as JSON, or its CSR mutated inside valid JSON; revocation (mutated
  serial or body), CA tags and tokens (admin), listings with odd query parameters;
* AD-style MS-WSTEP (a machine account of the development directory enrolling for the
  Machine template): the envelope's bytes, the CSR inside a valid envelope, a DOCTYPE
  (external entity, entity expansion, external DTD), LDAP filter and XML metacharacters
  as user name, password or template; MS-XCEP GetPolicies the same way; and the JSON
  enrollment endpoint's body.

Each answer must be what the protocol says for bad input (or, when a mutation left the
request valid, the normal answer): never a 5xx; SCEP a CertRep or a 4xx; ACME a
``urn:ietf:params:acme:error:*`` problem document with a fresh Replay-Nonce; OCSP an
OCSPResponse that parses, or a 4xx; the API a JSON error; MS-WSTEP a SOAP answer or fault
with 400/401/403 (503 would say the directory is down, and it is not), never the content
of a file. At the end the server must still
be ready, its log must hold no traceback, every certificate in the store must be one that
an answer delivered (a SCEP SUCCESS, an API 201, an issued RSTR), and the audit chain
must verify.

    .venv/bin/python tests/fuzzing.py [--iterations N] [--seed S] [--database-url URL]

``--iterations`` is per target (default 2000; CI runs a bounded 60 through
``tests/test_fuzz.py``). The seed is printed; the same seed replays the same mutations.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import random
import re
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from helpers import key_usage, scep_static_challenge  # noqa: E402
from serving import RunningServer, start_server  # noqa: E402

from pkigate.acme import jws  # noqa: E402
from pkigate.acme.renewal import cert_id  # noqa: E402
from pkigate.adcs import soap  # noqa: E402
from pkigate.adcs.directory import DevDirectory  # noqa: E402
from pkigate.core import Core  # noqa: E402
from pkigate.devsim.acme_client import AcmeClient, AcmeClientError  # noqa: E402
from pkigate.devsim.adcs_client import SOAP_TYPE, MachineAccount, provision_machine  # noqa: E402
from pkigate.devsim.challenges import Http01Responder  # noqa: E402
from pkigate.devsim.scep_client import (  # noqa: E402
    PKI_MESSAGE_TYPE,
    ScepClient,
    certificate_request,
    new_key,
    new_transaction_id,
    self_signed,
)
from pkigate.scep.cms import ContentCipher, KeyTransport, build_enveloped_data  # noqa: E402
from pkigate.scep.messages import (  # noqa: E402
    MessageType,
    PkiStatus,
    build_pki_message,
    parse_cert_rep,
    sign_pki_message,
)

DEFAULT_ITERATIONS = 2000
ACME_ERROR = "urn:ietf:params:acme:error:"
SCEP_CONNECTOR = "scep"
TIMEOUT = 30.0

# -- mutators ------------------------------------------------------------------------------

INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0x81, 0x82, 0x84, 0xFF)


def mutate_bytes(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """One to four byte-level edits; DER lengths and tags are hit by the byte values."""
    out = bytearray(data)
    done = []
    for _ in range(rng.randint(1, 4)):
        if not out:
            out += rng.randbytes(rng.randint(1, 16))
            done.append("fill")
            continue
        i = rng.randrange(len(out))
        kind = rng.randrange(7)
        if kind == 0:
            out[i] ^= 1 << rng.randrange(8)
            done.append(f"flip@{i}")
        elif kind == 1:
            out[i] = rng.choice(INTERESTING_BYTES)
            done.append(f"set@{i}")
        elif kind == 2:
            out[i:i] = rng.randbytes(rng.randint(1, 8))
            done.append(f"insert@{i}")
        elif kind == 3:
            del out[i : i + rng.randint(1, 32)]
            done.append(f"delete@{i}")
        elif kind == 4:
            del out[i:]
            done.append(f"truncate@{i}")
        elif kind == 5:
            j = rng.randrange(len(out))
            out[i:i] = out[j : j + rng.randint(1, 64)]
            done.append(f"duplicate@{j}->{i}")
        else:
            out[i : i + 1] = bytes([0x30, 0x84, 0xFF, 0xFF, 0xFF, 0xF0])
            done.append(f"huge-length@{i}")
    return bytes(out), ",".join(done)


DEEP = "\u0000deep\u0000"  # stands for 100,000 nested arrays; see dumps()


def dumps(value: Any) -> bytes:
    """JSON, with each DEEP string replaced by arrays nested deeper than any parser's
    recursion limit (which Python's own encoder could not write)."""
    text = json.dumps(value)
    return text.replace(json.dumps(DEEP), "[" * 100_000 + "]" * 100_000).encode()


def _interesting_json(rng: random.Random) -> Any:
    nested: Any = "x"
    for _ in range(rng.choice((2, 50))):
        nested = [nested]
    return rng.choice(
        (
            None,
            True,
            0,
            -1,
            2**64,
            1.5e308,
            "",
            "A" * rng.choice((1, 300, 70_000)),
            "\u0000\ud800\uffff",
            "../../etc/passwd",
            "*.example.test",
            "127.0.0.1",
            [],
            {},
            nested,
            DEEP,
            {"type": "dns", "value": "x" * 300},
            ["mailto:a@b", None, 3],
        )
    )


LDAP_AND_XML_STRINGS = (
    "*",
    "*)(objectClass=*",
    "admin)(|(cn=*",
    "\\2a",
    "FUZZ01$",
    "fuzz01$",
    "a" * 5000,
    "CN=admin,DC=example",
    "]]><x>",
    "&amp;&lt;",
    "\u202e\ufeff",
    "",
)

XML_DOCTYPES = (
    b'<!DOCTYPE e [<!ENTITY x SYSTEM "file:///etc/passwd">]>',
    b'<!DOCTYPE e [<!ENTITY x "y"><!ENTITY x2 "&x;&x;&x;&x;&x;&x;&x;&x;&x;&x;">'
    b'<!ENTITY x3 "&x2;&x2;&x2;&x2;&x2;&x2;&x2;&x2;&x2;&x2;">'
    b'<!ENTITY x4 "&x3;&x3;&x3;&x3;&x3;&x3;&x3;&x3;&x3;&x3;">'
    b'<!ENTITY x5 "&x4;&x4;&x4;&x4;&x4;&x4;&x4;&x4;&x4;&x4;">]>',
    b'<!DOCTYPE e SYSTEM "http://127.0.0.1:9/dtd">',
    b'<?xml-stylesheet href="http://127.0.0.1:9/x"?>',
)


FINALIZE_NAME_SETS: tuple[list[x509.GeneralName], ...] = (
    [],
    [x509.IPAddress(ipaddress.ip_address("127.0.0.2"))],
    [x509.IPAddress(ipaddress.ip_address("::1"))],
    [x509.DNSName("127.0.0.1")],
    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("other.example.test")],
    [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))] * 2,
    [x509.IPAddress(ipaddress.ip_network("127.0.0.0/8"))],
    [x509.RFC822Name("a@example.test")],
    [x509.UniformResourceIdentifier("https://127.0.0.1/")],
    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.RFC822Name("a@127.0.0.1")],
)
FINALIZE_CNS = ("127.0.0.1", "evil.example.test", "127.0.0.2", "*", " 127.0.0.1")
FINALIZE_EXTENSIONS: tuple[tuple[x509.ExtensionType, bool], ...] = (
    (x509.BasicConstraints(ca=True, path_length=None), True),
    (key_usage("key_cert_sign", "crl_sign"), True),
    (x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE]), False),
    (x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CODE_SIGNING]), False),
    (x509.NameConstraints([x509.DNSName("example.test")], None), True),
    (x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.311.25.2"), b"\x04\x00"), False),
)


def _not_exactly_the_order(leaf: x509.Certificate, key: Any) -> str:
    """Why an issued ACME certificate is not what the order for 127.0.0.1 allows ("" if
    it is)."""
    try:
        sans = list(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return "issued without a subjectAltName"
    if sans != [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]:
        return f"issued for {sans}"
    for attribute in leaf.subject:
        if attribute.oid == NameOID.COMMON_NAME and attribute.value != "127.0.0.1":
            return f"issued with CN {attribute.value!r}"
    try:
        if leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return "issued a CA certificate"
    except x509.ExtensionNotFound:
        pass
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(
        serialization.Encoding.DER, spki
    ) != key.public_key().public_bytes(serialization.Encoding.DER, spki):
        return "issued for another key"
    return ""


def _with_doctype(rng: random.Random, envelope: bytes) -> tuple[bytes, str]:
    """The envelope with a DOCTYPE (external entity, entity expansion, external DTD)
    before its root element, and an entity reference in the username."""
    doctype = rng.choice(XML_DOCTYPES)
    start = envelope.index(b"<", envelope.index(b"?>") + 2) if envelope.startswith(b"<?xml") else 0
    body = envelope[:start] + doctype + envelope[start:]
    entity = b"&x5;" if b"x5" in doctype else b"&x;"
    body = re.sub(rb"(<[A-Za-z0-9]*:?Username>)", rb"\1" + entity, body, count=1)
    return body, f"doctype {doctype[:40]!r}"


def mutate_json(rng: random.Random, value: Any) -> tuple[Any, str]:
    """Replace, delete or add one node of a JSON value (a deep copy is changed)."""
    value = json.loads(json.dumps(value))
    path: list[str] = []
    parent: Any = None
    key: Any = None
    node = value
    while isinstance(node, (dict, list)) and node and rng.random() < 0.6:
        parent = node
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        path.append(str(key))
        node = node[key]
    action = rng.randrange(3)
    where = "/".join(path) or "(root)"
    if parent is None:
        if isinstance(value, dict) and action == 1 and value:
            del value[rng.choice(list(value))]
            return value, f"delete key at {where}"
        if isinstance(value, dict) and action == 2:
            value[rng.choice(("extra", "__proto__", "", "onlyReturnExisting"))] = _interesting_json(
                rng
            )
            return value, f"add key at {where}"
        return _interesting_json(rng), "replace root"
    if action == 1 and isinstance(parent, dict):
        del parent[key]
        return value, f"delete {where}"
    parent[key] = _interesting_json(rng)
    return value, f"replace {where}"


# -- the run -------------------------------------------------------------------------------


@dataclass
class Finding:
    target: str
    mutation: str
    problem: str


@dataclass
class Results:
    seed: int
    iterations: int
    sent: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    findings: list[Finding] = field(default_factory=list)
    delivered: set[tuple[str, str]] = field(default_factory=set)  # (ca_id, serial hex)
    store_problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings and not self.store_problems


class Fuzzer:
    def __init__(
        self,
        server: RunningServer,
        rng: random.Random,
        results: Results,
        machine: MachineAccount | None = None,
        responder: Http01Responder | None = None,
    ) -> None:
        self.server = server
        self.machine = machine
        self.responder = responder
        self.rng = rng
        self.results = results
        self.plain = requests.Session()
        self.plain.trust_env = False
        admin = server.session()
        token = admin.post(
            f"{server.https_url}/api/v1/tokens",
            json={"name": "fuzz", "role": "issuer"},
            timeout=TIMEOUT,
        )
        token.raise_for_status()
        self.api = server.session(token.json()["secret"])
        cas = admin.get(f"{server.https_url}/api/v1/cas", timeout=TIMEOUT).json()["cas"]
        self.issuing = next(c for c in cas if c["type"] == "SUBORDINATE")
        self.issuing_cert = x509.load_pem_x509_certificate(
            admin.get(
                f"{server.https_url}/api/v1/cas/{self.issuing['id']}/certificate", timeout=TIMEOUT
            )
            .json()["certificate_pem"]
            .encode()
        )

    def find(self, target: str, mutation: str, problem: str) -> None:
        self.results.findings.append(Finding(target, mutation, problem))

    def count(self, target: str, response: requests.Response) -> None:
        self.results.sent[target] += 1
        self.results.statuses[f"{target} {response.status_code}"] += 1

    def server_error(self, target: str, mutation: str, response: requests.Response) -> bool:
        if response.status_code >= 500:
            self.find(target, mutation, f"HTTP {response.status_code}: {response.text[:300]}")
            return True
        return False

    # -- SCEP ----------------------------------------------------------------------------------

    def scep(self, iterations: int) -> None:
        url = f"{self.server.http_url}/scep"
        client = ScepClient(url, self.plain, timeout=TIMEOUT)
        ca = client.get_ca_cert()
        challenge = scep_static_challenge(self.server.config, SCEP_CONNECTOR)
        devices = []
        for index in range(3):
            key = new_key()
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"fuzz-{index}")])
            signer = self_signed(key, subject)
            devices.append((key, signer, certificate_request(key, subject, challenge)))
        for _ in range(iterations):
            if self.rng.random() < 0.1:  # the other operations, with odd parameters
                operation = self.rng.choice(SCEP_OPERATIONS)
                message = self.rng.choice(QUERY_VALUES)
                response = self.plain.get(
                    url, params={"operation": operation, "message": message}, timeout=TIMEOUT
                )
                self.count("scep", response)
                self.server_error("scep", f"GET {operation} message={message[:20]!r}", response)
                continue
            key, signer, csr = self.rng.choice(devices)
            body, mutation = self._scep_message(ca.recipient, key, signer, csr)
            if self.rng.random() < 0.25:
                response = self.plain.get(
                    url,
                    params={
                        "operation": "PKIOperation",
                        "message": base64.b64encode(body).decode(),
                    },
                    timeout=TIMEOUT,
                )
            else:
                response = self.plain.post(
                    url,
                    params={"operation": "PKIOperation"},
                    data=body,
                    headers={"Content-Type": PKI_MESSAGE_TYPE},
                    timeout=TIMEOUT,
                )
            self.count("scep", response)
            if self.server_error("scep", mutation, response) or response.status_code != 200:
                continue
            if response.headers.get("Content-Type") != PKI_MESSAGE_TYPE:
                self.find("scep", mutation, f"200 as {response.headers.get('Content-Type')}")
                continue
            try:
                reply = parse_cert_rep(
                    response.content, key, [ca.recipient, *ca.chain], requester_cert=signer
                )
            except Exception as exc:  # the reply must always be a CertRep we can read
                self.find("scep", mutation, f"200 but no readable CertRep: {exc}")
                continue
            if reply.status is PkiStatus.SUCCESS:
                for certificate in reply.certificates:
                    if certificate.issuer == self.issuing_cert.subject:
                        self.results.delivered.add(
                            (self.issuing["id"], format(certificate.serial_number, "x"))
                        )

    def _scep_message(
        self,
        recipient: x509.Certificate,
        key: Any,
        signer: x509.Certificate,
        csr: bytes,
    ) -> tuple[bytes, str]:
        """A mutated pkiMessage: its bytes; or a correctly signed and encrypted one around a
        mutated request (any message type, any transactionID); or a correctly signed one
        around a mutated envelope. The last two get past the signature check."""
        rng = self.rng
        how = rng.randrange(3)
        transaction = new_transaction_id()
        if how == 0:
            message = build_pki_message(
                MessageType.PKCS_REQ, csr, transaction, signer, key, recipient
            )
            body, mutation = mutate_bytes(rng, message)
            return body, f"message {mutation}"
        kind = rng.choice(
            (MessageType.PKCS_REQ,) * 4
            + (MessageType.RENEWAL_REQ, MessageType.CERT_POLL, MessageType.GET_CERT)
            + (MessageType.GET_CRL, MessageType.CERT_REP)
        )
        if rng.random() < 0.1:
            transaction = rng.choice(("", "x" * 5000, "\u00e9\u0000", "../" * 10))
        if how == 1:
            payload, mutation = mutate_bytes(rng, csr)
            cipher = rng.choice(list(ContentCipher))
            message = build_pki_message(kind, payload, transaction, signer, key, recipient, cipher)
            return message, f"{kind.name} {cipher} request {mutation} txid {transaction[:12]!r}"
        envelope = build_enveloped_data(
            csr, recipient, rng.choice(list(ContentCipher)), rng.choice(list(KeyTransport))
        )
        envelope, mutation = mutate_bytes(rng, envelope)
        message = sign_pki_message(kind, envelope, transaction, signer, key)
        return message, f"{kind.name} envelope {mutation}"

    # -- ACME ----------------------------------------------------------------------------------

    def acme(self, iterations: int) -> None:
        verify = str(self.server.tls_bundle)
        session = requests.Session()
        session.trust_env = False
        session.verify = verify
        directory = session.get(f"{self.server.https_url}/acme/directory", timeout=TIMEOUT).json()
        key = ec.generate_private_key(ec.SECP256R1())
        nonce = [session.head(directory["newNonce"], timeout=TIMEOUT).headers["Replay-Nonce"]]

        def post(url: str, body: bytes, content_type: str = "application/jose+json") -> Any:
            response = session.post(
                url, data=body, headers={"Content-Type": content_type}, timeout=TIMEOUT
            )
            fresh = response.headers.get("Replay-Nonce")
            if fresh:
                nonce[0] = fresh
            else:
                nonce[0] = session.head(directory["newNonce"], timeout=TIMEOUT).headers[
                    "Replay-Nonce"
                ]
            return response

        def signed(protected: dict[str, Any], payload: Any, raw: bytes | None = None) -> bytes:
            body = raw if raw is not None else dumps(payload)
            return jws.sign(key, protected, None if payload is None and raw is None else body)

        created = post(
            directory["newAccount"],
            signed(
                {
                    "url": directory["newAccount"],
                    "nonce": nonce[0],
                    "jwk": jws.public_key_to_jwk(key.public_key()),
                },
                {"termsOfServiceAgreed": True, "contact": ["mailto:fuzz@example.test"]},
            ),
        )
        if created.status_code not in (200, 201):
            self.find("acme", "(none: account setup)", f"HTTP {created.status_code}")
            return
        account = created.headers["Location"]
        seeds: list[tuple[str, bool, Any]] = [
            (
                directory["newAccount"],
                True,
                {"termsOfServiceAgreed": True, "contact": ["mailto:other@example.test"]},
            ),
            (
                directory["newOrder"],
                False,
                {"identifiers": [{"type": "dns", "value": "fuzz.example.test"}]},
            ),
            (account, False, {"contact": ["mailto:fuzz2@example.test"]}),
            (account, False, None),  # POST-as-GET
        ]
        for _ in range(iterations):
            url, use_jwk, payload = self.rng.choice(seeds)
            protected: dict[str, Any] = {"url": url, "nonce": nonce[0]}
            if use_jwk:
                protected["jwk"] = jws.public_key_to_jwk(key.public_key())
            else:
                protected["kid"] = account
            content_type = "application/jose+json"
            how = self.rng.randrange(4)
            if how == 0:
                mutated, mutation = mutate_json(self.rng, payload)
                body = signed(protected, mutated)
                mutation = f"payload {mutation}"
            elif how == 1:
                mutated, mutation = mutate_json(self.rng, protected)
                if not isinstance(mutated, dict):
                    mutated = {"protected": mutated}
                body = signed(mutated, payload)
                mutation = f"protected {mutation}"
            elif how == 2:
                body, mutation = mutate_bytes(self.rng, signed(protected, payload))
                mutation = f"bytes {mutation}"
            else:
                body = signed(protected, payload)
                content_type = self.rng.choice(
                    ("application/json", "text/plain", "", "application/jose+json; charset=x")
                )
                mutation = f"content type {content_type!r}"
            response = post(url, body, content_type)
            self.count("acme", response)
            if self.server_error("acme", mutation, response) or response.status_code < 400:
                continue
            if not response.headers.get("Replay-Nonce"):
                self.find("acme", mutation, f"{response.status_code} without a Replay-Nonce")
            if response.headers.get("Content-Type") != "application/problem+json":
                self.find("acme", mutation, f"error as {response.headers.get('Content-Type')}")
                continue
            problem = response.json()
            if not str(problem.get("type", "")).startswith(ACME_ERROR):
                self.find("acme", mutation, f"problem type {problem.get('type')!r}")

    def acme_finalize(self, iterations: int) -> None:
        """Finalize a ready order for the IP identifier 127.0.0.1 (validated over http-01
        by the fuzzer's responder) with mutated CSRs: their bytes, or validly signed ones
        asking for other names, a CA certificate, the account key. Whatever is issued must
        certify exactly 127.0.0.1, the CSR's key, and no CA."""
        if self.responder is None:
            return
        session = requests.Session()
        session.trust_env = False
        session.verify = str(self.server.tls_bundle)

        def new_account() -> tuple[Any, AcmeClient]:
            key = ec.generate_private_key(ec.SECP256R1())
            client = AcmeClient(f"{self.server.https_url}/acme/directory", key, session)
            client.register(["mailto:finalize@example.test"])
            return key, client

        account_key, client = new_account()
        order: Any = None
        for _ in range(iterations):
            while order is None:
                try:
                    order = self._ready_order(client)
                except AcmeClientError as exc:
                    if exc.type != "rateLimited":  # new orders per account per hour
                        raise
                    account_key, client = new_account()
            csr_der, key, mutation = self._finalize_csr(account_key)
            url = order.body["finalize"]
            response = client.raw_post(
                url, client.signed_body(url, {"csr": jws.b64url_encode(csr_der)})
            )
            self.results.sent["acme-finalize"] += 1
            self.results.statuses[f"acme-finalize {response.status}"] += 1
            if response.status >= 500:
                self.find("acme-finalize", mutation, f"HTTP {response.status}: {response.text}")
                continue
            if response.status >= 400:
                if not str(response.body.get("type", "")).startswith(ACME_ERROR):
                    self.find("acme-finalize", mutation, f"problem {response.text[:200]}")
                continue
            order = None  # finalized: the next mutation needs another ready order
            body = response.body
            if body["status"] != "valid":
                body = client.wait(response.location or url, ["valid", "invalid"]).body
            if body["status"] != "valid":
                continue
            leaf = client.certificate_chain(body["certificate"])[0]
            self.results.delivered.add((self.issuing["id"], format(leaf.serial_number, "x")))
            problem = _not_exactly_the_order(leaf, key)
            if problem:
                self.find("acme-finalize", mutation, problem)

    def acme_more(self, iterations: int) -> None:
        """renewalInfo with mutated certificate IDs, revokeCert with a mutated certificate
        or payload, keyChange with a mutated inner JWS."""
        session = requests.Session()
        session.trust_env = False
        session.verify = str(self.server.tls_bundle)
        client = AcmeClient(
            f"{self.server.https_url}/acme/directory",
            ec.generate_private_key(ec.SECP256R1()),
            session,
        )
        client.register(["mailto:more@example.test"])
        issued = self.api.post(
            f"{self.server.https_url}/api/v1/cas/{self.issuing['id']}/certificates",
            json=self.api_seed(),
            timeout=TIMEOUT,
        )
        issued.raise_for_status()
        self.results.delivered.add((self.issuing["id"], issued.json()["serial"]))
        leaf = x509.load_pem_x509_certificate(issued.json()["certificate_pem"].encode())
        leaf_der = leaf.public_bytes(serialization.Encoding.DER)
        good_id = cert_id(leaf)
        rng = self.rng
        for _ in range(iterations):
            kind = rng.randrange(3)
            if kind == 0:
                raw, mutation = mutate_bytes(rng, good_id.encode())
                text = quote(raw.decode("latin-1"), safe="")
                response = session.get(f"{client.directory['renewalInfo']}/{text}", timeout=TIMEOUT)
                self.count("acme-more", response)
                if not self.server_error("acme-more", f"renewalInfo {mutation}", response):
                    self._acme_answer(
                        f"renewalInfo {mutation}",
                        response.status_code,
                        response.headers,
                        response.text,
                    )
                continue
            url = client.directory["revokeCert" if kind == 1 else "keyChange"]
            new_key = ec.generate_private_key(ec.SECP256R1())
            if kind == 1:
                payload: Any = {"certificate": jws.b64url_encode(leaf_der), "reason": 4}
                if rng.random() < 0.6:
                    der, mutation = mutate_bytes(rng, leaf_der)
                    payload["certificate"] = jws.b64url_encode(der)
                    mutation = f"revokeCert certificate {mutation}"
                else:
                    payload, mutation = mutate_json(rng, payload)
                    mutation = f"revokeCert {mutation}"
            else:
                inner_payload: Any = {"account": client.account_url, "oldKey": client.jwk}
                inner_header: Any = {"url": url, "jwk": jws.public_key_to_jwk(new_key.public_key())}
                if rng.random() < 0.5:
                    inner_payload, mutation = mutate_json(rng, inner_payload)
                    mutation = f"keyChange inner payload {mutation}"
                else:
                    inner_header, mutation = mutate_json(rng, inner_header)
                    mutation = f"keyChange inner header {mutation}"
                if not isinstance(inner_header, dict):
                    inner_header = {"protected": inner_header}
                payload = json.loads(jws.sign(new_key, inner_header, dumps(inner_payload)))
            answer = client.raw_post(url, client.signed_body(url, payload))
            self.results.sent["acme-more"] += 1
            self.results.statuses[f"acme-more {answer.status}"] += 1
            if answer.status >= 500:
                self.find("acme-more", mutation, f"HTTP {answer.status}: {answer.text[:300]}")
                continue
            if kind == 2 and answer.status < 300:
                client.key = new_key  # the mutation left a valid roll-over: it happened
            self._acme_answer(mutation, answer.status, answer.headers, answer.text)

    def _acme_answer(self, mutation: str, status: int, headers: Any, text: str) -> None:
        if status < 400:
            return
        if headers.get("Content-Type") != "application/problem+json":
            self.find("acme-more", mutation, f"error as {headers.get('Content-Type')}")
            return
        if not str(json.loads(text).get("type", "")).startswith(ACME_ERROR):
            self.find("acme-more", mutation, f"problem {text[:200]}")

    def _ready_order(self, client: AcmeClient) -> Any:
        assert self.responder is not None
        order = client.new_order([("ip", "127.0.0.1")])
        for authz_url in order.body["authorizations"]:
            authz = client.get(authz_url).body
            if authz["status"] == "valid":
                continue  # reused: this account proved control already
            challenge = next(c for c in authz["challenges"] if c["type"] == "http-01")
            self.responder.tokens[challenge["token"]] = f"{challenge['token']}.{client.thumbprint}"
            client.respond(challenge["url"])
            client.wait(authz_url, ["valid"])
        return (
            client.wait(order.location or "", ["ready"])
            if order.body["status"] != "ready"
            else order
        )

    def _finalize_csr(self, account_key: Any) -> tuple[bytes, Any, str]:
        rng = self.rng
        key = account_key if rng.random() < 0.05 else ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        subject: list[x509.NameAttribute] = []
        extensions: list[tuple[x509.ExtensionType, bool]] = []
        how = rng.randrange(3) if key is not account_key else 3
        if how == 1:
            names = rng.choice(FINALIZE_NAME_SETS)
            if rng.random() < 0.3:
                subject = [x509.NameAttribute(NameOID.COMMON_NAME, rng.choice(FINALIZE_CNS))]
        elif how == 2:
            extensions = [rng.choice(FINALIZE_EXTENSIONS)]
        builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(subject))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        der = builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
        if how == 0:
            der, mutation = mutate_bytes(rng, der)
            return der, key, f"csr {mutation}"
        described = f"names {[str(n.value) for n in names]} cn {[a.value for a in subject]}"
        if how == 2:
            described = f"extension {type(extensions[0][0]).__name__}"
        if how == 3:
            described = "the account key"
        return der, key, described

    # -- OCSP ----------------------------------------------------------------------------------

    def ocsp(self, iterations: int) -> None:
        url = f"{self.server.http_url}/ocsp/{self.issuing['id']}"
        issued = self.api.post(
            f"{self.server.https_url}/api/v1/cas/{self.issuing['id']}/certificates",
            json=self.api_seed(),
            timeout=TIMEOUT,
        )
        if issued.status_code != 201:
            self.find(
                "ocsp", "(none: setup)", f"issuing the certificate to ask about: {issued.text}"
            )
            return
        self.results.delivered.add((self.issuing["id"], issued.json()["serial"]))
        leaf = x509.load_pem_x509_certificate(issued.json()["certificate_pem"].encode())
        request = (
            ocsp.OCSPRequestBuilder()
            .add_certificate(leaf, self.issuing_cert, hashes.SHA1())  # noqa: S303 - RFC 6960 CertID
            .build()
            .public_bytes(serialization.Encoding.DER)
        )
        for _ in range(iterations):
            body, mutation = mutate_bytes(self.rng, request)
            if self.rng.random() < 0.25:
                encoded = base64.b64encode(body).decode()
                response = self.plain.get(f"{url}/{encoded}", timeout=TIMEOUT)
            else:
                response = self.plain.post(
                    url,
                    data=body,
                    headers={"Content-Type": "application/ocsp-request"},
                    timeout=TIMEOUT,
                )
            self.count("ocsp", response)
            if self.server_error("ocsp", mutation, response) or response.status_code != 200:
                continue
            try:
                ocsp.load_der_ocsp_response(response.content)
            except ValueError as exc:
                self.find("ocsp", mutation, f"200 but no OCSPResponse: {exc}")

    def api_more(self, iterations: int) -> None:
        """Revocation (mutated serial and body, sometimes of a fresh certificate), CA tags
        and tokens (admin), and certificate listings with mutated query parameters."""
        base = f"{self.server.https_url}/api/v1"
        ca = self.issuing["id"]
        admin = self.server.session()
        rng = self.rng
        for _ in range(iterations):
            kind = rng.randrange(4)
            if kind == 0:
                serial = "00"
                if rng.random() < 0.3:
                    issued = self.api.post(
                        f"{base}/cas/{ca}/certificates", json=self.api_seed(), timeout=TIMEOUT
                    )
                    issued.raise_for_status()
                    serial = issued.json()["serial"]
                    self.results.delivered.add((ca, serial))
                body: Any = {"reason": rng.choice(("KEY_COMPROMISE", "UNSPECIFIED", "SUPERSEDED"))}
                if rng.random() < 0.5:
                    body, mutation = mutate_json(rng, body)
                else:
                    raw, mutation = mutate_bytes(rng, serial.encode())
                    serial = quote(raw.decode("latin-1"), safe="")
                    mutation = f"serial {mutation}"
                url = f"{base}/cas/{ca}/certificates/{serial}/revoke"
                response = _send_json(self.api, "POST", url, body)
                mutation = f"revoke {mutation}"
            elif kind == 1:
                tags, mutation = mutate_json(rng, {"tags": {"team": "pki", "env": "fuzz"}})
                response = _send_json(admin, "PUT", f"{base}/cas/{ca}/tags", tags)
                mutation = f"tags {mutation}"
            elif kind == 2:
                token, mutation = mutate_json(rng, {"name": "fuzz-token", "role": "auditor"})
                response = _send_json(admin, "POST", f"{base}/tokens", token)
                mutation = f"token {mutation}"
            else:
                name = rng.choice(("limit", "cursor", "status", "expiring_within", "colour"))
                value = rng.choice(QUERY_VALUES)
                response = self.api.get(
                    f"{base}/cas/{ca}/certificates", params={name: value}, timeout=TIMEOUT
                )
                mutation = f"list {name}={value[:20]!r}"
            self.count("api-more", response)
            if self.server_error("api-more", mutation, response):
                continue
            if response.status_code >= 400 and "json" not in response.headers.get(
                "Content-Type", ""
            ):
                self.find("api-more", mutation, f"error as {response.headers.get('Content-Type')}")

    # -- AD-style (MS-WSTEP) -------------------------------------------------------------------

    def adcs(self, iterations: int) -> None:
        if self.machine is None:
            return
        url = f"{self.server.https_url}/adcs/ces"
        session = requests.Session()
        session.trust_env = False
        session.verify = str(self.server.tls_bundle)
        key = new_key()
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ignored")]))
            .sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.DER)
        )
        machine = self.machine
        rng = self.rng
        pem = x509.load_der_x509_csr(csr).public_bytes(serialization.Encoding.PEM).decode()
        for _ in range(iterations):
            if rng.random() < 0.2:
                self._adcs_json(session, machine, pem)
                continue
            username, password, template = machine.name, machine.password, "Machine"
            der = csr
            how = rng.randrange(4)
            mutation = ""
            if how == 1:
                der, mutation = mutate_bytes(rng, csr)
                mutation = f"csr {mutation}"
            elif how == 3:
                weird = rng.choice(LDAP_AND_XML_STRINGS)
                field_name = rng.choice(("username", "password", "template"))
                username = weird if field_name == "username" else username
                password = weird if field_name == "password" else password
                template = weird if field_name == "template" else template
                mutation = f"{field_name} {weird[:24]!r}"
            target = url
            if rng.random() < 0.15:  # MS-XCEP GetPolicies instead of an enrollment
                target = f"{self.server.https_url}/adcs/cep"
                body = soap.build_get_policies_request(
                    target, f"urn:uuid:{uuid.uuid4()}", username, password
                )
                mutation = f"GetPolicies {mutation}"
            else:
                body = soap.build_rst_issue(
                    url,
                    der,
                    f"urn:uuid:{uuid.uuid4()}",
                    username,
                    password,
                    additional_context=(("CertificateTemplate", template),),
                )
            if how == 0:
                body, mutated = mutate_bytes(rng, body)
                mutation = f"{mutation} envelope {mutated}"
            elif how == 2:
                body, mutated = _with_doctype(rng, body)
                mutation = f"{mutation} {mutated}"
            response = session.post(
                target, data=body, headers={"Content-Type": SOAP_TYPE}, timeout=TIMEOUT
            )
            self.count("adcs", response)
            if b"root:x:0:0" in response.content:
                self.find("adcs", mutation, "the answer holds /etc/passwd: an external entity")
            if response.status_code not in (200, 400, 401, 403):
                self.find("adcs", mutation, f"HTTP {response.status_code}: {response.text[:300]}")
                continue
            if not response.headers.get("Content-Type", "").startswith("application/soap+xml"):
                self.find("adcs", mutation, f"answer as {response.headers.get('Content-Type')}")
                continue
            if response.status_code == 200 and target == url:
                result = soap.parse_rstr(response.content)
                if result.status == "issued" and result.certificate_der is not None:
                    issued = x509.load_der_x509_certificate(result.certificate_der)
                    self.results.delivered.add(
                        (self.issuing["id"], format(issued.serial_number, "x"))
                    )

    def _adcs_json(self, session: requests.Session, machine: MachineAccount, pem: str) -> None:
        """The JSON enrollment endpoint, its body mutated (as JSON or as bytes)."""
        seed = {"template": "Machine", "csr": pem}
        if self.rng.random() < 0.7:
            mutated, mutation = mutate_json(self.rng, seed)
            body = dumps(mutated)
        else:
            body, mutation = mutate_bytes(self.rng, dumps(seed))
        response = session.post(
            f"{self.server.https_url}/adcs/enroll",
            data=body,
            headers={"Content-Type": "application/json"},
            auth=(machine.name, machine.password),
            timeout=TIMEOUT,
        )
        self.count("adcs", response)
        mutation = f"json {mutation}"
        if response.status_code not in (200, 202, 400, 401, 403, 404, 413):
            self.find("adcs", mutation, f"HTTP {response.status_code}: {response.text[:300]}")
        elif response.status_code == 200:
            issued = x509.load_pem_x509_certificate(response.json()["certificate"].encode())
            self.results.delivered.add((self.issuing["id"], format(issued.serial_number, "x")))
        elif "json" not in response.headers.get("Content-Type", ""):
            self.find("adcs", mutation, f"answer as {response.headers.get('Content-Type')}")

    # -- management API ------------------------------------------------------------------------

    @staticmethod
    def api_seed() -> dict[str, Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "api.fuzz.test")]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("api.fuzz.test")]), False)
            .sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM)
            .decode()
        )
        return {
            "csr": csr,
            "template": "EndEntityCertificate_APIPassthrough/V1",
            "validity": {"type": "DAYS", "value": 10},
            "api_passthrough": {
                "subject": "CN=api.fuzz.test",
                "sans": [{"dns": "api.fuzz.test"}, {"ip": "192.0.2.1"}],
            },
        }

    def api_issue(self, iterations: int) -> None:
        url = f"{self.server.https_url}/api/v1/cas/{self.issuing['id']}/certificates"
        seed = self.api_seed()
        csr_der = x509.load_pem_x509_csr(seed["csr"].encode()).public_bytes(
            serialization.Encoding.DER
        )
        for _ in range(iterations):
            draw = self.rng.random()
            if draw < 0.3:
                der, mutation = mutate_bytes(self.rng, csr_der)
                pem = "-----BEGIN CERTIFICATE REQUEST-----\n"
                pem += base64.encodebytes(der).decode() + "-----END CERTIFICATE REQUEST-----\n"
                body = dumps({**seed, "csr": pem})
                mutation = f"csr {mutation}"
            elif draw < 0.8:
                mutated, mutation = mutate_json(self.rng, seed)
                body = dumps(mutated)
            else:
                body, mutation = mutate_bytes(self.rng, dumps(seed))
                mutation = f"bytes {mutation}"
            response = self.api.post(
                url, data=body, headers={"Content-Type": "application/json"}, timeout=TIMEOUT
            )
            self.count("api", response)
            if self.server_error("api", mutation, response):
                continue
            if response.status_code == 201:
                self.results.delivered.add((self.issuing["id"], response.json()["serial"]))
            elif response.status_code >= 400 and "json" not in response.headers.get(
                "Content-Type", ""
            ):
                self.find("api", mutation, f"error as {response.headers.get('Content-Type')}")


class Directory:
    """The development directory with one machine account, for the AD-style target."""

    def __init__(self, base: Path) -> None:
        self.directory = DevDirectory(base)
        self.directory.start()
        self.machine = provision_machine(self.directory, "FUZZ01", 61001)

    def stop(self) -> None:
        self.directory.stop()


def connectors_config(http01_port: int, directory: Directory | None) -> str:
    """SCEP and ACME (http-01 on the fuzzer's responder) as by default, and AD-style
    against the development directory when there is one."""
    text = (
        '[[connectors]]\ntype = "scep"\nname = "scep"\nmount = "/scep"\n'
        '[[connectors]]\ntype = "acme"\nname = "acme"\nmount = "/acme"\n'
        f"[connectors.settings]\nhttp01_port = {http01_port}\n"
    )
    if directory is not None:
        d = directory.directory
        text += (
            '[[connectors]]\ntype = "adcs"\nname = "adcs"\nmount = "/adcs"\n'
            "[connectors.settings]\n"
            f'directory_url = "{d.url}"\nbase = "{d.base}"\n'
            f'bind_dn = "{d.admin_dn}"\nbind_password = "{d.admin_password}"\n'
        )
    return text


def _send_json(session: requests.Session, method: str, url: str, body: Any) -> requests.Response:
    return session.request(
        method, url, data=dumps(body), headers={"Content-Type": "application/json"}, timeout=TIMEOUT
    )


SCEP_OPERATIONS = (
    "GetCACaps",
    "GetCACert",
    "GetNextCACert",
    "PKIOperation",
    "getcacert",
    "",
    "GetCRL",
)
QUERY_VALUES = (
    "",
    "0",
    "-1",
    "99999999999999999999",
    "ACTIVE",
    "ISSUED",
    "30d",
    "1e9d",
    "%00",
    "bm9wZQ",
    "A" * 3000,
    "\u00e9",
    "../../",
)


def check_server_and_store(
    server: RunningServer, results: Results, database_url: str | None = None
) -> None:
    """After the run: ready, no traceback in the log, the store holds exactly what was
    delivered (beyond what the server made for itself), the audit chain verifies."""
    ready = requests.get(f"{server.http_url}/readyz", timeout=TIMEOUT)
    if ready.status_code != 200:
        results.store_problems.append(f"/readyz answered {ready.status_code} after the run")
    errors: Counter[str] = Counter()
    for line in server.log.read_text(errors="replace").splitlines():
        if "Traceback (most recent call last)" not in line:
            continue
        try:
            logged = json.loads(line)
            text = str(next(v for v in logged.values() if "Traceback (most" in str(v)))
        except (ValueError, StopIteration):
            text = line
        frames = [f.strip() for f in text.splitlines() if f.startswith('  File "/work')]
        errors[f"{text.strip().splitlines()[-1]} ({frames[-1] if frames else '?'})"] += 1
    for error, count in errors.items():
        results.store_problems.append(f"traceback in the server log x{count}: {error}")
    core = Core.open(server.data_dir, database_url)
    try:
        with core.store.read() as conn:
            issued = {
                (record.ca_id, record.serial)
                for record in core.store.list_certificates(conn)
                if record.connector in ("scep", "api", "adcs", "acme")
                and not record.requester.startswith("system:")  # the server's own (SCEP RA)
            }
        unexplained = issued - results.delivered
        if unexplained:
            results.store_problems.append(
                f"{len(unexplained)} certificates in the store that no answer delivered: "
                f"{sorted(unexplained)[:5]}"
            )
        missing = results.delivered - issued
        if missing:
            results.store_problems.append(
                f"{len(missing)} delivered certificates not in the store: {sorted(missing)[:5]}"
            )
        verified = core.audit.verify()
        if not verified.ok:
            results.store_problems.append(f"audit chain: {verified.problems[:3]}")
    finally:
        core.close()


TARGETS: dict[str, Callable[[Fuzzer, int], None]] = {
    "scep": Fuzzer.scep,
    "acme": Fuzzer.acme,
    "acme-finalize": Fuzzer.acme_finalize,
    "acme-more": Fuzzer.acme_more,
    "ocsp": Fuzzer.ocsp,
    "api": Fuzzer.api_issue,
    "api-more": Fuzzer.api_more,
    "adcs": Fuzzer.adcs,
}


def run(
    data_dir: Path,
    iterations: int,
    seed: int,
    database_url: str | None = None,
    targets: tuple[str, ...] = tuple(TARGETS),
) -> Results:
    results = Results(seed, iterations)
    directory = Directory(data_dir.parent / "directory") if "adcs" in targets else None
    responder = Http01Responder()
    try:
        server = start_server(
            data_dir,
            workers=2,
            database_url=database_url,
            extra_config=connectors_config(responder.port, directory),
        )
        try:
            if directory is not None:
                server.publish("adcs", "Machine")  # the CA enrolls for Machine
            machine = directory.machine if directory else None
            fuzzer = Fuzzer(server, random.Random(seed), results, machine, responder)
            for name in targets:
                TARGETS[name](fuzzer, iterations)
            check_server_and_store(server, results, database_url)
        finally:
            server.stop()
    finally:
        responder.close()
        if directory is not None:
            directory.stop()
    return results


def report(results: Results, seconds: float) -> str:
    lines = [
        f"fuzzing seed {results.seed}: {results.iterations} mutations per target in "
        f"{seconds:.0f} s; certificates delivered {len(results.delivered)}",
        "  answers: "
        + ", ".join(f"{key} x{count}" for key, count in sorted(results.statuses.items())),
    ]
    for finding in results.findings[:50]:
        lines.append(f"  FINDING {finding.target} [{finding.mutation}]: {finding.problem}")
    if len(results.findings) > 50:
        lines.append(f"  ... and {len(results.findings) - 50} more findings")
    lines += [f"  STORE {problem}" for problem in results.store_problems]
    lines.append("  OK" if results.ok else "  FAILED")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--database-url")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pkigate-fuzz-") as scratch:
        results = run(
            Path(scratch) / "data",
            args.iterations,
            seed,
            args.database_url,
            tuple(args.targets.split(",")),
        )
    print(report(results, time.monotonic() - began))
    return 0 if results.ok else 1


if __name__ == "__main__":
    sys.exit(main())
