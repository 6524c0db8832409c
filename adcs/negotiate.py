"""HTTP Negotiate (RFC 4559) with Kerberos: how domain-joined Windows machines and
cepces authenticate to AD CS web enrollment ("Windows integrated authentication").

The client sends ``Authorization: Negotiate <SPNEGO token>`` holding a Kerberos AP-REQ for
``HTTP/<pkigate host>``; MIT krb5's GSSAPI checks it against the service's keytab (ticket
decrypted by our key, authenticator fresh, not replayed) and names the client
(``alice@REALM``, ``WS01$@REALM``). Each request is accepted on its own, in one leg: a
Kerberos exchange needs no more, and nothing of a half-done exchange is kept between
requests (a gateway has many workers). NTLM, inside SPNEGO or alone, is refused: it can be
relayed (ESC8).

No web framework here: :mod:`pkigate.adcs.connector` reads the header and writes the reply.
"""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("pkigate.adcs")

KERBEROS_MECH = "1.2.840.113554.1.2.2"
# Windows names Kerberos by a mistyped OID as well (RFC 4178 section 3.2 note).
KERBEROS_MECH_MICROSOFT = "1.2.840.48018.1.2.2"
NTLMSSP_SIGNATURE = b"NTLMSSP\x00"
# An AP-REQ with a ticket and a PAC is a few kilobytes; a token larger than this is refused
# before any parsing (the gateway's header limit bounds it too).
MAX_TOKEN_BYTES = 64 * 1024

# GSSAPI routine errors (RFC 2744 section 3.9.1).
_GSS_S_BAD_MECH = 1
_GSS_S_BAD_BINDINGS = 4
# Why MIT refused an AP-REQ, told by its krb5 error message: the mechglue renumbers the minor
# status of a mechanism reached through SPNEGO (100005 instead of KRB5KRB_AP_ERR_REPEAT), so
# the code says nothing stable and the com_err text (krb5_err.et) is what tells.
_OTHER_SERVICE = (
    "wrongService",
    "the Kerberos ticket is not for {service}: a ticket for another service, or one "
    "encrypted with a key this server's keytab does not hold",
)
_REASONS = (
    ("ticket expired", "ticketExpired", "the Kerberos ticket has expired; get a new one"),
    ("ticket not yet valid", "ticketNotYetValid", "the Kerberos ticket is not valid yet"),
    ("request is a replay", "replayedToken", "the Negotiate token was already used (a replay)"),
    (
        "clock skew too great",
        "clockSkew",
        "the Kerberos authenticator is outside the allowed clock skew: a stale token, or "
        "clocks that differ",
    ),
    ("cannot decrypt ticket", *_OTHER_SERVICE),
    ("wrong principal in request", *_OTHER_SERVICE),
    ("key version", *_OTHER_SERVICE),
    ("not found in keytab", *_OTHER_SERVICE),
    ("no key table entry", *_OTHER_SERVICE),
)


@dataclass(frozen=True)
class KerberosSettings:
    """How the AD-style connector accepts Kerberos."""

    keytab: Path
    """A keytab holding the key of :attr:`service_principal` (``samba-tool domain
    exportkeytab --principal HTTP/host``, or ktpass on Windows)."""
    service_principal: str
    """The only service whose tickets are accepted, ``HTTP/host`` or ``HTTP/host@REALM``
    (without a realm, the default realm of krb5.conf)."""


class NegotiateRefused(Exception):
    """A Negotiate token that names nobody: ``code`` says why, ``message`` says it to the
    client (never the token)."""

    def __init__(self, code: str, message: str, *, relayable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.relayable = relayable
        """NTLM: refused because it can be relayed (ESC8), not because it failed."""


@dataclass(frozen=True)
class NegotiateResult:
    client_principal: str
    """The authenticated Kerberos principal, ``name@REALM``."""
    reply_token: bytes | None
    """The AP-REP for mutual authentication, sent back in ``WWW-Authenticate: Negotiate``."""


class NegotiateAcceptor:
    """Accepts Negotiate tokens for one service principal, from one keytab.

    GSSAPI calls are short C calls that do not yield to gevent: a worker spends well under a
    millisecond per token (an AES decryption and a replay-cache write). The replay cache is
    MIT's file in ``KRB5RCACHEDIR``, shared by the workers of one host.
    """

    def __init__(self, settings: KerberosSettings) -> None:
        import gssapi
        import gssapi.raw

        self.settings = settings
        self._raw: Any = gssapi.raw
        self._gss_error: type[Exception] = gssapi.raw.GSSError
        self._kerberos = gssapi.OID.from_int_seq(KERBEROS_MECH)
        self._spnego = gssapi.OID.from_int_seq("1.3.6.1.5.5.2")
        self._name = gssapi.Name(settings.service_principal, gssapi.NameType.kerberos_principal)
        self.credentials()  # a missing keytab or key is a configuration error, at start

    def credentials(self) -> Any:
        """Acceptor credentials for our principal, read from the keytab (again for each
        request: a rotated keytab is used without a restart)."""
        try:
            result = self._raw.acquire_cred_from(
                {b"keytab": str(self.settings.keytab).encode()},
                name=self._name,
                mechs=[self._kerberos, self._spnego],
                usage="accept",
            )
        except self._gss_error as exc:
            raise KerberosUnavailable(
                f"no key for {self.settings.service_principal} in {self.settings.keytab}: "
                f"{_gss_message(exc)}"
            ) from None
        # SPNEGO may offer Kerberos and nothing else: no NTLM through a GSSAPI plugin.
        self._raw.set_neg_mechs(result.creds, [self._kerberos])
        return result.creds

    def accept(
        self, header_value: str, tls_server_end_point: bytes | None = None
    ) -> NegotiateResult:
        """The client named by the token in ``Authorization: Negotiate <token>``.

        ``tls_server_end_point``: our TLS certificate's hash (RFC 5929). A client that binds
        its token to the TLS channel it sees (Windows with Extended Protection, requests-gssapi
        with channel_bindings) is refused when that channel is not ours: a token relayed
        from another server's TLS session. A token without bindings is accepted (MIT's rule;
        most Linux clients send none)."""
        token = _decode(header_value)
        if token.startswith(NTLMSSP_SIGNATURE):
            raise NegotiateRefused(
                "unsupportedAuthentication",
                "NTLM is not accepted (it can be relayed, ESC8): use Kerberos",
                relayable=True,
            )
        try:
            result = self._raw.accept_sec_context(
                token,
                acceptor_creds=self.credentials(),
                channel_bindings=(
                    None
                    if tls_server_end_point is None
                    else self._raw.ChannelBindings(
                        application_data=b"tls-server-end-point:" + tls_server_end_point
                    )
                ),
            )
        except self._gss_error as exc:
            raise self._refusal(exc) from None
        if result.more_steps:
            # SPNEGO asking for another leg: the client's first choice was not Kerberos.
            raise NegotiateRefused(
                "unsupportedAuthentication",
                "Negotiate is accepted with Kerberos only, in one request; NTLM is not "
                "accepted (it can be relayed, ESC8)",
                relayable=True,
            )
        if result.mech.dotted_form not in (KERBEROS_MECH, KERBEROS_MECH_MICROSOFT):
            raise NegotiateRefused(
                "unsupportedAuthentication",
                f"Negotiate chose mechanism {result.mech.dotted_form}; only Kerberos is accepted",
                relayable=True,
            )
        client = self._raw.display_name(result.initiator_name).name.decode()
        return NegotiateResult(client, result.token or None)

    def _refusal(self, exc: Exception) -> NegotiateRefused:
        routine_error = (getattr(exc, "maj_code", 0) >> 16) & 0xFF
        if routine_error == _GSS_S_BAD_MECH:
            # SPNEGO offering NTLM (or anything else) and not Kerberos: our credentials
            # let it negotiate Kerberos only.
            return NegotiateRefused(
                "unsupportedAuthentication",
                "Negotiate offered no Kerberos mechanism; NTLM is not accepted (it can be "
                "relayed, ESC8)",
                relayable=True,
            )
        if routine_error == _GSS_S_BAD_BINDINGS:
            return NegotiateRefused(
                "channelBindingMismatch",
                "the Negotiate token is bound to another TLS channel than this server's (a "
                "relayed token, ESC8)",
                relayable=True,
            )
        said = _gss_message(exc)
        for words, code, message in _REASONS:
            if words in said.casefold():
                return NegotiateRefused(
                    code, message.format(service=self.settings.service_principal)
                )
        return NegotiateRefused("badToken", f"the Negotiate token was refused: {said}")


class KerberosUnavailable(RuntimeError):
    """The keytab cannot be read or holds no key for the service principal."""


def _decode(header_value: str) -> bytes:
    text = header_value.strip()
    if not text:
        raise NegotiateRefused("badToken", "the Negotiate header carries no token")
    if len(text) > MAX_TOKEN_BYTES * 4 // 3 + 4:
        raise NegotiateRefused("badToken", f"the Negotiate token exceeds {MAX_TOKEN_BYTES} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise NegotiateRefused("badToken", "the Negotiate token is not base64") from None


def _gss_message(exc: Exception) -> str:
    """GSSAPI's own words (major and minor status), on one line."""
    gen_message = getattr(exc, "gen_message", None)
    text = gen_message() if callable(gen_message) else str(exc)
    return " ".join(str(text).split())[:300]


def reply_header(result: NegotiateResult | None) -> str:
    """The WWW-Authenticate value of a reply: the AP-REP when there is one (RFC 4559
    section 5), else the bare scheme that asks for a token."""
    if result is None or result.reply_token is None:
        return "Negotiate"
    return "Negotiate " + base64.b64encode(result.reply_token).decode()
