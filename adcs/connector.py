"""The AD-style enrollment connector: MS-XCEP policy and MS-WSTEP enrollment over SOAP,
a JSON endpoint for scripts, and the administrator's pending-request resources.

Routes live on the HTTPS listener only: enrollment over plain HTTP, and NTLM that a relay
could replay (ESC8), are not offered. Who asks is proved by a directory password
(WS-Security UsernameToken or HTTP Basic), by Kerberos (HTTP Negotiate, when a keytab is
configured: :mod:`pkigate.adcs.negotiate`) or by a TLS client certificate that this CA
issued; what they may get is decided in :mod:`pkigate.adcs.policy`.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flask import Blueprint, Response, g, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from pkigate.adcs import soap
from pkigate.adcs.ldapdir import DirectoryError, DirectoryUnavailable
from pkigate.adcs.negotiate import (
    KerberosSettings,
    KerberosUnavailable,
    NegotiateAcceptor,
    NegotiateRefused,
    reply_header,
)
from pkigate.adcs.policy import EnrollmentRefused, RequestContext
from pkigate.adcs.principals import Principal
from pkigate.adcs.publish import PKIGATE_TEMPLATE_NAMES, PublishRequest, UnknownTemplates, publish
from pkigate.adcs.service import AdcsService, Outcome, attributes_from, load_settings
from pkigate.core import Actor
from pkigate.core.access import Action
from pkigate.core.errors import BadRequestError, StoreUnavailableError
from pkigate.gateways.connectors import (
    Connector,
    ConnectorContext,
    ConnectorSettingsError,
    OfflineCore,
)
from pkigate.gateways.http import (
    MalformedJson,
    actor,
    authorize_on_ca,
    error_response,
    json_body,
    parse_json,
    requires,
)
from pkigate.gateways.roles import Permission

log = logging.getLogger("pkigate.adcs")

MAX_JSON_BYTES = 64 * 1024
_REQUEST_ID = re.compile(r"[0-9]{1,18}")  # what the store's 64-bit ids can hold
# Refusal codes and the HTTP status the JSON endpoint answers them with.
STORE_UNAVAILABLE = "storeUnavailable"
_STATUS = {
    STORE_UNAVAILABLE: 503,
    "badCredentials": 401,
    "authenticationRequired": 401,
    "unsupportedAuthentication": 401,
    "httpsRequired": 403,
    "accountDisabled": 403,
    "accessDenied": 403,
    "autoenrollmentDisabled": 403,
    "badCertificate": 403,
    "dangerousTemplate": 403,
    "onBehalfOfRefused": 403,
    "raSignatureRequired": 403,
    "attributeRefused": 403,
    "extensionRefused": 403,
    "nameRefused": 403,
    "templateNotPublished": 403,
    "unknownTemplate": 404,
    "unknownRequest": 404,
    "requestDenied": 403,
    "directoryUnavailable": 503,
    "kerberosUnavailable": 503,
    "caNotPublished": 503,
    "keyUnavailable": 503,
    "issuanceFailed": 400,
    "payloadTooLarge": 413,
}


class AdcsConnector(Connector):
    """AD-style template enrollment for domain machines and users."""

    type_name = "adcs"
    listener = "https"
    default_template = "BlankEndEntityCertificate_APIPassthrough/V1"
    default_validity = "365d"

    def __init__(self, context: ConnectorContext, settings: Mapping[str, Any]) -> None:
        super().__init__(context, settings)
        self.options = load_settings(settings, context)
        self.service = AdcsService(context, self.options)
        self.negotiate = _negotiate_acceptor(self.options.kerberos)

    # -- contract ------------------------------------------------------------------------

    @classmethod
    def check_settings(
        cls, settings: Mapping[str, Any], context: ConnectorContext, offline: OfflineCore
    ) -> None:
        load_settings(settings, context)

    def url(self, path: str) -> str:
        return self.context.url + path

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "policy": self.url("/cep"),
            "enrollment": self.url("/ces"),
            "directory": self.options.directory_url,
            "kerberos": (
                self.options.kerberos.service_principal if self.options.kerberos else None
            ),
        }

    def startup_notes(self) -> list[str]:
        notes = [
            f"MS-XCEP policy {self.url('/cep')}, MS-WSTEP {self.url('/ces')} "
            f"(client certificate: {self.url('/ces-certificate')}), JSON {self.url('/enroll')}"
        ]
        if self.options.kerberos is not None:
            notes.append(f"Kerberos (Negotiate) for {self.options.kerberos.service_principal}")
        problem = self.service.directory_problem()
        if problem:
            notes.append(f"directory {self.options.directory_url} is unavailable: {problem}")
        return notes

    def publish(
        self,
        templates: list[str] | None,
        dns_host_name: str | None,
        *,
        keep_existing_templates: bool = False,
    ) -> dict[str, Any]:
        """Register this CA in the directory's Configuration partition, as an AD CS
        installation does (see :mod:`pkigate.adcs.publish`): by default with pkigate's
        templates. Audited, whether it succeeds or the directory refuses."""
        from urllib.parse import urlsplit

        host = dns_host_name or urlsplit(self.context.base_url).hostname or "localhost"
        ca = self.context.core.authorities.get(self.context.ca_id)
        assert ca.certificate_der is not None
        request = PublishRequest(
            ca_name=self.options.ca_name,
            dns_host_name=host,
            ca_certificate_der=bytes(ca.certificate_der),
            templates=tuple(templates or PKIGATE_TEMPLATE_NAMES),
            keep_existing_templates=keep_existing_templates,
        )
        parameters: dict[str, Any] = {
            "ca_name": request.ca_name,
            "templates": list(request.templates),
            "host": host,
            "keep_existing_templates": keep_existing_templates,
        }
        try:
            result = publish(self.service.directory, request)
        except UnknownTemplates as exc:
            self._audit_publish("failure", {**parameters, "error": str(exc)})
            raise BadRequestError(str(exc)) from None
        except DirectoryError as exc:
            self._audit_publish("failure", {**parameters, "error": str(exc)})
            raise
        data = result.to_json()
        self._audit_publish("success", {**parameters, **data})
        return {**data, "ca_name": request.ca_name, "dns_host_name": host}

    def _audit_publish(self, result: str, parameters: dict[str, Any]) -> None:
        self.context.core.audit.record_alone(
            Actor("cli", self.context.name),
            "adcs.publish",
            f"connector/{self.context.name}",
            result=result,
            parameters=parameters,
            at=self.context.core.clock(),
        )

    # -- routes --------------------------------------------------------------------------

    def blueprint(self) -> Blueprint:
        bp = Blueprint(f"adcs_{self.context.name}", __name__)
        bp.add_url_rule("/cep", "cep", self._cep, methods=["POST"])
        bp.add_url_rule("/ces", "ces", lambda: self._ces(certificate=False), methods=["POST"])
        bp.add_url_rule(
            "/ces-certificate",
            "ces_certificate",
            lambda: self._ces(certificate=True),
            methods=["POST"],
        )
        bp.add_url_rule("/enroll", "enroll", self._json_enroll, methods=["POST"])
        bp.add_url_rule("/requests/<int:request_id>", "status", self._json_status, methods=["GET"])
        bp.after_request(self._authentication_headers)
        return bp

    def _authentication_headers(self, response: Response) -> Response:
        """RFC 4559: the AP-REP of an accepted Negotiate token goes back with the answer,
        whatever it is (the client checks the server's identity with it); a 401 lists
        the schemes a client may use (RFC 9110 section 11.6.1)."""
        accepted = g.pop("negotiate_result", None)
        if accepted is not None:
            response.headers["WWW-Authenticate"] = reply_header(accepted)
        elif response.status_code == 401:
            schemes = ["Negotiate"] if self.negotiate is not None else []
            response.headers.setlist("WWW-Authenticate", [*schemes, 'Basic realm="pkigate"'])
        return response

    def elsewhere_blueprint(self) -> Blueprint:
        """Plain HTTP: every path under the mount is refused, audited as ESC8 (enrollment
        over a transport a relay can use), with the HTTPS address to use instead."""
        bp = Blueprint(f"adcs_plain_{self.context.name}", __name__)
        methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
        bp.add_url_rule("/", "plain_root", self._over_plain_http, methods=methods)
        bp.add_url_rule("/<anytext:path>", "plain", self._over_plain_http, methods=methods)
        return bp

    def _over_plain_http(self, path: str = "") -> tuple[Response, int]:
        refusal = EnrollmentRefused(
            "httpsRequired",
            f"AD-style enrollment is offered over HTTPS only (plain HTTP can be relayed, "
            f"ESC8): use {self.context.url}/{path}",
            attack="ESC8",
        )
        self._refused(refusal, None, "transport")
        if path.startswith(("cep", "ces")):
            fault = soap.SoapFault("Sender", None, f"{refusal.code}: {refusal.message}")
            return Response(
                soap.build_fault(fault, None), content_type="application/soap+xml; charset=utf-8"
            ), 403
        return _json_error(refusal)

    def admin_blueprint(self) -> Blueprint:
        bp = Blueprint(f"adcs_admin_{self.context.name}", __name__)

        @bp.get("/pending")
        @requires(Permission.APPROVE)
        def list_pending() -> Response:
            authorize_on_ca(self.context.ca_id, Action.READ, self.context.name)
            return jsonify([r.to_json() for r in self.service.pending()])

        @bp.post("/pending/<int:request_id>/approve")
        @requires(Permission.APPROVE)
        def approve(request_id: int) -> Response:
            try:
                self.authorize_decision(request_id)
                certificate = self.approve_pending(request_id, actor())
            except DirectoryError as exc:
                return error_response(503, "directoryUnavailable", unavailable_message(exc))
            return jsonify(
                {
                    "request_id": request_id,
                    "status": "issued",
                    "serial": format(certificate.serial_number, "x"),
                    "certificate": _pem(certificate),
                }
            )

        @bp.post("/pending/<int:request_id>/reject")
        @requires(Permission.APPROVE)
        def reject(request_id: int) -> Response:
            body = json_body({"reason": str}, required=("reason",))
            try:
                self.authorize_decision(request_id)
            except DirectoryError as exc:
                return error_response(503, "directoryUnavailable", unavailable_message(exc))
            return jsonify(self.service.reject(request_id, actor(), body["reason"]).to_json())

        return bp

    def authorize_decision(self, request_id: int) -> None:
        """Whether this request's token may approve or reject the held request, decided on
        its template and the names its certificate would carry (the API's and the
        console's path): 403 with the reason. The names may come from the directory: a
        DirectoryError goes to the caller, nothing decided."""
        held = self.service.held_facts(request_id)
        authorize_on_ca(self.context.ca_id, Action.APPROVE_PENDING, self.context.name, held)

    def approve_pending(self, request_id: int, who: Actor) -> x509.Certificate:
        """Issue a held request (the API's and the console's path); a refusal is a
        BadRequestError. A DirectoryError goes to the caller: nothing was decided, and the
        request stays pending for a later approval."""
        try:
            outcome = self.service.approve(request_id, who)
        except EnrollmentRefused as refusal:
            raise BadRequestError(f"{refusal.code}: {refusal.message}") from None
        assert outcome.certificate is not None
        return outcome.certificate

    # -- authentication ---------------------------------------------------------------------

    def _address(self) -> str:
        return request.remote_addr or "unknown"

    def _client_certificate(self) -> x509.Certificate | None:
        # The HTTP layer (gateways/server.py) puts the TLS client certificate here.
        der = request.environ.get("pkigate.client_certificate")
        return None if der is None else x509.load_der_x509_certificate(der)

    def _header_principal(self) -> Principal:
        header = request.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "negotiate" and self.negotiate is not None:
            return self._negotiate_principal(self.negotiate, value)
        if scheme.lower() in ("ntlm", "negotiate"):
            refusal = EnrollmentRefused(
                "unsupportedAuthentication",
                f"{scheme} authentication is not accepted (relayable, ESC8); use a password "
                "over TLS or a client certificate"
                + ("" if scheme.lower() == "ntlm" else " (no Kerberos keytab is configured)"),
                attack="ESC8",
            )
            self.service.refuse_audit(f"adcs-client:{self._address()}", "authenticate", refusal)
            raise refusal
        if scheme.lower() != "basic":
            raise EnrollmentRefused(
                "authenticationRequired",
                "authenticate with "
                + ("Kerberos (Negotiate), " if self.negotiate is not None else "")
                + "HTTP Basic or a client certificate",
            )
        try:
            username, _, password = base64.b64decode(value, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise EnrollmentRefused(
                "badCredentials", "the Basic credentials are malformed"
            ) from None
        return self.service.authenticate_password(username, password, self._address())

    def _negotiate_principal(self, acceptor: NegotiateAcceptor, token: str) -> Principal:
        try:
            accepted = acceptor.accept(token, request.environ.get("pkigate.tls_server_end_point"))
        except KerberosUnavailable as exc:
            raise EnrollmentRefused(
                "kerberosUnavailable", f"Kerberos authentication is unavailable: {exc}"
            ) from None
        except NegotiateRefused as exc:
            refusal = EnrollmentRefused(
                exc.code if exc.code == "unsupportedAuthentication" else "badCredentials",
                exc.message,
                attack="ESC8" if exc.relayable else None,
            )
            self.service.refuse_audit(
                f"adcs-client:{self._address()}", "authenticate", refusal, kerberos=exc.code
            )
            raise refusal from None
        g.negotiate_result = accepted
        return self.service.authenticate_kerberos(accepted.client_principal, self._address())

    def _principal(self, allow_certificate: bool = True) -> Principal:
        certificate = self._client_certificate() if allow_certificate else None
        if certificate is not None and not request.headers.get("Authorization"):
            return self.service.authenticate_certificate(certificate, self._address())
        return self._header_principal()

    # -- JSON ---------------------------------------------------------------------------------

    def _refused(self, refusal: EnrollmentRefused, who: Principal | None, operation: str) -> None:
        """Audit a refusal made here, at the boundary (malformed bodies, missing
        credentials, unknown requests): deeper refusals are audited where they are made."""
        if not refusal.audited:
            actor = f"adcs:{who.sam_account_name}" if who else f"adcs-client:{self._address()}"
            self.service.refuse_audit(actor, operation, refusal)

    def _json_enroll(self) -> tuple[Response, int]:
        principal: Principal | None = None
        try:
            principal = self._principal()
            body = self._json_body()
            template = body.get("template")
            csr_text = body.get("csr")
            if not isinstance(template, str) or not isinstance(csr_text, str):
                raise EnrollmentRefused(
                    "badRequest", 'send {"template": NAME, "csr": PEM} (attributes optional)'
                )
            csr_der = _csr_der(csr_text)
            outcome = self.service.enroll(
                principal,
                csr_der,
                RequestContext(
                    template_name=template, attributes=attributes_from(body.get("attributes"))
                ),
                self._address(),
                autoenroll=bool(body.get("autoenroll", False)),
            )
            return self._json_outcome(outcome)
        except EnrollmentRefused as refusal:
            self._refused(refusal, principal, "enroll")
            return _json_error(refusal)
        except DirectoryError as exc:
            return _json_error(_unavailable(exc))
        except StoreUnavailableError as exc:
            return _json_error(_store_unavailable(exc))

    def _json_status(self, request_id: int) -> tuple[Response, int]:
        principal: Principal | None = None
        try:
            principal = self._principal()
            return self._json_outcome(self.service.status(principal, request_id))
        except EnrollmentRefused as refusal:
            self._refused(refusal, principal, "status")
            return _json_error(refusal)
        except DirectoryError as exc:
            return _json_error(_unavailable(exc))

    def _json_body(self) -> dict[str, Any]:
        if (request.mimetype or "") != "application/json":
            raise EnrollmentRefused("badRequest", "send application/json")
        too_large = EnrollmentRefused("payloadTooLarge", f"the body exceeds {MAX_JSON_BYTES} bytes")
        try:
            raw = request.get_data(cache=False)  # read whole up to the gateway's limit
        except RequestEntityTooLarge:
            raise too_large from None
        if len(raw) > MAX_JSON_BYTES:
            raise too_large
        try:
            body = parse_json(raw)
        except MalformedJson as exc:
            raise EnrollmentRefused("badRequest", str(exc)) from None
        if not isinstance(body, dict):
            raise EnrollmentRefused("badRequest", "the body is a JSON object")
        return body

    def _json_outcome(self, outcome: Outcome) -> tuple[Response, int]:
        if outcome.status == "pending":
            return jsonify(
                {"status": "pending", "request_id": outcome.request_id, "message": outcome.message}
            ), 202
        assert outcome.certificate is not None
        return jsonify(
            {
                "status": "issued",
                "request_id": outcome.request_id,
                "serial": format(outcome.certificate.serial_number, "x"),
                "certificate": _pem(outcome.certificate),
                "chain": "".join(_pem(c) for c in outcome.chain),
            }
        ), 200

    # -- SOAP -----------------------------------------------------------------------------------

    def _cep(self) -> Response:
        return self._soap(self._get_policies, "policy", allow_certificate=True)

    def _ces(self, certificate: bool) -> Response:
        return self._soap(self._request_security_token, "enroll", allow_certificate=certificate)

    def _soap(
        self,
        operation: Callable[[soap.SoapRequest, Principal], bytes],
        name: str,
        *,
        allow_certificate: bool,
    ) -> Response:
        relates_to: str | None = None
        principal: Principal | None = None
        try:
            parsed = soap.parse_envelope(_soap_body())
            relates_to = parsed.message_id
            principal = self._soap_principal(parsed, allow_certificate)
            answer = operation(parsed, principal)
            return Response(answer, content_type="application/soap+xml; charset=utf-8")
        except soap.SoapFault as fault:
            self._refused(EnrollmentRefused("badRequest", fault.reason), principal, name)
            return _soap_fault(fault, relates_to)
        except EnrollmentRefused as refusal:
            self._refused(refusal, principal, name)
            return _soap_fault(_fault_for(refusal), relates_to)
        except DirectoryError as exc:
            return _soap_fault(_fault_for(_unavailable(exc)), relates_to)
        except StoreUnavailableError as exc:
            # Nothing to audit it in: answered as the Receiver's fault, to retry later.
            return _soap_fault(_fault_for(_store_unavailable(exc)), relates_to)

    def _soap_principal(self, parsed: soap.SoapRequest, allow_certificate: bool) -> Principal:
        if allow_certificate:
            certificate = self._client_certificate()
            if certificate is not None and parsed.username_token is None:
                return self.service.authenticate_certificate(certificate, self._address())
        token = parsed.username_token
        if token is not None:
            return self.service.authenticate_password(
                token.username, token.password, self._address()
            )
        return self._header_principal()

    def _get_policies(self, parsed: soap.SoapRequest, principal: Principal) -> bytes:
        soap.parse_get_policies(parsed)
        return self.service.policy_response(
            principal,
            relates_to=parsed.message_id,
            ces_urls={
                # Kerberos and passwords are both accepted on /ces: Windows picks the CES
                # whose authentication matches the policy server's (AD CS has one per kind).
                **(
                    {soap.ClientAuthentication.KERBEROS: self.url("/ces")}
                    if self.negotiate is not None
                    else {}
                ),
                soap.ClientAuthentication.USERNAME_PASSWORD: self.url("/ces"),
                soap.ClientAuthentication.CERTIFICATE: self.url("/ces-certificate"),
            },
        )

    def _request_security_token(self, parsed: soap.SoapRequest, principal: Principal) -> bytes:
        rst = soap.parse_request_security_token(parsed)
        relates_to = parsed.message_id or ""
        if rst.request_type == "query":
            if rst.request_id is None or not _REQUEST_ID.fullmatch(rst.request_id):
                raise soap.SoapFault(
                    "Sender",
                    "wst:InvalidRequest",
                    "QueryTokenStatus needs a RequestID of 1 to 18 decimal digits",
                )
            outcome = self.service.status(principal, int(rst.request_id))
        else:
            context = RequestContext(
                template_name=_template_attribute(rst.additional_context),
                attributes=tuple(
                    (n, v) for n, v in rst.additional_context if n.lower() != "certificatetemplate"
                ),
                on_behalf_of=rst.request_format != "pkcs10",
            )
            if rst.request_format != "pkcs10" or rst.binary_security_token is None:
                # A CMS request is signed by someone: an agent on behalf of another (ESC3)
                # or a renewal wrapper. Without verified RA signatures it is refused.
                outcome = self.service.enroll_refused_on_behalf(principal, context)
            else:
                outcome = self.service.enroll(
                    principal, rst.binary_security_token, context, self._address()
                )
        if outcome.status == "pending":
            return soap.build_rstr_pending(
                relates_to=relates_to,
                request_id=str(outcome.request_id),
                reference_uri=self.url("/ces"),
                disposition_message=outcome.message,
            )
        assert outcome.certificate is not None
        return soap.build_rstr_issued(
            relates_to=relates_to,
            request_id=str(outcome.request_id),
            certificate_der=outcome.certificate.public_bytes(serialization.Encoding.DER),
            pkcs7_chain_der=soap.pkcs7_certs_only([outcome.certificate, *outcome.chain]),
        )


def _negotiate_acceptor(settings: KerberosSettings | None) -> NegotiateAcceptor | None:
    if settings is None:
        return None
    try:
        return NegotiateAcceptor(settings)
    except ImportError:
        raise ConnectorSettingsError(
            "kerberos_keytab",
            "Kerberos needs the gssapi package: pip install 'pkigate[kerberos]'",
        ) from None
    except KerberosUnavailable as exc:
        raise ConnectorSettingsError("kerberos_keytab", str(exc)) from None


def _soap_body() -> bytes:
    """The message. One over the gateway's body limit (which is not read) is a Sender
    fault like any other too-large message, not the gateway's JSON 413; one under it is
    read whole, so the client sees the fault instead of a connection closed mid-send."""
    try:
        return request.get_data(cache=False)
    except RequestEntityTooLarge:
        raise soap.SoapFault(
            "Sender", None, f"the message is larger than {soap.MAX_SOAP_BYTES} bytes"
        ) from None


def _template_attribute(context: tuple[tuple[str, str], ...] | Any) -> str | None:
    for name, value in context:
        if name.lower() == "certificatetemplate":
            return str(value)
    return None


def _csr_der(text: str) -> bytes:
    stripped = text.strip()
    if stripped.startswith("-----BEGIN"):
        try:
            return x509.load_pem_x509_csr(stripped.encode()).public_bytes(
                serialization.Encoding.DER
            )
        except ValueError as exc:
            raise EnrollmentRefused("badRequest", f"the CSR cannot be parsed: {exc}") from None
    try:
        return base64.b64decode(stripped, validate=True)
    except (binascii.Error, ValueError):
        raise EnrollmentRefused("badRequest", "the CSR is neither PEM nor base64 DER") from None


def _pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def unavailable_message(exc: Exception) -> str:
    return f"the directory is unavailable ({exc}); nothing can be enrolled until it answers"


def _unavailable(exc: Exception) -> EnrollmentRefused:
    return EnrollmentRefused("directoryUnavailable", unavailable_message(exc))


def _store_unavailable(exc: StoreUnavailableError) -> EnrollmentRefused:
    return EnrollmentRefused(STORE_UNAVAILABLE, f"temporarily unavailable: {exc.message}")


def _json_error(refusal: EnrollmentRefused) -> tuple[Response, int]:
    body: dict[str, Any] = {"error": refusal.code, "message": refusal.message}
    if refusal.attack:
        body["attack"] = refusal.attack
    status = _STATUS.get(refusal.code, 400)
    response = jsonify(body)
    if refusal.code == STORE_UNAVAILABLE:
        response.headers["Retry-After"] = str(StoreUnavailableError.retry_after_seconds)
    return response, status


# HRESULTs a Windows client shows for each refusal ([MS-WSTEP] CertificateEnrollmentWSDetail).
CERTSRV_E_TEMPLATE_DENIED = 0x80094012
CERTSRV_E_UNSUPPORTED_CERT_TYPE = 0x80094800
CERTSRV_E_KEY_LENGTH = 0x80094811
CERTSRV_E_BAD_REQUESTSUBJECT = 0x80094001
E_ACCESSDENIED = 0x80070005
E_INVALIDARG = 0x80070057
ERROR_DS_UNAVAILABLE = 0x80072009
# HRESULT_FROM_WIN32(ERROR_DISK_FULL): Windows shows "There is not enough space on the disk".
ERROR_DISK_FULL = 0x80070070
_HRESULTS = {
    "accessDenied": CERTSRV_E_TEMPLATE_DENIED,
    "autoenrollmentDisabled": CERTSRV_E_TEMPLATE_DENIED,
    "dangerousTemplate": CERTSRV_E_TEMPLATE_DENIED,
    "onBehalfOfRefused": CERTSRV_E_TEMPLATE_DENIED,
    "raSignatureRequired": CERTSRV_E_TEMPLATE_DENIED,
    "attributeRefused": CERTSRV_E_TEMPLATE_DENIED,
    "extensionRefused": CERTSRV_E_TEMPLATE_DENIED,
    "templateNotPublished": CERTSRV_E_UNSUPPORTED_CERT_TYPE,
    "unknownTemplate": CERTSRV_E_UNSUPPORTED_CERT_TYPE,
    "templateMismatch": CERTSRV_E_UNSUPPORTED_CERT_TYPE,
    "keyTooSmall": CERTSRV_E_KEY_LENGTH,
    "badKey": CERTSRV_E_KEY_LENGTH,
    "nameUnavailable": CERTSRV_E_BAD_REQUESTSUBJECT,
    "nameRefused": CERTSRV_E_BAD_REQUESTSUBJECT,
    "accountDisabled": E_ACCESSDENIED,
    "badCredentials": E_ACCESSDENIED,
    "authenticationRequired": E_ACCESSDENIED,
    "unsupportedAuthentication": E_ACCESSDENIED,
    "httpsRequired": E_ACCESSDENIED,
    "badCertificate": E_ACCESSDENIED,
    "directoryUnavailable": ERROR_DS_UNAVAILABLE,
    "kerberosUnavailable": E_ACCESSDENIED,
    "caNotPublished": ERROR_DS_UNAVAILABLE,
    STORE_UNAVAILABLE: ERROR_DISK_FULL,
}
_AUTHENTICATION_CODES = frozenset(
    {"badCredentials", "authenticationRequired", "unsupportedAuthentication", "badCertificate"}
)


def _fault_for(refusal: EnrollmentRefused, request_id: str | None = None) -> soap.SoapFault:
    """A refusal as a SOAP fault: failed authentication as WS-Security's, everything the
    CA decided as an [MS-WSTEP] enrollment fault with the HRESULT Windows shows."""
    reason = f"{refusal.code}: {refusal.message}"
    if refusal.code in _AUTHENTICATION_CODES:
        return soap.SoapFault("Sender", "wsse:FailedAuthentication", reason)
    unavailable = refusal.code in (
        "directoryUnavailable",
        "kerberosUnavailable",
        "caNotPublished",
        "keyUnavailable",
        STORE_UNAVAILABLE,
    )
    return soap.SoapFault(
        "Receiver" if unavailable else "Sender",
        None,
        reason,
        request_id=request_id,
        hresult=_HRESULTS.get(refusal.code, E_INVALIDARG),
        invalid_request=not unavailable,
    )


def _soap_fault(fault: soap.SoapFault, relates_to: str | None) -> Response:
    # Refusals are the client's to fix (400/401/403), never a 500: only an unavailable
    # directory is the server's problem, answered 503 so that clients retry later.
    if fault.code == "Receiver":
        status = 503
    elif fault.subcode == "wsse:FailedAuthentication":
        status = 401
    else:
        status = 400
    response = Response(
        soap.build_fault(fault, relates_to),
        status=status,
        content_type="application/soap+xml; charset=utf-8",
    )
    if status == 503:
        response.headers["Retry-After"] = str(StoreUnavailableError.retry_after_seconds)
    return response


__all__ = ["AdcsConnector", "DirectoryUnavailable"]
