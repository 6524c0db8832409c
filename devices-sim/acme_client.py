"""A small ACME client (RFC 8555) of our own, speaking the wire protocol over HTTP.

The device simulator's servers and the ACME tests use it to do exactly what certbot and
lego do, and also what they never do (bad signatures, replayed nonces), to check the
server's answers. It shares no code with the server but the JWS signing helpers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import requests
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pkigate.acme import jws


class AcmeClientError(Exception):
    def __init__(self, status: int, problem: Mapping[str, Any]) -> None:
        self.status = status
        self.problem = dict(problem)
        super().__init__(f"{status} {self.type}: {problem.get('detail', '')}")

    @property
    def type(self) -> str:
        return str(self.problem.get("type", "")).removeprefix("urn:ietf:params:acme:error:")


@dataclass
class AcmeResponse:
    status: int
    headers: Mapping[str, str]
    body: Any
    text: str
    links: list[tuple[str, str]] = field(default_factory=list)

    @property
    def location(self) -> str | None:
        return self.headers.get("Location")

    def link(self, rel: str) -> str | None:
        return next((url for url, r in self.links if r == rel), None)


def _links(response: requests.Response) -> list[tuple[str, str]]:
    found = []
    for value in response.raw.headers.getlist("Link") if response.raw else []:
        for part in value.split(","):
            url, _, params = part.partition(";")
            rel = params.strip().removeprefix("rel=").strip('"')
            found.append((url.strip().strip("<>"), rel))
    return found


class AcmeClient:
    def __init__(
        self,
        directory_url: str,
        account_key: jws.PrivateKey,
        session: requests.Session | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.session = session or requests.Session()
        self.session.trust_env = False
        self.timeout = timeout
        self.key = account_key
        self.directory: dict[str, Any] = self.session.get(directory_url, timeout=timeout).json()
        self.directory_url = directory_url
        self.account_url: str | None = None
        self._nonce: str | None = None

    # -- plumbing --------------------------------------------------------------------------

    @property
    def jwk(self) -> dict[str, str]:
        return jws.public_key_to_jwk(self.key.public_key())

    @property
    def thumbprint(self) -> str:
        return jws.jwk_thumbprint(self.key.public_key())

    def new_nonce(self) -> str:
        response = self.session.head(self.directory["newNonce"], timeout=self.timeout)
        return response.headers["Replay-Nonce"]

    def signed_body(
        self,
        url: str,
        payload: Any | None,
        *,
        use_jwk: bool = False,
        key: jws.PrivateKey | None = None,
        nonce: str | None = None,
        extra_header: Mapping[str, Any] | None = None,
    ) -> bytes:
        signer = key or self.key
        protected: dict[str, Any] = {"url": url, "nonce": nonce or self._take_nonce()}
        if use_jwk or self.account_url is None:
            protected["jwk"] = jws.public_key_to_jwk(signer.public_key())
        else:
            protected["kid"] = self.account_url
        protected.update(extra_header or {})
        raw = None if payload is None else json.dumps(payload).encode()
        return jws.sign(signer, protected, raw)

    def _take_nonce(self) -> str:
        nonce, self._nonce = self._nonce, None
        return nonce or self.new_nonce()

    def raw_post(
        self, url: str, body: bytes, content_type: str = "application/jose+json"
    ) -> AcmeResponse:
        response = self.session.post(
            url, data=body, headers={"Content-Type": content_type}, timeout=self.timeout
        )
        self._nonce = response.headers.get("Replay-Nonce") or self._nonce
        content = response.headers.get("Content-Type", "")
        body_value: Any = None
        if "json" in content and response.content:
            body_value = response.json()
        return AcmeResponse(
            response.status_code, response.headers, body_value, response.text, _links(response)
        )

    def post(
        self,
        url: str,
        payload: Any | None,
        *,
        use_jwk: bool = False,
        key: jws.PrivateKey | None = None,
        retries: int = 2,
    ) -> AcmeResponse:
        """POST a signed request (``payload`` None is POST-as-GET); retries on badNonce as
        RFC 8555 6.5 asks clients to, raises :class:`AcmeClientError` on a problem."""
        for attempt in range(retries + 1):
            result = self.raw_post(url, self.signed_body(url, payload, use_jwk=use_jwk, key=key))
            if result.status < 400:
                return result
            problem = result.body if isinstance(result.body, dict) else {"detail": result.text}
            error = AcmeClientError(result.status, problem)
            if error.type != "badNonce" or attempt == retries:
                raise error
        raise AssertionError("unreachable")

    # -- accounts --------------------------------------------------------------------------

    def register(
        self,
        contact: Sequence[str] = (),
        *,
        eab: tuple[str, bytes] | None = None,
        only_return_existing: bool = False,
        agree: bool = True,
    ) -> AcmeResponse:
        payload: dict[str, Any] = {"termsOfServiceAgreed": agree}
        if contact:
            payload["contact"] = list(contact)
        if only_return_existing:
            payload["onlyReturnExisting"] = True
        if eab is not None:
            kid, hmac_key = eab
            payload["externalAccountBinding"] = jws.sign_eab(
                hmac_key, kid, self.directory["newAccount"], self.jwk
            )
        result = self.post(self.directory["newAccount"], payload, use_jwk=True)
        self.account_url = result.location
        return result

    def key_change(self, new_key: jws.PrivateKey) -> AcmeResponse:
        assert self.account_url is not None
        url = self.directory["keyChange"]
        inner = jws.sign(
            new_key,
            {"url": url, "jwk": jws.public_key_to_jwk(new_key.public_key())},
            json.dumps({"account": self.account_url, "oldKey": self.jwk}).encode(),
        )
        result = self.post(url, json.loads(inner))
        self.key = new_key
        return result

    # -- orders ----------------------------------------------------------------------------

    def new_order(
        self,
        identifiers: Sequence[tuple[str, str] | str],
        *,
        profile: str | None = None,
        replaces: str | None = None,
    ) -> AcmeResponse:
        payload: dict[str, Any] = {
            "identifiers": [
                {"type": "dns", "value": i} if isinstance(i, str) else {"type": i[0], "value": i[1]}
                for i in identifiers
            ]
        }
        if profile is not None:
            payload["profile"] = profile
        if replaces is not None:
            payload["replaces"] = replaces
        return self.post(self.directory["newOrder"], payload)

    def get(self, url: str) -> AcmeResponse:
        return self.post(url, None)

    def respond(self, challenge_url: str) -> AcmeResponse:
        return self.post(challenge_url, {})

    def wait(self, url: str, until: Sequence[str], timeout: float = 30.0) -> AcmeResponse:
        """Poll an order or authorization until its status is one of ``until``.

        Polls at most every 0.2 s even when Retry-After asks for more: tests and the
        simulator want the answer as soon as it is there (real clients honour it)."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.get(url)
            if result.body["status"] in until or time.monotonic() > deadline:
                return result
            retry = float(result.headers.get("Retry-After", "0.2") or 0.2)
            time.sleep(min(max(retry, 0.05), 1.0) if retry < 1 else 0.2)

    def finalize(self, order: AcmeResponse, csr: x509.CertificateSigningRequest) -> AcmeResponse:
        der = csr.public_bytes(serialization.Encoding.DER)
        return self.post(order.body["finalize"], {"csr": jws.b64url_encode(der)})

    def certificate_chain(self, url: str) -> list[x509.Certificate]:
        result = self.get(url)
        return x509.load_pem_x509_certificates(result.text.encode())

    def revoke(
        self,
        certificate: x509.Certificate,
        reason: int | None = None,
        *,
        certificate_key: jws.PrivateKey | None = None,
    ) -> AcmeResponse:
        payload: dict[str, Any] = {
            "certificate": jws.b64url_encode(certificate.public_bytes(serialization.Encoding.DER))
        }
        if reason is not None:
            payload["reason"] = reason
        return self.post(
            self.directory["revokeCert"],
            payload,
            use_jwk=certificate_key is not None,
            key=certificate_key,
        )

    def renewal_info(self, cert_id: str) -> requests.Response:
        return self.session.get(f"{self.directory['renewalInfo']}/{cert_id}", timeout=self.timeout)
