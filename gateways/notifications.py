"""Notifications: events from the core's outbox delivered to webhooks and by email.

Two jobs, run by any worker on any host:

- ``events:dispatch`` looks at the events written since it last looked (a cursor per
  destination, kept in the store) and, for each destination whose filter matches, writes
  a pending delivery (unique per event and destination) and queues its delivery job. It
  looks again every ``poll`` seconds. On PostgreSQL an event's position is taken before
  its transaction commits, so the cursor stays ``_SETTLE`` behind the newest event: a
  transaction committing late is still seen (its delivery row is unique, looking twice
  is harmless).
- ``events:deliver`` posts one event to one destination. A failure is retried by the job
  queue with its backoff; after ``max_attempts`` the delivery is dead (the API, the CLI
  and /metrics show it). Delivery is at least once: receivers de-duplicate by event id.

Destinations are the TOML's ``[[notifications]]`` and those an administrator made through
the API (gateways/destinations.py), which every worker re-reads when their version moves.

Webhook targets are checked like ACME http-01 targets (acme/validation.py): link-local
(a cloud's metadata service), multicast and reserved addresses are refused unless the
destination says ``allow_reserved_addresses``, the connection goes to the address that
was checked, and redirects are never followed (a 3xx answer is a failure).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import os
import re
import smtplib
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from pkigate.acme.validation import may_connect
from pkigate.core import Core
from pkigate.core.events import Event, EventType
from pkigate.core.jobs import JobHandler, RetryLater
from pkigate.core.store import events as events_sql
from pkigate.gateways.mail import EmailTarget, send_email

if TYPE_CHECKING:
    from pkigate.gateways.config import NotificationConfig

log = logging.getLogger("pkigate.notifications")

DISPATCH_JOB = "events:dispatch"
DELIVER_JOB = "events:deliver"
# The job runner's threads are pkigate-notifications-<n>, started by this one.
RUNNER_NAME = "notifications"
WATCH_THREAD = "pkigate-notifications-watch"
SIGNATURE_HEADER = "X-Pkigate-Signature"
EVENT_ID_HEADER = "X-Pkigate-Event-Id"
# What of a receiver's answer is kept in the delivery's last error: enough to see what
# went wrong, never a page of someone else's HTML.
MAX_SNIPPET_CHARS = 200
_READ_AT_MOST = 4096
_SETTLE = timedelta(seconds=30)
_DISPATCH_BATCH = 500
# What http.client refuses to send (InvalidURL) and urlsplit silently drops (tab, CR, LF):
# such a URL is refused when it is configured, not at every delivery.
_UNSENDABLE_URL_CHARS = re.compile(r"[\x00-\x20\x7f]")
# A host name the resolver can be asked for (letters, digits, '-' and '_' in labels of at
# most 63, after IDNA encoding).
_HOST_NAME = re.compile(r"^[A-Za-z0-9_-]{1,63}(\.[A-Za-z0-9_-]{1,63})*\.?$")


class WebhookError(Exception):
    """A delivery attempt that did not succeed (the message is safe to store and show),
    by webhook or by email."""


@dataclass(frozen=True)
class WebhookTarget:
    """Where and how a webhook destination posts."""

    url: str
    #: Where the HMAC-SHA256 key comes from: a file's content or an environment variable
    #: (TOML), or the key itself (a destination made through the API).
    secret_file: Path | None = None
    secret_env: str | None = None
    secret_value: bytes | None = field(default=None, repr=False)
    timeout_seconds: int = 10
    allow_reserved_addresses: bool = False

    def secret(self) -> bytes:
        if self.secret_value is not None:
            return self.secret_value
        if self.secret_file is not None:
            return self.secret_file.read_bytes().strip()
        value = os.environ.get(self.secret_env or "", "")
        if not value:
            raise WebhookError(f"environment variable {self.secret_env} is empty or unset")
        return value.encode()


@dataclass(frozen=True)
class Destination:
    """A ``[[notifications]]`` entry."""

    name: str
    type: str  # "webhook" or "email"
    webhook: WebhookTarget | None = None
    email: EmailTarget | None = None
    #: Deliver only these event types / CAs (ids) / templates; empty: all.
    events: frozenset[str] = frozenset()
    ca_ids: frozenset[str] = frozenset()
    templates: frozenset[str] = frozenset()
    max_attempts: int = 8

    def wants(self, event: Event) -> bool:
        return (
            (not self.events or event.type.value in self.events)
            and (not self.ca_ids or event.ca_id in self.ca_ids)
            and (not self.templates or event.template in self.templates)
        )


def destination_from_config(item: NotificationConfig, ca_ids: Mapping[str, str]) -> Destination:
    """A ``[[notifications]]`` entry, its CA names turned into ids (``ca_ids``)."""
    return Destination(
        name=item.name,
        type=item.type,
        webhook=WebhookTarget(
            url=item.url,
            secret_file=item.secret_file,
            secret_env=item.secret_env,
            secret_value=item.secret.encode() if item.secret is not None else None,
            timeout_seconds=item.timeout_seconds,
            allow_reserved_addresses=item.allow_reserved_addresses,
        )
        if item.type == "webhook"
        else None,
        email=item.email,
        events=frozenset(item.events),
        ca_ids=frozenset(ca_ids.get(name, name) for name in item.cas),
        templates=frozenset(item.templates),
        max_attempts=item.max_attempts,
    )


def sign(secret: bytes, body: bytes) -> str:
    """The signature header's value: ``sha256=`` and the HMAC-SHA256 of the body in hex."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def check_webhook_url(url: str, allow_reserved: bool) -> tuple[str, str, int, str]:
    """(scheme, host, port, path) of an http(s) URL; ValueError saying what is wrong."""
    if _UNSENDABLE_URL_CHARS.search(url):
        raise ValueError("a webhook URL holds no spaces or control characters (encode them)")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("a webhook URL is http:// or https:// with a host")
    if parts.username or parts.password:
        raise ValueError("a webhook URL carries no credentials (sign with a secret instead)")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError("the webhook URL's port is not a number") from None
    host = parts.hostname
    literal = _literal_address(host)
    if literal is None:
        host = _ascii_host_name(host)
    if literal is not None and not allow_reserved and not may_connect(literal.compressed):
        raise ValueError(
            f"{literal} is link-local, multicast, unspecified or reserved "
            "(set allow_reserved_addresses to post there anyway)"
        )
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return parts.scheme, host, port, path


def _literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address ``host`` is written as, if it is one. The resolver reads an IPv4 address
    the way inet_aton(3) does, so ``2852039166``, ``0xa9.0xfe.0xa9.0xfe`` and
    ``169.254.43518`` are all the metadata service: they are checked as that address, not
    taken for names and left to the check at delivery."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def check_host(host: str) -> None:
    """ValueError unless ``host`` is an IP address or a host name (an SMTP server's)."""
    if _literal_address(host) is None:
        _ascii_host_name(host)


def _ascii_host_name(host: str) -> str:
    """``host`` as the resolver and the Host header take it (IDNA: a Host header is
    Latin-1, and ``bücher.example`` is ``xn--bcher-kva.example`` in DNS)."""
    try:
        ascii_name = host.encode("idna").decode()
    except UnicodeError:
        ascii_name = ""
    if len(ascii_name) > 253 or _HOST_NAME.match(ascii_name) is None:
        raise ValueError(f"{host!r} is neither an IP address nor a host name")
    return ascii_name


def _address(host: str, port: int, allow_reserved: bool) -> str:
    """The first address of ``host`` that may be connected to (checked, then used: a
    second lookup could answer otherwise)."""
    try:
        found = [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
    except OSError as exc:
        raise WebhookError(f"cannot resolve {host}: {exc.strerror or exc}") from None
    usable = [str(a) for a in found if allow_reserved or may_connect(str(a))]
    if not usable:
        raise WebhookError(
            f"{host} has only link-local, multicast, unspecified or reserved addresses"
        )
    return usable[0]


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to an address checked beforehand, the certificate verified for the host."""

    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def _cut_off(connection: http.client.HTTPConnection, cut: threading.Event) -> None:
    cut.set()
    if connection.sock is not None:
        with contextlib.suppress(OSError):  # closed meanwhile
            connection.sock.shutdown(socket.SHUT_RDWR)


def post_webhook(target: WebhookTarget, body: bytes, event_id: str) -> int:
    """POST ``body`` signed; the status code, or WebhookError (never a response body
    beyond MAX_SNIPPET_CHARS)."""
    scheme, host, port, path = check_webhook_url(target.url, target.allow_reserved_addresses)
    address = _address(host, port, target.allow_reserved_addresses)
    connection: http.client.HTTPConnection
    if scheme == "https":
        connection = _PinnedHTTPSConnection(host, address, port, target.timeout_seconds)
    else:
        connection = http.client.HTTPConnection(address, port, timeout=target.timeout_seconds)
    headers = {
        # An IPv6 address is bracketed in a Host header as in a URL (RFC 9110 7.2).
        "Host": (f"[{host}]" if ":" in host else host)
        + ("" if port == (443 if scheme == "https" else 80) else f":{port}"),
        "Content-Type": "application/json",
        "User-Agent": "pkigate-notifications/1",
        SIGNATURE_HEADER: sign(target.secret(), body),
        EVENT_ID_HEADER: event_id,
    }
    cut = threading.Event()
    try:
        connection.request("POST", path, body=body, headers=headers)
        # The socket's timeout bounds each read, not the answer: a receiver sending a
        # byte of it now and then would hold this worker for ever. The whole answer gets
        # timeout_seconds, then the connection is shut under the reads.
        timer = threading.Timer(target.timeout_seconds, _cut_off, (connection, cut))
        timer.start()
        try:
            response = connection.getresponse()
            answer = response.read(_READ_AT_MOST)
        finally:
            timer.cancel()
    except (OSError, http.client.HTTPException) as exc:
        if not cut.is_set():
            raise WebhookError(f"{type(exc).__name__}: {exc}"[:MAX_SNIPPET_CHARS]) from None
    finally:
        connection.close()
    if cut.is_set():  # what was read before the cut may even look like an answer
        raise WebhookError(f"no whole answer within {target.timeout_seconds}s")
    if not 200 <= response.status < 300:
        snippet = answer.decode("utf-8", "replace")[:MAX_SNIPPET_CHARS]
        raise WebhookError(f"HTTP {response.status}: {snippet!r}")
    return response.status


def event_body(event: Event) -> bytes:
    return json.dumps(event.payload(), sort_keys=True, separators=(",", ":")).encode()


@dataclass
class Notifier:
    """This process's side of notifications: the destinations and the two job handlers."""

    core: Core
    #: The TOML's destinations.
    destinations: Mapping[str, Destination]
    poll: timedelta = timedelta(seconds=5)
    #: The TOML's and the store's destinations as they are now (gateways/destinations.py),
    #: given the TOML's: destinations made through the API come and go while it runs.
    stored: Callable[[Mapping[str, Destination]], Mapping[str, Destination]] | None = None

    def current(self) -> Mapping[str, Destination]:
        return self.destinations if self.stored is None else self.stored(self.destinations)

    def job_handlers(self) -> dict[str, JobHandler]:
        if not self.destinations and self.stored is None:
            return {}
        return {DISPATCH_JOB: self._dispatch_job, DELIVER_JOB: self._deliver_job}

    def start(self) -> None:
        """Queue the dispatcher (once however many processes start)."""
        if self.job_handlers():
            self.core.jobs.enqueue(DISPATCH_JOB, {}, dedupe_key=DISPATCH_JOB)

    def _dispatch_job(self, _payload: dict[str, Any]) -> None:
        resting = False
        try:
            # With nowhere to deliver to the dispatcher rests: making a destination
            # through the API queues it again.
            resting = self.stored is not None and not self.current()
            if not resting:
                self.dispatch()
        finally:
            if not resting:
                self.core.jobs.enqueue(
                    DISPATCH_JOB,
                    {},
                    dedupe_key=DISPATCH_JOB,
                    run_at=self.core.clock() + self.poll,
                )

    def dispatch(self) -> int:
        """Queue deliveries of the events written since the last look; how many.

        The newest event is looked up before the destinations are: an event is matched
        against destinations read after it was written, so a destination changed before
        an event is written is used for it as changed."""
        queued = 0
        now = self.core.clock()
        with self.core.store.read() as conn:
            ceiling = events_sql.last_event_position(conn)
        for name, destination in self.current().items():
            with self.core.store.write() as conn:
                position = events_sql.cursor(conn, name)
                rows = events_sql.list_events(
                    conn, after_id=position, until_id=ceiling, limit=_DISPATCH_BATCH
                )
                settled, settling = position, True
                for row in rows:
                    # SQLite has one writer: positions commit in order. Elsewhere the
                    # cursor stops at the first event that may have company still to come.
                    settling = settling and (
                        self.core.store.dialect == "sqlite" or row.occurred_at < now - _SETTLE
                    )
                    if settling:
                        settled = row.id
                    if not destination.wants(Event.from_row(row)):
                        continue
                    delivery = events_sql.insert_delivery(conn, row.event_id, name, now)
                    if delivery is not None:
                        self.core.jobs.enqueue(
                            DELIVER_JOB,
                            {"delivery": delivery},
                            # The delivery counts its own attempts and gives up
                            # at max_attempts; the job's margin covers attempts a dying
                            # worker never got to count.
                            max_attempts=destination.max_attempts + 2,
                            conn=conn,
                        )
                        queued += 1
                if settled != position:
                    events_sql.move_cursor(conn, name, settled)
        if queued:
            self.core.jobs.notify()
        return queued

    def _deliver_job(self, payload: dict[str, Any]) -> None:
        delivery_id = int(payload["delivery"])
        with self.core.store.read() as conn:
            delivery = events_sql.get_delivery(conn, delivery_id)
            row = events_sql.get_event(conn, delivery.event_id) if delivery else None
        if delivery is None or row is None or delivery.status != "pending":
            return
        destination = self.current().get(delivery.destination)
        if destination is None:
            return  # removed from the configuration: left pending, shown as such
        attempts = delivery.attempts + 1
        try:
            _send(destination, Event.from_row(row))
        except Exception as exc:
            message = str(exc)[: MAX_SNIPPET_CHARS + 50]
            dead = attempts >= destination.max_attempts
            with self.core.store.write() as conn:
                events_sql.settle_delivery(
                    conn,
                    delivery_id,
                    status="dead" if dead else "pending",
                    attempts=attempts,
                    last_error=message,
                    now=self.core.clock(),
                )
            log.warning(
                "notification %s of event %s failed (attempt %d of %d%s): %s",
                destination.name,
                row.event_id,
                attempts,
                destination.max_attempts,
                ", dead-lettered" if dead else "",
                message,
            )
            if not dead:
                raise RetryLater(message) from None  # logged above; retried with backoff
            return
        with self.core.store.write() as conn:
            events_sql.settle_delivery(
                conn,
                delivery_id,
                status="delivered",
                attempts=attempts,
                last_error=None,
                now=self.core.clock(),
            )


class DestinationWatch:
    """Starts this process's notification job runner once there is somewhere to deliver to.

    With no destination (none in the TOML, none stored) a runner would ask the job queue
    twice a second, in every worker, for jobs that never come. Instead this one thread
    (``pkigate-notifications-watch``) asks the store every ``interval`` seconds, in one
    small read, whether a destination exists, made by this process, another worker or
    another host; at once when this process makes one (:meth:`wake`, which
    NotificationDestinations calls after its commit). Once one exists it starts the
    runner and ends. It does not listen to the job queue: every ACME validation and CRL
    job queued would cost it a look."""

    def __init__(
        self,
        exists: Callable[[], bool],
        start_runner: Callable[[], None],
        interval: float,
    ) -> None:
        self._exists = exists
        self._start_runner = start_runner
        self._interval = interval
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        #: How many times the store was asked (what a test of an idle process counts).
        self.looks = 0

    def wake(self) -> None:
        """Look now: this process has just made a destination."""
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name=WATCH_THREAD, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _watch(self) -> None:
        failing = False  # an unreachable store is said once per outage
        while not self._stopping.is_set():
            try:
                self.looks += 1
                if self._exists():
                    self._start_runner()
                    return
                failing = False
            except Exception as exc:
                if not failing:
                    log.warning("cannot look for notification destinations: %s", exc)
                failing = True
            if self._wake.wait(self._interval):
                self._wake.clear()


def send_test(destination: Destination) -> Event:
    """Send a notification.test event to ``destination`` now (never kept in the outbox:
    `pkigate notifications test NAME` works without a server and without the store)."""
    event = Event(
        EventType.NOTIFICATION_TEST,
        datetime.now(UTC),
        data={"destination": destination.name, "message": "a test event from pkigate"},
    )
    _send(destination, event)
    return event


def _send(destination: Destination, event: Event) -> None:
    if destination.email is not None:
        try:
            send_email(destination.email, event)
        except (OSError, smtplib.SMTPException) as exc:
            raise WebhookError(f"{type(exc).__name__}: {exc}"[:MAX_SNIPPET_CHARS]) from None
        return
    assert destination.webhook is not None
    post_webhook(destination.webhook, event_body(event), event.event_id)


def deliveries_by_status(core: Core) -> dict[tuple[str, str], int]:
    with core.store.read() as conn:
        return events_sql.count_deliveries(conn)
