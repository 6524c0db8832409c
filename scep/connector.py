"""The SCEP connector (RFC 8894): settings, HTTP routes, and the PKIOperation flow.

Wire format lives in :mod:`pkigate.scep.messages`, challenges and renewal checks in
:mod:`pkigate.scep.authorization`, the RA certificate in :mod:`pkigate.scep.ra`. This module
turns HTTP requests into those calls and their outcomes into HTTP answers: a CertRep
whenever a reply can be addressed, HTTP 400 when it cannot, never a 500 for bad input.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import logging
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flask import Blueprint, Response, jsonify, request
from sqlalchemy import Connection

from pkigate.core import Actor, IssuedCertificate, Requester
from pkigate.core.access import Action
from pkigate.core.errors import (
    BadCSRError,
    BadRequestError,
    NotFoundError,
    PkigateError,
    PolicyViolationError,
    StoreUnavailableError,
    UnsupportedAlgorithmError,
    WeakKeyError,
)
from pkigate.core.names import parse_dn
from pkigate.core.passthrough import parse_general_name
from pkigate.core.store import IntegrityError
from pkigate.core.store import scep as scep_store
from pkigate.gateways.connectors import (
    Connector,
    ConnectorContext,
    ConnectorSettingsError,
    OfflineCore,
    unknown_setting,
)
from pkigate.gateways.http import actor, authorize_on_ca, json_body, requires
from pkigate.gateways.roles import Permission
from pkigate.scep.authorization import (
    AnsweredMeanwhile,
    Authorization,
    ChallengeAuthority,
    ChallengePolicy,
    challenge_password,
    shared_static_challenge,
)
from pkigate.scep.cms import DigestAlgorithm, NoMatchingRecipient, build_signed_data
from pkigate.scep.messages import (
    SCEP_MAX_MESSAGE_BYTES,
    ContentCipher,
    FailInfo,
    MessageType,
    PkiMessage,
    PkiStatus,
    ReplyTo,
    ScepError,
    UnreadableMessage,
    build_cert_rep,
    degenerate_certs_only,
    parse_pki_message,
)
from pkigate.scep.pending import ISSUED, REJECTED, ApprovalQueue
from pkigate.scep.profile import ScepProfile, build_profile
from pkigate.scep.ra import RegistrationAuthority, Signer
from pkigate.scep.webhook import (
    NOTIFY_JOB,
    NOTIFY_MAX_ATTEMPTS,
    Webhook,
    WebhookUnavailable,
    check_url,
)

log = logging.getLogger("pkigate.scep")

PKI_MESSAGE_TYPE = "application/x-pki-message"
CA_CERT_TYPE = "application/x-x509-ca-cert"
CA_RA_CERT_TYPE = "application/x-x509-ca-ra-cert"
NEXT_CA_CERT_TYPE = "application/x-x509-next-ca-cert"
# Bodies that clients label a pkiMessage with: RFC 8894 4.3 says x-pki-message; micromdm's
# scepclient and some network gear send octet-stream, others nothing at all.
ACCEPTED_POST_TYPES = frozenset(
    {PKI_MESSAGE_TYPE, "application/octet-stream", "application/pkcs7-mime", ""}
)
STATIC_CHALLENGE_FILE = "scep-{name}-challenge"
"""Where earlier versions generated the static challenge, per data directory."""
WEBHOOK_CHALLENGE = "webhook"


@dataclass(frozen=True)
class ScepSettings:
    """One SCEP connector instance's settings (the ``[connectors.settings]`` table)."""

    challenge: str | None
    """The configured static challenge (None when generated, or switched off)."""
    generated_challenge: bool
    """The static challenge is generated, and kept in the store (shared by every host)."""
    dynamic_challenges: bool
    """Accept one-time challenges issued through the management API."""
    dynamic_challenge_ttl: timedelta
    """Default lifetime of a one-time challenge."""
    legacy_des3: bool
    """Advertise DES3 (old network gear); DES-EDE3 is decrypted either way."""
    accept_single_des: bool
    """Accept requests encrypted with single DES (micromdm's scepclient sends nothing else);
    replies to them use DES-EDE3."""
    ca_decrypts: bool
    """With an RSA CA: GetCACert answers the CA alone, which decrypts and signs."""
    renewal: bool
    """Accept RenewalReq (and PKCSReq) signed by a certificate this CA issued."""
    max_failures: int
    """Failed challenges allowed per client address and per transactionID in a window."""
    failure_window: timedelta
    max_static_challenge_failures: int = 50
    """Failed challenges allowed in a window against the static challenge, all client
    addresses together."""
    pending: bool = False
    """Hold authorized PKCSReqs for an administrator's approval (CertRep PENDING)."""
    next_ca: str | None = None
    """The configuration name of the successor CA during a rollover (GetNextCACert)."""
    webhook: Webhook | None = None
    """With ``challenge = "webhook"``: challenges are validated by this webhook."""

    @classmethod
    def parse(cls, settings: Mapping[str, Any], context: ConnectorContext) -> ScepSettings:
        known = {
            "challenge",
            "static_challenge",
            "dynamic_challenges",
            "dynamic_challenge_ttl_seconds",
            "legacy_des3",
            "accept_single_des",
            "ca_decrypts",
            "renewal",
            "max_failures",
            "max_static_challenge_failures",
            "failure_window_seconds",
            "pending",
            "next_ca",
            "webhook_url",
            "webhook_notify_url",
            "webhook_secret",
            "webhook_timeout_seconds",
        }
        for key in settings:
            if key not in known:
                raise unknown_setting(key, known)

        def flag(key: str, default: bool) -> bool:
            value = settings.get(key, default)
            if not isinstance(value, bool):
                raise ConnectorSettingsError(key, "must be true or false")
            return value

        def positive(key: str, default: int) -> int:
            value = settings.get(key, default)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConnectorSettingsError(key, "must be a positive integer")
            return value

        next_ca = settings.get("next_ca")
        if next_ca is not None:
            if not isinstance(next_ca, str) or next_ca not in context.ca_ids:
                raise ConnectorSettingsError(
                    "next_ca",
                    f"must name a configured CA; configured: {', '.join(sorted(context.ca_ids))}",
                )
            if context.ca_ids[next_ca] == context.ca_id:
                raise ConnectorSettingsError(
                    "next_ca", "names the connector's own CA, not a successor"
                )
        challenge = settings.get("challenge")
        webhook = _parse_webhook(settings, challenge == WEBHOOK_CHALLENGE)
        if webhook is not None:
            # The webhook decides alone: no static or one-time challenges, no approval queue.
            for key in ("static_challenge", "dynamic_challenges", "pending"):
                if flag(key, False):
                    raise ConnectorSettingsError(
                        key, 'cannot be combined with challenge = "webhook"'
                    )
            challenge = None
        elif challenge is not None and (not isinstance(challenge, str) or len(challenge) < 8):
            raise ConnectorSettingsError("challenge", "must be a string of at least 8 characters")
        static = webhook is None and flag("static_challenge", True)
        return cls(
            challenge=challenge if static else None,
            generated_challenge=static and challenge is None,
            dynamic_challenges=webhook is None and flag("dynamic_challenges", True),
            dynamic_challenge_ttl=timedelta(
                seconds=positive("dynamic_challenge_ttl_seconds", 3600)
            ),
            legacy_des3=flag("legacy_des3", False),
            accept_single_des=flag("accept_single_des", True),
            ca_decrypts=flag("ca_decrypts", False),
            renewal=flag("renewal", True),
            max_failures=positive("max_failures", 5),
            failure_window=timedelta(seconds=positive("failure_window_seconds", 600)),
            max_static_challenge_failures=positive("max_static_challenge_failures", 50),
            pending=webhook is None and flag("pending", False),
            next_ca=next_ca,
            webhook=webhook,
        )


def _parse_webhook(settings: Mapping[str, Any], enabled: bool) -> Webhook | None:
    """The webhook settings; None unless ``challenge = "webhook"``."""
    keys = ("webhook_url", "webhook_notify_url", "webhook_secret", "webhook_timeout_seconds")
    if not enabled:
        for key in keys:
            if key in settings:
                raise ConnectorSettingsError(key, 'only with challenge = "webhook"')
        return None
    urls: dict[str, str] = {}
    for key in ("webhook_url", "webhook_notify_url"):
        value = settings.get(key)
        if value is None:
            continue
        problem = "must be a string" if not isinstance(value, str) else check_url(value)
        if problem is not None:
            raise ConnectorSettingsError(key, problem)
        urls[key] = value
    if "webhook_url" not in urls:
        raise ConnectorSettingsError("webhook_url", 'is required with challenge = "webhook"')
    secret = settings.get("webhook_secret")
    if secret is not None and (not isinstance(secret, str) or not secret):
        raise ConnectorSettingsError("webhook_secret", "must be a non-empty string")
    timeout = settings.get("webhook_timeout_seconds", 5)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 60:
        raise ConnectorSettingsError(
            "webhook_timeout_seconds", "must be a number of seconds, more than 0 and at most 60"
        )
    url = urls["webhook_url"]
    return Webhook(
        url=url,
        notify_url=urls.get("webhook_notify_url", url.rstrip("/") + "/notify"),
        secret=secret,
        timeout_seconds=float(timeout),
    )


def _check_decrypting_keys(
    options: ScepSettings, context: ConnectorContext, key_algorithm: Callable[[str], str]
) -> None:
    """With ``ca_decrypts`` clients encrypt to the CA itself (and to the successor CA during
    a rollover): SCEP's envelope needs RSA keys there."""
    if not options.ca_decrypts:
        return
    if not key_algorithm(context.ca_id).startswith("RSA"):
        raise ConnectorSettingsError(
            "ca_decrypts", f"the CA's key is {key_algorithm(context.ca_id)}; SCEP needs RSA"
        )
    if options.next_ca is not None:
        successor = key_algorithm(context.ca_ids[options.next_ca])
        if not successor.startswith("RSA"):
            raise ConnectorSettingsError(
                "next_ca", f"with ca_decrypts the successor CA needs an RSA key, not {successor}"
            )


class ScepConnector(Connector):
    """SCEP for MDM-enrolled phones, laptops and network gear."""

    type_name = "scep"
    listener = "http"
    default_template = "EndEntityClientAuthCertificate/V1"
    default_validity = "365d"

    def __init__(self, context: ConnectorContext, settings: Mapping[str, Any]) -> None:
        super().__init__(context, settings)
        self.options = ScepSettings.parse(settings, context)
        _check_decrypting_keys(
            self.options, context, lambda ca_id: context.core.authorities.get(ca_id).key_algorithm
        )
        static = self.options.challenge
        if self.options.generated_challenge:
            # Where earlier versions kept it, in each data directory: imported once.
            legacy = context.core.data_dir / STATIC_CHALLENGE_FILE.format(
                name=context.name.replace("/", "_")
            )
            static = shared_static_challenge(context.core, context.name, legacy)
        self.authority = ChallengeAuthority(
            context.core,
            context.name,
            context.ca_id,
            ChallengePolicy(
                static_secret=static,
                dynamic=self.options.dynamic_challenges,
                max_failures=self.options.max_failures,
                failure_window=self.options.failure_window,
                max_static_failures=self.options.max_static_challenge_failures,
            ),
        )
        self.ra = RegistrationAuthority(context, ca_decrypts=self.options.ca_decrypts)
        # During a rollover, the successor CA gets an RA of its own (issued from it, kept in
        # the store under the successor's id), answered by GetNextCACert.
        self.next_ra: RegistrationAuthority | None = None
        if self.options.next_ca is not None:
            next_context = replace(context, ca_id=context.ca_ids[self.options.next_ca])
            self.next_ra = RegistrationAuthority(next_context, ca_decrypts=self.options.ca_decrypts)
        self.approvals = ApprovalQueue(context)

    # -- contract ------------------------------------------------------------------------

    @classmethod
    def check_settings(
        cls, settings: Mapping[str, Any], context: ConnectorContext, offline: OfflineCore
    ) -> None:
        options = ScepSettings.parse(settings, context)
        _check_decrypting_keys(options, context, lambda ca: offline.key_algorithms[ca])

    def startup_notes(self) -> list[str]:
        if self.options.webhook is not None:
            return [f"challenges validated by the webhook {self.options.webhook.url}"]
        if self.options.generated_challenge:
            return [
                "generated static challenge kept in the store: `pkigate scep static-challenge "
                f"--connector {self.context.name}` prints it"
            ]
        if self.options.challenge is not None:
            return ["static challenge from the configuration"]
        return ["no static challenge: one-time challenges from the management API only"]

    def capabilities(self) -> list[str]:
        caps = ["POSTPKIOperation", "SHA-256", "SHA-512", "AES"]
        if self.options.renewal:
            caps.append("Renewal")
        if self.options.next_ca is not None:
            caps.append("GetNextCACert")
        caps.append("SCEPStandard")
        if self.options.legacy_des3:
            caps.append("DES3")
        return caps

    def blueprint(self) -> Blueprint:
        bp = Blueprint(f"scep_{self.context.name}", __name__)
        # Cisco and other network gear append the historical CGI path to the server URL.
        for index, path in enumerate(("/", "/pkiclient.exe", "/cgi-bin/pkiclient.exe")):
            bp.add_url_rule(path, f"scep_{index}", self._serve, methods=["GET", "POST"])
        return bp

    def admin_blueprint(self) -> Blueprint:
        bp = Blueprint(f"scep_admin_{self.context.name}", __name__)

        @bp.post("/challenges")
        @requires(Permission.ENROLL)
        def create_challenge() -> tuple[Response, int]:
            body = json_body({"subject": str, "device_id": str, "ttl_seconds": int, "sans": list})
            if not self.options.dynamic_challenges:
                raise BadRequestError("this connector does not accept one-time challenges")
            ttl = self.options.dynamic_challenge_ttl
            if body.get("ttl_seconds") is not None:
                seconds = body["ttl_seconds"]
                if isinstance(seconds, bool) or not 60 <= seconds <= 30 * 86400:
                    raise BadRequestError("ttl_seconds must be between 60 and 2592000")
                ttl = timedelta(seconds=seconds)
            device_id = body.get("device_id")
            if device_id is not None and not 0 < len(device_id) <= 256:
                raise BadRequestError("device_id must be 1 to 256 characters")
            sans = None
            if body.get("sans") is not None:
                # The management API's names: [{"dns": "..."}, {"upn": "..."}, ...].
                sans = [parse_general_name(n, f"sans[{i}]") for i, n in enumerate(body["sans"])]
            issued = self.authority.create_challenge(
                actor(), ttl=ttl, subject=body.get("subject"), device_id=device_id, sans=sans
            )
            return jsonify(
                {
                    "id": issued.id,
                    "challenge": issued.secret,
                    "expires_at": issued.expires_at.isoformat().replace("+00:00", "Z"),
                    "subject": issued.subject,
                    "device_id": issued.device_id,
                    "sans": list(issued.sans) if issued.sans is not None else None,
                    "url": self.context.url,
                }
            ), 201

        # Transaction ids may hold '/' and '+' (micromdm's scepclient sends the base64 SHA-1
        # of the key), so they are read as a path (percent-encoded or not).
        @bp.get("/pending")
        @requires(Permission.APPROVE)
        def list_pending() -> Response:
            authorize_on_ca(self.context.ca_id, Action.READ, self.context.name)
            return jsonify([p.to_json() for p in self.approvals.pending()])

        @bp.post("/pending/<anytext:transaction_id>/approve", merge_slashes=False)
        @requires(Permission.APPROVE)
        def approve_pending(transaction_id: str) -> Response:
            self.authorize_decision(transaction_id)
            issued = self.approvals.approve(transaction_id, actor())
            return jsonify(
                {
                    "transaction_id": transaction_id,
                    "status": ISSUED,
                    "ca_id": self.context.ca_id,
                    "serial": issued.serial,
                    "certificate": issued.certificate.public_bytes(
                        serialization.Encoding.PEM
                    ).decode(),
                }
            )

        @bp.post("/pending/<anytext:transaction_id>/reject", merge_slashes=False)
        @requires(Permission.APPROVE)
        def reject_pending(transaction_id: str) -> Response:
            body = json_body({"reason": str}, required=("reason",))
            self.authorize_decision(transaction_id)
            rejected = self.approvals.reject(transaction_id, actor(), body["reason"])
            return jsonify({**rejected.to_json(), "status": REJECTED})

        return bp

    def authorize_decision(self, transaction_id: str) -> None:
        """Whether this request's token may approve or reject the held request, decided on
        its template and names (the API's and the console's path): 403 with the reason."""
        held = self.approvals.held_facts(transaction_id)
        authorize_on_ca(self.context.ca_id, Action.APPROVE_PENDING, self.context.name, held)

    def profile(self, actor: Actor, subject: str, one_time: bool, identifier: str) -> bytes:
        """An Apple configuration profile (com.apple.security.scep) for devices named
        ``subject``: with a fresh one-time challenge bound to that subject, or the
        connector's static challenge. For the CLI and the console."""
        if one_time:
            if not self.options.dynamic_challenges:
                raise BadRequestError("this connector does not accept one-time challenges")
            challenge: str | None = self.authority.create_challenge(
                actor, ttl=self.options.dynamic_challenge_ttl, subject=subject
            ).secret
        else:
            challenge = self.authority.policy.static_secret
            if challenge is None:
                raise BadRequestError("this connector has no static challenge; use --one-time")
        certificate_pem, _chain = self.context.core.authorities.certificate_pem(self.context.ca_id)
        return build_profile(
            ScepProfile(
                url=self.context.url,
                name=self.context.name,
                subject=parse_dn(subject),
                challenge=challenge,
                ca_certificate=x509.load_pem_x509_certificate(certificate_pem.encode()),
                identifier=identifier,
            )
        )

    # -- HTTP ----------------------------------------------------------------------------

    def _serve(self) -> Response:
        operation = request.args.get("operation", "")
        try:
            if operation == "GetCACaps":
                return Response("\n".join(self.capabilities()), content_type="text/plain")
            if operation == "GetCACert":
                return self._get_ca_cert()
            if operation == "GetNextCACert":
                return self._get_next_ca_cert()
            if operation == "PKIOperation":
                return self._pki_operation()
        except PkigateError as exc:
            log.warning("SCEP request failed", extra={"error": exc.code, "reason": exc.message})
            return _plain_error(503, f"the CA cannot answer now: {exc.message}")
        return _plain_error(400, f"unknown operation {operation[:64]!r}")

    def _get_ca_cert(self) -> Response:
        signer = self.ra.signer()
        der = serialization.Encoding.DER
        if signer.is_ca:
            # Without an RA, a single certificate: Apple clients given a certs-only reply look
            # for an RA by keyUsage (keyEncipherment) and fail when no certificate has it.
            return Response(signer.certificate.public_bytes(der), content_type=CA_CERT_TYPE)
        # RFC 8894 4.2.1.2: the RA certificate and the CA chain; Apple clients pick the RA by
        # keyUsage (keyEncipherment, digitalSignature) and the CA by basicConstraints.
        body = degenerate_certs_only([signer.certificate, *signer.ca_chain])
        return Response(body, content_type=CA_RA_CERT_TYPE)

    def _get_next_ca_cert(self) -> Response:
        """RFC 8894 4.7.1 (3.5.2): a SignedData signed by the current CA or RA whose content
        is a degenerate certs-only SignedData with the successor's certificates (its RA
        first, then the successor CA and its chain; with ``ca_decrypts``, the successor's chain
        alone)."""
        if self.next_ra is None:
            return _plain_error(
                404, "no CA rollover in progress: this connector has no next_ca configured"
            )
        successor = self.next_ra.signer()
        certificates = (
            list(successor.ca_chain)
            if successor.is_ca
            else [successor.certificate, *successor.ca_chain]
        )
        current = self.ra.signer()
        body = build_signed_data(
            degenerate_certs_only(certificates),
            current.certificate,
            current.key,
            DigestAlgorithm.SHA256,
            certificates=[current.certificate],
            signing_time=self.context.core.clock(),
        )
        return Response(body, content_type=NEXT_CA_CERT_TYPE)

    def _pki_operation(self) -> Response:
        if request.method == "POST":
            content_type = (request.mimetype or "").lower()
            if content_type not in ACCEPTED_POST_TYPES:
                return _plain_error(415, f"send {PKI_MESSAGE_TYPE}, not {content_type}")
            length = request.content_length
            if length is not None and length > SCEP_MAX_MESSAGE_BYTES:
                return _plain_error(413, f"a pkiMessage is at most {SCEP_MAX_MESSAGE_BYTES} bytes")
            data = request.stream.read(SCEP_MAX_MESSAGE_BYTES + 1)
        else:
            try:
                data = decode_get_message(request.query_string)
            except ValueError as exc:
                return _plain_error(400, str(exc))
        if len(data) > SCEP_MAX_MESSAGE_BYTES:
            return _plain_error(413, f"a pkiMessage is at most {SCEP_MAX_MESSAGE_BYTES} bytes")
        signer = self.ra.signer()
        address = request.remote_addr or "unknown"
        try:
            try:
                message = parse_pki_message(data, signer.recipients)
            except ScepError as exc:
                if not isinstance(exc.__cause__, NoMatchingRecipient):
                    raise
                # Another gateway process may have issued an RA certificate since this one
                # loaded its own (both happen at first use): look again before refusing.
                refreshed = self.ra.signer(reload=True)
                if refreshed.recipients == signer.recipients:
                    raise
                signer = refreshed
                message = parse_pki_message(data, signer.recipients)
            signer = signer.answering(message.recipient_certificate)
        except UnreadableMessage as exc:
            self._audit_unreadable(address, exc.message)
            return _plain_error(400, f"not a SCEP pkiMessage: {exc.message}")
        except ScepError as exc:
            assert exc.reply_to is not None
            # On a full store the refusal cannot be recorded; it is answered all the same.
            with contextlib.suppress(StoreUnavailableError):
                self.authority.refuse(exc.reply_to.transaction_id, address, str(exc))
            return self._failure(signer, exc.reply_to, exc)
        try:
            return self._handle(signer, message, address)
        except ScepError as exc:
            return self._failure(signer, exc.reply_to or message.reply_to, exc)
        except StoreUnavailableError as exc:
            # A write the request needed (a challenge spent, a refusal recorded) found the
            # store full: still a CertRep (RFC 8894 3.3.2), so the client retries later.
            reply_to = message.reply_to
            return self._failure(
                signer, reply_to, ScepError(_fail_info_for(exc), exc.message, reply_to)
            )

    def _audit_unreadable(self, address: str, reason: str) -> None:
        core = self.context.core
        core.audit.record_alone(
            Actor(f"scep-client:{address}", self.context.name),
            "scep.message",
            f"connector/{self.context.name}",
            result="failure",
            parameters={"reason": reason[:500]},
            at=core.clock(),
        )

    # -- operations ----------------------------------------------------------------------

    def _handle(self, signer: Signer, message: PkiMessage, address: str) -> Response:
        kind = message.message_type
        if (
            message.content_encryption_algorithm is ContentCipher.DES
            and not self.options.accept_single_des
        ):
            reason = "single DES is not accepted here; use AES"
            self.authority.refuse(message.transaction_id, address, reason)
            raise ScepError(FailInfo.BAD_ALG, reason, message.reply_to)
        if kind in (MessageType.PKCS_REQ, MessageType.RENEWAL_REQ):
            return self._enroll(signer, message, address)
        if kind == MessageType.CERT_POLL:
            return self._poll(signer, message)
        if kind == MessageType.GET_CERT:
            return self._get_cert(signer, message)
        if kind == MessageType.GET_CRL:
            return self._get_crl(signer, message)
        raise ScepError(FailInfo.BAD_REQUEST, f"{kind.name} is not supported", message.reply_to)

    def _enroll(self, signer: Signer, message: PkiMessage, address: str) -> Response:
        reply_to = message.reply_to
        csr = message.csr()
        transaction_id = message.transaction_id
        csr_hash = hashlib.sha256(message.payload).hexdigest()
        with self.context.core.store.read() as conn:
            previous = scep_store.get_transaction(conn, self.context.name, transaction_id)
        signed_by = format(message.signer_certificate.serial_number, "x")
        # micromdm's scepclient derives the transactionID from the key, so a renewal signed
        # by the certificate this transaction produced is a new request, not a replay.
        renews_previous = (
            previous is not None
            and previous.serial == signed_by
            and message.signer_certificate.issuer != message.signer_certificate.subject
        )
        if previous is not None and not renews_previous:
            if previous.csr_sha256 != csr_hash:
                reason = "the transactionID was already used for another request"
                self.authority.refuse(transaction_id, address, reason)
                raise ScepError(FailInfo.BAD_REQUEST, reason, reply_to)
            # A client retrying a transaction that succeeded (its reply was lost) gets the
            # same certificate again, not a second one; one still waiting, its status.
            return self._transaction_reply(signer, reply_to, previous)

        def answered_meanwhile() -> bool:
            with self.context.core.store.read() as conn:
                now = scep_store.get_transaction(conn, self.context.name, transaction_id)
            return now is not None and now != previous and now.csr_sha256 == csr_hash

        try:
            authorization = self._authorize(message, csr, address, answered_meanwhile)
        except AnsweredMeanwhile:
            return self._replay(signer, reply_to, transaction_id, csr_hash, address)
        if self.options.pending and authorization.kind != "renewal":
            try:
                self.approvals.hold(
                    transaction_id=transaction_id,
                    csr_sha256=csr_hash,
                    csr_der=message.payload,
                    subject=csr.subject.rfc4514_string(),
                    evidence={**authorization.evidence, "client_address": address},
                    client=Actor(f"scep-client:{address}", self.context.name),
                    also=lambda conn: self.authority.consume(conn, authorization),
                )
            except (PkigateError, IntegrityError) as exc:
                # A copy of this request held first (it spent the challenge, or recorded
                # the transaction): its answer is this one's.
                if answered_meanwhile():
                    return self._replay(signer, reply_to, transaction_id, csr_hash, address)
                if not isinstance(exc, PkigateError):
                    raise
                self.authority.refuse(transaction_id, address, exc.message)
                raise ScepError(_fail_info_for(exc), exc.message, reply_to) from exc
            log.info(
                "SCEP request pending approval",
                extra={"connector": self.context.name, "transaction": transaction_id},
            )
            return self._pending(signer, reply_to)

        def record(conn: Connection, issued: IssuedCertificate) -> None:
            # In the core's transaction: the one-time challenge is spent, the certificate
            # stored and this transaction recorded together, or none of them (a process
            # killed half-way leaves nothing that would refuse the client's retry).
            if scep_store.get_transaction(conn, self.context.name, transaction_id) != previous:
                raise AnsweredMeanwhile
            self.authority.consume(conn, authorization)
            scep_store.record_transaction(
                conn,
                connector=self.context.name,
                transaction_id=transaction_id,
                csr_sha256=csr_hash,
                csr_der=message.payload,
                evidence=json.dumps(authorization.evidence, sort_keys=True),
                subject=csr.subject.rfc4514_string(),
                status=ISSUED,
                ca_id=self.context.ca_id,
                serial=issued.serial,
                now=self.context.core.clock(),
            )
            if authorization.kind == WEBHOOK_CHALLENGE:
                self._notify_success(transaction_id, issued.certificate, conn)

        try:
            issued = self.context.issue(
                csr,
                Requester(
                    f"scep-client:{address}",
                    self.context.name,
                    evidence=authorization.evidence,
                ),
                correlation_id=transaction_id,
                record_with=record,
            )
        except (AnsweredMeanwhile, IntegrityError):
            # A retry of this very transaction, running at the same time, was recorded
            # first (its certificate stands; this one was discarded): answer as it was.
            return self._replay(signer, reply_to, transaction_id, csr_hash, address)
        except PkigateError as exc:
            if authorization.kind == WEBHOOK_CHALLENGE:
                self._notify_failure(transaction_id, exc.message)
            raise ScepError(_fail_info_for(exc), exc.message, reply_to) from exc
        log.info(
            "SCEP certificate issued",
            extra={
                "connector": self.context.name,
                "transaction": transaction_id,
                "serial": issued.serial,
                "authorization": authorization.kind,
                "cipher": message.content_encryption_algorithm.value,
            },
        )
        return self._success(signer, reply_to, [issued.certificate, *issued.chain[:-1]])

    def _replay(
        self, signer: Signer, reply_to: ReplyTo, transaction_id: str, csr_hash: str, address: str
    ) -> Response:
        """The answer a concurrent copy of this request got, which was recorded first."""
        with self.context.core.store.read() as conn:
            answered = scep_store.get_transaction(conn, self.context.name, transaction_id)
        if answered is None or answered.csr_sha256 != csr_hash:
            reason = "the transactionID was already used for another request"
            self.authority.refuse(transaction_id, address, reason)
            raise ScepError(FailInfo.BAD_REQUEST, reason, reply_to) from None
        return self._transaction_reply(signer, reply_to, answered)

    def _authorize(
        self,
        message: PkiMessage,
        csr: x509.CertificateSigningRequest,
        address: str,
        answered_meanwhile: Callable[[], bool],
    ) -> Authorization:
        reply_to = message.reply_to
        transaction_id = message.transaction_id
        signer_cert = message.signer_certificate
        self_signed = signer_cert.issuer == signer_cert.subject
        same_key = _same_key(signer_cert, csr)
        renewing = message.message_type == MessageType.RENEWAL_REQ or (
            not self_signed and not same_key
        )
        if renewing:
            # RFC 8894 3.3.1.2: a RenewalReq is signed with the certificate being renewed
            # (sscep and Apple send a PKCSReq signed that way); no challenge is needed.
            reason = (
                "renewal is not enabled on this connector"
                if not self.options.renewal
                else self.authority.renewal_signer(signer_cert)
            )
            if reason is None and signer_cert.subject != csr.subject:
                reason = "a renewal must keep the subject of the certificate it renews"
            if reason is None and not _alt_names(csr) <= _alt_names(signer_cert):
                # The names are what the first enrollment proved; a renewal keeps them.
                reason = "a renewal may not add alternative names to the certificate it renews"
            if reason is not None:
                self.authority.refuse(transaction_id, address, reason)
                raise ScepError(FailInfo.BAD_REQUEST, reason, reply_to)
            return Authorization(
                "renewal",
                {
                    "transaction_id": transaction_id,
                    "challenge": "renewal",
                    "renewed_serial": format(signer_cert.serial_number, "x"),
                },
            )
        if not same_key:
            # RFC 8894 3.3.1: the self-signed certificate of a PKCSReq carries the CSR's key.
            reason = "the message is signed with a key other than the request's"
            self.authority.refuse(transaction_id, address, reason)
            raise ScepError(FailInfo.BAD_MESSAGE_CHECK, reason, reply_to)
        if self.options.webhook is not None:
            return self._authorize_by_webhook(self.options.webhook, message, csr, address)
        return self.authority.authorize_enrollment(
            csr,
            transaction_id=transaction_id,
            client_address=address,
            reply_to=reply_to,
            answered_meanwhile=answered_meanwhile,
        )

    def _authorize_by_webhook(
        self,
        webhook: Webhook,
        message: PkiMessage,
        csr: x509.CertificateSigningRequest,
        address: str,
    ) -> Authorization:
        """Ask the validation webhook; a deny counts against the client's failed-challenge
        limit, an unavailable webhook refuses the client without counting (not its fault).
        Both are audited, and the webhook is notified of the failure. The attempt is counted
        before the webhook is asked (and taken back unless denied), so that concurrent
        attempts cannot all be asked about before any of them counts."""
        transaction_id = message.transaction_id
        reply_to = message.reply_to
        attempt = self.authority.count_attempt(transaction_id, address, reply_to)
        offered = challenge_password(csr)
        if offered is None:
            reason = "no challenge password in the request"
            self.authority.refuse(transaction_id, address, reason)
            raise ScepError(FailInfo.BAD_REQUEST, reason, reply_to)
        try:
            denied = webhook.validate(
                transaction_id=transaction_id,
                csr_der=message.payload,
                challenge=offered,
                client_address=address,
                connector=self.context.name,
            )
        except WebhookUnavailable as exc:
            self.authority.take_back(attempt)
            reason = f"the request cannot be validated now: {exc}"
            log.warning(
                "SCEP validation webhook unavailable",
                extra={"connector": self.context.name, "reason": str(exc)},
            )
            self.authority.refuse(transaction_id, address, reason)
            self._notify_failure(transaction_id, reason)
            raise ScepError(FailInfo.BAD_REQUEST, reason, reply_to) from None
        if denied is not None:
            self.authority.refuse(transaction_id, address, denied)
            self._notify_failure(transaction_id, denied)
            raise ScepError(FailInfo.BAD_REQUEST, denied, reply_to)
        self.authority.take_back(attempt)
        return Authorization(
            "webhook", {"transaction_id": transaction_id, "challenge": WEBHOOK_CHALLENGE}
        )

    # -- webhook notifications -------------------------------------------------------------

    def job_handlers(self) -> Mapping[str, Callable[[dict[str, Any]], None]]:
        webhook = self.options.webhook
        if webhook is None:
            return {}
        return {NOTIFY_JOB: webhook.notify}

    def _notify(self, payload: dict[str, Any], conn: Connection | None = None) -> None:
        """Queue a notification for the webhook (delivered and retried by a job worker)."""
        self.context.core.jobs.enqueue(
            f"{self.context.name}:{NOTIFY_JOB}",
            payload,
            max_attempts=NOTIFY_MAX_ATTEMPTS,
            conn=conn,
        )

    def _notify_failure(self, transaction_id: str, reason: str) -> None:
        self._notify({"transaction_id": transaction_id, "status": "failure", "reason": reason})

    def _notify_success(
        self, transaction_id: str, certificate: x509.Certificate, conn: Connection
    ) -> None:
        der = certificate.public_bytes(serialization.Encoding.DER)
        self._notify(
            {
                "transaction_id": transaction_id,
                "status": "success",
                "serial": format(certificate.serial_number, "x"),
                # Intune's SCEP notifications carry the SHA-1 thumbprint, uppercase hex as
                # Windows shows it.
                "thumbprint": hashlib.sha1(der, usedforsecurity=False).hexdigest().upper(),
                "not_after": certificate.not_valid_after_utc.isoformat().replace("+00:00", "Z"),
                "issuer": certificate.issuer.rfc4514_string(),
            },
            conn,
        )

    def _poll(self, signer: Signer, message: PkiMessage) -> Response:
        """CertPoll (GetCertInitial): the transaction's certificate once issued or approved."""
        message.issuer_and_subject()
        with self.context.core.store.read() as conn:
            found = scep_store.get_transaction(conn, self.context.name, message.transaction_id)
        if found is None or not self._made_by(found, message.signer_certificate):
            # Another client's transaction is answered as unknown: its status, rejection
            # reason and certificate are for the key that asked.
            raise ScepError(
                FailInfo.BAD_CERT_ID, "no request with this transactionID", message.reply_to
            )
        return self._transaction_reply(signer, message.reply_to, found)

    def _made_by(self, record: scep_store.TransactionRecord, signer: x509.Certificate) -> bool:
        """Whether ``signer`` holds the key of the transaction's request (the key of its
        CSR, or of the certificate it produced), or is the certificate it renewed."""
        renewed = json.loads(record.evidence or "{}").get("renewed_serial")
        if renewed is not None and renewed == format(signer.serial_number, "x"):
            return self.authority.renewal_signer(signer) is None
        if record.csr_der and _same_key(signer, x509.load_der_x509_csr(record.csr_der)):
            return True
        if record.status == ISSUED and record.ca_id and record.serial:
            core = self.context.core
            with core.store.read() as conn:
                issued = core.store.get_certificate(conn, record.ca_id, record.serial)
            if issued is not None:
                certificate = x509.load_der_x509_certificate(issued.der)
                if _same_public_key(certificate, signer) or certificate == signer:
                    return True
        return False

    def _transaction_reply(
        self, signer: Signer, reply_to: ReplyTo, record: scep_store.TransactionRecord
    ) -> Response:
        record = self.approvals.recover_interrupted(record)
        if record.status == ISSUED:
            return self._certificate_reply(signer, reply_to, record.ca_id, record.serial)
        if record.status == REJECTED:
            reason = json.loads(record.evidence).get("rejection_reason", "")
            raise ScepError(
                FailInfo.BAD_REQUEST, f"the request was rejected: {reason}".strip(), reply_to
            )
        # PENDING, or an approval in progress.
        return self._pending(signer, reply_to)

    def _get_cert(self, signer: Signer, message: PkiMessage) -> Response:
        """GetCert: only for the certificate's own holder (the message signer's key)."""
        wanted = message.issuer_and_serial()
        serial = format(wanted.serial_number, "x")
        core = self.context.core
        with core.store.read() as conn:
            record = core.store.get_certificate(conn, self.context.ca_id, serial)
        if record is None:
            raise ScepError(FailInfo.BAD_CERT_ID, "no such certificate", message.reply_to)
        certificate = x509.load_der_x509_certificate(record.der)
        if certificate.issuer != wanted.issuer or not _same_public_key(
            certificate, message.signer_certificate
        ):
            raise ScepError(FailInfo.BAD_CERT_ID, "no such certificate", message.reply_to)
        return self._success(signer, message.reply_to, [certificate])

    def _get_crl(self, signer: Signer, message: PkiMessage) -> Response:
        message.issuer_and_serial()
        published = self.context.core.revocation.current_crl(self.context.ca_id)
        crl = x509.load_der_x509_crl(published.der)
        return self._success(signer, message.reply_to, [], crls=[crl])

    # -- replies -------------------------------------------------------------------------

    def _certificate_reply(
        self, signer: Signer, reply_to: ReplyTo, ca_id: str | None, serial: str | None
    ) -> Response:
        core = self.context.core
        with core.store.read() as conn:
            record = core.store.get_certificate(conn, ca_id, serial) if ca_id and serial else None
        if record is None:
            raise ScepError(FailInfo.BAD_CERT_ID, "the certificate is gone", reply_to)
        certificate = x509.load_der_x509_certificate(record.der)
        return self._success(signer, reply_to, [certificate, *signer.ca_chain[:-1]])

    def _success(
        self,
        signer: Signer,
        reply_to: ReplyTo,
        certificates: list[x509.Certificate],
        crls: list[x509.CertificateRevocationList] | None = None,
    ) -> Response:
        body = build_cert_rep(
            reply_to,
            PkiStatus.SUCCESS,
            signer.certificate,
            signer.key,
            certificates=certificates,
            crls=crls or [],
            allow_sha1=self.options.legacy_des3,
        )
        return Response(body, content_type=PKI_MESSAGE_TYPE)

    def _pending(self, signer: Signer, reply_to: ReplyTo) -> Response:
        body = build_cert_rep(
            reply_to,
            PkiStatus.PENDING,
            signer.certificate,
            signer.key,
            allow_sha1=self.options.legacy_des3,
        )
        return Response(body, content_type=PKI_MESSAGE_TYPE)

    def _failure(self, signer: Signer, reply_to: ReplyTo, error: ScepError) -> Response:
        log.info(
            "SCEP request refused",
            extra={
                "connector": self.context.name,
                "transaction": reply_to.transaction_id,
                "fail_info": error.fail_info.rfc_name,
                "reason": error.message,
            },
        )
        body = build_cert_rep(
            reply_to,
            PkiStatus.FAILURE,
            signer.certificate,
            signer.key,
            fail_info=error.fail_info,
            fail_info_text=error.message[:256],
            allow_sha1=self.options.legacy_des3,
        )
        return Response(body, content_type=PKI_MESSAGE_TYPE)


def decode_get_message(query_string: bytes) -> bytes:
    """The ``message`` parameter of a GET PKIOperation, base64-decoded.

    Read from the raw query string rather than Flask's parsed arguments: form decoding turns
    '+' into a space, and macOS sends standard base64 with '+' and '/' raw (it percent-encodes
    only '='). Percent-encoded and URL-safe base64 are accepted too."""
    for part in query_string.split(b"&"):
        name, _, value = part.partition(b"=")
        if name != b"message":
            continue
        text = urllib.parse.unquote(value.decode("ascii", "replace"))
        text = "".join(text.split()).translate(str.maketrans("-_", "+/"))
        text += "=" * (-len(text) % 4)
        if len(text) > SCEP_MAX_MESSAGE_BYTES * 4 // 3 + 4:
            raise ValueError(f"a pkiMessage is at most {SCEP_MAX_MESSAGE_BYTES} bytes")
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("the message parameter is not base64") from None
    raise ValueError("PKIOperation by GET needs a message parameter")


def _fail_info_for(error: PkigateError) -> FailInfo:
    """The core's refusals as SCEP failInfo: the one place where that mapping lives."""
    if isinstance(error, StoreUnavailableError):
        # RFC 8894 3.2.1.4.5 has no "try later": badRequest, with failInfoText saying so.
        return FailInfo.BAD_REQUEST
    if isinstance(error, UnsupportedAlgorithmError | WeakKeyError):
        return FailInfo.BAD_ALG
    if isinstance(error, NotFoundError):
        return FailInfo.BAD_CERT_ID
    if isinstance(error, BadCSRError | PolicyViolationError | BadRequestError):
        return FailInfo.BAD_REQUEST
    return FailInfo.BAD_REQUEST


def _same_key(certificate: x509.Certificate, csr: x509.CertificateSigningRequest) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    try:
        return certificate.public_key().public_bytes(der, spki) == csr.public_key().public_bytes(
            der, spki
        )
    except ValueError:
        return False


def _alt_names(item: x509.Certificate | x509.CertificateSigningRequest) -> set[x509.GeneralName]:
    try:
        return set(item.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        return set()


def _same_public_key(a: x509.Certificate, b: x509.Certificate) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return a.public_key().public_bytes(der, spki) == b.public_key().public_bytes(der, spki)


def _plain_error(status: int, message: str) -> Response:
    return Response(message + "\n", status=status, content_type="text/plain")
