"""Notification destinations made through the API (admin) beside the TOML's ``[[notifications]]``.

One service for the REST API and the CLI: a destination sent to either is checked by the
very rules the TOML's entries are (gateways/config.py, its secrets sent instead of named),
its secret (webhook HMAC key, SMTP password) is sealed under the KEK as CA keys are and is
never shown again, and every change is audited without it. A name is unique across the
TOML and the store; the TOML's entries are read-only here.

Every worker's dispatcher asks :meth:`NotificationDestinations.current` for the
destinations before it looks at events: one small query of each stored destination's
version, and a reload of those whose version moved. So a creation, an update or a
deletion is seen at the next poll, without a restart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.exc import IntegrityError

from pkigate.core import Core
from pkigate.core.audit import Actor
from pkigate.core.errors import BadRequestError, ConflictError, KeyBackendError, NotFoundError
from pkigate.core.keys import Sealer
from pkigate.core.store import destinations as destinations_sql
from pkigate.core.store import events as events_sql
from pkigate.core.store.destinations import DestinationRow
from pkigate.gateways.config import ConfigError, NotificationConfig, check_sent_notification
from pkigate.gateways.notifications import (
    DISPATCH_JOB,
    Destination,
    destination_from_config,
)

log = logging.getLogger("pkigate.notifications")

SOURCE_CONFIG = "config"
SOURCE_API = "api"
DELIVERY_STATES = ("pending", "delivered", "dead", "cancelled")
FILTER_KEYS = ("events", "cas", "templates")
# What is sealed rather than kept in the settings, by type.
SECRET_KEYS = {"webhook": ("secret",), "email": ("password",)}


def _settings_of(config: NotificationConfig) -> dict[str, Any]:
    """The settings of a destination that may be shown (no secret), every key present."""
    email = config.email
    webhook = config.type == "webhook"
    return {
        "url": config.url if webhook else None,
        "allow_reserved_addresses": config.allow_reserved_addresses if webhook else None,
        "smtp_host": email.host if email else None,
        "smtp_port": email.port if email else None,
        "tls": email.tls if email else None,
        "from": email.sender if email else None,
        "to": list(email.recipients) if email else None,
        "username": email.username if email else None,
        "tls_ca_pem": email.tls_ca_pem if email else None,
        "timeout_seconds": (email.timeout_seconds if email else config.timeout_seconds),
        "max_attempts": config.max_attempts,
    }


def _filters_of(config: NotificationConfig) -> dict[str, list[str]]:
    return {
        "events": list(config.events),
        "cas": list(config.cas),
        "templates": list(config.templates),
    }


def _config_error(exc: ConfigError) -> BadRequestError:
    return BadRequestError(f"field {exc.key!r}: {exc.message}" if exc.key else exc.message)


class NotificationDestinations:
    """The TOML's destinations (read-only) and the store's (created, changed, deleted)."""

    def __init__(
        self,
        core: Core,
        configured: Sequence[NotificationConfig] = (),
        ca_ids: Mapping[str, str] | None = None,
    ) -> None:
        self._core = core
        self._configured = {item.name: item for item in configured}
        self._config_ca_ids = dict(ca_ids or {})
        self._sealer = Sealer(
            core.kek, b"pkigate notification-secret sealing v1", b"PKN1", b"pkigate-notification:"
        )
        # name -> ((version, updated_at), destination): this process's copy of the store's.
        self._cache: dict[str, tuple[tuple[int, datetime], Destination]] = {}
        self._lock = threading.Lock()
        #: Called after this process made a destination (the DestinationWatch of a process
        #: that runs no notifier yet starts one at once).
        self.on_create: list[Callable[[], None]] = []

    # -- reads ----------------------------------------------------------------------------

    def list(self) -> list[dict[str, Any]]:
        """Every destination, the TOML's marked ``source: config``, by name."""
        with self._core.store.read() as conn:
            rows = destinations_sql.list_all(conn)
            counts = events_sql.count_deliveries(conn)
        views = [self._config_view(item, counts) for item in self._configured.values()]
        views += [self._stored_view(row, counts) for row in rows]
        return sorted(views, key=lambda view: str(view["name"]))

    def get(self, name: str) -> dict[str, Any]:
        with self._core.store.read() as conn:
            counts = events_sql.count_deliveries(conn)
            row = destinations_sql.get(conn, name)
        if name in self._configured:
            return self._config_view(self._configured[name], counts)
        if row is None:
            raise NotFoundError(f"no notification destination named {name!r}")
        return self._stored_view(row, counts)

    def _config_view(
        self, item: NotificationConfig, counts: Mapping[tuple[str, str], int]
    ) -> dict[str, Any]:
        email = item.email
        return {
            "name": item.name,
            "type": item.type,
            "source": SOURCE_CONFIG,
            "read_only": True,
            **_settings_of(item),
            **_filters_of(item),
            "secret_set": item.type == "webhook",
            "password_set": bool(email and (email.password_file or email.password_env)),
            "version": None,
            "created_at": None,
            "created_by": None,
            "updated_at": None,
            "updated_by": None,
            "deliveries": self._counts(item.name, counts),
        }

    def _stored_view(
        self, row: DestinationRow, counts: Mapping[tuple[str, str], int]
    ) -> dict[str, Any]:
        config = self._parse_row(row, with_secrets=False)
        sealed = row.sealed_secret is not None
        return {
            "name": row.name,
            "type": row.type,
            "source": SOURCE_API,
            "read_only": False,
            **_settings_of(config),
            **_filters_of(config),
            "secret_set": row.type == "webhook" and sealed,
            "password_set": row.type == "email" and sealed,
            "version": row.version,
            "created_at": row.created_at.isoformat(),
            "created_by": row.created_by,
            "updated_at": row.updated_at.isoformat(),
            "updated_by": row.updated_by,
            "deliveries": self._counts(row.name, counts),
        }

    @staticmethod
    def _counts(name: str, counts: Mapping[tuple[str, str], int]) -> dict[str, int]:
        return {state: counts.get((name, state), 0) for state in DELIVERY_STATES}

    # -- changes --------------------------------------------------------------------------

    def create(self, body: Mapping[str, Any], actor: Actor) -> dict[str, Any]:
        """Check, seal and keep a new destination; its dispatcher starts at the newest
        event (a new destination is not sent the past)."""
        entry = {key: value for key, value in body.items() if value is not None}
        name = str(entry.get("name", ""))
        now = self._core.clock()
        with self._core.audit.refusals(actor, "notification.create", f"notification/{name}", now):
            if name in self._configured:
                raise ConflictError(
                    f"a notification named {name!r} is in the server's configuration"
                )
            config = self._check(entry, secret_kept=False)
            secrets = {k: entry[k] for k in SECRET_KEYS[config.type] if k in entry}
            try:
                with self._core.store.write() as conn:
                    if destinations_sql.get(conn, name) is not None:
                        raise ConflictError(f"a notification named {name!r} exists")
                    destinations_sql.insert_row(
                        conn,
                        name=name,
                        kind=config.type,
                        settings=_stored_settings(config),
                        filters=_filters_of(config),
                        sealed_secret=self._seal(name, secrets),
                        at=now,
                        by=actor.principal,
                    )
                    events_sql.move_cursor(conn, name, events_sql.last_event_position(conn))
                    self._core.audit.record(
                        conn,
                        actor,
                        "notification.create",
                        f"notification/{name}",
                        parameters=_audited(config, sorted(secrets)),
                        at=now,
                    )
                    # The dispatcher rests while there is nowhere to deliver to.
                    self._core.jobs.enqueue(DISPATCH_JOB, {}, dedupe_key=DISPATCH_JOB, conn=conn)
            except IntegrityError:  # made at the same moment by another process
                raise ConflictError(f"a notification named {name!r} exists") from None
        self._core.jobs.notify()
        for listener in self.on_create:
            listener()
        return self.get(name)

    def update(self, name: str, body: Mapping[str, Any], actor: Actor) -> dict[str, Any]:
        """Change some settings (``null``: back to the default); a secret left out is
        kept. The whole result is checked as a new one would be."""
        now = self._core.clock()
        with self._core.audit.refusals(actor, "notification.update", f"notification/{name}", now):
            self._refuse_configured(name, "changed")
            with self._core.store.read() as conn:
                row = destinations_sql.get(conn, name)
            if row is None:
                raise NotFoundError(f"no notification destination named {name!r}")
            for fixed in ("name", "type"):
                if fixed in body:
                    raise BadRequestError(f"field {fixed!r} cannot be changed")
            entry = {"name": name, "type": row.type, **row.settings, **row.filters}
            for key, value in body.items():
                if value is None:
                    entry.pop(key, None)
                else:
                    entry[key] = value
            sent = {k: body[k] for k in SECRET_KEYS[row.type] if body.get(k) is not None}
            removed = {k for k in SECRET_KEYS[row.type] if k in body and body[k] is None}
            # A webhook's secret may be replaced, never removed (its check then asks for it).
            kept = row.sealed_secret is not None and "secret" not in removed
            config = self._check(entry, secret_kept=kept)
            secrets = {k: v for k, v in {**self._unseal(row), **sent}.items() if k not in removed}
            with self._core.store.write() as conn:
                changed = destinations_sql.update_row(
                    conn,
                    name,
                    version=row.version,
                    settings=_stored_settings(config),
                    filters=_filters_of(config),
                    sealed_secret=self._seal(name, secrets),
                    at=now,
                    by=actor.principal,
                )
                if not changed:
                    raise ConflictError(
                        f"notification {name!r} was changed or deleted meanwhile; read it again"
                    )
                parameters = {
                    key: value
                    for key, value in _audited(config, []).items()
                    if key in body and key not in SECRET_KEYS[row.type]
                }
                changed_secrets = sorted(k for k in SECRET_KEYS[row.type] if k in body)
                if changed_secrets:
                    parameters["secrets_changed"] = changed_secrets
                parameters["version"] = row.version + 1
                self._core.audit.record(
                    conn,
                    actor,
                    "notification.update",
                    f"notification/{name}",
                    parameters=parameters,
                    at=now,
                )
        return self.get(name)

    def delete(self, name: str, actor: Actor) -> None:
        """Remove a destination: nothing more is sent to it, its pending deliveries are
        cancelled."""
        now = self._core.clock()
        with self._core.audit.refusals(actor, "notification.delete", f"notification/{name}", now):
            self._refuse_configured(name, "deleted")
            with self._core.store.write() as conn:
                if not destinations_sql.delete_row(conn, name):
                    raise NotFoundError(f"no notification destination named {name!r}")
                events_sql.forget_destination(conn, name, now)
                self._core.audit.record(
                    conn, actor, "notification.delete", f"notification/{name}", at=now
                )

    def _refuse_configured(self, name: str, what: str) -> None:
        if name in self._configured:
            raise ConflictError(
                f"notification {name!r} is in the server's configuration: it is {what} "
                "there, not through the API"
            )

    def _check(self, entry: Mapping[str, Any], secret_kept: bool) -> NotificationConfig:
        try:
            return check_sent_notification(entry, self._ca_names(), secret_kept=secret_kept)
        except ConfigError as exc:
            raise _config_error(exc) from None

    def _ca_names(self) -> dict[str, str]:
        """Every CA that is not deleted by id and by configured name: name or id -> id."""
        from pkigate.gateways.runtime import CONFIG_NAME_TAG  # the runtime imports this module

        names: dict[str, str] = dict(self._config_ca_ids)
        for view in self._core.authorities.list_cas():
            if view.status.value == "DELETED":
                continue
            names[view.record.id] = view.record.id
            if view.tags.get(CONFIG_NAME_TAG):
                names.setdefault(view.tags[CONFIG_NAME_TAG], view.record.id)
        return names

    # -- sealing --------------------------------------------------------------------------

    def _seal(self, name: str, secrets: Mapping[str, str]) -> bytes | None:
        if not secrets:
            return None
        return self._sealer.seal(name, json.dumps(dict(secrets)).encode())

    def _unseal(self, row: DestinationRow) -> dict[str, str]:
        if row.sealed_secret is None:
            return {}
        plain = self._sealer.unseal(
            row.name, row.sealed_secret, f"notification {row.name}'s secret"
        )
        return dict(json.loads(plain))

    def _parse_row(self, row: DestinationRow, with_secrets: bool) -> NotificationConfig:
        entry: dict[str, Any] = {"name": row.name, "type": row.type, **row.settings, **row.filters}
        if with_secrets:
            entry.update(self._unseal(row))
        # Checked when it was written; a CA deleted since leaves its id in the filter.
        try:
            return check_sent_notification(
                entry, list(row.filters.get("cas", ())), secret_kept=True
            )
        except ConfigError as exc:  # pragma: no cover - only a hand-edited row
            raise BadRequestError(f"notification {row.name}: {exc}") from None

    # -- what the dispatcher delivers to --------------------------------------------------

    def any_exist(self) -> bool:
        """Whether there is anywhere to deliver to: a TOML entry or a stored destination."""
        if self._configured:
            return True
        with self._core.store.read() as conn:
            return destinations_sql.any_exist(conn)

    def current(self, configured: Mapping[str, Destination]) -> dict[str, Destination]:
        """``configured`` (the TOML's) and the store's destinations as they are now: the
        store's versions are read, and only the rows whose version moved are reloaded."""
        with self._core.store.read() as conn:
            seen = destinations_sql.versions(conn)
            with self._lock:
                stale = [
                    name
                    for name, version in seen.items()
                    if name not in self._cache or self._cache[name][0] != version
                ]
                rows = [destinations_sql.get(conn, name) for name in stale]
        if rows or len(seen) != len(self._cache):
            ca_ids = self._ca_names() if rows else {}
            with self._lock:
                for row in rows:
                    if row is None:
                        continue  # deleted between the two reads
                    built = self._destination(row, ca_ids)
                    if built is not None:
                        self._cache[row.name] = ((row.version, row.updated_at), built)
                for gone in set(self._cache) - set(seen):
                    del self._cache[gone]
        with self._lock:
            stored = {name: destination for name, (_, destination) in self._cache.items()}
        return {**stored, **configured}

    def _destination(self, row: DestinationRow, ca_ids: Mapping[str, str]) -> Destination | None:
        try:
            config = self._parse_row(row, with_secrets=True)
        except KeyBackendError as exc:
            log.error("notification %s cannot be used: %s", row.name, exc.message)
            return None
        return destination_from_config(config, ca_ids)

    def find(self, name: str, configured: Mapping[str, Destination]) -> Destination:
        """One destination to send a test event to, from the TOML or the store."""
        found = self.current(configured).get(name)
        if found is None:
            known = sorted({*configured, *self._cache})
            raise NotFoundError(
                f"no notification {name!r}; configured: {', '.join(known) or 'none'}"
            )
        return found


def _stored_settings(config: NotificationConfig) -> dict[str, Any]:
    """What is kept in the settings column: the shown settings that apply (no nulls)."""
    return {key: value for key, value in _settings_of(config).items() if value is not None}


def _audited(config: NotificationConfig, secrets: Collection[str]) -> dict[str, Any]:
    """An audit record's parameters: the type, settings and filters; of the secrets only
    which were set."""
    parameters: dict[str, Any] = {
        "type": config.type,
        **_stored_settings(config),
        **_filters_of(config),
    }
    if "tls_ca_pem" in parameters:  # up to 64 KiB of PEM: the record names it by digest
        digest = hashlib.sha256(parameters["tls_ca_pem"].encode()).hexdigest()
        parameters["tls_ca_pem"] = f"sha256:{digest}"
    if secrets:
        parameters["secrets_set"] = sorted(secrets)
    return parameters
