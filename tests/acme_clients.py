"""Drive the real ACME clients certbot and lego against any ACME directory URL.

Both run as subprocesses with their own state directories under a temp dir, trust only
the CA bundle they are given for the server's HTTPS, and raise AssertionError carrying
the command line, stdout, stderr (and certbot's log tail) when they fail.

dns-01 records are published through an object with `set_txt(host, value)` and
`clear_txt(host)` (a pebble-challtestsrv wrapper, say); `host` is always the full
record name with its trailing dot ("_acme-challenge.web1.example.test."). The hook
scripts the clients run speak pebble-challtestsrv's management API (POST /set-txt
{"host", "value"}, POST /clear-txt {"host"}) to a small relay in this process that
forwards to that object, so any such object works whatever its management URL is.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

CERTBOT = str(Path(sys.executable).parent / "certbot")
LEGO = "/usr/bin/lego"
DEFAULT_TIMEOUT = 90.0
TXT_API_ENV = "PKIGATE_TEST_TXT_API"


class TxtPublisher(Protocol):
    def set_txt(self, host: str, value: str) -> Any: ...

    def clear_txt(self, host: str) -> Any: ...


# The dns-01 hook, run by certbot (--manual-auth-hook/--manual-cleanup-hook: first argument
# "auth" or "cleanup", CERTBOT_DOMAIN and CERTBOT_VALIDATION in the environment) and by
# lego's exec provider (EXEC_PATH: "present"|"cleanup" <fqdn> <value>).
_TXT_HOOK = '''
"""Publish or remove an ACME dns-01 TXT record via a pebble-challtestsrv-style API."""

import json
import os
import sys
import urllib.request


def post(path, body):
    request = urllib.request.Request(
        os.environ["{env}"].rstrip("/") + path,
        data=json.dumps(body).encode(),
        headers={{"Content-Type": "application/json"}},
        method="POST",
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({{}}))
    with opener.open(request, timeout=10) as response:
        response.read()


def main(argv):
    action = argv[1]
    if len(argv) >= 4:  # lego exec provider
        host, value = argv[2], argv[3]
    else:  # certbot manual hooks
        domain = os.environ["CERTBOT_DOMAIN"]
        if domain.startswith("*."):
            domain = domain[2:]
        host = "_acme-challenge." + domain
        value = os.environ.get("CERTBOT_VALIDATION", "")
    if not host.endswith("."):
        host += "."
    if action in ("auth", "present"):
        post("/set-txt", {{"host": host, "value": value}})
    elif action == "cleanup":
        post("/clear-txt", {{"host": host}})
    else:
        sys.exit("unknown action " + action)


main(sys.argv)
'''


def _write_hook(directory: Path) -> Path:
    path = directory / "txt_hook.py"
    path.write_text(f"#!{sys.executable}\n" + _TXT_HOOK.format(env=TXT_API_ENV))
    path.chmod(0o755)
    return path


class TxtRelay:
    """A loopback HTTP endpoint with challtestsrv's /set-txt and /clear-txt that forwards
    to a TxtPublisher. `calls` records what the hooks asked for."""

    def __init__(self, dns: TxtPublisher) -> None:
        self.dns = dns
        self.calls: list[tuple[str, str, str | None]] = []
        relay = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                try:
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                    host = body["host"]
                    if self.path == "/set-txt":
                        relay.calls.append(("set", host, body["value"]))
                        relay.dns.set_txt(host, body["value"])
                    elif self.path == "/clear-txt":
                        relay.calls.append(("clear", host, None))
                        relay.dns.clear_txt(host)
                    else:
                        self.send_error(404)
                        return
                except Exception as exc:
                    self.send_error(500, repr(exc))
                    return
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> TxtRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def _run(
    cmd: Sequence[str],
    *,
    env: dict[str, str],
    timeout: float,
    check: bool,
    what: str,
    log_tail: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `cmd` in its own session; on timeout kill the whole group (hooks included)."""
    process = subprocess.Popen(
        list(cmd),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    timed_out = False
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    result = subprocess.CompletedProcess(list(cmd), process.returncode, stdout, stderr)
    if check and (timed_out or result.returncode != 0):
        status = f"timed out after {timeout}s" if timed_out else f"exit {result.returncode}"
        message = (
            f"{what} failed ({status})\n$ {shlex.join(cmd)}\n"
            f"--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}"
        )
        if log_tail is not None and log_tail.exists():
            lines = log_tail.read_text(errors="replace").splitlines()[-80:]
            message += f"\n--- {log_tail} (tail) ---\n" + "\n".join(lines)
        raise AssertionError(message)
    return result


class Certbot:
    """certbot from this venv, with private config/work/logs dirs, against `directory_url`.

    `ca_bundle` is the PEM file certbot trusts for the ACME server's HTTPS
    (REQUESTS_CA_BUNDLE for its `requests`).
    """

    def __init__(
        self,
        directory_url: str,
        ca_bundle: str | Path,
        *,
        workdir: Path | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.directory_url = directory_url
        self.ca_bundle = str(ca_bundle)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="pkigate-certbot-"))
        self.timeout = timeout
        self.config_dir = self.workdir / "config"
        self.work_dir = self.workdir / "work"
        self.logs_dir = self.workdir / "logs"
        for directory in (self.config_dir, self.work_dir, self.logs_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.registered = False

    def __enter__(self) -> Certbot:
        return self

    def __exit__(self, *exc: object) -> None:
        """Removes the state directory when it is a temp dir of our own."""
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def log_path(self) -> Path:
        return self.logs_dir / "letsencrypt.log"

    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        return {**os.environ, "REQUESTS_CA_BUNDLE": self.ca_bundle, **(extra or {})}

    def _run(
        self,
        subcommand: str,
        args: Sequence[str],
        *,
        check: bool,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        cmd = [
            CERTBOT,
            subcommand,
            "--non-interactive",
            "--agree-tos",
            "--server",
            self.directory_url,
            "--config-dir",
            str(self.config_dir),
            "--work-dir",
            str(self.work_dir),
            "--logs-dir",
            str(self.logs_dir),
            "--max-log-backups",
            "0",  # one log file, appended to, for the failure tail
            *args,
        ]
        return _run(
            cmd,
            env=self._env(env),
            timeout=self.timeout,
            check=check,
            what=f"certbot {subcommand}",
            log_tail=self.log_path,
        )

    def _account_args(self) -> list[str]:
        """certonly registers an account on the fly when `register` was not called."""
        return [] if self.registered else ["--register-unsafely-without-email"]

    def register(
        self,
        email: str | None = None,
        eab_kid: str | None = None,
        eab_hmac_key: str | None = None,
        *,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        args = ["-m", email, "--no-eff-email"] if email else ["--register-unsafely-without-email"]
        if eab_kid is not None or eab_hmac_key is not None:
            # One argument each: a base64url key may begin with "-", which certbot's argparse
            # would take for an option (a 1-in-64 failure of the EAB test).
            args += [f"--eab-kid={eab_kid or ''}", f"--eab-hmac-key={eab_hmac_key or ''}"]
        result = self._run("register", args, check=check)
        if result.returncode == 0:
            self.registered = True
        return result

    def certonly_standalone(
        self,
        domains: Sequence[str],
        http_port: int,
        cert_name: str | None = None,
        key_type: str = "ecdsa",
        *,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """http-01 answered by certbot's own server on 127.0.0.1:`http_port`."""
        args = [
            "--standalone",
            "--preferred-challenges",
            "http",
            "--http-01-port",
            str(http_port),
            "--http-01-address",
            "127.0.0.1",
            "--key-type",
            key_type,
            "--cert-name",
            cert_name or domains[0],
            *self._account_args(),
        ]
        for domain in domains:
            args += ["-d", domain]
        return self._run("certonly", args, check=check)

    def certonly_dns_manual(
        self,
        domains: Sequence[str],
        dns: TxtPublisher,
        cert_name: str | None = None,
        key_type: str = "ecdsa",
        *,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """dns-01 through --manual hooks that publish the TXT records through `dns`."""
        hook = shlex.join([sys.executable, str(_write_hook(self.workdir))])
        args = [
            "--manual",
            "--preferred-challenges",
            "dns",
            "--manual-auth-hook",
            f"{hook} auth",
            "--manual-cleanup-hook",
            f"{hook} cleanup",
            "--key-type",
            key_type,
            "--cert-name",
            cert_name or domains[0],
            *self._account_args(),
        ]
        for domain in domains:
            args += ["-d", domain]
        with TxtRelay(dns) as relay:
            return self._run("certonly", args, check=check, env={TXT_API_ENV: relay.url})

    def renew(
        self,
        cert_name: str,
        force: bool = True,
        *,
        dns: TxtPublisher | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Renew with the settings saved at issuance (an http-01 port, the manual hooks).

        Give `dns` again for a certificate obtained with `certonly_dns_manual`."""
        args = ["--cert-name", cert_name, "--no-random-sleep-on-renew"]
        if force:
            args.append("--force-renewal")
        if dns is None:
            return self._run("renew", args, check=check)
        with TxtRelay(dns) as relay:
            return self._run("renew", args, check=check, env={TXT_API_ENV: relay.url})

    def revoke(
        self,
        cert_path: str | Path,
        reason: str | None = None,
        *,
        key_path: str | Path | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Revoke with the account key (or the certificate's key, `key_path`).

        `reason`: unspecified, keycompromise, affiliationchanged, superseded,
        cessationofoperation. The files are kept for inspection.
        """
        args = ["--cert-path", str(cert_path), "--no-delete-after-revoke"]
        if reason is not None:
            args += ["--reason", reason]
        if key_path is not None:
            args += ["--key-path", str(key_path)]
        return self._run("revoke", args, check=check)

    def cert_paths(self, cert_name: str) -> tuple[Path, Path, Path, Path]:
        """(cert, chain, fullchain, privkey) under live/`cert_name`/."""
        live = self.config_dir / "live" / cert_name
        return (
            live / "cert.pem",
            live / "chain.pem",
            live / "fullchain.pem",
            live / "privkey.pem",
        )


class Lego:
    """/usr/bin/lego (4.9.1) with its own --path, against `directory_url`.

    `ca_bundle` is what lego trusts for the ACME server's HTTPS (LEGO_CA_CERTIFICATES).
    """

    def __init__(
        self,
        directory_url: str,
        ca_bundle: str | Path,
        *,
        email: str = "acme@example.test",
        key_type: str = "ec256",
        workdir: Path | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.directory_url = directory_url
        self.ca_bundle = str(ca_bundle)
        self.email = email
        self.key_type = key_type
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="pkigate-lego-"))
        self.path = self.workdir / "lego"
        self.path.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        self._eab: list[str] = []

    def __enter__(self) -> Lego:
        return self

    def __exit__(self, *exc: object) -> None:
        """Removes the state directory when it is a temp dir of our own."""
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def eab(self, kid: str, hmac: str) -> Lego:
        """Register with External Account Binding (`hmac`: base64url, no padding)."""
        self._eab = ["--eab", "--kid", kid, "--hmac", hmac]
        return self

    def _run(
        self,
        domains: Sequence[str],
        global_args: Sequence[str],
        command: Sequence[str],
        *,
        check: bool,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        # urfave/cli: global options go before the command, the command's after it.
        cmd = [
            LEGO,
            "--path",
            str(self.path),
            "--server",
            self.directory_url,
            "--accept-tos",
            "--email",
            self.email,
            "--key-type",
            self.key_type,
            *self._eab,
            *global_args,
        ]
        for domain in domains:
            cmd += ["--domains", domain]
        cmd += command
        full_env = {**os.environ, "LEGO_CA_CERTIFICATES": self.ca_bundle, **(env or {})}
        full_env.pop("LEGO_PATH", None)
        return _run(cmd, env=full_env, timeout=self.timeout, check=check, what=f"lego {command[0]}")

    def _dns_args(self, dns_server: str) -> tuple[list[str], dict[str, str]]:
        args = ["--dns", "exec", "--dns.resolvers", dns_server, "--dns.disable-cp"]
        env = {
            "EXEC_PATH": str(_write_hook(self.workdir)),
            "EXEC_POLLING_INTERVAL": "1",
            "EXEC_PROPAGATION_TIMEOUT": "10",
            "EXEC_SEQUENCE_INTERVAL": "1",  # the default waits 60 s between identifiers
        }
        return args, env

    def _solve(
        self,
        domains: Sequence[str],
        command: Sequence[str],
        *,
        http_port: int | None,
        tls_port: int | None,
        dns: TxtPublisher | None,
        dns_server: str | None,
        check: bool,
    ) -> subprocess.CompletedProcess[str]:
        args: list[str] = []
        env: dict[str, str] = {}
        if http_port is not None:
            args += ["--http", "--http.port", f"127.0.0.1:{http_port}"]
        if tls_port is not None:
            args += ["--tls", "--tls.port", f"127.0.0.1:{tls_port}"]
        if dns is not None or dns_server is not None:
            if dns is None or dns_server is None:
                raise ValueError("dns-01 needs both `dns` (TXT publisher) and `dns_server`")
            dns_args, env = self._dns_args(dns_server)
            args += dns_args
            with TxtRelay(dns) as relay:
                env[TXT_API_ENV] = relay.url
                return self._run(domains, args, command, check=check, env=env)
        if not args:
            raise ValueError("choose a challenge: http_port, tls_port or dns + dns_server")
        return self._run(domains, args, command, check=check, env=env)

    def run_http01(
        self, domains: Sequence[str], port: int, *, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self._solve(
            domains, ["run"], http_port=port, tls_port=None, dns=None, dns_server=None, check=check
        )

    def run_tls_alpn01(
        self, domains: Sequence[str], port: int, *, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self._solve(
            domains, ["run"], http_port=None, tls_port=port, dns=None, dns_server=None, check=check
        )

    def run_dns01(
        self,
        domains: Sequence[str],
        dns: TxtPublisher,
        dns_server: str,
        *,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """dns-01 via the exec provider; `dns_server` ("127.0.0.1:P") is lego's resolver."""
        return self._solve(
            domains,
            ["run"],
            http_port=None,
            tls_port=None,
            dns=dns,
            dns_server=dns_server,
            check=check,
        )

    def renew(
        self,
        domains: Sequence[str],
        *,
        http_port: int | None = None,
        tls_port: int | None = None,
        dns: TxtPublisher | None = None,
        dns_server: str | None = None,
        days: int = 36500,
        reuse_key: bool = False,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Renew now: `days` above the remaining lifetime (pebble's is 5 years) forces it.

        Give the same challenge settings as for `run_*`."""
        command = ["renew", "--days", str(days), "--no-random-sleep"]
        if reuse_key:
            command.append("--reuse-key")
        return self._solve(
            domains,
            command,
            http_port=http_port,
            tls_port=tls_port,
            dns=dns,
            dns_server=dns_server,
            check=check,
        )

    def revoke(
        self,
        domains: Sequence[str],
        *,
        reason: int | None = None,
        keep: bool = True,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Revoke the certificate stored for domains[0] with the account key.

        `keep=False` lets lego move the files to certificates/archives/."""
        command = ["revoke"]
        if keep:
            command.append("--keep")
        if reason is not None:
            command += ["--reason", str(reason)]
        return self._run(domains, [], command, check=check)

    def certificate_paths(self, domain: str) -> tuple[Path, Path, Path]:
        """(certificate with chain, private key, issuer) for the first domain of an order."""
        base = self.path / "certificates" / domain.replace("*", "_")
        return (
            base.with_name(base.name + ".crt"),
            base.with_name(base.name + ".key"),
            base.with_name(base.name + ".issuer.crt"),
        )
