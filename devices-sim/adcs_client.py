"""AD-style enrollment as a domain machine does it: an account in the directory, MS-XCEP
GetPolicies to learn what it may (auto)enroll in, MS-WSTEP RequestSecurityToken for each,
and renewal over the JSON endpoint with the TLS client certificate it holds.

The SOAP messages are built and read by :mod:`pkigate.adcs.soap`'s client-side functions;
everything travels over real HTTPS to a running `pkigate serve`.
"""

from __future__ import annotations

import secrets
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from ldap3 import MODIFY_REPLACE

from pkigate.adcs import soap
from pkigate.adcs.directory import DevDirectory
from pkigate.adcs.flags import RID_DOMAIN_COMPUTERS, EnrollmentFlag, UserAccountControl
from pkigate.adcs.layout import dns_domain, rdn
from pkigate.adcs.security import Sid
from pkigate.adcs.seed import ssha512

SOAP_TYPE = "application/soap+xml; charset=utf-8"


class AdcsClientError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class MachineAccount:
    name: str  # sAMAccountName, ending in "$"
    password: str
    sid: str
    dns_host_name: str


def provision_machine(directory: DevDirectory, host: str, rid: int) -> MachineAccount:
    """Create one computer account (a member of Domain Computers by its primary group), as
    joining a machine to the domain does; an account left by an earlier try is reset."""
    return _provision(directory, [(host, rid)])[0]


def provision_machines(
    directory: DevDirectory, count: int, *, prefix: str = "SIM", first_rid: int = 50000
) -> list[MachineAccount]:
    """Create ``count`` computer accounts (members of Domain Computers by their primary
    group) in the development directory, as joining machines to the domain would."""
    return _provision(
        directory, [(f"{prefix}{index:05d}", first_rid + index) for index in range(count)]
    )


def _provision(directory: DevDirectory, hosts: Sequence[tuple[str, int]]) -> list[MachineAccount]:
    domain = dns_domain(directory.base)
    conn = directory.admin_connection()
    machines: list[MachineAccount] = []
    try:
        for host, rid in hosts:
            name = f"{host}$"
            password = secrets.token_urlsafe(18)
            sid = f"{directory.domain_sid}-{rid}"
            dn = f"{rdn(host)},CN=Computers,{directory.base}"
            attributes = {
                "objectClass": ["top", "person", "organizationalPerson", "user", "computer"],
                "cn": host,
                "sn": host,
                "sAMAccountName": name,
                "dNSHostName": f"{host.lower()}.{domain}",
                "objectSid": Sid.parse(sid).to_bytes(),
                "objectGUID": uuid.uuid4().bytes_le,
                "userAccountControl": str(int(UserAccountControl.WORKSTATION_TRUST_ACCOUNT)),
                "primaryGroupID": str(RID_DOMAIN_COMPUTERS),
                "userPassword": ssha512(password),
            }
            if not conn.add(dn, attributes=attributes):
                if conn.result.get("description") != "entryAlreadyExists":
                    raise AdcsClientError("directory", f"cannot add {dn}: {conn.result}")
                conn.modify(dn, {"userPassword": [(MODIFY_REPLACE, [ssha512(password)])]})
            machines.append(MachineAccount(name, password, sid, f"{host.lower()}.{domain}"))
    finally:
        conn.unbind()
    return machines


@dataclass
class Enrolled:
    template: str
    certificate: x509.Certificate
    chain: list[x509.Certificate]
    request_id: str | None


class AdcsClient:
    """One machine's view of the AD-style connector mounted at ``url`` (…/adcs)."""

    def __init__(
        self,
        url: str,
        ca_bundle: str,
        username: str,
        password: str,
        *,
        timeout: float = 30.0,
        session: requests.Session | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.username = username
        self.password = password
        self.timeout = timeout
        self._own_session = session is None
        self.session = session or requests.Session()
        if self._own_session:
            self.session.trust_env = False
            self.session.verify = ca_bundle
        self._client_files: tempfile.TemporaryDirectory[str] | None = None

    def close(self) -> None:
        if self._own_session:
            self.session.close()
        if self._client_files is not None:
            self._client_files.cleanup()

    def _soap(self, path: str, body: bytes, cert: tuple[str, str] | None = None) -> bytes:
        response = self.session.post(
            self.url + path,
            data=body,
            headers={"Content-Type": SOAP_TYPE},
            timeout=self.timeout,
            cert=cert,
        )
        if not response.headers.get("Content-Type", "").startswith("application/soap+xml"):
            raise AdcsClientError(f"http{response.status_code}", response.text[:200])
        return response.content

    def policies(self) -> list[soap.PolicyTemplate]:
        body = soap.build_get_policies_request(
            self.url + "/cep", f"urn:uuid:{uuid.uuid4()}", self.username, self.password
        )
        try:
            templates, _cas = soap.parse_get_policies_response(self._soap("/cep", body))
        except soap.SoapFault as fault:
            raise AdcsClientError("fault", fault.reason) from None
        return templates

    def enroll(self, template: str, csr: x509.CertificateSigningRequest) -> Enrolled:
        """MS-WSTEP RequestSecurityToken with a UsernameToken."""
        body = soap.build_rst_issue(
            self.url + "/ces",
            csr.public_bytes(serialization.Encoding.DER),
            f"urn:uuid:{uuid.uuid4()}",
            self.username,
            self.password,
            additional_context=(("CertificateTemplate", template),),
        )
        result = soap.parse_rstr(self._soap("/ces", body))
        if result.status != "issued" or result.certificate_der is None:
            raise AdcsClientError(
                result.status, result.fault_reason or result.disposition_message or ""
            )
        chain = list(_pkcs7_certificates(result.chain_der)) if result.chain_der is not None else []
        return Enrolled(
            template,
            x509.load_der_x509_certificate(result.certificate_der),
            chain,
            result.request_id,
        )

    def autoenroll(self, make_csr: Any, only: Sequence[str] | None = None) -> list[Enrolled]:
        """Enroll in every template enabled for autoenrollment (CT_FLAG_AUTO_ENROLLMENT)
        that the policy says this account holds AutoEnroll on, as Windows does."""
        enrolled = []
        for template in self.policies():
            enabled = template.enrollment_flags & EnrollmentFlag.AUTO_ENROLLMENT
            if not (enabled and template.permission_autoenroll):
                continue
            if only is not None and template.common_name not in only:
                continue
            enrolled.append(self.enroll(template.common_name, make_csr(template)))
        return enrolled

    def renew(
        self,
        template: str,
        csr: x509.CertificateSigningRequest,
        current: x509.Certificate,
        current_key: Any,
    ) -> Enrolled:
        """Renewal over the JSON endpoint, authenticated by the certificate being renewed."""
        if self._client_files is None:
            self._client_files = tempfile.TemporaryDirectory(prefix="pkigate-sim-")
        directory = Path(self._client_files.name)
        cert_path, key_path = directory / "client.pem", directory / "client.key"
        cert_path.write_bytes(current.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            current_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        response = self.session.post(
            self.url + "/enroll",
            json={
                "template": template,
                "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
            },
            cert=(str(cert_path), str(key_path)),
            timeout=self.timeout,
        )
        try:
            body = response.json()
        except ValueError:
            raise AdcsClientError(f"http{response.status_code}", response.text[:200]) from None
        if response.status_code != 200:
            raise AdcsClientError(str(body.get("error", response.status_code)), str(body))
        return Enrolled(
            template,
            x509.load_pem_x509_certificate(body["certificate"].encode()),
            x509.load_pem_x509_certificates(body["chain"].encode()) if body.get("chain") else [],
            str(body.get("request_id")),
        )


def _pkcs7_certificates(der: bytes) -> list[x509.Certificate]:
    from cryptography.hazmat.primitives.serialization import pkcs7

    return list(pkcs7.load_der_pkcs7_certificates(der))
