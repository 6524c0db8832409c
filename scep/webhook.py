"""Challenge validation by a webhook, and outcome notifications (the flow Intune uses).

On a PKCSReq the connector POSTs the request to the MDM's validation URL, which answers
allow or deny; after the outcome it notifies the MDM (success with the certificate's serial,
SHA-1 thumbprint, expiry and issuer, or failure) from a background job with retries, so a
slow or failing notifier never delays the SCEP reply.
"""

from __future__ import annotations

import base64
import logging
import urllib.parse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import requests

log = logging.getLogger("pkigate.scep")

NOTIFY_JOB = "scep.webhook.notify"
"""The job kind (the gateway prefixes it with the connector's name)."""
NOTIFY_MAX_ATTEMPTS = 8
NOTIFY_TIMEOUT_SECONDS = 10.0
"""Notifications are sent in the background: they may wait longer than a validation."""
MAX_REASON_CHARS = 200


class WebhookUnavailable(Exception):
    """The webhook could not be asked or gave no usable answer (not the client's fault)."""


def check_url(value: str) -> str | None:
    """Why ``value`` is not a usable webhook URL (http or https with a host), or None."""
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return "must be an http:// or https:// URL with a host"
    return None


@dataclass(frozen=True)
class Webhook:
    """A connector's validation and notification endpoints."""

    url: str
    notify_url: str
    secret: str | None
    timeout_seconds: float

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "User-Agent": "pkigate-scep"}
        if self.secret is not None:
            headers["Authorization"] = f"Bearer {self.secret}"
        return headers

    def _post(self, url: str, body: dict[str, Any], timeout: float) -> requests.Response:
        # Imported by the first call, not with the connector: requests and urllib3 are
        # ~3.4 MiB in every server process, and most SCEP connectors have no webhook.
        import requests

        return requests.post(
            url, json=body, headers=self._headers(), timeout=timeout, allow_redirects=False
        )

    def validate(
        self,
        *,
        transaction_id: str,
        csr_der: bytes,
        challenge: str,
        client_address: str,
        connector: str,
    ) -> str | None:
        """Ask the webhook: None when it allows the request, the reason when it denies it.
        Raises :class:`WebhookUnavailable` on a timeout, a connection error, a non-2xx
        status or an answer that is not ``{"allow": true|false}``."""
        import requests

        body = {
            "transaction_id": transaction_id,
            "csr": base64.b64encode(csr_der).decode("ascii"),
            "challenge": challenge,
            "caller": {"client_address": client_address, "connector": connector},
        }
        try:
            response = self._post(self.url, body, self.timeout_seconds)
        except requests.Timeout:
            raise WebhookUnavailable(
                f"the validation webhook did not answer within {self.timeout_seconds:g} s"
            ) from None
        except requests.RequestException as exc:
            raise WebhookUnavailable(
                f"the validation webhook cannot be reached ({type(exc).__name__})"
            ) from None
        with response:
            if not 200 <= response.status_code < 300:
                raise WebhookUnavailable(
                    f"the validation webhook answered HTTP {response.status_code}"
                )
            try:
                answer = response.json()
            except ValueError:
                answer = None
        if not isinstance(answer, dict) or not isinstance(answer.get("allow"), bool):
            raise WebhookUnavailable('the validation webhook did not answer {"allow": ...}')
        if answer["allow"]:
            return None
        reason = answer.get("reason")
        if not isinstance(reason, str) or not reason.strip():
            return "denied by the validation webhook"
        return f"denied by the validation webhook: {reason.strip()[:MAX_REASON_CHARS]}"

    def notify(self, payload: dict[str, Any]) -> None:
        """Deliver one notification; raises (so the job is retried) unless answered 2xx."""
        response = self._post(
            self.notify_url, payload, max(self.timeout_seconds, NOTIFY_TIMEOUT_SECONDS)
        )
        with response:
            if not 200 <= response.status_code < 300:
                raise RuntimeError(f"the notification webhook answered HTTP {response.status_code}")
