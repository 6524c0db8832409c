"""Notification destinations in the store: `pkigate notifications create | list | show |
update | delete` on a data directory, and migration 0016 on a store made at 0015."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import ssl
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult
from click.testing import CliRunner, Result
from helpers import Clock, create_root, downgrade_store, make_csr
from sqlalchemy import inspect
from test_notifications_email import _Mailbox, _tls_files
from webhook_receiver import SECRET, Receiver

from pkigate.core import Actor, Core, IssuanceRequest, Requester, Validity
from pkigate.core.jobs import JobRunner
from pkigate.core.model import RevocationReason
from pkigate.core.store import events as events_sql
from pkigate.core.store import sqlite_url
from pkigate.core.store.engine import create_store_engine
from pkigate.gateways.cli import main
from pkigate.gateways.destinations import NotificationDestinations
from pkigate.gateways.notifications import Notifier

OTHER_SECRET = "a-second-secret-for-the-update"


def _run(home: Path, *args: str) -> Result:
    """The command run in this process (as `pkigate` would run it, faster)."""
    runner = CliRunner(env={"OTHER_SECRET": OTHER_SECRET})
    result = runner.invoke(main, ["--data-dir", str(home), *args], prog_name="pkigate")
    for secret in (SECRET, OTHER_SECRET):
        assert secret not in result.stdout + result.stderr
    return result


def test_the_cli_manages_destinations_and_never_prints_a_secret(tmp_path: Path) -> None:
    home = tmp_path / "home"
    secret_file = tmp_path / "hook.key"
    secret_file.write_text(SECRET + "\n")
    receiver = Receiver()
    try:
        made = _run(
            home,
            "--json",
            "notifications",
            "create",
            "cli-hook",
            "--type",
            "webhook",
            "--url",
            receiver.url,
            "--secret-file",
            str(secret_file),
            "--event",
            "certificate.issued",
        )
        assert made.exit_code == 0, made.output
        view = json.loads(made.stdout)
        assert (view["source"], view["secret_set"], view["version"]) == ("api", True, 1)
        assert view["events"] == ["certificate.issued"]

        tested = _run(home, "notifications", "test", "cli-hook")
        assert tested.exit_code == 0, tested.stderr
        (event,) = receiver.events()  # signed with the secret read from the file
        assert event["type"] == "notification.test"

        changed = _run(
            home,
            "--json",
            "notifications",
            "update",
            "cli-hook",
            "--secret-env",
            "OTHER_SECRET",
            "--reset",
            "events",
        )
        assert changed.exit_code == 0, changed.stderr
        assert (json.loads(changed.stdout)["version"], json.loads(changed.stdout)["events"]) == (
            2,
            [],
        )
        assert _run(home, "notifications", "test", "cli-hook").exit_code == 0
        headers, body = receiver.received[-1]
        signature = "sha256=" + hmac.new(OTHER_SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert headers["X-Pkigate-Signature"] == signature

        listed = _run(home, "notifications", "list")
        assert "cli-hook" in listed.stdout and "webhook" in listed.stdout
        # No option takes a secret's value on the command line.
        plain = _run(home, "notifications", "create", "x", "--type", "webhook", "--secret", "s")
        assert plain.exit_code == 2 and "No such option" in plain.stderr

        assert _run(home, "notifications", "delete", "cli-hook").exit_code == 0
        gone = _run(home, "notifications", "show", "cli-hook")
        assert gone.exit_code == 1 and "no notification destination" in gone.stderr
        audit = _run(home, "--json", "audit", "list", "--limit", "100")
        actions = [e["action"] for e in json.loads(audit.stdout)["events"]]
        assert {"notification.create", "notification.update", "notification.delete"} <= set(actions)
    finally:
        receiver.close()
    # Sealed: neither secret is in the database's files as it was sent.
    for stored in home.glob("pkigate.db*"):
        content = stored.read_bytes()
        assert SECRET.encode() not in content and OTHER_SECRET.encode() not in content


def test_migration_0016_upgrades_a_0015_store_keeping_its_events(tmp_path: Path) -> None:
    home = tmp_path / "home"
    core = Core.open(home)
    try:
        root = create_root(core)
        issued = core.issue(
            IssuanceRequest(root.record.id, make_csr(), Validity.parse("30d"), Requester("ops"))
        )
        (stored,) = core.events.list(types=["certificate.issued"])
        with core.store.write() as conn:
            events_sql.insert_delivery(conn, stored.event.event_id, "toml-hook", core.clock())
    finally:
        core.close()
    url = sqlite_url(home / "pkigate.db")
    downgrade_store(url, "0015")
    engine = create_store_engine(url)
    assert "notification_destinations" not in inspect(engine).get_table_names()
    engine.dispose()

    upgraded = Core.open(home, upgrade_schema=True)
    try:
        (event,) = upgraded.events.list(types=["certificate.issued"])
        assert event.event.serial == issued.serial
        assert [(d.destination, d.status) for d in event.deliveries] == [("toml-hook", "pending")]
        service = NotificationDestinations(upgraded)
        service.create(
            {"name": "new", "type": "webhook", "url": "https://hooks.example.test/", "secret": "k"},
            Actor("tests"),
        )
        assert [v["name"] for v in service.list()] == ["new"]
        assert set(upgraded.audit.verify_chain().problems) == set()
    finally:
        upgraded.close()


SMTP_PASSWORD = "smtp-password-for-the-store"


def test_an_email_destination_from_the_store_logs_in_with_its_sealed_password(
    sqlite_core: Core, clock: Clock, tmp_path: Path
) -> None:
    """aiosmtpd with STARTTLS and a required login; the server's CA is sent as PEM."""
    core = sqlite_core
    cert_path, key_path, root_path = _tls_files(core, tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    logins: list[tuple[bytes, bytes]] = []

    def authenticate(
        _server: Any, _session: Any, _envelope: Any, _mechanism: str, data: Any
    ) -> AuthResult:
        logins.append((data.login, data.password))
        return AuthResult(success=data.password == SMTP_PASSWORD.encode())

    mailbox = _Mailbox()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    controller = Controller(
        mailbox,
        hostname="127.0.0.1",
        port=port,
        tls_context=context,
        require_starttls=True,
        authenticator=authenticate,
        auth_required=True,
    )
    controller.start()
    try:
        service = NotificationDestinations(core)
        notifier = Notifier(core, {}, stored=service.current)
        service.create(
            {
                "name": "pki-team",
                "type": "email",
                "smtp_host": "127.0.0.1",
                "smtp_port": port,
                "tls_ca_pem": root_path.read_text(),
                "from": "pkigate@example.test",
                "to": ["pki-team@example.test"],
                "username": "pkigate",
                "password": SMTP_PASSWORD,
                "events": ["certificate.revoked"],
            },
            Actor("tests"),
        )
        root = create_root(core)
        issued = core.issue(
            IssuanceRequest(root.record.id, make_csr(), Validity.parse("30d"), Requester("ops"))
        )
        core.revocation.revoke(
            root.record.id, issued.serial, RevocationReason.keyCompromise, Actor("ops")
        )
        assert notifier.dispatch() == 1  # the revocation, not the issuance
        # The dispatcher the creation queued (finding nothing more), then the delivery.
        assert JobRunner(core.jobs, notifier.job_handlers()).run_once().completed == 2
    finally:
        controller.stop()
    assert logins == [(b"pkigate", SMTP_PASSWORD.encode())]
    ((message, tls),) = mailbox.messages
    assert tls is not None and message["To"] == "pki-team@example.test"
    assert message["Subject"].startswith("[pkigate] certificate.revoked")
    assert service.get("pki-team")["deliveries"]["delivered"] == 1
