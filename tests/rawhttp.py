"""HTTP/1.1 framing the fuzzer sends over a raw socket: what no HTTP client library writes.

Chunked bodies with invalid or huge chunk sizes or no last chunk, a body shorter or longer
than its Content-Length, both framings at once, odd Content-Length values. Every answer
must be a 4xx (or the connection closed without one); a 5xx, or no answer within
``ANSWER_SECONDS``, is a finding.
"""

from __future__ import annotations

import random
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

ANSWER_SECONDS = 8.0


@dataclass(frozen=True)
class Answer:
    status: int | None  # None: closed without an answer
    seconds: float
    timed_out: bool


def _chunked(body: bytes) -> bytes:
    return f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"


# Each case: (name, headers to add, the bytes after the headers, close the write side).
Case = Callable[[bytes], tuple[dict[str, str], bytes, bool]]

RAW_HTTP_CASES: dict[str, Case] = {
    "chunked, valid": lambda body: ({"Transfer-Encoding": "chunked"}, _chunked(body), False),
    "Transfer-Encoding gzip, chunked": lambda body: (
        {"Transfer-Encoding": "gzip, chunked"},
        _chunked(body),
        True,
    ),
    "Transfer-Encoding identity": lambda body: (
        {"Transfer-Encoding": "identity", "Content-Length": str(len(body))},
        body,
        True,
    ),
    "Content-Length and chunked": lambda body: (
        {"Transfer-Encoding": "chunked", "Content-Length": "3"},
        _chunked(body),
        True,
    ),
    "Content-Length not a number": lambda body: ({"Content-Length": "abc"}, body, True),
    "Content-Length negative": lambda body: ({"Content-Length": "-1"}, body, True),
    "Content-Length 20 digits": lambda body: ({"Content-Length": "9" * 20}, body, True),
    "Content-Length over the body limit": lambda body: (
        {"Content-Length": str(10**9)},
        body,
        True,
    ),
    "Content-Length twice, different": lambda body: (
        {"Content-Length": f"{len(body)}\r\nContent-Length: {len(body) + 1}"},
        body,
        True,
    ),
    "body of 100 KB": lambda body: (
        {"Content-Length": str(len(body) + 100_000)},
        body + b"\0" * 100_000,
        False,
    ),
    "body longer than Content-Length": lambda body: (
        {"Content-Length": str(max(0, len(body) // 2))},
        body,
        True,
    ),
    "body shorter than Content-Length, closed": lambda body: (
        {"Content-Length": str(len(body) + 100)},
        body,
        True,
    ),
}

# What the gunicorn gthread workers of an earlier serving layer failed, each measured
# against them: an invalid chunk size or a chunk without its CRLF was a 500 with gunicorn's
# traceback (InvalidChunkSize, ChunkMissingTerminator); a chunked body cut short was
# NoMoreData's traceback; a chunk of 2^64-1 octets, or a body shorter than its
# Content-Length on a connection kept open, got no answer while a worker thread waited.
# Now each is a 400 (or a 408 at the body deadline). They run apart (tests/test_fuzz.py),
# as most of them wait out that deadline.
SERVING_LAYER_CASES: dict[str, Case] = {
    "chunked, size not hex": lambda body: (
        {"Transfer-Encoding": "chunked"},
        b"zz\r\n" + body + b"\r\n0\r\n\r\n",
        True,
    ),
    "chunked, negative size": lambda body: (
        {"Transfer-Encoding": "chunked"},
        b"-1\r\n" + body + b"\r\n0\r\n\r\n",
        True,
    ),
    "chunked, size with 0x": lambda body: (
        {"Transfer-Encoding": "chunked"},
        b"0x10\r\n" + body + b"\r\n0\r\n\r\n",
        True,
    ),
    "chunked, no CRLF after the data": lambda body: (
        {"Transfer-Encoding": "chunked"},
        f"{len(body):x}\r\n".encode() + body + b"XX0\r\n\r\n",
        True,
    ),
    "chunked, no last chunk, closed": lambda body: (
        {"Transfer-Encoding": "chunked"},
        f"{len(body):x}\r\n".encode() + body + b"\r\n",
        True,
    ),
    "chunked, size larger than the data, closed": lambda body: (
        {"Transfer-Encoding": "chunked"},
        f"{len(body) + 100:x}\r\n".encode() + body,
        True,
    ),
    "chunked, size ffffffffffffffff": lambda body: (
        {"Transfer-Encoding": "chunked"},
        b"ffffffffffffffff\r\n" + body + b"\r\n0\r\n\r\n",
        False,
    ),
    "chunked, size ffffffffffffffff, closed": lambda body: (
        {"Transfer-Encoding": "chunked"},
        b"ffffffffffffffff\r\n" + body,
        True,
    ),
    "body shorter than Content-Length, open": lambda body: (
        {"Content-Length": str(len(body) + 100)},
        body,
        False,
    ),
}


def raw_http_case(
    rng: random.Random,
    cases: dict[str, Case],
    host: str,
    port: int,
    tls: ssl.SSLContext | None,
    method: str,
    path: str,
    content_type: str,
    body: bytes,
    extra_headers: dict[str, str] | None = None,
    timeout: float = ANSWER_SECONDS,
) -> tuple[str, Answer]:
    """Send one of ``cases`` (chosen by ``rng``) and read the status line of the answer."""
    name = rng.choice(sorted(cases))
    headers, payload, close_write = cases[name](body)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Type: {content_type}"]
    lines += [f"{k}: {v}" for k, v in (extra_headers or {}).items()]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines.append("Connection: close")
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + payload
    return name, exchange(host, port, tls, request, close_write, timeout)


def exchange(
    host: str,
    port: int,
    tls: ssl.SSLContext | None,
    request: bytes,
    close_write: bool,
    timeout: float = ANSWER_SECONDS,
) -> Answer:
    began = time.monotonic()
    raw = socket.create_connection((host, port), timeout=timeout)
    sock: socket.socket = raw
    try:
        if tls is not None:
            sock = tls.wrap_socket(raw, server_hostname=host)
        try:
            sock.sendall(request)
        except (ConnectionError, ssl.SSLError):
            close_write = False  # answered (or closed) before it read it all: read what came
        if close_write:
            # A client that sent all it will send, and waits for the answer. Over TLS the
            # TCP half-close comes without close_notify (a truncated stream), which is what
            # a client that dies mid-request looks like. (The TLS socket owns the
            # descriptor now, and its own shutdown() would drop TLS for the answer.)
            with socket.fromfd(sock.fileno(), socket.AF_INET, socket.SOCK_STREAM) as same:
                same.shutdown(socket.SHUT_WR)
        received = b""
        while b"\r\n" not in received:
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                return Answer(None, time.monotonic() - began, True)
            except (ConnectionError, ssl.SSLError):
                break
            if not chunk:
                break
            received += chunk
    finally:
        sock.close()
    seconds = time.monotonic() - began
    if not received.startswith(b"HTTP/1."):
        return Answer(None, seconds, False)
    try:
        return Answer(int(received.split(b" ", 2)[1]), seconds, False)
    except (IndexError, ValueError):
        return Answer(None, seconds, False)
