"""Third-party ACME servers for interop tests: Debian's `pebble`, started on loopback.

`PebbleServer` is the reference server that proves the client harness in
`acme_clients.py`; pkigate's own ACME server is driven by the same harness.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path
from types import TracebackType
from typing import Any

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pkigate.devsim.spawn import free_port, stop_process_group

PEBBLE = "/usr/bin/pebble"


def write_tls_identity(directory: Path, names: tuple[str, ...] = ("localhost",)) -> Path:
    """Write a throwaway CA plus a server certificate for 127.0.0.1 and `names`.

    Files: tls-ca.pem (the CA clients trust), tls-cert.pem and tls-key.pem (for the server).
    Returns the CA's path.
    """
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pkigate tests ACME TLS CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.IPAddress(IPv4Address("127.0.0.1"))]
    sans += [x509.DNSName(name) for name in names]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    ca_path = directory / "tls-ca.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (directory / "tls-cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "tls-key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_path


class PebbleServer:
    """Debian's pebble (2.4.0) on 127.0.0.1 free ports, as a context manager.

    `http_port`/`tls_port` are the ports pebble's VA connects to for http-01 and
    tls-alpn-01: the ACME client under test must answer there. `dns_server`
    ("127.0.0.1:5353") makes the VA resolve every name through that server (a
    pebble-challtestsrv that answers A queries with 127.0.0.1 and serves dns-01 TXTs).
    """

    def __init__(
        self,
        *,
        dns_server: str | None = None,
        http_port: int | None = None,
        tls_port: int | None = None,
        eab_required: bool = False,
        eab_keys: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        workdir: Path | None = None,
        start_timeout: float = 20.0,
    ) -> None:
        self.dns_server = dns_server
        self.http_port = http_port or free_port()
        self.tls_port = tls_port or free_port()
        self.eab_required = eab_required
        # kid -> base64url HMAC key (no padding), as ACME clients are given them.
        self.eab_keys = dict(eab_keys or {})
        self.extra_env = dict(env or {})
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="pkigate-pebble-"))
        self.start_timeout = start_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.listen_port = 0
        self.management_port = 0
        self.log_path = self.workdir / "pebble.log"
        self.tls_ca_pem_path = self.workdir / "tls-ca.pem"

    # -- addresses ------------------------------------------------------------------------

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.listen_port}/dir"

    @property
    def management_url(self) -> str:
        return f"https://127.0.0.1:{self.management_port}"

    # -- management API ---------------------------------------------------------------

    def _management_get(self, path: str) -> requests.Response:
        response = requests.get(
            f"{self.management_url}{path}", verify=str(self.tls_ca_pem_path), timeout=10
        )
        response.raise_for_status()
        return response

    def root_pem(self) -> str:
        """The root of the chains pebble issues (regenerated at every start)."""
        return self._management_get("/roots/0").text

    def intermediate_pem(self) -> str:
        return self._management_get("/intermediates/0").text

    def cert_status(self, serial: int) -> dict[str, Any]:
        """{"Status": "Valid"|"Revoked", "Reason": int, "Serial": ..., "Certificate": PEM}."""
        result: dict[str, Any] = self._management_get(f"/cert-status-by-serial/{serial:x}").json()
        return result

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # -- lifecycle --------------------------------------------------------------------

    def _write_config(self) -> Path:
        write_tls_identity(self.workdir)
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.listen_port}",
                "managementListenAddress": f"127.0.0.1:{self.management_port}",
                "certificate": str(self.workdir / "tls-cert.pem"),
                "privateKey": str(self.workdir / "tls-key.pem"),
                "httpPort": self.http_port,
                "tlsPort": self.tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": self.eab_required,
                "externalAccountMACKeys": self.eab_keys,
            }
        }
        path = self.workdir / "pebble-config.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def start(self) -> PebbleServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "PEBBLE_VA_NOSLEEP": "1",  # no random 0-15 s sleep before each validation
            "PEBBLE_WFE_NONCEREJECT": "0",  # do not reject 5 % of good nonces
            "PEBBLE_AUTHZREUSE": "0",  # every order gets fresh authorizations
            **self.extra_env,
        }
        last_error = ""
        for _attempt in range(3):  # a free port can be taken between probe and bind
            self.listen_port, self.management_port = free_port(), free_port()
            config = self._write_config()
            cmd = [PEBBLE, "-config", str(config)]
            if self.dns_server:
                cmd += ["-dnsserver", self.dns_server]
            with self.log_path.open("wb") as log:
                self.process = subprocess.Popen(
                    cmd,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=self.workdir,
                    env=env,
                    start_new_session=True,
                )
            try:
                if self._wait_ready():
                    return self
            except BaseException:
                self.stop()
                raise
            last_error = self.log()
            stop_process_group(self.process)
            if "address already in use" not in last_error:
                break
        self.stop()
        raise RuntimeError(f"pebble did not start:\n{last_error}")

    def _wait_ready(self) -> bool:
        """True once the directory and the management API answer; False if pebble exited."""
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                directory = requests.get(
                    self.directory_url, verify=str(self.tls_ca_pem_path), timeout=2
                )
                if directory.ok and "newAccount" in directory.json():
                    self.root_pem()
                    return True
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"pebble not ready in {self.start_timeout}s:\n{self.log()}")

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PebbleServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
