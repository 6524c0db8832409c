"""The SCEP connector's failed-challenge limits under concurrent guessing, on SQLite and
PostgreSQL: checked and counted in one step (never more guesses evaluated than the limit),
per client address, per transactionID and per static challenge (all addresses together),
and never in the way of a device with a valid one-time challenge."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import AttributeOID, NameOID
from flask import Flask
from sqlalchemy import select

from pkigate.core import Actor, Core
from pkigate.core.store import schema
from pkigate.gateways.app import create_app
from pkigate.gateways.config import parse_config
from pkigate.gateways.runtime import Gateway
from pkigate.scep.connector import ScepConnector
from pkigate.scep.messages import CertRep, MessageType, PkiStatus, build_pki_message, parse_cert_rep

STATIC = "the-static-challenge"
WRONG = "wrong challenge password"
TOO_MANY = "too many failed challenge attempts; try again later"


@dataclass
class Env:
    gateway: Gateway
    app: Flask
    ra: x509.Certificate

    @property
    def connector(self) -> ScepConnector:
        (found,) = self.gateway.connectors
        assert isinstance(found, ScepConnector)
        return found

    def failure_count(self, scope: str, value: str) -> int:
        c = schema.scep_failures.c
        with self.gateway.core.store.read() as conn:
            count = conn.execute(
                select(c.count).where(c.connector == "scep", c.scope == scope, c.value == value)
            ).scalar()
        return int(count or 0)


@pytest.fixture
def env(tmp_path: Path, database_url: str | None) -> Iterator[Env]:
    database = f"database_url = '{database_url}'" if database_url else ""
    config = parse_config(f"""
data_dir = '{tmp_path / "data"}'
{database}
[[connectors]]
type = "scep"
name = "scep"
mount = "/scep"
ca = "issuing"
[connectors.settings]
challenge = "{STATIC}"
max_failures = 5
max_static_challenge_failures = 8
""")
    gateway = Gateway.open(config, bootstrap=True)
    app = create_app(gateway, "http")
    response = app.test_client().get("/scep?operation=GetCACert")
    ra = pkcs7.load_der_pkcs7_certificates(response.data)[0]
    yield Env(gateway, app, ra)
    gateway.close()


class Device:
    """One key and its self-signed certificate; 2048-bit RSA keys are slow to make, so the
    tests' many guesses share a few devices, each guess with its own transactionID."""

    def __init__(self, cn: str = "device-1") -> None:
        self.cn = cn
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        now = datetime.now(UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(now + timedelta(days=1))
            .sign(self.key, hashes.SHA256())
        )

    def message(self, env: Env, challenge: str, transaction_id: str | None = None) -> bytes:
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.cn)]))
            .add_attribute(AttributeOID.CHALLENGE_PASSWORD, challenge.encode())
            .sign(self.key, hashes.SHA256())
        )
        return build_pki_message(
            MessageType.PKCS_REQ,
            csr.public_bytes(serialization.Encoding.DER),
            transaction_id or uuid.uuid4().hex,
            self.certificate,
            self.key,
            env.ra,
            cipher="aes128",
        )

    def send(self, env: Env, body: bytes, address: str) -> CertRep:
        response = env.app.test_client().post(
            "/scep?operation=PKIOperation",
            data=body,
            headers={"Content-Type": "application/x-pki-message"},
            environ_base={"REMOTE_ADDR": address},
        )
        assert response.status_code == 200, response.text
        return parse_cert_rep(response.data, self.key, [env.ra])


def send_at_once(env: Env, guesses: list[tuple[Device, bytes, str]]) -> Counter[str]:
    """Send every (device, message, client address) at the same moment, each from its own
    thread; the answers' failInfo texts (or "issued"), counted."""
    start = threading.Barrier(len(guesses))

    def one(guess: tuple[Device, bytes, str]) -> str:
        device, body, address = guess
        start.wait()
        rep = device.send(env, body, address)
        return "issued" if rep.status is PkiStatus.SUCCESS else str(rep.fail_info_text)

    with ThreadPoolExecutor(len(guesses)) as pool:
        return Counter(pool.map(one, guesses))


def test_concurrent_guesses_from_one_address_evaluate_no_more_than_the_limit(env: Env) -> None:
    device = Device()
    guesses = [(device, device.message(env, f"guess-{n}"), "192.0.2.50") for n in range(40)]
    answers = send_at_once(env, guesses)
    assert answers == Counter({WRONG: 5, TOO_MANY: 35})
    assert env.failure_count("address", "192.0.2.50") == 5
    # The right static challenge, too late: the address is past its limit.
    assert device.send(env, device.message(env, STATIC), "192.0.2.50").fail_info_text == TOO_MANY


def test_concurrent_guesses_with_one_transaction_id_evaluate_no_more_than_the_limit(
    env: Env,
) -> None:
    device = Device()
    guesses = [
        (device, device.message(env, f"guess-{n}", transaction_id="one-transaction"), f"10.0.0.{n}")
        for n in range(20)
    ]
    assert send_at_once(env, guesses) == Counter({WRONG: 5, TOO_MANY: 15})
    assert env.failure_count("transaction", "one-transaction") == 5


def test_guesses_from_many_addresses_hit_the_static_challenges_own_limit(env: Env) -> None:
    # 20 addresses x 5 guesses: each address stays within its own limit of 5, but the
    # static challenge takes 8 failures in a window from all of them together.
    devices = [Device(f"device-{n}") for n in range(4)]
    guesses = [
        (devices[n % 4], devices[n % 4].message(env, f"guess-{n}"), f"198.51.100.{n // 5}")
        for n in range(100)
    ]
    answers = send_at_once(env, guesses)
    assert answers == Counter({WRONG: 8, TOO_MANY: 92})
    assert env.failure_count("static", "static") == 8
    # The static challenge is locked for everyone, even a fresh address with the right one.
    device = devices[0]
    assert device.send(env, device.message(env, STATIC), "203.0.113.1").fail_info_text == TOO_MANY
    # One-time challenges are not: a device with one enrolls.
    issued = env.connector.authority.create_challenge(
        Actor("mdm"), ttl=timedelta(hours=1), subject="CN=device-0"
    )
    rep = device.send(env, device.message(env, issued.secret), "203.0.113.1")
    assert rep.status is PkiStatus.SUCCESS, rep.fail_info_text


def test_a_right_static_challenge_is_not_counted_as_a_failure(env: Env) -> None:
    device = Device()
    for _ in range(12):
        rep = device.send(env, device.message(env, STATIC), "192.0.2.60")
        assert rep.status is PkiStatus.SUCCESS, rep.fail_info_text
    assert env.failure_count("address", "192.0.2.60") == 0
    assert env.failure_count("static", "static") == 0


def test_a_locked_address_still_enrolls_with_a_valid_one_time_challenge(env: Env) -> None:
    # An attacker behind the devices' NAT guesses until the shared address is locked.
    attacker = Device("attacker")
    for n in range(5):
        rep = attacker.send(env, attacker.message(env, f"guess-{n}"), "192.0.2.70")
        assert rep.fail_info_text == WRONG
    honest = Device("device-7")
    assert honest.send(env, honest.message(env, STATIC), "192.0.2.70").fail_info_text == TOO_MANY
    issued = env.connector.authority.create_challenge(
        Actor("mdm"), ttl=timedelta(hours=1), subject="CN=device-7"
    )
    rep = honest.send(env, honest.message(env, issued.secret), "192.0.2.70")
    assert rep.status is PkiStatus.SUCCESS, rep.fail_info_text
    assert rep.certificates[0].subject.rfc4514_string() == "CN=device-7"
    # Guesses from the address still count, and are still refused unevaluated.
    rep = attacker.send(env, attacker.message(env, "guess-again"), "192.0.2.70")
    assert rep.fail_info_text == TOO_MANY
    # A spent, or someone else's, one-time challenge is a guess like any other.
    rep = attacker.send(env, attacker.message(env, issued.secret), "192.0.2.70")
    assert rep.fail_info_text == TOO_MANY


def test_an_attempt_taken_back_leaves_the_counter_as_it_was(core: Core) -> None:
    # What the webhook path does with an allowed (or unanswered) attempt.
    from pkigate.core.store import scep as scep_store

    now, window = core.clock(), timedelta(minutes=10)

    def count() -> datetime | None:
        with core.store.write() as conn:
            return scep_store.count_attempt(
                conn, "mdm", "address", "192.0.2.1", limit=2, now=now, window=window
            )

    first = count()
    assert first is not None and count() == first
    assert count() is None  # at the limit: not counted
    with core.store.write() as conn:
        scep_store.uncount_attempt(conn, "mdm", "address", "192.0.2.1", first)
    assert count() == first  # room for one again
    assert count() is None
    # A window that has passed starts over.
    with core.store.write() as conn:
        assert (
            scep_store.count_attempt(
                conn, "mdm", "address", "192.0.2.1", limit=2, now=now + window, window=window
            )
            == now + window
        )
