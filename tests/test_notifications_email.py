"""Email notifications through a real SMTP server on loopback (aiosmtpd), with STARTTLS."""

from __future__ import annotations

import ipaddress
import socket
import ssl
from collections.abc import Iterator
from datetime import timedelta
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from helpers import Clock, create_root, make_csr, make_key

from pkigate.core import Core, IssuanceRequest, Requester, Validity
from pkigate.core.jobs import JobRunner
from pkigate.gateways.config import ConfigError, parse_config
from pkigate.gateways.notifications import Notifier, destination_from_config


class _Mailbox:
    def __init__(self) -> None:
        self.messages: list[tuple[Message, Any]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append((message_from_bytes(envelope.content), session.ssl))
        return "250 OK"


def _tls_files(core: Core, directory: Path) -> tuple[Path, Path, Path]:
    """The SMTP server's certificate and key, from a pkigate CA (whose root is returned
    for the client to trust)."""
    root = create_root(core, cn="SMTP Test Root")
    key = make_key()
    issued = core.issue(
        IssuanceRequest(
            root.record.id,
            make_csr(
                "smtp.test", sans=[x509.IPAddress(ipaddress.ip_address("127.0.0.1"))], key=key
            ),
            Validity.parse("90d"),
            Requester("tests"),
            template="EndEntityServerAuthCertificate/V1",
        )
    )
    cert_path, key_path, root_path = (directory / n for n in ("smtp.pem", "smtp.key", "root.pem"))
    cert_path.write_text(issued.pem())
    root_path.write_text(core.authorities.certificate_pem(root.record.id)[0])
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path, root_path


@pytest.fixture
def smtp(sqlite_core: Core, tmp_path: Path) -> Iterator[tuple[_Mailbox, int, Path]]:
    cert_path, key_path, root_path = _tls_files(sqlite_core, tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    mailbox = _Mailbox()
    controller = Controller(
        mailbox, hostname="127.0.0.1", port=port, tls_context=context, require_starttls=True
    )
    controller.start()
    try:
        yield mailbox, port, root_path
    finally:
        controller.stop()


def test_an_expiring_certificate_is_mailed_with_what_to_do(
    sqlite_core: Core, clock: Clock, smtp: tuple[_Mailbox, int, Path]
) -> None:
    mailbox, port, ca_file = smtp
    core = sqlite_core
    config = parse_config(
        f"""
[[notifications]]
name = "pki-team"
type = "email"
smtp_host = "127.0.0.1"
smtp_port = {port}
tls = "starttls"
tls_ca_file = "{ca_file}"
from = "pkigate@example.test"
to = ["pki-team@example.test", "oncall@example.test"]
events = ["certificate.expiring"]
"""
    )
    notifier = Notifier(core, {"pki-team": destination_from_config(config.notifications[0], {})})
    root = create_root(core)
    issued = core.issue(
        IssuanceRequest(
            root.record.id,
            make_csr("www.example.test"),
            Validity.parse("40d"),
            Requester("carol", "acme/public"),
        )
    )
    clock.advance(timedelta(days=12))  # 28 days left: the 30-day notice is due
    assert core.expiry.scan() == 1
    assert notifier.dispatch() == 1
    counts = JobRunner(core.jobs, notifier.job_handlers()).run_once()
    assert counts.completed == 1
    ((message, tls),) = mailbox.messages
    assert tls is not None  # STARTTLS was used before the message was sent
    assert message["From"] == "pkigate@example.test"
    assert message["To"] == "pki-team@example.test, oncall@example.test"
    assert message["Subject"] == (
        "[pkigate] certificate CN=www.example.test expires within 30 days"
    )
    (stored,) = core.events.list(types=["certificate.expiring"])
    assert message["X-Pkigate-Event-Id"] == stored.event.event_id
    body = message.get_payload(decode=True).decode()
    for line in (
        "Subject:            CN=www.example.test",
        "Names:              DNS:www.example.test",
        f"Serial:             {issued.serial}",
        f"Issued by CA:       {root.record.id}",
        "Requested by:       carol",
        "Through:            acme/public",
        "Its ACME client renews it",
        f"pkigate cert list --ca {root.record.id} --expiring-within 30d",
    ):
        assert line in body, body
    assert [d.status for d in core.events.list(types=["certificate.expiring"])[0].deliveries] == [
        "delivered"
    ]


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ('tls = "none"', "starttls or implicit"),
        ('url = "https://hooks.example.test/"', "unknown key"),
        ('to = ["nobody"]', "not an email address"),
    ],
)
def test_a_bad_email_destination_is_a_config_error(entry: str, problem: str) -> None:
    text = (
        '[[notifications]]\nname = "m"\ntype = "email"\nsmtp_host = "smtp.example.test"\n'
        f'from = "pkigate@example.test"\n{entry}\n'
    )
    if "to =" not in entry:
        text += 'to = ["a@example.test"]\n'
    with pytest.raises(ConfigError, match=problem):
        parse_config(text)
