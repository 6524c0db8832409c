"""A development directory: OpenLDAP slapd on loopback with AD's schema and the example domain.

For development and tests only. It needs Debian's ``slapd`` package (``/usr/sbin/slapd``,
``/usr/sbin/slapadd``, modules in ``/usr/lib/ldap``, schemas in ``/etc/ldap/schema``).

The data directory keeps the generated ``slapd.conf``, the database, the seed LDIF, the
slapd log and ``credentials.json`` (mode 0600: the admin password and every seeded account's
password). Starting again on the same data directory reuses the database and credentials.

slapd knows nothing of userAccountControl: a disabled account (bob) still binds. Refusing
disabled accounts is the connector's job, as it would be for any directory.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from ldap3 import Connection, Server
from ldap3.core.exceptions import LDAPException

from pkigate.adcs import layout
from pkigate.adcs.layout import domain_components
from pkigate.adcs.seed import DEFAULT_BASE, AccountKind, SeedAccount, SeedGroup, build_seed, ssha512

LOOPBACK = "127.0.0.1"
SYSTEM_SCHEMA_DIR = Path("/etc/ldap/schema")
SYSTEM_SCHEMAS = ("core.schema", "cosine.schema", "inetorgperson.schema")
PACKAGED_SCHEMA = "ad-pki.schema"
MODULE_PATH = Path("/usr/lib/ldap")
CREDENTIALS_FILE = "credentials.json"
ROOT_DSE_FILE = "root-dse.ldif"
# The account ldapServiceName names as the DC's (AD: the DC's computer account).
DEV_DC_ACCOUNT = "pkigate-dev$"
STARTUP_TIMEOUT_SECONDS = 20.0
STOP_TIMEOUT_SECONDS = 10.0
# A port picked as free can be taken before slapd binds it (parallel test workers).
PORT_ATTEMPTS = 5
LOG_TAIL_BYTES = 4000


class DevDirectoryError(RuntimeError):
    """The development directory cannot be set up or started."""


@dataclass(frozen=True)
class DirectoryState:
    """What a data directory was initialised with (stored in credentials.json)."""

    base: str
    admin_dn: str
    admin_password: str
    domain_sid: str
    accounts: dict[str, SeedAccount]
    groups: dict[str, SeedGroup]
    templates: tuple[str, ...]

    def to_json(self) -> str:
        document = asdict(self)
        for account in document["accounts"].values():
            account["kind"] = account["kind"].value
        return json.dumps(document, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> DirectoryState:
        try:
            document: dict[str, Any] = json.loads(text)
            return cls(
                base=document["base"],
                admin_dn=document["admin_dn"],
                admin_password=document["admin_password"],
                domain_sid=document["domain_sid"],
                accounts={
                    name: SeedAccount(**{**fields, "kind": AccountKind(fields["kind"])})
                    for name, fields in document["accounts"].items()
                },
                groups={
                    name: SeedGroup(**{**fields, "members": tuple(fields["members"])})
                    for name, fields in document["groups"].items()
                },
                templates=tuple(document["templates"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise DevDirectoryError(f"{CREDENTIALS_FILE} cannot be read: {exc}") from None


def slapd_available() -> bool:
    """Whether slapd, slapadd and the system schemas this module uses are installed."""
    return all(
        path.exists()
        for path in (
            _tool("slapd"),
            _tool("slapadd"),
            MODULE_PATH / "back_mdb.so",
            *(SYSTEM_SCHEMA_DIR / name for name in SYSTEM_SCHEMAS),
        )
    )


class DevDirectory:
    """slapd on loopback holding the example domain; a context manager that stops it."""

    def __init__(
        self,
        data_dir: Path,
        *,
        base: str = DEFAULT_BASE,
        port: int | None = None,
        startup_timeout: float = STARTUP_TIMEOUT_SECONDS,
    ) -> None:
        domain_components(base)  # a domain base: DC components only
        self.data_dir = Path(data_dir).resolve()
        self.base = base
        self.requested_port = port
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._state: DirectoryState | None = None

    # --- what callers read ------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self.port is None:
            raise DevDirectoryError("the directory is not running")
        return f"ldap://{LOOPBACK}:{self.port}"

    @property
    def state(self) -> DirectoryState:
        if self._state is None:
            raise DevDirectoryError("the directory has not been started")
        return self._state

    @property
    def admin_dn(self) -> str:
        return self.state.admin_dn

    @property
    def admin_password(self) -> str:
        return self.state.admin_password

    @property
    def domain_sid(self) -> str:
        return self.state.domain_sid

    @property
    def accounts(self) -> Mapping[str, SeedAccount]:
        return self.state.accounts

    @property
    def groups(self) -> Mapping[str, SeedGroup]:
        return self.state.groups

    @property
    def credentials_path(self) -> Path:
        return self.data_dir / CREDENTIALS_FILE

    @property
    def log_path(self) -> Path:
        return self.data_dir / "slapd.log"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def admin_connection(self) -> Connection:
        """A connection bound as the directory's administrator (rootdn)."""
        connection = Connection(
            Server(self.url, connect_timeout=5), self.admin_dn, self.admin_password
        )
        if not connection.bind():
            raise DevDirectoryError(f"admin bind failed: {connection.result}")
        return connection

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> Self:
        """Initialise the data directory if new, then run slapd until :meth:`stop`."""
        if self._process is not None:
            return self
        if not slapd_available():
            raise DevDirectoryError(
                "OpenLDAP slapd is not installed (Debian: apt-get install slapd ldap-utils)"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._state = self._load_or_initialise()
        self._write_config(self._state)
        attempts = 1 if self.requested_port is not None else PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            port = self.requested_port if self.requested_port is not None else _free_port()
            if self._launch(port):
                self.port = port
                return self
            if attempt == attempts or "already in use" not in self._log_tail():
                break
        raise DevDirectoryError(f"slapd did not start; its log says:\n{self._log_tail()}")

    def stop(self) -> None:
        """Stop slapd (SIGTERM, then SIGKILL if it does not exit in time)."""
        process, self._process = self._process, None
        self.port = None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def detach(self) -> int:
        """Leave slapd running after this object is gone; return its process id."""
        if self._process is None:
            raise DevDirectoryError("the directory is not running")
        pid = self._process.pid
        self._process = None
        return pid

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # --- internals --------------------------------------------------------------------------

    def _load_or_initialise(self) -> DirectoryState:
        if self.credentials_path.exists():
            state = DirectoryState.from_json(self.credentials_path.read_text())
            if state.base.lower() != self.base.lower():
                raise DevDirectoryError(
                    f"{self.data_dir} holds {state.base}, not {self.base}; use another directory"
                )
            return state
        database = self.data_dir / "db"
        if database.exists() and any(database.iterdir()):
            raise DevDirectoryError(
                f"{database} holds a database without {CREDENTIALS_FILE}; use an empty directory"
            )
        seed = build_seed(self.base)
        state = DirectoryState(
            base=self.base,
            admin_dn=f"CN=admin,{self.base}",
            admin_password=secrets.token_urlsafe(24),
            domain_sid=seed.domain_sid,
            accounts=dict(seed.accounts),
            groups=dict(seed.groups),
            templates=seed.templates,
        )
        database.mkdir(mode=0o700, exist_ok=True)
        self._write_config(state)
        ldif = self.data_dir / "seed.ldif"
        _write_private(ldif, seed.ldif())
        loaded = subprocess.run(
            [str(_tool("slapadd")), "-q", "-f", str(self.data_dir / "slapd.conf"), "-l", str(ldif)],
            capture_output=True,
            text=True,
            check=False,
        )
        if loaded.returncode != 0:
            shutil.rmtree(database, ignore_errors=True)
            raise DevDirectoryError(f"slapadd failed:\n{loaded.stderr or loaded.stdout}")
        _write_private(self.credentials_path, state.to_json())
        return state

    def _write_config(self, state: DirectoryState) -> None:
        schema = resources.files("pkigate.adcs") / "schema" / PACKAGED_SCHEMA
        schema_copy = self.data_dir / PACKAGED_SCHEMA
        schema_copy.write_text(schema.read_text())
        includes = [SYSTEM_SCHEMA_DIR / name for name in SYSTEM_SCHEMAS] + [schema_copy]
        data = self.data_dir
        lines = [
            "# Generated by pkigate (pkigate.adcs.directory) at every start; edits are lost.",
            *(f"include {_quote(path)}" for path in includes),
            f"pidfile {_quote(data / 'slapd.pid')}",
            f"argsfile {_quote(data / 'slapd.args')}",
            f"modulepath {_quote(MODULE_PATH)}",
            "moduleload back_mdb",
            "moduleload pw-sha2",
            "password-hash {SSHA512}",
            # Operations are logged to slapd.log through -d stats, not to syslog.
            "loglevel 0",
            # As AD: no anonymous reads; any authenticated principal reads the directory.
            "disallow bind_anon",
            f"rootDSE {_quote(data / ROOT_DSE_FILE)}",
            "",
            "database mdb",
            "maxsize 67108864",
            f"suffix {_quote(state.base)}",
            f"rootdn {_quote(state.admin_dn)}",
            f"rootpw {ssha512(state.admin_password)}",
            f"directory {_quote(data / 'db')}",
            "index objectClass eq",
            "index cn,sAMAccountName,userPrincipalName,dNSHostName eq",
            "index member,objectSid eq",
            "access to attrs=userPassword",
            "  by anonymous auth",
            "  by * none",
            "access to *",
            "  by users read",
            "  by * none",
            "",
        ]
        _write_private(data / "slapd.conf", "\n".join(lines))
        _write_private(data / ROOT_DSE_FILE, root_dse_ldif(state.base))

    def _launch(self, port: int) -> bool:
        """Start slapd on ``port``; True once it answers a bind, False if it exited."""
        with self.log_path.open("wb") as log:
            # -d: stay in the foreground (no fork) so that this object owns the process, and
            # write connections, operations and errors to the log.
            self._process = subprocess.Popen(
                [
                    str(_tool("slapd")),
                    "-d",
                    "stats",
                    "-h",
                    f"ldap://{LOOPBACK}:{port}/",
                    "-f",
                    str(self.data_dir / "slapd.conf"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.startup_timeout
        url = f"ldap://{LOOPBACK}:{port}"
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                return False
            if _bind_works(url, self.state.admin_dn, self.state.admin_password):
                return True
            time.sleep(0.05)
        self.stop()
        raise DevDirectoryError(
            f"slapd did not answer within {self.startup_timeout:.0f} s:\n{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - LOG_TAIL_BYTES))
                return log.read().decode(errors="replace")
        except OSError:
            return "(no log)"


def root_dse_ldif(base: str) -> str:
    """What AD's root DSE says of its naming contexts, for slapd's ``rootDSE`` file.

    The development directory holds one domain, the forest root, with its configuration
    partition inside it (AD keeps that one apart; the DNs are the same).
    """
    domain = layout.dns_domain(base)
    return (
        "dn:\n"
        f"defaultNamingContext: {base}\n"
        f"rootDomainNamingContext: {base}\n"
        f"configurationNamingContext: {layout.configuration_dn(base)}\n"
        f"ldapServiceName: {domain}:{DEV_DC_ACCOUNT}@{domain.upper()}\n"
    )


def _bind_works(url: str, dn: str, password: str) -> bool:
    connection = Connection(Server(url, connect_timeout=1), dn, password, receive_timeout=2)
    try:
        return bool(connection.bind())
    except LDAPException:
        return False
    finally:
        connection.unbind()


def _tool(name: str) -> Path:
    found = shutil.which(name, path=f"/usr/sbin:/usr/bin:{os.environ.get('PATH', '')}")
    return Path(found) if found else Path("/usr/sbin") / name


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _quote(value: object) -> str:
    """A slapd.conf argument in double quotes (paths and DNs may hold spaces)."""
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def _write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only (it holds passwords or hashes)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o600)
