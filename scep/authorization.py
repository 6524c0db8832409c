"""Who may enroll over SCEP: challenge passwords (static or one-time) and renewal by a
certificate pkigate issued. No HTTP here; the routes call these with parsed values.

Every attempt is audited: a refusal here with its reason, a success by the core as part of
the issuance it authorizes (the evidence names the challenge kind and id). Failed
challenges are counted per client address, per transactionID and (for the static
challenge) per connector in the store, checked and counted in one step, so the limits hold
across gateway processes and hosts however many attempts arrive at once.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import uuid
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import AttributeOID
from sqlalchemy import Connection

from pkigate.core import Actor, Core
from pkigate.core.errors import ConflictError
from pkigate.core.model import CertificateStatus
from pkigate.core.names import format_general_name, parse_dn
from pkigate.core.store import scep as scep_store
from pkigate.scep.messages import FailInfo, ReplyTo, ScepError

log = logging.getLogger("pkigate.scep")

ALREADY_USED = "the challenge password was already used"
TOO_MANY_FAILURES = "too many failed challenge attempts; try again later"
STATIC_SCOPE = "static"
"""The failed-attempt counter of the connector's static challenge (all addresses)."""


class _LimitReached(Exception):
    """Rolls back the attempts counted before a counter at its limit was reached."""


class _StaticMatched(Exception):
    """Rolls back the attempt counted for a static challenge that turned out right."""


@dataclass(frozen=True)
class CountedAttempt:
    """An attempt counted before it was checked: the windows it was counted in."""

    windows: dict[tuple[str, str], datetime]


class AnsweredMeanwhile(Exception):
    """A copy of this very request, running at the same time, was answered and recorded
    first: its answer is this request's answer (not a refusal, not a second certificate)."""


@dataclass(frozen=True)
class ChallengePolicy:
    """A connector's challenge settings."""

    static_secret: str | None
    """The static challenge; None: static challenges are off."""
    dynamic: bool
    """One-time challenges from the management API are accepted."""
    max_failures: int
    """Failed challenges allowed per client address and per transactionID in a window."""
    failure_window: timedelta
    max_static_failures: int = 50
    """Failed challenges allowed in a window against the static challenge, from all
    addresses together (guessing it from many addresses at once)."""


@dataclass(frozen=True)
class Authorization:
    """Why a request may be issued: what the core records as the requester's evidence."""

    kind: str  # "static" | "dynamic" | "renewal"
    evidence: dict[str, str]
    challenge_id: str | None = None


@dataclass(frozen=True)
class IssuedChallenge:
    id: str
    secret: str
    expires_at: datetime
    subject: str | None
    device_id: str | None
    sans: tuple[str, ...] | None = None


def san_key(name: x509.GeneralName) -> str:
    """An alternative name as a challenge lists it: ``TYPE:value``, DNS names in lower case
    (they compare without case), an otherName with its DER value (not its type alone)."""
    if isinstance(name, x509.DNSName):
        return f"DNS:{name.value.lower()}"
    if isinstance(name, x509.OtherName):
        return f"otherName:{name.type_id.dotted_string}:{name.value.hex()}"
    return format_general_name(name)


def challenge_password(csr: x509.CertificateSigningRequest) -> str | None:
    """The CSR's challengePassword attribute (RFC 2985 5.4.1), if any."""
    try:
        attribute = csr.attributes.get_attribute_for_oid(AttributeOID.CHALLENGE_PASSWORD)
    except x509.AttributeNotFound:
        return None
    except ValueError:
        return None  # several values, or none: no single password to check
    value = attribute.value
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def secret_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def static_challenge_secret_name(connector: str) -> str:
    """The name a connector's generated static challenge has among the store's secrets."""
    return f"scep/{connector}/static-challenge"


def shared_static_challenge(core: Core, connector: str, legacy_file: Path) -> str:
    """The connector's generated static challenge: kept in the store, sealed under the KEK,
    so that every host serving the connector hands out the same one; made by the first
    process that needs it.

    Earlier versions generated it into each data directory (``legacy_file``): such a file
    is imported into the store if the store has none yet (devices keep the challenge they
    were given), then removed, since the store is the one source of truth."""
    name = static_challenge_secret_name(connector)
    try:
        legacy: str | None = legacy_file.read_text().strip() or None
    except FileNotFoundError:
        legacy = None
    challenge = core.secrets.get_or_create(
        name,
        lambda: legacy or secrets.token_urlsafe(24),
        Actor("system:gateway", connector),
    )
    if legacy is not None:
        if not hmac.compare_digest(legacy.encode(), challenge.encode()):
            log.warning(
                "SCEP static challenge file differs from the store's; the store's is used",
                extra={"connector": connector, "file": str(legacy_file)},
            )
        with suppress(FileNotFoundError):
            legacy_file.unlink()
    return challenge


class ChallengeAuthority:
    """Checks challenges and renewals for one connector instance."""

    def __init__(self, core: Core, connector: str, ca_id: str, policy: ChallengePolicy) -> None:
        self._core = core
        self._connector = connector
        self._ca_id = ca_id
        self.policy = policy

    # -- one-time challenges -------------------------------------------------------------

    def create_challenge(
        self,
        actor: Actor,
        *,
        ttl: timedelta,
        subject: str | None = None,
        device_id: str | None = None,
        sans: Sequence[x509.GeneralName] | None = None,
    ) -> IssuedChallenge:
        if subject is not None:
            subject = parse_dn(subject).rfc4514_string()  # raises a BadRequestError
        names = None if sans is None else tuple(san_key(n) for n in sans)
        now = self._core.clock()
        issued = IssuedChallenge(
            uuid.uuid4().hex, secrets.token_urlsafe(24), now + ttl, subject, device_id, names
        )
        with self._core.store.write() as conn:
            scep_store.insert_challenge(
                conn,
                challenge_id=issued.id,
                connector=self._connector,
                secret_sha256=secret_digest(issued.secret),
                subject=subject,
                device_id=device_id,
                created_at=now,
                created_by=actor.principal,
                expires_at=issued.expires_at,
                sans=names,
            )
            self._core.audit.record(
                conn,
                actor,
                "scep.challenge.create",
                f"connector/{self._connector}/challenge/{issued.id}",
                at=now,
                parameters={
                    "subject": subject,
                    "device_id": device_id,
                    "sans": list(names) if names is not None else None,
                    "expires_at": issued.expires_at,
                },
            )
        return issued

    def consume(self, conn: Connection, authorization: Authorization) -> None:
        """Spend the one-time challenge behind ``authorization`` in ``conn``: the
        transaction that stores what it authorized (a certificate, a pending request), so
        that the challenge is spent exactly when that commits. ConflictError when another
        request spent it first (the caller's transaction then rolls back)."""
        if authorization.challenge_id is None:
            return
        if not scep_store.consume_challenge(conn, authorization.challenge_id, self._core.clock()):
            raise ConflictError(ALREADY_USED)

    # -- checks --------------------------------------------------------------------------

    def authorize_enrollment(
        self,
        csr: x509.CertificateSigningRequest,
        *,
        transaction_id: str,
        client_address: str,
        reply_to: ReplyTo,
        answered_meanwhile: Callable[[], bool] = lambda: False,
    ) -> Authorization:
        """Check the CSR's challengePassword; raises ScepError(badRequest) on refusal, or
        :class:`AnsweredMeanwhile` when the one-time challenge was spent by a copy of this
        request that ``answered_meanwhile`` says was recorded since the caller looked.

        A valid one-time challenge is accepted before any failed-attempt limit applies: the
        limits exist against guessing, and a one-time challenge is 192 random bits that
        nobody guesses, so a client whose address another client behind the same NAT has
        locked out still enrolls with the challenge its MDM fetched for it. Anything else
        offered is a guess: counted, and compared with the static challenge only while the
        client address, the transactionID and the static challenge are all under their
        limits."""
        now = self._core.clock()
        offered = challenge_password(csr)
        evidence = {"transaction_id": transaction_id}
        reason = "wrong challenge password"
        if offered is None:
            reason = "no challenge password in the request"
        elif self.policy.dynamic:
            found = self._find_dynamic(offered, csr, now)
            if found == ALREADY_USED and answered_meanwhile():
                raise AnsweredMeanwhile
            if not isinstance(found, str):
                return Authorization(
                    "dynamic",
                    {
                        **evidence,
                        "challenge": "dynamic",
                        "challenge_id": found.id,
                        **({"device_id": found.device_id} if found.device_id else {}),
                    },
                    challenge_id=found.id,
                )
            reason = found
        static = self.policy.static_secret if offered is not None else None
        try:
            with self._core.store.write() as conn:
                if not self._count_attempt(
                    conn, transaction_id, client_address, now, static=static is not None
                ):
                    raise _LimitReached
                if (
                    static is not None
                    and offered is not None
                    and hmac.compare_digest(offered.encode(), static.encode())
                ):
                    # Rolls the count back: a right challenge is no failed attempt.
                    raise _StaticMatched
        except _LimitReached:
            self._audit_refusal(transaction_id, client_address, now, TOO_MANY_FAILURES)
            raise ScepError(FailInfo.BAD_REQUEST, TOO_MANY_FAILURES, reply_to) from None
        except _StaticMatched:
            return Authorization("static", {**evidence, "challenge": "static"})
        self._audit_refusal(transaction_id, client_address, now, reason)
        raise ScepError(FailInfo.BAD_REQUEST, reason, reply_to)

    def _find_dynamic(
        self, offered: str, csr: x509.CertificateSigningRequest, now: datetime
    ) -> scep_store.ChallengeRecord | str:
        """The unused one-time challenge ``offered`` is, or why it cannot be used. It is
        spent later, by :meth:`consume` in the transaction that records its use."""
        with self._core.store.read() as conn:
            found = scep_store.challenge_by_secret(conn, self._connector, secret_digest(offered))
        if found is None:
            return "wrong challenge password"
        if found.used_at is not None:
            return ALREADY_USED
        if found.expires_at <= now:
            return "the challenge password has expired"
        if found.subject is not None and parse_dn(found.subject) != csr.subject:
            return "the challenge password is bound to another subject"
        if found.subject is not None or found.sans is not None:
            # A bound challenge enrolls the names it was made for: its subject, and the
            # alternative names listed with it (none unless some were).
            try:
                requested = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                asked = {san_key(n) for n in requested.value}
            except x509.ExtensionNotFound:
                asked = set()
            extra = sorted(asked - set(found.sans or ()))
            if extra:
                return "the challenge password does not allow the alternative name(s) " + ", ".join(
                    extra[:5]
                )
        return found

    def _counters(
        self, transaction_id: str, address: str, *, static: bool
    ) -> list[tuple[str, str, int]]:
        # Always in this order, so that two PostgreSQL transactions counting the same rows
        # lock them in the same order and never deadlock.
        counters = [
            ("address", address, self.policy.max_failures),
            ("transaction", transaction_id, self.policy.max_failures),
        ]
        if static:
            counters.append((STATIC_SCOPE, STATIC_SCOPE, self.policy.max_static_failures))
        return counters

    def _count_attempt(
        self, conn: Connection, transaction_id: str, address: str, now: datetime, *, static: bool
    ) -> dict[tuple[str, str], datetime] | None:
        """Count an attempt on every counter, or None when one of them is at its limit (the
        caller then rolls ``conn`` back: nothing may stay counted)."""
        counted: dict[tuple[str, str], datetime] = {}
        for scope, value, limit in self._counters(transaction_id, address, static=static):
            window_start = scep_store.count_attempt(
                conn,
                self._connector,
                scope,
                value,
                limit=limit,
                now=now,
                window=self.policy.failure_window,
            )
            if window_start is None:
                return None
            counted[(scope, value)] = window_start
        return counted

    def _audit_refusal(self, transaction_id: str, address: str, now: datetime, reason: str) -> None:
        self._core.audit.record_alone(
            Actor(f"scep-client:{address}", self._connector),
            "scep.enroll",
            f"connector/{self._connector}/transaction/{transaction_id}"[:256],
            result="failure",
            parameters={"reason": reason, "transaction_id": transaction_id},
            at=now,
        )

    def refuse(self, transaction_id: str, address: str, reason: str) -> None:
        """Audit a refusal decided elsewhere (a bad renewal, a reused transactionID, a
        webhook's deny)."""
        self._audit_refusal(transaction_id, address, self._core.clock(), reason)

    def count_attempt(self, transaction_id: str, address: str, reply_to: ReplyTo) -> CountedAttempt:
        """Count an attempt that is checked elsewhere (by the validation webhook) against the
        client's limits, before it is checked; refuse it (ScepError badRequest, audited) when
        the client is past a limit. :meth:`take_back` the attempt when it succeeds."""
        now = self._core.clock()
        try:
            with self._core.store.write() as conn:
                counted = self._count_attempt(conn, transaction_id, address, now, static=False)
                if counted is None:
                    raise _LimitReached
        except _LimitReached:
            self._audit_refusal(transaction_id, address, now, TOO_MANY_FAILURES)
            raise ScepError(FailInfo.BAD_REQUEST, TOO_MANY_FAILURES, reply_to) from None
        return CountedAttempt(counted)

    def take_back(self, attempt: CountedAttempt) -> None:
        """Uncount an attempt that succeeded, or that failed through no fault of the
        client's (the webhook did not answer)."""
        with self._core.store.write() as conn:
            for (scope, value), window_start in attempt.windows.items():
                scep_store.uncount_attempt(conn, self._connector, scope, value, window_start)

    # -- renewal -------------------------------------------------------------------------

    def renewal_signer(self, signer: x509.Certificate) -> str | None:
        """Why ``signer`` cannot authorize a renewal, or None if it can: it must be a
        certificate this connector issued (not another connector of the same CA: an ACME
        or AD-style certificate proves other things), unrevoked and within its validity."""
        serial = format(signer.serial_number, "x")
        with self._core.store.read() as conn:
            record = self._core.store.get_certificate(conn, self._ca_id, serial)
        if record is None or not hmac.compare_digest(
            record.der, signer.public_bytes(serialization.Encoding.DER)
        ):
            return "the renewal is not signed by a certificate this CA issued"
        if record.connector != self._connector:
            return "the renewal is signed by a certificate another connector issued"
        if record.status != CertificateStatus.ISSUED.value:
            return "the signing certificate is revoked"
        now = self._core.clock()
        if not record.not_before <= now < record.not_after:
            return "the signing certificate has expired"
        return None
