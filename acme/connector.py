"""The ACME connector (RFC 8555 with RFC 8738 IP identifiers, RFC 9773 renewal information
and profiles): HTTP routes, the JWS request pipeline, and JSON rendering.

Every POST goes through :meth:`AcmeConnector._pipeline`: media type and size, JWS syntax
(:mod:`pkigate.acme.jws`), the ``url`` header against the request URL, the nonce, the
signing key (``jwk`` only where RFC 8555 allows it, else the account named by ``kid``),
the signature, then the nonce is spent (:mod:`pkigate.acme.nonces`), and only then the
resource's handler runs: a replayed request fails before it changes anything, and a
request that only reads (POST-as-GET) takes no write transaction in the store.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flask import Blueprint, Response, jsonify, request
from sqlalchemy import Connection

from pkigate.acme import jws
from pkigate.acme.identifiers import IdentifierPolicy, parse_identifiers
from pkigate.acme.nonces import Nonces, NonceTicket, Spend, nonce_book
from pkigate.acme.problems import AcmeProblem
from pkigate.acme.renewal import stamp
from pkigate.acme.service import (
    VALIDATE_JOB,
    AcmeService,
    AuthorizationView,
    OrderView,
    problem_for,
    spki,
)
from pkigate.acme.settings import AcmeSettings
from pkigate.core import Actor
from pkigate.core.errors import (
    BadCSRError,
    BadRequestError,
    NotFoundError,
    StoreUnavailableError,
)
from pkigate.core.issuance import parse_csr
from pkigate.core.keys import KeyEncryptionKey
from pkigate.core.store import acme as acme_store
from pkigate.core.store.acme import (
    AccountRecord,
    ChallengeRecord,
    EabKeyRecord,
)
from pkigate.gateways.connectors import Connector, ConnectorContext, OfflineCore
from pkigate.gateways.http import actor, json_body, requires
from pkigate.gateways.roles import Permission

log = logging.getLogger("pkigate.acme")

JOSE = "application/jose+json"
PROBLEM = "application/problem+json"
PEM_CHAIN = "application/pem-certificate-chain"
MAX_CONTACTS = 10
MAX_CONTACT_CHARS = 320
EAB_KEY_BYTES = 32
ACCOUNT_KEY_CACHE = 4096  # decoded account keys kept per process
DRAIN_LIMIT = 8 * 1024 * 1024  # how much of an oversized body is read before answering


def _problem_json(problem: AcmeProblem) -> str:
    """The problem document a client reads (fields for this server's use start with _)."""
    return json.dumps({k: v for k, v in problem.to_json().items() if not k.startswith("_")})


@dataclass
class AcmeRequest:
    """A verified JWS request, handed to a resource handler."""

    parsed: jws.ParsedJWS
    account: AccountRecord | None
    nonce: NonceTicket
    extra_headers: dict[str, str] = field(default_factory=dict)

    def payload(self) -> dict[str, Any]:
        return self.parsed.json_payload()


class AcmeConnector(Connector):
    """ACME for servers, load balancers and Kubernetes clusters."""

    type_name = "acme"
    listener = "https"
    default_template = "EndEntityServerAuthCertificate_APIPassthrough/V1"
    default_validity = "90d"

    def __init__(self, context: ConnectorContext, settings: Mapping[str, Any]) -> None:
        super().__init__(context, settings)
        self.options = AcmeSettings.parse(settings, context)
        kek: KeyEncryptionKey = context.core.kek
        store = context.core.store
        self.nonces = Nonces(kek, store, nonce_book(store, context.core.data_dir))
        self._eab_seal = _EabSealer(kek)
        self.service = AcmeService(context, self.options, self._eab_seal.unseal)
        self._issuer_cache: dict[str, tuple[float, _Issuer]] = {}
        self._account_keys: dict[str, jws.PublicKey] = {}

    # -- contract ------------------------------------------------------------------------

    @classmethod
    def check_settings(
        cls, settings: Mapping[str, Any], context: ConnectorContext, offline: OfflineCore
    ) -> None:
        AcmeSettings.parse(settings, context)

    def startup_notes(self) -> list[str]:
        notes = [f"ACME directory {self.url('/directory')}"]
        if self.options.external_account_required:
            notes.append("external account binding required: create keys with `pkigate acme eab`")
        if self.options.identifier_policy.unrestricted:
            notes.append("any DNS name or IP address that passes its challenge is accepted")
        return notes

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "directory": self.url("/directory")}

    def job_handlers(self) -> Mapping[str, Callable[[dict[str, Any]], None]]:
        return {VALIDATE_JOB: self.service.run_validation}

    def start(self) -> None:
        self.nonces.start()

    def maintenance(self) -> None:
        spent = self.nonces.purge(self.context.core.clock())
        log.info("ACME spent nonces purged", extra={"connector": self.context.name, "count": spent})
        self.service.maintenance()

    def url(self, path: str) -> str:
        return self.context.url + path

    # -- routes --------------------------------------------------------------------------

    def blueprint(self) -> Blueprint:
        bp = Blueprint(f"acme_{self.context.name}", __name__)
        bp.add_url_rule("/directory", "directory", self._directory, methods=["GET"])
        bp.add_url_rule("/new-nonce", "new_nonce", self._new_nonce, methods=["HEAD", "GET"])
        posts: dict[str, Callable[..., Response]] = {
            "/new-account": self._new_account,
            "/new-order": self._new_order,
            "/revoke-cert": self._revoke_cert,
            "/key-change": self._key_change,
            "/acct/<account_id>": self._account,
            "/acct/<account_id>/orders": self._orders,
            "/acct/<account_id>/orders/<cursor>": self._orders,
            "/order/<order_id>": self._order,
            "/order/<order_id>/finalize": self._finalize,
            "/authz/<authz_id>": self._authorization,
            "/chall/<challenge_id>": self._challenge,
            "/cert/<order_id>": self._certificate,
            "/cert/<order_id>/<int:alternate>": self._certificate,
        }
        for index, (path, handler) in enumerate(posts.items()):
            bp.add_url_rule(path, f"post_{index}", self._pipeline(handler), methods=["POST"])
        bp.add_url_rule(
            "/renewal-info/<anytext:cert_id>",
            "renewal_info",
            self._renewal_info,
            methods=["GET"],
            merge_slashes=False,
        )
        # Routing errors never reach a blueprint's error handlers: other methods on these
        # resources and unknown paths under the mount get their ACME problem from routes.
        allowed = {
            "/directory": ["GET"],
            "/new-nonce": ["HEAD", "GET"],
            "/renewal-info/<anytext:cert_id>": ["GET"],
            **{path: ["POST"] for path in posts},
        }
        for index, (path, methods) in enumerate(allowed.items()):
            others = [m for m in ("GET", "POST", "PUT", "PATCH", "DELETE") if m not in methods]
            bp.add_url_rule(
                path,
                f"not_allowed_{index}",
                self._not_allowed(methods),
                methods=others,
                merge_slashes=False,
            )
        every = ["GET", "POST", "PUT", "PATCH", "DELETE"]
        bp.add_url_rule("/", "unknown_root", self._unknown, methods=every)
        bp.add_url_rule(
            "/<anytext:anything>", "unknown", self._unknown, methods=every, merge_slashes=False
        )

        @bp.errorhandler(413)
        def too_large(_error: Exception) -> Response:
            return self._problem(
                AcmeProblem("malformed", "the request body is too large", status=413)
            )

        return bp

    def admin_blueprint(self) -> Blueprint:
        bp = Blueprint(f"acme_admin_{self.context.name}", __name__)

        @bp.post("/eab-keys")
        @requires(Permission.MANAGE_EAB)
        def create_eab_key() -> tuple[Response, int]:
            body = json_body({"label": str, "allowed_identifiers": dict, "default_profile": str})
            try:
                policy = IdentifierPolicy.parse(
                    body.get("allowed_identifiers"), "allowed_identifiers"
                )
            except ValueError as exc:
                raise BadRequestError(str(exc)) from None
            profile = body.get("default_profile")
            if profile is not None and profile not in self.options.profiles:
                raise BadRequestError(
                    f"no profile {profile!r}; offered: {', '.join(self.options.profiles)}"
                )
            label = body.get("label")
            if label is not None and len(label) > 256:
                raise BadRequestError("label is at most 256 characters")
            record, secret = self.create_eab_key(
                actor(),
                label=label,
                allowed=None if body.get("allowed_identifiers") is None else policy.to_json(),
                default_profile=profile,
            )
            return jsonify({**record.to_json(), "hmac_key": secret}), 201

        @bp.get("/eab-keys")
        @requires(Permission.READ_EAB)
        def list_eab_keys() -> Response:
            with self.context.core.store.read() as conn:
                return jsonify([k.to_json() for k in acme_store.eab_keys(conn, self.context.name)])

        @bp.delete("/eab-keys/<kid>")
        @requires(Permission.MANAGE_EAB)
        def revoke_eab_key(kid: str) -> Response:
            return jsonify(self.revoke_eab_key(actor(), kid).to_json())

        return bp

    # -- EAB keys --------------------------------------------------------------------------

    def create_eab_key(
        self,
        who: Actor,
        *,
        label: str | None,
        allowed: dict[str, Any] | None,
        default_profile: str | None,
    ) -> tuple[EabKeyRecord, str]:
        """A new EAB key id and its HMAC key (base64url), shown once."""
        secret = _random_bytes(EAB_KEY_BYTES)
        now = self.context.core.clock()
        kid = "kid-" + base64.urlsafe_b64encode(_random_bytes(12)).decode()
        record = EabKeyRecord(
            id=kid,
            connector=self.context.name,
            sealed_key=self._eab_seal.seal(kid, secret),
            label=label,
            allowed_identifiers=allowed,
            default_profile=default_profile,
            created_at=now,
            created_by=who.principal,
            account_id=None,
            bound_at=None,
            revoked_at=None,
        )
        with self.context.core.store.write() as conn:
            acme_store.insert_eab_key(conn, record)
            self.context.core.audit.record(
                conn,
                who,
                "acme.eab_key.create",
                f"connector/{self.context.name}/eab-key/{kid}",
                at=now,
                parameters={
                    "label": label,
                    "allowed_identifiers": allowed,
                    "profile": default_profile,
                },
            )
        return record, jws.b64url_encode(secret)

    def revoke_eab_key(self, who: Actor, kid: str) -> EabKeyRecord:
        now = self.context.core.clock()
        with self.context.core.store.write() as conn:
            if not acme_store.revoke_eab_key(conn, self.context.name, kid, now):
                raise NotFoundError(f"no unrevoked EAB key {kid}")
            self.context.core.audit.record(
                conn,
                who,
                "acme.eab_key.revoke",
                f"connector/{self.context.name}/eab-key/{kid}",
                at=now,
            )
            record = acme_store.eab_key(conn, self.context.name, kid)
        assert record is not None
        return record

    # -- responses -------------------------------------------------------------------------

    def _headers(self, response: Response) -> Response:
        response.headers["Replay-Nonce"] = self.nonces.mint(self.context.core.clock())
        response.headers.add("Link", f'<{self.url("/directory")}>;rel="index"')
        return response

    def _json(
        self,
        body: Any,
        status: int = 200,
        location: str | None = None,
        links: tuple[tuple[str, str], ...] = (),
        retry_after: int | None = None,
    ) -> Response:
        response = Response(json.dumps(body), status=status, content_type="application/json")
        if location is not None:
            response.headers["Location"] = location
        for url, rel in links:
            response.headers.add("Link", f'<{url}>;rel="{rel}"')
        if retry_after is not None:
            response.headers["Retry-After"] = str(retry_after)
        return self._headers(response)

    def _not_allowed(self, methods: list[str]) -> Callable[..., Response]:
        def view(**_arguments: Any) -> Response:
            response = self._problem(
                AcmeProblem("malformed", f"{request.method} is not allowed here", status=405)
            )
            response.headers["Allow"] = ", ".join(methods)
            return response

        return view

    def _unknown(self, **_arguments: Any) -> Response:
        return self._problem(AcmeProblem("malformed", "no such resource", status=404))

    def refusal_body(self, status: int, message: str) -> tuple[str, bytes] | None:
        """An RFC 8555 problem document: a client reads the type, whatever the status."""
        problem = AcmeProblem("malformed", message, status=status)
        return PROBLEM, _problem_json(problem).encode()

    def _problem(self, problem: AcmeProblem) -> Response:
        response = Response(
            _problem_json(problem), status=problem.http_status, content_type=PROBLEM
        )
        if problem.retry_after is not None:
            response.headers["Retry-After"] = str(problem.retry_after)
        holder = problem.extra.get("_location_account")
        if holder:
            response.headers["Location"] = self.url(f"/acct/{holder}")
        return self._headers(response)

    # -- unauthenticated resources ---------------------------------------------------------

    def _directory(self) -> Response:
        meta: dict[str, Any] = {
            "externalAccountRequired": self.options.external_account_required,
            "profiles": {p.name: p.description for p in self.options.profiles.values()},
        }
        if self.options.terms_of_service:
            meta["termsOfService"] = self.options.terms_of_service
        if self.options.website:
            meta["website"] = self.options.website
        if self.options.caa_identities:
            meta["caaIdentities"] = list(self.options.caa_identities)
        body = {
            "newNonce": self.url("/new-nonce"),
            "newAccount": self.url("/new-account"),
            "newOrder": self.url("/new-order"),
            "revokeCert": self.url("/revoke-cert"),
            "keyChange": self.url("/key-change"),
            "renewalInfo": self.url("/renewal-info"),
            "meta": meta,
        }
        return self._headers(Response(json.dumps(body), content_type="application/json"))

    def _new_nonce(self) -> Response:
        response = Response(status=200 if request.method == "HEAD" else 204)
        response.headers["Cache-Control"] = "no-store"
        return self._headers(response)

    def _renewal_info(self, cert_id: str) -> Response:
        try:
            with self.context.core.store.read() as conn:
                window = self.service.renewal_info(conn, cert_id)
        except AcmeProblem as problem:
            return self._problem(problem)
        return self._json(
            window.to_json(), retry_after=int(self.options.ari_retry_after.total_seconds())
        )

    # -- the POST pipeline -----------------------------------------------------------------

    def _pipeline(self, handler: Callable[..., Response]) -> Callable[..., Response]:
        uses_jwk = handler in (self._new_account, self._revoke_cert)
        jwk_required = handler == self._new_account

        def view(**kwargs: Any) -> Response:
            try:
                acme_request = self._authenticate(uses_jwk, jwk_required)
                self._spend(acme_request)
                return handler(acme_request, **kwargs)
            except StoreUnavailableError as exc:
                log.warning(
                    "ACME request refused: %s",
                    exc.message,
                    extra={"connector": self.context.name, "path": request.path},
                )
                return self._problem(problem_for(exc))
            except AcmeProblem as problem:
                if problem.http_status >= 500:
                    log.error("ACME request failed: %s", problem.detail)
                else:
                    log.info(
                        "ACME request refused",
                        extra={
                            "connector": self.context.name,
                            "path": request.path,
                            "problem": problem.type,
                            "detail": problem.detail[:300],
                        },
                    )
                return self._problem(problem)

        view.__name__ = handler.__name__
        return view

    def _authenticate(self, uses_jwk: bool, jwk_required: bool) -> AcmeRequest:
        body = _read_body()
        content_type = (request.mimetype or "").lower()
        if content_type != JOSE:
            raise AcmeProblem(
                "malformed", f"requests must be {JOSE}, not {content_type or 'untyped'}", status=415
            )
        parsed = jws.parse_jws(body)
        expected_url = self.context.base_url + request.path
        if request.query_string:
            # RFC 8555 6.4: the whole URL is signed, so a query the client did not sign
            # (added or changed on the way) makes it another request.
            expected_url += "?" + request.query_string.decode("latin-1")
        if parsed.url != expected_url:
            raise AcmeProblem(
                "unauthorized",
                f"the JWS 'url' header {str(parsed.url)[:200]!r} is not this request's URL "
                f"{expected_url!r}",
            )
        if not parsed.nonce:
            raise AcmeProblem("badNonce", "the JWS carries no nonce")
        now = self.context.core.clock()
        ticket = self.nonces.open(parsed.nonce, now)
        if ticket is None:
            raise AcmeProblem("badNonce", "the nonce is unknown or expired; use the new one")
        account: AccountRecord | None = None
        if parsed.jwk is not None:
            if not uses_jwk:
                raise AcmeProblem("malformed", "this resource takes a 'kid', not a 'jwk'")
            key = jws.public_key_from_jwk(parsed.jwk)
        else:
            if jwk_required:
                raise AcmeProblem("malformed", "newAccount requests carry the account key as 'jwk'")
            account = self._account_for_kid(parsed.kid or "")
            key = self._account_key(account)
        jws.verify(parsed, key)
        return AcmeRequest(parsed, account, ticket)

    def _account_key(self, account: AccountRecord) -> jws.PublicKey:
        """The account's public key, decoded from its JWK once per key (by thumbprint)."""
        key = self._account_keys.get(account.thumbprint)
        if key is None:
            key = jws.public_key_from_jwk(account.jwk)
            if len(self._account_keys) >= ACCOUNT_KEY_CACHE:
                self._account_keys.clear()
            self._account_keys[account.thumbprint] = key
        return key

    def _account_for_kid(self, kid: str) -> AccountRecord:
        prefix = self.url("/acct/")
        if not kid.startswith(prefix):
            raise AcmeProblem(
                "accountDoesNotExist", "the 'kid' is not an account URL of this server"
            )
        # Every request but newAccount's: one SELECT, without a transaction around it.
        account = self.service.find_account_alone(kid.removeprefix(prefix))
        if account is None:
            raise AcmeProblem("accountDoesNotExist", "no account with that 'kid'")
        if account.status != "valid":
            raise AcmeProblem("unauthorized", f"the account is {account.status}")
        return account

    def _spend(self, acme_request: AcmeRequest) -> None:
        """Spend the request's nonce, whatever the handler then makes of the request (a
        replayed read is refused like any replay)."""
        spent = self.nonces.spend(acme_request.nonce)
        if spent is Spend.REPLAYED:
            raise AcmeProblem("badNonce", "the nonce was used before; use the new one")
        if spent is Spend.STALE:
            raise AcmeProblem(
                "badNonce", "the nonce is from before the service restarted; use the new one"
            )

    def _transaction(self, *, writes: bool) -> AbstractContextManager[Connection]:
        store = self.context.core.store
        return store.write() if writes else store.read()

    def _require_account(self, acme_request: AcmeRequest) -> AccountRecord:
        if acme_request.account is None:
            raise AcmeProblem("malformed", "this request must be signed by an account key ('kid')")
        return acme_request.account

    # -- accounts --------------------------------------------------------------------------

    def _new_account(self, acme_request: AcmeRequest) -> Response:
        parsed = acme_request.parsed
        assert parsed.jwk is not None
        payload = acme_request.payload()
        thumbprint = jws.jwk_thumbprint(parsed.jwk)
        only_existing = payload.get("onlyReturnExisting", False)
        if not isinstance(only_existing, bool):
            raise AcmeProblem("malformed", "onlyReturnExisting must be a boolean")
        with self.context.core.store.write() as conn:
            existing = self.service.account_by_key(conn, thumbprint)
            if existing is not None:
                return self._json(
                    self._account_json(existing), 200, location=self.url(f"/acct/{existing.id}")
                )
            if only_existing:
                raise AcmeProblem("accountDoesNotExist", "no account has this key")
            contact = _contacts(payload.get("contact", []))
            if self.options.terms_of_service and payload.get("termsOfServiceAgreed") is not True:
                raise AcmeProblem(
                    "userActionRequired",
                    f"agree to the terms of service at {self.options.terms_of_service}",
                    extra={"instance": self.options.terms_of_service},
                )
            binding = payload.get("externalAccountBinding")
            eab_key_id: str | None = None
            if binding is not None:
                if not isinstance(binding, dict):
                    raise AcmeProblem("malformed", "externalAccountBinding must be a JWS object")
                eab_key_id = jws.verify_eab(
                    binding,
                    outer_jwk=parsed.jwk,
                    url=self.url("/new-account"),
                    lookup=lambda kid: self.service.eab_hmac_key(conn, kid),
                )
            elif self.options.external_account_required:
                raise AcmeProblem(
                    "externalAccountRequired", "this server requires an external account binding"
                )
            account = self.service.create_account(conn, parsed.jwk, thumbprint, contact, eab_key_id)
        log.info(
            "ACME account created", extra={"connector": self.context.name, "account": account.id}
        )
        return self._json(
            self._account_json(account), 201, location=self.url(f"/acct/{account.id}")
        )

    def _account(self, acme_request: AcmeRequest, account_id: str) -> Response:
        account = self._require_account(acme_request)
        if account.id != account_id:
            raise AcmeProblem("unauthorized", "the request is signed by another account's key")
        parsed = acme_request.parsed
        with self._transaction(writes=not parsed.is_post_as_get) as conn:
            if parsed.is_post_as_get:
                current = account
            else:
                payload = parsed.json_payload()
                status = payload.get("status")
                if status is not None and status != "deactivated":
                    raise AcmeProblem(
                        "malformed", "an account's status can only become 'deactivated'"
                    )
                contact = None
                if "contact" in payload:
                    contact = _contacts(payload["contact"])
                current = self.service.update_account(
                    conn, account, contact=contact, deactivate=status == "deactivated"
                )
        return self._json(self._account_json(current), location=self.url(f"/acct/{account.id}"))

    def _key_change(self, acme_request: AcmeRequest) -> Response:
        account = self._require_account(acme_request)
        inner = jws.parse_jws(acme_request.parsed.payload)
        if inner.jwk is None or inner.kid is not None:
            raise AcmeProblem("malformed", "the inner JWS carries the new key as 'jwk'")
        if inner.nonce is not None:
            raise AcmeProblem("malformed", "the inner JWS must not carry a nonce")
        if inner.url != acme_request.parsed.url:
            raise AcmeProblem("malformed", "the inner JWS 'url' differs from the outer one")
        new_key = jws.public_key_from_jwk(inner.jwk)
        jws.verify(inner, new_key)
        payload = inner.json_payload()
        if payload.get("account") != self.url(f"/acct/{account.id}"):
            raise AcmeProblem("malformed", "the inner payload's 'account' is not the signer's")
        old_key = payload.get("oldKey")
        if not isinstance(old_key, dict) or jws.jwk_thumbprint(old_key) != account.thumbprint:
            raise AcmeProblem("malformed", "the inner payload's 'oldKey' is not the account key")
        with self.context.core.store.write() as conn:
            self.service.change_key(conn, account, inner.jwk, jws.jwk_thumbprint(inner.jwk))
            current = self.service.find_account(conn, account.id)
        assert current is not None
        return self._json(self._account_json(current), location=self.url(f"/acct/{account.id}"))

    def _orders(
        self, acme_request: AcmeRequest, account_id: str, cursor: str | None = None
    ) -> Response:
        account = self._require_account(acme_request)
        if account.id != account_id:
            raise AcmeProblem("unauthorized", "these are another account's orders")
        _require_post_as_get(acme_request, "the orders list")
        with self.context.core.store.read() as conn:
            orders, following = self.service.orders_page(conn, account, cursor)
        links: tuple[tuple[str, str], ...] = ()
        if following is not None:
            links = ((self.url(f"/acct/{account.id}/orders/{following}"), "next"),)
        return self._json({"orders": [self.url(f"/order/{o.id}") for o in orders]}, links=links)

    def _account_json(self, account: AccountRecord) -> dict[str, Any]:
        body: dict[str, Any] = {
            "status": account.status,
            "contact": list(account.contact),
            "orders": self.url(f"/acct/{account.id}/orders"),
            "key": account.jwk,
            "createdAt": stamp(account.created_at),
        }
        if account.eab_key_id is not None:
            body["externalAccountBinding"] = {"kid": account.eab_key_id}
        return body

    # -- orders ----------------------------------------------------------------------------

    def _new_order(self, acme_request: AcmeRequest) -> Response:
        account = self._require_account(acme_request)
        payload = acme_request.payload()
        unknown = set(payload) - {"identifiers", "notBefore", "notAfter", "profile", "replaces"}
        if unknown:
            raise AcmeProblem("malformed", f"unknown order field {sorted(unknown)[0]!r}")
        if payload.get("notBefore") is not None or payload.get("notAfter") is not None:
            raise AcmeProblem(
                "malformed", "notBefore and notAfter are set by the profile; choose a profile"
            )
        identifiers = parse_identifiers(payload.get("identifiers"))
        profile = payload.get("profile")
        if profile is not None and not isinstance(profile, str):
            raise AcmeProblem("malformed", "'profile' must be a string")
        replaces = payload.get("replaces")
        if replaces is not None and not isinstance(replaces, str):
            raise AcmeProblem("malformed", "'replaces' must be a certID string")
        with self.context.core.store.write() as conn:
            view = self.service.new_order(conn, account, identifiers, profile, replaces)
            body = self._order_json(view)
        return self._json(body, 201, location=self.url(f"/order/{view.order.id}"))

    def _order(self, acme_request: AcmeRequest, order_id: str) -> Response:
        account = self._require_account(acme_request)
        _require_post_as_get(acme_request, "an order")
        view = self.service.order_alone(account, order_id)
        if self.service.interrupted(view.order):
            with self.context.core.store.write() as conn:
                view = self.service.order(conn, account, order_id, repair=True)
        body = self._order_json(view)
        retry = 1 if view.order.status == "processing" else None
        if view.order.status == "pending":
            retry = 1
        return self._json(body, location=self.url(f"/order/{order_id}"), retry_after=retry)

    def _finalize(self, acme_request: AcmeRequest, order_id: str) -> Response:
        account = self._require_account(acme_request)
        payload = acme_request.payload()
        csr_text = payload.get("csr")
        if not isinstance(csr_text, str):
            raise AcmeProblem("malformed", "finalize needs 'csr': the base64url DER of a PKCS#10")
        try:
            # The core's parsing and self-signature check: its typed refusals cover what
            # cryptography raises for odd keys and version fields, not only ValueError.
            csr = parse_csr(jws.b64url_decode(csr_text))
        except BadCSRError as exc:
            raise AcmeProblem("badCSR", f"the CSR: {exc.message}") from None
        with self.context.core.store.write() as conn:
            view = self.service.order(conn, account, order_id, repair=True)
            order = view.order
            if order.status != "ready":
                raise AcmeProblem(
                    "orderNotReady", f"the order is {order.status}, not ready for finalization"
                )
            subject, names = self.service.check_csr(order, csr, account)
            self.service.begin_finalize(conn, order)
        issued = self.service.issue(
            view, account, csr, subject, names, request.headers.get("X-Request-Id")
        )
        body = self._order_json(OrderView(issued, view.authorization_ids))
        return self._json(body, location=self.url(f"/order/{order_id}"))

    def _order_json(self, view: OrderView) -> dict[str, Any]:
        order = view.order
        body: dict[str, Any] = {
            "status": order.status,
            "expires": stamp(order.expires_at),
            "identifiers": [{"type": t, "value": v} for t, v in order.identifiers],
            "authorizations": [self.url(f"/authz/{a}") for a in view.authorization_ids],
            "finalize": self.url(f"/order/{order.id}/finalize"),
        }
        if order.profile:
            body["profile"] = order.profile
        if order.replaces:
            body["replaces"] = order.replaces
        if order.error:
            body["error"] = order.error
        if order.status == "valid":
            body["certificate"] = self.url(f"/cert/{order.id}")
        return body

    # -- authorizations and challenges -----------------------------------------------------

    def _authorization(self, acme_request: AcmeRequest, authz_id: str) -> Response:
        account = self._require_account(acme_request)
        parsed = acme_request.parsed
        if parsed.is_post_as_get:
            view = self.service.authorization_alone(account, authz_id)
        else:
            if parsed.json_payload() != {"status": "deactivated"}:
                raise AcmeProblem(
                    "malformed", 'an authorization update is {"status": "deactivated"}'
                )
            with self.context.core.store.write() as conn:
                view = self.service.deactivate_authorization(conn, account, authz_id)
        body = self._authorization_json(view)
        retry = 1 if view.authorization.status == "pending" else None
        return self._json(body, retry_after=retry)

    def _authorization_json(self, view: AuthorizationView) -> dict[str, Any]:
        authz = view.authorization
        body: dict[str, Any] = {
            "identifier": {"type": authz.identifier_type, "value": authz.identifier_value},
            "status": authz.status,
            "expires": stamp(authz.expires_at),
            "challenges": [self._challenge_json(c) for c in view.challenges],
        }
        if authz.wildcard:
            body["wildcard"] = True
        return body

    def _challenge_json(self, challenge: ChallengeRecord) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": challenge.type,
            "url": self.url(f"/chall/{challenge.id}"),
            "status": challenge.status,
            "token": challenge.token,
        }
        if challenge.validated_at is not None:
            body["validated"] = stamp(challenge.validated_at)
        if challenge.error is not None:
            body["error"] = challenge.error
        if challenge.validation_record is not None:
            body["validationRecord"] = challenge.validation_record
        return body

    def _challenge(self, acme_request: AcmeRequest, challenge_id: str) -> Response:
        account = self._require_account(acme_request)
        parsed = acme_request.parsed
        queued = False
        with self._transaction(writes=not parsed.is_post_as_get) as conn:
            if parsed.is_post_as_get:
                challenge, authorization = self.service.challenge(conn, account, challenge_id)
            else:
                if parsed.json_payload() != {}:
                    raise AcmeProblem("malformed", "a challenge response is the empty object {}")
                challenge, authorization, queued = self.service.start_challenge(
                    conn, account, challenge_id
                )
        if queued:
            self.context.core.jobs.notify(self.service.validation_kind)
        return self._json(
            self._challenge_json(challenge),
            links=((self.url(f"/authz/{authorization.id}"), "up"),),
            retry_after=1 if challenge.status == "processing" else None,
        )

    # -- certificates and revocation -------------------------------------------------------

    def _certificate(
        self, acme_request: AcmeRequest, order_id: str, alternate: int = 0
    ) -> Response:
        account = self._require_account(acme_request)
        _require_post_as_get(acme_request, "a certificate")
        chains = self.options.alternate_chains
        if not 0 <= alternate <= len(chains):
            raise AcmeProblem("malformed", "no such alternate chain", status=404)
        with self.context.core.store.read() as conn:
            view = self.service.order(conn, account, order_id)
            record = self.service.certificate_of(conn, view.order)
        leaf = x509.load_der_x509_certificate(record.der).public_bytes(serialization.Encoding.PEM)
        issuer = self._issuer(record.ca_id)
        if alternate == 0:
            chain = issuer.chain_pem
        else:
            chain = "".join(
                c.public_bytes(serialization.Encoding.PEM).decode() for c in chains[alternate - 1]
            )
        response = Response(leaf.decode() + chain, content_type=PEM_CHAIN)
        response.headers.add("Link", f'<{issuer.certificate_url}>;rel="up"')
        for index in range(len(chains) + 1):
            if index != alternate:
                suffix = "" if index == 0 else f"/{index}"
                response.headers.add(
                    "Link", f'<{self.url(f"/cert/{order_id}{suffix}")}>;rel="alternate"'
                )
        return self._headers(response)

    def _issuer(self, ca_id: str) -> _Issuer:
        """What a certificate download says of its issuing CA, read from the store at
        most once a minute per process (two reads per download otherwise)."""
        cached = self._issuer_cache.get(ca_id)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        from pkigate.core.authorities import CASettings

        authorities = self.context.core.authorities
        settings = CASettings.from_json(authorities.get(ca_id).settings)
        ca_pem, above = authorities.certificate_pem(ca_id)
        certificates = x509.load_pem_x509_certificates((ca_pem + above).encode())
        issuer = _Issuer(
            chain_pem="".join(
                c.public_bytes(serialization.Encoding.PEM).decode()
                for c in certificates
                if c.issuer != c.subject
            ),
            certificate_url=settings.ca_issuers_url or self.url("/directory"),
        )
        self._issuer_cache[ca_id] = (time.monotonic() + 60, issuer)
        return issuer

    def _revoke_cert(self, acme_request: AcmeRequest) -> Response:
        payload = acme_request.payload()
        text = payload.get("certificate")
        if not isinstance(text, str):
            raise AcmeProblem("malformed", "revokeCert needs 'certificate': base64url DER")
        reason = payload.get("reason", 0)
        if isinstance(reason, bool) or not isinstance(reason, int):
            raise AcmeProblem("badRevocationReason", "'reason' must be an integer reason code")
        try:
            certificate = x509.load_der_x509_certificate(jws.b64url_decode(text))
        except (ValueError, x509.InvalidVersion) as exc:
            raise AcmeProblem("malformed", f"the certificate cannot be parsed: {exc}") from None
        with self.context.core.store.write() as conn:
            record = self.service.locate_certificate(conn, certificate)
            if acme_request.account is not None:
                who = Actor(f"acme-account:{acme_request.account.id}", self.context.name)
                if not self.service.may_revoke(conn, acme_request.account, record):
                    raise AcmeProblem(
                        "unauthorized",
                        "this account neither ordered the certificate nor holds authorizations "
                        "for all its names",
                    )
            else:
                assert acme_request.parsed.jwk is not None
                key = jws.public_key_from_jwk(acme_request.parsed.jwk)
                if spki(key) != spki(certificate.public_key()):
                    raise AcmeProblem(
                        "unauthorized", "the request is not signed by the certificate's key"
                    )
                who = Actor(f"acme-certificate-key:{record.serial}", self.context.name)
        self.service.revoke(record, reason, who)
        return self._headers(Response(status=200))


@dataclass(frozen=True)
class _Issuer:
    """A certificate download's issuer: the chain above the leaf and the "up" link."""

    #: The issuing CA and the CAs above it, without the self-signed root.
    chain_pem: str
    #: The CA certificate's URL (its AIA caIssuers URL, or the directory without one).
    certificate_url: str


class _EabSealer:
    """EAB HMAC keys sealed at rest with AES-256-GCM under a KEK-derived key, bound to the
    key id (associated data), so a row copied to another id does not open."""

    def __init__(self, kek: KeyEncryptionKey) -> None:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        self._aead = AESGCM(kek.derive(b"pkigate acme eab v1"))

    def seal(self, kid: str, secret: bytes) -> bytes:
        nonce = _random_bytes(12)
        return nonce + self._aead.encrypt(nonce, secret, kid.encode())

    def unseal(self, record: EabKeyRecord) -> bytes:
        return self._aead.decrypt(
            record.sealed_key[:12], record.sealed_key[12:], record.id.encode()
        )


def _random_bytes(count: int) -> bytes:
    return os.urandom(count)


def _require_post_as_get(acme_request: AcmeRequest, resource: str) -> None:
    """Resources that are only read take POST-as-GET: a JWS with an empty payload (RFC 8555
    6.3). Even ``{}`` is refused, so that a client's mistake is not silently a read."""
    if not acme_request.parsed.is_post_as_get:
        raise AcmeProblem(
            "malformed", f"fetch {resource} with POST-as-GET: a JWS with an empty payload"
        )


def _read_body() -> bytes:
    """The request body, at most :data:`jws.MAX_JWS_BYTES`; 413 for more.

    An oversized body is read on (up to :data:`DRAIN_LIMIT`) before the answer, so that the
    client reads the 413 instead of a connection reset in the middle of its upload. It is
    read from the WSGI input itself: Flask's limit would refuse it unread.
    """
    stream = request.environ["wsgi.input"]
    length = request.content_length
    wanted = jws.MAX_JWS_BYTES + 1 if length is None else min(length, jws.MAX_JWS_BYTES + 1)
    chunks: list[bytes] = []
    received = 0
    while received < wanted:
        chunk = stream.read(min(64 * 1024, wanted - received))
        if not chunk:
            break
        chunks.append(chunk)
        received += len(chunk)
    if received <= jws.MAX_JWS_BYTES and (length is None or length <= jws.MAX_JWS_BYTES):
        return b"".join(chunks)
    drained = received
    while drained < DRAIN_LIMIT:
        chunk = stream.read(64 * 1024)
        if not chunk:
            break
        drained += len(chunk)
    raise AcmeProblem("malformed", f"the request exceeds {jws.MAX_JWS_BYTES} bytes", status=413)


def _contacts(value: object) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise AcmeProblem("malformed", "'contact' must be an array of URLs")
    if len(value) > MAX_CONTACTS:
        raise AcmeProblem("invalidContact", f"at most {MAX_CONTACTS} contacts")
    for contact in value:
        if not contact.startswith("mailto:"):
            raise AcmeProblem(
                "unsupportedContact", f"only mailto: contacts are supported, not {contact[:40]!r}"
            )
        address = contact.removeprefix("mailto:")
        local, at, domain = address.rpartition("@")
        if (
            len(contact) > MAX_CONTACT_CHARS
            or not at
            or not local
            or "." not in domain
            or any(c in address for c in "?,;<> \t\r\n")
        ):
            raise AcmeProblem(
                "invalidContact", f"{contact[:80]!r} is not a single mailto: address (no hfields)"
            )
    return list(value)
