"""Helpers shared by the tests (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from sqlalchemy import select

from pkigate.core import Actor, CASpec, CAType, CAView, Core
from pkigate.core.der import tlv
from pkigate.core.names import parse_dn
from pkigate.core.store import schema


class Clock:
    """A clock the tests can move forward."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def advance(self, delta: timedelta) -> None:
        self.offset += delta


ACTOR = Actor("test-admin", "test")


def create_root(core: Core, cn: str = "Test Root", **kwargs: object) -> CAView:
    return core.authorities.create(
        CASpec(CAType.ROOT, parse_dn(f"CN={cn},O=pkigate tests"), **kwargs),  # type: ignore[arg-type]
        ACTOR,
    )


def create_sub(core: Core, parent: CAView, cn: str = "Test Issuing CA", **kwargs: object) -> CAView:
    return core.authorities.create(
        CASpec(
            CAType.SUBORDINATE,
            parse_dn(f"CN={cn},O=pkigate tests"),
            parent_ca_id=parent.record.id,
            **kwargs,
        ),  # type: ignore[arg-type]
        ACTOR,
    )


def make_key(kind: str = "ec") -> CertificateIssuerPrivateKeyTypes:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def make_csr(
    cn: str | None = "host.example.test",
    sans: list[x509.GeneralName] | None = None,
    key: CertificateIssuerPrivateKeyTypes | None = None,
    extensions: list[tuple[x509.ExtensionType, bool]] | None = None,
) -> bytes:
    key = key or make_key()
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        parse_dn(f"CN={cn}") if cn else x509.Name([])
    )
    if sans is None and cn:
        sans = [x509.DNSName(cn)]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    for ext, critical in extensions or []:
        builder = builder.add_extension(ext, critical)
    algorithm = (
        hashes.SHA256() if isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) else None
    )
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)


def fresh_postgres_database(server: str) -> str:
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{server}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{server}/{name}"


def downgrade_store(url: str, revision: str) -> None:
    """Take the store at ``url`` back to schema ``revision`` with alembic itself: an older
    pkigate's store, for the tests of a migration."""
    from alembic import command
    from alembic.config import Config

    from pkigate.core.store.engine import MIGRATIONS_DIR, create_store_engine

    engine = create_store_engine(url)
    try:
        with engine.begin() as conn:
            config = Config()
            config.set_main_option("script_location", str(MIGRATIONS_DIR))
            config.attributes["connection"] = conn
            command.downgrade(config, revision)
    finally:
        engine.dispose()


def stale_first_scep_transaction_lookup(monkeypatch: Any) -> None:
    """The SCEP connector's next transaction lookup answers "none yet", as it does for a
    copy of a request that looked before its concurrent twin recorded it; later lookups
    read the store."""
    from pkigate.scep import connector as scep_connector

    lookups = [0]
    real_lookup = scep_connector.scep_store.get_transaction

    def stale_first_lookup(conn: Any, connector: str, transaction_id: str) -> Any:
        lookups[0] += 1
        return None if lookups[0] == 1 else real_lookup(conn, connector, transaction_id)

    monkeypatch.setattr(scep_connector.scep_store, "get_transaction", stale_first_lookup)


def key_usage(*names: str) -> x509.KeyUsage:
    """A KeyUsage asserting exactly ``names`` (its attribute names, e.g. "crl_sign")."""
    return x509.KeyUsage(
        **{
            attr: attr in names
            for attr in (
                "digital_signature",
                "content_commitment",
                "key_encipherment",
                "data_encipherment",
                "key_agreement",
                "key_cert_sign",
                "crl_sign",
                "encipher_only",
                "decipher_only",
            )
        }
    )


def raw_csr(key: rsa.RSAPrivateKey, subject: bytes, attributes: bytes = b"") -> bytes:
    """A PKCS#10 written byte by byte, signed with ``key`` (RSA, SHA-256): for subjects and
    attributes (given as DER) that the CSR builders refuse to make."""
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    info = tlv(0x30, b"\x02\x01\x00", subject, spki, tlv(0xA0, attributes))
    signature = key.sign(info, padding.PKCS1v15(), hashes.SHA256())
    sha256_rsa = bytes.fromhex("300d06092a864886f70d01010b0500")
    return tlv(0x30, info, sha256_rsa, tlv(0x03, b"\x00", signature))


def scep_static_challenge(config: Path, connector: str = "scep") -> str:
    """A SCEP connector's static challenge, read as an operator reads it: `pkigate scep
    static-challenge` on the server's configuration (generated ones live in the store)."""
    pkigate = str(Path(sys.executable).parent / "pkigate")
    done = subprocess.run(
        [pkigate, "scep", "--config", str(config), "static-challenge", "--connector", connector],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


# -- names cryptography loads but refuses when they are read ----------------------------------

OID_COMMON_NAME = bytes.fromhex("0603550403")


def name_der(*rdns: tuple[bytes, ...]) -> bytes:
    """A Name from RDNs given as tuples of whole AttributeTypeAndValue encodings."""
    return tlv(0x30, *(tlv(0x31, *rdn) for rdn in rdns))


def common_name(value: bytes) -> bytes:
    """AttributeTypeAndValue for the common name with ``value`` (a whole TLV, of any type)."""
    return tlv(0x30, OID_COMMON_NAME, value)


# A BIT STRING is allowed only in x500UniqueIdentifier: anywhere else cryptography raises
# TypeError (not ValueError) when the name is read.
BIT_STRING_CN = name_der((common_name(tlv(0x03, b"\x00abc")),))
# X.501: the attributes of one RDN have distinct types; cryptography raises ValueError.
CN_TWICE_IN_ONE_RDN = name_der((common_name(tlv(0x0C, b"a")), common_name(tlv(0x0C, b"a"))))


def extension_request(*extensions: bytes) -> bytes:
    """A PKCS#10 extensionRequest attribute holding ``extensions`` (whole DER Extensions)."""
    oid = bytes.fromhex("06092a864886f70d01090e")
    return tlv(0x30, oid, tlv(0x31, tlv(0x30, *extensions)))


def san_extension(*general_names: bytes) -> bytes:
    return tlv(0x30, bytes.fromhex("0603551d11"), tlv(0x04, tlv(0x30, *general_names)))


def with_subject(certificate: x509.Certificate, subject: bytes, key: rsa.RSAPrivateKey) -> bytes:
    """``certificate`` (DER) with its subject replaced by ``subject`` and signed again by
    ``key``: for certificates whose names the builders refuse to write."""
    tbs = certificate.tbs_certificate_bytes
    old = certificate.subject.public_bytes()
    header = 2 if tbs[1] < 0x80 else 2 + (tbs[1] & 0x7F)
    body = tbs[header:]
    at = body.rindex(old)  # the subject follows the validity; the issuer comes before
    tbs = tlv(0x30, body[:at] + subject + body[at + len(old) :])
    signature = key.sign(tbs, padding.PKCS1v15(), hashes.SHA256())
    sha256_rsa = bytes.fromhex("300d06092a864886f70d01010b0500")
    return tlv(0x30, tbs, sha256_rsa, tlv(0x03, b"\x00", signature))


def adcs_refusals(core: Core) -> list[dict[str, Any]]:
    """The AD-style connectors' audited refusals, oldest first: each event's parameters with
    its action and actor."""
    c = schema.audit_events.c
    with core.store.read() as conn:
        rows = conn.execute(
            select(c.action, c.parameters, c.actor)
            .where(c.action.like("adcs.%"), c.result == "failure")
            .order_by(c.seq)
        ).all()
    return [{**json.loads(r.parameters), "action": r.action, "actor": r.actor} for r in rows]
