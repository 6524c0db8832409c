"""A small client of the management API, for `pkigate --server URL --token ...`.

Each method is one route of :mod:`pkigate.gateways.api` and returns its JSON as the API
sends it, so that the CLI prints the same fields whether it works on a local data
directory or on a server. Errors come back as :class:`RemoteError`, a ``PkigateError``
carrying the server's error code, so the CLI reports them like local ones.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from pkigate.core.errors import PkigateError
from pkigate.gateways.openapi import API_PREFIX

DEFAULT_TIMEOUT_S = 60.0


class RemoteError(PkigateError):
    """The server refused the call, or could not be reached."""

    def __init__(self, message: str, code: str = "remoteError", status: int | None = None):
        super().__init__(message)
        self.code = code
        self.status = status


def _segment(value: str) -> str:
    return quote(value, safe="")


class RemoteClient:
    def __init__(
        self,
        server: str,
        token: str | None,
        ca_bundle: Path | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        server = server.rstrip("/")
        self.server = server
        self.base = server if server.endswith(API_PREFIX) else server + API_PREFIX
        self._token = token
        self._timeout = timeout
        self._session = requests.Session()
        # The operator's bundle (a private root) when given, else the system's trust store.
        # Passed with each request: requests lets REQUESTS_CA_BUNDLE override session.verify.
        self._verify: str | bool = str(ca_bundle) if ca_bundle else True

    # -- transport --------------------------------------------------------------------------

    def call(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | list[tuple[str, Any]] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> requests.Response:
        if not self._token:
            raise RemoteError("a token is required with --server (--token or PKIGATE_TOKEN)")
        headers = {"Authorization": f"Bearer {self._token}", "Accept": "application/json"}
        try:
            response = self._session.request(
                method,
                self.base + path,
                params=params,
                json=body,
                headers=headers,
                timeout=self._timeout,
                verify=self._verify,
            )
        except requests.exceptions.SSLError as exc:
            raise RemoteError(
                f"TLS with {self.server} failed ({_reason(exc)}); give the server's root "
                "certificate with --ca-bundle",
                "tlsError",
            ) from None
        except requests.exceptions.RequestException as exc:
            raise RemoteError(
                f"cannot reach {self.server}: {_reason(exc)}", "unreachable"
            ) from None
        if response.status_code >= 400:
            raise _error(response)
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.call(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise RemoteError(
                f"{method} {path}: the server sent {response.headers.get('Content-Type')}, "
                "not JSON",
                "badResponse",
                response.status_code,
            ) from None

    # -- CAs --------------------------------------------------------------------------------

    def create_ca(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self.json("POST", "/cas", body=body))

    def list_cas(self, status: str | None = None) -> list[dict[str, Any]]:
        data = self.json("GET", "/cas", params={"status": status} if status else None)
        return list(data["cas"])

    def describe_ca(self, ca_id: str) -> dict[str, Any]:
        return dict(self.json("GET", f"/cas/{_segment(ca_id)}"))

    def ca_csr(self, ca_id: str) -> str:
        return str(self.json("GET", f"/cas/{_segment(ca_id)}/csr")["csr_pem"])

    def import_ca_certificate(
        self, ca_id: str, certificate_pem: str, chain_pem: str | None
    ) -> dict[str, Any]:
        body = {"certificate_pem": certificate_pem}
        if chain_pem:
            body["chain_pem"] = chain_pem
        return dict(self.json("POST", f"/cas/{_segment(ca_id)}/certificate", body=body))

    def import_token_key_ca(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self.json("POST", "/cas/import-token-key", body=body))

    def ca_certificate(self, ca_id: str) -> dict[str, str]:
        return dict(self.json("GET", f"/cas/{_segment(ca_id)}/certificate"))

    def update_ca(self, ca_id: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self.json("PATCH", f"/cas/{_segment(ca_id)}", body=body))

    def delete_ca(self, ca_id: str, restore_days: int) -> dict[str, Any]:
        params = {"restore_days": restore_days}
        return dict(self.json("DELETE", f"/cas/{_segment(ca_id)}", params=params))

    def restore_ca(self, ca_id: str) -> dict[str, Any]:
        return dict(self.json("POST", f"/cas/{_segment(ca_id)}/restore"))

    def tags(self, ca_id: str) -> dict[str, str]:
        return dict(self.json("GET", f"/cas/{_segment(ca_id)}/tags")["tags"])

    def set_tags(self, ca_id: str, tags: Mapping[str, str]) -> dict[str, str]:
        data = self.json("PUT", f"/cas/{_segment(ca_id)}/tags", body={"tags": dict(tags)})
        return dict(data["tags"])

    def remove_tags(self, ca_id: str, keys: list[str]) -> dict[str, str]:
        params = [("key", key) for key in keys]
        return dict(self.json("DELETE", f"/cas/{_segment(ca_id)}/tags", params=params)["tags"])

    # -- certificates -----------------------------------------------------------------------

    def issue(self, ca_id: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self.json("POST", f"/cas/{_segment(ca_id)}/certificates", body=body))

    def certificate(self, ca_id: str, serial: str) -> dict[str, Any]:
        path = f"/cas/{_segment(ca_id)}/certificates/{_segment(serial)}"
        return dict(self.json("GET", path))

    def revoke(self, ca_id: str, serial: str, reason: str) -> dict[str, Any]:
        path = f"/cas/{_segment(ca_id)}/certificates/{_segment(serial)}/revoke"
        return dict(self.json("POST", path, body={"reason": reason}))

    def certificates(
        self, ca_id: str, filters: Mapping[str, Any], page_size: int = 1000
    ) -> Iterator[dict[str, Any]]:
        """Every certificate matching ``filters``, following the pages."""
        params = {k: v for k, v in filters.items() if v is not None}
        cursor: str | None = None
        while True:
            page_params = {**params, "limit": page_size}
            if cursor:
                page_params["cursor"] = cursor
            page = self.json("GET", f"/cas/{_segment(ca_id)}/certificates", params=page_params)
            yield from page["certificates"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    # -- templates, audit, tokens -----------------------------------------------------------

    def templates(self) -> list[dict[str, Any]]:
        return list(self.json("GET", "/templates")["templates"])

    def events(self, query: Mapping[str, Any]) -> dict[str, Any]:
        params = {k: v for k, v in query.items() if v is not None}
        return dict(self.json("GET", "/events", params=params))

    def verify_audit(self) -> dict[str, Any]:
        return dict(self.json("GET", "/audit/verify"))

    def audit_events(self, filters: dict[str, Any], limit: int) -> list[dict[str, Any]]:
        params = {k: v for k, v in filters.items() if v} | {"limit": limit}
        return list(self.json("GET", "/audit/events", params=params)["events"])

    def audit_report_rows(self, ca_id: str) -> list[dict[str, str | None]]:
        data = self.json("GET", "/audit/report", params={"ca": ca_id, "format": "json"})
        return list(data["certificates"])

    def audit_report_csv(self, ca_id: str) -> str:
        return self.call("GET", "/audit/report", params={"ca": ca_id, "format": "csv"}).text

    def create_token(
        self,
        name: str,
        roles: list[str],
        expires_in: str | None,
        allow_from: list[str],
        team: str | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"name": name, "roles": roles}
        if expires_in:
            body["expires_in"] = expires_in
        if allow_from:
            body["allow_from"] = allow_from
        if team:
            body["team"] = team
        return dict(self.json("POST", "/tokens", body=body))

    def rotate_token(self, token_id: str, overlap: str) -> dict[str, Any]:
        return dict(
            self.json("POST", f"/tokens/{_segment(token_id)}/rotate", body={"overlap": overlap})
        )

    def update_token(self, token_id: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self.json("PATCH", f"/tokens/{_segment(token_id)}", body=body))

    def create_team(self, name: str) -> dict[str, Any]:
        return dict(self.json("POST", "/teams", body={"name": name}))

    def teams(self) -> list[dict[str, Any]]:
        return list(self.json("GET", "/teams")["teams"])

    def delete_team(self, name: str) -> dict[str, Any]:
        return dict(self.json("DELETE", f"/teams/{_segment(name)}"))

    def ca_policy(self, ca_id: str) -> dict[str, Any]:
        return dict(self.json("GET", f"/cas/{_segment(ca_id)}/policy"))

    def set_ca_policy(self, ca_id: str, document: Any, replaces: int) -> dict[str, Any]:
        body = {"document": document, "replaces": replaces}
        return dict(self.json("PUT", f"/cas/{_segment(ca_id)}/policy", body=body))

    def ca_policy_history(self, ca_id: str) -> list[dict[str, Any]]:
        return list(self.json("GET", f"/cas/{_segment(ca_id)}/policy/history")["versions"])

    def list_tokens(self) -> list[dict[str, Any]]:
        return list(self.json("GET", "/tokens")["tokens"])

    def revoke_token(self, token_id: str) -> dict[str, Any]:
        return dict(self.json("DELETE", f"/tokens/{_segment(token_id)}"))

    # -- SCEP pending requests ----------------------------------------------------------------

    def scep_pending(self, connector: str) -> list[dict[str, Any]]:
        return list(self.json("GET", f"/connectors/{_segment(connector)}/pending"))

    def scep_approve(self, connector: str, transaction_id: str) -> dict[str, Any]:
        path = f"/connectors/{_segment(connector)}/pending/{_segment(transaction_id)}/approve"
        return dict(self.json("POST", path))

    def scep_reject(self, connector: str, transaction_id: str, reason: str) -> dict[str, Any]:
        path = f"/connectors/{_segment(connector)}/pending/{_segment(transaction_id)}/reject"
        return dict(self.json("POST", path, body={"reason": reason}))


def _reason(exc: requests.exceptions.RequestException) -> str:
    """The useful end of urllib3's nested message ("Connection refused", "certificate
    verify failed: unable to get local issuer certificate")."""
    text = str(exc)
    for pattern in (r"certificate verify failed: [^(')\]\"]+", r"\[Errno -?\d+\] [^(')\]\"]+"):
        match = re.search(pattern, text)
        if match:
            return match.group(0).strip()
    return type(exc).__name__ if isinstance(exc, requests.exceptions.Timeout) else text[:200]


def _error(response: requests.Response) -> RemoteError:
    try:
        error = response.json()["error"]
        return RemoteError(str(error["message"]), str(error["code"]), response.status_code)
    except (ValueError, KeyError, TypeError):
        text = response.text.strip().splitlines()[0][:200] if response.text.strip() else ""
        return RemoteError(
            f"HTTP {response.status_code} from {response.url}: {text}".rstrip(": "),
            "httpError",
            response.status_code,
        )
