"""`pkigate`: the administrator's command line.

Verbs follow the managed private CA's (`ca create | list | describe | csr |
import-certificate | certificate | update | delete | restore | tag`, `cert issue | get |
list`, `audit verify | report`, `token create | list | revoke`). Human-readable output by
default, ``--json`` for scripts; on error one line on stderr and a non-zero exit.

The verbs act on a local data directory, or with ``--server URL --token ...`` on a running
server through its management API (:mod:`pkigate.gateways.remote`); both print the same.
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import os
import sys
import uuid
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from datetime import timedelta
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, ParamSpec, TypeVar

import click
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy.exc import DatabaseError

from pkigate.core import (
    Actor,
    CASettings,
    CASpec,
    CAStatus,
    CAType,
    CAView,
    Core,
    IssuanceRequest,
    KeyAlgorithm,
    Requester,
    SigningAlgorithm,
    UsageMode,
    Validity,
)
from pkigate.core.access import DEFAULT_TEAM
from pkigate.core.audit import render_report, report_rows
from pkigate.core.backup import backup_sqlite, restore_sqlite
from pkigate.core.errors import BadRequestError, NotFoundError, PkigateError, StoreIntegrityError
from pkigate.core.events import EventType
from pkigate.core.keys import KeyStorage
from pkigate.core.model import RevocationReason, parse_enum
from pkigate.core.names import parse_dn
from pkigate.core.passthrough import parse_api_passthrough
from pkigate.core.service import damaged_store_message, default_data_dir, store_url, utc_now
from pkigate.core.store import CertificateRecord, Store
from pkigate.core.store.engine import (
    MAX_POSITION,
    SCHEMA_HEAD,
    printable_url,
    read_revisions,
    schema_problem,
    sqlite_file,
)
from pkigate.core.templates import describe as describe_template
from pkigate.gateways.auth import (
    Role,
    TokenService,
    Violations,
    describe_separated,
    parse_span,
    separated_tokens,
)
from pkigate.gateways.openapi import token_json

if TYPE_CHECKING:
    from pkigate.adcs.connector import AdcsConnector
    from pkigate.gateways.connectors import Connector
    from pkigate.gateways.remote import RemoteClient
    from pkigate.scep.connector import ScepConnector

P = ParamSpec("P")
R = TypeVar("R")
C = TypeVar("C", bound="Connector")

EXIT_ERROR = 1


class State:
    """Lazily opened core, so `--help` works without a data directory."""

    def __init__(
        self,
        data_dir: Path | None,
        database_url: str | None,
        as_json: bool,
        remote: RemoteClient | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.database_url = database_url
        self.as_json = as_json
        self.remote = remote  # set with --server: the verbs call the management API
        self.config_path: Path | None = None  # the gateway configuration (`scep` verbs)
        self._core: Core | None = None

    def _open_core(self) -> Core:
        """The core, with the configuration's [pkcs11] token if one is named (for CAs
        whose keys are on it)."""
        pkcs11 = None
        if self.config_path is not None:
            from pkigate.gateways.config import ConfigError, load_config

            try:
                pkcs11 = load_config(self.config_path).pkcs11
            except ConfigError as exc:
                raise BadRequestError(str(exc)) from None
        return Core.open(self.data_dir, self.database_url, pkcs11=pkcs11)

    @property
    def core(self) -> Core:
        if self._core is None:
            self._core = self._open_core()
            self._core.authorities.purge_expired_deletions(self.actor)
            self._core.authorities.settle_interrupted_creations(self.actor)
        return self._core

    @property
    def audit_core(self) -> Core:
        """The core without the housekeeping writes: the audit verbs must open a store
        that is behind its anchor (where every write is refused) to say so or repair it."""
        if self._core is None:
            self._core = self._open_core()
        return self._core

    @property
    def tokens(self) -> TokenService:
        """Tokens under the rules of the configuration, when `token --config` names one."""
        core = self.core
        policy = None
        if self.config_path is not None:
            from pkigate.gateways.config import ConfigError, load_config

            try:
                policy = load_config(self.config_path).token_policy
            except ConfigError as exc:
                raise BadRequestError(str(exc)) from None
        return TokenService(core.store, core.audit, core.issuer._clock, policy)

    @property
    def actor(self) -> Actor:
        return Actor(f"cli:{getpass.getuser()}", "cli")

    def emit(self, data: Any, human: str | Callable[[], str]) -> None:
        if self.as_json:
            click.echo(json.dumps(data, indent=2, default=str))
        else:
            click.echo(human() if callable(human) else human)


pass_state = click.make_pass_decorator(State)


def fail(code: str, message: str, *, tagged: bool = True) -> NoReturn:
    """Report an error and exit 1: one line on stderr (``[code]`` after it when
    ``tagged``), or with ``--json`` the object ``{"error": {"code", "message"}}`` on stdout,
    so a script reads the reason where it reads results."""
    context = click.get_current_context(silent=True)
    state = context.find_object(State) if context is not None else None
    if state is not None and state.as_json:
        click.echo(json.dumps({"error": {"code": code, "message": message}}))
    else:
        click.echo(f"error: {message}" + (f" [{code}]" if tagged else ""), err=True)
    sys.exit(EXIT_ERROR)


def describe_error(exc: BaseException) -> tuple[str, str, bool] | None:
    """The code and one-line message of an error a command may end with, and whether the
    code is shown after a human-readable message; None for anything else (a bug)."""
    from pkigate.gateways.config import ConfigError

    if isinstance(exc, PkigateError):
        return exc.code, exc.message, True
    if isinstance(exc, ConfigError):
        return "configError", str(exc), False
    if isinstance(exc, OSError):  # a file named on the command line
        where = f": {exc.filename}" if exc.filename else ""
        return "fileError", f"{exc.strerror or exc}{where}", False
    if isinstance(exc, DatabaseError):
        # A database that cannot be read (a damaged page, not a database at all).
        reason = str(exc.orig) if exc.orig is not None else type(exc).__name__
        return StoreIntegrityError.code, damaged_store_message(None, reason), True
    return None


def report_error(exc: BaseException) -> NoReturn:
    """One line (:func:`fail`) for the errors :func:`describe_error` knows; anything else
    is a bug and keeps its traceback."""
    described = describe_error(exc)
    if described is None:
        raise exc
    code, message, tagged = described
    fail(code, message, tagged=tagged)


def reports_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn the core's typed errors into one line on stderr and exit status 1."""

    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except (PkigateError, OSError, DatabaseError) as exc:
            report_error(exc)

    return wrapper


class CAReference(click.types.StringParamType):
    """A CA named by its id or by the name a server configuration gave it (``[[cas]]
    name``, kept as the CA's ``pkigate:config-name`` tag); a name that more than one
    CA carries is refused with their ids."""

    name = "CA"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        try:
            uuid.UUID(text)
            return text
        except ValueError:
            pass
        from pkigate.gateways.runtime import CONFIG_NAME_TAG

        state = ctx.find_object(State) if ctx is not None else None
        if state is None:  # pragma: no cover - every command runs under main
            return text
        if state.remote is not None:
            cas = state.remote.list_cas()
        else:
            cas = [view.to_json() for view in state.core.authorities.list_cas()]
        found = [
            ca["id"]
            for ca in cas
            if ca["tags"].get(CONFIG_NAME_TAG) == text and ca["status"] != "DELETED"
        ]
        if len(found) == 1:
            return str(found[0])
        if not found:
            self.fail(f"no CA has the id or configured name {text!r}", param, ctx)
        self.fail(f"{text!r} names {len(found)} CAs ({', '.join(found)}); give its id", param, ctx)


CA_HELP = "The CA: its id, or its name in the server configuration ([[cas]] name)."


class PkigateGroup(click.Group):
    """The root command: an error escaping any command or option conversion (a store
    opened to resolve ``--ca NAME``) is reported as :func:`report_error` does, and with
    ``--json`` a usage error is a JSON object too."""

    def invoke(self, ctx: click.Context) -> Any:
        from pkigate.gateways.config import ConfigError

        try:
            return super().invoke(ctx)
        except (PkigateError, OSError, DatabaseError, ConfigError) as exc:
            report_error(exc)
        except click.ClickException as exc:
            state = ctx.find_object(State)
            if state is None or not state.as_json:
                raise
            click.echo(json.dumps({"error": {"code": "usage", "message": exc.format_message()}}))
            sys.exit(exc.exit_code)


def _audited(
    state: State, action: str, resource: str, **parameters: Any
) -> AbstractContextManager[None]:
    """Audit a refusal raised while reading the command line (local mode; a server audits
    what it is sent)."""
    core = state.core
    return core.audit.refusals(state.actor, action, resource, core.clock(), **parameters)


def _read_json(path: str, what: str) -> Any:
    """A JSON file named on the command line, or a one-line reason it cannot be used."""
    try:
        return json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise BadRequestError(f"{what} {path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise BadRequestError(f"{what} {path}: invalid JSON: {exc}") from None


def _check_writable(*paths: str | None) -> None:
    """Refuse an output file that cannot be written before doing the work (an issued
    certificate is not undone by a failed write)."""
    for path in paths:
        if not path:
            continue
        target = Path(path)
        folder = target.parent if str(target.parent) else Path(".")
        if target.is_dir():
            raise BadRequestError(f"{path} is a directory")
        if not folder.is_dir():
            raise BadRequestError(f"cannot write {path}: no directory {folder}")
        if not os.access(target if target.exists() else folder, os.W_OK):
            raise BadRequestError(f"cannot write {path}: permission denied")


@click.group(cls=PkigateGroup)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    envvar="PKIGATE_HOME",
    help="Data directory (default ./pkigate-data or $PKIGATE_HOME).",
)
@click.option(
    "--database-url",
    envvar="PKIGATE_DATABASE_URL",
    help="SQLAlchemy URL; default SQLite in the data directory.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@click.option(
    "--server",
    envvar="PKIGATE_SERVER",
    metavar="URL",
    help="Act on this server's management API (e.g. https://127.0.0.1:8443) instead of a "
    "local data directory.",
)
@click.option("--token", envvar="PKIGATE_TOKEN", help="API bearer token for --server.")
@click.option(
    "--ca-bundle",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    envvar="PKIGATE_CA_BUNDLE",
    help="PEM file of the root(s) to verify the server's TLS certificate against.",
)
@click.version_option(package_name="pkigate")
@click.pass_context
def main(
    ctx: click.Context,
    data_dir: Path | None,
    database_url: str | None,
    as_json: bool,
    server: str | None,
    token: str | None,
    ca_bundle: Path | None,
) -> None:
    """pkigate: a private certificate authority with enrollment gateways.

    \b
    Example:
      pkigate --data-dir /var/lib/pkigate ca list
    """
    remote = None
    if server:
        local = [
            name
            for name in ("data_dir", "database_url")
            if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE
        ]
        if local:
            raise click.UsageError(
                f"--server acts on a server, not on --{local[0].replace('_', '-')}"
            )
        from pkigate.gateways.remote import RemoteClient

        remote = RemoteClient(server, token, ca_bundle)
    ctx.obj = State(data_dir, database_url, as_json, remote)


# -- helpers ---------------------------------------------------------------------------------


def _read(path: str) -> bytes:
    return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()


def _key_values(pairs: Iterable[str], what: str) -> dict[str, str]:
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise BadRequestError(f"{what} must be KEY=VALUE, got {pair!r}")
        result[key] = value
    return result


def normalize_serial(serial: str) -> str:
    cleaned = serial.replace(":", "").strip().lower().removeprefix("0x").lstrip("0") or "0"
    try:
        int(cleaned, 16)
    except ValueError:
        raise BadRequestError(f"serial {serial!r} is not hexadecimal") from None
    return cleaned


def _table(columns: Sequence[str], rows: Iterable[Sequence[Any]], empty: str) -> str:
    """Rows under a header line (rich), as wide as their contents: a long subject is never
    wrapped or cut, so the output still greps and pipes line by line."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    count = 0
    for row in rows:
        table.add_row(*("-" if value is None else str(value) for value in row))
        count += 1
    if not count:
        return empty
    console = Console(width=100_000, color_system=None, highlight=False)
    with console.capture() as captured:
        console.print(table)
    return "\n".join(line.rstrip() for line in captured.get().splitlines() if line.strip())


CA_COLUMNS = ("ID", "TYPE", "STATUS", "EXPIRES", "SUBJECT")


def _ca_row(data: dict[str, Any]) -> tuple[Any, ...]:
    expires = data["not_after"][:10] if data["not_after"] else None
    return data["id"], data["type"], data["status"], expires, data["subject"]


def _ca_line(data: dict[str, Any]) -> str:
    expires = data["not_after"][:10] if data["not_after"] else "-"
    return f"{data['id']}  {data['type']:<11} {data['status']:<19} {expires}  {data['subject']}"


def _ca_details(data: dict[str, Any]) -> str:
    lines = [
        f"{key + ':':<20}{value}"
        for key, value in data.items()
        if key not in ("settings", "tags", "token_key")
    ]
    lines += [f"{'token ' + k + ':':<20}{v}" for k, v in (data.get("token_key") or {}).items()]
    lines += [f"{'tag ' + k + ':':<20}{v}" for k, v in data["tags"].items()]
    lines += [f"{k + ':':<20}{v}" for k, v in data["settings"].items() if v not in (None, False)]
    return "\n".join(lines)


def _certificate_json(record: CertificateRecord, with_pem: bool = False) -> dict[str, Any]:
    """The same fields the management API returns (so local and remote output match)."""
    from pkigate.gateways.openapi import certificate_json, certificate_pem

    data = certificate_json(record)
    if with_pem:
        data["certificate_pem"] = certificate_pem(record)
    return data


def _emit_ca(state: State, view: CAView | dict[str, Any], details: bool = True) -> None:
    data = view if isinstance(view, dict) else view.to_json()
    state.emit(data, lambda: _ca_details(data) if details else _ca_line(data))


def _csr_pem(data: bytes) -> str:
    """The API takes PEM; a DER request read from a file is converted here."""
    if data.lstrip().startswith(b"-----BEGIN"):
        return data.decode("ascii", errors="replace")
    try:
        csr = x509.load_der_x509_csr(data)
    except (ValueError, x509.InvalidVersion):
        raise BadRequestError("CSR cannot be parsed (neither PEM nor DER)") from None
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _parse_duration(text: str) -> timedelta:
    validity = Validity.parse(text)
    now = utc_now()
    return validity.not_after(now) - now


# -- ca ----------------------------------------------------------------------------------------


def config_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--config FILE`` (or ``$PKIGATE_CONFIG``): the server's TOML configuration, for a
    group whose verbs need part of it."""
    return click.option(
        "--config",
        "config_path",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        envvar="PKIGATE_CONFIG",
        help=help_text,
    )


@main.group()
@config_option(
    "The server's TOML configuration: its [pkcs11] token holds the keys of CAs "
    "created with --key-storage pkcs11."
)
@pass_state
def ca(state: State, config_path: Path | None) -> None:
    """Create and manage certificate authorities.

    \b
    Example:
      pkigate ca create --type ROOT --subject 'CN=Example Root' --validity 10y
    """
    state.config_path = config_path


def _choices(values: Sequence[Any]) -> click.Choice[str]:
    return click.Choice([str(v) for v in values])


@ca.command("create")
@click.option(
    "--type",
    "ca_type",
    type=_choices(list(CAType)),
    required=True,
    help="ROOT (self-signed) or SUBORDINATE (signed by --parent, or outside: `ca csr`).",
)
@click.option("--subject", required=True, help='RFC 4514 DN, e.g. "CN=Example Root,O=Example"')
@click.option(
    "--key-algorithm",
    type=_choices(list(KeyAlgorithm)),
    default="EC_prime256v1",
    show_default=True,
    help="The CA's key type and size.",
)
@click.option(
    "--key-storage",
    type=_choices(list(KeyStorage)),
    default="software",
    show_default=True,
    help="software: sealed under the KEK; pkcs11: generated on the [pkcs11] token of "
    "--config, never leaving it.",
)
@click.option(
    "--signing-algorithm",
    type=_choices(list(SigningAlgorithm)),
    help="Default: SHA-2 of the key's size with the key's family.",
)
@click.option(
    "--usage-mode",
    type=_choices(list(UsageMode)),
    default="GENERAL_PURPOSE",
    show_default=True,
    help="SHORT_LIVED_CERTIFICATE CAs issue certificates of at most 7 days, without CRL or OCSP.",
)
@click.option("--validity", help="e.g. 10y, 60m, 3650d, END_DATE:20351231235959")
@click.option(
    "--parent",
    "parent_id",
    type=CAReference(),
    help="Sign the new SUBORDINATE with this pkigate CA (its id or configured name).",
)
@click.option(
    "--path-length",
    type=click.IntRange(0, 3),
    help="How many CAs may follow below this one (basicConstraints pathLenConstraint).",
)
@click.option(
    "--crl-url", help="CRL distribution point written into the certificates this CA issues."
)
@click.option(
    "--ocsp-url", help="OCSP responder URL written into the certificates this CA issues (AIA)."
)
@click.option(
    "--ca-issuers-url", help="Where this CA's certificate can be fetched (AIA caIssuers)."
)
@click.option(
    "--name-constraints",
    type=click.Path(exists=True, dir_okay=False),
    help="JSON file: permitted_dns, excluded_dns, permitted_ip, ...",
)
@click.option(
    "--backdate-seconds",
    type=click.IntRange(0, 86400),
    default=300,
    show_default=True,
    help="How far notBefore is set in the past, for clients with slow clocks.",
)
@click.option(
    "--truncate-validity",
    is_flag=True,
    help="Cut leaf validity at the CA's notAfter instead of refusing.",
)
@click.option(
    "--tag",
    "tags",
    multiple=True,
    metavar="KEY=VALUE",
    help="KEY=VALUE tag on the new CA (repeatable).",
)
@click.option(
    "--idempotency-token",
    help="Retrying with the same token returns the CA created the first time.",
)
@click.option(
    "--team",
    help='The team that owns the CA; by default "default" on the CA host, the calling '
    "token's with --server.",
)
@pass_state
@reports_errors
def ca_create(
    state: State,
    ca_type: str,
    subject: str,
    key_algorithm: str,
    key_storage: str,
    signing_algorithm: str | None,
    usage_mode: str,
    validity: str | None,
    parent_id: str | None,
    path_length: int | None,
    crl_url: str | None,
    ocsp_url: str | None,
    ca_issuers_url: str | None,
    name_constraints: str | None,
    backdate_seconds: int,
    truncate_validity: bool,
    tags: tuple[str, ...],
    idempotency_token: str | None,
    team: str | None,
) -> None:
    """Create a ROOT (self-signed) or SUBORDINATE CA.

    A SUBORDINATE without --parent waits in PENDING_CERTIFICATE: export its CSR with
    `pkigate ca csr`, have it signed elsewhere, then `pkigate ca import-certificate`.

    \b
    Example:
      pkigate ca create --type SUBORDINATE --parent root --subject 'CN=Example Issuing' \\
        --validity 5y --path-length 0
    """

    def settings_json() -> dict[str, Any]:
        return {
            "crl_url": crl_url,
            "ocsp_url": ocsp_url,
            "ca_issuers_url": ca_issuers_url,
            "name_constraints": _read_json(name_constraints, "name constraints")
            if name_constraints
            else None,
            "backdate_seconds": backdate_seconds,
            "truncate_validity": truncate_validity,
        }

    if state.remote is not None:
        body = {
            "type": ca_type,
            "subject": subject,
            "key_algorithm": key_algorithm,
            "key_storage": key_storage,
            "signing_algorithm": signing_algorithm,
            "usage_mode": usage_mode,
            "validity": validity,
            "parent_id": parent_id,
            "path_length": path_length,
            "settings": settings_json(),
            "tags": _key_values(tags, "--tag"),
            "idempotency_token": idempotency_token,
            "team": team,
        }
        _emit_ca(state, state.remote.create_ca({k: v for k, v in body.items() if v is not None}))
        return
    # What the command line says is read under the same audit as the creation: a refusal
    # of a bad subject or validity is in the audit log like the core's own refusals.
    with _audited(state, "ca.create", "ca/-", subject=subject):
        spec = CASpec(
            type=CAType(ca_type),
            subject=parse_dn(subject),
            key_algorithm=KeyAlgorithm(key_algorithm),
            signing_algorithm=SigningAlgorithm(signing_algorithm) if signing_algorithm else None,
            usage_mode=UsageMode(usage_mode),
            validity=Validity.parse(validity) if validity else None,
            parent_ca_id=parent_id,
            path_length=path_length,
            settings=CASettings.from_json(settings_json()),
            tags=_key_values(tags, "--tag"),
            key_storage=KeyStorage(key_storage),
            team=team or DEFAULT_TEAM,
        )
    _emit_ca(state, state.core.authorities.create(spec, state.actor, idempotency_token))


@ca.command("import-token-key")
@click.option(
    "--certificate",
    "certificate_path",
    type=click.Path(exists=True, dir_okay=False),
    required=True,
    help="The CA certificate (PEM or DER), made elsewhere for the key on the token.",
)
@click.option(
    "--chain",
    "chain_path",
    type=click.Path(exists=True, dir_okay=False),
    help="Its issuers up to the root (PEM); none for a self-signed root.",
)
@click.option("--label", help="The private key's CKA_LABEL on the token.")
@click.option("--id", "token_id", help="The private key's CKA_ID on the token, in hex.")
@click.option(
    "--tag",
    "tags",
    multiple=True,
    metavar="KEY=VALUE",
    help="KEY=VALUE tag on the new CA (repeatable).",
)
@pass_state
@reports_errors
def ca_import_token_key(
    state: State,
    certificate_path: str,
    chain_path: str | None,
    label: str | None,
    token_id: str | None,
    tags: tuple[str, ...],
) -> None:
    """Make a CA of a certificate whose key already sits on the [pkcs11] token of --config
    (bring your own root or issuing CA whose key is in an HSM). The key must match the
    certificate; the store keeps only where it is on the token.

    \b
    Example:
      pkigate ca --config pkigate.toml import-token-key --certificate root.pem \\
        --label root
    """
    try:
        id_bytes = bytes.fromhex(token_id) if token_id else None
    except ValueError:
        raise BadRequestError(f"--id must be hex, not {token_id!r}") from None
    certificate, chain = _read(certificate_path), _read(chain_path) if chain_path else None
    if state.remote is not None:
        body = {
            "certificate_pem": certificate.decode(),
            "chain_pem": chain.decode() if chain else None,
            "label": label,
            "id": token_id,
            "tags": _key_values(tags, "--tag"),
        }
        _emit_ca(state, state.remote.import_token_key_ca({k: v for k, v in body.items() if v}))
        return
    view = state.core.authorities.import_token_ca(
        certificate,
        chain,
        label,
        id_bytes,
        state.actor,
        _key_values(tags, "--tag"),
    )
    _emit_ca(state, view)


@ca.command("list")
@click.option("--status", type=_choices(list(CAStatus)), help="Only CAs with this status.")
@pass_state
@reports_errors
def ca_list(state: State, status: str | None) -> None:
    """List CAs with their status and expiry.

    \b
    Example:
      pkigate ca list --status ACTIVE
    """
    if state.remote is not None:
        cas = state.remote.list_cas(status)
    else:
        views = state.core.authorities.list_cas(CAStatus(status) if status else None)
        cas = [v.to_json() for v in views]
    state.emit(cas, lambda: _table(CA_COLUMNS, map(_ca_row, cas), "no CAs"))


@ca.command("describe")
@click.argument("ca_id")
@pass_state
@reports_errors
def ca_describe(state: State, ca_id: str) -> None:
    """Show one CA.

    \b
    Example:
      pkigate ca describe 94872d91-8a93-41e9-a02b-d071477df881
    """
    if state.remote is not None:
        _emit_ca(state, state.remote.describe_ca(ca_id))
    else:
        _emit_ca(state, state.core.authorities.describe(ca_id))


@ca.command("csr")
@click.argument("ca_id")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the PEM CSR here.")
@pass_state
@reports_errors
def ca_csr(state: State, ca_id: str, out: str | None) -> None:
    """Export a SUBORDINATE CA's CSR (PEM) for signing by an outside parent.

    \b
    Example:
      pkigate ca csr 94872d91-8a93-41e9-a02b-d071477df881 > issuing.csr
    """
    _check_writable(out)
    pem = state.remote.ca_csr(ca_id) if state.remote else state.core.authorities.csr_pem(ca_id)
    if out:
        Path(out).write_text(pem)
    state.emit({"ca_id": ca_id, "csr_pem": pem}, pem.rstrip() if not out else f"wrote {out}")


@ca.command("import-certificate")
@click.argument("ca_id")
@click.option(
    "--certificate",
    "certificate_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, allow_dash=True),
    help="PEM file with the CA certificate, then its chain up to the root.",
)
@click.option(
    "--chain",
    "chain_path",
    type=click.Path(exists=True, dir_okay=False),
    help="PEM bundle of the issuers, the direct issuer first, up to the root.",
)
@pass_state
@reports_errors
def ca_import_certificate(
    state: State, ca_id: str, certificate_path: str, chain_path: str | None
) -> None:
    """Install a CA certificate signed elsewhere (bring your own parent).

    \b
    Example:
      pkigate ca import-certificate 94872d91-8a93-41e9-a02b-d071477df881 --certificate issuing.pem
    """
    certificate, chain = _read(certificate_path), _read(chain_path) if chain_path else None
    if state.remote is not None:
        _emit_ca(
            state,
            state.remote.import_ca_certificate(
                ca_id, certificate.decode(), chain.decode() if chain else None
            ),
        )
        return
    view = state.core.authorities.import_certificate(ca_id, certificate, chain, state.actor)
    _emit_ca(state, view)


@ca.command("certificate")
@click.argument("ca_id", type=CAReference())
@pass_state
@reports_errors
def ca_certificate(state: State, ca_id: str) -> None:
    """Print the CA's certificate followed by its chain (PEM).

    \b
    Example:
      pkigate ca certificate issuing > chain.pem
    """
    if state.remote is not None:
        data = state.remote.ca_certificate(ca_id)
        certificate, chain = data["certificate_pem"], data["chain_pem"]
    else:
        certificate, chain = state.core.authorities.certificate_pem(ca_id)
    state.emit({"certificate_pem": certificate, "chain_pem": chain}, (certificate + chain).rstrip())


@ca.command("crl")
@click.argument("ca_id")
@click.option(
    "--partition",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="0 for a COMPLETE CA's CRL; 1, 2, ... for a PARTITIONED CA's.",
)
@click.option("--generate", is_flag=True, help="Sign a new CRL now instead of the current one.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the DER CRL here.")
@pass_state
@reports_errors
def ca_crl(state: State, ca_id: str, partition: int, generate: bool, out: str | None) -> None:
    """Fetch (or with --generate, sign) a CA's CRL.

    \b
    Example:
      pkigate ca crl 94872d91-8a93-41e9-a02b-d071477df881 --generate
    """
    _check_writable(out)
    revocation = state.core.revocation
    published = (
        revocation.generate_crl(ca_id, partition)
        if generate
        else revocation.current_crl(ca_id, partition)
    )
    if out:
        Path(out).write_bytes(published.der)
    data = {
        "ca_id": ca_id,
        "partition": partition,
        "crl_number": published.number,
        "this_update": published.this_update.isoformat(),
        "next_update": published.next_update.isoformat(),
        "entries": published.entries,
    }
    state.emit(data, lambda: "\n".join(f"{k + ':':<14}{v}" for k, v in data.items()))


@ca.command("update")
@click.argument("ca_id")
@click.option(
    "--status",
    type=click.Choice(["ACTIVE", "DISABLED"]),
    required=True,
    help="ACTIVE to enable the CA, DISABLED to stop it issuing.",
)
@pass_state
@reports_errors
def ca_update(state: State, ca_id: str, status: str) -> None:
    """Enable or disable a CA.

    \b
    Example:
      pkigate ca update 94872d91-8a93-41e9-a02b-d071477df881 --status DISABLED
    """
    if state.remote is not None:
        _emit_ca(state, state.remote.update_ca(ca_id, {"status": status}), details=False)
        return
    view = state.core.authorities.update_status(ca_id, CAStatus(status), state.actor)
    _emit_ca(state, view, details=False)


@ca.command("delete")
@click.argument("ca_id")
@click.option(
    "--restore-days",
    type=int,
    default=30,
    show_default=True,
    help="Days (7-30) during which `pkigate ca restore` can undo this.",
)
@pass_state
@reports_errors
def ca_delete(state: State, ca_id: str, restore_days: int) -> None:
    """Delete a CA that is not ACTIVE; its key is destroyed after the restore window.

    \b
    Example:
      pkigate ca delete 94872d91-8a93-41e9-a02b-d071477df881 --restore-days 7
    """
    if state.remote is not None:
        _emit_ca(state, state.remote.delete_ca(ca_id, restore_days), details=False)
        return
    _emit_ca(state, state.core.authorities.delete(ca_id, restore_days, state.actor), details=False)


@ca.command("restore")
@click.argument("ca_id")
@pass_state
@reports_errors
def ca_restore(state: State, ca_id: str) -> None:
    """Undo a deletion within its restore window.

    \b
    Example:
      pkigate ca restore 94872d91-8a93-41e9-a02b-d071477df881
    """
    if state.remote is not None:
        _emit_ca(state, state.remote.restore_ca(ca_id), details=False)
        return
    _emit_ca(state, state.core.authorities.restore(ca_id, state.actor), details=False)


@ca.command("tag")
@click.argument("ca_id")
@click.argument("tags", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--remove", multiple=True, metavar="KEY", help="Remove this tag (repeatable).")
@pass_state
@reports_errors
def ca_tag(state: State, ca_id: str, tags: tuple[str, ...], remove: tuple[str, ...]) -> None:
    """Add, change or remove tags on a CA; with no arguments, list them.

    \b
    Example:
      pkigate ca tag 94872d91-8a93-41e9-a02b-d071477df881 team=pki --remove old
    """
    remote = state.remote
    if remote is not None:
        current = remote.tags(ca_id) if not (tags or remove) else {}
        if tags:
            current = remote.set_tags(ca_id, _key_values(tags, "tag"))
        if remove:
            current = remote.remove_tags(ca_id, list(remove))
    else:
        authorities = state.core.authorities
        with _audited(state, "ca.tag", f"ca/{ca_id}"):
            adding = _key_values(tags, "tag")
        view = (
            authorities.tag(ca_id, adding, list(remove), state.actor)
            if tags or remove
            else authorities.describe(ca_id)
        )
        current = dict(view.tags)
    state.emit(current, lambda: "\n".join(f"{k}={v}" for k, v in current.items()) or "no tags")


# -- cert --------------------------------------------------------------------------------------


@main.group()
def cert() -> None:
    """Issue and look up certificates.

    \b
    Example:
      pkigate cert issue --ca issuing --csr www.csr --template EndEntityServerAuthCertificate/V1
    """


@cert.command("issue")
@click.option("--ca", "ca_id", type=CAReference(), required=True, help=CA_HELP)
@click.option(
    "--csr",
    "csr_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, allow_dash=True),
    help="PKCS#10 request file, PEM or DER ('-' for stdin).",
)
@click.option(
    "--template",
    default="EndEntityCertificate/V1",
    show_default=True,
    help="Certificate template (see `pkigate template list`).",
)
@click.option(
    "--validity",
    default="30d",
    show_default=True,
    help="Lifetime (30d, 1y) or an end date (2027-01-31).",
)
@click.option(
    "--api-passthrough",
    type=click.Path(exists=True, dir_okay=False),
    help="JSON file with subject, sans, key_usage, extended_key_usage, ...",
)
@click.option(
    "--signing-algorithm",
    type=_choices(list(SigningAlgorithm)),
    help="Signature algorithm; default: the CA's.",
)
@click.option(
    "--idempotency-token",
    help="Retrying with the same token returns the certificate issued the first time.",
)
@click.option("--out", type=click.Path(dir_okay=False), help="Write the certificate (PEM).")
@click.option(
    "--chain-out", type=click.Path(dir_okay=False), help="Write the chain (issuing CA first, PEM)."
)
@pass_state
@reports_errors
def cert_issue(
    state: State,
    ca_id: str,
    csr_path: str,
    template: str,
    validity: str,
    api_passthrough: str | None,
    signing_algorithm: str | None,
    idempotency_token: str | None,
    out: str | None,
    chain_out: str | None,
) -> None:
    """Issue a certificate from a PKCS#10 request.

    \b
    Example:
      pkigate cert issue --ca issuing --csr www.csr \\
        --template EndEntityServerAuthCertificate/V1 --validity 90d --out www.pem
    """
    _check_writable(out, chain_out)
    passthrough_json = None
    if api_passthrough:
        passthrough_json = _read_json(api_passthrough, "API passthrough")
    if state.remote is not None:
        body = {
            "csr": _csr_pem(_read(csr_path)),
            "template": template,
            "validity": validity,
            "api_passthrough": passthrough_json,
            "signing_algorithm": signing_algorithm,
            "idempotency_token": idempotency_token,
        }
        data = state.remote.issue(ca_id, {k: v for k, v in body.items() if v is not None})
    else:
        data = _issue_locally(
            state,
            ca_id,
            _read(csr_path),
            template,
            validity,
            passthrough_json if api_passthrough else None,
            signing_algorithm,
            idempotency_token,
        )
    if out:
        Path(out).write_text(data["certificate_pem"])
    if chain_out:
        Path(chain_out).write_text(data["chain_pem"])
    state.emit(
        data,
        data["certificate_pem"].rstrip()
        if not out
        else f"issued serial {data['serial']} to {data['subject']}; wrote {out}",
    )


def _issue_locally(
    state: State,
    ca_id: str,
    csr: bytes,
    template: str,
    validity: str,
    passthrough_json: Any | None,
    signing_algorithm: str | None,
    idempotency_token: str | None,
) -> dict[str, Any]:
    with _audited(state, "certificate.issue", f"ca/{ca_id}", template=template):
        request = IssuanceRequest(
            ca_id=ca_id,
            csr=csr,
            validity=Validity.parse(validity),
            requester=Requester(state.actor.principal, "cli"),
            template=template,
            api_passthrough=parse_api_passthrough(passthrough_json)
            if passthrough_json is not None
            else None,
            signing_algorithm=parse_enum(SigningAlgorithm, signing_algorithm, "signing algorithm")
            if signing_algorithm
            else None,
            idempotency_token=idempotency_token,
        )
    issued = state.core.issue(request)
    return {
        **_certificate_json(issued.record),
        "certificate_pem": issued.pem(),
        "chain_pem": issued.chain_pem(),
    }


@cert.command("get")
@click.option("--ca", "ca_id", type=CAReference(), required=True, help=CA_HELP)
@click.option(
    "--serial", required=True, help="The certificate's serial number in hex (colons allowed)."
)
@click.option("--pem", "as_pem", is_flag=True, help="Print only the certificate PEM.")
@pass_state
@reports_errors
def cert_get(state: State, ca_id: str, serial: str, as_pem: bool) -> None:
    """Show one certificate by CA and serial.

    \b
    Example:
      pkigate cert get --ca issuing --serial 23b85c99415819
    """
    if state.remote is not None:
        data = state.remote.certificate(ca_id, normalize_serial(serial))
        data.pop("chain_pem", None)  # the same fields as a local lookup
    else:
        core = state.core
        with core.store.read() as conn:
            record = core.store.get_certificate(conn, ca_id, normalize_serial(serial))
        if record is None:
            from pkigate.core.errors import NotFoundError

            raise NotFoundError(f"CA {ca_id} has issued no certificate with serial {serial}")
        data = _certificate_json(record, with_pem=True)
    if as_pem:
        click.echo(data["certificate_pem"].rstrip())
        return
    state.emit(
        data,
        lambda: (
            "\n".join(f"{k + ':':<20}{v}" for k, v in data.items() if k != "certificate_pem")
            + "\n"
            + data["certificate_pem"].rstrip()
        ),
    )


@cert.command("revoke")
@click.option("--ca", "ca_id", type=CAReference(), required=True, help=CA_HELP)
@click.option(
    "--serial", required=True, help="The certificate's serial number in hex (colons allowed)."
)
@click.option(
    "--reason",
    type=click.Choice([r.value for r in RevocationReason]),
    default="unspecified",
    show_default=True,
    help="RFC 5280 revocation reason.",
)
@pass_state
@reports_errors
def cert_revoke(state: State, ca_id: str, serial: str, reason: str) -> None:
    """Revoke a certificate (CRLs follow shortly; OCSP answers 'revoked' at once).

    \b
    Example:
      pkigate cert revoke --ca issuing --serial 23b85c99415819 --reason keyCompromise
    """
    if state.remote is not None:
        data = state.remote.revoke(ca_id, normalize_serial(serial), reason)
        data.pop("chain_pem", None)
    else:
        record = state.core.revocation.revoke(
            ca_id, normalize_serial(serial), RevocationReason(reason), state.actor
        )
        data = _certificate_json(record)
    state.emit(data, f"revoked {data['serial']} ({reason}) at {data['revoked_at']}")


@cert.command("list")
@click.option("--ca", "ca_id", type=CAReference(), help=CA_HELP + " Default: every CA.")
@click.option(
    "--status",
    type=click.Choice(["ISSUED", "REVOKED"]),
    help="Only ISSUED or only REVOKED certificates.",
)
@click.option("--expiring-within", help="e.g. 30d: only those whose notAfter is that close.")
@click.option("--include-expired", is_flag=True, help="Also list certificates past their notAfter.")
@click.option(
    "--limit",
    type=click.IntRange(1),
    default=1000,
    show_default=True,
    help="At most this many certificates.",
)
@pass_state
@reports_errors
def cert_list(
    state: State,
    ca_id: str | None,
    status: str | None,
    expiring_within: str | None,
    include_expired: bool,
    limit: int,
) -> None:
    """List issued certificates, filtered by CA, status and expiry window.

    \b
    Example:
      pkigate cert list --ca issuing --status ISSUED --expiring-within 30d
    """
    if state.remote is not None:
        certificates = _list_remotely(
            state.remote, ca_id, status, expiring_within, include_expired, limit
        )
    else:
        now = utc_now()
        core = state.core
        with core.store.read() as conn:
            records = core.store.list_certificates(
                conn,
                ca_id=ca_id,
                status=status,
                expiring_before=now + _parse_duration(expiring_within) if expiring_within else None,
                not_expired_at=None if include_expired else now,
                limit=limit,
            )
        certificates = [_certificate_json(r) for r in records]
    state.emit(
        certificates,
        lambda: _table(
            ("SERIAL", "STATUS", "EXPIRES", "TEMPLATE", "SUBJECT"),
            (
                (c["serial"], c["status"], c["not_after"][:10], c["template"], c["subject"])
                for c in certificates
            ),
            "no certificates",
        ),
    )


def _list_remotely(
    remote: RemoteClient,
    ca_id: str | None,
    status: str | None,
    expiring_within: str | None,
    include_expired: bool,
    limit: int,
) -> list[dict[str, Any]]:
    """The API lists per CA; without --ca, go through every CA the server has."""
    filters = {
        "status": status,
        "expiring_within": expiring_within,
        "include_expired": "true" if include_expired else None,
    }
    ca_ids = [ca_id] if ca_id else [c["id"] for c in remote.list_cas()]
    found: list[dict[str, Any]] = []
    for each in ca_ids:
        for certificate in remote.certificates(each, filters, page_size=min(limit, 1000)):
            found.append(certificate)
            if len(found) >= limit:
                return found
    return found


# -- template ----------------------------------------------------------------------------------


@main.group()
def template() -> None:
    """The certificate template catalogue.

    \b
    Example:
      pkigate template list
    """


@template.command("list")
@pass_state
@reports_errors
def template_list(state: State) -> None:
    """List the templates by name.

    \b
    Example:
      pkigate --json template list
    """
    if state.remote is not None:
        templates = state.remote.templates()
    else:
        templates = [describe_template(t) for t in state.core.templates]
    state.emit(
        templates,
        lambda: _table(
            ("NAME", "DESCRIPTION"),
            ((t["name"], t["description"]) for t in templates),
            "no templates",
        ),
    )


# -- audit -------------------------------------------------------------------------------------


@main.group()
def audit() -> None:
    """Verify the audit log and export reports.

    \b
    Example:
      pkigate audit verify
    """


@audit.command("verify")
@pass_state
@reports_errors
def audit_verify(state: State) -> None:
    """Check the hash chain; name every edited, inserted or deleted event.

    \b
    Example:
      pkigate audit verify
    """
    if state.remote is not None:
        data = state.remote.verify_audit()
    else:
        core = state.audit_core
        problem = core.store.integrity_problem()
        if problem is not None:
            raise StoreIntegrityError(damaged_store_message(core.store.sqlite_database, problem))
        result = core.audit.verify()
        data = {
            "ok": result.ok,
            "events": result.events,
            "problems": [
                {"seq": p.seq, "kind": p.kind, "detail": p.detail} for p in result.problems
            ],
        }
    state.emit(
        data,
        lambda: (
            f"audit log OK: {data['events']} events verified"
            if data["ok"]
            else "audit log TAMPERED:\n"
            + "\n".join(f"  event {p['seq']}: {p['kind']}: {p['detail']}" for p in data["problems"])
        ),
    )
    if not data["ok"]:
        sys.exit(EXIT_ERROR)


@audit.command("list")
@click.option("--actor", help="Events whose actor contains this (case-insensitive).")
@click.option("--action", help='This action, or all under a prefix ending in "." (certificate.).')
@click.option("--resource", help="Events whose resource contains this (case-insensitive).")
@click.option("--since", help="From this time (ISO 8601; UTC without an offset).")
@click.option("--until", help="Before this time (ISO 8601; UTC without an offset).")
@click.option("--request-id", help="The X-Request-Id of the request that caused them.")
@click.option(
    "--limit",
    type=click.IntRange(1, 1000),
    default=100,
    show_default=True,
    help="At most this many events, newest first.",
)
@pass_state
@reports_errors
def audit_list(
    state: State,
    actor: str | None,
    action: str | None,
    resource: str | None,
    since: str | None,
    until: str | None,
    request_id: str | None,
    limit: int,
) -> None:
    """Audit events, newest first, filtered (as GET /api/v1/audit/events).

    \b
    Example:
      pkigate audit list --action certificate.revoke --since 2026-12-01T00:00:00
    """
    from pkigate.gateways.api import audit_event_json, find_audit_events

    filters = {
        "actor": actor,
        "action": action,
        "resource": resource,
        "since": since,
        "until": until,
        "request_id": request_id,
    }
    if state.remote is not None:
        events = state.remote.audit_events(filters, limit)
    else:
        found = find_audit_events(state.audit_core.store, filters, limit)
        events = [audit_event_json(e) for e in found]
    state.emit(
        {"events": events},
        lambda: (
            "\n".join(
                f"{e['seq']:>8} {e['at']} {e['actor']} {e['action']} {e['resource']} {e['result']}"
                for e in events
            )
            or "no event matches"
        ),
    )


@audit.command("recover")
@pass_state
@reports_errors
def audit_recover(state: State) -> None:
    """Put back what the audit anchor holds and the store lost (events, certificates).

    \b
    Example:
      pkigate audit recover
    """
    if state.remote is not None:
        raise BadRequestError("`pkigate audit recover` works on a local data directory")
    core = state.audit_core
    result = core.audit.recover(state.actor, core.clock())
    data = dataclasses.asdict(result)

    def human() -> str:
        lines = []
        if result.events or result.certificates or result.revocations:
            events = (
                f"audit events {result.first_seq}..{result.last_seq} ({result.events} events)"
                if result.events
                else "no audit events"
            )
            lines.append(
                f"recovered {events}, {result.certificates} certificates, "
                f"{result.revocations} revocations"
            )
        if result.outside_chain:
            lines.append(
                f"{len(result.outside_chain)} events of this host could not go back into the "
                "audit chain (another host's lost event comes before them, or other events "
                "took their numbers): their certificates and revocations were put back, the "
                "events stay in this host's journal. Events only other hosts wrote are in "
                "their journals: run `pkigate audit recover` on each host that wrote to "
                "this database."
            )
        if not lines:
            return "nothing to recover: the store holds every event its audit anchor holds"
        if result.not_restored:
            lines.append(
                "not restored (their CA is not in the store): " + ", ".join(result.not_restored)
            )
        return "\n".join(lines)

    state.emit(data, human)


@audit.command("reanchor")
@click.option("--yes", is_flag=True, help="Confirm: what only the old anchor holds is given up.")
@pass_state
@reports_errors
def audit_reanchor(state: State, yes: bool) -> None:
    """Start a new audit anchor from the store's head (after restoring an older database
    on purpose, or when the anchor is lost); the old anchor file is kept beside it.

    \b
    Example:
      pkigate audit reanchor --yes
    """
    if state.remote is not None:
        raise BadRequestError("`pkigate audit reanchor` works on a local data directory")
    if not yes:
        raise BadRequestError(
            "this gives up what only the audit anchor holds; run `pkigate audit recover` "
            "first if that is wanted, or confirm with --yes"
        )
    core = state.audit_core
    status = core.audit.reanchor(state.actor, core.clock())
    given_up = f"; gave up events {status.lost_from}..{status.lost_to}" if status.lost_from else ""
    state.emit(
        {
            "previous_state": status.state,
            "given_up_from": status.lost_from or None,
            "given_up_to": status.lost_to or None,
        },
        f"started a new audit anchor (it was {status.state}){given_up}",
    )


@audit.command("report")
@click.option("--ca", "ca_id", type=CAReference(), required=True, help=CA_HELP)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["json", "csv"]),
    default="json",
    show_default=True,
    help="json or csv.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    help="Write the report to this file instead of stdout.",
)
@pass_state
@reports_errors
def audit_report(state: State, ca_id: str, fmt: str, out: str | None) -> None:
    """Every certificate a CA issued or revoked, as JSON or CSV.

    \b
    Example:
      pkigate audit report --ca issuing --format csv --out issued.csv
    """
    _check_writable(out)
    if state.remote is not None:
        rows = state.remote.audit_report_rows(ca_id)
    else:
        core = state.core
        core.authorities.get(ca_id)
        with core.store.read() as conn:
            rows = report_rows(core.store.list_certificates(conn, ca_id=ca_id))
    text = render_report(rows, fmt)
    if out:
        Path(out).write_text(text)
        click.echo(f"wrote {len(rows)} certificates to {out}")
    else:
        click.echo(text.rstrip())


# -- db ----------------------------------------------------------------------------------------


@main.group()
def db() -> None:
    """The store itself: backups, restores and explicit schema migrations.

    \b
    Example:
      pkigate db backup --out /var/backups/pkigate.db
    """


def _local_store(state: State, verb: str) -> tuple[Path, str]:
    """The data directory and database URL a `db` verb acts on (never a --server)."""
    if state.remote is not None:
        raise BadRequestError(f"`pkigate db {verb}` works on a local data directory")
    data_dir = (state.data_dir or default_data_dir()).resolve()
    return data_dir, store_url(data_dir, state.database_url)


def _sqlite_store(state: State, verb: str, postgres_hint: str) -> tuple[Path, Path]:
    data_dir, url = _local_store(state, verb)
    database = sqlite_file(url)
    if database is None:
        raise BadRequestError(
            f'the store is PostgreSQL: {postgres_hint} (README, "Running in production")'
        )
    return data_dir, database


@db.command("backup")
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The backup file to write (a new file; mode 0600).",
)
@pass_state
@reports_errors
def db_backup(state: State, out: Path) -> None:
    """Copy the SQLite store into FILE while pkigate runs (a consistent snapshot, SQLite's
    online backup API). The KEK is not in it: keep a copy of the key-encryption key apart.

    \b
    Example:
      pkigate db backup --out /var/backups/pkigate/$(date +%F).db
    """
    _data_dir, database = _sqlite_store(state, "backup", "back it up with pg_dump")
    _check_writable(str(out))
    summary = backup_sqlite(database, out)
    state.emit(
        {"backup": str(out), "revision": summary.revision, "audit_head": summary.audit_head},
        f"backed up {database} to {out} (schema {summary.revision}, audit events "
        f"1..{summary.audit_head}); the key-encryption key is not in it: keep it apart",
    )


@db.command("restore")
@click.argument("backup", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace the store already in the data directory.")
@pass_state
@reports_errors
def db_restore(state: State, backup: Path, force: bool) -> None:
    """Put a backup made by `pkigate db backup` in the data directory, after checking that
    the KEK opens its CA keys and its audit chain verifies. Stop pkigate first.

    \b
    Example:
      pkigate --data-dir /var/lib/pkigate db restore /var/backups/pkigate/2026-12-01.db
    """
    data_dir, database = _sqlite_store(state, "restore", "put a pg_dump back with pg_restore")
    result = restore_sqlite(
        backup, database, data_dir, force=force, actor=state.actor, now=utc_now()
    )
    anchor = {
        "kept": "the audit anchor matches it",
        "started": "a new audit anchor starts from its head (audited)",
        "later": f"then run `pkigate db upgrade` (it is at schema {result.backup.revision})",
    }[result.anchor]
    state.emit(
        {
            "database": str(result.database),
            "revision": result.backup.revision,
            "audit_head": result.backup.audit_head,
            "keys_checked": result.keys_checked,
            "events_verified": result.events_verified,
            "anchor": result.anchor,
            "upgrade_needed": result.upgrade_needed,
        },
        f"restored {backup} into {result.database}: {result.keys_checked} CA keys open with "
        f"this KEK, audit chain OK ({result.events_verified} events); {anchor}",
    )


@db.command("current")
@pass_state
@reports_errors
def db_current(state: State) -> None:
    """Show the store's schema revision and whether `pkigate db upgrade` is due.

    \b
    Example:
      pkigate db current
    """
    data_dir, url = _local_store(state, "current")
    database = sqlite_file(url)
    revisions = [] if database is not None and not database.exists() else read_revisions(url)
    problem = schema_problem(revisions, printable_url(url) if database is None else str(database))
    state.emit(
        {"revisions": revisions, "head": SCHEMA_HEAD, "up_to_date": problem is None},
        problem
        or (
            f"schema revision {SCHEMA_HEAD} (the newest this pkigate knows)"
            if revisions
            else f"no store yet in {data_dir}: it is created at {SCHEMA_HEAD} on first use"
        ),
    )


@db.command("upgrade")
@pass_state
@reports_errors
def db_upgrade(state: State) -> None:
    """Migrate the store to this pkigate's schema (back it up first; on PostgreSQL, with
    every host's pkigate stopped or already upgraded).

    \b
    Example:
      pkigate db backup --out before-upgrade.db
      pkigate db upgrade
    """
    _data_dir, url = _local_store(state, "upgrade")
    before = read_revisions(url)
    Store.open(url, upgrade_schema=True).close()
    state.emit(
        {"from": before, "to": SCHEMA_HEAD},
        f"schema revision {', '.join(before) or '(new store)'} -> {SCHEMA_HEAD}"
        if before != [SCHEMA_HEAD]
        else f"already at schema revision {SCHEMA_HEAD}",
    )


# -- config ------------------------------------------------------------------------------------


@main.group("config")
def config_group() -> None:
    """Check a server configuration file.

    \b
    Example:
      pkigate config check /etc/pkigate/pkigate.toml
    """


@config_group.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@pass_state
@reports_errors
def config_check(state: State, file: Path) -> None:
    """Parse and validate FILE as `pkigate serve --config FILE` would (connector settings
    included), changing nothing: no data directory is made, no store written. On the first
    problem, one line FILE:LINE: key: problem and exit status 1. When the store it names
    exists, its tokens that break separation_of_duties are named in one warning.

    \b
    Example:
      pkigate config check /etc/pkigate/pkigate.toml
    """
    from pkigate.gateways.config import ConfigError, check_file

    try:
        config = check_file(file)
    except ConfigError as exc:
        raise BadRequestError(str(exc)) from None
    connectors = config.connectors
    separated = _separated_tokens(config, state.data_dir)
    if separated:
        click.echo(
            f"warning: {len(separated)} token(s) hold roles that separation_of_duties keeps "
            f"apart and are refused at use: {describe_separated(separated)}",
            err=True,
        )
    state.emit(
        {
            "file": str(file),
            "cas": [ca.name for ca in config.cas],
            "connectors": None if connectors is None else [c.name for c in connectors],
            "separated_tokens": [record.id for record, _ in separated],
        },
        f"{file}: OK ({len(config.cas)} CAs, "
        + ("every installed connector" if connectors is None else f"{len(connectors)} connectors")
        + ")",
    )


def _separated_tokens(config: Any, data_dir: Path | None) -> Violations:
    """The tokens of the store the configuration names that break its separation of
    duties, read without creating or migrating anything (none when there is no such store
    yet, or it is at another schema revision)."""
    from pkigate.core.store.engine import create_store_engine

    if not config.token_policy.separated:
        return []
    directory = (data_dir or config.data_dir or default_data_dir()).resolve()
    url = store_url(directory, config.database_url)
    database = sqlite_file(url)
    if (database is not None and not database.exists()) or read_revisions(url) != [SCHEMA_HEAD]:
        return []
    engine = create_store_engine(url)
    try:
        with engine.connect() as conn:
            records = Store(engine).list_api_tokens(conn)
    finally:
        engine.dispose()
    return separated_tokens(records, config.token_policy.separated)


# -- serve -------------------------------------------------------------------------------------


@main.command("serve")
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    envvar="PKIGATE_CONFIG",
    help="TOML configuration (default: embedded default).",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    help="gunicorn worker processes per listener (default 1, or the config's).",
)
@click.option(
    "--migrate",
    is_flag=True,
    help="Upgrade a store at an older schema first (as `pkigate db upgrade`); a new store "
    "is created at the newest schema without it.",
)
@click.option(
    "--log-format",
    type=click.Choice(["json", "text"]),
    envvar="PKIGATE_LOG_FORMAT",
    help="json: one JSON object per line (default when stderr is not a terminal); text: "
    "plain lines for a person (default on a terminal).",
)
@click.pass_context
def serve_command(
    ctx: click.Context,
    config_path: Path | None,
    workers: int | None,
    migrate: bool,
    log_format: str | None,
) -> None:
    """Run the HTTP and HTTPS listeners (CA certificates, SCEP, ACME, API, ...).

    \b
    Example:
      pkigate serve --config /etc/pkigate/pkigate.toml --workers 4
    """
    from pkigate.gateways.config import ConfigError
    from pkigate.gateways.logs import default_log_format
    from pkigate.gateways.serve import serve

    state: State = ctx.obj
    log_format = log_format or default_log_format()
    try:
        # becomes the supervisor
        serve(
            config_path,
            state.data_dir,
            state.database_url,
            workers,
            migrate=migrate,
            log_format=log_format,
        )
    except (ConfigError, PkigateError, DatabaseError) as exc:
        if log_format == "json" and not state.as_json:
            _log_start_error(exc)
        report_error(exc)


def _log_start_error(exc: BaseException) -> NoReturn:
    """A refused start as the server's one JSON log line (what a log collector reads)."""
    import logging

    from pkigate.gateways.logs import configure_logging

    described = describe_error(exc)
    if described is None:
        raise exc
    code, message, _ = described
    configure_logging("INFO", "json")
    logging.getLogger("pkigate.serve").error(message, extra={"code": code})
    sys.exit(EXIT_ERROR)


# -- demo --------------------------------------------------------------------------------------


@main.command("demo")
@pass_state
@reports_errors
def demo(state: State) -> None:
    """Create a demo root and issuing CA (once) and issue a server certificate for localhost.

    \b
    Example:
      pkigate --data-dir ./demo-data demo
    """
    from pkigate.gateways.demo import run_demo

    if state.remote is not None:
        raise BadRequestError("`pkigate demo` works on a local data directory, not --server")

    result = run_demo(state.core, state.actor)
    state.emit(result, lambda: "\n".join(f"{k + ':':<22}{v}" for k, v in result.items()))


# -- token -------------------------------------------------------------------------------------


@main.group()
@config_option(
    "The server's TOML configuration: its separation_of_duties and [tokens] rules "
    "apply to tokens made here too (default: none)."
)
@pass_state
def token(state: State, config_path: Path | None) -> None:
    """Management API tokens: roles, expiry, client networks, rotation.

    Roles: admin (every administrative power), ca-admin, ca-deleter, issuer, revoker,
    approver, auditor, token-admin; a token may hold several.

    \b
    Example:
      pkigate token create --name ci --role issuer --expires-in 90d --allow-from 10.0.0.0/8
    """
    state.config_path = config_path


def _token_row(data: dict[str, Any]) -> tuple[str, ...]:
    if data["revoked_at"]:
        status = f"revoked {data['revoked_at'][:10]}"
    else:
        status = f"expires {data['expires_at'][:16]}" if data["expires_at"] else "active"
    last_used = data["last_used_at"][:16] if data["last_used_at"] else "never"
    return data["id"], ",".join(data["roles"]), status, last_used, data["name"]


def _token_line(data: dict[str, Any]) -> str:
    return "  ".join(_token_row(data))


def _with_secret(data: dict[str, Any]) -> str:
    return (
        f"{data['secret']}\n"
        f"(token {data['id']}, roles {', '.join(data['roles'])}: keep the secret, it is not "
        "shown again)"
    )


@token.command("create")
@click.option("--name", required=True, help="Who or what will use the token.")
@click.option(
    "--role",
    "roles",
    type=_choices(list(Role)),
    multiple=True,
    required=True,
    help="A role it holds; repeat for several (admin, ca-admin, ca-deleter, issuer, "
    "revoker, approver, auditor, token-admin).",
)
@click.option(
    "--expires-in",
    help="Lifetime: 90d, 12h, 30min or 3600s (default and maximum: [tokens] in the config).",
)
@click.option(
    "--allow-from",
    multiple=True,
    help="A client network (CIDR) it may be used from; repeat for several (default: any).",
)
@click.option(
    "--team",
    help='The team it acts for (see `pkigate team list`); by default "default" on the '
    "CA host, the calling token's with --server.",
)
@pass_state
@reports_errors
def token_create(
    state: State,
    name: str,
    roles: tuple[str, ...],
    expires_in: str | None,
    allow_from: tuple[str, ...],
    team: str | None,
) -> None:
    """Create a token; its secret is printed this once and never stored.

    \b
    Example:
      pkigate token create --name ci --role issuer --role revoker --expires-in 90d
    """
    if state.remote is not None:
        data = state.remote.create_token(name, list(roles), expires_in, list(allow_from), team)
    else:
        try:
            lifetime = parse_span(expires_in) if expires_in else None
        except ValueError as exc:
            raise BadRequestError(f"--expires-in: {exc}") from None
        issued = state.tokens.create(
            name,
            [Role(r) for r in roles],
            state.actor,
            expires_in=lifetime,
            allow_from=allow_from,
            team=team or DEFAULT_TEAM,
        )
        data = {**token_json(issued.record), "secret": issued.secret}
    state.emit(data, lambda: _with_secret(data))


@token.command("list")
@pass_state
@reports_errors
def token_list(state: State) -> None:
    """List tokens with their roles, expiry and last use (never their secrets).

    \b
    Example:
      pkigate token list
    """
    if state.remote is not None:
        tokens = state.remote.list_tokens()
    else:
        tokens = [token_json(t) for t in state.tokens.list()]
    state.emit(
        tokens,
        lambda: _table(
            ("ID", "ROLES", "STATE", "LAST USED", "NAME"), map(_token_row, tokens), "no tokens"
        ),
    )


@token.command("rotate")
@click.argument("token_id")
@click.option(
    "--overlap",
    default="0s",
    show_default=True,
    help="How long the old secret keeps working (at most [tokens] max_rotation_overlap).",
)
@pass_state
@reports_errors
def token_rotate(state: State, token_id: str, overlap: str) -> None:
    """Give a token a new secret, printed this once; the old one stops after the overlap.

    \b
    Example:
      pkigate token rotate 3f2a9c1e0b6d4f43 --overlap 1h
    """
    if state.remote is not None:
        data = state.remote.rotate_token(token_id, overlap)
    else:
        try:
            window = parse_span(overlap)
        except ValueError as exc:
            raise BadRequestError(f"--overlap: {exc}") from None
        issued = state.tokens.rotate(token_id, window, state.actor)
        data = {**token_json(issued.record), "secret": issued.secret}
    state.emit(data, lambda: _with_secret(data))


@token.command("revoke")
@click.argument("token_id")
@pass_state
@reports_errors
def token_revoke(state: State, token_id: str) -> None:
    """Revoke a token by id; the API refuses it from then on.

    \b
    Example:
      pkigate token revoke 3f2a9c1e0b6d4f43
    """
    if state.remote is not None:
        data = state.remote.revoke_token(token_id)
    else:
        tokens = state.tokens
        tokens.revoke(token_id, state.actor)
        data = next(token_json(t) for t in tokens.list() if t.id == token_id)
    state.emit(data, lambda: _token_line(data))


# -- events ------------------------------------------------------------------------------------


def _event_line(data: dict[str, Any]) -> str:
    states = ", ".join(
        f"{d['destination']}={d['status']}" + (f"({d['attempts']})" if d["attempts"] else "")
        for d in data["deliveries"]
    )
    what = data["serial"] or data["ca_id"] or ""
    return f"{data['position']:>6}  {data['occurred_at'][:19]}  {data['type']:<22} {what}  {states}"


@main.group()
def events() -> None:
    """The events outbox: what happened, and its delivery to each notification.

    \b
    Example:
      pkigate events list --type certificate.revoked
    """


@events.command("list")
@click.option(
    "--type", "event_type", type=_choices(list(EventType)), help="Only events of this type."
)
@click.option("--ca", "ca_id", help="Only events about this CA (id).")
@click.option(
    "--after",
    type=click.IntRange(0, MAX_POSITION),
    default=0,
    help="Only events after this position.",
)
@click.option(
    "--limit",
    type=click.IntRange(1, 1000),
    default=100,
    show_default=True,
    help="At most this many events, oldest first.",
)
@pass_state
@reports_errors
def events_list(
    state: State, event_type: str | None, ca_id: str | None, after: int, limit: int
) -> None:
    """Events in the order they happened, with each notification's delivery state.

    \b
    Example:
      pkigate events list --type certificate.expiring --limit 20
    """
    if state.remote is not None:
        query = {"type": event_type, "ca": ca_id, "after": after, "limit": limit}
        found = state.remote.events(query)["events"]
    else:
        stored = state.audit_core.events.list(
            after=after, types=[event_type] if event_type else (), ca_id=ca_id, limit=limit
        )
        found = [s.to_json() for s in stored]
    state.emit(found, lambda: "\n".join(_event_line(e) for e in found) or "no events")


# The --config of the connector groups (scep, adcs): which connectors the server declares.
connectors_config_option = config_option(
    "The server's TOML configuration, which declares the connectors (default: embedded)."
)


# -- notifications -------------------------------------------------------------------------


@main.group()
@connectors_config_option
@pass_state
def notifications(state: State, config_path: Path | None) -> None:
    """Where events go: the [[notifications]] of the server's configuration, and the
    destinations made in the store (create, update, delete; as the API's POST, PATCH and
    DELETE /api/v1/notifications do).

    \b
    Example:
      pkigate notifications --config pkigate.toml test ops-webhook
    """
    state.config_path = config_path


@notifications.command("test")
@click.argument("name")
@pass_state
@reports_errors
def notifications_test(state: State, name: str) -> None:
    """Send a notification.test event to NAME now; says what the receiver answered.

    \b
    Example:
      pkigate notifications --config pkigate.toml test ops-webhook
    """
    from pkigate.gateways.cli_notifications import destination_service
    from pkigate.gateways.notifications import destination_from_config, send_test

    service, config = destination_service(state)
    # The CA filter plays no part in a test: the names need not be resolved.
    configured = {item.name: destination_from_config(item, {}) for item in config.notifications}
    destination = service.find(name, configured)
    try:
        event = send_test(destination)
    except Exception as exc:
        raise BadRequestError(f"notification {name} failed: {exc}") from None
    data = {"destination": name, "event_id": event.event_id, "delivered": True}
    state.emit(data, f"delivered test event {event.event_id} to {name}")


@notifications.command("status")
@pass_state
@reports_errors
def notifications_status(state: State) -> None:
    """Deliveries by notification and state (pending, delivered, dead).

    \b
    Example:
      pkigate notifications status
    """
    from pkigate.gateways.notifications import deliveries_by_status

    counts = deliveries_by_status(state.audit_core)
    data = [{"destination": d, "status": s, "count": n} for (d, s), n in sorted(counts.items())]
    state.emit(
        data,
        lambda: (
            "\n".join(f"{r['destination']:<20} {r['status']:<10} {r['count']}" for r in data)
            or "no deliveries"
        ),
    )


# -- scep --------------------------------------------------------------------------------------


@main.group()
@connectors_config_option
@pass_state
def scep(state: State, config_path: Path | None) -> None:
    """SCEP connectors: requests pending approval, Apple configuration profiles.

    \b
    Example:
      pkigate scep --config pkigate.toml static-challenge --connector mdm
    """
    state.config_path = config_path


def _configured_connector(state: State, name: str, kind: type[C], label: str) -> C:
    """The named connector of type ``kind`` of the configured gateway, on the local data
    directory (the `scep` and `adcs` verbs that act without a server)."""
    from pkigate.gateways.config import ConfigError
    from pkigate.gateways.runtime import Gateway
    from pkigate.gateways.serve import effective_config

    try:
        config = effective_config(state.config_path, state.data_dir, state.database_url, None)
        gateway = Gateway.open(config)
    except ConfigError as exc:
        raise BadRequestError(str(exc)) from None
    for connector in gateway.connectors:
        if connector.context.name == name and isinstance(connector, kind):
            return connector
    names = [c.context.name for c in gateway.connectors if isinstance(c, kind)]
    raise NotFoundError(f"no {label} connector {name!r}; configured: {', '.join(names) or 'none'}")


def _scep_connector(state: State, name: str) -> ScepConnector:
    from pkigate.scep.connector import ScepConnector

    return _configured_connector(state, name, ScepConnector, "SCEP")


def _pending_row(data: dict[str, Any]) -> tuple[str, str, str, str]:
    kind = data.get("evidence", {}).get("challenge", "")
    return data["transaction_id"], data["received_at"][:19], kind, data["subject"]


@scep.group("pending")
def scep_pending() -> None:
    """Requests waiting for approval on a connector with `pending = true`.

    \b
    Example:
      pkigate scep --config pkigate.toml pending list --connector mdm
    """


@scep_pending.command("list")
@click.option("--connector", "connector_name", required=True, help="The SCEP connector's name.")
@pass_state
@reports_errors
def scep_pending_list(state: State, connector_name: str) -> None:
    """List the requests waiting for approval.

    \b
    Example:
      pkigate scep --config pkigate.toml pending list --connector mdm
    """
    if state.remote is not None:
        requests = state.remote.scep_pending(connector_name)
    else:
        queue = _scep_connector(state, connector_name).approvals
        requests = [p.to_json() for p in queue.pending()]
    state.emit(
        requests,
        lambda: _table(
            ("TRANSACTION", "RECEIVED", "CHALLENGE", "SUBJECT"),
            map(_pending_row, requests),
            "no pending requests",
        ),
    )


@scep_pending.command("approve")
@click.option("--connector", "connector_name", required=True, help="The SCEP connector's name.")
@click.argument("transaction_id")
@pass_state
@reports_errors
def scep_pending_approve(state: State, connector_name: str, transaction_id: str) -> None:
    """Issue the request's certificate; the device collects it at its next poll.

    \b
    Example:
      pkigate scep --config pkigate.toml pending approve --connector mdm 2f6c0e41
    """
    if state.remote is not None:
        data = state.remote.scep_approve(connector_name, transaction_id)
    else:
        connector = _scep_connector(state, connector_name)
        issued = connector.approvals.approve(transaction_id, state.actor)
        data = {
            "transaction_id": transaction_id,
            "status": "ISSUED",
            "ca_id": connector.context.ca_id,
            "serial": issued.serial,
            "certificate": issued.certificate.public_bytes(serialization.Encoding.PEM).decode(),
        }
    state.emit(data, lambda: f"approved {transaction_id}: certificate {data['serial']} issued")


@scep_pending.command("reject")
@click.option("--connector", "connector_name", required=True, help="The SCEP connector's name.")
@click.option("--reason", required=True, help="Why (recorded, and sent to the device).")
@click.argument("transaction_id")
@pass_state
@reports_errors
def scep_pending_reject(
    state: State, connector_name: str, transaction_id: str, reason: str
) -> None:
    """Refuse the request; the device's next poll gets FAILURE.

    \b
    Example:
      pkigate scep --config pkigate.toml pending reject --connector mdm 2f6c0e41
    """
    if state.remote is not None:
        data = state.remote.scep_reject(connector_name, transaction_id, reason)
    else:
        queue = _scep_connector(state, connector_name).approvals
        data = {**queue.reject(transaction_id, state.actor, reason).to_json(), "status": "REJECTED"}
    state.emit(data, lambda: f"rejected {transaction_id}: {reason}")


@scep.command("static-challenge")
@click.option("--connector", "connector_name", required=True, help="The SCEP connector's name.")
@pass_state
@reports_errors
def scep_static_challenge(state: State, connector_name: str) -> None:
    """Print the connector's static challenge (generated ones are kept in the store, the
    same for every host sharing it).

    \b
    Example:
      pkigate scep --config pkigate.toml static-challenge --connector mdm
    """
    if state.remote is not None:
        raise BadRequestError("`pkigate scep static-challenge` works on a local data directory")
    challenge = _scep_connector(state, connector_name).authority.policy.static_secret
    if challenge is None:
        raise BadRequestError("this connector has no static challenge")
    if state.as_json:
        click.echo(json.dumps({"connector": connector_name, "challenge": challenge}))
        return
    click.echo(challenge)


@scep.command("profile")
@click.option("--connector", "connector_name", required=True, help="The SCEP connector's name.")
@click.option(
    "--subject", default="CN=device", show_default=True, help="The devices' subject (RFC 4514)."
)
@click.option(
    "--one-time",
    is_flag=True,
    help="Embed a fresh one-time challenge instead of the connector's static one.",
)
@click.option(
    "--identifier",
    default="org.pkigate.scep",
    show_default=True,
    help="The profile's reverse-DNS PayloadIdentifier.",
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write here.")
@pass_state
@reports_errors
def scep_profile(
    state: State,
    connector_name: str,
    subject: str,
    one_time: bool,
    identifier: str,
    out: Path | None,
) -> None:
    """Write an Apple configuration profile (com.apple.security.scep) that an MDM can push.

    \b
    Example:
      pkigate scep --config pkigate.toml profile --connector mdm --out mdm.mobileconfig
    """
    if state.remote is not None:
        raise BadRequestError("`pkigate scep profile` works on a local data directory")
    connector = _scep_connector(state, connector_name)
    document = connector.profile(state.actor, subject, one_time, identifier)
    if out is None:
        click.echo(document.decode(), nl=False)
        return
    out.write_bytes(document)
    click.echo(f"wrote the {connector_name} SCEP profile to {out}", err=state.as_json)


# -- adcs --------------------------------------------------------------------------------------


@main.group()
@connectors_config_option
@pass_state
def adcs(state: State, config_path: Path | None) -> None:
    """AD-style connectors: the development directory, CA publication, pending requests.

    \b
    Example:
      pkigate adcs --config pkigate.toml publish --keep-existing-templates
    """
    state.config_path = config_path


def _adcs_connector(state: State, name: str) -> AdcsConnector:
    from pkigate.adcs.connector import AdcsConnector

    return _configured_connector(state, name, AdcsConnector, "AD-style")


def _add_dev_directory() -> None:
    from pkigate.adcs.cli import dev_directory_command

    adcs.add_command(dev_directory_command)


_add_dev_directory()


@adcs.command("publish")
@click.option(
    "--connector",
    "connector_name",
    default="adcs",
    show_default=True,
    help="The AD-style connector's name in the configuration.",
)
@click.option(
    "--template",
    "templates",
    multiple=True,
    help="A template this CA offers (repeat): one of pkigate's (Machine, User, WebServer), "
    "written to the directory, or one the directory holds; default: pkigate's three.",
)
@click.option("--dns-host-name", help="The CA's host name (default: the HTTPS listener's host).")
@click.option(
    "--keep-existing-templates",
    is_flag=True,
    help="Leave a template that already exists as it is, even one pkigate defines.",
)
@pass_state
@reports_errors
def adcs_publish(
    state: State,
    connector_name: str,
    templates: tuple[str, ...],
    dns_host_name: str | None,
    keep_existing_templates: bool,
) -> None:
    """Register the CA in the directory's Configuration partition as an enterprise CA does:
    pkigate's templates with their OIDs, the pKIEnrollmentService (name, host, certificate,
    templates), and the CA certificate in NTAuthCertificates and AIA. Safe to run again.

    \b
    Example:
      pkigate adcs --config pkigate.toml publish --connector adcs --keep-existing-templates
    """
    from pkigate.adcs.ldapdir import DirectoryError

    connector = _adcs_connector(state, connector_name)
    try:
        data = connector.publish(
            list(templates) or None, dns_host_name, keep_existing_templates=keep_existing_templates
        )
    except DirectoryError as exc:  # audited by the connector; one line here, no traceback
        raise click.ClickException(str(exc)) from None
    state.emit(
        data,
        lambda: "\n".join(
            (
                f"{data['result']} {data['dn']}",
                *(f"template {name}: {how}" for name, how in data["template_outcomes"].items()),
                f"NTAuthCertificates: {data['ntauth']}",
                f"AIA: {data['aia']}",
            )
        ),
    )


@adcs.group("pending")
def adcs_pending() -> None:
    """Requests held by templates that pend all requests (CT_FLAG_PEND_ALL_REQUESTS).

    \b
    Example:
      pkigate adcs --config pkigate.toml pending list
    """


@adcs_pending.command("list")
@click.option(
    "--connector",
    "connector_name",
    default="adcs",
    show_default=True,
    help="The AD-style connector's name in the configuration.",
)
@pass_state
@reports_errors
def adcs_pending_list(state: State, connector_name: str) -> None:
    """List the requests waiting for approval.

    \b
    Example:
      pkigate adcs --config pkigate.toml pending list --connector adcs
    """
    if state.remote is not None:
        requests = state.remote.scep_pending(connector_name)
    else:
        requests = [r.to_json() for r in _adcs_connector(state, connector_name).service.pending()]

    rows = (
        (r["request_id"], r["received_at"][:19], r["template"], r["principal"]) for r in requests
    )
    state.emit(
        requests,
        lambda: _table(
            ("REQUEST", "RECEIVED", "TEMPLATE", "PRINCIPAL"), rows, "no pending requests"
        ),
    )


@adcs_pending.command("approve")
@click.option(
    "--connector",
    "connector_name",
    default="adcs",
    show_default=True,
    help="The AD-style connector's name in the configuration.",
)
@click.argument("request_id", type=int)
@pass_state
@reports_errors
def adcs_pending_approve(state: State, connector_name: str, request_id: int) -> None:
    """Issue the held request (deciding again from the directory as it is now).

    \b
    Example:
      pkigate adcs --config pkigate.toml pending approve --connector adcs 17
    """
    if state.remote is not None:
        data = state.remote.scep_approve(connector_name, str(request_id))
    else:
        from pkigate.adcs.policy import EnrollmentRefused

        connector = _adcs_connector(state, connector_name)
        try:
            outcome = connector.service.approve(request_id, state.actor)
        except EnrollmentRefused as refusal:
            raise BadRequestError(f"{refusal.code}: {refusal.message}") from None
        assert outcome.certificate is not None
        data = {
            "request_id": request_id,
            "status": "issued",
            "serial": format(outcome.certificate.serial_number, "x"),
            "certificate": outcome.certificate.public_bytes(serialization.Encoding.PEM).decode(),
        }
    state.emit(data, lambda: f"approved {request_id}: certificate {data['serial']} issued")


@adcs_pending.command("reject")
@click.option(
    "--connector",
    "connector_name",
    default="adcs",
    show_default=True,
    help="The AD-style connector's name in the configuration.",
)
@click.option("--reason", required=True, help="Why (recorded in the audit log).")
@click.argument("request_id", type=int)
@pass_state
@reports_errors
def adcs_pending_reject(state: State, connector_name: str, request_id: int, reason: str) -> None:
    """Refuse the held request.

    \b
    Example:
      pkigate adcs --config pkigate.toml pending reject --connector adcs 17
    """
    if state.remote is not None:
        data = state.remote.scep_reject(connector_name, str(request_id), reason)
    else:
        connector = _adcs_connector(state, connector_name)
        data = connector.service.reject(request_id, state.actor, reason).to_json()
    state.emit(data, lambda: f"rejected {request_id}: {reason}")


if __name__ == "__main__":  # pragma: no cover
    main()


# Verb groups in modules of their own, registered on the groups above when this is imported.
from pkigate.gateways import cli_access, cli_notifications  # noqa: E402, F401
