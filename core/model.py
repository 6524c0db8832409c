"""Value types shared across the core: algorithms, CA states, validity."""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import TypeVar

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from pkigate.core.errors import InvalidValidityError, UnsupportedAlgorithmError

# The private-key types a CA may have (KeyAlgorithm's families).
CAPrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class KeyAlgorithm(StrEnum):
    RSA_2048 = "RSA_2048"
    RSA_3072 = "RSA_3072"
    RSA_4096 = "RSA_4096"
    EC_prime256v1 = "EC_prime256v1"
    EC_secp384r1 = "EC_secp384r1"
    EC_secp521r1 = "EC_secp521r1"

    @property
    def family(self) -> str:
        return "RSA" if self.value.startswith("RSA") else "EC"

    def generate(self) -> CAPrivateKey:
        if self.family == "RSA":
            return rsa.generate_private_key(public_exponent=65537, key_size=int(self.value[4:]))
        return ec.generate_private_key(_CURVES[self]())

    @classmethod
    def of_key(cls, key: PublicKeyTypes | CAPrivateKey) -> KeyAlgorithm:
        if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
            name = f"RSA_{key.key_size}"
        elif isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
            name = {v().name: k for k, v in _CURVES.items()}.get(key.curve.name, "")
        else:
            name = ""
        try:
            return cls(name)
        except ValueError:
            raise UnsupportedAlgorithmError(
                f"CA keys must be one of {', '.join(cls)}; got {type(key).__name__}"
            ) from None


_CURVES: dict[KeyAlgorithm, type[ec.EllipticCurve]] = {
    KeyAlgorithm.EC_prime256v1: ec.SECP256R1,
    KeyAlgorithm.EC_secp384r1: ec.SECP384R1,
    KeyAlgorithm.EC_secp521r1: ec.SECP521R1,
}


class SigningAlgorithm(StrEnum):
    SHA256WITHRSA = "SHA256WITHRSA"
    SHA384WITHRSA = "SHA384WITHRSA"
    SHA512WITHRSA = "SHA512WITHRSA"
    SHA256WITHECDSA = "SHA256WITHECDSA"
    SHA384WITHECDSA = "SHA384WITHECDSA"
    SHA512WITHECDSA = "SHA512WITHECDSA"

    @property
    def family(self) -> str:
        return "RSA" if self.value.endswith("RSA") else "EC"

    def hash_algorithm(self) -> hashes.SHA256 | hashes.SHA384 | hashes.SHA512:
        if self.value.startswith("SHA512"):
            return hashes.SHA512()
        if self.value.startswith("SHA384"):
            return hashes.SHA384()
        return hashes.SHA256()

    def check_key(self, key_algorithm: KeyAlgorithm) -> None:
        """Refuse a signing algorithm whose family does not match the CA key."""
        if self.family != key_algorithm.family:
            raise UnsupportedAlgorithmError(
                f"signing algorithm {self.value} cannot be used with a {key_algorithm.value} key"
            )

    @classmethod
    def default_for(cls, key_algorithm: KeyAlgorithm) -> SigningAlgorithm:
        return {
            KeyAlgorithm.EC_secp384r1: cls.SHA384WITHECDSA,
            KeyAlgorithm.EC_secp521r1: cls.SHA512WITHECDSA,
        }.get(
            key_algorithm,
            cls.SHA256WITHRSA if key_algorithm.family == "RSA" else cls.SHA256WITHECDSA,
        )


E = TypeVar("E", bound=StrEnum)


def parse_enum(enum: type[E], value: str, what: str) -> E:
    """Parse a user-supplied enum value with an error that lists the allowed ones."""
    try:
        return enum(value)
    except ValueError:
        allowed = ", ".join(m.value for m in enum)
        raise UnsupportedAlgorithmError(
            f"unknown {what} {value!r}; expected one of {allowed}"
        ) from None


class CAType(StrEnum):
    ROOT = "ROOT"
    SUBORDINATE = "SUBORDINATE"


class CAStatus(StrEnum):
    CREATING = "CREATING"
    PENDING_CERTIFICATE = "PENDING_CERTIFICATE"
    ACTIVE = "ACTIVE"
    DISABLED = "DISABLED"
    EXPIRED = "EXPIRED"
    FAILED = "FAILED"
    DELETED = "DELETED"


class UsageMode(StrEnum):
    GENERAL_PURPOSE = "GENERAL_PURPOSE"
    SHORT_LIVED_CERTIFICATE = "SHORT_LIVED_CERTIFICATE"


SHORT_LIVED_MAX = timedelta(days=7)


class CertificateStatus(StrEnum):
    ISSUED = "ISSUED"
    REVOKED = "REVOKED"


class RevocationReason(StrEnum):
    """RFC 5280 section 5.3.1 reasons that an operator may choose."""

    unspecified = "unspecified"
    keyCompromise = "keyCompromise"
    cACompromise = "cACompromise"
    affiliationChanged = "affiliationChanged"
    superseded = "superseded"
    cessationOfOperation = "cessationOfOperation"
    privilegeWithdrawn = "privilegeWithdrawn"
    aACompromise = "aACompromise"


class ValidityType(StrEnum):
    DAYS = "DAYS"
    MONTHS = "MONTHS"
    YEARS = "YEARS"
    END_DATE = "END_DATE"
    ABSOLUTE = "ABSOLUTE"


def _add_months(moment: datetime, months: int) -> datetime:
    month_index = moment.month - 1 + months
    year, month = moment.year + month_index // 12, month_index % 12 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


_LONGEST = {ValidityType.DAYS: 100 * 366, ValidityType.MONTHS: 1200, ValidityType.YEARS: 100}
_SHORTHAND = re.compile(r"^(\d+)\s*([dmyDMY]|days?|months?|years?)$")


@dataclass(frozen=True)
class Validity:
    """A requested certificate lifetime, as the managed service expresses it.

    ``DAYS``/``MONTHS``/``YEARS`` count from the time of issuance; ``END_DATE`` is a
    timestamp ``YYYYMMDDHHMMSS`` (UTC) and ``ABSOLUTE`` seconds since the Unix epoch, both
    naming notAfter directly.
    """

    type: ValidityType
    value: int

    def __post_init__(self) -> None:
        if self.value <= 0:
            raise InvalidValidityError(f"validity value must be positive, got {self.value}")
        longest = _LONGEST.get(self.type)
        if longest is not None and self.value > longest:
            raise InvalidValidityError(
                f"validity of {self.value} {self.type.value} is too long (at most 100 years)"
            )
        if self.type == ValidityType.END_DATE:
            self._end_date()

    def _end_date(self) -> datetime:
        try:
            return datetime.strptime(str(self.value), "%Y%m%d%H%M%S").replace(tzinfo=UTC)
        except ValueError:
            raise InvalidValidityError(
                f"END_DATE must be YYYYMMDDHHMMSS, got {self.value}"
            ) from None

    def not_after(self, issued_at: datetime) -> datetime:
        try:
            return self._not_after(issued_at)
        except (OverflowError, OSError, ValueError):
            raise InvalidValidityError(
                f"validity {self.type.value}:{self.value} ends out of range"
            ) from None

    def _not_after(self, issued_at: datetime) -> datetime:
        if self.type == ValidityType.DAYS:
            return issued_at + timedelta(days=self.value)
        if self.type == ValidityType.MONTHS:
            return _add_months(issued_at, self.value)
        if self.type == ValidityType.YEARS:
            return _add_months(issued_at, 12 * self.value)
        if self.type == ValidityType.END_DATE:
            return self._end_date()
        return datetime.fromtimestamp(self.value, tz=UTC)

    @classmethod
    def parse(cls, text: str) -> Validity:
        """Parse ``30d``, ``6m``, ``10y``, ``DAYS:30``, ``END_DATE:20301231235959``."""
        text = text.strip()
        if ":" in text:
            kind, _, value = text.partition(":")
            try:
                return cls(ValidityType(kind.strip().upper()), int(value))
            except ValueError:
                raise InvalidValidityError(f"cannot parse validity {text!r}") from None
        match = _SHORTHAND.match(text)
        if not match:
            raise InvalidValidityError(
                f"cannot parse validity {text!r}; use e.g. 30d, 6m, 10y or DAYS:30"
            )
        unit = match.group(2)[0].lower()
        kind = {"d": ValidityType.DAYS, "m": ValidityType.MONTHS, "y": ValidityType.YEARS}[unit]
        return cls(kind, int(match.group(1)))

    def to_json(self) -> dict[str, object]:
        return {"type": self.type.value, "value": self.value}
