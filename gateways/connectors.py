"""The connector contract: how an enrollment front-end plugs into the gateway.

A connector type is a class registered under the entry-point group ``pkigate.connectors``
(pkigate's own SCEP, ACME and AD-style connectors register the same way a third-party
package does). The gateway instantiates it once per configured instance with a
:class:`ConnectorContext`, mounts its blueprint at the instance's mount path on the
listener it asks for, and mounts its admin blueprint under
``/api/v1/connectors/<name>/``. The connector authenticates and authorizes requests in its
protocol's terms and calls :meth:`ConnectorContext.issue` with the identity it proved —
it never signs and never writes the store itself.
"""

from __future__ import annotations

import difflib
import importlib.metadata
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, cast

from flask import Blueprint
from sqlalchemy import Connection

from pkigate.core import Core, IssuanceRequest, IssuedCertificate, Requester, Validity
from pkigate.core.errors import PkigateError
from pkigate.core.passthrough import ApiPassthrough
from pkigate.core.templates import TemplateCatalogue

ENTRY_POINT_GROUP = "pkigate.connectors"
Listener = Literal["http", "https"]


class ConnectorSettingsError(ValueError):
    """A connector's own settings are wrong; ``key`` names the setting."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


def unknown_setting(key: str, known: Iterable[str]) -> ConnectorSettingsError:
    """An unknown setting, with the nearest known one (a typo is the usual cause)."""
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(known))}"
    return ConnectorSettingsError(key, "unknown setting" + hint)


@dataclass(frozen=True)
class OfflineCore:
    """What a connector's settings check may use before any store exists (`pkigate config
    check`, and `pkigate serve` before it creates anything): the built-in templates, where
    the data directory will be (never created), and each configured CA's key algorithm by
    its configuration name."""

    templates: TemplateCatalogue
    data_dir: Path
    key_algorithms: Mapping[str, str]


def offline_context(
    name: str,
    type_name: str,
    mount: str,
    ca: str,
    template: str,
    validity: Validity,
    offline: OfflineCore,
) -> ConnectorContext:
    """A context for :meth:`Connector.check_settings`: CAs are named by their configuration
    names (there are no ids yet), and the core is an :class:`OfflineCore` (the settings
    parsers read templates and the data directory only; anything else fails loudly)."""
    return ConnectorContext(
        name=name,
        type=type_name,
        mount=mount,
        ca_id=ca,
        template=template,
        validity=validity,
        core=cast(Core, offline),
        base_url="",
        ca_ids={ca_name: ca_name for ca_name in offline.key_algorithms},
    )


@dataclass(frozen=True)
class ConnectorContext:
    """What the gateway gives a connector instance."""

    name: str
    type: str
    mount: str
    ca_id: str
    template: str
    validity: Validity
    core: Core
    base_url: str  # the listener's public URL, without the mount path
    record_issuance: Callable[[str, str, str], None] = field(default=lambda *_: None)
    enqueue_job: Callable[..., int] | None = None
    ca_ids: Mapping[str, str] = field(default_factory=dict)
    """Every configured CA's id by its configuration name (e.g. ``issuing``), for settings
    that name another CA (the SCEP connector's ``next_ca``)."""

    @property
    def url(self) -> str:
        return self.base_url + self.mount

    def issue(
        self,
        csr: bytes | Any,
        requester: Requester,
        *,
        api_passthrough: ApiPassthrough | None = None,
        correlation_id: str | None = None,
        template: str | None = None,
        validity: Validity | None = None,
        idempotency_token: str | None = None,
        record_with: Callable[[Connection, IssuedCertificate], None] | None = None,
    ) -> IssuedCertificate:
        """Issue through the core with this instance's CA, template and validity
        (``record_with``: see :class:`IssuanceRequest`)."""
        request = IssuanceRequest(
            ca_id=self.ca_id,
            csr=csr,
            validity=validity or self.validity,
            requester=requester,
            template=template or self.template,
            api_passthrough=api_passthrough,
            correlation_id=correlation_id,
            idempotency_token=idempotency_token,
            record_with=record_with,
        )
        try:
            issued = self.core.issue(request)
        except PkigateError as exc:
            self.record_issuance(self.name, request.template, exc.code)
            raise
        self.record_issuance(self.name, request.template, "success")
        return issued


class Connector(ABC):
    """Base class of connector types. Subclasses set the class variables and implement
    :meth:`blueprint` (and, if they have admin resources, :meth:`admin_blueprint`)."""

    type_name: ClassVar[str] = ""
    listener: ClassVar[Listener] = "https"
    default_template: ClassVar[str] = "EndEntityCertificate/V1"
    default_validity: ClassVar[str] = "365d"

    def __init__(self, context: ConnectorContext, settings: Mapping[str, Any]) -> None:
        self.context = context
        self.settings = settings

    @abstractmethod
    def blueprint(self) -> Blueprint:
        """The protocol's routes, mounted at the instance's mount path."""

    def admin_blueprint(self) -> Blueprint | None:
        return None

    def refusal_body(self, status: int, message: str) -> tuple[str, bytes] | None:
        """The content type and body of an answer that the serving layer gives, before the
        app runs, to a request under this mount (a malformed or late body), in the
        protocol's own terms; None: the management API's error object."""
        return None

    @classmethod
    def check_settings(
        cls, settings: Mapping[str, Any], context: ConnectorContext, offline: OfflineCore
    ) -> None:
        """Raise :class:`ConnectorSettingsError` for a wrong setting, without a store
        (``context`` is an :func:`offline_context` over ``offline``). Connector types should
        check here everything their constructor would refuse; nothing by default."""
        return None

    def elsewhere_blueprint(self) -> Blueprint | None:
        """Routes at the same mount on the listener this connector does not serve: a
        connector that refuses a transport (AD-style over plain HTTP) says so there,
        instead of the bare 404 of an unknown path. None by default."""
        return None

    def job_handlers(self) -> Mapping[str, Callable[[dict[str, Any]], None]]:
        """Background job kinds this connector processes (see pkigate.core.jobs)."""
        return {}

    def start(self) -> None:
        """Once per start of the service, in the process that bootstraps it (before any
        worker serves a request). Nothing by default."""
        return None

    def maintenance(self) -> None:
        """Housekeeping (expired nonces, old counters), run by the gateway's periodic
        maintenance job in whichever process picks it up. Nothing by default."""
        return None

    def describe(self) -> dict[str, Any]:
        """What `pkigate serve` prints and the API lists about this instance."""
        return {
            "name": self.context.name,
            "type": self.type_name,
            "url": self.context.url,
            "ca_id": self.context.ca_id,
            "template": self.context.template,
        }

    def startup_notes(self) -> list[str]:
        """Lines printed at start (where a challenge is, a dependency that is missing)."""
        return []


def discover() -> dict[str, type[Connector]]:
    """Installed connector types by type name."""
    types: dict[str, type[Connector]] = {}
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        loaded = entry_point.load()
        if not (isinstance(loaded, type) and issubclass(loaded, Connector)):
            raise TypeError(f"entry point {entry_point.name} is not a pkigate Connector")
        types[loaded.type_name or entry_point.name] = loaded
    return types
