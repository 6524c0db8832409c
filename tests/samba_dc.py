"""A throwaway Samba Active Directory domain controller on loopback, for tests and developers.

Samba is a real AD DC: the AD schema, a Kerberos KDC, security descriptors, nested groups and
tokenGroups. The AD-style connector is proven against it as well as against the development
directory (slapd, :mod:`pkigate.adcs.directory`).

Each DC runs in its own temporary directory with its own smb.conf, private, lock, state and
cache directories and krb5.conf, and listens on a loopback address of its own
(:func:`loopback_address`, from the PID): Samba's ports are fixed (LDAP 389/636, Kerberos
88/464), so two DCs (pytest-xdist workers, other developers' runs) can only live side by
side on different addresses. It is started as ``samba -i`` in a session of its own and
stopped by that PID.

Provisioning takes about half a minute, so a provisioned domain (with its accounts, made with
``samba-tool``) is kept in a cache shared by every run on the machine and copied for each DC;
its key covers the Samba version and the provisioning recipe, so a change to either
provisions anew.

Pytest: ``from samba_dc import samba_dc`` gives a session-scoped running :class:`SambaDC`
(skipped where Samba is missing or the run is not root; :func:`make_samba_dc_fixture` makes
one of another scope). Developers: ``python tests/samba_dc.py`` starts one and prints how to
reach it until interrupted.

The example domain mirrors the development directory's (:mod:`pkigate.adcs.seed`): users
``alice`` (Web Admins, itself a member of PKI Users), ``bob`` (disabled), ``carol`` (Denied
Users) and ``eve``, computers ``WS01$`` and ``SRV01$`` with dNSHostName, and ``Administrator``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import functools
import hashlib
import inspect
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

import pytest
from ldap3 import BASE, Connection, Server
from ldap3.utils.conv import escape_filter_chars

from pkigate.adcs.seed import LdifEntry, template_entries

REALM = "SAMBA.TEST"
NETBIOS_DOMAIN = "SAMBA"
DNS_DOMAIN = REALM.lower()
BASE_DN = "DC=samba,DC=test"
CONFIGURATION_DN = f"CN=Configuration,{BASE_DN}"
HOST_NAME = "dc1"
# Throwaway credentials of a DC that lives for one test session on loopback. They satisfy
# Samba's default password complexity rules.
ADMIN_PASSWORD = "Adm1n-pkigate-Test!"
USER_PASSWORDS = {
    "alice": "Al1ce-pkigate-Test!",
    "bob": "B0b-pkigate-Test!",
    "carol": "Car0l-pkigate-Test!",
    "eve": "Ev3-pkigate-Test!",
}
COMPUTER_PASSWORDS = {"WS01$": "Ws01-pkigate-Test!", "SRV01$": "Srv01-pkigate-Test!"}
# Nested as in the development directory: alice ∈ Web Admins ∈ PKI Users.
GROUPS = {
    "PKI Users": ("May enroll for held user certificates", ("Web Admins",)),
    "Web Admins": ("May enroll for web server certificates", ("alice",)),
    "Denied Users": ("Denied user certificates", ("carol",)),
}
_PASSWORDS = {"Administrator": ADMIN_PASSWORD, **USER_PASSWORDS, **COMPUTER_PASSWORDS}
DISABLED_USERS = ("bob",)
# The groups the example templates' security descriptors name.
TEMPLATE_GROUPS = (
    "Domain Admins", "Domain Users", "Domain Computers", "PKI Users", "Web Admins", "Denied Users"
)  # fmt: skip
DC_ASSIGNED_ATTRIBUTES = frozenset({"objectguid"})
# The KDC stays for Kerberos tests; DNS, SMB, NetBIOS and the rest are not needed and would
# only take ports and time. Pass services= to start more (e.g. "dns" for clients that
# resolve the DC's SRV records).
DEFAULT_SERVICES = ("ldap", "kdc")
LDAP_PORT = 389
LDAPS_PORT = 636
KERBEROS_PORT = 88
STARTUP_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 15.0
TOOL_TIMEOUT_SECONDS = 180.0
LOG_TAIL_BYTES = 4000
PROVISION_REQUIREMENT = Path("/usr/share/samba/setup/ad-schema")
MAX_DCS_PER_PROCESS = 3
DEFAULT_CACHE_ROOT = Path(tempfile.gettempdir()) / f"pkigate-samba-dc-{os.getuid()}"
CONF = "etc/smb.conf"

Scope = Literal["session", "package", "module", "class", "function"]


class SambaError(RuntimeError):
    """Samba could not be provisioned, started or driven; the message ends with its output."""


def samba_unavailable_reason() -> str | None:
    """Why a Samba DC cannot run here (None when it can)."""
    if shutil.which("samba") is None or shutil.which("samba-tool") is None:
        return "Samba is not installed (scripts/setup --test installs samba, samba-ad-dc)"
    if not PROVISION_REQUIREMENT.is_dir():
        return "samba-ad-provision (the AD schema files) is not installed"
    if os.geteuid() != 0:
        return "a Samba AD DC needs root (it binds port 389 and sets ACLs on sysvol)"
    return None


def loopback_address(pid: int | None = None, index: int | None = None) -> str:
    """A 127.x.y.z address no other live process picks: it is derived from the PID.

    PIDs are below 2**22 on Linux, which the last 22 bits carry; ``index`` (0-2, by default
    the first no running DC of this process holds) tells apart the DCs of one process. The
    second octet starts at 64 to stay clear of 127.0.0.1 and the low addresses other tools use.
    """
    pid = os.getpid() if pid is None else pid
    if index is None:
        free = [i for i in range(MAX_DCS_PER_PROCESS) if i not in _indexes_in_use]
        if not free:
            raise SambaError(f"at most {MAX_DCS_PER_PROCESS} DCs run at once in a process")
        index = free[0]
    if not 0 <= index < MAX_DCS_PER_PROCESS:
        raise SambaError(f"the index of a DC's address is below {MAX_DCS_PER_PROCESS}")
    return f"127.{64 + index * 64 + ((pid >> 16) & 0x3F)}.{(pid >> 8) & 0xFF}.{pid & 0xFF}"


# Indexes (see loopback_address) of the DCs this process runs, taken from start to stop.
_indexes_in_use: set[int] = set()


@dataclass(frozen=True)
class Account:
    """A user or computer of the example domain, with what tests need to act as it."""

    name: str
    """sAMAccountName (computers end in "$")."""
    password: str
    dn: str
    sid: str
    upn: str | None
    disabled: bool = False


class SambaDC:
    """One Samba AD DC in ``root``, listening on ``address``; a context manager."""

    def __init__(
        self,
        root: Path,
        address: str | None = None,
        *,
        services: Sequence[str] = DEFAULT_SERVICES,
        cache_root: Path | None = DEFAULT_CACHE_ROOT,
    ) -> None:
        """``cache_root``: where provisioned domains are kept between runs (None: provision
        every time, in ``root``)."""
        self.root = root.resolve()
        self._index: int | None = None
        if address is None:
            # Held until stop(): the next DC of this process takes another address.
            address = loopback_address()
            self._index = int(address.split(".")[1]) // 64 - 1
            _indexes_in_use.add(self._index)
        self.address = address
        self.services = tuple(services)
        self.cache_root = cache_root
        self._process: subprocess.Popen[bytes] | None = None
        self.provision_seconds: float | None = None
        self.start_seconds: float | None = None

    def __repr__(self) -> str:
        return f"SambaDC({str(self.root)!r}, {self.address!r})"

    # --- what clients need -------------------------------------------------------------------

    realm = REALM
    netbios_domain = NETBIOS_DOMAIN
    dns_domain = DNS_DOMAIN
    base = BASE_DN
    configuration_dn = CONFIGURATION_DN
    admin_password = ADMIN_PASSWORD

    @property
    def url(self) -> str:
        return f"ldap://{self.address}:{LDAP_PORT}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://{self.address}:{LDAPS_PORT}"

    @property
    def admin_dn(self) -> str:
        return f"CN=Administrator,CN=Users,{BASE_DN}"

    @property
    def host_name(self) -> str:
        """The DC's DNS name (dc1.samba.test); nothing resolves it, use :attr:`address`."""
        return f"{HOST_NAME}.{DNS_DOMAIN}"

    @property
    def conf_path(self) -> Path:
        """The DC's smb.conf: pass it to samba-tool as ``-s``."""
        return self.root / CONF

    @property
    def krb5_conf_path(self) -> Path:
        """A krb5.conf naming this DC's KDC: point KRB5_CONFIG at it (see :attr:`env`)."""
        return self.root / "krb5.conf"

    @property
    def ca_path(self) -> Path:
        """The CA of the self-signed certificate Samba serves on 636 (made at first start)."""
        return self.root / "private/tls/ca.pem"

    @property
    def log_path(self) -> Path:
        return self.root / "samba.log"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    @property
    def env(self) -> dict[str, str]:
        """The environment for Kerberos clients (kinit, GSSAPI) of this DC."""
        return {**os.environ, "KRB5_CONFIG": str(self.krb5_conf_path)}

    @functools.cached_property
    def accounts(self) -> Mapping[str, Account]:
        """Every seeded account (Administrator, users, computers) by sAMAccountName, as the
        development directory's ``accounts``."""
        return {name: self.account(name) for name in _PASSWORDS}

    def account(self, name: str) -> Account:
        """A seeded account by sAMAccountName ("alice", "WS01$", "Administrator")."""
        with self.admin_connection() as connection:
            connection.search(
                BASE_DN,
                f"(sAMAccountName={name})",
                attributes=["objectSid", "userPrincipalName", "userAccountControl"],
            )
            if not connection.entries:
                raise KeyError(name)
            entry = connection.entries[0]
            upn = entry.userPrincipalName.value if "userPrincipalName" in entry else None
            return Account(
                name,
                _PASSWORDS[name],
                entry.entry_dn,
                str(entry.objectSid.value),
                upn,
                bool(int(entry.userAccountControl.value) & 0x2),
            )

    def admin_connection(self) -> Connection:
        """A bound LDAP connection as Administrator (caller closes it, or uses ``with``)."""
        return Connection(
            Server(self.address, LDAP_PORT, connect_timeout=5),
            user=self.admin_dn,
            password=ADMIN_PASSWORD,
            auto_bind=True,
            receive_timeout=30,
        )

    def group_sids(self, names: Sequence[str]) -> dict[str, str]:
        """objectSid of the groups named (sAMAccountName), by name."""
        wanted = "".join(f"(sAMAccountName={escape_filter_chars(name)})" for name in names)
        with self.admin_connection() as connection:
            connection.search(BASE_DN, f"(&(objectClass=group)(|{wanted}))", attributes=["*"])
            found = {e.sAMAccountName.value: str(e.objectSid.value) for e in connection.entries}
        if missing := set(names) - set(found):
            raise SambaError(f"no such groups: {sorted(missing)}")
        return found

    def add_example_templates(self) -> tuple[str, ...]:
        """Add the development directory's certificate templates (Machine, User, WebServer,
        UserPending, ESC1Vulnerable; :mod:`pkigate.adcs.seed`) with this domain's group SIDs
        in their security descriptors; their names.

        Samba ships no AD CS templates. Done per DC rather than in the cached domain, so that
        tests of ``pkigate adcs publish`` can start from the empty container.
        """
        entries = template_entries(self.base, self.group_sids(TEMPLATE_GROUPS))
        with self.admin_connection() as connection:
            add_entries(connection, entries)
        return tuple(entry.dn.split(",", 1)[0].removeprefix("CN=") for entry in entries)

    def tool(self, *args: str) -> str:
        """Run ``samba-tool args -s <smb.conf>`` on this DC's databases; its output."""
        return _run(["samba-tool", *args, "-s", str(self.conf_path)], self.env)

    # --- life cycle -------------------------------------------------------------------------

    def start(self) -> Self:
        """Provision (or copy a provisioned domain), then start Samba and wait for LDAP."""
        if reason := samba_unavailable_reason():
            raise SambaError(reason)
        if _listening(self.address, LDAP_PORT):
            raise SambaError(f"{self.address}:{LDAP_PORT} is taken; pass another address")
        began = time.monotonic()
        self._provision()
        self.provision_seconds = time.monotonic() - began
        began = time.monotonic()
        self._launch()
        self.start_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        """Stop Samba (its whole process group, which it alone leads) and wait for it."""
        process, self._process = self._process, None
        if self._index is not None:
            _indexes_in_use.discard(self._index)
            self._index = None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _provision(self) -> None:
        if self.cache_root is None:
            _provision_domain(self.root)
        else:
            template = _cached_domain(self.cache_root)
            shutil.copytree(template, self.root, symlinks=True, dirs_exist_ok=True)
            _retarget(self.root, template, self.root)
        _configure(self.root, self.address, self.services)

    def _launch(self) -> None:
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(
                ["samba", "-i", "-M", "single", "-s", str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
        while not _root_dse_answers(self.address):
            if self._process.poll() is not None:
                self._process = None
                raise SambaError(f"samba exited at start:\n{self._log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise SambaError(f"samba did not answer on LDAP in time:\n{self._log_tail()}")
            time.sleep(0.1)

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError), self.log_path.open("rb") as log:
            log.seek(max(0, self.log_path.stat().st_size - LOG_TAIL_BYTES))
            return log.read().decode(errors="replace")
        return ""


def add_entries(connection: Connection, entries: Sequence[LdifEntry]) -> None:
    """Add entries built for the development directory to an AD over LDAP, leaving out the
    attributes a DC assigns itself (objectGUID)."""
    for entry in entries:
        attributes = {
            name: [str(value) if isinstance(value, int) else value for value in values]
            for name, values in entry.attributes
            if name.lower() not in DC_ASSIGNED_ATTRIBUTES
        }
        classes = attributes.pop("objectClass")
        if not connection.add(entry.dn, classes, attributes):
            raise SambaError(f"cannot add {entry.dn}: {connection.result}")


# --- provisioning -------------------------------------------------------------------------------


def _cached_domain(cache_root: Path) -> Path:
    """A provisioned, seeded domain in the cache, made once per Samba version and fixture."""
    version = _run(["samba", "-V"], dict(os.environ)).strip()
    domain = (REALM, NETBIOS_DOMAIN, HOST_NAME, ADMIN_PASSWORD, USER_PASSWORDS, COMPUTER_PASSWORDS)
    recipe = f"{version} {domain} {GROUPS} {DISABLED_USERS} {inspect.getsource(_provision_domain)}"
    key = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    cache_root.mkdir(mode=0o700, parents=True, exist_ok=True)
    template = cache_root / key
    # Other workers and other runs wait for one provisioning rather than each doing it.
    with (cache_root / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not template.is_dir():
            staging = Path(tempfile.mkdtemp(prefix=f"{key}.", dir=cache_root))
            try:
                _provision_domain(staging)
                _retarget(staging, staging, template)
                staging.rename(template)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return template


def _provision_domain(root: Path) -> None:
    """``samba-tool domain provision`` into ``root``, then the example accounts and groups.

    Provisioned for an address no DC uses (127.0.0.0/8 with bind interfaces only): the
    address and services are set in smb.conf per DC by :func:`_configure`.
    """
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "KRB5_CONFIG": str(root / "krb5.conf")}
    options = {
        "interfaces": "127.0.0.2/8",
        "bind interfaces only": "yes",
        "log file": str(root / "log.%m"),
    }
    _run(
        [
            "samba-tool", "domain", "provision", "--server-role=dc", "--use-rfc2307",
            "--dns-backend=SAMBA_INTERNAL", f"--realm={REALM}", f"--domain={NETBIOS_DOMAIN}",
            f"--host-name={HOST_NAME}", f"--adminpass={ADMIN_PASSWORD}",
            f"--targetdir={root}", *(f"--option={name}={value}" for name, value in options.items()),
        ],
        env,
    )  # fmt: skip

    def tool(*args: str) -> None:
        _run(["samba-tool", *args, "-s", str(root / CONF)], env)

    # The cached domain outlives the default 42-day password age on a developer's machine.
    tool("domain", "passwordsettings", "set", "--max-pwd-age=0")
    for name, password in USER_PASSWORDS.items():
        tool(
            "user", "create", name, password, f"--mail-address={name}@{DNS_DOMAIN}",
            f"--given-name={name.capitalize()}", f"--surname={name.capitalize()}son",
        )  # fmt: skip
    for name in DISABLED_USERS:
        tool("user", "disable", name)
    for name, password in COMPUTER_PASSWORDS.items():
        host = name.removesuffix("$")
        tool("computer", "create", host)
        tool("user", "setpassword", name, f"--newpassword={password}")
        # samba-tool leaves dNSHostName unset, where a domain join sets it.
        dn = f"CN={host},CN=Computers,{BASE_DN}"
        ldif = f"dn: {dn}\nchangetype: modify\nreplace: dNSHostName\n"
        ldif += f"dNSHostName: {host.lower()}.{DNS_DOMAIN}\n"
        _run(["ldbmodify", "-H", str(root / "private/sam.ldb")], env, ldif)
    for group, (description, _) in GROUPS.items():
        tool("group", "add", group, f"--description={description}")
    for group, (_, members) in GROUPS.items():
        tool("group", "addmembers", group, ",".join(members))


def _retarget(root: Path, old: Path, new: Path) -> None:
    """Point the smb.conf in ``root`` at ``new`` instead of ``old``: the domain's only
    absolute paths are there."""
    conf = root / CONF
    conf.write_text(conf.read_text().replace(str(old), str(new)))


def _configure(root: Path, address: str, services: Sequence[str]) -> None:
    """This DC's address, services and log file in smb.conf, and a krb5.conf for its KDC."""
    conf = root / CONF
    settings = {
        "interfaces": f"{address}/8",
        "server services": " ".join(services),
        "log file": str(root / "log.%m"),
        # Not /run/samba: another DC on the machine would make this one refuse to start.
        "pid directory": str(root / "run"),
        # Simple binds on ldap:// to a loopback DC, as the connector makes (provisioning does
        # not keep this setting, hence here).
        "ldap server require strong auth": "no",
    }
    # Drop the provisioned values of these settings and write this DC's right after [global].
    kept = [
        line
        for line in conf.read_text().splitlines()
        if "=" not in line or line.split("=", 1)[0].strip().lower() not in settings
    ]
    start = kept.index("[global]") + 1
    ours = [f"\t{name} = {value}" for name, value in settings.items()]
    conf.write_text("\n".join([*kept[:start], *ours, *kept[start:]]) + "\n")
    (root / "krb5.conf").write_text(
        f"""[libdefaults]
\tdefault_realm = {REALM}
\tdns_lookup_realm = false
\tdns_lookup_kdc = false
\trdns = false
\tdns_canonicalize_hostname = false

[realms]
\t{REALM} = {{
\t\tkdc = {address}:{KERBEROS_PORT}
\t\tadmin_server = {address}
\t\tdefault_domain = {DNS_DOMAIN}
\t}}

[domain_realm]
\t.{DNS_DOMAIN} = {REALM}
\t{DNS_DOMAIN} = {REALM}
"""
    )


def _run(command: Sequence[str], env: dict[str, str], stdin: str = "") -> str:
    try:
        result = subprocess.run(
            command,
            env=env,
            input=stdin.encode(),
            capture_output=True,
            timeout=TOOL_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        raise SambaError(f"{command[0]} {command[1]} did not finish in time") from error
    if result.returncode != 0:
        output = (result.stdout + result.stderr).decode(errors="replace")[-LOG_TAIL_BYTES:]
        shown = " ".join(arg for arg in command[:4] if "pass" not in arg.lower())
        raise SambaError(f"{shown} exited {result.returncode}:\n{output}")
    return result.stdout.decode(errors="replace")


def _listening(address: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((address, port), timeout=0.5):
        return True
    return False


def _root_dse_answers(address: str) -> bool:
    """True once Samba's LDAP server answers a root DSE read (the port opens before)."""
    if not _listening(address, LDAP_PORT):
        return False
    try:
        connection = Connection(Server(address, LDAP_PORT, connect_timeout=2), auto_bind=True)
    except Exception:  # any failure here means "not yet"
        return False
    with connection:
        return bool(
            connection.search("", "(objectClass=*)", BASE, attributes=["defaultNamingContext"])
        )


# --- pytest -------------------------------------------------------------------------------------


def make_samba_dc_fixture(
    scope: Scope = "session",
    *,
    services: Sequence[str] = DEFAULT_SERVICES,
    templates: bool = True,
) -> Callable[..., Any]:
    """A fixture yielding a running :class:`SambaDC`, stopped when its scope ends.

    ``templates``: add the example certificate templates (:meth:`SambaDC.add_example_templates`).

    Skipped where Samba cannot run, except under scripts/test (PKIGATE_TOOLS_INSTALLED), where
    a missing tool is a failure.
    """

    @pytest.fixture(scope=scope)
    def samba_dc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SambaDC]:
        if reason := samba_unavailable_reason():
            if os.environ.get("PKIGATE_TOOLS_INSTALLED"):
                pytest.fail(reason)
            pytest.skip(reason)
        with SambaDC(tmp_path_factory.mktemp("samba-dc"), services=services) as dc:
            if templates:
                dc.add_example_templates()
            yield dc

    return samba_dc


samba_dc = make_samba_dc_fixture()


# --- developers ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", help="loopback address to listen on (default: from PID)")
    parser.add_argument("--dir", type=Path, help="directory for the DC (default: a temp dir)")
    parser.add_argument(
        "--services", default=" ".join(DEFAULT_SERVICES), help="Samba server services"
    )
    parser.add_argument(
        "--no-templates", action="store_true", help="leave CN=Certificate Templates empty"
    )
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        root = args.dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        dc = stack.enter_context(SambaDC(root, args.address, services=args.services.split()))
        templates = () if args.no_templates else dc.add_example_templates()
        print(f"Samba AD DC {dc.host_name} (pid {dc.pid}) in {dc.root}")
        print(f"  provisioned in {dc.provision_seconds:.1f}s, started in {dc.start_seconds:.1f}s")
        print(f"  LDAP {dc.url}  base {dc.base}  config {dc.configuration_dn}")
        print(f"  admin {dc.admin_dn} / {dc.admin_password}")
        for name in ("alice", "bob", "carol", "eve", "WS01$", "SRV01$"):
            account = dc.account(name)
            state = " (disabled)" if account.disabled else ""
            print(f"  {name}{state}: {account.password}  {account.upn or account.dn}")
        print(f"  templates: {', '.join(templates) or 'none'}")
        print(f"  KRB5_CONFIG={dc.krb5_conf_path} kinit alice@{dc.realm}")
        print(f"  samba-tool ... -s {dc.conf_path}")
        print("Ctrl-C stops it.")
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
