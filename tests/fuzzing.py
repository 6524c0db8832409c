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
  enrollment endpoint's body;
* the GETs of the plain listener: CRLs, CA certificates, SCEP operations, OCSP;
* HTTP framing over a raw socket (tests/rawhttp.py) to every POST endpoint.

Besides byte-level edits, the structure-aware mutations of tests/mutations.py: DER edited
with its lengths kept right (and CSRs and SCEP signer certificates signed again, so that
the names inside get read), JSON text Python would not write, XML edited element-wise.

Each answer must be what the protocol says for bad input (or, when a mutation left the
request valid, the normal answer): never a 5xx; SCEP a CertRep or a 4xx; ACME a
``urn:ietf:params:acme:error:*`` problem document with a fresh Replay-Nonce; OCSP an
OCSPResponse that parses, or a 4xx; the API a JSON error; MS-WSTEP a SOAP answer or fault
with 400/401/403 (503 would say the directory is down, and it is not), never the content
of a file. At the end the server must still be ready, its log must hold no traceback and no
worker death, every certificate in the store must be one that an answer delivered (a SCEP
SUCCESS, an API 201, an issued RSTR), and the audit chain must verify.

    .venv/bin/python tests/fuzzing.py [--total N | --iterations N] [--seed S]
        [--database-url URL] [--targets a,b] [--concurrency C]

``--iterations`` is per target (default 2000); ``--total`` is shared among the targets in
the proportions of CI_COUNTS, what ``tests/test_fuzz.py`` runs. Targets run ``--concurrency``
at once, each from its own random sequence derived from the seed, which is printed: the
same seed replays the same mutations.
"""

from __future__ import annotations

import argparse
import base64
import copy
import ipaddress
import json
import random
import re
import ssl
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

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
from mutations import (  # noqa: E402
    ODD_VALUES,
    mutate_der,
    mutate_json_text,
    mutate_signed,
    mutate_xml,
)
from rawhttp import RAW_HTTP_CASES, SERVING_LAYER_CASES, raw_http_case  # noqa: E402
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
from pkigate.scep.cms import (  # noqa: E402
    ContentCipher,
    DigestAlgorithm,
    KeyTransport,
    build_enveloped_data,
    build_signed_data,
)
from pkigate.scep.messages import (  # noqa: E402
    OID_MESSAGE_TYPE,
    OID_SENDER_NONCE,
    OID_TRANSACTION_ID,
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
OVERSIZED_BODY = 48 * 1024  # over this, as bytes or base64 in a URL, the listener may refuse

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
    seconds: dict[str, float] = field(default_factory=dict)  # per target
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    serving_notes: Counter[str] = field(default_factory=Counter)  # see Fuzzer.reset

    def tally(self, target: str, status: int | None) -> None:
        with self.lock:  # targets run in threads
            self.sent[target] += 1
            self.statuses[f"{target} {status}"] += 1

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
        self.plain = _plain_session()
        admin = server.session()
        token = admin.post(
            f"{server.https_url}/api/v1/tokens",
            json={"name": "fuzz", "role": "issuer"},
            timeout=TIMEOUT,
        )
        token.raise_for_status()
        self.api_secret = token.json()["secret"]
        self.api = _own_connections(server.session(self.api_secret))
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

    def reset(self, target: str, mutation: str, body: bytes, exc: Exception) -> None:
        """A connection closed under a request. The listeners answer a body over their
        limit (413) or a URL too long (414) before reading it, then read on for two
        seconds before closing (a lingering close); a client still sending after that may
        see the reset instead of the answer (noted in the report). A reset under a request
        of ordinary size is a finding."""
        self.results.tally(target, None)
        if len(body) > OVERSIZED_BODY:
            self.results.serving_notes[f"{target}: reset under a {len(body)}-byte body"] += 1
        else:
            self.find(target, mutation, f"connection closed without an answer: {exc}")

    def for_target(self, name: str) -> Fuzzer:
        """A fuzzer for one target, run in a thread beside the others: its own sessions, and
        its own random sequence (from the seed and the target's name, so that a run
        replays whatever order the threads take)."""
        twin = copy.copy(self)
        twin.rng = random.Random(f"{self.results.seed}:{name}")
        twin.plain = _plain_session()
        twin.api = _own_connections(self.server.session(self.api_secret))
        return twin

    def count(self, target: str, response: requests.Response) -> None:
        self.results.tally(target, response.status_code)

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
            body, mutation, signer = self._scep_message(ca.recipient, key, signer, csr)
            try:
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
            except requests.ConnectionError as exc:
                self.reset("scep", mutation, body, exc)
                continue
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
    ) -> tuple[bytes, str, x509.Certificate]:
        """A mutated pkiMessage: its bytes; or a correctly signed and encrypted one around a
        mutated request (any message type, any transactionID); or a correctly signed one
        around a mutated envelope (the last two get past the signature check); or one of
        the structure-aware mutations of _scep_structured. With the signer certificate
        the message names (a SUCCESS is encrypted to it)."""
        rng = self.rng
        how = rng.randrange(8)
        transaction = new_transaction_id()
        if how >= 3:
            structured = self._scep_structured(how, recipient, key, signer, csr, transaction)
            if structured is not None:
                return structured
            how = 1  # a signer certificate cryptography refuses outright: mutate the request
        if how == 0:
            message = build_pki_message(
                MessageType.PKCS_REQ, csr, transaction, signer, key, recipient
            )
            body, mutation = mutate_bytes(rng, message)
            return body, f"message {mutation}", signer
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
            return (
                message,
                f"{kind.name} {cipher} request {mutation} txid {transaction[:12]!r}",
                signer,
            )
        envelope = build_enveloped_data(
            csr, recipient, rng.choice(list(ContentCipher)), rng.choice(list(KeyTransport))
        )
        envelope, mutation = mutate_bytes(rng, envelope)
        message = sign_pki_message(kind, envelope, transaction, signer, key)
        return message, f"{kind.name} envelope {mutation}", signer

    def _scep_structured(
        self,
        how: int,
        recipient: x509.Certificate,
        key: Any,
        signer: x509.Certificate,
        csr: bytes,
        transaction: str,
    ) -> tuple[bytes, str, x509.Certificate] | None:
        """Structure-aware: the message's DER edited with lengths kept right; the request
        or the signer certificate edited and signed again (so that names the signature
        covers get read); a signed attribute of an odd type; the envelope's DER edited
        inside a correct signature. None when the edit left nothing to send."""
        rng = self.rng
        if how == 3:
            message = build_pki_message(
                MessageType.PKCS_REQ, csr, transaction, signer, key, recipient
            )
            return (*mutate_der(rng, message), signer)
        if how == 4:
            request, mutation = mutate_signed(rng, csr, key)
            kind = rng.choice((MessageType.PKCS_REQ,) * 3 + (MessageType.RENEWAL_REQ,))
            message = build_pki_message(kind, request, transaction, signer, key, recipient)
            return message, f"{kind.name} request {mutation}", signer
        if how == 5:
            der, mutation = mutate_signed(rng, signer.public_bytes(serialization.Encoding.DER), key)
            try:
                odd_signer = x509.load_der_x509_certificate(der)
                message = build_pki_message(
                    MessageType.PKCS_REQ, csr, transaction, odd_signer, key, recipient
                )
            except ValueError:  # cryptography refuses it outright, or cannot name its issuer
                return None
            return message, f"signer certificate {mutation}", odd_signer
        envelope = build_enveloped_data(csr, recipient, ContentCipher.AES128, KeyTransport.PKCS1V15)
        if how == 6:
            label, value = rng.choice(ODD_VALUES)
            attributes: list[tuple[str, Any]] = [
                (OID_MESSAGE_TYPE, _Raw(b"\x13\x0219")),
                (OID_TRANSACTION_ID, _Raw(b"\x13\x04fuzz")),
                (OID_SENDER_NONCE, _Raw(b"\x04\x10" + bytes(16))),
            ]
            at = rng.randrange(len(attributes))
            attributes[at] = (attributes[at][0], _Raw(value))
            message = build_signed_data(
                envelope, signer, key, DigestAlgorithm.SHA256, attributes, [signer]
            )
            return message, f"signed attribute {attributes[at][0]} as {label}", signer
        envelope, mutation = mutate_der(rng, envelope)
        kind = rng.choice((MessageType.PKCS_REQ, MessageType.GET_CERT, MessageType.CERT_POLL))
        message = sign_pki_message(kind, envelope, transaction, signer, key)
        return message, f"envelope {mutation}", signer

    # -- ACME ----------------------------------------------------------------------------------

    def acme(self, iterations: int) -> None:
        session = _tls_session(self.server)
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
            how = self.rng.randrange(5)
            if how == 0:
                mutated, mutation = mutate_json(self.rng, payload)
                body = signed(protected, mutated)
                mutation = f"payload {mutation}"
            elif how == 4:  # JSON text Python would not write, signed correctly
                text, mutation = mutate_json_text(self.rng, payload)
                body = signed(protected, payload, raw=text)
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
        session = _tls_session(self.server)

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
            self.results.tally("acme-finalize", response.status)
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
        session = _tls_session(self.server)
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
                    mutate = mutate_der if rng.random() < 0.5 else mutate_bytes
                    der, mutation = mutate(rng, leaf_der)
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
            self.results.tally("acme-more", answer.status)
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
            if rng.random() < 0.6:  # signed again, so that the names inside get read
                der, mutation = mutate_signed(rng, der, key)
            else:
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
            mutate = mutate_der if self.rng.random() < 0.5 else mutate_bytes
            body, mutation = mutate(self.rng, request)
            try:
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
            except requests.ConnectionError as exc:
                self.reset("ocsp", mutation, body, exc)
                continue
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
        admin = _own_connections(self.server.session())
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
                seed: Any = {"tags": {"team": "pki", "env": "fuzz"}}
                raw = None
                if rng.random() < 0.4:
                    raw, mutation = mutate_json_text(rng, seed)
                else:
                    seed, mutation = mutate_json(rng, seed)
                response = _send_json(admin, "PUT", f"{base}/cas/{ca}/tags", seed, raw)
                mutation = f"tags {mutation}"
            elif kind == 2:
                seed = {"name": "fuzz-token", "role": "auditor"}
                raw = None
                if rng.random() < 0.4:
                    raw, mutation = mutate_json_text(rng, seed)
                else:
                    seed, mutation = mutate_json(rng, seed)
                response = _send_json(admin, "POST", f"{base}/tokens", seed, raw)
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
        """MS-WSTEP enrollment (RequestSecurityToken for the Machine template)."""
        self._adcs_soap(iterations, "adcs", policies=False)

    def adcs_cep(self, iterations: int) -> None:
        """MS-XCEP GetPolicies."""
        self._adcs_soap(iterations, "adcs-cep", policies=True)

    def _adcs_soap(self, iterations: int, target_name: str, policies: bool) -> None:
        if self.machine is None:
            return
        url = f"{self.server.https_url}/adcs/ces"
        session = _tls_session(self.server)
        key = new_key()
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ignored")]))
            .sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.DER)
        )
        machine = self.machine
        rng = self.rng
        for _ in range(iterations):
            username, password, template = machine.name, machine.password, "Machine"
            der = csr
            how = rng.randrange(6)
            mutation = ""
            if how == 1 and not policies:
                der, mutation = mutate_bytes(rng, csr)
                mutation = f"csr {mutation}"
            elif how == 4 and not policies:  # signed again: the names inside get read
                der, mutation = mutate_signed(rng, csr, key)
                mutation = f"csr {mutation}"
            elif how == 3:
                weird = rng.choice(LDAP_AND_XML_STRINGS)
                field_name = rng.choice(("username", "password", "template"))
                username = weird if field_name == "username" else username
                password = weird if field_name == "password" else password
                template = weird if field_name == "template" else template
                mutation = f"{field_name} {weird[:24]!r}"
            target = url
            if policies:
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
            elif how == 5:
                body, mutated = mutate_xml(rng, body)
                mutation = f"{mutation} {mutated}"
            try:
                response = session.post(
                    target, data=body, headers={"Content-Type": SOAP_TYPE}, timeout=TIMEOUT
                )
            except requests.ConnectionError as exc:
                self.reset(target_name, mutation, body, exc)
                continue
            self.count(target_name, response)
            if b"root:x:0:0" in response.content:
                self.find(target_name, mutation, "the answer holds /etc/passwd: an external entity")
            if response.status_code not in (200, 400, 401, 403, 413):
                self.find(
                    target_name, mutation, f"HTTP {response.status_code}: {response.text[:300]}"
                )
                continue
            if not response.headers.get("Content-Type", "").startswith("application/soap+xml"):
                self.find(
                    target_name, mutation, f"answer as {response.headers.get('Content-Type')}"
                )
                continue
            if response.status_code == 200 and target == url:
                result = soap.parse_rstr(response.content)
                if result.status == "issued" and result.certificate_der is not None:
                    issued = x509.load_der_x509_certificate(result.certificate_der)
                    self.results.delivered.add(
                        (self.issuing["id"], format(issued.serial_number, "x"))
                    )

    def adcs_json(self, iterations: int) -> None:
        """The AD-style JSON enrollment endpoint, its body mutated (as JSON, as JSON text,
        as bytes, or its CSR signed again after a structure-aware edit)."""
        if self.machine is None:
            return
        session = _tls_session(self.server)
        key = new_key()
        der = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ignored")]))
            .sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.DER)
        )
        for _ in range(iterations):
            self._adcs_json(session, self.machine, der, key)

    def _adcs_json(
        self, session: requests.Session, machine: MachineAccount, der: bytes, key: Any
    ) -> None:
        seed = {"template": "Machine", "csr": _pem("CERTIFICATE REQUEST", der)}
        draw = self.rng.random()
        if draw < 0.4:
            mutated, mutation = mutate_json(self.rng, seed)
            body = dumps(mutated)
        elif draw < 0.6:
            body, mutation = mutate_json_text(self.rng, seed)
        elif draw < 0.8:
            csr, mutation = mutate_signed(self.rng, der, key)
            body = dumps({**seed, "csr": _pem("CERTIFICATE REQUEST", csr)})
            mutation = f"csr {mutation}"
        else:
            body, mutation = mutate_bytes(self.rng, dumps(seed))
        try:
            response = session.post(
                f"{self.server.https_url}/adcs/enroll",
                data=body,
                headers={"Content-Type": "application/json"},
                auth=(machine.name, machine.password),
                timeout=TIMEOUT,
            )
        except requests.ConnectionError as exc:
            self.reset("adcs-json", mutation, body, exc)
            return
        self.count("adcs-json", response)
        mutation = f"json {mutation}"
        if response.status_code not in (200, 202, 400, 401, 403, 404, 413):
            self.find("adcs-json", mutation, f"HTTP {response.status_code}: {response.text[:300]}")
        elif response.status_code == 200:
            issued = x509.load_pem_x509_certificate(response.json()["certificate"].encode())
            self.results.delivered.add((self.issuing["id"], format(issued.serial_number, "x")))
        elif "json" not in response.headers.get("Content-Type", ""):
            self.find("adcs-json", mutation, f"answer as {response.headers.get('Content-Type')}")

    # -- CRL, CA certificate and SCEP GETs -----------------------------------------------------

    def gets(self, iterations: int) -> None:
        """The GET endpoints of the plain HTTP listener: CRLs (complete and partitioned), CA
        certificates (DER and PEM), SCEP's GET operations and OCSP GET, with mutated CA ids,
        partitions, operations and messages, odd methods and percent-encodings."""
        rng = self.rng
        http = self.server.http_url
        ca = self.issuing["id"]
        for _ in range(iterations):
            raw, mutated = mutate_bytes(rng, ca.encode())
            odd_id = quote(raw.decode("latin-1"), safe="") if rng.random() < 0.7 else ca
            odd = rng.choice((*QUERY_VALUES, "%2e%2e", "%00", "%ff", "..%2f..%2fetc%2fpasswd"))
            kind = rng.randrange(6)
            if kind == 0:
                path, mutation = f"/crl/{odd_id}.crl", f"crl id {mutated}"
            elif kind == 1:
                partition = rng.choice(("0", "1", "-1", "99999999999999999999", "1" * 5000, odd))
                path = f"/crl/{rng.choice((ca, odd_id))}/{partition}.crl"
                mutation = f"crl partition {partition[:20]!r} id {mutated}"
            elif kind == 2:
                suffix = rng.choice((".cer", ".pem", ".der", "", ".cer/", ".pem%00"))
                path, mutation = f"/ca/{odd_id}{suffix}", f"ca {suffix} id {mutated}"
            elif kind == 3:
                operation = rng.choice((*SCEP_OPERATIONS, "GetCACaps%00", "A" * 3000))
                path = f"/scep?operation={quote(operation)}&message={quote(odd)}"
                mutation = f"scep GET {operation[:20]!r} message={odd[:20]!r}"
            elif kind == 4:
                text = base64.b64encode(rng.randbytes(rng.choice((0, 1, 40, 3000)))).decode()
                text = rng.choice((text, quote(text, safe=""), text.replace("+", " "), odd))
                path, mutation = f"/ocsp/{ca}/{text}", f"ocsp GET {text[:20]!r}"
            else:
                path = rng.choice((f"/crl/{ca}.crl", f"/ca/{ca}.cer", "/scep?operation=GetCACert"))
                path += rng.choice(("?" + "a=1&" * 2000, "#x", "%", "?%zz", ";x"))
                mutation = f"suffix {path[-20:]!r}"
            method = rng.choice(("GET",) * 6 + ("HEAD", "POST", "DELETE", "OPTIONS"))
            response = self.plain.request(method, f"{http}{path}", timeout=TIMEOUT)
            self.count("get", response)
            self.server_error("get", f"{method} {mutation}", response)

    # -- HTTP framing over a raw socket -----------------------------------------------------------

    def raw_http(self, iterations: int) -> None:
        self._raw_http(iterations, "http", RAW_HTTP_CASES)

    def raw_http_serving(self, iterations: int) -> None:
        # Bodies that never arrive: answered at the server's body deadline (1 s here).
        self._raw_http(iterations, "http-serving", SERVING_LAYER_CASES, timeout=5.0)

    def _raw_http(
        self, iterations: int, target: str, cases: dict[str, Any], timeout: float = 8.0
    ) -> None:
        """Every POST endpoint, its body framed oddly (rawhttp): a 4xx or the connection
        closed is right; a 5xx, or no answer, is a finding. The bodies are refused by the
        endpoints themselves, so that nothing is issued whatever the framing does."""
        plain = urlsplit(self.server.http_url)
        secure = urlsplit(self.server.https_url)
        tls = ssl.create_default_context(cafile=str(self.server.tls_bundle))
        ca = self.issuing["id"]
        api_auth = {"Authorization": self.api.headers["Authorization"]}
        endpoints: list[tuple[bool, str, str, bytes, dict[str, str]]] = [
            (False, "/scep?operation=PKIOperation", PKI_MESSAGE_TYPE, b"\x30\x03\x02\x01\x00", {}),
            (False, f"/ocsp/{ca}", "application/ocsp-request", b"\x30\x00", {}),
            (True, "/acme/new-account", "application/jose+json", b"{}", {}),
            (True, f"/api/v1/cas/{ca}/certificates", "application/json", b'{"csr": 1}', api_auth),
        ]
        if self.machine is not None:
            basic = base64.b64encode(f"{self.machine.name}:{self.machine.password}".encode())
            endpoints += [
                (
                    True,
                    "/adcs/enroll",
                    "application/json",
                    b'{"template": "Machine", "csr": "x"}',
                    {"Authorization": f"Basic {basic.decode()}"},
                ),
                (True, "/adcs/cep", SOAP_TYPE, b"<x/>", {}),
                (True, "/adcs/ces", SOAP_TYPE, b"<x/>", {}),
            ]
        for _ in range(iterations):
            secured, path, content_type, body, headers = self.rng.choice(endpoints)
            where = secure if secured else plain
            name, answer = raw_http_case(
                self.rng,
                cases,
                where.hostname or "127.0.0.1",
                where.port or 0,
                tls if secured else None,
                "POST",
                path,
                content_type,
                body,
                headers,
                timeout,
            )
            self.results.tally(target, answer.status)
            mutation = f"{name} to {path.split('?')[0]}"
            if answer.timed_out:
                self.find(target, mutation, f"no answer in {answer.seconds:.0f} s")
            elif answer.status is not None and answer.status >= 500:
                self.find(target, mutation, f"HTTP {answer.status}")

    # -- management API ------------------------------------------------------------------------

    @staticmethod
    def api_seed() -> dict[str, Any]:
        return Fuzzer.api_seed_and_key()[0]

    @staticmethod
    def api_seed_and_key() -> tuple[dict[str, Any], Any]:
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "api.fuzz.test")]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("api.fuzz.test")]), False)
            .sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM)
            .decode()
        )
        seed = {
            "csr": csr,
            "template": "EndEntityCertificate_APIPassthrough/V1",
            "validity": {"type": "DAYS", "value": 10},
            "api_passthrough": {
                "subject": "CN=api.fuzz.test",
                "sans": [{"dns": "api.fuzz.test"}, {"ip": "192.0.2.1"}],
            },
        }
        return seed, key

    def api_issue(self, iterations: int) -> None:
        url = f"{self.server.https_url}/api/v1/cas/{self.issuing['id']}/certificates"
        seed, key = self.api_seed_and_key()
        csr_der = x509.load_pem_x509_csr(seed["csr"].encode()).public_bytes(
            serialization.Encoding.DER
        )
        for _ in range(iterations):
            draw = self.rng.random()
            if draw < 0.45:
                if draw < 0.15:
                    der, mutation = mutate_bytes(self.rng, csr_der)
                else:  # signed again: the names inside get read
                    der, mutation = mutate_signed(self.rng, csr_der, key)
                body = dumps({**seed, "csr": _pem("CERTIFICATE REQUEST", der)})
                mutation = f"csr {mutation}"
            elif draw < 0.6:
                body, mutation = mutate_json_text(self.rng, seed)
            elif draw < 0.85:
                mutated, mutation = mutate_json(self.rng, seed)
                body = dumps(mutated)
            else:
                body, mutation = mutate_bytes(self.rng, dumps(seed))
                mutation = f"bytes {mutation}"
            try:
                response = self.api.post(
                    url, data=body, headers={"Content-Type": "application/json"}, timeout=TIMEOUT
                )
            except requests.ConnectionError as exc:
                self.reset("api", mutation, body, exc)
                continue
            self.count("api", response)
            if self.server_error("api", mutation, response):
                continue
            if response.status_code == 201:
                self.results.delivered.add((self.issuing["id"], response.json()["serial"]))
            elif response.status_code >= 400 and "json" not in response.headers.get(
                "Content-Type", ""
            ):
                self.find("api", mutation, f"error as {response.headers.get('Content-Type')}")


class _Raw:
    """An attribute value given as its DER (build_signed_data calls ``dump()``)."""

    def __init__(self, der: bytes) -> None:
        self.der = der

    def dump(self) -> bytes:
        return self.der


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


def _send_json(
    session: requests.Session, method: str, url: str, body: Any, raw: bytes | None = None
) -> requests.Response:
    return session.request(
        method,
        url,
        data=dumps(body) if raw is None else raw,
        headers={"Content-Type": "application/json"},
        timeout=TIMEOUT,
    )


def _plain_session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    return _own_connections(session)


def _tls_session(server: RunningServer) -> requests.Session:
    """A session for the HTTPS listener without the admin token of server.session()."""
    session = requests.Session()
    session.trust_env = False
    session.verify = str(server.tls_bundle)
    return _own_connections(session)


def _own_connections(session: requests.Session) -> requests.Session:
    """One connection per request: a kept-alive connection the server closes as idle (5 s)
    while a request is on its way answers nothing (a thread of the fuzzer can stall that
    long on a loaded machine), and that must not pass for the server dropping a request
    it read."""
    session.headers["Connection"] = "close"
    return session


def _pem(label: str, der: bytes) -> str:
    return f"-----BEGIN {label}-----\n{base64.encodebytes(der).decode()}-----END {label}-----\n"


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
    """After the run: ready, no worker death and no traceback in the log, the store holds
    exactly what was delivered (beyond what the server made for itself), the audit chain
    verifies."""
    ready = requests.get(f"{server.http_url}/readyz", timeout=TIMEOUT)
    if ready.status_code != 200:
        results.store_problems.append(f"/readyz answered {ready.status_code} after the run")
    errors: Counter[str] = Counter()
    for line in server.log.read_text(errors="replace").splitlines():
        # The arbiter reports a worker that died ("was sent SIGKILL", "exited with code"),
        # was killed at its timeout, or failed to boot.
        if "Worker (pid:" in line or "WORKER TIMEOUT" in line or "Worker failed to boot" in line:
            results.store_problems.append(f"a worker died: {line[:200]}")
            continue
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
    "adcs-cep": Fuzzer.adcs_cep,
    "adcs-json": Fuzzer.adcs_json,
    "get": Fuzzer.gets,
    "http": Fuzzer.raw_http,
}
# Framing the gthread workers this layer replaced failed (see rawhttp.SERVING_LAYER_CASES):
# a run of its own, short, as most of its requests wait out the server's body deadline.
SERVING_LAYER_TARGETS: dict[str, Callable[[Fuzzer, int], None]] = {
    "http-serving": Fuzzer.raw_http_serving,
}


BODY_TIMEOUT_SECONDS = 1
CONCURRENCY = 4  # targets fuzzed at once: the server's two workers are never idle

# Mutations per target in one bounded run (tests/test_fuzz.py runs it on SQLite and on
# PostgreSQL): each endpoint gets at least 1,000 per CI run, where ACME's three targets
# share ACME's thousand and the API's two share the API's. --total N splits N the same way.
CI_COUNTS: dict[str, int] = {
    "scep": 500,
    "acme": 200,
    "acme-finalize": 100,
    "acme-more": 200,
    "ocsp": 500,
    "api": 250,
    "api-more": 250,
    "adcs": 500,
    "adcs-cep": 500,
    "adcs-json": 500,
    "get": 500,
    "http": 150,
}


def split_total(total: int, targets: tuple[str, ...]) -> dict[str, int]:
    """``total`` mutations shared among ``targets`` in CI_COUNTS' proportions."""
    weights = {name: CI_COUNTS.get(name, 100) for name in targets}
    scale = total / sum(weights.values())
    return {name: max(1, round(weight * scale)) for name, weight in weights.items()}


def run(
    data_dir: Path,
    iterations: int | dict[str, int],
    seed: int,
    database_url: str | None = None,
    targets: tuple[str, ...] = tuple(TARGETS),
    concurrency: int = CONCURRENCY,
) -> Results:
    """Fuzz ``targets`` (``iterations`` each, or as many as the dict says), ``concurrency``
    of them at once, each in its own thread from its own random sequence."""
    counts = iterations if isinstance(iterations, dict) else dict.fromkeys(targets, iterations)
    results = Results(seed, max(counts.values(), default=0))
    setup_began = time.monotonic()
    directory = (
        Directory(data_dir.parent / "directory")
        if any(t.startswith("adcs") or t == "http" for t in targets)
        else None
    )
    responder = Http01Responder()
    try:
        server = start_server(
            data_dir,
            workers=2,
            database_url=database_url,
            extra_config=connectors_config(responder.port, directory),
            # A body that never arrives (raw HTTP framing) is answered 408 at this deadline,
            # well within the fuzzer's own wait.
            top_config=f"body_timeout_seconds = {BODY_TIMEOUT_SECONDS}\n",
        )
        try:
            if directory is not None:
                server.publish("adcs", "Machine")  # the CA enrolls for Machine
            machine = directory.machine if directory else None
            fuzzer = Fuzzer(server, random.Random(seed), results, machine, responder)
            every = {**TARGETS, **SERVING_LAYER_TARGETS}
            results.seconds["(setup)"] = time.monotonic() - setup_began

            def fuzz(name: str) -> None:
                began = time.monotonic()
                every[name](fuzzer.for_target(name), counts[name])
                results.seconds[name] = time.monotonic() - began

            with ThreadPoolExecutor(max_workers=concurrency) as pool:
                # Slowest first, so that the last thread is not left with a long target.
                for done in [pool.submit(fuzz, name) for name in targets]:
                    done.result()
            began = time.monotonic()
            check_server_and_store(server, results, database_url)
            results.seconds["(checks)"] = time.monotonic() - began
        finally:
            server.stop()
    finally:
        responder.close()
        if directory is not None:
            directory.stop()
    return results


def report(results: Results, seconds: float) -> str:
    lines = [
        f"fuzzing seed {results.seed}: {sum(results.sent.values())} mutations in "
        f"{seconds:.0f} s; certificates delivered {len(results.delivered)}",
        "  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in results.seconds.items()),
        "  answers: "
        + ", ".join(f"{key} x{count}" for key, count in sorted(results.statuses.items())),
    ]
    for finding in results.findings[:50]:
        lines.append(f"  FINDING {finding.target} [{finding.mutation}]: {finding.problem}")
    if len(results.findings) > 50:
        lines.append(f"  ... and {len(results.findings) - 50} more findings")
    lines += [f"  STORE {problem}" for problem in results.store_problems]
    lines += [
        f"  SERVING LAYER (not failed on) {note} x{count}"
        for note, count in sorted(results.serving_notes.items())
    ]
    lines.append("  OK" if results.ok else "  FAILED")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS, help="per target")
    parser.add_argument(
        "--total", type=int, help="mutations in all, shared among the targets (not --iterations)"
    )
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--database-url")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pkigate-fuzz-") as scratch:
        targets = tuple(args.targets.split(","))
        results = run(
            Path(scratch) / "data",
            split_total(args.total, targets) if args.total else args.iterations,
            seed,
            args.database_url,
            targets,
            args.concurrency,
        )
    print(report(results, time.monotonic() - began))
    return 0 if results.ok else 1


if __name__ == "__main__":
    sys.exit(main())
