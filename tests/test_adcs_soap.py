"""MS-XCEP / MS-WSTEP SOAP codec: round trips, the specifications' wire layout, hostile XML."""

from __future__ import annotations

import base64
import time
import xml.etree.ElementTree as StdET
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from lxml import etree

from pkigate.adcs import soap
from pkigate.adcs.flags import KeyUsage
from pkigate.adcs.soap import (
    MAX_SOAP_BYTES,
    CaUri,
    ClientAuthentication,
    OidGroup,
    PolicyCA,
    PolicyOid,
    PolicyTemplate,
    SoapFault,
)

S = "http://www.w3.org/2003/05/soap-envelope"
A = "http://www.w3.org/2005/08/addressing"
XCEP = "http://schemas.microsoft.com/windows/pki/2009/01/enrollmentpolicy"
WST = "http://docs.oasis-open.org/ws-sx/ws-trust/200512"
WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
WSU = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"
ENROLL = "http://schemas.microsoft.com/windows/pki/2009/01/enrollment"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
CES_URL = "https://pki.example.test/adcs/CES"
CEP_URL = "https://pki.example.test/adcs/CEP"


def q(namespace: str, local: str) -> str:
    return f"{{{namespace}}}{local}"


def local_names(element: Any) -> list[str]:
    return [etree.QName(child).localname for child in element]


def xml(body: bytes) -> Any:
    return etree.fromstring(body)


def header_value(body: bytes, local: str) -> str | None:
    element = xml(body).find(f"{q(S, 'Header')}/{q(A, local)}")
    return None if element is None else element.text


def payload(body: bytes) -> Any:
    return xml(body).find(q(S, "Body"))[0]


@dataclass(frozen=True)
class Pki:
    ca: x509.Certificate
    leaf: x509.Certificate
    csr_der: bytes


@pytest.fixture(scope="module")
def pki() -> Pki:
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Soap Test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "host.example.test")])
    leaf = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(2)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=7))
        .sign(ca_key, hashes.SHA256())
    )
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return Pki(ca, leaf, csr.public_bytes(serialization.Encoding.DER))


def expect_fault(body: bytes) -> SoapFault:
    with pytest.raises(SoapFault) as caught:
        soap.parse_envelope(body)
    return caught.value


# --- Constants ----------------------------------------------------------------------------


def test_namespaces_actions_and_token_types_are_the_specifications():
    assert soap.SOAP12_NS == "http://www.w3.org/2003/05/soap-envelope"
    assert soap.WSA_NS == "http://www.w3.org/2005/08/addressing"
    assert soap.XCEP_NS == "http://schemas.microsoft.com/windows/pki/2009/01/enrollmentpolicy"
    assert soap.WSTEP_NS == "http://schemas.microsoft.com/windows/pki/2009/01/enrollment"
    assert soap.WST_NS == "http://docs.oasis-open.org/ws-sx/ws-trust/200512"
    assert soap.WSSE_NS == WSSE
    assert soap.WSU_NS == WSU
    assert soap.AUTH_NS == "http://schemas.xmlsoap.org/ws/2006/12/authorization"
    assert soap.XCEP_GET_POLICIES_ACTION == (
        "http://schemas.microsoft.com/windows/pki/2009/01/enrollmentpolicy/IPolicy/GetPolicies"
    )
    assert soap.XCEP_GET_POLICIES_RESPONSE_ACTION == (
        "http://schemas.microsoft.com/windows/pki/2009/01/enrollmentpolicy/IPolicy/GetPoliciesResponse"
    )
    assert soap.WSTEP_RST_ACTION == (
        "http://schemas.microsoft.com/windows/pki/2009/01/enrollment/RST/wstep"
    )
    assert soap.WSTEP_RSTRC_ACTION == (
        "http://schemas.microsoft.com/windows/pki/2009/01/enrollment/RSTRC/wstep"
    )
    assert soap.REQUEST_TYPE_ISSUE == "http://docs.oasis-open.org/ws-sx/ws-trust/200512/Issue"
    assert soap.REQUEST_TYPE_QUERY_TOKEN_STATUS == (
        "http://schemas.microsoft.com/windows/pki/2009/01/enrollment/QueryTokenStatus"
    )
    assert soap.TOKEN_TYPE_X509V3 == (
        "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-x509-token-profile-1.0#X509v3"
    )
    assert soap.VALUE_TYPE_PKCS10 == (
        "http://schemas.microsoft.com/windows/pki/2009/01/enrollment#PKCS10"
    )
    assert soap.VALUE_TYPE_PKCS7 == WSSE + "#PKCS7"
    assert soap.ENCODING_TYPE_BASE64 == WSSE + "#base64binary"
    assert soap.PASSWORD_TEXT.endswith("oasis-200401-wss-username-token-profile-1.0#PasswordText")


# --- XCEP: requests -----------------------------------------------------------------------


def test_get_policies_request_round_trips_with_credentials_and_filter():
    last = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
    body = soap.build_get_policies_request(
        CEP_URL, "urn:uuid:1", "alice", "s3cret", last_update=last, policy_oids=["1.2.3.4"]
    )

    request = soap.parse_envelope(body)
    policies = soap.parse_get_policies(request)

    assert request.action == soap.XCEP_GET_POLICIES_ACTION
    assert (request.message_id, request.to) == ("urn:uuid:1", CEP_URL)
    assert request.reply_to == soap.WSA_ANONYMOUS
    assert request.username_token == soap.UsernameToken("alice", "s3cret", soap.PASSWORD_TEXT)
    assert policies.last_update == last
    assert policies.policy_oids == ("1.2.3.4",)
    assert payload(body).tag == q(XCEP, "GetPolicies")


def test_get_policies_request_without_credentials_has_no_security_header():
    body = soap.build_get_policies_request(CEP_URL, "urn:uuid:2")

    request = soap.parse_envelope(body)

    assert request.username_token is None
    assert xml(body).find(f"{q(S, 'Header')}/{q(WSSE, 'Security')}") is None
    assert soap.parse_get_policies(request) == soap.GetPoliciesRequest(None, None, ())


def test_password_is_not_shown_in_repr():
    token = soap.UsernameToken("alice", "s3cret", soap.PASSWORD_TEXT)
    assert "s3cret" not in repr(token)


# [MS-XCEP] 4.1.1.1, with its prefixes, timestamp and token id; the credentials were elided
# from the example ("<!--Removed-->"), so the comment stays beside ours.
WINDOWS_GET_POLICIES = f"""<s:Envelope
 xmlns:s="{S}" xmlns:a="{A}" xmlns:u="{WSU}">
<s:Header>
<a:Action s:mustUnderstand="1">
http://schemas.microsoft.com/windows/pki/2009/01/enrollmentpolicy/IPolicy/GetPolicies
</a:Action>
<a:MessageID>
urn:uuid:5fb5f6fd-4709-414b-8afa-0c05f6686d1c
</a:MessageID>
<a:ReplyTo><a:Address>http://www.w3.org/2005/08/addressing/anonymous</a:Address></a:ReplyTo>
<a:To s:mustUnderstand="1">
https://9-1351c1223a.dom9-1351c1223a.nttest.microsoft.com/ADPolicyProvider_cep_usernamepassword/service.svc/cep
</a:To>
<o:Security s:mustUnderstand="1" xmlns:o="{WSSE}">
<u:Timestamp u:Id="_0">
<u:Created>2009-03-26T00:58:51.549Z</u:Created>
<u:Expires>2009-03-26T01:03:51.549Z</u:Expires>
</u:Timestamp>
<o:UsernameToken u:Id="uuid-12df19ba-93db-4f41-8d7e-8bb789168bf9-1">
<o:Username><!--Removed-->CONTOSO\\alice</o:Username>
<o:Password>pass word</o:Password>
</o:UsernameToken>
</o:Security>
</s:Header>
<s:Body xmlns:xsi="{XSI}" xmlns:xs="http://www.w3.org/2001/XMLSchema">
<GetPolicies xmlns="{XCEP}">
<client>
<lastUpdate>0001-01-01T00:00:00</lastUpdate>
<preferredLanguage xsi:nil="true"></preferredLanguage>
</client>
<requestFilter xsi:nil="true"></requestFilter>
</GetPolicies>
</s:Body>
</s:Envelope>""".encode()


def test_windows_get_policies_request_from_ms_xcep_example_is_parsed():
    request = soap.parse_envelope(WINDOWS_GET_POLICIES)
    policies = soap.parse_get_policies(request)

    assert request.message_id == "urn:uuid:5fb5f6fd-4709-414b-8afa-0c05f6686d1c"
    assert request.to is not None and request.to.endswith("/service.svc/cep")
    assert request.username_token == soap.UsernameToken(
        "CONTOSO\\alice", "pass word", soap.PASSWORD_TEXT
    )
    assert policies.last_update == datetime(1, 1, 1, tzinfo=UTC)
    assert policies.preferred_language is None
    assert policies.policy_oids == ()


# What cepces puts on the wire: ElementTree's ns0.. prefixes, no ReplyTo, a namespace-
# qualified wsse:Type on the Password, Nonce and Created, and a requestFilter of nils.
CEPCES_GET_POLICIES = f"""<ns0:Envelope xmlns:ns0="{S}" xmlns:ns1="{A}" xmlns:ns2="{XSI}" \
xmlns:ns3="{WSSE}" xmlns:ns4="{WSU}" xmlns:ns5="{XCEP}"><ns0:Header>\
<ns1:Action ns0:mustUnderstand="1">{soap.XCEP_GET_POLICIES_ACTION}</ns1:Action>\
<ns1:MessageID>urn:uuid:0b1e5e9a-37a4-4bd4-9d0b-4ea3a3b1d3f0</ns1:MessageID>\
<ns1:To ns0:mustUnderstand="1">{CEP_URL}</ns1:To>\
<ns3:Security ns0:mustUnderstand="1"><ns3:UsernameToken><ns3:Username>bob</ns3:Username>\
<ns3:Password ns3:Type="{soap.PASSWORD_TEXT}">hunter2</ns3:Password>\
<ns3:Nonce>c2VjcmV0bm9uY2U=</ns3:Nonce><ns4:Created>2024-01-01T00:00:00Z</ns4:Created>\
</ns3:UsernameToken></ns3:Security></ns0:Header><ns0:Body><ns5:GetPolicies><ns5:client>\
<ns5:lastUpdate ns2:nil="true" /><ns5:preferredLanguage ns2:nil="true" /></ns5:client>\
<ns5:requestFilter><ns5:policyOIDs ns2:nil="true" /><ns5:clientVersion ns2:nil="true" />\
<ns5:serverVersion ns2:nil="true" /></ns5:requestFilter></ns5:GetPolicies></ns0:Body>\
</ns0:Envelope>""".encode()


def test_cepces_get_policies_request_is_parsed():
    request = soap.parse_envelope(CEPCES_GET_POLICIES)
    policies = soap.parse_get_policies(request)

    assert request.reply_to is None
    assert request.to == CEP_URL
    assert request.username_token == soap.UsernameToken("bob", "hunter2", soap.PASSWORD_TEXT)
    assert policies == soap.GetPoliciesRequest(None, None, (), None, None)


def test_get_policies_without_client_is_refused():
    body = WINDOWS_GET_POLICIES.replace(b"<client>", b"<nope>").replace(b"</client>", b"</nope>")
    with pytest.raises(SoapFault, match="no client"):
        soap.parse_get_policies(soap.parse_envelope(body))


def test_get_policies_with_unreadable_last_update_is_refused():
    # [MS-XCEP] 4.1.2.1 prints this value; it is not an xs:dateTime.
    body = WINDOWS_GET_POLICIES.replace(b"0001-01-01T00:00:00", b"20090-03-15-T09:38:46")
    with pytest.raises(SoapFault, match="lastUpdate"):
        soap.parse_get_policies(soap.parse_envelope(body))


# --- XCEP: responses ----------------------------------------------------------------------

RSA_OID = PolicyOid(
    value="1.2.840.113549.1.1.1",
    group=OidGroup.PUBLIC_KEY,
    oid_reference_id=1,
    default_name="RSA",
)


def make_templates() -> list[PolicyTemplate]:
    machine = PolicyTemplate(
        common_name="Machine",
        display_name="Computer",
        template_oid="1.3.6.1.4.1.311.21.8.1.2.3.4.5.6.14",
        oid_reference=20,
        schema_version=2,
        major_revision=100,
        minor_revision=5,
        validity_seconds=365 * 86400,
        renewal_seconds=42 * 86400,
        key_spec=1,
        minimal_key_size=2048,
        key_usage=int(KeyUsage.DIGITAL_SIGNATURE | KeyUsage.KEY_ENCIPHERMENT),
        algorithm_oid_reference=1,
        enrollment_flags=0x20,
        name_flags=0x18000000,
        private_key_flags=0x01000000,
        general_flags=0x40,
        ra_signatures=1,
        ekus=(ExtendedKeyUsageOID.CLIENT_AUTH.dotted_string, "1.3.6.1.5.5.7.3.1"),
        permission_enroll=True,
        permission_autoenroll=True,
        ca_references=(0,),
    )
    user = PolicyTemplate(
        common_name="User",
        display_name="User",
        template_oid="1.3.6.1.4.1.311.21.8.1.2.3.4.5.6.1",
        oid_reference=21,
        schema_version=1,
        major_revision=3,
        minor_revision=1,
        validity_seconds=86400,
        renewal_seconds=3600,
        key_spec=2,
        minimal_key_size=256,
        key_usage=0,
        ekus=(),
        permission_enroll=False,
        permission_autoenroll=False,
        ca_references=(),
    )
    return [machine, user]


def make_cas(pki: Pki) -> list[PolicyCA]:
    return [
        PolicyCA(
            uris=(
                CaUri(CES_URL + "/kerberos", ClientAuthentication.KERBEROS, 1, False),
                CaUri(CES_URL + "/password", ClientAuthentication.USERNAME_PASSWORD, 2, True),
            ),
            certificate_der=pki.ca.public_bytes(serialization.Encoding.DER),
            enroll_permission=True,
            ca_reference_id=0,
        )
    ]


def build_policies(pki: Pki, **overrides: Any) -> bytes:
    arguments: dict[str, Any] = {
        "relates_to": "urn:uuid:5fb5f6fd-4709-414b-8afa-0c05f6686d1c",
        "policy_id": "{083C7011-1D0A-4855-885D-AC945184658C}",
        "policy_friendly_name": "pkigate policy",
        "next_update_hours": 8,
        "policies_not_changed": False,
        "templates": make_templates(),
        "cas": make_cas(pki),
        "oids": [RSA_OID],
    }
    arguments.update(overrides)
    return soap.build_get_policies_response(**arguments)


def test_get_policies_response_round_trips(pki: Pki):
    templates, cas = soap.parse_get_policies_response(build_policies(pki))

    assert templates == make_templates()
    assert cas == make_cas(pki)


def test_get_policies_response_headers_relate_to_the_request(pki: Pki):
    body = build_policies(pki)

    assert header_value(body, "Action") == soap.XCEP_GET_POLICIES_RESPONSE_ACTION
    assert header_value(body, "RelatesTo") == "urn:uuid:5fb5f6fd-4709-414b-8afa-0c05f6686d1c"
    assert payload(body).tag == q(XCEP, "GetPoliciesResponse")


def test_get_policies_response_follows_the_ms_xcep_schema_sequences(pki: Pki):
    # xs:sequence order of [MS-XCEP] 6.2; .NET's XmlSerializer on Windows depends on it.
    root = payload(build_policies(pki))
    response = root.find(q(XCEP, "response"))
    policy = response.find(f"{q(XCEP, 'policies')}/{q(XCEP, 'policy')}")
    attributes = policy.find(q(XCEP, "attributes"))
    ca = root.find(f"{q(XCEP, 'cAs')}/{q(XCEP, 'cA')}")

    assert local_names(root) == ["response", "cAs", "oIDs"]
    assert local_names(response) == [
        "policyID",
        "policyFriendlyName",
        "nextUpdateHours",
        "policiesNotChanged",
        "policies",
    ]
    assert local_names(policy) == ["policyOIDReference", "cAs", "attributes"]
    assert local_names(attributes) == [
        "commonName",
        "policySchema",
        "certificateValidity",
        "permission",
        "privateKeyAttributes",
        "revision",
        "supersededPolicies",
        "privateKeyFlags",
        "subjectNameFlags",
        "enrollmentFlags",
        "generalFlags",
        "hashAlgorithmOIDReference",
        "rARequirements",
        "keyArchivalAttributes",
        "extensions",
    ]
    assert local_names(attributes.find(q(XCEP, "certificateValidity"))) == [
        "validityPeriodSeconds",
        "renewalPeriodSeconds",
    ]
    assert local_names(attributes.find(q(XCEP, "permission"))) == ["enroll", "autoEnroll"]
    assert local_names(attributes.find(q(XCEP, "privateKeyAttributes"))) == [
        "minimalKeyLength",
        "keySpec",
        "keyUsageProperty",
        "permissions",
        "algorithmOIDReference",
        "cryptoProviders",
    ]
    assert local_names(attributes.find(q(XCEP, "revision"))) == ["majorRevision", "minorRevision"]
    assert local_names(attributes.find(q(XCEP, "rARequirements"))) == [
        "rASignatures",
        "rAEKUs",
        "rAPolicies",
    ]
    assert local_names(attributes.find(f"{q(XCEP, 'extensions')}/{q(XCEP, 'extension')}")) == [
        "oIDReference",
        "critical",
        "value",
    ]
    assert local_names(ca) == ["uris", "certificate", "enrollPermission", "cAReferenceID"]
    assert local_names(ca.find(f"{q(XCEP, 'uris')}/{q(XCEP, 'cAURI')}")) == [
        "clientAuthentication",
        "uri",
        "priority",
        "renewalOnly",
    ]
    assert local_names(root.find(f"{q(XCEP, 'oIDs')}/{q(XCEP, 'oID')}")) == [
        "value",
        "group",
        "oIDReferenceID",
        "defaultName",
    ]
    assert all(element.tag.startswith(f"{{{XCEP}}}") for element in root.iter())


def extensions_of(root: Any, common_name: str) -> dict[str, tuple[bool, bytes]]:
    oids = {
        oid.findtext(q(XCEP, "oIDReferenceID")): oid.findtext(q(XCEP, "value"))
        for oid in root.iter(q(XCEP, "oID"))
    }
    for policy in root.iter(q(XCEP, "policy")):
        attributes = policy.find(q(XCEP, "attributes"))
        if attributes.findtext(q(XCEP, "commonName")) == common_name:
            return {
                oids[ext.findtext(q(XCEP, "oIDReference"))]: (
                    ext.findtext(q(XCEP, "critical")) == "true",
                    base64.b64decode(ext.findtext(q(XCEP, "value"))),
                )
                for ext in attributes.iter(q(XCEP, "extension"))
            }
    raise AssertionError(common_name)


def test_template_extensions_carry_identity_ekus_and_key_usage(pki: Pki):
    root = payload(build_policies(pki))
    machine = make_templates()[0]

    extensions = extensions_of(root, "Machine")

    assert extensions["1.3.6.1.4.1.311.21.7"] == (
        False,
        x509.MSCertificateTemplate(
            x509.ObjectIdentifier(machine.template_oid), 100, 5
        ).public_bytes(),
    )
    assert extensions["2.5.29.37"] == (
        False,
        x509.ExtendedKeyUsage([x509.ObjectIdentifier(e) for e in machine.ekus]).public_bytes(),
    )
    # [MS-XCEP] 4.1.1.2 shows the same value for digitalSignature | keyEncipherment.
    assert extensions["2.5.29.15"] == (True, base64.b64decode("AwIFoA=="))
    # A schema 1 template names itself with a BMPString ("User" in UTF-16BE).
    assert extensions_of(root, "User") == {
        "1.3.6.1.4.1.311.20.2": (False, bytes.fromhex("1e080055007300650072"))
    }


def test_oid_collection_names_templates_ekus_and_extensions_in_their_groups(pki: Pki):
    root = payload(build_policies(pki))
    oids = {
        oid.findtext(q(XCEP, "value")): (
            int(oid.findtext(q(XCEP, "group"))),
            oid.findtext(q(XCEP, "defaultName")),
        )
        for oid in root.iter(q(XCEP, "oID"))
    }

    assert oids["1.3.6.1.4.1.311.21.8.1.2.3.4.5.6.14"] == (9, "Computer")
    assert oids["1.3.6.1.5.5.7.3.2"] == (7, "Client Authentication")
    assert oids["2.5.29.37"] == (6, "Enhanced Key Usage")
    assert oids["1.2.840.113549.1.1.1"] == (3, "RSA")
    ids = [oid.findtext(q(XCEP, "oIDReferenceID")) for oid in root.iter(q(XCEP, "oID"))]
    assert len(ids) == len(set(ids))


def test_unchanged_policies_send_nil_collections(pki: Pki):
    body = build_policies(pki, policies_not_changed=True)
    root = payload(body)
    nil = q(soap.XSI_NS, "nil")

    assert root.findtext(f"{q(XCEP, 'response')}/{q(XCEP, 'policiesNotChanged')}") == "true"
    assert root.find(f"{q(XCEP, 'response')}/{q(XCEP, 'policies')}").get(nil) == "true"
    assert root.find(q(XCEP, "cAs")).get(nil) == "true"
    assert root.find(q(XCEP, "oIDs")).get(nil) == "true"
    assert soap.parse_get_policies_response(body) == ([], [])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ca_references": (7,)}, "unknown CAs"),
        ({"oid_reference": 1}, "is 1.2.840.113549.1.1.1"),
        ({"algorithm_oid_reference": 99}, "no OID 99"),
        ({"key_usage": int(KeyUsage.ENCIPHER_ONLY)}, "encipher_only"),
    ],
)
def test_policy_response_with_inconsistent_references_is_not_built(pki: Pki, change, message):
    machine, user = make_templates()
    broken = PolicyTemplate(**{**machine.__dict__, **change})

    with pytest.raises(ValueError, match=message):
        build_policies(pki, templates=[broken, user])


def test_policy_values_are_checked_when_made():
    with pytest.raises(ValueError, match="schema version"):
        PolicyTemplate(**{**make_templates()[0].__dict__, "schema_version": 5})
    with pytest.raises(ValueError, match="clientAuthentication"):
        PolicyCA(uris=(CaUri("https://x", 3, 1, False),), certificate_der=b"x",
                 enroll_permission=True, ca_reference_id=0)  # fmt: skip
    with pytest.raises(ValueError, match="group"):
        PolicyOid(value="1.2.3", group=10, oid_reference_id=1, default_name="x")


def test_cepces_reads_templates_and_endpoints_from_the_response(pki: Pki):
    # cepces parses with the standard library's ElementTree from the decoded text.
    root = StdET.fromstring(build_policies(pki).decode("utf-8"))  # noqa: S314 - our own output
    ns = {"x": XCEP, "s": S}
    body = root.find("s:Body/x:GetPoliciesResponse", ns)
    assert body is not None

    names = [
        e.text for e in body.findall("x:response/x:policies/x:policy/x:attributes/x:commonName", ns)
    ]
    uris = body.findall("x:cAs/x:cA/x:uris/x:cAURI", ns)

    assert names == ["Machine", "User"]
    assert [
        (
            u.findtext("x:clientAuthentication", namespaces=ns),
            u.findtext("x:uri", namespaces=ns),
            u.findtext("x:priority", namespaces=ns),
            u.findtext("x:renewalOnly", namespaces=ns),
        )
        for u in uris
    ] == [
        ("2", CES_URL + "/kerberos", "1", "false"),
        ("4", CES_URL + "/password", "2", "true"),
    ]
    certificate = body.findtext("x:cAs/x:cA/x:certificate", namespaces=ns)
    assert certificate is not None
    assert x509.load_der_x509_certificate(base64.b64decode(certificate)) == pki.ca


# --- WSTEP: requests ----------------------------------------------------------------------


def test_rst_issue_round_trips(pki: Pki):
    body = soap.build_rst_issue(
        CES_URL,
        pki.csr_der,
        "urn:uuid:3",
        "alice",
        "pw",
        additional_context=[("CertificateTemplate", "Machine"), ("ccm", "host.example.test")],
    )

    request = soap.parse_envelope(body)
    rst = soap.parse_request_security_token(request)

    assert request.action == soap.WSTEP_RST_ACTION
    assert rst.request_type == "issue"
    assert rst.token_type == soap.TOKEN_TYPE_X509V3
    assert rst.binary_security_token == pki.csr_der
    assert rst.value_type == soap.VALUE_TYPE_PKCS10
    assert rst.request_format == "pkcs10"
    assert rst.request_id is None
    assert rst.context_value("certificatetemplate") == "Machine"
    assert not rst.requests_san_attribute
    token = payload(body).find(q(WSSE, "BinarySecurityToken"))
    assert token.get("EncodingType") == soap.ENCODING_TYPE_BASE64


def test_rst_query_round_trips():
    body = soap.build_rst_query(CES_URL, "65", "urn:uuid:4", "alice", "pw")

    rst = soap.parse_request_security_token(soap.parse_envelope(body))

    assert (rst.request_type, rst.request_id, rst.binary_security_token) == ("query", "65", None)
    assert payload(body).findtext(q(WST, "RequestType")) == soap.REQUEST_TYPE_QUERY_TOKEN_STATUS


def wrapped(der: bytes, separator: str) -> str:
    text = base64.b64encode(der).decode()
    return separator.join(text[i : i + 64] for i in range(0, len(text), 64))


def windows_rst(token_text: str, value_type: str = soap.VALUE_TYPE_PKCS7) -> bytes:
    # [MS-WSTEP] 4.1.1.1 verbatim in structure and prefixes, with our own request bytes.
    return f"""<s:Envelope xmlns:a="{A}"
xmlns:s="{S}">
<s:Header>
<a:Action s:mustUnderstand="1">
http://schemas.microsoft.com/windows/pki/2009/01/enrollment/RST/wstep</a:Action>
<a:MessageID>urn:uuid:b5d1a601-5091-4a7d-b34b-5204c18b5919</a:MessageID>
<a:ReplyTo>
<a:Address>http://www.w3.org/2005/08/addressing/anonymous</a:Address>
</a:ReplyTo>
</s:Header>
<s:Body xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
xmlns:xsd="http://www.w3.org/2001/XMLSchema">
<RequestSecurityToken xmlns="http://docs.oasis-open.org/ws-sx/ws-trust/200512">
<TokenType>http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-x509-token-profile-1.0#X509v3</TokenType>
<RequestType>http://docs.oasis-open.org/ws-sx/ws-trust/200512/Issue</RequestType>
<BinarySecurityToken EncodingType="{WSSE}#base64binary"
ValueType="{value_type}"
xmlns="{WSSE}">{token_text}</BinarySecurityToken>
<RequestID xsi:nil="true" xmlns="http://schemas.microsoft.com/windows/pki/2009/01/enrollment" />
</RequestSecurityToken>
</s:Body>
</s:Envelope>""".encode()


@pytest.mark.parametrize("separator", ["\r\n", " "], ids=["crlf-wrapped", "space-wrapped"])
def test_windows_rst_from_ms_wstep_example_is_parsed(pki: Pki, separator: str):
    request = soap.parse_envelope(windows_rst(wrapped(pki.csr_der, separator)))
    rst = soap.parse_request_security_token(request)

    assert request.to is None  # Windows' WSTEP requests carry no wsa:To
    assert request.message_id == "urn:uuid:b5d1a601-5091-4a7d-b34b-5204c18b5919"
    assert rst.binary_security_token == pki.csr_der
    # Windows labels a bare PKCS#10 "#PKCS7": the bytes say what it is.
    assert (rst.value_type, rst.request_format) == (soap.VALUE_TYPE_PKCS7, "pkcs10")
    assert rst.request_id is None


def test_renewal_request_in_cms_is_reported_as_cms(pki: Pki):
    signed_data = soap.pkcs7_certs_only([pki.leaf])

    rst = soap.parse_request_security_token(
        soap.parse_envelope(windows_rst(wrapped(signed_data, "\r\n")))
    )

    assert rst.request_format == "cms"
    assert rst.binary_security_token == signed_data


WINDOWS_QUERY = f"""<s:Envelope xmlns:a="{A}" xmlns:s="{S}">
<s:Header>
<a:Action s:mustUnderstand="1">
http://schemas.microsoft.com/windows/pki/2009/01/enrollment/RST/wstep</a:Action>
<a:MessageID>urn:uuid:ce330bb2-0ca2-473b-a29a-19e9264666ff</a:MessageID>
<a:ReplyTo><a:Address>http://www.w3.org/2005/08/addressing/anonymous</a:Address></a:ReplyTo>
</s:Header>
<s:Body xmlns:xsi="{XSI}" xmlns:xsd="http://www.w3.org/2001/XMLSchema">
<RequestSecurityToken xmlns="{WST}">
<TokenType>http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-x509-token-profile-1.0#X509v3</TokenType>
<RequestType>http://schemas.microsoft.com/windows/pki/2009/01/enrollment/QueryTokenStatus</RequestType>
<RequestID xmlns="{ENROLL}">65</RequestID>
</RequestSecurityToken>
</s:Body>
</s:Envelope>""".encode()


def test_windows_query_token_status_from_ms_wstep_example_is_parsed():
    rst = soap.parse_request_security_token(soap.parse_envelope(WINDOWS_QUERY))

    assert (rst.request_type, rst.request_id) == ("query", "65")


def rst_body(inner: str, action: str = soap.WSTEP_RST_ACTION) -> bytes:
    return f"""<s:Envelope xmlns:s="{S}" xmlns:a="{A}"><s:Header>
<a:Action>{action}</a:Action><a:MessageID>urn:uuid:9</a:MessageID></s:Header>
<s:Body xmlns:xsi="{XSI}"><RequestSecurityToken xmlns="{WST}">{inner}</RequestSecurityToken>
</s:Body></s:Envelope>""".encode()


TOKEN_TYPE = f"<TokenType>{soap.TOKEN_TYPE_X509V3}</TokenType>"
ISSUE = f"<RequestType>{soap.REQUEST_TYPE_ISSUE}</RequestType>"
QUERY = f"<RequestType>{soap.REQUEST_TYPE_QUERY_TOKEN_STATUS}</RequestType>"


def bst(
    text: str = "MIIB", value_type: str = soap.VALUE_TYPE_PKCS10, encoding: str | None = None
) -> str:
    encoding_attribute = f' EncodingType="{encoding}"' if encoding else ""
    return (
        f'<BinarySecurityToken xmlns="{WSSE}" ValueType="{value_type}"{encoding_attribute}>'
        f"{text}</BinarySecurityToken>"
    )


@pytest.mark.parametrize(
    ("inner", "message"),
    [
        pytest.param(
            TOKEN_TYPE + ISSUE + bst("@@not base64@@"), "not valid base64", id="bad-base64"
        ),
        pytest.param(TOKEN_TYPE + ISSUE + bst("   "), "is empty", id="empty-token"),
        pytest.param(
            "<TokenType>urn:other</TokenType>" + ISSUE + bst(), "TokenType", id="token-type"
        ),
        pytest.param(
            TOKEN_TYPE + f"<RequestType>{WST}/Renew</RequestType>" + bst(),
            "unknown RequestType",
            id="renew-request-type",
        ),
        pytest.param(
            TOKEN_TYPE + f"<RequestType>{soap.REQUEST_TYPE_KET}</RequestType><RequestKET/>",
            "KET",
            id="key-exchange",
        ),
        pytest.param(TOKEN_TYPE + bst(), "no RequestType", id="no-request-type"),
        pytest.param(
            TOKEN_TYPE + ISSUE + bst(value_type=soap.VALUE_TYPE_X509V3),
            "ValueType",
            id="value-type",
        ),
        pytest.param(
            TOKEN_TYPE + ISSUE + bst(encoding=WSSE + "#HexBinary"),
            "EncodingType",
            id="hex-encoding",
        ),
        pytest.param(TOKEN_TYPE + ISSUE, "exactly one BinarySecurityToken", id="no-token"),
        pytest.param(TOKEN_TYPE + ISSUE + bst() + bst(), "exactly one", id="two-tokens"),
        pytest.param(TOKEN_TYPE + QUERY, "needs a RequestID", id="query-without-id"),
        pytest.param(
            TOKEN_TYPE + QUERY + f'<RequestID xmlns="{ENROLL}" xsi:nil="true"/>',
            "needs a RequestID",
            id="query-with-nil-id",
        ),
        pytest.param(
            TOKEN_TYPE
            + ISSUE
            + bst()
            + f'<AdditionalContext xmlns="{soap.AUTH_NS}"><ContextItem><Value>x</Value>'
            "</ContextItem></AdditionalContext>",
            "ContextItem has no Name",
            id="nameless-context-item",
        ),
    ],
)
def test_malformed_request_security_token_is_refused(inner: str, message: str):
    request = soap.parse_envelope(rst_body(inner))

    with pytest.raises(SoapFault, match=message) as caught:
        soap.parse_request_security_token(request)

    assert (caught.value.code, caught.value.subcode) == ("Sender", soap.SUBCODE_INVALID_REQUEST)


def test_san_in_additional_context_is_flagged_for_refusal():
    inner = (
        TOKEN_TYPE + ISSUE + bst() + f'<AdditionalContext xmlns="{soap.AUTH_NS}">'
        '<ContextItem Name="CertificateTemplate"><Value>User</Value></ContextItem>'
        '<ContextItem Name="SAN"><Value>upn=administrator@example.test</Value></ContextItem>'
        "</AdditionalContext>"
    )

    rst = soap.parse_request_security_token(soap.parse_envelope(rst_body(inner)))

    assert rst.requests_san_attribute
    assert rst.additional_context == (
        ("CertificateTemplate", "User"),
        ("SAN", "upn=administrator@example.test"),
    )


def test_request_for_another_action_is_refused():
    request = soap.parse_envelope(rst_body(TOKEN_TYPE + ISSUE + bst(), action="urn:other"))

    with pytest.raises(SoapFault) as caught:
        soap.parse_request_security_token(request)

    assert caught.value.subcode == soap.SUBCODE_ACTION_NOT_SUPPORTED


def test_wrong_element_in_body_is_refused():
    # The GetPolicies action with a RequestSecurityToken in the Body, and the reverse.
    mixed = rst_body(TOKEN_TYPE + ISSUE + bst(), action=soap.XCEP_GET_POLICIES_ACTION)
    with pytest.raises(SoapFault, match="not GetPolicies"):
        soap.parse_get_policies(soap.parse_envelope(mixed))

    reverse = WINDOWS_GET_POLICIES.replace(
        soap.XCEP_GET_POLICIES_ACTION.encode(), soap.WSTEP_RST_ACTION.encode()
    )
    with pytest.raises(SoapFault, match="not RequestSecurityToken"):
        soap.parse_request_security_token(soap.parse_envelope(reverse))


# --- WSTEP: responses ---------------------------------------------------------------------


def test_issued_response_has_the_ms_wstep_layout_and_round_trips(pki: Pki):
    certificate = pki.leaf.public_bytes(serialization.Encoding.DER)
    chain = soap.pkcs7_certs_only([pki.leaf, pki.ca])

    body = soap.build_rstr_issued(
        relates_to="urn:uuid:b5d1a601", request_id="61", certificate_der=certificate,
        pkcs7_chain_der=chain,
    )  # fmt: skip

    assert header_value(body, "Action") == soap.WSTEP_RSTRC_ACTION
    assert header_value(body, "RelatesTo") == "urn:uuid:b5d1a601"
    collection = payload(body)
    assert collection.tag == q(WST, "RequestSecurityTokenResponseCollection")
    (response,) = collection
    assert [child.tag for child in response] == [
        q(WST, "TokenType"),
        q(ENROLL, "DispositionMessage"),
        q(WSSE, "BinarySecurityToken"),
        q(WST, "RequestedSecurityToken"),
        q(ENROLL, "RequestID"),
    ]
    assert response.findtext(q(WST, "TokenType")) == soap.TOKEN_TYPE_X509V3
    disposition = response.find(q(ENROLL, "DispositionMessage"))
    assert disposition.get(q(soap.XML_NS, "lang")) == "en-US"
    assert response.find(q(WSSE, "BinarySecurityToken")).get("ValueType") == WSSE + "#PKCS7"
    issued = response.find(f"{q(WST, 'RequestedSecurityToken')}/{q(WSSE, 'BinarySecurityToken')}")
    assert issued.get("ValueType") == soap.TOKEN_TYPE_X509V3
    assert issued.get("EncodingType") == soap.ENCODING_TYPE_BASE64

    result = soap.parse_rstr(body)

    assert result == soap.RstrResult(
        status="issued",
        certificate_der=certificate,
        chain_der=chain,
        request_id="61",
        disposition_message="Issued",
        fault_reason=None,
    )
    assert pkcs7.load_der_pkcs7_certificates(result.chain_der or b"") == [pki.leaf, pki.ca]


def test_pending_response_points_at_the_ces_endpoint_for_polling():
    body = soap.build_rstr_pending(relates_to="urn:uuid:5", request_id="66", reference_uri=CES_URL)

    (response,) = payload(body)
    requested = response.find(q(WST, "RequestedSecurityToken"))
    reference = requested.find(f"{q(WSSE, 'SecurityTokenReference')}/{q(WSSE, 'Reference')}")
    assert reference.get("URI") == CES_URL
    assert response.find(q(WSSE, "BinarySecurityToken")) is None  # no certificate, no chain
    assert soap.parse_rstr(body) == soap.RstrResult(
        status="pending",
        certificate_der=None,
        chain_der=None,
        request_id="66",
        disposition_message="Request is pending",
        fault_reason=None,
        reference_uri=CES_URL,
    )


def cepces_view(body: bytes) -> tuple[str | None, str | None, str | None]:
    """(certificate text, reference URI, request id) read the way cepces' bindings read them."""
    ns = {"s": S, "wst": WST, "wsse": WSSE, "e": ENROLL}
    root = StdET.fromstring(body.decode("utf-8"))  # noqa: S314 - our own output
    response = root.find(
        "s:Body/wst:RequestSecurityTokenResponseCollection/wst:RequestSecurityTokenResponse", ns
    )
    assert response is not None
    requested = response.find("wst:RequestedSecurityToken", ns)
    assert requested is not None  # cepces dereferences it unconditionally
    reference = requested.find("wsse:SecurityTokenReference/wsse:Reference", ns)
    return (
        requested.findtext("wsse:BinarySecurityToken", namespaces=ns),
        None if reference is None else reference.get("URI"),
        response.findtext("e:RequestID", namespaces=ns),
    )


def test_cepces_reads_issued_and_pending_responses(pki: Pki):
    certificate = pki.leaf.public_bytes(serialization.Encoding.DER)
    issued = soap.build_rstr_issued(
        relates_to="urn:uuid:6", request_id="7", certificate_der=certificate,
        pkcs7_chain_der=soap.pkcs7_certs_only([pki.leaf]),
    )  # fmt: skip
    pending = soap.build_rstr_pending(
        relates_to="urn:uuid:6", request_id="8", reference_uri=CES_URL
    )

    text, _, request_id = cepces_view(issued)
    assert text is not None and base64.b64decode(text) == certificate
    assert int(request_id or "") == 7  # cepces converts RequestID to an unsigned integer
    assert cepces_view(pending) == (None, CES_URL, "8")


def test_rejection_is_a_receiver_fault_with_certificate_enrollment_ws_detail():
    body = soap.build_rstr_rejected(
        relates_to="urn:uuid:7", request_id="42", hresult=0x80094012, reason="Denied by policy"
    )

    assert header_value(body, "Action") == soap.WSTEP_FAULT_ACTION
    fault = payload(body)
    assert fault.tag == q(S, "Fault")
    assert fault.findtext(f"{q(S, 'Code')}/{q(S, 'Value')}") == "s:Receiver"
    detail = fault.find(f"{q(S, 'Detail')}/{q(ENROLL, 'CertificateEnrollmentWSDetail')}")
    assert local_names(detail) == ["BinaryResponse", "ErrorCode", "InvalidRequest", "RequestID"]
    assert detail.find(q(ENROLL, "BinaryResponse")).get(q(XSI, "nil")) == "true"
    assert detail.findtext(q(ENROLL, "ErrorCode")) == str(0x80094012 - (1 << 32))
    assert detail.findtext(q(ENROLL, "InvalidRequest")) == "true"
    assert detail.findtext(q(ENROLL, "RequestID")) == "42"
    assert soap.parse_rstr(body) == soap.RstrResult(
        status="fault",
        certificate_der=None,
        chain_der=None,
        request_id="42",
        disposition_message=None,
        fault_reason="Denied by policy",
        error_code=-2146877422,
    )


def test_plain_fault_declares_its_subcode_namespace_and_relates_to_the_request():
    fault = SoapFault("Sender", soap.SUBCODE_INVALID_REQUEST, "bad request")

    body = soap.build_fault(fault, "urn:uuid:8")

    assert header_value(body, "Action") == soap.WSA_FAULT_ACTION
    assert header_value(body, "RelatesTo") == "urn:uuid:8"
    element = payload(body)
    subcode = element.find(f"{q(S, 'Code')}/{q(S, 'Subcode')}/{q(S, 'Value')}")
    assert subcode.text == "wst:InvalidRequest"
    assert subcode.nsmap["wst"] == WST  # the QName resolves
    reason = element.find(f"{q(S, 'Reason')}/{q(S, 'Text')}")
    assert (reason.text, reason.get(q(soap.XML_NS, "lang"))) == ("bad request", "en-US")
    assert element.find(q(S, "Detail")) is None
    with pytest.raises(SoapFault) as caught:
        soap.parse_get_policies_response(body)
    assert (caught.value.code, caught.value.subcode) == ("Sender", soap.SUBCODE_INVALID_REQUEST)


def test_fault_with_unknown_subcode_prefix_is_a_programming_error():
    with pytest.raises(ValueError, match="prefix"):
        SoapFault("Sender", "zz:Whatever", "reason")


def test_pkcs7_certs_only_holds_the_certificates(pki: Pki):
    der = soap.pkcs7_certs_only([pki.leaf, pki.ca])

    assert pkcs7.load_der_pkcs7_certificates(der) == [pki.leaf, pki.ca]


# --- Envelope and hostile input -----------------------------------------------------------


def envelope(header: str = "", body: str = "<x:Ping xmlns:x='urn:x'/>") -> bytes:
    return (
        f"<s:Envelope xmlns:s='{S}' xmlns:a='{A}'><s:Header>{header}</s:Header>"
        f"<s:Body>{body}</s:Body></s:Envelope>"
    ).encode()


ADDRESSING = "<a:Action>urn:action</a:Action><a:MessageID>urn:uuid:m</a:MessageID>"

BILLION_LAUGHS = f"""<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<s:Envelope xmlns:s="{S}" xmlns:a="{A}"><s:Header><a:Action>&lol9;</a:Action>
<a:MessageID>urn:uuid:m</a:MessageID></s:Header><s:Body><x xmlns="urn:x"/></s:Body></s:Envelope>"""

XXE = f"""<?xml version="1.0"?>
<!DOCTYPE s:Envelope [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<s:Envelope xmlns:s="{S}" xmlns:a="{A}"><s:Header><a:Action>&xxe;</a:Action>
<a:MessageID>urn:uuid:m</a:MessageID></s:Header>
<s:Body><x xmlns="urn:x">&xxe;</x></s:Body></s:Envelope>"""


def test_billion_laughs_is_refused_without_expansion():
    started = time.monotonic()

    fault = expect_fault(BILLION_LAUGHS.encode())

    assert "document type declaration" in fault.reason
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("encoding", ["utf-8", "utf-16", "utf-16-be"])
def test_external_entity_is_refused_and_never_read(encoding: str):
    body = XXE.replace('<?xml version="1.0"?>', f'<?xml version="1.0" encoding="{encoding}"?>')

    fault = expect_fault(body.encode(encoding))

    assert fault.code == "Sender"
    assert "root:" not in fault.reason
    assert b"root:" not in soap.build_fault(fault, None)


def test_doctype_in_an_encoding_the_byte_scan_misses_is_refused_by_the_parsed_tree():
    # UTF-32 hides the markers from the byte scan; the parser's docinfo still shows the DTD
    # (or libxml2 refuses the encoding): either way it is a fault.
    body = XXE.replace('<?xml version="1.0"?>', '<?xml version="1.0" encoding="UTF-32"?>')

    fault = expect_fault(body.encode("utf-32"))

    assert fault.code == "Sender"
    assert "root:" not in fault.reason


def test_client_side_parsers_refuse_a_doctype_too():
    with pytest.raises(SoapFault, match="document type"):
        soap.parse_rstr(XXE.encode())
    with pytest.raises(SoapFault, match="document type"):
        soap.parse_get_policies_response(BILLION_LAUGHS.encode())


@pytest.mark.parametrize("depth", [1000, soap.MAX_XML_DEPTH + 1])
def test_deep_nesting_is_refused(depth: int):
    nested = "<n>" * depth + "</n>" * depth

    fault = expect_fault(envelope(ADDRESSING, nested))

    assert fault.code == "Sender"


def test_nesting_up_to_the_limit_is_accepted():
    depth = soap.MAX_XML_DEPTH - 3  # Envelope, Body and the payload's own element
    nested = "<n>" * depth + "</n>" * depth

    request = soap.parse_envelope(envelope(ADDRESSING, f"<x xmlns='urn:x'>{nested}</x>"))

    assert request.action == "urn:action"


def test_oversize_body_is_refused():
    body = envelope(ADDRESSING, "<x xmlns='urn:x'>" + "a" * MAX_SOAP_BYTES + "</x>")

    assert "larger than" in expect_fault(body).reason


@pytest.mark.parametrize(
    "body", [b"", b"   ", b"this is not xml", b"<s:Envelope xmlns:s='x'>", b"\xff\xfe\x00garbage"]
)
def test_not_xml_is_refused(body: bytes):
    assert expect_fault(body).code == "Sender"


def test_soap_11_envelope_is_a_version_mismatch():
    body = (
        b"<e:Envelope xmlns:e='http://schemas.xmlsoap.org/soap/envelope/'>"
        b"<e:Body><x xmlns='urn:x'/></e:Body></e:Envelope>"
    )

    assert expect_fault(body).code == "VersionMismatch"


def test_other_root_element_is_refused():
    assert "SOAP 1.2" in expect_fault(b"<Envelope><Body/></Envelope>").reason


def test_missing_action_is_refused():
    fault = expect_fault(envelope("<a:MessageID>urn:uuid:m</a:MessageID>"))

    assert fault.subcode == soap.SUBCODE_ADDRESSING_HEADER_REQUIRED
    assert "Action" in fault.reason


def test_missing_message_id_is_refused():
    fault = expect_fault(envelope("<a:Action>urn:action</a:Action>"))

    assert fault.subcode == soap.SUBCODE_ADDRESSING_HEADER_REQUIRED


def test_duplicate_action_is_refused():
    fault = expect_fault(envelope(ADDRESSING + "<a:Action>urn:other</a:Action>"))

    assert fault.subcode == soap.SUBCODE_INVALID_ADDRESSING_HEADER


def test_missing_or_empty_body_is_refused():
    no_body = (
        f"<s:Envelope xmlns:s='{S}' xmlns:a='{A}'><s:Header>{ADDRESSING}</s:Header></s:Envelope>"
    )
    assert "no Body" in expect_fault(no_body.encode()).reason
    assert "Body is empty" in expect_fault(envelope(ADDRESSING, "")).reason


def test_unknown_header_that_must_be_understood_is_refused():
    header = ADDRESSING + "<x:Billing xmlns:x='urn:x' s:mustUnderstand='true'/>"

    assert expect_fault(envelope(header)).code == "MustUnderstand"


def test_unknown_optional_header_is_ignored():
    header = ADDRESSING + "<x:ActivityId xmlns:x='urn:x'>1</x:ActivityId>"

    assert soap.parse_envelope(envelope(header)).action == "urn:action"


def security(password: str, password_type: str | None = None) -> str:
    type_attribute = f' Type="{password_type}"' if password_type else ""
    return (
        f"<o:Security xmlns:o='{WSSE}' s:mustUnderstand='1'><o:UsernameToken>"
        f"<o:Username>alice</o:Username><o:Password{type_attribute}>{password}</o:Password>"
        "</o:UsernameToken></o:Security>"
    )


def test_password_digest_is_refused_as_unsupported():
    digest = soap.PASSWORD_TEXT.replace("PasswordText", "PasswordDigest")

    fault = expect_fault(envelope(ADDRESSING + security("d2hhdGV2ZXI=", digest)))

    assert fault.subcode == soap.SUBCODE_UNSUPPORTED_SECURITY_TOKEN
    assert "PasswordDigest" in fault.reason


def test_password_without_type_is_plain_text():
    token = soap.parse_envelope(envelope(ADDRESSING + security("pw"))).username_token

    assert token == soap.UsernameToken("alice", "pw", soap.PASSWORD_TEXT)


def test_username_token_without_password_is_refused():
    header = (
        f"<o:Security xmlns:o='{WSSE}'><o:UsernameToken><o:Username>alice</o:Username>"
        "</o:UsernameToken></o:Security>"
    )

    assert (
        expect_fault(envelope(ADDRESSING + header)).subcode == soap.SUBCODE_INVALID_SECURITY_TOKEN
    )


def test_security_header_with_a_signature_is_refused_not_treated_as_anonymous():
    header = (
        f"<o:Security xmlns:o='{WSSE}'><o:BinarySecurityToken>MIIB</o:BinarySecurityToken>"
        "<Signature xmlns='http://www.w3.org/2000/09/xmldsig#'/></o:Security>"
    )

    fault = expect_fault(envelope(ADDRESSING + header))

    assert fault.subcode == soap.SUBCODE_UNSUPPORTED_SECURITY_TOKEN
