"""Email notifications: an event as a plain-text message a person can act on, over SMTP
with STARTTLS or implicit TLS (never in the clear)."""

from __future__ import annotations

import os
import smtplib
import ssl
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from pathlib import Path
from typing import Any

from pkigate.core.events import Event, EventType

# How a certificate is renewed, by the connector that issued it.
_RENEWAL = {
    "acme": "Its ACME client renews it (certbot renew, or the client's own schedule); check "
    "that the client still runs.",
    "scep": "The device renews it by SCEP (its MDM profile); check that the device is still "
    "enrolled and online.",
    "adcs": "Windows autoenrollment renews it; check that the machine or user still logs in "
    "to the domain.",
    "api": "Request a new certificate through the management API "
    "(POST /api/v1/cas/<ca>/certificates) with a fresh CSR.",
    "cli": "Issue a new one with `pkigate cert issue --ca <ca> --csr <file>`.",
}


@dataclass(frozen=True)
class EmailTarget:
    """Where and how an email destination sends."""

    host: str
    port: int
    #: "starttls" (submission, port 587) or "implicit" (SMTPS, port 465).
    tls: str
    sender: str
    recipients: tuple[str, ...]
    username: str | None = None
    password_file: Path | None = None
    password_env: str | None = None
    #: The password itself: a destination made through the API (unsealed from the store).
    password_value: str | None = field(default=None, repr=False)
    #: CA certificates that the SMTP server's certificate chains to (default: the system's),
    #: in a file (TOML) or as PEM text (API).
    tls_ca_file: Path | None = None
    tls_ca_pem: str | None = None
    timeout_seconds: int = 10

    def password(self) -> str | None:
        if self.password_value is not None:
            return self.password_value
        if self.password_file is not None:
            return self.password_file.read_text().strip()
        if self.password_env is not None:
            return os.environ.get(self.password_env) or None
        return None


def _connector_kind(connector: str) -> str:
    """A connector's type from its name as recorded (``scep/mdm`` -> ``scep``)."""
    return connector.split("/", 1)[0].split(":", 1)[0]


def _subject_line(event: Event) -> str:
    data = event.data
    what = data.get("subject") or event.ca_id or ""
    if event.type == EventType.CERTIFICATE_EXPIRING:
        return f"[pkigate] certificate {what} expires within {data['days_before']} days"
    if event.type == EventType.CA_EXPIRING:
        return f"[pkigate] CA {what} expires within {data['days_before']} days"
    return f"[pkigate] {event.type.value}: {what}"


def render(event: Event) -> EmailMessage:
    """The message for one event (without From/To)."""
    data: dict[str, Any] = dict(event.data)
    lines = [_subject_line(event)[len("[pkigate] ") :].capitalize() + ".", ""]
    facts = [
        ("Event", event.type.value),
        ("Subject", data.get("subject")),
        ("Names", ", ".join(data.get("sans") or []) or None),
        ("Serial", event.serial),
        ("Issued by CA", event.ca_id),
        ("Template", event.template),
        ("Expires (notAfter)", data.get("not_after")),
        ("Requested by", data.get("requester")),
        ("Through", data.get("connector")),
        ("Reason", data.get("reason")),
        ("Status", f"{data['from']} -> {data['to']}" if "to" in data else None),
        ("Error", data.get("error")),
        ("Event id", event.event_id),
        ("At", event.occurred_at.isoformat()),
    ]
    lines += [f"{label + ':':<20}{value}" for label, value in facts if value not in (None, "")]
    if event.type in (EventType.CERTIFICATE_EXPIRING, EventType.CERTIFICATE_EXPIRED):
        kind = _connector_kind(str(data.get("connector") or "api"))
        lines += ["", "How to renew:", _RENEWAL.get(kind, _RENEWAL["api"])]
        lines += [
            f"Find it with `pkigate cert list --ca {event.ca_id} --expiring-within "
            f"{max(int(data.get('days_before') or 1), 1)}d`."
        ]
    message = EmailMessage()
    message["Subject"] = _subject_line(event)
    message["Date"] = format_datetime(event.occurred_at)
    message["Message-ID"] = make_msgid(domain="pkigate")
    message["X-Pkigate-Event-Id"] = event.event_id
    message.set_content("\n".join(lines) + "\n")
    return message


def send_email(target: EmailTarget, event: Event) -> None:
    message = render(event)
    message["From"] = target.sender
    message["To"] = ", ".join(target.recipients)
    context = ssl.create_default_context(
        cafile=str(target.tls_ca_file) if target.tls_ca_file else None, cadata=target.tls_ca_pem
    )
    client: smtplib.SMTP
    if target.tls == "implicit":
        client = smtplib.SMTP_SSL(
            target.host, target.port, timeout=target.timeout_seconds, context=context
        )
    else:
        client = smtplib.SMTP(target.host, target.port, timeout=target.timeout_seconds)
    with client:
        if target.tls == "starttls":
            client.starttls(context=context)
        if target.username:
            client.login(target.username, target.password() or "")
        client.send_message(message)
