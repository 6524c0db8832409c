"""Kerberos (HTTP Negotiate, RFC 4559) on the AD-style connector, with MIT krb5 on both
sides: MIT GSSAPI accepts in `pkigate serve`; tokens that name nobody are refused and
audited."""

from __future__ import annotations

import base64
import json
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from adcs_directory_fixture import make_dev_directory_fixture
from serving import RunningServer, start_server
from sqlalchemy import select

from pkigate.adcs import soap
from pkigate.adcs.directory import DevDirectory
from pkigate.core import Core
from pkigate.core.der import tlv
from pkigate.core.store import schema

dev_directory = make_dev_directory_fixture("module")

SPNEGO_OID = bytes.fromhex("2b0601050502")  # 1.3.6.1.5.5.2
NTLMSSP_OID = bytes.fromhex("2b06010401823702020a")  # 1.3.6.1.4.1.311.2.2.10
NTLM_NEGOTIATE = b"NTLMSSP\x00\x01\x00\x00\x00\x07\x82\x08\xa2" + bytes(16)


def write_keytab(path: Path, principal: str) -> None:
    """A keytab made by MIT ktutil from a password: a key needs no KDC to exist."""
    commands = (
        f"addent -password -p {principal} -k 1 -e aes256-cts-hmac-sha1-96\n"
        f"{uuid.uuid4().hex}\nwkt {path}\nquit\n"
    )
    subprocess.run(["ktutil"], input=commands, text=True, capture_output=True, check=True)
    assert path.stat().st_size > 0


def adcs_config(directory: DevDirectory, keytab: Path, service_principal: str) -> str:
    return f"""
[[connectors]]
type = "adcs"
name = "adcs"
mount = "/adcs"
[connectors.settings]
directory_url = "{directory.url}"
base = "{directory.base}"
bind_dn = "{directory.admin_dn}"
bind_password = "{directory.admin_password}"
ca_name = "pkigate-issuing"
cache_ttl_seconds = 0
kerberos_keytab = "{keytab}"
kerberos_service_principal = "{service_principal}"
"""


@dataclass
class Served:
    server: RunningServer
    core: Core

    @property
    def url(self) -> str:
        return f"{self.server.https_url}/adcs"

    def session(self) -> requests.Session:
        session = requests.Session()
        session.trust_env = False
        session.verify = str(self.server.tls_bundle)
        return session

    def refusals(self) -> list[dict[str, Any]]:
        c = schema.audit_events.c
        with self.core.store.read() as conn:
            rows = conn.execute(
                select(c.action, c.parameters, c.actor)
                .where(c.action.like("adcs.%"), c.result == "failure")
                .order_by(c.seq)
            ).all()
        return [{**json.loads(r.parameters), "action": r.action, "actor": r.actor} for r in rows]


@pytest.fixture(scope="module")
def served(
    dev_directory: DevDirectory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("adcs-kerberos")
    keytab = base / "http.keytab"
    write_keytab(keytab, "HTTP/pkigate.example.test@EXAMPLE.TEST")
    server = start_server(
        base / "data",
        extra_config=adcs_config(dev_directory, keytab, "HTTP/pkigate.example.test@EXAMPLE.TEST"),
        environment={"KRB5RCACHEDIR": str(base)},
    )
    served = Served(server, Core.open(base / "data"))
    try:
        yield served
    finally:
        served.core.close()
        server.stop()


def spnego_offering_ntlm() -> bytes:
    """A SPNEGO NegTokenInit (RFC 4178) whose only mechanism is NTLM."""
    init = tlv(
        0x30, tlv(0xA0, tlv(0x30, tlv(0x06, NTLMSSP_OID))), tlv(0xA2, tlv(0x04, NTLM_NEGOTIATE))
    )
    return tlv(0x60, tlv(0x06, SPNEGO_OID), tlv(0xA0, init))


def test_a_401_offers_negotiate_and_basic(served: Served) -> None:
    answer = served.session().post(f"{served.url}/enroll", json={}, timeout=30)
    assert answer.status_code == 401
    assert answer.raw.headers.getlist("WWW-Authenticate") == ["Negotiate", 'Basic realm="pkigate"']
    assert "Kerberos (Negotiate)" in answer.json()["message"]
    cep = served.session().post(
        f"{served.url}/cep",
        data=soap.build_get_policies_request(f"{served.url}/cep", f"urn:uuid:{uuid.uuid4()}"),
        headers={"Content-Type": "application/soap+xml; charset=utf-8"},
        timeout=30,
    )
    # requests-gssapi (cepces's transport) authenticates only when a 401 names Negotiate.
    assert cep.status_code == 401 and "Negotiate" in cep.headers["WWW-Authenticate"]


@pytest.mark.parametrize(
    ("token", "error", "says", "kerberos"),
    [
        (b"not a GSSAPI token", "badCredentials", "Negotiate token was refused", "badToken"),
        (NTLM_NEGOTIATE, "unsupportedAuthentication", "NTLM is not accepted", None),
        (spnego_offering_ntlm(), "unsupportedAuthentication", "no Kerberos mechanism", None),
    ],
    ids=["garbage", "raw-ntlm", "spnego-ntlm"],
)
def test_tokens_that_are_not_kerberos_are_refused_and_audited(
    served: Served, token: bytes, error: str, says: str, kerberos: str | None
) -> None:
    before = len(served.refusals())
    answer = served.session().post(
        f"{served.url}/enroll",
        json={},
        headers={"Authorization": "Negotiate " + base64.b64encode(token).decode()},
        timeout=30,
    )
    assert answer.status_code == 401
    assert answer.json()["error"] == error and says in answer.json()["message"]
    assert answer.json().get("attack") == (None if kerberos else "ESC8")
    [audited] = served.refusals()[before:]
    assert audited["action"] == "adcs.authenticate" and audited["code"] == error
    assert audited["actor"].startswith("adcs-client:")
    assert audited.get("kerberos") == (kerberos or "unsupportedAuthentication")
