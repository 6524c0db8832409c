"""Typed errors raised by the core.

Front-ends map these onto their protocol's errors in one place each (ACME problem
documents, SCEP failInfo, SOAP faults, JSON errors for the API). Every error carries a
stable machine-readable ``code`` and a message meant for a human operator.
"""

from __future__ import annotations


class PkigateError(Exception):
    """Base class of every error the core raises on purpose."""

    code = "internalError"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequestError(PkigateError):
    """The caller's input is malformed or inconsistent."""

    code = "badRequest"


class BadCSRError(BadRequestError):
    """The PKCS#10 request cannot be parsed, is too large, or its signature does not verify."""

    code = "badCSR"


class WeakKeyError(BadRequestError):
    """The public key is of an unsupported type, too small, or otherwise unsafe."""

    code = "badPublicKey"


class UnsupportedAlgorithmError(BadRequestError):
    """A key or signing algorithm that pkigate does not offer, or of the wrong family."""

    code = "badAlgorithm"


class InvalidValidityError(BadRequestError):
    """A validity that is malformed, in the past, or beyond what the CA or template allows."""

    code = "badValidity"


class PolicyViolationError(PkigateError):
    """The request is well formed but the CA's or template's policy forbids it."""

    code = "policyViolation"


class NotAuthorizedError(PkigateError):
    """The requester is not allowed to do this."""

    code = "unauthorized"


class NotFoundError(PkigateError):
    """A CA, certificate or template that does not exist."""

    code = "notFound"


class UnknownTemplateError(NotFoundError):
    code = "unknownTemplate"


class InvalidStateError(PkigateError):
    """The resource is in a lifecycle state that does not allow the operation."""

    code = "invalidState"


class CANotActiveError(InvalidStateError):
    code = "caNotActive"


class IdempotencyConflictError(PkigateError):
    """The same idempotency token was used earlier with different input."""

    code = "idempotencyConflict"


class InvalidCertificateError(BadRequestError):
    """A certificate that cannot be accepted: an imported CA certificate or chain, or one a
    peer sent whose names cannot be read."""

    code = "invalidCertificate"


class KeyBackendError(PkigateError):
    """The key backend cannot produce or use a CA key (wrong key-encryption key, destroyed key)."""

    code = "keyUnavailable"


class ConflictError(PkigateError):
    """The operation conflicts with the current state (already revoked, duplicate)."""

    code = "conflict"


class StoreIntegrityError(PkigateError):
    """The store is not what its audit anchor or its own integrity check says it must be
    (a lost tail, a damaged page): nothing is served from it or written to it until an
    operator has acted on the message."""

    code = "storeIntegrity"


class DataDirectoryError(PkigateError):
    """The data directory cannot be made or written (permissions, a file in its place):
    nothing was opened."""

    code = "dataDirectory"


class SchemaOutdatedError(PkigateError):
    """The store's schema is older than this pkigate's (an upgrade of pkigate, not yet of
    its database) or newer (pkigate was downgraded): nothing is read or written until an
    operator migrates it explicitly (`pkigate db upgrade`)."""

    code = "schemaOutdated"


class AnchorWriteError(PkigateError):
    """The database committed but the audit anchor could not be written: the answer is
    withheld (the anchor catches up from the store at the next write)."""

    code = "anchorWriteFailed"


class StoreUnavailableError(PkigateError):
    """The store cannot take a write now; nothing was changed, and the same request can be
    sent again later. Front-ends answer their protocol's "temporarily unavailable"."""

    code = "storeUnavailable"
    retry_after_seconds = 30


class StorageFullError(StoreUnavailableError):
    """The disk holding the store (or the data directory) is full: SQLITE_FULL, ENOSPC,
    PostgreSQL's disk_full (SQLSTATE 53100), or less free space than signing needs."""

    code = "storageFull"
