"""A loopback webhook receiver for the notification tests: it checks each POST's
signature and keeps what it was sent."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

SECRET = "webhook-secret-for-tests"


class Receiver:
    """A loopback webhook: keeps what it is sent; ``answer`` decides each reply."""

    def __init__(self, answer: Callable[[int], int] = lambda _n: 200, delay: float = 0) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.attempts = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.attempts += 1
                number = receiver.attempts
                if delay and number == 1:
                    time.sleep(delay)  # longer than the destination's timeout
                status = answer(number)
                if status == 200:
                    receiver.received.append((dict(self.headers), body))
                payload = b"<html>" + b"x" * 5000 + b"</html>"  # never quoted whole
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except BrokenPipeError:
                    pass  # the slow attempt: pkigate gave up waiting

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def events(self) -> list[dict[str, Any]]:
        found = []
        for headers, body in self.received:
            expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
            assert hmac.compare_digest(headers["X-Pkigate-Signature"], expected)
            event = json.loads(body)
            assert headers["X-Pkigate-Event-Id"] == event["id"]
            found.append(event)
        return found
