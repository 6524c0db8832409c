"""Structure-aware mutations for the protocol fuzzer (tests/fuzzing.py).

Byte flips mostly break a DER length or a JSON token, and the parser refuses the input at
once. These mutations keep the structure valid around the change, so that it reaches the
code behind the parser: a Name attribute whose string is a BIT STRING, INTEGER, NULL or
BMPString, an RDN with an attribute twice, an empty RDN, an OID of thousands of arcs, a
tag or length changed in one element with every enclosing length recomputed (or left
stale on purpose); JSON with huge integers, deep nesting, duplicate keys and values of
the wrong type; XML with elements duplicated, emptied, renamed, nested or given odd text.
Each mutation is cheap (a parse of a few kilobytes and one re-encoding) and says what it
did, so that a finding can be replayed by its seed and read by a person.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from typing import Any

from pkigate.core.der import encode_length

# -- DER ------------------------------------------------------------------------------------


@dataclass
class Node:
    """One TLV. ``children`` is set for constructed values and for primitive OCTET/BIT
    STRINGs whose contents parse as DER (certificate extensions, encapsulated content)."""

    tag: bytes
    content: bytes
    children: list[Node] | None = None
    bit_string_pad: bytes = b""  # a BIT STRING's unused-bits octet, before its children
    raw_length: bytes | None = None  # a length written as is (a mutation), else computed

    def encode(self) -> bytes:
        if self.children is not None:
            body = self.bit_string_pad + b"".join(c.encode() for c in self.children)
        else:
            body = self.content
        length = self.raw_length if self.raw_length is not None else encode_length(len(body))
        return self.tag + length + body


_MAX_DEPTH = 40


def parse_der(data: bytes) -> list[Node] | None:
    """The TLVs of ``data``, or None if it is not a sequence of definite-length TLVs."""
    try:
        nodes, end = _parse(data, 0, len(data), 0)
    except (IndexError, ValueError):
        return None
    return nodes if end == len(data) else None


def _parse(data: bytes, pos: int, end: int, depth: int) -> tuple[list[Node], int]:
    if depth > _MAX_DEPTH:
        raise ValueError("too deep")
    nodes: list[Node] = []
    while pos < end:
        tag_end = pos + 1
        if data[pos] & 0x1F == 0x1F:
            while data[tag_end] & 0x80:
                tag_end += 1
            tag_end += 1
        first = data[tag_end]
        start = tag_end + 1
        if first == 0x80:
            raise ValueError("indefinite length")
        length = first
        if first & 0x80:
            count = first & 0x7F
            if count == 0 or count > 4:
                raise ValueError("length")
            length = int.from_bytes(data[start : start + count], "big")
            start += count
        stop = start + length
        if stop > end:
            raise ValueError("truncated")
        tag = data[pos:tag_end]
        content = data[start:stop]
        node = Node(tag, content)
        if tag[0] & 0x20:
            node.children, _ = _parse(data, start, stop, depth + 1)
        elif tag in (b"\x04", b"\x03") and len(content) > 2:
            inner = content[1:] if tag == b"\x03" else content
            if inner[0] in (0x30, 0x31):
                try:
                    children, inner_end = _parse(inner, 0, len(inner), depth + 1)
                except (IndexError, ValueError):
                    children, inner_end = [], -1
                if inner_end == len(inner):
                    node.children = children
                    node.bit_string_pad = content[:1] if tag == b"\x03" else b""
        nodes.append(node)
        pos = stop
    return nodes, pos


def _all_nodes(nodes: list[Node]) -> list[tuple[Node, list[Node]]]:
    """Every node with the list that holds it (its siblings), depth first."""
    found: list[tuple[Node, list[Node]]] = []
    pending: list[list[Node]] = [nodes]
    while pending:
        siblings = pending.pop()
        for node in siblings:
            found.append((node, siblings))
            if node.children is not None:
                pending.append(node.children)
    return found


OID_CN = bytes.fromhex("0603550403")
STRING_TAGS = {0x0C, 0x13, 0x14, 0x16, 0x1A, 0x1C, 0x1E, 0x12, 0x03}
# What a Name attribute's string is swapped for: each has bitten a parser somewhere.
ODD_VALUES: tuple[tuple[str, bytes], ...] = (
    ("BIT STRING", b"\x03\x04\x00abc"),
    ("INTEGER", b"\x02\x01\x01"),
    ("empty INTEGER", b"\x02\x00"),
    ("NULL", b"\x05\x00"),
    ("BOOLEAN", b"\x01\x01\xff"),
    ("BMPString", b"\x1e\x04\x00a\x00b"),
    ("odd BMPString", b"\x1e\x03\x00a\x00"),
    ("UniversalString", b"\x1c\x04\x00\x00\x00a"),
    ("T61String", b"\x14\x03a\xffb"),
    ("bad UTF8String", b"\x0c\x02\xc3\x28"),
    ("NUL in PrintableString", b"\x13\x02a\x00"),
    ("empty UTF8String", b"\x0c\x00"),
    ("OID", b"\x06\x03\x55\x04\x03"),
    ("SEQUENCE", b"\x30\x00"),
    ("SET of a string", b"\x31\x03\x0c\x01a"),
    ("context [0]", b"\xa0\x03\x0c\x01a"),
    ("GeneralizedTime", b"\x18\x0f20260101000000Z"),
    ("high tag number", b"\x1f\x81\x00\x01a"),
)
ODD_TAGS = (
    0x00,
    0x01,
    0x02,
    0x03,
    0x04,
    0x05,
    0x06,
    0x0C,
    0x13,
    0x16,
    0x17,
    0x18,
    0x1C,
    0x1E,
    0x30,
    0x31,
    0x80,
    0xA0,
    0xA3,
    0xFF,
)
ODD_LENGTHS = (
    b"\x80",  # indefinite (forbidden in DER)
    b"\x81\x01",  # long form for a short length
    b"\x84\xff\xff\xff\xff",
    b"\x88\xff\xff\xff\xff\xff\xff\xff\xff",
    b"\x00",
    b"\xff",
)


def _huge_oid(rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        return b"\x06" + encode_length(3001) + b"\x2a" + b"\x01" * 3000  # 3,001 arcs
    return b"\x06\x0c\x2a" + b"\xff" * 10 + b"\x7f"  # an arc of 70 bits


def _attributes(nodes: list[Node]) -> list[tuple[Node, list[Node]]]:
    """AttributeTypeAndValue-like nodes (SEQUENCE { OID, value } inside a SET)."""
    found = []
    for node, _siblings in _all_nodes(nodes):
        if node.tag == b"\x31" and node.children:
            for child in node.children:
                if (
                    child.tag == b"\x30"
                    and child.children is not None
                    and len(child.children) == 2
                    and child.children[0].tag == b"\x06"
                ):
                    found.append((child, node.children))
    return found


def mutate_der(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """One structure-aware edit of DER ``data``; enclosing lengths are recomputed unless the
    edit is a length itself. Falls back to no change (said so) when ``data`` is not DER."""
    nodes = parse_der(data)
    if not nodes:
        return data, "not DER"
    names = _attributes(nodes)
    if names and rng.random() < 0.5:
        return _mutate_name(rng, nodes, names)
    everything = _all_nodes(nodes)
    node, siblings = rng.choice(everything)
    where = f"tag {node.tag.hex()} len {len(node.content)}"
    kind = rng.randrange(10)
    if kind == 0:
        tag = rng.choice(ODD_TAGS)
        node.tag = bytes([tag])
        if not tag & 0x20 and node.children is not None and tag not in (0x03, 0x04):
            node.content = node.bit_string_pad + b"".join(c.encode() for c in node.children)
            node.children = None  # the same bytes, now a primitive's contents
        what = f"tag -> {tag:02x}"
    elif kind == 1:
        node.raw_length = rng.choice(ODD_LENGTHS)
        what = f"length -> {node.raw_length.hex()}"
    elif kind == 2:
        body = (
            b"".join(c.encode() for c in node.children)
            if node.children is not None
            else node.content
        )
        delta = rng.choice((-2, -1, 1, 2, 127))
        node.raw_length = encode_length(max(0, len(body) + delta))
        what = f"length {delta:+d}"
    elif kind == 3:
        at = siblings.index(node)
        siblings.insert(at, Node(node.tag, node.content, _copy(node.children), node.bit_string_pad))
        what = "duplicated"
    elif kind == 4:
        siblings.remove(node)
        what = "removed"
    elif kind == 5:
        node.children = None
        node.content = rng.choice((b"", b"\x00", b"\xff" * 9, b"\x00" * 40))
        what = f"content -> {node.content[:4].hex()}({len(node.content)})"
    elif kind == 6:
        depth = rng.choice((2, 30, 300))
        wrapped = Node(node.tag, node.content, node.children, node.bit_string_pad)
        for _ in range(depth):
            wrapped = Node(b"\x30", b"", [wrapped])
        at = siblings.index(node)
        siblings[at] = wrapped
        what = f"nested {depth} SEQUENCEs deep"
    elif kind == 7 and len(siblings) > 1:
        i, j = rng.sample(range(len(siblings)), 2)
        siblings[i], siblings[j] = siblings[j], siblings[i]
        what = f"swapped with sibling {j}"
    elif kind == 8:
        node.children = None
        node.content = node.content * rng.choice((2, 50)) if node.content else b"\x01" * 70_000
        what = f"content repeated to {len(node.content)}"
    else:
        at = siblings.index(node)
        siblings.insert(at + 1, _raw(_huge_oid(rng)))
        what = "huge OID inserted"
    return b"".join(n.encode() for n in nodes), f"der {where}: {what}"


def _mutate_name(
    rng: random.Random, nodes: list[Node], names: list[tuple[Node, list[Node]]]
) -> tuple[bytes, str]:
    attribute, rdn = rng.choice(names)
    assert attribute.children is not None
    kind = rng.randrange(6)
    if kind <= 1:
        label, value = rng.choice(ODD_VALUES)
        attribute.children[1] = _raw(value)
        what = f"value -> {label}"
    elif kind == 2:
        rdn.append(Node(attribute.tag, attribute.content, _copy(attribute.children)))
        what = "attribute twice in its RDN"
    elif kind == 3:
        rdn.clear()
        what = "empty RDN"
    elif kind == 4:
        attribute.children[0] = _raw(_huge_oid(rng))
        what = "huge attribute OID"
    else:
        attribute.children[1] = _raw(b"\x0c" + encode_length(70_000) + b"a" * 70_000)
        what = "value of 70,000 characters"
    return b"".join(n.encode() for n in nodes), f"der name: {what}"


def _raw(encoded: bytes) -> Node:
    """A node that encodes to exactly ``encoded`` (a whole TLV)."""
    parsed = parse_der(encoded)
    if parsed and len(parsed) == 1:
        return parsed[0]
    tag_len = 1 if encoded[0] & 0x1F != 0x1F else 3
    header = encoded[: tag_len + 1]
    return Node(header[:tag_len], encoded[tag_len + 1 :], raw_length=header[tag_len:])


def _copy(children: list[Node] | None) -> list[Node] | None:
    if children is None:
        return None
    return [
        Node(c.tag, c.content, _copy(c.children), c.bit_string_pad, c.raw_length) for c in children
    ]


def cn_attribute(rng: random.Random) -> tuple[bytes, str]:
    """An AttributeTypeAndValue for the common name with an odd value (for subjects built
    from scratch)."""
    label, value = rng.choice(ODD_VALUES)
    body = OID_CN + value
    return b"\x30" + encode_length(len(body)) + body, label


# -- JSON -----------------------------------------------------------------------------------

HUGE_INT = "1" + "0" * 100_000


def mutate_json_text(rng: random.Random, value: Any) -> tuple[bytes, str]:
    """JSON text that Python's encoder would not write: a huge integer or exponent, a key
    twice, nesting deeper than a parser's limit, or a value of another type (as text)."""
    text = json.dumps(value)
    spots = [m.start() for m in re.finditer(r'(?<=[:\[,] )"[^"]*"|(?<=[:\[,] )-?\d+', text)]
    kind = rng.randrange(6)
    if not spots:
        return text.encode(), "json (nothing to change)"
    at = rng.choice(spots)
    token = re.match(r'"(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?', text[at:])
    end = at + (token.end() if token else 1)
    if kind == 0:
        replacement, what = rng.choice(
            (
                (HUGE_INT, "integer of 100,001 digits"),
                ("-" + HUGE_INT[:5000], "integer of 5,000 digits"),
                ("1e999999", "exponent overflow"),
                ("1.0e-999999", "exponent underflow"),
                ("0." + "0" * 50_000 + "1", "float of 50,000 digits"),
                ("NaN", "NaN"),
                ("-Infinity", "-Infinity"),
            )
        )
    elif kind == 1:
        depth = rng.choice((100, 2000, 100_000))
        replacement, what = "[" * depth + "]" * depth, f"arrays {depth} deep"
    elif kind == 2:
        depth = rng.choice((100, 50_000))
        replacement, what = '{"a":' * depth + "1" + "}" * depth, f"objects {depth} deep"
    elif kind == 3:
        replacement, what = rng.choice(
            (
                ("true", "bool"),
                ("{}", "object"),
                ('["x"]', "array"),
                ("null", "null"),
                ('"\\ud800"', "lone surrogate"),
                ('"\\u0000"', "NUL"),
                ("-0", "-0"),
                ("1.5", "float"),
                ('"' + "\\\\" * 30_000 + '"', "60,000 backslashes"),
            )
        )
    elif kind == 4 and text.startswith("{") and len(text) > 2:
        key = rng.choice(list(value)) if isinstance(value, dict) and value else "x"
        duplicate = f"{json.dumps(key)}: {json.dumps(rng.choice((0, 'x', None, [])))}, "
        return ("{" + duplicate + text[1:]).encode(), f"json key {key!r} twice"
    else:
        cut = rng.randrange(len(text))
        return text[:cut].encode(), f"json cut at {cut}"
    return (text[:at] + replacement + text[end:]).encode(), f"json {what} at {at}"


# -- XML ------------------------------------------------------------------------------------

_ELEMENT = re.compile(rb"<([A-Za-z_][\w.-]*:)?([A-Za-z_][\w.-]*)(?:\s[^<>]*)?>(?:[^<]*)</\1?\2>")
_TEXT = re.compile(rb">([^<>]+)<")


def mutate_xml(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """One structural edit of an XML document: a leaf element duplicated, emptied, removed,
    renamed or nested deeply, its text replaced by something odd, or a namespace broken."""
    leaves = list(_ELEMENT.finditer(data))
    kind = rng.randrange(7)
    if kind == 0 and leaves:
        m = rng.choice(leaves)
        count = rng.choice((2, 1000))
        return data[: m.end()] + m.group(0) * (count - 1) + data[m.end() :], (
            f"xml <{m.group(2).decode()}> x{count}"
        )
    if kind == 1 and leaves:
        m = rng.choice(leaves)
        return data[: m.start()] + data[m.end() :], f"xml <{m.group(2).decode()}> removed"
    if kind == 2 and leaves:
        m = rng.choice(leaves)
        open_end = data.index(b">", m.start()) + 1
        close_start = data.rindex(b"</", m.start(), m.end())
        return data[:open_end] + data[close_start:], f"xml <{m.group(2).decode()}> emptied"
    if kind == 3 and leaves:
        m = rng.choice(leaves)
        depth = rng.choice((50, 5000))
        wrapped = b"<x>" * depth + m.group(0) + b"</x>" * depth
        return data[: m.start()] + wrapped + data[m.end() :], (
            f"xml <{m.group(2).decode()}> {depth} deep"
        )
    texts = list(_TEXT.finditer(data))
    if kind in (4, 5) and texts:
        m = rng.choice(texts)
        odd = rng.choice(
            (
                b"",
                b"&#0;",
                b"&#xD800;",
                b"-1",
                b"99999999999999999999999999",
                b"AAAA" * 20_000,
                b"!!not base64!!",
                b"=",
                b"&undefined;",
                b"<![CDATA[x]]>",
                "\u202e".encode(),
            )
        )
        return data[: m.start(1)] + odd + data[m.end(1) :], f"xml text -> {odd[:16]!r}"
    namespaces = [m.start() for m in re.finditer(rb'xmlns(:\w+)?="', data)]
    if namespaces:
        at = rng.choice(namespaces)
        quote_at = data.index(b'"', at) + 1
        return data[:quote_at] + b"urn:wrong:" + data[quote_at:], "xml namespace changed"
    return data, "xml (nothing to change)"


# -- signed DER (CSRs, certificates) ---------------------------------------------------------


def mutate_signed(rng: random.Random, der: bytes, key: Any) -> tuple[bytes, str]:
    """A CSR or certificate (SEQUENCE { toBeSigned, algorithm, signature }) whose
    toBeSigned part is mutated by :func:`mutate_der` and signed again with ``key``, so that
    the mutation gets past the signature check to whatever reads the names inside."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

    nodes = parse_der(der)
    if not nodes or nodes[0].children is None or len(nodes[0].children) != 3:
        return der, "not a signed structure"
    tbs, algorithm, _ = nodes[0].children
    mutated, what = mutate_der(rng, tbs.encode())
    if isinstance(key, rsa.RSAPrivateKey):
        signature = key.sign(mutated, padding.PKCS1v15(), hashes.SHA256())
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        signature = key.sign(mutated, ec.ECDSA(hashes.SHA256()))
    else:
        raise TypeError(f"cannot sign with {type(key).__name__}")
    body = mutated + algorithm.encode() + b"\x03" + encode_length(len(signature) + 1)
    body += b"\x00" + signature
    return b"\x30" + encode_length(len(body)) + body, f"signed {what}"
