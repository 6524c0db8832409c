"""`pkigate adcs publish` against the development directory (real slapd).

What slapd can hold: the enrollment service, the forest's OID container, and the seeded
templates left alone. Writing pkigate's own templates needs the domain's SID and a structural
certificationAuthority, which only a real AD has: that half runs against Samba in
tests/test_adcs_certipy.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from adcs_directory_fixture import make_dev_directory_fixture
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from ldap3 import MODIFY_ADD, MODIFY_DELETE

from pkigate.adcs import layout
from pkigate.adcs.directory import DevDirectory
from pkigate.adcs.ldapdir import Directory
from pkigate.adcs.publish import (
    ENTERPRISE_CA_FLAGS,
    PublishError,
    PublishRequest,
    UnknownTemplates,
    publish,
    windows_dn,
)
from pkigate.adcs.security import Sid, enroll_rights

dev_directory = make_dev_directory_fixture(scope="module")

CA_NAME = "pkigate Issuing CA"


def ca_certificate(name: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pkigate"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.DER)


@pytest.fixture
def ldap(dev_directory: DevDirectory) -> Directory:
    return Directory(
        dev_directory.url,
        dev_directory.base,
        dev_directory.admin_dn,
        dev_directory.admin_password,
        cache_ttl=30.0,
        timeout=2.0,
    )


def _raw(directory: DevDirectory, dn: str, *attributes: str) -> dict[str, list[bytes]]:
    conn = directory.admin_connection()
    try:
        assert conn.search(dn, "(objectClass=*)", "BASE", attributes=list(attributes)), dn
        return {k.split(";")[0]: v for k, v in conn.response[0]["raw_attributes"].items()}
    finally:
        conn.unbind()


def test_publish_registers_then_updates_the_enrollment_service_keeping_seeded_templates(
    ldap: Directory, dev_directory: DevDirectory
) -> None:
    user_before = ldap.template("User")
    assert user_before is not None
    first, second = ca_certificate("first"), ca_certificate("second")
    request = PublishRequest(CA_NAME, "ca.example.test", first, ("Machine", "User"), True)

    result = publish(ldap, request)

    assert result.enrollment_service == "created"
    assert dict(result.templates) == {"Machine": "kept", "User": "kept"}
    # slapd's certificationAuthority is auxiliary (RFC 4523): said, not hidden.
    assert result.ntauth.startswith("not written")
    service = ldap.enrollment_service(CA_NAME)
    assert service is not None
    assert service.dn.lower() == layout.enrollment_service_dn(ldap.base, CA_NAME).lower()
    assert (service.dns_host_name, service.certificate_templates) == (
        "ca.example.test",
        ("Machine", "User"),
    )
    assert service.ca_certificate_der == first
    raw = _raw(dev_directory, service.dn, "cACertificateDN", "flags")
    assert raw["cACertificateDN"] == [b"CN=first, O=pkigate"]
    assert raw["flags"] == [str(ENTERPRISE_CA_FLAGS).encode()]
    # The seeded User template is as it was: carol (Denied Users) still may not enroll.
    assert ldap.template("User") == user_before
    carol = dev_directory.accounts["carol"].sid
    denied = dev_directory.groups["Denied Users"].sid
    assert not enroll_rights(user_before.security_descriptor, {carol, denied}).enroll

    again = publish(
        ldap,
        PublishRequest(CA_NAME, "ca2.example.test", second, ("WebServer",), True),
    )
    assert again.enrollment_service == "updated"
    service = ldap.enrollment_service("PKIGATE issuing ca")
    assert service is not None
    assert (service.dns_host_name, service.certificate_templates) == (
        "ca2.example.test",
        ("WebServer",),
    )
    assert service.ca_certificate_der == second


def test_publish_refuses_a_template_nobody_defines_before_writing(ldap: Directory) -> None:
    request = PublishRequest("Other CA", "ca.example.test", ca_certificate("o"), ("Nope",))
    with pytest.raises(UnknownTemplates, match="Nope"):
        publish(ldap, request)
    assert ldap.enrollment_service("Other CA") is None


def test_writing_pkigate_templates_needs_the_domain_sid_and_writes_nothing_without_it(
    ldap: Directory, dev_directory: DevDirectory
) -> None:
    """A domain entry without objectSid (as development directories made before it had
    one): pkigate's templates cannot name Domain Users there, so publish stops before
    writing anything."""
    sid = Sid.parse(dev_directory.domain_sid).to_bytes()
    admin = dev_directory.admin_connection()
    try:
        assert admin.modify(dev_directory.base, {"objectSid": [(MODIFY_DELETE, [])]})
        request = PublishRequest("Sidless CA", "ca.example.test", ca_certificate("s"), ("Machine",))
        with pytest.raises(PublishError, match="objectSid"):
            publish(ldap, request)
        assert ldap.enrollment_service("Sidless CA") is None
    finally:
        assert admin.modify(dev_directory.base, {"objectSid": [(MODIFY_ADD, [sid])]})
        admin.unbind()


def test_publish_refuses_what_is_not_a_certificate(ldap: Directory) -> None:
    with pytest.raises(ValueError):
        publish(ldap, PublishRequest("Bad CA", "ca.example.test", b"\x30\x03junk", ()))
    assert ldap.enrollment_service("Bad CA") is None


def test_cacertificatedn_is_written_most_specific_first_as_windows_does() -> None:
    name = x509.load_der_x509_certificate(ca_certificate("Issuing")).subject
    assert windows_dn(name) == "CN=Issuing, O=pkigate"
