"""The ACME connector against a running `pkigate serve`, driven over HTTPS by our own wire
client (pkigate.devsim.acme_client): RFC 8555 accounts, orders, the three challenge
types, finalization, certificates, revocation, key rollover, EAB, profiles, RFC 9773
renewal information, rate limits, and what bad requests get."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from acme_support import Http01Responder, TlsAlpnResponder, check_issued
from challtestsrv import ChallTestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from helpers import (
    BIT_STRING_CN,
    common_name,
    extension_request,
    name_der,
    raw_csr,
    san_extension,
    wait_for,
)
from serving import RunningServer, start_server
from sqlalchemy import func, select

from pkigate.acme import jws
from pkigate.acme.renewal import cert_id
from pkigate.core import Core
from pkigate.core.der import tlv
from pkigate.core.store import schema
from pkigate.devsim.acme_client import AcmeClient, AcmeClientError


@dataclass
class Env:
    server: RunningServer
    http01: Http01Responder
    tls: TlsAlpnResponder
    dns: ChallTestServer
    core: Core
    root_pem: bytes

    def directory(self, mount: str = "/acme") -> str:
        return f"{self.server.https_url}{mount}/directory"

    def client(self, mount: str = "/acme", key: Any = None) -> AcmeClient:
        return AcmeClient(
            self.directory(mount),
            key or ec.generate_private_key(ec.SECP256R1()),
            self.server.session(),
        )


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp("acme")
    http01 = Http01Responder()
    tls = TlsAlpnResponder(base)
    dns = ChallTestServer()
    dns.start()
    resolver = f"{dns.dns_address[0]}:{dns.dns_address[1]}"
    server = start_server(
        base / "data",
        workers=2,
        extra_config=f"""
[[connectors]]
type = "acme"
name = "acme"
mount = "/acme"
[connectors.settings]
http01_port = {http01.port}
tls_alpn01_port = {tls.port}
dns_resolver = "{resolver}"
orders_page_size = 2
[connectors.settings.profiles.default]
description = "90-day TLS server certificates"
[connectors.settings.profiles.shortlived]
validity = "6d"
description = "six-day TLS server certificates"
[connectors.settings.profiles.tlsclient]
template = "EndEntityClientAuthCertificate_APIPassthrough/V1"
description = "TLS client certificates"

[[connectors]]
type = "acme"
name = "private"
mount = "/private"
[connectors.settings]
external_account_required = true
terms_of_service = "https://example.test/terms"
website = "https://example.test/pki"
caa_identities = ["pki.example.test", "ca.example.test"]
http01_port = {http01.port}
dns_resolver = "{resolver}"
orders_per_account_per_hour = 3
failed_validations_per_identifier_per_hour = 1
[connectors.settings.allowed_identifiers]
dns_suffixes = ["corp.example.test"]
ip_networks = ["127.0.0.0/8"]
[connectors.settings.profiles.default]
description = "default"
[connectors.settings.profiles.shortlived]
validity = "6d"
description = "six days"

[[connectors]]
type = "acme"
name = "shortreuse"
mount = "/short-reuse"
[connectors.settings]
http01_port = {http01.port}
dns_resolver = "{resolver}"
authorization_reuse_seconds = 1
""",
    )
    core = Core.open(base / "data")
    try:
        yield Env(server, http01, tls, dns, core, server.tls_bundle.read_bytes())
    finally:
        core.close()
        server.stop()
        dns.stop()
        tls.close()
        http01.close()


def _csr(names: list[tuple[str, str]], key: Any = None, cn: str | None = None) -> Any:
    import ipaddress

    key = key or ec.generate_private_key(ec.SECP256R1())
    general: list[x509.GeneralName] = [
        x509.DNSName(v) if t == "dns" else x509.IPAddress(ipaddress.ip_address(v)) for t, v in names
    ]
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
    )
    if general:
        builder = builder.add_extension(x509.SubjectAlternativeName(general), critical=False)
    return builder.sign(key, hashes.SHA256()), key


def _solve(env: Env, client: AcmeClient, order: Any, kind: str = "http-01") -> None:
    for url in order.body["authorizations"]:
        authz = client.get(url).body
        if authz["status"] == "valid":
            continue
        challenge = next(c for c in authz["challenges"] if c["type"] == kind)
        key_authorization = jws.key_authorization(challenge["token"], client.thumbprint)
        value = authz["identifier"]["value"]
        if kind == "http-01":
            env.http01.tokens[challenge["token"]] = key_authorization
        elif kind == "dns-01":
            env.dns.set_txt(f"_acme-challenge.{value}.", jws.dns01_txt_value(key_authorization))
        else:
            sni = value
            if authz["identifier"]["type"] == "ip":
                import ipaddress

                sni = ipaddress.ip_address(value).reverse_pointer
            env.tls.key_authorizations[sni] = key_authorization
        client.respond(challenge["url"])


def _issue(
    env: Env,
    client: AcmeClient,
    identifiers: list[tuple[str, str]],
    kind: str = "http-01",
    purpose: str = "server_auth",
    **order_args: Any,
) -> tuple[x509.Certificate, Any, Any]:
    order = client.new_order(identifiers, **order_args)
    _solve(env, client, order, kind)
    ready = client.wait(order.location, ["ready", "invalid"])
    assert ready.body["status"] == "ready", ready.body
    csr, key = _csr(identifiers)
    done = client.finalize(ready, csr)
    assert done.body["status"] == "valid", done.body
    chain = client.certificate_chain(done.body["certificate"])
    leaf = check_issued(chain, env.root_pem, identifiers, purpose)
    return leaf, key, done


def _counts(core: Core) -> dict[str, int]:
    tables = [
        schema.acme_accounts,
        schema.acme_orders,
        schema.acme_authorizations,
        schema.acme_challenges,
        schema.acme_eab_keys,
        schema.certificates,
        schema.audit_events,
    ]
    with core.store.read() as conn:
        return {
            t.name: int(conn.execute(select(func.count()).select_from(t)).scalar_one())
            for t in tables
        }


# -- directory and nonces ---------------------------------------------------------------


def test_directory_lists_every_resource_and_meta(env: Env) -> None:
    body = requests.get(env.directory(), verify=str(env.server.tls_bundle), timeout=10).json()
    base = f"{env.server.https_url}/acme"
    assert body["newNonce"] == f"{base}/new-nonce"
    for key in ("newAccount", "newOrder", "revokeCert", "keyChange", "renewalInfo"):
        assert body[key].startswith(base + "/"), key
    assert body["meta"]["externalAccountRequired"] is False
    assert set(body["meta"]["profiles"]) == {"default", "shortlived", "tlsclient"}
    private = requests.get(env.directory("/private"), verify=str(env.server.tls_bundle), timeout=10)
    meta = private.json()["meta"]
    assert meta["externalAccountRequired"] is True
    assert meta["termsOfService"] == "https://example.test/terms"
    assert meta["website"] == "https://example.test/pki"
    assert meta["caaIdentities"] == ["pki.example.test", "ca.example.test"]
    # Not configured, not announced.
    assert not {"termsOfService", "website", "caaIdentities"} & set(body["meta"])


def test_new_nonce_head_and_get_are_not_cached_and_nonces_are_fresh(env: Env) -> None:
    session = env.server.session()
    url = f"{env.server.https_url}/acme/new-nonce"
    head = session.head(url, timeout=10)
    get = session.get(url, timeout=10)
    assert head.status_code == 200 and get.status_code == 204
    for response in (head, get):
        assert response.headers["Cache-Control"] == "no-store"
        assert 'rel="index"' in response.headers["Link"]
    assert head.headers["Replay-Nonce"] != get.headers["Replay-Nonce"]


def test_a_nonce_from_one_worker_is_accepted_once_by_any_worker(env: Env) -> None:
    # The server runs two gunicorn workers; fresh connections land on either.
    client = env.client()
    client.register()
    for _ in range(6):
        nonce = requests.head(
            client.directory["newNonce"], verify=str(env.server.tls_bundle), timeout=10
        ).headers["Replay-Nonce"]
        url = client.account_url
        assert url is not None
        body = client.signed_body(url, None, nonce=nonce)
        fresh = requests.Session()
        fresh.trust_env = False
        fresh.verify = str(env.server.tls_bundle)
        first = fresh.post(url, data=body, headers={"Content-Type": jws_type()}, timeout=10)
        assert first.status_code == 200, first.text
        again = env.server.session().post(
            url, data=body, headers={"Content-Type": jws_type()}, timeout=10
        )
        assert again.status_code == 400
        assert again.json()["type"] == "urn:ietf:params:acme:error:badNonce"
        assert again.headers["Replay-Nonce"]


def jws_type() -> str:
    return "application/jose+json"


# -- accounts ------------------------------------------------------------------------------


def test_account_create_find_update_and_deactivate(env: Env) -> None:
    client = env.client()
    created = client.register(["mailto:ops@example.test"])
    assert created.status == 201
    assert created.body["status"] == "valid"
    assert created.body["contact"] == ["mailto:ops@example.test"]
    assert created.body["orders"] == f"{created.location}/orders"
    # The same key again finds the same account (RFC 8555 7.3.1), 200 not 201.
    again = client.register(only_return_existing=True)
    assert again.status == 200 and again.location == created.location
    assert client.account_url is not None
    updated = client.post(client.account_url, {"contact": ["mailto:new@example.test"]})
    assert updated.body["contact"] == ["mailto:new@example.test"]
    gone = client.post(client.account_url, {"status": "deactivated"})
    assert gone.body["status"] == "deactivated"
    before = _counts(env.core)
    with pytest.raises(AcmeClientError) as refused:
        client.new_order(["after.example.test"])
    assert refused.value.type == "unauthorized" and refused.value.status == 403
    assert _counts(env.core) == before


def test_a_jws_url_without_the_requests_query_string_is_unauthorized(env: Env) -> None:
    # RFC 8555 6.4: the signed 'url' is the whole request URL, query string included.
    client = env.client()
    client.register(["mailto:before@example.test"])
    assert client.account_url is not None
    update = {"contact": ["mailto:after@example.test"]}
    for sent_to, signed_for in (
        (client.account_url + "?contact=x", client.account_url),
        (client.account_url + "?contact=x", client.account_url + "?contact=y"),
        (client.account_url, client.account_url + "?contact=x"),
    ):
        refused = client.raw_post(sent_to, client.signed_body(signed_for, update))
        assert refused.status == 403, (sent_to, signed_for)
        assert refused.body["type"] == "urn:ietf:params:acme:error:unauthorized"
    unchanged = client.post(client.account_url, None)
    assert unchanged.body["contact"] == ["mailto:before@example.test"]
    # Signed with its query string, the same request is this request.
    signed = client.account_url + "?contact=x"
    accepted = client.raw_post(signed, client.signed_body(signed, update))
    assert accepted.status == 200 and accepted.body["contact"] == update["contact"]


ACCOUNT_KEYS: dict[str, Callable[[], jws.PrivateKey]] = {
    "RS256": lambda: rsa.generate_private_key(65537, 2048),
    "ES256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "ES384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "ES512": lambda: ec.generate_private_key(ec.SECP521R1()),
    "EdDSA": Ed25519PrivateKey.generate,
}


@pytest.mark.parametrize("alg", sorted(ACCOUNT_KEYS))
def test_accounts_with_a_key_of_every_supported_algorithm_can_order(env: Env, alg: str) -> None:
    key = ACCOUNT_KEYS[alg]()
    client = env.client(key=key)
    assert client.register().status == 201
    order = client.new_order([f"{alg.lower()}.keys.example.test"])
    assert order.status == 201
    read = client.signed_body(order.location or "", None)
    assert json.loads(jws.b64url_decode(json.loads(read)["protected"]))["alg"] == alg
    fetched = client.raw_post(order.location or "", read)
    assert fetched.status == 200 and fetched.body["status"] == "pending"
    account = client.get(client.account_url or "").body
    assert account["key"] == jws.public_key_to_jwk(key.public_key())


def test_only_return_existing_for_an_unknown_key_is_account_does_not_exist(env: Env) -> None:
    before = _counts(env.core)
    with pytest.raises(AcmeClientError) as refused:
        env.client().register(only_return_existing=True)
    assert refused.value.type == "accountDoesNotExist"
    assert _counts(env.core)["acme_accounts"] == before["acme_accounts"]


@pytest.mark.parametrize(
    ("contact", "problem"),
    [
        ("tel:+15555550100", "unsupportedContact"),
        ("mailto:no-at-sign", "invalidContact"),
        ("mailto:a@example.test?subject=x", "invalidContact"),
        ("mailto:a@example.test,b@example.test", "invalidContact"),
    ],
)
def test_bad_contacts_are_refused(env: Env, contact: str, problem: str) -> None:
    with pytest.raises(AcmeClientError) as refused:
        env.client().register([contact])
    assert refused.value.type == problem


def test_key_change_moves_the_account_to_the_new_key(env: Env) -> None:
    client = env.client()
    client.register()
    old_key = client.key
    account = client.account_url
    new_key = ec.generate_private_key(ec.SECP384R1())
    client.key_change(new_key)
    assert client.get(account or "").body["key"] == jws.public_key_to_jwk(new_key.public_key())
    # The old key no longer finds the account; the new one does.
    old = env.client(key=old_key)
    with pytest.raises(AcmeClientError) as refused:
        old.register(only_return_existing=True)
    assert refused.value.type == "accountDoesNotExist"
    assert env.client(key=new_key).register(only_return_existing=True).location == account


def test_key_change_to_a_key_already_in_use_is_a_conflict(env: Env) -> None:
    first, second = env.client(), env.client()
    first.register()
    second.register()
    with pytest.raises(AcmeClientError) as refused:
        first.key_change(second.key)
    assert refused.value.status == 409
    assert first.get(first.account_url or "").body["key"] == first.jwk


# -- orders and challenges -------------------------------------------------------------------


def test_http01_order_for_dns_names_issues_a_certificate_naming_exactly_them(env: Env) -> None:
    client = env.client()
    client.register()
    names = [("dns", "www.http01.example.test"), ("dns", "http01.example.test")]
    leaf, _, done = _issue(env, client, names)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc >= __import__("datetime").timedelta(
        days=89
    )
    # The validation went to the name's address (127.0.0.1 from the resolver) with its Host.
    hosts = {host.split(":")[0] for host, _ in env.http01.requests}
    assert {"www.http01.example.test", "http01.example.test"} <= hosts
    authz = client.get(done.body["authorizations"][0]).body
    http = next(c for c in authz["challenges"] if c["type"] == "http-01")
    assert http["status"] == "valid" and http["validated"]
    assert http["validationRecord"][0]["addressUsed"] == "127.0.0.1"


def test_dns01_wildcard_order(env: Env) -> None:
    client = env.client()
    client.register()
    names = [("dns", "*.wild.example.test"), ("dns", "wild.example.test")]
    order = client.new_order(names)
    wildcard_authz = [client.get(u).body for u in order.body["authorizations"]]
    starred = next(a for a in wildcard_authz if a.get("wildcard"))
    assert starred["identifier"]["value"] == "wild.example.test"
    assert [c["type"] for c in starred["challenges"]] == ["dns-01"]
    leaf, _, _ = _issue(env, client, names, kind="dns-01")
    assert leaf is not None


def test_tls_alpn01_order(env: Env) -> None:
    client = env.client()
    client.register()
    leaf, _, _ = _issue(env, client, [("dns", "alpn.example.test")], kind="tls-alpn-01")
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alpn.example.test"


def test_ip_identifiers_by_http01_and_tls_alpn01(env: Env) -> None:
    client = env.client()
    client.register()
    order = client.new_order([("ip", "127.0.0.1")])
    authz = client.get(order.body["authorizations"][0]).body
    assert sorted(c["type"] for c in authz["challenges"]) == ["http-01", "tls-alpn-01"]
    _issue(env, client, [("ip", "127.0.0.1")])
    other = env.client()
    other.register()
    _issue(env, other, [("ip", "127.0.0.1")], kind="tls-alpn-01")


def test_authorizations_are_reused_within_the_window(env: Env) -> None:
    client = env.client()
    client.register()
    names = [("dns", "reuse.example.test")]
    _, _, first = _issue(env, client, names)
    second = client.new_order(names)
    assert second.body["status"] == "ready"
    assert second.body["authorizations"] == first.body["authorizations"]
    # Another account does not inherit them.
    stranger = env.client()
    stranger.register()
    assert stranger.new_order(names).body["status"] == "pending"
    # The window is the connector's: /short-reuse reuses them for one second only.
    brief = env.client("/short-reuse")
    brief.register()
    validated = brief.new_order(names)
    _solve(env, brief, validated)
    assert brief.wait(validated.location or "", ["ready", "invalid"]).body["status"] == "ready"
    time.sleep(1.5)  # the window runs from the authorizations' creation
    later = brief.new_order(names)
    assert later.body["status"] == "pending"
    assert set(later.body["authorizations"]).isdisjoint(validated.body["authorizations"])
    assert brief.get(later.body["authorizations"][0]).body["status"] == "pending"


def test_a_challenge_is_validated_by_a_background_job_not_in_the_request(env: Env) -> None:
    client = env.client()
    client.register()
    order = client.new_order(["background.example.test"])
    challenge = next(
        c
        for c in client.get(order.body["authorizations"][0]).body["challenges"]
        if c["type"] == "http-01"
    )
    token = challenge["token"]
    env.http01.tokens[token] = jws.key_authorization(token, client.thumbprint)
    # The responder holds its answer: validation inside the request could not finish
    # before the connector's validation timeout, and would answer "invalid".
    release = env.http01.held[token] = threading.Event()
    try:
        answered = client.respond(challenge["url"])
        assert answered.body["status"] == "processing"
        assert answered.headers["Retry-After"] == "1"
        wait_for(lambda: any(path.endswith(token) for _, path in env.http01.requests), 30)
        # The validator is waiting on the responder from a job, and the challenge says so.
        challenge_id = challenge["url"].rsplit("/", 1)[1]
        with env.core.store.read() as conn:
            job = conn.execute(
                select(schema.jobs.c.kind, schema.jobs.c.status).where(
                    schema.jobs.c.dedupe_key == f"acme-validate:{challenge_id}"
                )
            ).one()
        assert tuple(job) == ("acme:acme-validate", "running")
        assert client.get(challenge["url"]).body["status"] == "processing"
    finally:
        release.set()
    assert client.wait(order.location or "", ["ready", "invalid"]).body["status"] == "ready"
    assert client.get(challenge["url"]).body["status"] == "valid"


def test_a_failed_challenge_makes_the_authorization_and_order_invalid(env: Env) -> None:
    client = env.client()
    client.register()
    order = client.new_order(["wrong.example.test"])
    authz_url = order.body["authorizations"][0]
    challenge = next(c for c in client.get(authz_url).body["challenges"] if c["type"] == "http-01")
    env.http01.tokens[challenge["token"]] = "not-the-key-authorization"
    client.respond(challenge["url"])
    failed = client.wait(order.location, ["invalid", "ready"])
    assert failed.body["status"] == "invalid"
    assert failed.body["error"]["type"] == "urn:ietf:params:acme:error:incorrectResponse"
    authz = client.get(authz_url).body
    assert authz["status"] == "invalid"
    stored = next(c for c in authz["challenges"] if c["type"] == "http-01")
    assert stored["error"]["type"] == "urn:ietf:params:acme:error:incorrectResponse"
    assert "not-the-key-authorization" in stored["error"]["detail"]


def test_orders_are_listed_per_account_with_pagination(env: Env) -> None:
    client = env.client()
    client.register()
    made = [client.new_order([f"list{i}.example.test"]).location for i in range(3)]
    account = client.get(client.account_url or "").body
    page = client.get(account["orders"])
    assert page.body["orders"] == made[:2]
    following = page.link("next")
    assert following is not None
    last = client.get(following)
    assert last.body["orders"] == made[2:]
    assert last.link("next") is None


def test_authorization_can_be_deactivated(env: Env) -> None:
    client = env.client()
    client.register()
    order = client.new_order(["deactivate.example.test"])
    url = order.body["authorizations"][0]
    assert client.post(url, {"status": "deactivated"}).body["status"] == "deactivated"
    assert client.get(order.location or "").body["status"] == "invalid"


# -- finalize --------------------------------------------------------------------------------


def test_finalize_before_ready_is_order_not_ready(env: Env) -> None:
    client = env.client()
    client.register()
    order = client.new_order(["early.example.test"])
    with pytest.raises(AcmeClientError) as refused:
        client.finalize(order, _csr([("dns", "early.example.test")])[0])
    assert refused.value.type == "orderNotReady" and refused.value.status == 403


@pytest.mark.parametrize(
    "case",
    [
        "extra name",
        "missing name",
        "foreign common name",
        "account key",
        "email SAN",
        "two SAN extensions",  # found in review: DuplicateExtension was a 500
    ],
)
def test_a_csr_that_does_not_match_the_order_is_bad_csr_and_changes_nothing(
    env: Env, case: str
) -> None:
    client = env.client()
    client.register()
    names = [("dns", f"{case.replace(' ', '-')}.csr.example.test"), ("dns", "csr.example.test")]
    order = client.new_order(names)
    _solve(env, client, order)
    ready = client.wait(order.location or "", ["ready", "invalid"])
    assert ready.body["status"] == "ready"
    if case == "extra name":
        csr, _ = _csr([*names, ("dns", "evil.example.test")])
    elif case == "missing name":
        csr, _ = _csr(names[:1])
    elif case == "foreign common name":
        csr, _ = _csr(names, cn="evil.example.test")
    elif case == "account key":
        csr, _ = _csr(names, key=client.key)
    elif case == "two SAN extensions":
        san = x509.Extension(
            x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
            False,
            x509.SubjectAlternativeName([x509.DNSName(v) for _, v in names]),
        )
        # The builder's constructor takes the list as given (add_extension would refuse).
        csr = x509.CertificateSigningRequestBuilder(x509.Name([]), [san, san]).sign(
            ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()
        )
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName(v) for _, v in names] + [x509.RFC822Name("a@example.test")]
                ),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
    before = _counts(env.core)
    with pytest.raises(AcmeClientError) as refused:
        client.finalize(ready, csr)
    assert refused.value.type == "badCSR" and refused.value.status == 400
    assert _counts(env.core)["certificates"] == before["certificates"]
    # The order is still ready: a good CSR is accepted afterwards.
    assert client.get(order.location or "").body["status"] == "ready"
    good, _ = _csr(names)
    assert client.finalize(ready, good).body["status"] == "valid"


def test_a_name_longer_than_a_common_name_may_be_is_in_the_sans_only(env: Env) -> None:
    """Found in review: a validated 133-character name asked for as the CSR's CN made the
    subject unbuildable (RFC 5280: a CN holds at most 64 characters), a 500."""
    client = env.client()
    client.register()
    name = f"{'a' * 60}.{'b' * 56}.example.test"
    assert len(name) > 64
    order = client.new_order([name])
    _solve(env, client, order)
    ready = client.wait(order.location or "", ["ready", "invalid"])
    key = ec.generate_private_key(ec.SECP256R1())
    long_cn = x509.NameAttribute(NameOID.COMMON_NAME, name, _validate=False)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([long_cn]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    done = client.finalize(ready, csr)
    assert done.body["status"] == "valid", done.body
    leaf = check_issued(
        client.certificate_chain(done.body["certificate"]), env.root_pem, [("dns", name)]
    )
    assert not leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)


def test_revocation_by_authorizations_needs_every_name_to_be_an_acme_identifier(
    env: Env,
) -> None:
    """Found in review: an account holding an authorization for a certificate's DNS name
    could revoke it although it also names an email address and a URI, which no ACME
    account can be authorized for."""
    token = env.server.session().post(
        f"{env.server.https_url}/api/v1/tokens", json={"name": "revoke-test", "role": "issuer"}
    )
    assert token.status_code == 201, token.text
    issuing = next(
        c["id"]
        for c in env.server.session().get(f"{env.server.https_url}/api/v1/cas").json()["cas"]
        if c["type"] == "SUBORDINATE"
    )
    csr, _ = _csr([("dns", "shared-host.example.test")])
    issued = env.server.session(token.json()["secret"]).post(
        f"{env.server.https_url}/api/v1/cas/{issuing}/certificates",
        json={
            "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
            "template": "EndEntityCertificate_APIPassthrough/V1",
            "api_passthrough": {
                "sans": [
                    {"dns": "shared-host.example.test"},
                    {"email": "ceo@example.test"},
                    {"uri": "spiffe://example.test/payments"},
                ]
            },
        },
        timeout=30,
    )
    assert issued.status_code == 201, issued.text
    certificate = x509.load_pem_x509_certificate(issued.json()["certificate_pem"].encode())
    stranger = env.client()
    stranger.register()
    _issue(env, stranger, [("dns", "shared-host.example.test")])  # holds that authorization
    with pytest.raises(AcmeClientError) as refused:
        stranger.revoke(certificate, 1)
    assert refused.value.type == "unauthorized" and refused.value.status == 403
    with env.core.store.read() as conn:
        stored = env.core.store.get_certificate(
            conn, issuing, format(certificate.serial_number, "x")
        )
    assert stored is not None and stored.status == "ISSUED"


def _ready_order(env: Env, names: list[tuple[str, str]]) -> tuple[AcmeClient, Any, Any]:
    """A new account's order for ``names``, solved: (client, order, the ready order)."""
    client = env.client()
    client.register()
    order = client.new_order(names)
    _solve(env, client, order)
    return client, order, client.wait(order.location or "", ["ready"])


def test_a_csr_that_cannot_be_parsed_is_bad_csr(env: Env) -> None:
    names = [("dns", "unparsable.example.test")]
    client, order, ready = _ready_order(env, names)
    csr = _csr(names)[0]
    der = csr.public_bytes(serialization.Encoding.DER)
    at = der.index(b"\x02\x01\x00")  # the first INTEGER: CertificationRequestInfo's version
    wrong_version = der[: at + 2] + b"\x01" + der[at + 3 :]  # InvalidVersion, not ValueError
    point = csr.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    off_curve = der.replace(point, point[:-1] + bytes([point[-1] ^ 1]))  # "Invalid key"
    for bad in (wrong_version, off_curve, der[: len(der) // 2]):
        with pytest.raises(AcmeClientError) as refused:
            client.post(ready.body["finalize"], {"csr": jws.b64url_encode(bad)})
        assert refused.value.type == "badCSR" and refused.value.status == 400
    assert client.get(order.location or "").body["status"] == "ready"


def test_a_csr_whose_names_cannot_be_read_is_bad_csr(env: Env) -> None:
    """Found by the fuzzer: a BIT STRING common name, in the subject or in a directoryName
    subjectAltName, made cryptography raise TypeError where the names were read (a 500)."""
    names = [("dns", "bitstring.example.test")]
    client, order, ready = _ready_order(env, names)
    key = rsa.generate_private_key(65537, 2048)
    san = san_extension(tlv(0x82, b"bitstring.example.test"))
    odd_san = san_extension(tlv(0x82, b"bitstring.example.test"), tlv(0xA4, BIT_STRING_CN))
    for csr in (
        raw_csr(key, BIT_STRING_CN, extension_request(san)),
        raw_csr(key, name_der((common_name(tlv(0x0C, b"x")),)), extension_request(odd_san)),
    ):
        with pytest.raises(AcmeClientError) as refused:
            client.post(ready.body["finalize"], {"csr": jws.b64url_encode(csr)})
        assert refused.value.type == "badCSR" and refused.value.status == 400
        assert "cannot be read" in refused.value.problem["detail"]
    assert client.get(order.location or "").body["status"] == "ready"


def test_a_csr_with_a_weak_key_is_refused(env: Env) -> None:
    names = [("dns", "weak.example.test")]
    client, _order, ready = _ready_order(env, names)
    small = rsa.generate_private_key(65537, 1024)  # noqa: S505 - the weak key under test
    with pytest.raises(AcmeClientError) as refused:
        client.finalize(ready, _csr(names, key=small)[0])
    assert refused.value.type == "badCSR"
    assert "1024" in refused.value.problem["detail"]


def test_certificate_url_serves_a_pem_chain_with_links(env: Env) -> None:
    client = env.client()
    client.register()
    _, _, done = _issue(env, client, [("dns", "chain.example.test")])
    response = client.get(done.body["certificate"])
    assert response.headers["Content-Type"].startswith("application/pem-certificate-chain")
    assert response.link("up") is not None and response.link(
        "up",
    ).endswith(".cer")
    with pytest.raises(AcmeClientError) as not_a_read:
        client.post(done.body["certificate"], {})
    assert not_a_read.value.type == "malformed" and not_a_read.value.status == 400
    # GET is not how certificates are fetched (RFC 8555 7.4.2: POST-as-GET).
    plain = requests.get(done.body["certificate"], verify=str(env.server.tls_bundle), timeout=10)
    assert plain.status_code == 405
    assert plain.headers["Content-Type"] == "application/problem+json"
    assert plain.headers["Allow"] == "POST"


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/acme/no-such-resource", 404),
        ("POST", "/acme/order/x/y/z", 404),
        ("GET", "/acme/", 404),
        ("GET", "/acme/new-order", 405),
        ("PUT", "/acme/directory", 405),
        ("POST", "/acme/new-nonce", 405),
        ("DELETE", "/acme/renewal-info/abc.def", 405),
        ("GET", "/acme/no%0Asuch", 404),  # werkzeug's <path:> stops at a newline
        ("GET", "/acme/renewal-info/%2Fab%2F%2Fcd", 400),  # not redirected to "ab/cd"
        ("GET", "/acme//new-order", 404),  # not redirected to another resource
    ],
)
def test_unknown_resources_and_methods_get_acme_problems_with_a_nonce(
    env: Env, method: str, path: str, status: int
) -> None:
    # Found by tests/fuzzing.py: routing errors escaped the connector as the gateway's JSON.
    response = requests.request(
        method, env.server.https_url + path, verify=str(env.server.tls_bundle), timeout=10
    )
    assert response.status_code == status
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.json()["type"] == "urn:ietf:params:acme:error:malformed"
    assert response.headers["Replay-Nonce"]


# -- revocation ------------------------------------------------------------------------------


def _status(env: Env, certificate: x509.Certificate) -> str:
    with env.core.store.read() as conn:
        row = conn.execute(
            select(schema.certificates.c.status).where(
                schema.certificates.c.serial == format(certificate.serial_number, "x")
            )
        ).scalar_one()
    return str(row)


def test_revocation_by_the_ordering_account(env: Env) -> None:
    client = env.client()
    client.register()
    leaf, _, _ = _issue(env, client, [("dns", "revoke1.example.test")])
    client.revoke(leaf, reason=4)
    assert _status(env, leaf) == "REVOKED"
    with pytest.raises(AcmeClientError) as again:
        client.revoke(leaf)
    assert again.value.type == "alreadyRevoked"


def test_revocation_signed_by_the_certificate_key(env: Env) -> None:
    client = env.client()
    client.register()
    leaf, key, _ = _issue(env, client, [("dns", "revoke2.example.test")])
    keyholder = env.client()
    keyholder.revoke(leaf, reason=1, certificate_key=key)
    assert _status(env, leaf) == "REVOKED"


def test_revocation_by_another_account_needs_authorizations_for_every_name(env: Env) -> None:
    owner = env.client()
    owner.register()
    names = [("dns", "revoke3.example.test")]
    leaf, _, _ = _issue(env, owner, names)
    stranger = env.client()
    stranger.register()
    with pytest.raises(AcmeClientError) as refused:
        stranger.revoke(leaf)
    assert refused.value.type == "unauthorized"
    assert _status(env, leaf) == "ISSUED"
    # Once it has proved control of the name, it may revoke.
    order = stranger.new_order(names)
    _solve(env, stranger, order)
    stranger.wait(order.location or "", ["ready"])
    stranger.revoke(leaf)
    assert _status(env, leaf) == "REVOKED"


@pytest.mark.parametrize("reason", [2, 7, 8, 10, 99, -1])
def test_revocation_reasons_a_subscriber_may_not_give_are_refused(env: Env, reason: int) -> None:
    client = env.client()
    client.register()
    leaf, _, _ = _issue(env, client, [("dns", f"reason{reason % 100}.example.test")])
    with pytest.raises(AcmeClientError) as refused:
        client.revoke(leaf, reason=reason)
    assert refused.value.type == "badRevocationReason"
    assert _status(env, leaf) == "ISSUED"


def test_revoking_a_certificate_signed_with_another_key_is_unauthorized(env: Env) -> None:
    client = env.client()
    client.register()
    leaf, _, _ = _issue(env, client, [("dns", "revoke4.example.test")])
    with pytest.raises(AcmeClientError) as refused:
        env.client().revoke(leaf, certificate_key=ec.generate_private_key(ec.SECP256R1()))
    assert refused.value.type == "unauthorized"
    assert _status(env, leaf) == "ISSUED"


# -- renewal information (RFC 9773) ----------------------------------------------------------


def test_renewal_info_window_and_replacement_orders(env: Env) -> None:
    client = env.client()
    client.register()
    names = [("dns", "ari.example.test")]
    leaf, _, _ = _issue(env, client, names)
    identifier = cert_id(leaf)
    info = client.renewal_info(identifier)
    assert info.status_code == 200
    assert int(info.headers["Retry-After"]) > 0
    window = info.json()["suggestedWindow"]
    start = _parse_time(window["start"])
    end = _parse_time(window["end"])
    assert leaf.not_valid_before_utc < start < end < leaf.not_valid_after_utc
    replacement = client.new_order(names, replaces=identifier)
    assert replacement.body["replaces"] == identifier
    with pytest.raises(AcmeClientError) as twice:
        client.new_order(names, replaces=identifier)
    assert twice.value.type == "alreadyReplaced" and twice.value.status == 409
    # Someone else's certificate cannot be named.
    stranger = env.client()
    stranger.register()
    with pytest.raises(AcmeClientError) as foreign:
        stranger.new_order(names, replaces=identifier)
    assert foreign.value.type == "unauthorized"
    # Revoked: renew now (a window in the past).
    client.revoke(leaf)
    revoked = client.renewal_info(identifier).json()["suggestedWindow"]
    assert _parse_time(revoked["end"]) < _parse_time(info.headers["Date"], http=True) + (
        __import__("datetime").timedelta(minutes=5)
    )


def _parse_time(text: str, http: bool = False) -> Any:
    import datetime
    from email.utils import parsedate_to_datetime

    if http:
        return parsedate_to_datetime(text)
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


@pytest.mark.parametrize("bad", ["nodot", "a.b.c", "AAAA.%2F%2F", "aGVsbG8.gA", "x" * 300 + ".AQ"])
def test_renewal_info_for_a_bad_cert_id_is_malformed(env: Env, bad: str) -> None:
    response = requests.get(
        f"{env.server.https_url}/acme/renewal-info/{bad}",
        verify=str(env.server.tls_bundle),
        timeout=10,
    )
    assert response.status_code in (400, 404)
    assert response.json()["type"] == "urn:ietf:params:acme:error:malformed"


# -- profiles ---------------------------------------------------------------------------------


def test_profiles_choose_the_validity_and_unknown_ones_are_refused(env: Env) -> None:
    client = env.client()
    client.register()
    leaf, _, done = _issue(env, client, [("dns", "short.example.test")], profile="shortlived")
    assert done.body["profile"] == "shortlived"
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert lifetime <= __import__("datetime").timedelta(days=6, hours=1)
    # A profile names the template too: TLS client instead of the connector's server one.
    server_leaf, _, _ = _issue(env, client, [("dns", "server.example.test")])
    client_leaf, _, _ = _issue(
        env, client, [("dns", "client.example.test")], purpose="client_auth", profile="tlsclient"
    )
    for leaf, purpose in ((server_leaf, "SERVER_AUTH"), (client_leaf, "CLIENT_AUTH")):
        ekus = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert list(ekus) == [getattr(x509.oid.ExtendedKeyUsageOID, purpose)]
    with pytest.raises(AcmeClientError) as refused:
        client.new_order(["x.example.test"], profile="forever")
    assert refused.value.type == "invalidProfile"


# -- external account binding and identifier policy -------------------------------------------


def _eab_key(env: Env, **body: Any) -> tuple[str, bytes]:
    response = env.server.session().post(
        f"{env.server.https_url}/api/v1/connectors/private/eab-keys", json=body, timeout=10
    )
    assert response.status_code == 201, response.text
    data = response.json()
    return data["kid"], jws.b64url_decode(data["hmac_key"])


def test_eab_is_required_and_binds_one_account(env: Env) -> None:
    client = env.client("/private")
    with pytest.raises(AcmeClientError) as missing:
        client.register()
    assert missing.value.type == "externalAccountRequired"
    with pytest.raises(AcmeClientError) as no_terms:
        client.register(eab=_eab_key(env), agree=False)
    assert no_terms.value.type == "userActionRequired"
    kid, hmac_key = _eab_key(env, label="web team")
    created = client.register(eab=(kid, hmac_key))
    assert created.status == 201
    assert created.body["externalAccountBinding"]["kid"] == kid
    # One key, one account.
    with pytest.raises(AcmeClientError) as reused:
        env.client("/private").register(eab=(kid, hmac_key))
    assert reused.value.type == "unauthorized"
    listed = env.server.session().get(
        f"{env.server.https_url}/api/v1/connectors/private/eab-keys", timeout=10
    )
    entry = next(k for k in listed.json() if k["kid"] == kid)
    assert entry["account_id"] == (client.account_url or "").rsplit("/", 1)[-1]
    assert "hmac_key" not in entry


def test_eab_with_a_wrong_mac_or_a_revoked_key_is_unauthorized(env: Env) -> None:
    kid, hmac_key = _eab_key(env)
    before = _counts(env.core)
    with pytest.raises(AcmeClientError) as wrong:
        env.client("/private").register(eab=(kid, b"\x00" * len(hmac_key)))
    assert wrong.value.type == "unauthorized"
    revoked = env.server.session().delete(
        f"{env.server.https_url}/api/v1/connectors/private/eab-keys/{kid}", timeout=10
    )
    assert revoked.status_code == 200
    with pytest.raises(AcmeClientError) as gone:
        env.client("/private").register(eab=(kid, hmac_key))
    assert gone.value.type == "unauthorized"
    assert _counts(env.core)["acme_accounts"] == before["acme_accounts"]


def test_eab_keys_are_an_admin_resource(env: Env) -> None:
    anonymous = requests.post(
        f"{env.server.https_url}/api/v1/connectors/private/eab-keys",
        json={},
        verify=str(env.server.tls_bundle),
        timeout=10,
    )
    assert anonymous.status_code == 401


def test_identifier_policy_of_the_connector_and_of_the_eab_key(env: Env) -> None:
    client = env.client("/private")
    client.register(
        eab=_eab_key(env, allowed_identifiers={"dns_suffixes": ["web.corp.example.test"]})
    )
    with pytest.raises(AcmeClientError) as outside:
        client.new_order(["www.example.test", "a.web.corp.example.test"])
    assert outside.value.type == "rejectedIdentifier"
    assert [s["identifier"]["value"] for s in outside.value.problem["subproblems"]] == [
        "www.example.test"
    ]
    # Allowed by the connector (corp.example.test) but not by this account's key.
    with pytest.raises(AcmeClientError) as narrower:
        client.new_order(["mail.corp.example.test"])
    assert narrower.value.type == "rejectedIdentifier"
    assert client.new_order(["a.web.corp.example.test"]).status == 201


def test_ip_addresses_outside_the_connector_networks_are_rejected_identifiers(env: Env) -> None:
    # /private allows 127.0.0.0/8 only; this account's EAB key adds no policy of its own.
    client = env.client("/private")
    client.register(eab=_eab_key(env))
    before = _counts(env.core)
    with pytest.raises(AcmeClientError) as outside:
        client.new_order([("ip", "127.0.0.9"), ("ip", "10.0.0.1"), ("ip", "::1")])
    assert outside.value.type == "rejectedIdentifier" and outside.value.status == 400
    assert [s["identifier"] for s in outside.value.problem["subproblems"]] == [
        {"type": "ip", "value": "10.0.0.1"},
        {"type": "ip", "value": "::1"},
    ]
    assert _counts(env.core) == before
    assert client.new_order([("ip", "127.0.0.9")]).status == 201


def test_eab_key_default_profile_applies_to_its_orders(env: Env) -> None:
    client = env.client("/private")
    client.register(eab=_eab_key(env, default_profile="shortlived"))
    assert client.new_order(["p.corp.example.test"]).body["profile"] == "shortlived"


# -- rate limits --------------------------------------------------------------------------------


def test_new_orders_per_account_are_rate_limited(env: Env) -> None:
    client = env.client("/private")
    client.register(eab=_eab_key(env))
    for i in range(3):
        client.new_order([f"rl{i}.corp.example.test"])
    before = _counts(env.core)
    new_order = client.directory["newOrder"]
    payload = {"identifiers": [{"type": "dns", "value": "rl9.corp.example.test"}]}
    limited = client.raw_post(new_order, client.signed_body(new_order, payload))
    assert limited.status == 429 and _problem(limited) == "rateLimited"
    assert int(limited.headers["Retry-After"]) > 0
    assert _counts(env.core)["acme_orders"] == before["acme_orders"]


def test_failed_validations_per_identifier_are_rate_limited(env: Env) -> None:
    client = env.client("/private")
    client.register(eab=_eab_key(env))
    name = "fail.corp.example.test"
    order = client.new_order([name])
    challenge = next(
        c
        for c in client.get(order.body["authorizations"][0]).body["challenges"]
        if c["type"] == "http-01"
    )
    client.respond(challenge["url"])  # nothing is served: it fails
    assert client.wait(order.location or "", ["invalid"]).body["status"] == "invalid"
    retry = client.new_order([name])
    challenge = next(
        c
        for c in client.get(retry.body["authorizations"][0]).body["challenges"]
        if c["type"] == "http-01"
    )
    session = env.server.session()
    response = client.raw_post(challenge["url"], client.signed_body(challenge["url"], {}))
    assert response.status == 429, response.text
    assert response.body["type"] == "urn:ietf:params:acme:error:rateLimited"
    assert int(response.headers["Retry-After"]) > 0
    del session


# -- bad input ----------------------------------------------------------------------------------


def _tamper(body: bytes, part: str) -> bytes:
    document = json.loads(body)
    raw = jws.b64url_decode(document[part])
    flipped = bytes([raw[0] ^ 1]) + raw[1:] if raw else b"x"
    document[part] = jws.b64url_encode(flipped)
    return json.dumps(document).encode()


def _problem(response: Any) -> str:
    return str(response.body["type"]).removeprefix("urn:ietf:params:acme:error:")


def test_bad_requests_get_the_right_problem_and_change_nothing(env: Env) -> None:
    client = env.client()
    client.register()
    account = client.account_url or ""
    new_order = client.directory["newOrder"]
    payload = {"identifiers": [{"type": "dns", "value": "bad.example.test"}]}
    stranger_key = ec.generate_private_key(ec.SECP256R1())
    order = client.new_order(["bad-reads.example.test"])
    authorization = order.body["authorizations"][0]
    challenge = next(
        c["url"] for c in client.get(authorization).body["challenges"] if c["type"] == "http-01"
    )
    # Requests to other resources that are malformed (400) there: (case, url, payload).
    elsewhere: list[tuple[str, str, Any]] = [
        ("challenge response other than {}", challenge, {"x": 1}),
        ("newAccount signed with a kid", client.directory["newAccount"], {}),
        ("{} to read an order", order.location or "", {}),
        ("{} to read the orders list", f"{account}/orders", {}),
        ("{} to an authorization", authorization, {}),
    ]

    def signed(**kwargs: Any) -> bytes:
        return client.signed_body(new_order, payload, **kwargs)

    cases: list[tuple[str, bytes, str, int, str]] = [
        ("tampered payload", _tamper(signed(), "payload"), jws_type(), 400, "malformed"),
        ("tampered signature", _tamper(signed(), "signature"), jws_type(), 400, "malformed"),
        ("tampered header", _tamper(signed(), "protected"), jws_type(), 400, "malformed"),
        (
            "url mismatch",
            client.signed_body(new_order + "x", payload),
            jws_type(),
            403,
            "unauthorized",
        ),
        (
            "unknown kid",
            client.signed_body(
                new_order, payload, extra_header={"kid": account.rsplit("/", 1)[0] + "/nobody"}
            ),
            jws_type(),
            400,
            "accountDoesNotExist",
        ),
        (
            "jwk on new-order",
            client.signed_body(new_order, payload, use_jwk=True),
            jws_type(),
            400,
            "malformed",
        ),
        (
            "signed by another key",
            client.signed_body(new_order, payload, key=stranger_key),
            jws_type(),
            400,
            "malformed",
        ),
        ("not jose", signed(), "application/json", 415, "malformed"),
        ("not json", b"{not json", jws_type(), 400, "malformed"),
        ("empty", b"", jws_type(), 400, "malformed"),
        ("oversized", b"{" + b" " * (70 * 1024) + b"}", jws_type(), 413, "malformed"),
        (
            "bad nonce",
            client.signed_body(new_order, payload, nonce="A" * 54),
            jws_type(),
            400,
            "badNonce",
        ),
    ]
    # alg none and HS256 headers, hand-built.
    for alg in ("none", "HS256"):
        protected = jws.b64url_encode(
            json.dumps(
                {"alg": alg, "kid": account, "url": new_order, "nonce": client.new_nonce()}
            ).encode()
        )
        body = json.dumps(
            {
                "protected": protected,
                "payload": jws.b64url_encode(json.dumps(payload).encode()),
                "signature": "",
            }
        ).encode()
        cases.append((f"alg {alg}", body, jws_type(), 400, "badSignatureAlgorithm"))
    before = _counts(env.core)
    for name, body, content_type, status, problem in cases:
        response = client.raw_post(new_order, body, content_type)
        assert response.status == status, (name, response.status, response.text)
        assert _problem(response) == problem, (name, response.body)
        assert response.headers["Content-Type"].startswith("application/problem+json"), name
        assert response.headers.get("Replay-Nonce"), name
    for name, url, other_payload in elsewhere:
        response = client.raw_post(url, client.signed_body(url, other_payload))
        assert response.status == 400, (name, response.status, response.text)
        assert _problem(response) == "malformed", (name, response.body)
    after = _counts(env.core)
    assert after == before
    # Nor did a status change: the challenge was not answered.
    assert client.get(challenge).body["status"] == "pending"
    assert client.get(order.location or "").body["status"] == "pending"


def test_a_replayed_request_is_bad_nonce_and_not_executed_twice(env: Env) -> None:
    client = env.client()
    client.register()
    body = client.signed_body(
        client.directory["newOrder"],
        {"identifiers": [{"type": "dns", "value": "once.example.test"}]},
    )
    first = client.raw_post(client.directory["newOrder"], body)
    assert first.status == 201
    before = _counts(env.core)
    replay = client.raw_post(client.directory["newOrder"], body)
    assert replay.status == 400 and _problem(replay) == "badNonce"
    assert _counts(env.core) == before


@pytest.mark.parametrize(
    ("identifiers", "problem"),
    [
        ([], "malformed"),
        ([{"type": "email", "value": "a@example.test"}], "unsupportedIdentifier"),
        ([{"type": "dns", "value": "*.*.example.test"}], "rejectedIdentifier"),
        ([{"type": "dns", "value": "a..example.test"}], "rejectedIdentifier"),
        ([{"type": "dns", "value": "localhost"}], "rejectedIdentifier"),
        ([{"type": "dns", "value": "127.0.0.1"}], "malformed"),
        ([{"type": "ip", "value": "999.1.1.1"}], "malformed"),
        ([{"type": "dns", "value": "x" * 300 + ".test"}], "rejectedIdentifier"),
        # Found in review: "$" matched before a final newline; a zone made spellings of ::1.
        ([{"type": "dns", "value": "nl.example.test\n"}], "rejectedIdentifier"),
        ([{"type": "dns", "value": "evil\n.example.test"}], "rejectedIdentifier"),
        ([{"type": "ip", "value": "::1%1"}], "rejectedIdentifier"),
        # Several bad ones of different kinds: compound, one subproblem each (RFC 8555 6.7.1).
        (
            [
                {"type": "dns", "value": "ok.example.test"},
                {"type": "email", "value": "a@example.test"},
                {"type": "dns", "value": "localhost"},
            ],
            "compound",
        ),
    ],
)
def test_bad_identifiers_are_refused(env: Env, identifiers: list[Any], problem: str) -> None:
    client = env.client()
    client.register()
    before = _counts(env.core)
    response = client.raw_post(
        client.directory["newOrder"],
        client.signed_body(client.directory["newOrder"], {"identifiers": identifiers}),
    )
    assert response.status == 400, response.text
    assert _problem(response) == problem
    if problem == "compound":
        subproblems = response.body["subproblems"]
        assert [(_short(s["type"]), s["identifier"]["value"]) for s in subproblems] == [
            ("unsupportedIdentifier", "a@example.test"),
            ("rejectedIdentifier", "localhost"),
        ]
    assert _counts(env.core)["acme_orders"] == before["acme_orders"]


def _short(problem_type: str) -> str:
    return problem_type.removeprefix("urn:ietf:params:acme:error:")


def test_a_wildcard_order_offers_only_dns01_and_ip_orders_never_dns01(env: Env) -> None:
    client = env.client()
    client.register()
    order = client.new_order(["*.only-dns.example.test"])
    authz = client.get(order.body["authorizations"][0]).body
    assert [c["type"] for c in authz["challenges"]] == ["dns-01"]


def test_resources_of_another_account_are_not_found(env: Env) -> None:
    owner = env.client()
    owner.register()
    order = owner.new_order(["mine.example.test"])
    thief = env.client()
    thief.register()
    for url in (order.location or "", order.body["authorizations"][0]):
        with pytest.raises(AcmeClientError) as refused:
            thief.get(url)
        assert refused.value.status == 404
    with pytest.raises(AcmeClientError) as account:
        thief.get(owner.account_url or "")
    assert account.value.type == "unauthorized"


def test_certificate_ids_round_trip(env: Env) -> None:
    client = env.client()
    client.register()
    leaf, _, _ = _issue(env, client, [("dns", "certid.example.test")])
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    text = cert_id(leaf)
    left, right = text.split(".")
    assert base64.urlsafe_b64decode(left + "=" * (-len(left) % 4)) == aki.key_identifier
    assert int.from_bytes(base64.urlsafe_b64decode(right + "=" * (-len(right) % 4)), "big") == (
        leaf.serial_number
    )


def test_everything_issued_is_in_the_store_and_the_audit_chain_verifies(env: Env) -> None:
    client = env.client()
    client.register()
    leaf, _, _ = _issue(env, client, [("dns", "audited.example.test")])
    assert _status(env, leaf) == "ISSUED"
    report = env.core.audit.verify()
    assert report.ok, report
    with env.core.store.read() as conn:
        actions = set(conn.execute(select(schema.audit_events.c.action).distinct()).scalars())
    assert {"acme.account.create", "certificate.issue"} <= actions


def test_every_response_of_an_issuance_carries_a_fresh_nonce(env: Env) -> None:
    """Successes too (RFC 8555 6.5): account, order, authorization, challenge, polls,
    finalize, certificate, renewalInfo and revocation each answer with a nonce never seen
    before, so a client never needs newNonce after its first request."""
    client = env.client()
    answers: list[tuple[str, int, str | None]] = []
    post = client.raw_post

    def recording(url: str, body: bytes, content_type: str = "application/jose+json") -> Any:
        response = post(url, body, content_type)
        answers.append((url, response.status, response.headers.get("Replay-Nonce")))
        return response

    client.raw_post = recording  # type: ignore[method-assign]
    client.register()
    leaf, _, _ = _issue(env, client, [("dns", "nonces.example.test")])
    client.revoke(leaf)
    renewal = client.renewal_info(cert_id(leaf))
    answers.append(("renewalInfo", renewal.status_code, renewal.headers.get("Replay-Nonce")))
    assert {status for _, status, _ in answers} <= {200, 201}, answers
    assert len(answers) >= 8
    assert all(nonce for _, _, nonce in answers), [a for a in answers if not a[2]]
    nonces = [nonce for _, _, nonce in answers]
    assert len(set(nonces)) == len(nonces)


def test_directory_and_errors_carry_a_fresh_nonce(env: Env) -> None:
    session = env.server.session()
    directory = session.get(env.directory(), timeout=10)
    assert directory.headers["Replay-Nonce"]
    huge = session.post(
        f"{env.server.https_url}/acme/new-order",
        data=b"x" * (2 * 1024 * 1024),
        headers={"Content-Type": jws_type()},
        timeout=30,
    )
    assert huge.status_code == 413
    assert huge.json()["type"] == "urn:ietf:params:acme:error:malformed"
    assert huge.headers["Replay-Nonce"]


def _nonce_gateway(tmp_path: Path, database_url: str | None, *, bootstrap: bool = True) -> Any:
    from pkigate.gateways.config import parse_config
    from pkigate.gateways.runtime import Gateway

    return Gateway.open(parse_config(_nonce_config(tmp_path, database_url)), bootstrap=bootstrap)


def _nonce_config(tmp_path: Path, database_url: str | None) -> str:
    text = f"data_dir = '{tmp_path / 'data'}'"
    if database_url:
        text += f"\ndatabase_url = '{database_url}'"
    return text


def _acme_connector(gateway: Any) -> Any:
    from pkigate.acme.connector import AcmeConnector

    (connector,) = [c for c in gateway.connectors if isinstance(c, AcmeConnector)]
    return connector


def test_a_nonce_is_spent_once_in_every_process_and_purged_when_expired(
    tmp_path: Path, database_url: str | None
) -> None:
    """SQLite store: the nonce book is a file of this boot beside it; PostgreSQL: unlogged
    tables of the store. Another process (a second gunicorn worker, another host) sees the
    same spends."""
    from pkigate.acme.nonces import (
        NONCE_BOOK_PREFIX,
        NONCE_LIFETIME,
        LocalNonceBook,
        Spend,
        UnloggedNonceBook,
    )

    gateway = _nonce_gateway(tmp_path, database_url)
    try:
        nonces = _acme_connector(gateway).nonces
        assert isinstance(nonces.book, UnloggedNonceBook if database_url else LocalNonceBook)
        now = gateway.core.clock()
        live, spent_elsewhere = nonces.mint(now), nonces.mint(now)
        assert nonces.spend(nonces.open(live, now)) is Spend.SPENT
        assert nonces.spend(nonces.open(live, now)) is Spend.REPLAYED
        script = (
            "from datetime import UTC, datetime\n"
            "from pkigate.gateways.config import parse_config\n"
            "from pkigate.gateways.runtime import Gateway\n"
            "from pkigate.acme.connector import AcmeConnector\n"
            f"gateway = Gateway.open(parse_config({_nonce_config(tmp_path, database_url)!r}))\n"
            "(c,) = [c for c in gateway.connectors if isinstance(c, AcmeConnector)]\n"
            "now = datetime.now(UTC)\n"
            f"print(c.nonces.spend(c.nonces.open({live!r}, now)).value,"
            f" c.nonces.spend(c.nonces.open({spent_elsewhere!r}, now)).value)\n"
            "gateway.close()\n"
        )
        other = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
        )
        assert other.stdout.split() == ["replayed", "spent"], other.stderr
        assert nonces.spend(nonces.open(spent_elsewhere, now)) is Spend.REPLAYED
        # Expired spends are forgotten (they are refused as expired anyway).
        later = now + NONCE_LIFETIME + timedelta(minutes=1)
        assert nonces.purge(later) == 2
        if database_url is None:
            assert list(gateway.core.data_dir.glob(f"{NONCE_BOOK_PREFIX}*.sqlite3"))
    finally:
        gateway.close()


def test_a_nonce_from_before_a_restart_is_refused_after_it(
    tmp_path: Path, database_url: str | None
) -> None:
    from pkigate.acme.nonces import Spend

    gateway = _nonce_gateway(tmp_path, database_url)
    now = gateway.core.clock()
    try:
        before = _acme_connector(gateway).nonces.mint(now)
    finally:
        gateway.close()
    restarted = _nonce_gateway(tmp_path, database_url)
    try:
        nonces = _acme_connector(restarted).nonces
        assert nonces.spend(nonces.open(before, now)) is Spend.STALE
        fresh = nonces.mint(now)
        assert nonces.spend(nonces.open(fresh, now)) is Spend.SPENT
    finally:
        restarted.close()


def test_a_lost_nonce_book_refuses_every_earlier_nonce(
    tmp_path: Path, database_url: str | None
) -> None:
    """What a crash can cost the non-durable book (a reboot under a SQLite store; crash
    recovery emptying PostgreSQL's unlogged tables) takes the live generation with it: a
    nonce spent before the loss, or handed out and not spent, is never accepted after."""
    from sqlalchemy import text

    from pkigate.acme.nonces import LocalNonceBook, Spend

    gateway = _nonce_gateway(tmp_path, database_url)
    try:
        nonces = _acme_connector(gateway).nonces
        now = gateway.core.clock()
        spent, unspent = nonces.mint(now), nonces.mint(now)
        assert nonces.spend(nonces.open(spent, now)) is Spend.SPENT
        if database_url is None:
            # The next boot has another boot id, hence another (empty) book file.
            nonces.book = LocalNonceBook(gateway.core.data_dir, boot="0" * 32)
        else:
            with gateway.core.store.write() as conn:
                conn.execute(text("TRUNCATE acme_spent_nonces, acme_nonce_epoch"))
        # A worker that has not noticed yet refuses them as stale, like any other.
        assert nonces.spend(nonces.open(spent, now)) is Spend.STALE
        assert nonces.spend(nonces.open(unspent, now)) is Spend.STALE
        fresh = nonces.mint(now)
        assert nonces.spend(nonces.open(fresh, now)) is Spend.SPENT
        assert nonces.spend(nonces.open(spent, now)) is Spend.STALE
    finally:
        gateway.close()


def test_after_a_restart_an_earlier_nonce_is_bad_and_the_answer_carries_a_usable_one(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    key = ec.generate_private_key(ec.SECP256R1())
    server = start_server(data, workers=2)
    try:
        before = AcmeClient(f"{server.https_url}/acme/directory", key, server.session())
        nonce = before.new_nonce()
    finally:
        server.stop()
    server = start_server(data, workers=2)
    try:
        client = AcmeClient(f"{server.https_url}/acme/directory", key, server.session())
        url = client.directory["newAccount"]
        payload = {"termsOfServiceAgreed": True}
        stale = client.session.post(
            url,
            data=client.signed_body(url, payload, nonce=nonce),
            headers={"Content-Type": jws_type()},
            timeout=10,
        )
        assert stale.status_code == 400, stale.text
        assert stale.json()["type"] == "urn:ietf:params:acme:error:badNonce"
        fresh = stale.headers["Replay-Nonce"]
        created = client.session.post(
            url,
            data=client.signed_body(url, payload, nonce=fresh),
            headers={"Content-Type": jws_type()},
            timeout=10,
        )
        assert created.status_code == 201, created.text
    finally:
        server.stop()


def _cross_sign(issuing: x509.Certificate) -> tuple[x509.Certificate, x509.Certificate]:
    """A second root and a cross-certificate for the issuing CA's name and key."""
    import datetime

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Cross Root")])
    now = datetime.datetime.now(datetime.UTC)
    root = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    ski = issuing.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cross = (
        x509.CertificateBuilder()
        .subject_name(issuing.subject)
        .issuer_name(name)
        .public_key(issuing.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1000))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), True
        )
        .add_extension(ski, False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return root, cross


def test_an_alternate_chain_is_offered_with_link_alternate(tmp_path: Path) -> None:
    responder = Http01Responder()
    config = f"""
[[connectors]]
type = "acme"
name = "acme"
mount = "/acme"
[connectors.settings]
http01_port = {responder.port}
"""
    data = tmp_path / "data"
    try:
        start_server(data, extra_config=config).stop()
        core = Core.open(data)
        (issuing_view,) = [v for v in core.authorities.list_cas() if v.record.type == "SUBORDINATE"]
        issuing_pem, _ = core.authorities.certificate_pem(issuing_view.record.id)
        core.close()
        cross_root, cross = _cross_sign(x509.load_pem_x509_certificate(issuing_pem.encode()))
        chain_file = tmp_path / "cross.pem"
        chain_file.write_bytes(cross.public_bytes(serialization.Encoding.PEM))
        server = start_server(data, extra_config=config + f'alternate_chains = ["{chain_file}"]\n')
        try:
            client = AcmeClient(
                f"{server.https_url}/acme/directory",
                ec.generate_private_key(ec.SECP256R1()),
                server.session(),
            )
            client.register()
            names = [("ip", "127.0.0.1")]
            order = client.new_order(names)
            authz = client.get(order.body["authorizations"][0]).body
            challenge = next(c for c in authz["challenges"] if c["type"] == "http-01")
            responder.tokens[challenge["token"]] = jws.key_authorization(
                challenge["token"], client.thumbprint
            )
            client.respond(challenge["url"])
            ready = client.wait(order.location or "", ["ready", "invalid"])
            done = client.finalize(ready, _csr(names)[0])
            default = client.get(done.body["certificate"])
            alternate_url = default.link("alternate")
            assert alternate_url == done.body["certificate"] + "/1"
            alternate = client.get(alternate_url)
            assert alternate.link("alternate") == done.body["certificate"]
            chain = x509.load_pem_x509_certificates(alternate.text.encode())
            assert chain[1] == cross
            root_pem = cross_root.public_bytes(serialization.Encoding.PEM)
            check_issued(chain, root_pem, names)
            check_issued(
                x509.load_pem_x509_certificates(default.text.encode()),
                server.tls_bundle.read_bytes(),
                names,
            )
        finally:
            server.stop()
    finally:
        responder.close()


def test_an_order_left_processing_by_a_crash_is_settled(env: Env) -> None:
    from pkigate.core import IssuanceRequest, Requester, Validity
    from pkigate.core.store import acme as acme_store

    client = env.client()
    client.register()
    names = [("dns", "crash1.example.test"), ("dns", "crash2.example.test")]
    orders = []
    for name in names:
        order = client.new_order([name])
        _solve(env, client, order)
        orders.append(client.wait(order.location or "", ["ready"]))
    long_ago = env.core.clock() - timedelta(minutes=5)
    interrupted_ids = [(o.location or "").rsplit("/", 1)[1] for o in orders]
    # The first crashed after the core issued; the second before.
    ca_id = next(
        v.record.id for v in env.core.authorities.list_cas() if v.record.type == "SUBORDINATE"
    )
    issued = env.core.issue(
        IssuanceRequest(
            ca_id=ca_id,
            csr=_csr([names[0]])[0],
            validity=Validity.parse("90d"),
            requester=Requester("acme-account:test", "acme"),
            template="EndEntityServerAuthCertificate_APIPassthrough/V1",
            idempotency_token=f"acme-order-{interrupted_ids[0]}",
        )
    )
    with env.core.store.write() as conn:
        for order_id in interrupted_ids:
            assert acme_store.update_order(
                conn, order_id, long_ago, status="processing", expected_status="ready"
            )
    settled = client.get(orders[0].location or "")
    assert settled.body["status"] == "valid"
    chain = client.certificate_chain(settled.body["certificate"])
    assert chain[0].serial_number == issued.certificate.serial_number
    again = client.get(orders[1].location or "")
    assert again.body["status"] == "ready"
    assert client.finalize(again, _csr([names[1]])[0]).body["status"] == "valid"


def test_nonces_expire_and_only_their_own_spelling_is_accepted() -> None:
    import os
    from datetime import UTC, datetime

    from pkigate.acme.nonces import NONCE_LIFETIME, NonceMinter
    from pkigate.core.keys import KeyEncryptionKey

    now = datetime.now(UTC)
    minter = NonceMinter(KeyEncryptionKey(os.urandom(32)))
    nonce = minter.mint(now, 7)
    ticket = minter.open(nonce, now)
    assert ticket is not None and ticket.generation == 7
    assert minter.open(nonce, now + NONCE_LIFETIME + timedelta(seconds=1)) is None
    # Another key (another deployment) does not accept it.
    assert NonceMinter(KeyEncryptionKey(os.urandom(32))).open(nonce, now) is None
    # The unused low bits of the last character give other spellings of the same bytes.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    spellings = [nonce[:-1] + c for c in alphabet]
    assert [s for s in spellings if minter.open(s, now) is not None] == [nonce]
    assert minter.open(nonce[:-2], now) is None


def test_an_order_being_finalized_says_retry_after(env: Env) -> None:
    from pkigate.core.store import acme as acme_store

    client = env.client()
    client.register()
    order = client.new_order(["busy.example.test"])
    _solve(env, client, order)
    client.wait(order.location or "", ["ready"])
    order_id = (order.location or "").rsplit("/", 1)[1]
    with env.core.store.write() as conn:
        assert acme_store.update_order(
            conn, order_id, env.core.clock(), status="processing", expected_status="ready"
        )
    busy = client.get(order.location or "")
    assert busy.body["status"] == "processing"
    assert busy.headers["Retry-After"] == "1"
