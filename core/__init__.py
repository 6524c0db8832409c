"""pkigate's issuing-CA core: authorities, templates, policy, keys, store, issuance, audit.

The core never parses an enrollment protocol; front-ends hand it an
:class:`IssuanceRequest` and map its typed errors onto their protocol.
"""

from pkigate.core.audit import Actor
from pkigate.core.authorities import CASettings, CASpec, CAView
from pkigate.core.issuance import IssuanceRequest, IssuedCertificate, Requester
from pkigate.core.model import (
    CAStatus,
    CAType,
    KeyAlgorithm,
    SigningAlgorithm,
    UsageMode,
    Validity,
    ValidityType,
)
from pkigate.core.service import Core

__all__ = [
    "Actor",
    "CASettings",
    "CASpec",
    "CAStatus",
    "CAType",
    "CAView",
    "Core",
    "IssuanceRequest",
    "IssuedCertificate",
    "KeyAlgorithm",
    "Requester",
    "SigningAlgorithm",
    "UsageMode",
    "Validity",
    "ValidityType",
]
