"""A generated static SCEP challenge lives in the store, sealed under the KEK, so that every
host behind one name hands out the same one; a challenge an earlier version generated into
a data directory is imported once."""

from __future__ import annotations

import base64
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.x509.oid import NameOID
from helpers import fresh_postgres_database, scep_static_challenge
from serving import RunningServer, start_server
from sqlalchemy import select

from pkigate.core.store import schema
from pkigate.devsim.scep_client import (
    ScepClient,
    certificate_request,
    new_key,
    new_transaction_id,
    self_signed,
)
from pkigate.gateways.config import parse_config
from pkigate.gateways.runtime import Gateway
from pkigate.scep.authorization import static_challenge_secret_name
from pkigate.scep.messages import PkiStatus

NAME = static_challenge_secret_name("scep")


def enroll(server: RunningServer, challenge: str, cn: str) -> PkiStatus:
    """One PKCSReq through ``server`` with the project's SCEP client."""
    session = requests.Session()
    session.trust_env = False
    client = ScepClient(f"{server.http_url}/scep", session)
    ca = client.get_ca_cert()
    key = new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    rep = client.enroll(
        ca,
        self_signed(key, subject),
        key,
        certificate_request(key, subject, challenge),
        new_transaction_id(),
    )
    return rep.status


@pytest.fixture
def shared_kek(monkeypatch: pytest.MonkeyPatch) -> str:
    kek = base64.b64encode(secrets.token_bytes(32)).decode()
    monkeypatch.setenv("PKIGATE_KEK", kek)  # the servers inherit it
    return kek


@pytest.fixture
def two_hosts(
    tmp_path: Path, postgres_server: str, shared_kek: str
) -> Iterator[tuple[RunningServer, RunningServer]]:
    database = fresh_postgres_database(postgres_server)
    first = start_server(tmp_path / "host-a" / "data", database_url=database)
    try:
        second = start_server(tmp_path / "host-b" / "data", database_url=database)
        try:
            yield first, second
        finally:
            second.stop()
    finally:
        first.stop()


def test_two_hosts_on_one_postgresql_hand_out_the_same_generated_challenge(
    two_hosts: tuple[RunningServer, RunningServer],
) -> None:
    first, second = two_hosts
    challenge = scep_static_challenge(first.config)
    assert scep_static_challenge(second.config) == challenge
    assert len(challenge) >= 32
    # A device given the challenge enrolls through either host behind the shared name.
    assert enroll(first, challenge, "device-through-a") is PkiStatus.SUCCESS
    assert enroll(second, challenge, "device-through-b") is PkiStatus.SUCCESS
    # Nothing of it in either data directory: the store holds it, sealed.
    for server in (first, second):
        assert not list(server.data_dir.glob("scep-*-challenge"))


def test_the_challenge_is_sealed_in_the_store_not_kept_in_clear(
    tmp_path: Path, shared_kek: str
) -> None:
    gateway = Gateway.open(parse_config(f"data_dir = '{tmp_path / 'data'}'"), bootstrap=True)
    try:
        challenge = gateway.core.secrets.get(NAME)
        assert challenge is not None
        c = schema.sealed_secrets.c
        with gateway.core.store.read() as conn:
            sealed = conn.execute(select(c.sealed).where(c.name == NAME)).scalar_one()
        assert challenge.encode() not in sealed
        events = [e for e in gateway.core.audit.events() if e.action == "secret.create"]
        assert [(e.resource, e.result) for e in events] == [(f"secret/{NAME}", "success")]
        assert challenge not in events[0].parameters
    finally:
        gateway.close()


def test_a_challenge_file_from_an_earlier_version_is_imported_once_then_removed(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    legacy = data / "scep-scep-challenge"
    legacy.write_text("the-challenge-devices-already-have\n")
    os.chmod(legacy, 0o600)
    config = parse_config(f"data_dir = '{data}'")
    gateway = Gateway.open(config, bootstrap=True)
    try:
        assert gateway.core.secrets.get(NAME) == "the-challenge-devices-already-have"
        assert not legacy.exists()
    finally:
        gateway.close()
    # From now on the store is the source of truth: a file that appears again (a restored
    # backup) does not replace it.
    legacy.write_text("an-old-backup-of-another-challenge\n")
    gateway = Gateway.open(config)
    try:
        assert gateway.core.secrets.get(NAME) == "the-challenge-devices-already-have"
        (connector,) = [c for c in gateway.connectors if c.context.name == "scep"]
        assert connector.startup_notes() == [
            "generated static challenge kept in the store: `pkigate scep static-challenge "
            "--connector scep` prints it"
        ]
        assert not legacy.exists()
    finally:
        gateway.close()
