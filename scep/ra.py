"""The SCEP registration authority: the RSA certificate clients encrypt to and replies are
signed with.

pkigate's CAs may have EC keys, but SCEP envelopes need an RSA recipient (RFC 8894 2.1), so
each SCEP connector has an RA certificate of its own: RSA-2048, keyUsage digitalSignature +
keyEncipherment (Apple clients pick the RA out of GetCACert by exactly these bits), issued by
the connector's CA through the core like any certificate, its key generated and sealed at
rest by the key backend like a CA key. It is renewed once less than a third of its lifetime
remains; older RA certificates that are still valid keep decrypting, so a device that cached
the previous one is still answered.

When the CA key is itself RSA and the connector says so (``ca_decrypts``), the CA is the
recipient and signer and no RA certificate is made.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from pkigate.core import Requester
from pkigate.core.keys import SoftwareKeyBackend
from pkigate.core.model import KeyAlgorithm, Validity, ValidityType
from pkigate.core.passthrough import ApiPassthrough
from pkigate.core.store import scep as scep_store
from pkigate.gateways.connectors import ConnectorContext

log = logging.getLogger("pkigate.scep")

# A blank template with the RA's key usage supplied by API passthrough (and no EKU): the
# connector adds nothing to the core's template catalogue.
RA_TEMPLATE_NAME = "BlankEndEntityCertificate_APIPassthrough/V1"
RA_KEY_USAGE = frozenset({"digitalSignature", "keyEncipherment"})
RA_LIFETIME = timedelta(days=365)
RENEW_REMAINING_FRACTION = 1 / 3


@dataclass(frozen=True)
class Signer:
    """Who decrypts requests and signs replies, and what GetCACert hands out."""

    certificate: x509.Certificate
    key: rsa.RSAPrivateKey
    recipients: tuple[tuple[x509.Certificate, rsa.RSAPrivateKey], ...]
    """Every certificate a request may be encrypted to (the current RA and older valid ones)."""
    ca_chain: tuple[x509.Certificate, ...]
    """The issuing CA first, up to the root."""
    valid_until: datetime
    ca_version: datetime
    is_ca: bool

    def answering(self, recipient: x509.Certificate) -> Signer:
        """The Signer that replies to a request encrypted to ``recipient``: the same RA.

        A client verifies the CertRep against the certificates its GetCACert gave it; when
        two RA certificates are valid (one issued by each of two gateway processes at first
        use, or the previous one during renewal), the reply must be signed by the one the
        client chose, not by whichever is newest here."""
        if recipient == self.certificate:
            return self
        for certificate, key in self.recipients:
            if certificate == recipient:
                return replace(self, certificate=certificate, key=key)
        return self


class RegistrationAuthority:
    """The connector's current Signer, cached per process and shared across processes
    through the store."""

    def __init__(self, context: ConnectorContext, *, ca_decrypts: bool) -> None:
        self._context = context
        self._ca_decrypts = ca_decrypts
        self._keys = SoftwareKeyBackend(context.core.kek)
        self._lock = threading.Lock()
        self._current: Signer | None = None

    def signer(self, *, reload: bool = False) -> Signer:
        """The current Signer; ``reload`` re-reads the store (another process may have
        issued an RA certificate that a client was given)."""
        core = self._context.core
        now = core.clock()
        record = core.authorities.get(self._context.ca_id)
        if reload:
            with self._lock:
                self._current = self._load(now, record.updated_at)
                return self._current
        current = self._current
        if (
            current is not None
            and now < current.valid_until
            and (current.ca_version == record.updated_at)
        ):
            return current
        with self._lock:
            current = self._current
            if (
                current is not None
                and now < current.valid_until
                and (current.ca_version == record.updated_at)
            ):
                return current
            self._current = self._load(now, record.updated_at)
            return self._current

    def _load(self, now: datetime, ca_version: datetime) -> Signer:
        core = self._context.core
        material = core.authorities.signing_material(self._context.ca_id, now)
        ca_chain = material.chain
        if self._ca_decrypts:
            key = material.private_key
            if not isinstance(key, rsa.RSAPrivateKey):
                # A token key signs only: it never decrypts SCEP's envelopes.
                raise ValueError("ca_decrypts needs a CA with an RSA key kept in software")
            return Signer(
                material.certificate,
                key,
                ((material.certificate, key),),
                ca_chain,
                now + timedelta(minutes=5),
                ca_version,
                is_ca=True,
            )
        usable = self._usable(now)
        if not usable or self._due(usable[0][0], material.certificate, now):
            self._issue(now, material.certificate)
            usable = self._usable(now)
        newest_cert, newest_key = usable[0]
        lifetime = newest_cert.not_valid_after_utc - newest_cert.not_valid_before_utc
        renew_at = newest_cert.not_valid_after_utc - lifetime * RENEW_REMAINING_FRACTION
        return Signer(
            newest_cert,
            newest_key,
            tuple(usable),
            ca_chain,
            min(renew_at, now + timedelta(minutes=5)),
            ca_version,
            is_ca=False,
        )

    def _usable(self, now: datetime) -> list[tuple[x509.Certificate, rsa.RSAPrivateKey]]:
        core = self._context.core
        found = []
        with core.store.read() as conn:
            records = scep_store.ra_certificates(conn, self._context.name, self._context.ca_id)
            blobs = {r.id: core.store.key_blob(conn, r.key_id) for r in records}
        for record in records:
            blob = blobs[record.id]
            if blob is None or not record.not_before <= now < record.not_after:
                continue
            key = self._keys.load(record.key_id, blob)
            if isinstance(key, rsa.RSAPrivateKey):
                found.append((x509.load_der_x509_certificate(record.certificate_der), key))
        return found

    @staticmethod
    def _due(
        certificate: x509.Certificate, ca_certificate: x509.Certificate, now: datetime
    ) -> bool:
        lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
        if now < certificate.not_valid_after_utc - lifetime * RENEW_REMAINING_FRACTION:
            return False
        # Near the CA's own end a new certificate could not last longer: keep this one.
        return ca_certificate.not_valid_after_utc > certificate.not_valid_after_utc

    def _issue(self, now: datetime, ca_certificate: x509.Certificate) -> None:
        """Issue a new RA certificate. Two processes doing this at once each make one;
        both are valid and both stay recipients, so nothing breaks."""
        core = self._context.core
        key_id = f"scep-ra-{uuid.uuid4().hex}"
        blob = self._keys.generate(key_id, KeyAlgorithm.RSA_2048)
        key = self._keys.load(key_id, blob)
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(_ra_subject(ca_certificate.subject, self._context.name))
            .sign(key, hashes.SHA256())
        )
        not_after = min(now + RA_LIFETIME, ca_certificate.not_valid_after_utc)
        with core.store.write() as conn:
            core.store.insert_key(conn, key_id, self._keys.name, "RSA_2048", blob, now)
        issued = self._context.issue(
            csr,
            Requester("system:scep-ra", self._context.name),
            template=RA_TEMPLATE_NAME,
            api_passthrough=ApiPassthrough(key_usage=RA_KEY_USAGE),
            validity=Validity(ValidityType.ABSOLUTE, int(not_after.timestamp())),
        )
        certificate = issued.certificate
        with core.store.write() as conn:
            scep_store.insert_ra_certificate(
                conn,
                scep_store.RARecord(
                    id=uuid.uuid4().hex,
                    connector=self._context.name,
                    ca_id=self._context.ca_id,
                    key_id=key_id,
                    certificate_der=certificate.public_bytes(serialization.Encoding.DER),
                    not_before=certificate.not_valid_before_utc,
                    not_after=certificate.not_valid_after_utc,
                    created_at=now,
                ),
            )
        log.info(
            "SCEP RA certificate issued",
            extra={"connector": self._context.name, "serial": issued.serial},
        )


def _ra_subject(ca_subject: x509.Name, connector: str) -> x509.Name:
    """The CA's name with its common name replaced by "<CA CN> SCEP RA": keeping the other
    attributes keeps the RA inside any directoryName constraints of the CA."""
    common_names = ca_subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    base = str(common_names[0].value) if common_names else connector
    others = [rdn for rdn in ca_subject.rdns if not any(a.oid == NameOID.COMMON_NAME for a in rdn)]
    return x509.Name(
        [
            *others,
            x509.RelativeDistinguishedName(
                [x509.NameAttribute(NameOID.COMMON_NAME, f"{base[:56]} SCEP RA")]
            ),
        ]
    )
