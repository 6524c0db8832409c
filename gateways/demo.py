"""The demo that `pkigate demo` runs: a root, an issuing CA and a localhost certificate."""

from __future__ import annotations

import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pkigate.core import (
    Actor,
    CASpec,
    CAStatus,
    CAType,
    Core,
    IssuanceRequest,
    Requester,
    Validity,
)
from pkigate.core.names import parse_dn

DEMO_TAG = "pkigate-demo"


def _find_or_create(core: Core, role: str, spec: CASpec, actor: Actor) -> str:
    for view in core.authorities.list_cas(CAStatus.ACTIVE):
        if view.tags.get(DEMO_TAG) == role:
            return view.record.id
    return core.authorities.create(spec, actor).record.id


def run_demo(core: Core, actor: Actor) -> dict[str, str]:
    root_id = _find_or_create(
        core,
        "root",
        CASpec(
            CAType.ROOT,
            parse_dn("CN=pkigate Demo Root CA,O=pkigate demo"),
            validity=Validity.parse("10y"),
            tags={DEMO_TAG: "root"},
        ),
        actor,
    )
    issuing_id = _find_or_create(
        core,
        "issuing",
        CASpec(
            CAType.SUBORDINATE,
            parse_dn("CN=pkigate Demo Issuing CA,O=pkigate demo"),
            parent_ca_id=root_id,
            path_length=0,
            validity=Validity.parse("5y"),
            tags={DEMO_TAG: "issuing"},
        ),
        actor,
    )

    out = core.data_dir / "demo"
    out.mkdir(exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(parse_dn("CN=localhost"))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    issued = core.issue(
        IssuanceRequest(
            ca_id=issuing_id,
            csr=csr,
            validity=Validity.parse("30d"),
            template="EndEntityServerAuthCertificate/V1",
            requester=Requester(actor.principal, actor.connector),
        )
    )

    root_pem, _ = core.authorities.certificate_pem(root_id)
    files = {
        "root.pem": root_pem,
        "localhost.pem": issued.pem(),
        "localhost-chain.pem": issued.pem() + issued.chain_pem().replace(root_pem, ""),
    }
    for name, text in files.items():
        (out / name).write_text(text)
    key_path = out / "localhost.key"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return {
        "root CA": root_id,
        "issuing CA": issuing_id,
        "certificate serial": issued.serial,
        "root certificate": str(out / "root.pem"),
        "server certificate": str(out / "localhost.pem"),
        "server chain": str(out / "localhost-chain.pem"),
        "server key": str(key_path),
        "database": str(core.data_dir / "pkigate.db"),
        "check it with": f"openssl verify -CAfile {out / 'root.pem'} -untrusted "
        f"{out / 'localhost-chain.pem'} {out / 'localhost.pem'}",
    }


__all__ = ["run_demo"]
