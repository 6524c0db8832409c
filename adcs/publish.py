"""`pkigate adcs publish`: register pkigate as an enterprise CA in the Configuration partition.

What an AD CS installation writes under CN=Public Key Services,CN=Services,<configuration>
([MS-WCCE] 2.2.2.11, [MS-CRTD] 2, [MS-ADTS] 6.1.1.2.7), and so what Windows clients, certmonger
with cepces, Samba's autoenrollment and certipy read:

* ``CN=Certificate Templates``: pkigate's templates (:mod:`pkigate.adcs.catalogue`) as
  pKICertificateTemplate objects, enroll rights granted to the domain's well-known groups
  (Domain Computers for Machine, Domain Users for User, Domain Admins only for WebServer,
  whose subject the enrollee names);
* ``CN=OID``: the forest's template OID arc, and one msPKI-Enterprise-Oid object per template
  OID naming it;
* ``CN=Enrollment Services``: the CA's pKIEnrollmentService (certificate, its subject, host,
  offered templates);
* ``CN=NTAuthCertificates`` and ``CN=<CA>,CN=AIA``: the CA certificate, so that domain
  controllers accept logons with certificates this CA issued and clients find the chain.

Nothing is written to CN=CDP: pkigate's certificates point at its HTTP CRL, and a copy in the
directory would go stale between two publishes.

Publishing again rewrites pkigate's templates to their definitions (keeping their OIDs), and
with ``keep_existing_templates`` leaves every template that exists alone. Certificates already
in NTAuthCertificates and AIA stay: other CAs' and this CA's earlier ones.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from cryptography import x509
from ldap3 import BASE, LEVEL, MODIFY_ADD, MODIFY_REPLACE, Connection
from ldap3.protocol.microsoft import security_descriptor_control
from ldap3.utils.conv import escape_filter_chars

from pkigate.adcs import layout
from pkigate.adcs.catalogue import (
    TEMPLATE_OID_ARC,
    AttributeValue,
    TemplateDefinition,
    machine_template,
    readers,
    user_template,
    web_server_template,
)
from pkigate.adcs.flags import RID_DOMAIN_ADMINS, RID_DOMAIN_COMPUTERS, RID_DOMAIN_USERS
from pkigate.adcs.ldapdir import Directory, DirectoryError
from pkigate.adcs.security import (
    AUTOENROLL_RIGHT,
    ENROLL_RIGHT,
    InvalidSid,
    Sid,
    allow,
    sid_to_string,
)

logger = logging.getLogger(__name__)

LDAP_SUCCESS = 0
LDAP_NO_SUCH_OBJECT = 32
LDAP_INVALID_ATTRIBUTE_SYNTAX = 21
LDAP_OBJECT_CLASS_VIOLATION = 65
# How a directory whose schema is not AD's refuses a certificationAuthority object: OpenLDAP
# (the development directory) defines the class as auxiliary (RFC 4523), which no entry can
# have alone, and checks the revocation lists as DER CertificateLists, which a zero byte is not.
SCHEMA_REFUSALS = frozenset({LDAP_INVALID_ATTRIBUTE_SYNTAX, LDAP_OBJECT_CLASS_VIOLATION})
LDAP_ENTRY_ALREADY_EXISTS = 68
# nTSecurityDescriptor is written as owner, group and DACL: without the SD_FLAGS control AD
# would also expect the SACL, which only SeSecurityPrivilege may set ([MS-ADTS] 3.1.1.3.4.1.11).
SD_FLAGS_OWNER_GROUP_DACL = 0x07
# pKIEnrollmentService flags an enterprise CA writes (certca.h): CA_FLAG_SUPPORTS_NT_AUTHENTICATION
# (2, the CA authenticates requesters against the domain) | CA_FLAG_CA_SERVERTYPE_ADVANCED (8,
# an advanced server: clients offer it version 2 and later templates).
ENTERPRISE_CA_FLAGS = 0x2 | 0x8
# msPKI-Enterprise-Oid flags: the OID names a certificate template ([MS-CRTD] 2.20).
CERT_OID_TYPE_TEMPLATE = 1
# certificationAuthority requires both lists in AD's schema; a CA that publishes no CRL there
# writes a single zero byte, as AD CS does in NTAuthCertificates and AIA.
EMPTY_REVOCATION_LIST = b"\x00"
# Forest OID arc: the template arc followed by six random numbers below 2^24, as AD CS forms
# the value it keeps in CN=OID's msPKI-Cert-Template-OID.
FOREST_OID_NUMBERS = 6
OID_NUMBER_BOUND = 1 << 24
# Certificate and CRL attributes: slapd refuses their values without the ;binary transfer
# option (RFC 4522), Samba refuses the option as an attribute it does not know.
BINARY_ATTRIBUTES = ("cACertificate", "authorityRevocationList", "certificateRevocationList")

TemplateOutcome = Literal["created", "updated", "kept", "existing"]
"""created/updated: pkigate's definition written; kept: pkigate's template already there and
left alone (keep_existing_templates); existing: a template pkigate has no definition of,
offered as the directory defines it."""


class PublishError(DirectoryError):
    """The directory refused a write, or lacks what AD always holds (the domain's SID)."""


class UnknownTemplates(ValueError):
    """Templates to offer that neither pkigate defines nor the directory holds."""

    def __init__(self, names: Sequence[str]) -> None:
        super().__init__(f"no such template in the directory: {', '.join(names)}")
        self.names = tuple(names)


@dataclass(frozen=True)
class PublishRequest:
    """What to register, and how."""

    ca_name: str
    """cn of the pKIEnrollmentService and of the AIA object: the name clients ask for."""
    dns_host_name: str
    """The host clients contact for this CA."""
    ca_certificate_der: bytes
    templates: tuple[str, ...]
    """The templates the CA offers (certificateTemplates); pkigate's own among them are
    written first."""
    keep_existing_templates: bool = False
    """Leave a template that already exists as it is, even one pkigate defines."""


@dataclass(frozen=True)
class PublishResult:
    """What each object became: "created", "updated", or as :data:`TemplateOutcome` says."""

    enrollment_service: Literal["created", "updated"]
    enrollment_service_dn: str
    templates: Mapping[str, TemplateOutcome]
    ntauth: Literal["created", "added", "present"] | str
    """The CA certificate in NTAuthCertificates; otherwise why it is not there."""
    aia: Literal["created", "added", "present"] | str

    def to_json(self) -> dict[str, Any]:
        return {
            "result": self.enrollment_service,
            "dn": self.enrollment_service_dn,
            "templates": list(self.templates),
            "template_outcomes": dict(self.templates),
            "ntauth": self.ntauth,
            "aia": self.aia,
        }


def pkigate_templates(domain_sid: str) -> dict[str, TemplateDefinition]:
    """pkigate's templates for the domain ``domain_sid``, by name.

    Only Domain Admins may change them; Domain Computers enroll and autoenroll for Machine,
    Domain Users for User, and WebServer, whose subject the enrollee names, is Domain Admins'
    alone until an administrator grants it to a group of server operators.
    """
    sid = Sid.parse(domain_sid)
    admins = str(sid.with_rid(RID_DOMAIN_ADMINS))
    computers = str(sid.with_rid(RID_DOMAIN_COMPUTERS))
    users = str(sid.with_rid(RID_DOMAIN_USERS))
    read = readers(admins)
    definitions = (
        machine_template(
            (*read, allow(computers, ENROLL_RIGHT), allow(computers, AUTOENROLL_RIGHT))
        ),
        user_template((*read, allow(users, ENROLL_RIGHT), allow(users, AUTOENROLL_RIGHT))),
        web_server_template((*read, allow(admins, ENROLL_RIGHT))),
    )
    return {definition.name: definition for definition in definitions}


# The names, without a domain SID: what `publish` offers when told nothing.
PKIGATE_TEMPLATE_NAMES = ("Machine", "User", "WebServer")


def publish(directory: Directory, request: PublishRequest) -> PublishResult:
    """Write the CA's objects into ``directory`` as its service account; see the module.

    Raises :class:`UnknownTemplates` before writing anything when an offered template is
    neither pkigate's nor in the directory; :class:`PublishError` when the directory refuses
    a write; :class:`~pkigate.adcs.ldapdir.DirectoryUnavailable` when it does not answer.
    """
    certificate = x509.load_der_x509_certificate(request.ca_certificate_der)
    if not request.ca_name or not request.dns_host_name:
        raise ValueError("an enrollment service needs a CA name and a DNS host name")
    offered = list(dict.fromkeys(request.templates))
    if any(not name for name in offered):
        raise ValueError("a template name is empty")
    active_directory = directory.root_dse().active_directory
    configuration = directory.configuration_naming_context()
    with directory.writer() as connection:
        writer = _Writer(connection, directory.base, active_directory, configuration)
        existing = writer.existing_templates()
        ours = {name.casefold() for name in PKIGATE_TEMPLATE_NAMES}
        unknown = [n for n in offered if n.casefold() not in ours | set(existing)]
        if unknown:
            raise UnknownTemplates(unknown)
        outcomes = writer.templates(offered, existing, request.keep_existing_templates)
        service = writer.enrollment_service(request, certificate)
        pks = layout.public_key_services_dn(directory.base, configuration)
        ntauth = writer.ca_certificate_holder(
            f"CN=NTAuthCertificates,{pks}", "NTAuthCertificates", request.ca_certificate_der
        )
        aia = writer.ca_certificate_holder(
            f"{layout.rdn(request.ca_name)},CN=AIA,{pks}",
            request.ca_name,
            request.ca_certificate_der,
        )
    return PublishResult(
        enrollment_service=service,
        enrollment_service_dn=layout.enrollment_service_dn(
            directory.base, request.ca_name, configuration
        ),
        templates=outcomes,
        ntauth=ntauth,
        aia=aia,
    )


def windows_dn(name: x509.Name) -> str:
    """A subject as Windows writes it in cACertificateDN: most specific RDN first, ", "
    between RDNs ("CN=pkigate Issuing CA, O=pkigate")."""
    return ", ".join(rdn.rfc4514_string() for rdn in reversed(name.rdns))


def enterprise_oid_cn(oid: str) -> str:
    """The name of an OID's msPKI-Enterprise-Oid object, in AD's form: the OID's last number,
    a dot and 32 hexadecimal digits that set apart OIDs ending alike."""
    digest = hashlib.sha256(oid.encode()).hexdigest()[:32].upper()
    return f"{oid.rsplit('.', 1)[-1]}.{digest}"


class _Writer:
    """The writes of one publish, over one connection bound as the service account."""

    def __init__(
        self, connection: Connection, base: str, active_directory: bool, configuration: str | None
    ) -> None:
        self.connection = connection
        self.base = base
        self.configuration = configuration
        self.pks = layout.public_key_services_dn(base, configuration)
        self.oid_container = f"CN=OID,{self.pks}"
        self._forest_oid: str | None = None
        self._definitions: dict[str, TemplateDefinition] | None = None
        self._owner_sid = ""
        option = "" if active_directory else ";binary"
        self.binary = {name: name + option for name in BINARY_ATTRIBUTES}

    # --- reading -------------------------------------------------------------------------

    def search(
        self, base: str, search_filter: str, scope: Any, attributes: Iterable[str]
    ) -> list[tuple[str, dict[str, list[bytes]]]]:
        """Entries found, raw values by lower-case name (options dropped); none when
        ``base`` does not exist."""
        if not self.connection.search(base, search_filter, scope, attributes=list(attributes)):
            if self.connection.result.get("result") not in (LDAP_SUCCESS, LDAP_NO_SUCH_OBJECT):
                raise PublishError(f"cannot read {base}: {self._describe()}")
            return []
        return [
            (
                item["dn"],
                {k.split(";", 1)[0].lower(): list(v) for k, v in item["raw_attributes"].items()},
            )
            for item in self.connection.response or []
            if item.get("type") == "searchResEntry"
        ]

    def read(self, dn: str, attributes: Iterable[str]) -> dict[str, list[bytes]] | None:
        """One entry's raw values, or None when it does not exist."""
        found = self.search(dn, "(objectClass=*)", BASE, attributes)
        return found[0][1] if found else None

    def existing_templates(self) -> dict[str, tuple[str, str | None]]:
        """Templates in the directory: folded name -> (DN, msPKI-Cert-Template-OID)."""
        found: dict[str, tuple[str, str | None]] = {}
        for dn, raw in self.search(
            layout.certificate_templates_dn(self.base, self.configuration),
            "(objectClass=pKICertificateTemplate)",
            LEVEL,
            ["cn", "msPKI-Cert-Template-OID"],
        ):
            names, oids = raw.get("cn", []), raw.get("mspki-cert-template-oid", [])
            if names:
                found[names[0].decode().casefold()] = (dn, oids[0].decode() if oids else None)
        return found

    def definitions(self) -> dict[str, TemplateDefinition]:
        """pkigate's templates for this domain, whose SID the domain object holds."""
        if self._definitions is None:
            entry = self.read(self.base, ["objectSid"]) or {}
            values = entry.get("objectsid", [])
            try:
                domain_sid = sid_to_string(bytes(values[0])) if values else None
            except InvalidSid:
                domain_sid = None
            if domain_sid is None:
                raise PublishError(f"{self.base} has no objectSid: is it an AD domain?")
            self._definitions = pkigate_templates(domain_sid)
            # Domain Admins own pkigate's templates, as Enterprise Admins own AD CS's.
            self._owner_sid = str(Sid.parse(domain_sid).with_rid(RID_DOMAIN_ADMINS))
        return self._definitions

    # --- templates and their OIDs ----------------------------------------------------------

    def templates(
        self,
        offered: Sequence[str],
        existing: Mapping[str, tuple[str, str | None]],
        keep_existing: bool,
    ) -> dict[str, TemplateOutcome]:
        outcomes: dict[str, TemplateOutcome] = {}
        ours = {name.casefold(): name for name in PKIGATE_TEMPLATE_NAMES}
        for name in offered:
            folded = name.casefold()
            if folded not in ours:
                outcomes[name] = "existing"
            elif folded in existing and keep_existing:
                outcomes[name] = "kept"
            else:
                definition = self.definitions()[ours[folded]]
                outcomes[name] = self.template(definition, existing.get(folded))
        return outcomes

    def template(
        self, definition: TemplateDefinition, existing: tuple[str, str | None] | None
    ) -> TemplateOutcome:
        oid = existing[1] if existing and existing[1] else self.new_template_oid()
        attributes = definition.attributes(oid, owner_sid=self._owner_sid)
        self.enterprise_oid(oid, definition.display_name)
        sd_control = security_descriptor_control(sdflags=SD_FLAGS_OWNER_GROUP_DACL)
        if existing is None:
            dn = layout.template_dn(self.base, definition.name, self.configuration)
            values = {name: list(value) for name, value in attributes.items()}
            if not self.connection.add(
                dn, ["top", "pKICertificateTemplate"], values, controls=sd_control
            ):
                raise PublishError(f"cannot add {dn}: {self._describe()}")
            logger.info("published certificate template %s", dn)
            return "created"
        dn = existing[0]
        changes = {
            name: [(MODIFY_REPLACE, list(value))]
            for name, value in attributes.items()
            if name != "cn"  # the RDN: AD renames only through modify DN
        }
        if not self.connection.modify(dn, changes, controls=sd_control):
            raise PublishError(f"cannot update {dn}: {self._describe()}")
        logger.info("rewrote certificate template %s", dn)
        return "updated"

    def forest_oid(self) -> str:
        """The forest's template OID arc, created in CN=OID when no CA has yet."""
        if self._forest_oid is not None:
            return self._forest_oid
        entry = self.read(self.oid_container, ["msPKI-Cert-Template-OID"])
        values = (entry or {}).get("mspki-cert-template-oid", [])
        if values:
            self._forest_oid = bytes(values[0]).decode()
            return self._forest_oid
        numbers = (str(secrets.randbelow(OID_NUMBER_BOUND)) for _ in range(FOREST_OID_NUMBERS))
        arc = ".".join((TEMPLATE_OID_ARC, *numbers))
        if entry is None:
            added = self.connection.add(
                self.oid_container,
                ["top", "msPKI-Enterprise-Oid"],
                {"cn": "OID", "msPKI-Cert-Template-OID": arc},
            )
        else:
            added = self.connection.modify(
                self.oid_container, {"msPKI-Cert-Template-OID": [(MODIFY_REPLACE, [arc])]}
            )
        if not added:
            raise PublishError(
                f"cannot set the forest OID on {self.oid_container}: {self._describe()}"
            )
        self._forest_oid = arc
        return arc

    def new_template_oid(self) -> str:
        """A template OID below the forest arc: two more random numbers, as AD CS draws."""
        return ".".join(
            (self.forest_oid(), *(str(1 + secrets.randbelow(OID_NUMBER_BOUND)) for _ in "ab"))
        )

    def enterprise_oid(self, oid: str, display_name: str) -> None:
        """The msPKI-Enterprise-Oid object that names ``oid`` (certipy and the Windows
        certificate tools read template names from it)."""
        search_filter = f"(msPKI-Cert-Template-OID={escape_filter_chars(oid)})"
        self.forest_oid()  # CN=OID exists from here on
        found = [dn for dn, _ in self.search(self.oid_container, search_filter, LEVEL, ["cn"])]
        attributes: dict[str, list[AttributeValue]] = {
            "displayName": [display_name],
            "flags": [CERT_OID_TYPE_TEMPLATE],
            "msPKI-Cert-Template-OID": [oid],
        }
        if found:
            changes = {name: [(MODIFY_REPLACE, values)] for name, values in attributes.items()}
            if not self.connection.modify(found[0], changes):
                raise PublishError(f"cannot update {found[0]}: {self._describe()}")
            return
        dn = f"{layout.rdn(enterprise_oid_cn(oid))},{self.oid_container}"
        if not self.connection.add(dn, ["top", "msPKI-Enterprise-Oid"], attributes):
            raise PublishError(f"cannot add {dn}: {self._describe()}")

    # --- the CA ---------------------------------------------------------------------------

    def enrollment_service(
        self, request: PublishRequest, certificate: x509.Certificate
    ) -> Literal["created", "updated"]:
        dn = layout.enrollment_service_dn(self.base, request.ca_name, self.configuration)
        attributes: dict[str, list[Any]] = {
            "displayName": [request.ca_name],
            "dNSHostName": [request.dns_host_name],
            self.binary["cACertificate"]: [request.ca_certificate_der],
            "cACertificateDN": [windows_dn(certificate.subject)],
            "flags": [ENTERPRISE_CA_FLAGS],
        }
        if request.templates:
            attributes["certificateTemplates"] = list(dict.fromkeys(request.templates))
        if self.connection.add(
            dn, ["top", "pKIEnrollmentService"], {"cn": request.ca_name, **attributes}
        ):
            logger.info("published enrollment service %s", dn)
            return "created"
        if self.connection.result.get("result") != LDAP_ENTRY_ALREADY_EXISTS:
            raise PublishError(f"cannot add {dn}: {self._describe()}")
        attributes.setdefault("certificateTemplates", [])
        changes = {name: [(MODIFY_REPLACE, values)] for name, values in attributes.items()}
        if not self.connection.modify(dn, changes):
            raise PublishError(f"cannot update {dn}: {self._describe()}")
        logger.info("updated enrollment service %s", dn)
        return "updated"

    def ca_certificate_holder(self, dn: str, cn: str, certificate_der: bytes) -> str:
        """Add the CA certificate to the certificationAuthority object ``dn`` (created when
        absent), keeping the certificates it holds. Returns created, added or present, or
        why the directory would not hold it."""
        entry = self.read(dn, ["cACertificate"])
        if entry is not None:
            if certificate_der in (bytes(v) for v in entry.get("cacertificate", [])):
                return "present"
            change = {self.binary["cACertificate"]: [(MODIFY_ADD, [certificate_der])]}
            if not self.connection.modify(dn, change):
                raise PublishError(f"cannot add the CA certificate to {dn}: {self._describe()}")
            return "added"
        attributes = {
            "cn": cn,
            self.binary["cACertificate"]: [certificate_der],
            self.binary["authorityRevocationList"]: [EMPTY_REVOCATION_LIST],
            self.binary["certificateRevocationList"]: [EMPTY_REVOCATION_LIST],
        }
        if self.connection.add(dn, ["top", "certificationAuthority"], attributes):
            logger.info("published the CA certificate in %s", dn)
            return "created"
        if self.connection.result.get("result") in SCHEMA_REFUSALS:
            reason = f"not written: the directory refuses a certificationAuthority object at {dn}"
            logger.warning("%s (%s)", reason, self._describe())
            return reason
        raise PublishError(f"cannot add {dn}: {self._describe()}")

    def _describe(self) -> str:
        result = self.connection.result or {}
        message = result.get("message") or ""
        return f"{result.get('description', 'no answer')} {message}".strip()
