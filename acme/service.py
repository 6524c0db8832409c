"""The ACME registration authority: accounts, orders, authorizations, challenges,
finalization, revocation and renewal information, in protocol terms but free of HTTP.

Requests arrive here already authenticated (the JWS verified, the nonce spent, the
account resolved) from :mod:`pkigate.acme.connector`. Identity for issuance comes only
from validated authorizations: the CSR must name exactly the order's identifiers, and
the certificate's names are the order's, handed to the core as API passthrough.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes
from cryptography.x509.oid import NameOID
from sqlalchemy import Connection

from pkigate.acme.identifiers import Identifier, IdentifierPolicy, check_policy
from pkigate.acme.jws import public_key_from_jwk
from pkigate.acme.problems import AcmeProblem
from pkigate.acme.renewal import RenewalWindow, parse_cert_id, suggested_window
from pkigate.acme.settings import AcmeSettings, Profile
from pkigate.acme.validation import ValidationSettings, validate
from pkigate.core import Actor, IssuedCertificate, Requester
from pkigate.core.errors import (
    BadCSRError,
    ConflictError,
    NotFoundError,
    PkigateError,
    PolicyViolationError,
    StoreUnavailableError,
    UnsupportedAlgorithmError,
    WeakKeyError,
)
from pkigate.core.model import RevocationReason
from pkigate.core.passthrough import ApiPassthrough
from pkigate.core.readable import UNREADABLE
from pkigate.core.store import CertificateRecord
from pkigate.core.store import acme as acme_store
from pkigate.core.store.acme import (
    AccountRecord,
    AuthorizationRecord,
    ChallengeRecord,
    EabKeyRecord,
    OrderRecord,
)
from pkigate.gateways.connectors import ConnectorContext

log = logging.getLogger("pkigate.acme")

VALIDATE_JOB = "acme-validate"
# How long an order may stay "processing" before it is taken for interrupted: issuance
# takes milliseconds, so this is generous.
PROCESSING_STALE = timedelta(seconds=15)

# Challenge types offered per identifier: a wildcard can only be proved in DNS (RFC 8555
# 7.1.3), an IP address not in DNS at all (RFC 8738 section 7).
DNS_CHALLENGES = ("http-01", "dns-01", "tls-alpn-01")
WILDCARD_CHALLENGES = ("dns-01",)
IP_CHALLENGES = ("http-01", "tls-alpn-01")

# RFC 5280 reason codes a client may give (RFC 8555 7.6); 7 is unused and removeFromCRL
# (8) and the CA/attribute-authority ones are not the subscriber's to claim.
CLIENT_REASONS: Mapping[int, RevocationReason] = {
    0: RevocationReason.unspecified,
    1: RevocationReason.keyCompromise,
    3: RevocationReason.affiliationChanged,
    4: RevocationReason.superseded,
    5: RevocationReason.cessationOfOperation,
}


def new_id() -> str:
    return secrets.token_urlsafe(16)


@dataclass(frozen=True)
class OrderView:
    order: OrderRecord
    authorization_ids: tuple[str, ...]


@dataclass(frozen=True)
class AuthorizationView:
    authorization: AuthorizationRecord
    challenges: tuple[ChallengeRecord, ...]


class AcmeService:
    def __init__(
        self,
        context: ConnectorContext,
        settings: AcmeSettings,
        unseal_eab: Callable[[EabKeyRecord], bytes],
    ) -> None:
        self.context = context
        self.settings = settings
        self.name = context.name
        self.core = context.core
        self._unseal_eab = unseal_eab
        #: The queue's name for this connector's validation jobs (runtime.py prefixes each
        #: connector's job kinds with its name).
        self.validation_kind = f"{context.name}:{VALIDATE_JOB}"

    def now(self) -> datetime:
        return self.core.clock()

    @contextmanager
    def write(self) -> Iterator[Connection]:
        with self.core.store.write() as conn:
            yield conn

    def _actor(self, account_id: str) -> Actor:
        return Actor(f"acme-account:{account_id}", self.name)

    # -- accounts ------------------------------------------------------------------------

    def find_account(self, conn: Connection, account_id: str) -> AccountRecord | None:
        return acme_store.account_by_id(conn, self.name, account_id)

    def find_account_alone(self, account_id: str) -> AccountRecord | None:
        """The account, read on its own (outside any transaction of the caller's)."""
        return acme_store.account_by_id_alone(self.core.store.engine, self.name, account_id)

    def account_by_key(self, conn: Connection, thumbprint: str) -> AccountRecord | None:
        return acme_store.account_by_thumbprint(conn, self.name, thumbprint)

    def eab_hmac_key(self, conn: Connection, key_id: str) -> bytes | None:
        record = acme_store.eab_key(conn, self.name, key_id)
        if record is None or record.revoked_at is not None:
            return None
        return self._unseal_eab(record)

    def create_account(
        self,
        conn: Connection,
        jwk: Mapping[str, Any],
        thumbprint: str,
        contact: Sequence[str],
        eab_key_id: str | None,
    ) -> AccountRecord:
        now = self.now()
        account = AccountRecord(
            new_id(), self.name, thumbprint, dict(jwk), "valid", tuple(contact), eab_key_id, now
        )
        acme_store.insert_account(conn, account)
        if eab_key_id is not None and not acme_store.bind_eab_key(
            conn, eab_key_id, account.id, now
        ):
            raise AcmeProblem(
                "unauthorized", f"external account key {eab_key_id} is bound to another account"
            )
        self.core.audit.record(
            conn,
            self._actor(account.id),
            "acme.account.create",
            f"connector/{self.name}/account/{account.id}",
            at=now,
            parameters={"thumbprint": thumbprint, "contact": list(contact), "eab": eab_key_id},
        )
        return account

    def update_account(
        self,
        conn: Connection,
        account: AccountRecord,
        *,
        contact: Sequence[str] | None = None,
        deactivate: bool = False,
    ) -> AccountRecord:
        now = self.now()
        acme_store.update_account(
            conn,
            account.id,
            now,
            status="deactivated" if deactivate else None,
            contact=contact,
        )
        action = "acme.account.deactivate" if deactivate else "acme.account.update"
        self.core.audit.record(
            conn,
            self._actor(account.id),
            action,
            f"connector/{self.name}/account/{account.id}",
            at=now,
            parameters={"contact": list(contact) if contact is not None else None},
        )
        updated = acme_store.account_by_id(conn, self.name, account.id)
        assert updated is not None
        return updated

    def change_key(
        self, conn: Connection, account: AccountRecord, jwk: Mapping[str, Any], thumbprint: str
    ) -> None:
        holder = acme_store.account_by_thumbprint(conn, self.name, thumbprint)
        if holder is not None:
            raise AcmeProblem(
                "malformed",
                "the new key is already the key of an account",
                status=409,
                extra={"_location_account": holder.id},
            )
        now = self.now()
        acme_store.update_account(conn, account.id, now, jwk=dict(jwk), thumbprint=thumbprint)
        self.core.audit.record(
            conn,
            self._actor(account.id),
            "acme.account.key_change",
            f"connector/{self.name}/account/{account.id}",
            at=now,
            parameters={"old_thumbprint": account.thumbprint, "new_thumbprint": thumbprint},
        )

    def account_policies(self, conn: Connection, account: AccountRecord) -> list[IdentifierPolicy]:
        policies = [self.settings.identifier_policy]
        if account.eab_key_id is not None:
            record = acme_store.eab_key(conn, self.name, account.eab_key_id)
            if record is not None and record.allowed_identifiers is not None:
                policies.append(IdentifierPolicy.parse(record.allowed_identifiers, "eab"))
        return policies

    def account_default_profile(self, conn: Connection, account: AccountRecord) -> str:
        if account.eab_key_id is not None:
            record = acme_store.eab_key(conn, self.name, account.eab_key_id)
            profile = None if record is None else record.default_profile
            if profile is not None and profile in self.settings.profiles:
                return profile
        return self.settings.default_profile

    # -- orders --------------------------------------------------------------------------

    def new_order(
        self,
        conn: Connection,
        account: AccountRecord,
        identifiers: Sequence[Identifier],
        profile_name: str | None,
        replaces: str | None,
    ) -> OrderView:
        now = self.now()
        check_policy(identifiers, self.account_policies(conn, account))
        if profile_name is None:
            profile_name = self.account_default_profile(conn, account)
        elif profile_name not in self.settings.profiles:
            raise AcmeProblem(
                "invalidProfile",
                f"no profile {profile_name[:64]!r}; offered: {', '.join(self.settings.profiles)}",
            )
        if replaces is not None:
            self._check_replaces(conn, account, identifiers, replaces)
        limit = self.settings.orders_per_account_per_hour
        taken, window_end = acme_store.take_from_window(
            conn, self.name, "orders", account.id, timedelta(hours=1), now, limit
        )
        if not taken:
            raise AcmeProblem(
                "rateLimited",
                f"at most {limit} new orders per account per hour",
                retry_after=max(1, int((window_end - now).total_seconds())),
            )
        authorization_ids: list[str] = []
        all_valid = True
        for identifier in identifiers:
            reused = acme_store.reusable_authorization(
                conn,
                account.id,
                identifier.type,
                identifier.base,
                identifier.wildcard,
                valid_after=now + timedelta(hours=1),
                created_after=now - self.settings.authorization_reuse,
            )
            if reused is not None:
                authorization_ids.append(reused.id)
                continue
            all_valid = False
            authorization_ids.append(self._new_authorization(conn, account, identifier, now))
        order = OrderRecord(
            id=new_id(),
            connector=self.name,
            account_id=account.id,
            status="ready" if all_valid else "pending",
            expires_at=now + self.settings.order_lifetime,
            identifiers=tuple((i.type, i.value) for i in identifiers),
            profile=profile_name,
            replaces=replaces,
            error=None,
            ca_id=None,
            serial=None,
            created_at=now,
            updated_at=now,
        )
        acme_store.insert_order(conn, order, authorization_ids)
        return OrderView(order, tuple(authorization_ids))

    def _new_authorization(
        self, conn: Connection, account: AccountRecord, identifier: Identifier, now: datetime
    ) -> str:
        authorization = AuthorizationRecord(
            id=new_id(),
            connector=self.name,
            account_id=account.id,
            identifier_type=identifier.type,
            identifier_value=identifier.base,
            wildcard=identifier.wildcard,
            status="pending",
            expires_at=now + self.settings.pending_authorization_lifetime,
            created_at=now,
        )
        acme_store.insert_authorization(conn, authorization)
        types: tuple[str, ...]
        if identifier.type == "ip":
            types = IP_CHALLENGES
        elif identifier.wildcard:
            types = WILDCARD_CHALLENGES
        else:
            types = DNS_CHALLENGES
        acme_store.insert_challenges(
            conn,
            [
                ChallengeRecord(
                    new_id(),
                    authorization.id,
                    kind,
                    secrets.token_urlsafe(32),
                    "pending",
                    None,
                    None,
                    None,
                )
                for kind in types
            ],
            now,
        )
        return authorization.id

    def _check_replaces(
        self,
        conn: Connection,
        account: AccountRecord,
        identifiers: Sequence[Identifier],
        replaces: str,
    ) -> None:
        record = self.certificate_by_cert_id(conn, replaces)
        order = acme_store.order_for_certificate(conn, record.ca_id, record.serial)
        if order is None or order.account_id != account.id:
            raise AcmeProblem(
                "unauthorized", "the certificate named in 'replaces' was not issued to this account"
            )
        if not {v for _, v in order.identifiers} & {i.value for i in identifiers}:
            raise AcmeProblem(
                "malformed", "the replacement order shares no identifier with that certificate"
            )
        for other in acme_store.orders_replacing(conn, self.name, replaces):
            if other.status in ("ready", "processing", "valid", "pending") and (
                other.status == "valid" or other.expires_at > self.now()
            ):
                raise AcmeProblem(
                    "alreadyReplaced", f"order {other.id} already replaces this certificate"
                )

    def order(
        self, conn: Connection, account: AccountRecord, order_id: str, *, repair: bool = False
    ) -> OrderView:
        """The account's order. With ``repair`` (``conn`` is a write transaction), an order
        left "processing" by a process that died while finalizing is settled."""
        order = acme_store.order_by_id(conn, self.name, order_id)
        self._check_order(order, account, order_id)
        assert order is not None
        if repair and self.interrupted(order):
            order = self._settle_interrupted(conn, order)
        return OrderView(
            self._with_expiry(order), tuple(acme_store.order_authorization_ids(conn, order.id))
        )

    def order_alone(self, account: AccountRecord, order_id: str) -> OrderView:
        """:meth:`order` (without repair) as one read of its own (each poll of an order)."""
        found = acme_store.order_with_authorization_ids_alone(
            self.core.store.engine, self.name, order_id
        )
        order, authorization_ids = found if found is not None else (None, [])
        self._check_order(order, account, order_id)
        assert order is not None
        return OrderView(self._with_expiry(order), tuple(authorization_ids))

    def _check_order(
        self, order: OrderRecord | None, account: AccountRecord, order_id: str
    ) -> None:
        if order is None or order.account_id != account.id:
            raise AcmeProblem("malformed", f"no order {order_id[:40]}", status=404)

    def interrupted(self, order: OrderRecord) -> bool:
        """Whether ``order`` has been "processing" for longer than a finalization takes: the
        process finalizing it died (``order(..., repair=True)`` settles it)."""
        return order.status == "processing" and self.now() - order.updated_at >= PROCESSING_STALE

    def _settle_interrupted(self, conn: Connection, order: OrderRecord) -> OrderRecord:
        """A finalization whose process died leaves the order "processing". The order
        becomes valid in the transaction that stores its certificate, so normally nothing
        was issued and the order is ready to be finalized again; if the core's idempotency
        entry for this order names a certificate all the same (an order "processing" from
        before that was so, or set so by hand), the order is valid with it."""
        now = self.now()
        record = self.core.issuer.issued_under(
            conn,
            self.context.ca_id,
            f"acme-order-{order.id}",
            order.created_at - timedelta(minutes=1),
        )
        if record is not None:
            acme_store.update_order(
                conn,
                order.id,
                now,
                status="valid",
                expected_status="processing",
                ca_id=record.ca_id,
                serial=record.serial,
            )
            log.warning(
                "ACME order settled after an interrupted finalization",
                extra={"connector": self.name, "order": order.id, "serial": record.serial},
            )
        else:
            acme_store.update_order(
                conn, order.id, now, status="ready", expected_status="processing"
            )
            log.warning(
                "ACME order made ready again after an interrupted finalization",
                extra={"connector": self.name, "order": order.id},
            )
        updated = acme_store.order_by_id(conn, self.name, order.id)
        assert updated is not None
        return updated

    def _with_expiry(self, order: OrderRecord) -> OrderRecord:
        if order.status in ("pending", "ready") and order.expires_at <= self.now():
            return _replace_status(order, "invalid")
        return order

    def orders_page(
        self, conn: Connection, account: AccountRecord, cursor: str | None
    ) -> tuple[list[OrderRecord], str | None]:
        after = None
        if cursor:
            # The cursor is the last listed order's id: the page goes on after it.
            last = acme_store.order_by_id(conn, self.name, cursor)
            if last is None or last.account_id != account.id:
                raise AcmeProblem("malformed", "no such page", status=404)
            after = (last.created_at, last.id)
        size = self.settings.orders_page_size
        rows = acme_store.orders_of_account(conn, account.id, after, size + 1)
        more = len(rows) > size
        rows = rows[:size]
        next_cursor = rows[-1].id if more else None
        return rows, next_cursor

    def authorization(
        self, conn: Connection, account: AccountRecord, authz_id: str
    ) -> AuthorizationView:
        record = acme_store.authorization_by_id(conn, self.name, authz_id)
        self._check_authorization(record, account, authz_id)
        assert record is not None
        return self._authorization_view(record, acme_store.challenges_of(conn, [record.id]))

    def authorization_alone(self, account: AccountRecord, authz_id: str) -> AuthorizationView:
        """:meth:`authorization` as one read of its own (each poll of an authorization)."""
        found = acme_store.authorization_with_challenges_alone(
            self.core.store.engine, self.name, authz_id
        )
        record, challenges = found if found is not None else (None, [])
        self._check_authorization(record, account, authz_id)
        assert record is not None
        return self._authorization_view(record, challenges)

    def _check_authorization(
        self, record: AuthorizationRecord | None, account: AccountRecord, authz_id: str
    ) -> None:
        if record is None or record.account_id != account.id:
            raise AcmeProblem("malformed", f"no authorization {authz_id[:40]}", status=404)

    def _authorization_view(
        self, record: AuthorizationRecord, challenges: Sequence[ChallengeRecord]
    ) -> AuthorizationView:
        if record.status in ("pending", "valid") and record.expires_at <= self.now():
            record = _replace_authz_status(record, "expired")
        return AuthorizationView(record, tuple(challenges))

    def authorizations(
        self, conn: Connection, ids: Sequence[str]
    ) -> dict[str, AuthorizationRecord]:
        return acme_store.authorizations_by_ids(conn, ids)

    def deactivate_authorization(
        self, conn: Connection, account: AccountRecord, authz_id: str
    ) -> AuthorizationView:
        view = self.authorization(conn, account, authz_id)
        if view.authorization.status not in ("pending", "valid"):
            raise AcmeProblem(
                "malformed",
                f"an authorization that is {view.authorization.status} cannot be deactivated",
            )
        now = self.now()
        acme_store.update_authorization(conn, authz_id, now, status="deactivated")
        for order_id in acme_store.orders_using_authorization(conn, authz_id):
            acme_store.update_order(
                conn, order_id, now, status="invalid", expected_status="pending"
            )
            acme_store.update_order(conn, order_id, now, status="invalid", expected_status="ready")
        return self.authorization(conn, account, authz_id)

    # -- challenges ----------------------------------------------------------------------

    def challenge(
        self, conn: Connection, account: AccountRecord, challenge_id: str
    ) -> tuple[ChallengeRecord, AuthorizationRecord]:
        challenge = acme_store.challenge_by_id(conn, challenge_id)
        authorization = (
            None
            if challenge is None
            else acme_store.authorization_by_id(conn, self.name, challenge.authorization_id)
        )
        if challenge is None or authorization is None or authorization.account_id != account.id:
            raise AcmeProblem("malformed", f"no challenge {challenge_id[:40]}", status=404)
        return challenge, authorization

    def start_challenge(
        self, conn: Connection, account: AccountRecord, challenge_id: str
    ) -> tuple[ChallengeRecord, AuthorizationRecord, bool]:
        """Queue the challenge's validation; True when a job was queued."""
        challenge, authorization = self.challenge(conn, account, challenge_id)
        now = self.now()
        if challenge.status != "pending" or authorization.status != "pending":
            return challenge, authorization, False
        if authorization.expires_at <= now:
            raise AcmeProblem("malformed", "the authorization has expired")
        limit = self.settings.failed_validations_per_identifier_per_hour
        failures, window_end = acme_store.count_in_window(
            conn,
            self.name,
            "failures",
            f"{authorization.identifier_type}:{authorization.identifier_value}",
            timedelta(hours=1),
            now,
        )
        if failures >= limit:
            raise AcmeProblem(
                "rateLimited",
                f"{failures} failed validations for {authorization.identifier_value} in the "
                f"last hour (limit {limit})",
                retry_after=max(1, int((window_end - now).total_seconds())),
            )
        if not acme_store.update_challenge(
            conn, challenge.id, now, status="processing", expected_status="pending"
        ):
            return challenge, authorization, False
        self.core.jobs.enqueue(
            self.validation_kind,
            {"challenge": challenge.id},
            dedupe_key=f"acme-validate:{challenge.id}",
            max_attempts=3,
            conn=conn,
        )
        updated = acme_store.challenge_by_id(conn, challenge.id)
        assert updated is not None
        return updated, authorization, True

    def run_validation(self, payload: Mapping[str, Any]) -> None:
        """The validation job: contact the client's server, then record the outcome on the
        challenge, its authorization and the orders waiting for it, and the job's own
        completion, in one transaction."""
        challenge_id = str(payload.get("challenge", ""))
        with self.core.store.read() as conn:
            challenge = acme_store.challenge_by_id(conn, challenge_id)
            if challenge is None or challenge.status != "processing":
                return
            authorization = acme_store.authorization_by_id(
                conn, self.name, challenge.authorization_id
            )
            assert authorization is not None
            account = acme_store.account_by_id(conn, self.name, authorization.account_id)
            assert account is not None
        identifier = Identifier(authorization.identifier_type, authorization.identifier_value)
        key_authorization = f"{challenge.token}.{account.thumbprint}"
        error: AcmeProblem | None = None
        records: list[dict[str, Any]] = []
        try:
            done = validate(
                challenge.type,
                identifier,
                challenge.token,
                key_authorization,
                self.validation_settings(),
            )
            records = [r.to_json() for r in done]
        except AcmeProblem as problem:
            error = problem
        now = self.now()
        with self.core.store.write() as conn:
            if error is None:
                self._validated(conn, challenge, authorization, records, now)
            else:
                self._failed(conn, challenge, authorization, error, now)
            self.core.jobs.complete_running(conn)
        log.info(
            "ACME challenge %s",
            "valid" if error is None else "invalid",
            extra={
                "connector": self.name,
                "challenge": challenge.id,
                "type": challenge.type,
                "identifier": identifier.value,
                "error": None if error is None else error.detail,
            },
        )

    def validation_settings(self) -> ValidationSettings:
        return ValidationSettings(
            resolver=self.settings.dns_resolver,
            http_port=self.settings.http01_port,
            tls_port=self.settings.tls_alpn01_port,
            timeout=self.settings.validation_timeout,
        )

    def _validated(
        self,
        conn: Connection,
        challenge: ChallengeRecord,
        authorization: AuthorizationRecord,
        records: list[dict[str, Any]],
        now: datetime,
    ) -> None:
        if not acme_store.update_challenge(
            conn,
            challenge.id,
            now,
            status="valid",
            expected_status="processing",
            validation_record=records,
        ):
            return
        acme_store.update_authorization(
            conn,
            authorization.id,
            now,
            status="valid",
            expected_status="pending",
            expires_at=now + self.settings.valid_authorization_lifetime,
        )
        for order_id in acme_store.orders_authorized_with(conn, authorization.id):
            acme_store.update_order(conn, order_id, now, status="ready", expected_status="pending")

    def _failed(
        self,
        conn: Connection,
        challenge: ChallengeRecord,
        authorization: AuthorizationRecord,
        error: AcmeProblem,
        now: datetime,
    ) -> None:
        if not acme_store.update_challenge(
            conn,
            challenge.id,
            now,
            status="invalid",
            expected_status="processing",
            error=error.to_json(),
        ):
            return
        acme_store.update_authorization(
            conn, authorization.id, now, status="invalid", expected_status="pending"
        )
        acme_store.add_to_window(
            conn,
            self.name,
            "failures",
            f"{authorization.identifier_type}:{authorization.identifier_value}",
            timedelta(hours=1),
            now,
        )
        for order_id in acme_store.orders_using_authorization(conn, authorization.id):
            acme_store.update_order(
                conn,
                order_id,
                now,
                status="invalid",
                expected_status="pending",
                error=AcmeProblem(
                    error.type,
                    f"validation of {authorization.identifier_value} failed: {error.detail}",
                ).to_json(),
            )

    # -- finalize ------------------------------------------------------------------------

    def check_csr(
        self, order: OrderRecord, csr: x509.CertificateSigningRequest, account: AccountRecord
    ) -> tuple[x509.Name, tuple[x509.GeneralName, ...]]:
        """The subject and names the certificate will carry, after checking that the CSR
        (parsed and its self-signature verified by the core's ``parse_csr``) asks for
        exactly the order's identifiers (RFC 8555 7.4) and nothing else."""
        wanted = {(t, v) for t, v in order.identifiers}
        asked: set[tuple[str, str]] = set()
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            san = x509.SubjectAlternativeName([])
        except ValueError as exc:
            raise AcmeProblem("badCSR", f"the CSR's extensions cannot be read: {exc}") from None
        for name in san:
            if isinstance(name, x509.DNSName):
                asked.add(("dns", name.value.lower()))
            elif isinstance(name, x509.IPAddress):
                asked.add(("ip", name.value.compressed))
            else:
                raise AcmeProblem(
                    "badCSR", f"the CSR asks for a {type(name).__name__}; only DNS names and IPs"
                )
        common_names = [
            str(a.value) for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ]
        for cn in common_names:
            lowered = cn.lower()
            if ("dns", lowered) not in wanted and ("ip", lowered) not in wanted:
                raise AcmeProblem(
                    "badCSR", f"the CSR's common name {cn[:64]!r} is not in the order"
                )
        if not asked and common_names:
            asked = {
                ("dns", cn.lower()) if ("dns", cn.lower()) in wanted else ("ip", cn)
                for cn in common_names
            }
        if asked != wanted:
            extra = sorted(v for _, v in asked - wanted)
            missing = sorted(v for _, v in wanted - asked)
            parts = []
            if extra:
                parts.append(f"names not in the order: {', '.join(extra[:5])}")
            if missing:
                parts.append(f"order identifiers missing: {', '.join(missing[:5])}")
            raise AcmeProblem("badCSR", "the CSR does not match the order: " + "; ".join(parts))
        account_key = _public_der_of_jwk(account.jwk)
        if account_key is not None and account_key == spki(csr.public_key()):
            raise AcmeProblem("badCSR", "the certificate key must not be the account key")
        names: list[x509.GeneralName] = []
        for kind, value in order.identifiers:
            if kind == "dns":
                names.append(x509.DNSName(value))
            else:
                names.append(x509.IPAddress(ipaddress.ip_address(value)))
        # A CN holds at most 64 characters (RFC 5280 ub-common-name): a longer name the
        # order validated is in the SANs only.
        subject_cn = common_names[0].lower() if common_names else None
        if subject_cn is not None and len(subject_cn) > 64:
            subject_cn = None
        if subject_cn is None:
            first_dns = next((v for k, v in order.identifiers if k == "dns" and len(v) <= 64), None)
            subject_cn = first_dns or next((v for k, v in order.identifiers if k == "ip"), None)
        subject = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)] if subject_cn else []
        )
        return subject, tuple(names)

    def begin_finalize(self, conn: Connection, order: OrderRecord) -> None:
        if not acme_store.update_order(
            conn, order.id, self.now(), status="processing", expected_status="ready"
        ):
            raise AcmeProblem("orderNotReady", "the order is being finalized already")

    def issue(
        self,
        view: OrderView,
        account: AccountRecord,
        csr: x509.CertificateSigningRequest,
        subject: x509.Name,
        names: tuple[x509.GeneralName, ...],
        request_id: str | None,
    ) -> OrderRecord:
        """Issue the order's certificate through the core and record the outcome; the
        order as it then is."""
        order = view.order
        profile: Profile = self.settings.profiles.get(
            order.profile or self.settings.default_profile,
            self.settings.profiles[self.settings.default_profile],
        )
        # What the core's transaction wrote, so that the order need not be read back.
        recorded: list[OrderRecord] = []

        def record(conn: Connection, issued: IssuedCertificate) -> None:
            # In the core's transaction: the order is valid exactly when its certificate
            # is stored (a crash in between leaves it "processing" with nothing issued).
            now = self.now()
            if not acme_store.update_order(
                conn,
                order.id,
                now,
                status="valid",
                expected_status="processing",
                ca_id=self.context.ca_id,
                serial=issued.serial,
            ):
                raise AcmeProblem("orderNotReady", "the order's finalization was abandoned")
            recorded[:] = [
                replace(
                    order,
                    status="valid",
                    ca_id=self.context.ca_id,
                    serial=issued.serial,
                    updated_at=now,
                )
            ]

        try:
            self.context.issue(
                csr,
                Requester(
                    f"acme-account:{account.id}",
                    self.name,
                    evidence={
                        "account": account.id,
                        "order": order.id,
                        "identifiers": ",".join(f"{t}:{v}" for t, v in order.identifiers),
                        "authorizations": ",".join(view.authorization_ids),
                        "profile": profile.name,
                    },
                    request_id=request_id,
                ),
                api_passthrough=ApiPassthrough(subject=subject, sans=names),
                correlation_id=f"acme-order:{order.id}",
                template=profile.template,
                validity=profile.validity,
                idempotency_token=f"acme-order-{order.id}",
                record_with=record,
            )
        except StoreUnavailableError:
            # Nothing was issued and the client may finalize again later: the order goes
            # back to "ready" (and if even that cannot be written, it is repaired as an
            # interrupted finalization once it is PROCESSING_STALE).
            with contextlib.suppress(StoreUnavailableError), self.core.store.write() as conn:
                acme_store.update_order(
                    conn, order.id, self.now(), status="ready", expected_status="processing"
                )
            raise
        except PkigateError as exc:
            problem = problem_for(exc)
            with self.core.store.write() as conn:
                acme_store.update_order(
                    conn,
                    order.id,
                    self.now(),
                    status="invalid",
                    expected_status="processing",
                    error=problem.to_json(),
                )
            raise problem from exc
        if recorded:
            return recorded[0]
        # The core answered with an earlier issuance under the order's idempotency token,
        # without a transaction of ours: what that one recorded is in the store.
        with self.core.store.read() as conn:
            updated = acme_store.order_by_id(conn, self.name, order.id)
        assert updated is not None
        return updated

    def certificate_of(self, conn: Connection, order: OrderRecord) -> CertificateRecord:
        if order.status != "valid" or order.ca_id is None or order.serial is None:
            raise AcmeProblem("malformed", "the order has no certificate", status=404)
        record = self.core.store.get_certificate(conn, order.ca_id, order.serial)
        if record is None:
            raise AcmeProblem("serverInternal", "the order's certificate is not in the store")
        return record

    # -- revocation ----------------------------------------------------------------------

    def locate_certificate(
        self, conn: Connection, certificate: x509.Certificate
    ) -> CertificateRecord:
        serial = format(certificate.serial_number, "x")
        record = self.core.store.get_certificate(conn, self.context.ca_id, serial)
        der = certificate.public_bytes(serialization.Encoding.DER)
        if record is None or record.der != der:
            raise AcmeProblem("malformed", "this CA did not issue that certificate", status=404)
        return record

    def may_revoke(
        self, conn: Connection, account: AccountRecord, record: CertificateRecord
    ) -> bool:
        """The account that ordered the certificate, or one holding valid authorizations for
        every name in it (RFC 8555 7.6)."""
        order = acme_store.order_for_certificate(conn, record.ca_id, record.serial)
        if order is not None and order.account_id == account.id:
            return True
        certificate = x509.load_der_x509_certificate(record.der)
        try:
            san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except (x509.ExtensionNotFound, *UNREADABLE):
            return False
        if any(not isinstance(n, x509.DNSName | x509.IPAddress) for n in san):
            return False  # names no ACME account can hold an authorization for
        names: list[tuple[str, str]] = [
            ("dns", n.lower()) for n in san.get_values_for_type(x509.DNSName)
        ]
        names += [("ip", a.compressed) for a in san.get_values_for_type(x509.IPAddress)]
        try:
            common_names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        except UNREADABLE:
            return False
        for cn in common_names:
            value = str(cn.value).lower()
            if ("dns", value) not in names and ("ip", value) not in names:
                return False  # a subject name the SANs do not cover
        if not names:
            return False
        now = self.now()
        for kind, value in names:
            base = value[2:] if value.startswith("*.") else value
            if not acme_store.authorizations_of_account_for(conn, account.id, kind, base, now):
                return False
        return True

    def revoke(self, record: CertificateRecord, reason_code: int, actor: Actor) -> None:
        reason = CLIENT_REASONS.get(reason_code)
        if reason is None:
            raise AcmeProblem(
                "badRevocationReason",
                f"reason {reason_code} is not accepted; use one of {sorted(CLIENT_REASONS)}",
            )
        if record.status == "REVOKED":
            raise AcmeProblem("alreadyRevoked", f"certificate {record.serial} is already revoked")
        try:
            self.core.revocation.revoke(record.ca_id, record.serial, reason, actor)
        except ConflictError:
            raise AcmeProblem(
                "alreadyRevoked", f"certificate {record.serial} is already revoked"
            ) from None

    # -- renewal information ---------------------------------------------------------------

    def certificate_by_cert_id(self, conn: Connection, text: str) -> CertificateRecord:
        parsed = parse_cert_id(text)
        ca = self.core.authorities.get(self.context.ca_id)
        if ca.certificate_der is None:
            raise AcmeProblem("malformed", "unknown certificate", status=404)
        ca_cert = x509.load_der_x509_certificate(ca.certificate_der)
        try:
            ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        except x509.ExtensionNotFound:
            ski = b""
        record = self.core.store.get_certificate(conn, self.context.ca_id, parsed.serial_hex)
        if ski != parsed.key_identifier or record is None:
            raise AcmeProblem(
                "malformed", "this CA issued no certificate with that certID", status=404
            )
        return record

    def renewal_info(self, conn: Connection, text: str) -> RenewalWindow:
        record = self.certificate_by_cert_id(conn, text)
        return suggested_window(
            record.not_before, record.not_after, record.status == "REVOKED", self.now()
        )

    # -- housekeeping ----------------------------------------------------------------------

    def maintenance(self) -> None:
        """Forget rate-limit windows long over."""
        now = self.now()
        with self.core.store.write() as conn:
            counters = acme_store.purge_rate_counters(conn, now - timedelta(days=1))
        log.info("ACME maintenance", extra={"connector": self.name, "counters": counters})


def problem_for(exc: PkigateError) -> AcmeProblem:
    """The core's typed errors as ACME problems: the one place that mapping lives."""
    if isinstance(exc, StoreUnavailableError):
        # RFC 8555 6.6 / 6.7: a server error the client may retry, after Retry-After.
        return AcmeProblem(
            "serverInternal",
            f"temporarily unavailable: {exc.message}",
            status=503,
            retry_after=exc.retry_after_seconds,
        )
    if isinstance(exc, (BadCSRError, WeakKeyError, UnsupportedAlgorithmError)):
        return AcmeProblem("badCSR", exc.message)
    if isinstance(exc, PolicyViolationError):
        return AcmeProblem("rejectedIdentifier", exc.message)
    if isinstance(exc, NotFoundError):
        return AcmeProblem("serverInternal", exc.message)
    return AcmeProblem("serverInternal", f"the CA cannot issue now: {exc.message}", status=503)


def spki(key: CertificateIssuerPublicKeyTypes | Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _public_der_of_jwk(jwk: Mapping[str, Any]) -> bytes | None:
    try:
        return spki(public_key_from_jwk(jwk))
    except AcmeProblem:
        return None


def _replace_status(order: OrderRecord, status: str) -> OrderRecord:
    return replace(order, status=status)


def _replace_authz_status(record: AuthorizationRecord, status: str) -> AuthorizationRecord:
    return replace(record, status=status)
