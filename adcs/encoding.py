"""Encodings of AD attribute values: FILETIME intervals, signed 32-bit words, key usage."""

from __future__ import annotations

from datetime import timedelta

from pkigate.adcs.flags import KeyUsage

FILETIME_TICKS_PER_SECOND = 10_000_000  # FILETIME counts 100-nanosecond intervals
_INT32_SPAN = 1 << 32


class MalformedAttributeValue(ValueError):
    """An AD attribute value that does not have the encoding its attribute requires."""


def interval_to_filetime(period: timedelta) -> bytes:
    """pKIExpirationPeriod / pKIOverlapPeriod bytes for ``period``.

    [MS-CRTD] 2.11 and 2.12: an 8-byte FILETIME ([MS-DTYP] 2.3.3), little-endian, holding a
    relative time as a negative count of 100-nanosecond intervals.
    """
    ticks = (period // timedelta(microseconds=1)) * 10
    if ticks <= 0:
        raise ValueError(f"a template period must be positive, not {period}")
    return (-ticks).to_bytes(8, "little", signed=True)


def filetime_to_interval(value: bytes) -> timedelta:
    """The period that pKIExpirationPeriod or pKIOverlapPeriod bytes describe."""
    if len(value) != 8:
        raise MalformedAttributeValue(f"a FILETIME interval is 8 bytes, not {len(value)}")
    ticks = int.from_bytes(value, "little", signed=True)
    if ticks >= 0:
        raise MalformedAttributeValue("a FILETIME interval is negative; this one is not")
    return timedelta(microseconds=-ticks // 10)


def to_ad_int32(value: int) -> int:
    """An unsigned 32-bit word as AD stores and returns it: signed."""
    if not 0 <= value < _INT32_SPAN:
        raise ValueError(f"{value:#x} is not a 32-bit word")
    return value - _INT32_SPAN if value >= 1 << 31 else value


def from_ad_int32(value: int) -> int:
    """The unsigned 32-bit word behind a signed AD integer (flag words read from LDAP)."""
    if not -(1 << 31) <= value < _INT32_SPAN:
        raise MalformedAttributeValue(f"{value} is not a 32-bit integer")
    return value % _INT32_SPAN


def key_usage_to_bytes(usage: KeyUsage) -> bytes:
    """pKIKeyUsage bytes: the KeyUsage bit string's two bytes, first byte first."""
    return int(usage).to_bytes(2, "little")


def key_usage_from_bytes(value: bytes) -> KeyUsage:
    """The key usage bits in pKIKeyUsage (one byte when no second-byte bit is set)."""
    if not 1 <= len(value) <= 2:
        raise MalformedAttributeValue(f"pKIKeyUsage is 1 or 2 bytes, not {len(value)}")
    return KeyUsage(int.from_bytes(value, "little"))
