"""The simulated devices: state machines that enroll, verify, renew and revoke.

A device does one step at a time (:meth:`Device.step`) and says when its next step is
due, so that a few worker threads drive thousands of devices that spend most of their
life waiting for their renewal time (on the simulated clock, see clock.py). Each step
talks to the server over real HTTP the way the real client does and checks what it gets.

* :class:`Phone`: an MDM-managed phone over SCEP. The MDM gets a one-time challenge from
  the management API, the phone generates an RSA key and enrolls (PKCSReq); on a
  connector that holds requests for approval, the MDM administrator approves it and the
  phone polls (CertPoll). It renews in the last third of its certificate's lifetime with
  a RenewalReq signed by its current certificate, with a new key.
* :class:`Server`: an ACME client (one account per server) ordering a certificate for its
  names, answering http-01 from the simulator's responder or dns-01 through the test DNS
  server, renewing when the server's renewal information (ARI, RFC 9773) says, with the
  order naming the certificate it replaces; some revoke their last certificate.

* :class:`Machine`: a domain-joined machine over AD-style enrollment: its computer account
  is created in the directory, it autoenrolls in what the CA's policy (MS-XCEP) says it
  holds AutoEnroll on (MS-WSTEP), and renews with its certificate as TLS client
  certificate.

A new kind of device is one more :class:`Device` subclass registered in
:data:`DEVICE_KINDS` under the name that :meth:`FleetSettings.counts` gives it.
"""

from __future__ import annotations

import base64
import contextlib
import random
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar
from urllib.parse import quote

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from pkigate.acme import jws
from pkigate.adcs.policy import sid_from_certificate
from pkigate.devsim.acme_client import AcmeClient, AcmeClientError
from pkigate.devsim.adcs_client import (
    AdcsClient,
    AdcsClientError,
    Enrolled,
    MachineAccount,
    provision_machine,
)
from pkigate.devsim.attempts import (
    DeviceError,
    DeviceFailed,
    Recorder,
    attempt,
    check_http,
)
from pkigate.devsim.challenges import ChallengeDns, Http01Responder
from pkigate.devsim.clock import SimClock
from pkigate.devsim.config import FleetSettings, Target
from pkigate.devsim.events import (
    ACME,
    ADCS,
    API,
    CHALLENGE_CONSUMED,
    ORDER_STUCK,
    SCEP,
    VALIDATION_STALLED,
    EventLog,
    ReceivedCertificate,
)
from pkigate.devsim.scep_client import (
    CaCertificates,
    PendingRequest,
    ScepClient,
    certificate_request,
    failure_type,
    new_key,
    new_transaction_id,
    self_signed,
)
from pkigate.devsim.verify import CertificateChecker, Expectation
from pkigate.scep.messages import CertRep, PkiStatus

# Phones renew somewhere in this share of their lifetime (MDMs renew with a third left).
PHONE_RENEWAL_WINDOW = (2 / 3, 5 / 6)
# How long, in simulated time, an MDM administrator takes to approve, and a phone waits
# between CertPolls.
APPROVAL_DELAY = timedelta(minutes=30)
POLL_INTERVAL = timedelta(minutes=15)
ORDER_POLL_SECONDS = 0.3
REVOCATION_REASON = x509.ReasonFlags.cessation_of_operation
REVOCATION_REASON_CODE = 5  # RFC 5280 CRLReason cessationOfOperation
ALREADY_USED = "already used"  # the SCEP connector's failInfoText for a spent challenge
MAX_CHALLENGES = 5  # challenges an MDM hands one phone before it gives up
REAPPROVE_AFTER_SECONDS = 20.0  # still pending this long after an approval: look again


class FleetContext:
    """What every device of a run shares: settings, target, clock, event log, checker,
    challenge responders, and one HTTP session per worker thread."""

    def __init__(
        self,
        settings: FleetSettings,
        target: Target,
        clock: SimClock,
        log: EventLog,
        http01: Http01Responder | None,
        dns: ChallengeDns | None,
        *,
        fault_mode: bool = False,
        run_id: str = "run",
    ) -> None:
        self.settings = settings
        self.target = target
        self.clock = clock
        self.log = log
        self.http01 = http01
        self.dns = dns
        self.fault_mode = fault_mode
        self.run_id = run_id
        self._local = threading.local()
        self.checker = CertificateChecker(target.root, self.session)

    def session(self) -> requests.Session:
        """This thread's session: connections are kept alive per worker, as a client does."""
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.trust_env = False  # a proxy in the environment must not see loopback
            session.verify = str(self.target.tls_bundle)
            self._local.session = session
        return session

    def recorder(self, device: str) -> Recorder:
        return Recorder(self.log, device, self.fault_mode)

    def deadline(self) -> float:
        return time.monotonic() + self.settings.retry_deadline

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """A management API call with the run's token; the JSON answer."""
        response = self.session().request(
            method,
            f"{self.target.https_url}/api/v1{path}",
            json=body,
            headers={"Authorization": f"Bearer {self.target.token}"},
            timeout=30,
        )
        check_http(response, f"{method} {path}")
        return response.json() if response.content else None


class Device(ABC):
    """One simulated device. ``step`` runs its next step and returns when the one after
    is due (``time.monotonic()``), or None when the device is done."""

    kind: ClassVar[str]

    def __init__(self, name: str, ctx: FleetContext, rng: random.Random) -> None:
        self.name = name
        self.ctx = ctx
        self.rng = rng
        self.recorder = ctx.recorder(name)
        self.failure: DeviceFailed | None = None
        self.certificates = 0
        """Certificates received and verified."""

    @abstractmethod
    def step(self) -> float | None: ...

    def received(self, certificate: x509.Certificate, protocol: str) -> None:
        self.ctx.log.received(
            ReceivedCertificate(
                self.name,
                protocol,
                format(certificate.serial_number, "x"),
                certificate.public_bytes(serialization.Encoding.DER),
            )
        )

    def verified(self, certificate: x509.Certificate) -> None:
        self.ctx.log.mark(format(certificate.serial_number, "x"), verified=True)
        self.certificates += 1


DeviceFactory = Callable[[FleetContext, int, random.Random], Device]


# -- phones (SCEP) -----------------------------------------------------------------------------


@dataclass
class _ScepRequest:
    """One enrollment or renewal in progress; kept across retries so that a request cut
    off is sent again as it was (same transactionID, same PKCS#10)."""

    transaction_id: str
    key: rsa.RSAPrivateKey
    request_der: bytes
    signer: x509.Certificate | None = None
    """The self-signed certificate of a PKCSReq (None for a RenewalReq)."""
    cut_off: bool = False
    """A try got no answer: the server may have acted on it."""


class Phone(Device):
    kind = "phone"

    def __init__(self, name: str, ctx: FleetContext, rng: random.Random) -> None:
        super().__init__(name, ctx, rng)
        self.subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        target = ctx.target
        waits = (
            target.pending_connector is not None and rng.random() < ctx.settings.pending_fraction
        )
        self.connector = target.pending_connector if waits else target.scep_connector
        assert self.connector is not None
        self.renewals_left = ctx.settings.renewals
        self.url: str | None = None
        self.key: rsa.RSAPrivateKey | None = None
        self.certificate: x509.Certificate | None = None
        self._request: _ScepRequest | None = None
        self._pending: PendingRequest | None = None
        self._approved = False
        self._approved_at = 0.0
        self._fresh_challenges = 0
        self._next: Callable[[], float | None] = self._enroll

    @classmethod
    def create(cls, ctx: FleetContext, index: int, rng: random.Random) -> Phone:
        return cls(f"phone-{ctx.run_id}-{index:05d}", ctx, rng)

    def step(self) -> float | None:
        return self._next()

    # steps -------------------------------------------------------------------------------

    def _enroll(self) -> float | None:
        deadline = self.ctx.deadline()
        if self._request is None:
            # The MDM asks for a one-time challenge bound to this phone, then pushes it
            # to the phone with the SCEP URL (the challenge answer carries both).
            issued = attempt(
                self.recorder,
                API,
                "challenge",
                lambda: self.ctx.api(
                    "POST",
                    f"/connectors/{self.connector}/challenges",
                    {"device_id": self.name, "subject": self.subject.rfc4514_string()},
                ),
                deadline,
            )
            self.url = str(issued["url"])
            key = new_key()
            self._request = _ScepRequest(
                new_transaction_id(),
                key,
                certificate_request(key, self.subject, str(issued["challenge"])),
                self_signed(key, self.subject),
            )
        request = self._request
        signer = request.signer
        assert signer is not None
        client, ca = self._discover(deadline)

        def send() -> CertRep:
            reply = self._exchange(
                request,
                lambda: client.enroll(
                    ca, signer, request.key, request.request_der, request.transaction_id
                ),
            )
            if reply.status is PkiStatus.FAILURE:
                text = reply.fail_info_text or ""
                if request.cut_off and ALREADY_USED in text:
                    # The try that got no answer used the challenge (and was issued or
                    # not, its certificate never reached us): ask the MDM for another.
                    raise DeviceError(CHALLENGE_CONSUMED, text)
                raise DeviceError(failure_type(reply), text)
            return reply

        try:
            reply = attempt(self.recorder, SCEP, "enroll", send, deadline)
        except DeviceFailed as exc:
            if exc.error_type != CHALLENGE_CONSUMED or self._fresh_challenges >= MAX_CHALLENGES:
                raise
            self._fresh_challenges += 1
            self._request = None
            return time.monotonic()
        if reply.status is PkiStatus.PENDING:
            self._pending = PendingRequest(
                request.transaction_id, self.subject, request.key, signer
            )
            self._next = self._approve_and_poll
            return self.ctx.clock.monotonic_at(self.ctx.clock.now() + APPROVAL_DELAY)
        return self._issued(reply, ca, request.key, deadline)

    def _approve_and_poll(self) -> float | None:
        deadline = self.ctx.deadline()
        pending = self._pending
        assert pending is not None
        if not self._approved:
            attempt(self.recorder, API, "approve", lambda: self._approve(pending), deadline)
            self._approved = True
            self._approved_at = time.monotonic()
        client, ca = self._discover(deadline)

        def poll() -> CertRep:
            reply = client.poll(ca, pending)
            if reply.status is PkiStatus.FAILURE:
                raise DeviceError(failure_type(reply), reply.fail_info_text or "")
            return reply

        reply = attempt(self.recorder, SCEP, "poll", poll, deadline)
        if reply.status is PkiStatus.PENDING:
            if time.monotonic() - self._approved_at > REAPPROVE_AFTER_SECONDS:
                # An approval cut off by a crash puts the request back in the queue (the
                # server settles it after 15 s): the administrator sees it and approves again.
                self._approved = False
            return self.ctx.clock.monotonic_at(self.ctx.clock.now() + POLL_INTERVAL)
        self._pending = None
        return self._issued(reply, ca, pending.key, deadline)

    def _approve(self, pending: PendingRequest) -> None:
        path = f"/connectors/{self.connector}/pending/{quote(pending.transaction_id, safe='')}"
        try:
            self.ctx.api("POST", f"{path}/approve")
        except DeviceError as exc:
            # 409: already decided, by an earlier try whose answer was lost.
            if exc.error_type != "http-409" or not self._approved_before(pending):
                raise

    def _approved_before(self, pending: PendingRequest) -> bool:
        listed = self.ctx.api("GET", f"/connectors/{self.connector}/pending")
        return all(item.get("transaction_id") != pending.transaction_id for item in listed)

    def _renew(self) -> float | None:
        deadline = self.ctx.deadline()
        assert self.certificate is not None and self.key is not None
        current, current_key = self.certificate, self.key
        if self._request is None:
            key = new_key()
            self._request = _ScepRequest(
                new_transaction_id(), key, certificate_request(key, self.subject, None)
            )
        request = self._request
        client, ca = self._discover(deadline)

        def send() -> CertRep:
            reply = self._exchange(
                request,
                lambda: client.renew(
                    ca, current, current_key, request.request_der, request.transaction_id
                ),
            )
            if reply.status is not PkiStatus.SUCCESS:
                raise DeviceError(
                    failure_type(reply) if reply.status is PkiStatus.FAILURE else "scep:pending",
                    reply.fail_info_text or "",
                )
            return reply

        reply = attempt(self.recorder, SCEP, "renew", send, deadline)
        self.renewals_left -= 1
        return self._issued(reply, ca, request.key, deadline)

    # helpers -----------------------------------------------------------------------------

    def _discover(self, deadline: float) -> tuple[ScepClient, CaCertificates]:
        """GetCACaps then GetCACert, as a phone does before each operation."""
        assert self.url is not None
        client = ScepClient(self.url, self.ctx.session())
        caps = attempt(self.recorder, SCEP, "getcacaps", client.get_ca_caps, deadline)
        if "POSTPKIOperation" not in caps:
            raise DeviceFailed("getcacaps", "scep:caps", f"no POSTPKIOperation in {sorted(caps)}")
        ca = attempt(self.recorder, SCEP, "getcacert", client.get_ca_cert, deadline)
        return client, ca

    @staticmethod
    def _exchange(request: _ScepRequest, send: Callable[[], CertRep]) -> CertRep:
        try:
            return send()
        except requests.RequestException:
            request.cut_off = True
            raise
        except DeviceError as exc:
            if exc.transient:
                request.cut_off = True
            raise

    def _issued(
        self, reply: CertRep, ca: CaCertificates, key: rsa.RSAPrivateKey, deadline: float
    ) -> float | None:
        chain = _chain(reply.certificates, ca.chain)
        leaf = chain[0]
        self.received(leaf, SCEP)
        self.ctx.checker.check_issued(
            chain,
            Expectation(
                key.public_key(),
                frozenset({"digital_signature"}),
                self.ctx.target.phone_eku,
                subject_common_name=self.name,
                max_lifetime=self.ctx.target.max_lifetime,
            ),
            self.recorder,
            deadline,
        )
        self.verified(leaf)
        self.certificate, self.key, self._request = leaf, key, None
        if self.renewals_left <= 0:
            return None
        self._next = self._renew
        share = self.rng.uniform(*PHONE_RENEWAL_WINDOW)
        lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        return self.ctx.clock.monotonic_at(leaf.not_valid_before_utc + lifetime * share)


# -- servers (ACME) ----------------------------------------------------------------------------


class Server(Device):
    kind = "server"

    def __init__(self, name: str, ctx: FleetContext, rng: random.Random, revokes: bool) -> None:
        super().__init__(name, ctx, rng)
        settings = ctx.settings
        prefixes = ["", "www.", "api.", "mail.", "app.", "cdn.", "vpn.", "git.", "db.", "ws."]
        self.names = [f"{p}{name}.{settings.domain}" for p in prefixes[: settings.names_per_server]]
        self.challenge_type = "dns-01" if rng.random() < settings.dns01_fraction else "http-01"
        if self.challenge_type == "dns-01" and ctx.dns is None:
            self.challenge_type = "http-01"
        self.revokes = revokes
        self.account_key = ec.generate_private_key(ec.SECP256R1())
        self.account_url: str | None = None
        self.renewals_left = settings.renewals
        self.certificate: x509.Certificate | None = None
        self.issuer: x509.Certificate | None = None
        self._order_url: str | None = None
        self._status = ("", 0.0)  # the order's status, and since when (monotonic)
        self._certificate_key: ec.EllipticCurvePrivateKey | None = None
        self._replaces: str | None = None
        self._cut_off = False
        self._published: list[tuple[str, str]] = []  # ("http-01", token) / ("dns-01", name)
        self._responded: set[str] = set()  # authorizations answered in the current order
        self._chosen: datetime | None = None  # the renewal moment picked in the ARI window
        self._next: Callable[[], float | None] = self._register

    @classmethod
    def create(cls, ctx: FleetContext, index: int, rng: random.Random) -> Server:
        revokes = rng.random() < ctx.settings.revoke_fraction
        return cls(f"srv-{ctx.run_id}-{index:05d}", ctx, rng, revokes)

    def step(self) -> float | None:
        return self._next()

    def _client(self) -> AcmeClient:
        client = AcmeClient(self.ctx.target.acme_directory, self.account_key, self.ctx.session())
        client.account_url = self.account_url
        return client

    # steps -------------------------------------------------------------------------------

    def _register(self) -> float | None:
        deadline = self.ctx.deadline()

        def register() -> str:
            client = self._client()
            client.register([f"mailto:hostmaster@{self.names[0]}"])
            if client.account_url is None:
                raise DeviceError("acme:no-account-url", "newAccount answered no Location")
            return client.account_url

        self.account_url = attempt(self.recorder, ACME, "account", register, deadline)
        self._next = self._order
        return time.monotonic()

    def _order(self) -> float | None:
        """The first certificate, or a renewal replacing the current one."""
        deadline = self.ctx.deadline()
        renewing = self.certificate is not None
        self._replaces = ari_cert_id(self.certificate) if self.certificate is not None else None
        chain = attempt(
            self.recorder, ACME, "renew" if renewing else "order", self._drive_order, deadline
        )
        key = self._certificate_key
        assert key is not None
        leaf = chain[0]
        self.received(leaf, ACME)
        self.issuer = self.ctx.checker.check_issued(
            chain,
            Expectation(
                key.public_key(),
                frozenset({"digital_signature"}),
                self.ctx.target.server_eku,
                dns_names=frozenset(self.names),
                max_lifetime=self.ctx.target.max_lifetime,
            ),
            self.recorder,
            deadline,
        )
        self.verified(leaf)
        self.certificate, self._certificate_key, self._cut_off = leaf, None, False
        if renewing:
            self.renewals_left -= 1
        if self.renewals_left > 0:
            self._next = self._renew_when_suggested
            return self._suggested_time(deadline)
        if self.revokes:
            self._next = self._revoke
            return time.monotonic()
        return None

    def _renew_when_suggested(self) -> float | None:
        """Ask ARI again when the chosen moment comes: a later window (or a revocation
        moving it to the past) changes the plan, as RFC 9773 section 4.3 asks."""
        due = self._suggested_time(self.ctx.deadline(), keep_choice=True)
        if due > time.monotonic() + 0.05:
            return due
        return self._order()

    def _revoke(self) -> float | None:
        deadline = self.ctx.deadline()
        certificate, issuer = self.certificate, self.issuer
        assert certificate is not None and issuer is not None
        cut_off = False

        def revoke() -> None:
            nonlocal cut_off
            try:
                self._client().revoke(certificate, REVOCATION_REASON_CODE)
            except AcmeClientError as exc:
                # Revoked by a try whose answer was lost.
                if not (cut_off and exc.type == "alreadyRevoked"):
                    raise
            except requests.RequestException:
                cut_off = True
                raise

        attempt(self.recorder, ACME, "revoke", revoke, deadline)
        self.ctx.log.mark(format(certificate.serial_number, "x"), revoked=True)
        self.ctx.checker.check_revoked(
            certificate, issuer, REVOCATION_REASON, self.recorder, deadline
        )
        # ARI must now say "renew at once" (a window in the past, RFC 9773 4.2).
        window = attempt(
            self.recorder, ACME, "ari", lambda: self._renewal_window(certificate), deadline
        )
        if window[1] > datetime.now(window[1].tzinfo) + timedelta(minutes=5):
            self.recorder.event(
                ACME,
                "ari-after-revoke",
                time.monotonic(),
                ("acme:ari-after-revoke", f"window ends {window[1].isoformat()}"),
            )
        return None

    # the order -----------------------------------------------------------------------------

    def _drive_order(self) -> list[x509.Certificate]:
        """Take the order from wherever it is to a certificate. Called again after a
        failure, it resumes the same order (re-reading its state) rather than start over."""
        try:
            return self._advance_order()
        except (requests.RequestException, DeviceError, AcmeClientError) as exc:
            if (
                isinstance(exc, requests.RequestException)
                or (isinstance(exc, AcmeClientError) and exc.status >= 500)
                or (isinstance(exc, DeviceError) and exc.transient)
            ):
                # The server may have acted on what it never answered: look again.
                self._cut_off = True
                self._responded.clear()
            raise

    def _advance_order(self) -> list[x509.Certificate]:
        client = self._client()
        if self._order_url is None:
            self._order_url = self._new_order(client)
            self._status = ("", 0.0)
        url = self._order_url
        stall = self.ctx.settings.acme_stall_seconds
        while True:
            order = client.get(url)
            status = order.body["status"]
            if status != self._status[0]:
                self._status = (status, time.monotonic())
            waited = time.monotonic() - self._status[1]
            if status == "valid":
                self._order_url = None
                self._unpublish()
                return client.certificate_chain(order.body["certificate"])
            if status == "invalid":
                self._order_url = None
                self._unpublish()
                raise DeviceError("acme:order-invalid", self._why_invalid(client, order.body))
            if status == "ready":
                self._finalize(client, order)
                continue
            if status == "pending":
                if waited > stall:
                    self._abandon(client, order.body)
                    raise DeviceError(
                        VALIDATION_STALLED, f"order pending for {stall:.0f}s", transient=True
                    )
                self._solve(client, order.body)
            if status == "processing" and waited > stall + PROCESSING_GRACE_SECONDS:
                # The server settles an order whose finalization died with a process (valid
                # with the certificate it issued, or ready again) within seconds; one that
                # stays processing longer is a server fault, counted as unexpected.
                self._order_url = None
                self._unpublish()
                raise DeviceError(
                    ORDER_STUCK, f"order {url} processing for {stall:.0f}s", transient=True
                )
            time.sleep(_retry_after(order.headers, ORDER_POLL_SECONDS))

    def _new_order(self, client: AcmeClient) -> str:
        try:
            order = client.new_order(self.names, replaces=self._replaces)
        except AcmeClientError as exc:
            # An earlier newOrder naming the same certificate was created, but its answer
            # was lost: this order replaces nothing the server still lets us name.
            if not (self._cut_off and exc.type == "alreadyReplaced"):
                raise
            order = client.new_order(self.names)
        if order.location is None:
            raise DeviceError("acme:no-order-url", "newOrder answered no Location")
        if self._certificate_key is None:
            self._certificate_key = ec.generate_private_key(ec.SECP256R1())
        return order.location

    def _solve(self, client: AcmeClient, order: dict[str, Any]) -> None:
        for url in order["authorizations"]:
            if url in self._responded:
                continue  # being validated: the order's status tells when it is done
            authz = client.get(url).body
            if authz["status"] != "pending":
                continue
            challenge = next(
                (c for c in authz["challenges"] if c["type"] == self.challenge_type), None
            )
            if challenge is None:
                raise DeviceError("acme:no-challenge", f"no {self.challenge_type} offered")
            if challenge["status"] != "pending":
                self._responded.add(url)
                continue
            key_authorization = jws.key_authorization(challenge["token"], client.thumbprint)
            name = str(authz["identifier"]["value"])
            if self.challenge_type == "http-01":
                assert self.ctx.http01 is not None
                self.ctx.http01.tokens[challenge["token"]] = key_authorization
                self._published.append(("http-01", challenge["token"]))
            else:
                assert self.ctx.dns is not None
                record = f"_acme-challenge.{name}"
                self.ctx.dns.set_txt(record, jws.dns01_txt_value(key_authorization))
                self._published.append(("dns-01", record))
            client.respond(challenge["url"])
            self._responded.add(url)

    def _finalize(self, client: AcmeClient, order: Any) -> None:
        key = self._certificate_key
        assert key is not None
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.names[0])]))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in self.names]),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        try:
            client.finalize(order, csr)
        except AcmeClientError as exc:
            # Finalized by a try whose answer was lost: the order moved on.
            if exc.type != "orderNotReady":
                raise

    def _abandon(self, client: AcmeClient, order: dict[str, Any]) -> None:
        """Deactivate the order's pending authorizations (RFC 8555 7.5.2) and forget it."""
        for url in order["authorizations"]:
            with contextlib.suppress(AcmeClientError):  # not pending any more
                client.post(url, {"status": "deactivated"})
        self._order_url = None
        self._unpublish()

    def _unpublish(self) -> None:
        self._responded.clear()
        for kind, value in self._published:
            if kind == "http-01" and self.ctx.http01 is not None:
                self.ctx.http01.tokens.pop(value, None)
            elif kind == "dns-01" and self.ctx.dns is not None:
                self.ctx.dns.clear_txt(value)
        self._published = []

    @staticmethod
    def _why_invalid(client: AcmeClient, order: dict[str, Any]) -> str:
        reasons = []
        for url in order.get("authorizations", []):
            for challenge in client.get(url).body.get("challenges", []):
                if challenge.get("error"):
                    reasons.append(str(challenge["error"].get("detail", ""))[:200])
        return "; ".join(reasons) or str(order.get("error", ""))[:300]

    # renewal information -------------------------------------------------------------------

    def _suggested_time(self, deadline: float, keep_choice: bool = False) -> float:
        """When to renew: a random moment in the window ARI suggests (simulated time)."""
        certificate = self.certificate
        assert certificate is not None
        start, end = attempt(
            self.recorder, ACME, "ari", lambda: self._renewal_window(certificate), deadline
        )
        chosen = self._chosen
        if not keep_choice or chosen is None or not start <= chosen <= end:
            chosen = start + (end - start) * self.rng.random()
            self._chosen = chosen
        return self.ctx.clock.monotonic_at(chosen)

    def _renewal_window(self, certificate: x509.Certificate) -> tuple[datetime, datetime]:
        response = self._client().renewal_info(ari_cert_id(certificate))
        check_http(response, "renewalInfo")
        try:
            window = response.json()["suggestedWindow"]
            start = datetime.fromisoformat(window["start"].replace("Z", "+00:00"))
            end = datetime.fromisoformat(window["end"].replace("Z", "+00:00"))
        except (ValueError, KeyError, TypeError) as exc:
            raise DeviceError("acme:ari-malformed", str(exc)) from exc
        if end < start:
            raise DeviceError("acme:ari-malformed", "the window ends before it starts")
        return start, end


def ari_cert_id(certificate: x509.Certificate) -> str:
    """The RFC 9773 certificate identifier: base64url(AKI keyIdentifier) "."
    base64url(the serial's DER INTEGER content octets)."""
    aki = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    if aki.key_identifier is None:
        raise DeviceError("acme:no-aki", "the certificate's AKI has no keyIdentifier")
    serial = certificate.serial_number
    octets = serial.to_bytes(serial.bit_length() // 8 + 1, "big")

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    return f"{b64(aki.key_identifier)}.{b64(octets)}"


PROCESSING_GRACE_SECONDS = 30.0
"""Beyond the stall limit: the server settles an interrupted finalization after 15 s."""


def _retry_after(headers: Any, default: float) -> float:
    try:
        value = float(headers.get("Retry-After", default))
    except (TypeError, ValueError):
        return default
    return min(max(value, 0.05), 1.0)


def _chain(
    received: Sequence[x509.Certificate], known: Sequence[x509.Certificate]
) -> list[x509.Certificate]:
    """The leaf first, then the other certificates received and those GetCACert gave."""
    chain = list(received)
    for certificate in known:
        if certificate not in chain:
            chain.append(certificate)
    return chain


# -- machines (AD-style) -----------------------------------------------------------------------


class Machine(Device):
    """A domain-joined machine: joins the domain (its computer account is created in the
    directory), asks the CA's policy (MS-XCEP) what it may autoenroll in and enrolls
    (MS-WSTEP), then renews with the certificate it holds (TLS client authentication)."""

    kind = "machine"

    def __init__(self, name: str, ctx: FleetContext, rng: random.Random, rid: int) -> None:
        super().__init__(name, ctx, rng)
        self.rid = rid
        self.renewals_left = ctx.settings.renewals
        self.account: MachineAccount | None = None
        self.certificate: x509.Certificate | None = None
        self.key: rsa.RSAPrivateKey | None = None
        self._client: AdcsClient | None = None
        self._next: Callable[[], float | None] = self._join

    @classmethod
    def create(cls, ctx: FleetContext, index: int, rng: random.Random) -> Machine:
        # Relative ids unique to the run: runs share the directory of a long-lived target.
        rid = 1_000_000 + (int(ctx.run_id, 16) % 4000) * 100_000 + index
        return cls(f"M{ctx.run_id}{index:05d}".upper(), ctx, rng, rid)

    def step(self) -> float | None:
        return self._next()

    def _adcs(self) -> AdcsClient:
        target = self.ctx.target
        assert self.account is not None and target.adcs_mount is not None
        if self._client is None:
            self._client = AdcsClient(
                target.https_url + target.adcs_mount,
                str(target.tls_bundle),
                self.account.name,
                self.account.password,
            )
        return self._client

    def _join(self) -> float | None:
        directory = self.ctx.target.directory
        if directory is None:
            raise DeviceFailed("join", "adcs:no-directory", "machines need the directory")
        deadline = self.ctx.deadline()
        self.account = attempt(
            self.recorder,
            ADCS,
            "join",
            lambda: provision_machine(directory, self.name, self.rid),
            deadline,
        )
        self._next = self._autoenroll
        return time.monotonic()

    def _autoenroll(self) -> float | None:
        deadline = self.ctx.deadline()
        key = new_key()
        template = self.ctx.target.machine_template

        def enroll() -> Enrolled:
            offered = [t.common_name for t in self._adcs().policies() if t.permission_autoenroll]
            if template not in offered:
                raise DeviceError("adcs:not-offered", f"{template} not in {offered}")
            return self._adcs().enroll(template, _machine_csr(key, self.name))

        enrolled = attempt(self.recorder, ADCS, "autoenroll", _adcs_errors(enroll), deadline)
        return self._issued(enrolled, key, deadline)

    def _renew(self) -> float | None:
        deadline = self.ctx.deadline()
        assert self.certificate is not None and self.key is not None
        current, current_key = self.certificate, self.key
        key = new_key()
        template = self.ctx.target.machine_template
        enrolled = attempt(
            self.recorder,
            ADCS,
            "renew",
            _adcs_errors(
                lambda: self._adcs().renew(
                    template, _machine_csr(key, self.name), current, current_key
                )
            ),
            deadline,
        )
        self.renewals_left -= 1
        return self._issued(enrolled, key, deadline)

    def _issued(self, enrolled: Enrolled, key: rsa.RSAPrivateKey, deadline: float) -> float | None:
        assert self.account is not None
        leaf = enrolled.certificate
        chain = [leaf, *(c for c in enrolled.chain if c != leaf and c.issuer != c.subject)]
        self.received(leaf, ADCS)
        self.ctx.checker.check_issued(
            chain,
            Expectation(
                key.public_key(),
                frozenset({"digital_signature"}),
                self.ctx.target.machine_eku,
                subject_common_name=self.account.dns_host_name,
                max_lifetime=self.ctx.target.max_lifetime,
            ),
            self.recorder,
            deadline,
        )
        # The directory's names and the account's SID, never the request's.
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        if sans.get_values_for_type(x509.DNSName) != [self.account.dns_host_name]:
            raise DeviceFailed("verify", "adcs:wrong-names", f"SAN {sans}")
        if sid_from_certificate(leaf) != self.account.sid:
            raise DeviceFailed("verify", "adcs:wrong-sid", "the SID extension is not ours")
        self.verified(leaf)
        self.certificate, self.key = leaf, key
        if self.renewals_left <= 0:
            if self._client is not None:
                self._client.close()
            return None
        self._next = self._renew
        share = self.rng.uniform(*PHONE_RENEWAL_WINDOW)
        lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        return self.ctx.clock.monotonic_at(leaf.not_valid_before_utc + lifetime * share)


def _machine_csr(key: rsa.RSAPrivateKey, name: str) -> x509.CertificateSigningRequest:
    # Windows puts the machine's name in the request; the CA takes the names from the
    # directory anyway.
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )


def _adcs_errors(call: Callable[[], Enrolled]) -> Callable[[], Enrolled]:
    """AD-style refusals as device errors (a fault is never retried: it is an answer)."""

    def run() -> Enrolled:
        try:
            return call()
        except AdcsClientError as exc:
            transient = exc.kind.startswith("http5")
            raise DeviceError(f"adcs:{exc.kind}", exc.message[:300], transient=transient) from None

    return run


DEVICE_KINDS: dict[str, DeviceFactory] = {
    Phone.kind: Phone.create,
    Server.kind: Server.create,
    Machine.kind: Machine.create,
}
"""Device kinds by the name FleetSettings.counts() uses."""
