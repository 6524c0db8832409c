"""The few DER encodings built by hand, where a structure is joined from parts that are
already DER (certificates, asn1crypto-encoded values): a length, and a tag around parts;
and the one walk over DER that such splicing needs (where an element starts and ends)."""

from __future__ import annotations


def encode_length(length: int) -> bytes:
    """X.690 8.1.3, definite form: one octet below 128, else 0x80 | count, then the octets."""
    if length < 0x80:
        return bytes([length])
    octets = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(octets)]) + octets


def tlv(tag: int, *parts: bytes) -> bytes:
    """A value with a single-octet ``tag`` whose contents are ``parts`` joined."""
    body = b"".join(parts)
    return bytes([tag]) + encode_length(len(body)) + body


def element(data: bytes, offset: int) -> tuple[int, int, int]:
    """(tag, content offset, end offset) of the DER element starting at ``offset``, for DER
    this process made or parsed already (no bounds checks: never for a peer's bytes)."""
    tag, length, start = data[offset], data[offset + 1], offset + 2
    if length & 0x80:
        octets = length & 0x7F
        length = int.from_bytes(data[start : start + octets], "big")
        start += octets
    return tag, start, start + length
