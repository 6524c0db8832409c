"""The HTTP layer under pkigate's two WSGI apps: one gunicorn arbiter, gevent workers.

Why this server (measured with ``bench/slow_clients.py``, figures in DESIGN.md): with
gunicorn's sync or gthread workers every open request holds a thread from its first byte,
so a few dozen slowloris connections (a request line, then a header every few seconds)
stopped OCSP, CRLs and SCEP for everybody. A gevent worker holds each connection in a
greenlet: a slow client costs a few kilobytes and a timer, never a worker. granian (Rust)
holds slow headers just as well, but reads request bodies from a blocking thread with no
deadline and does not hand the TLS client certificate to a WSGI app, which AD-style
renewal by certificate needs. Here:

* One arbiter binds both listeners; each worker serves both (plain HTTP for CA
  certificates, CRLs, OCSP and SCEP; TLS for ACME, AD-style enrollment and the API) from
  one :class:`~pkigate.gateways.runtime.Gateway`, so a worker opens the core once. TLS is
  set up here for the HTTPS socket only (gunicorn's own TLS settings would wrap every
  listener of an arbiter).
* Deadlines: a TLS handshake and a request's line and headers must arrive within
  ``header_timeout_seconds`` (also the idle keep-alive limit), a body within
  ``body_timeout_seconds``; a connection serves at most ``keepalive_requests`` requests;
  a worker holds at most ``max_connections`` connections per listener.
* A request body is read completely (up to ``max_body_bytes``, under its deadline) before
  the app runs, so a slow or broken upload never reaches the app: a malformed chunked
  body or one shorter than its Content-Length is answered 400, a late one 408, both with
  ``Connection: close`` and in the terms of the protocol mounted at the path (an RFC 8555
  problem under an ACME mount; ``Gateway.refusal_body``). A body over the limit is handed
  on cut at the limit (the app answers 413 in its protocol's own format) and the
  connection is closed after the answer.
* The arbiter (monkey-patched from its first line, arbiter.py) imports none of the
  modules the workers run and opens nothing. Several workers at once (at start, at a
  SIGHUP) are forked by a zygote that imports those modules and exits, so they share its
  pages and nobody keeps the pages they copy (ZygoteArbiter, preload_worker_modules); a
  single worker (the only one, or a replacement) imports for itself.
* Workers die with the arbiter (PR_SET_PDEATHSIG), so a service manager that restarts
  ``pkigate serve`` finds the ports free. SIGHUP restarts the workers gracefully (they
  reopen the store and reload the TLS certificate and key files); the configuration file
  is read at start only. Every line gunicorn writes is a JSON log line.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import http
import io
import json
import logging
import os
import re
import select
import shutil
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pkigate.gateways.logs import configure_logging, log_gevent_errors, make_formatter

METRICS_DIR = "metrics"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PR_SET_CHILD_SUBREAPER = 36
# A worker forked by a zygote waits this long at most for the zygote to exit.
ZYGOTE_EXIT_SECONDS = 30.0
# The arbiter waits this long at most for a zygote to import and fork its workers.
ZYGOTE_START_SECONDS = 120.0
SETTINGS_ENV = "PKIGATE_SERVER_SETTINGS"
# After a 413 the rest of the upload is read (and dropped) for this long, at most this much.
LINGER_SECONDS = 2.0
LINGER_BYTES = 16 * 1024 * 1024
# A response's writes are held up to this much, then sent together (CoalescingSocket).
COALESCE_BYTES = 64 * 1024

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
log = logging.getLogger("pkigate.server")


@dataclass(frozen=True)
class ServerSettings:
    """What the arbiter needs, worked out by ``pkigate serve``'s bootstrap (which has
    parsed the configuration and made the TLS certificate), so that the arbiter imports
    neither the core nor the configuration: each worker parses the configuration again
    for itself, after the fork."""

    http: str  # listener addresses, HOST:PORT
    https: str
    workers: int
    max_connections: int
    header_timeout_seconds: int
    body_timeout_seconds: int
    keepalive_requests: int
    max_body_bytes: int
    log_level: str
    log_format: str  # json or text (logs.py)
    data_dir: str
    tls_certificate: str  # the HTTPS listener's certificate (with its chain) and key
    tls_key: str
    client_cas: str | None  # CAs whose client certificates the HTTPS listener asks for
    config_path: str | None  # for the workers' own parse of the configuration
    database_url: str | None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServerSettings:
        return cls(**json.loads(text))


def server_tls_context(settings: ServerSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=settings.client_cas)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=settings.tls_certificate, keyfile=settings.tls_key)
    # Ask for a client certificate, never require one: the AD-style connector maps
    # certificates it issued back to their principal for renewal.
    context.verify_mode = ssl.CERT_OPTIONAL if settings.client_cas else ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return context


RefusalBody = Callable[[str, int, str], tuple[str, bytes]]
"""(path, status, message) -> (content type, body) of an answer the serving layer gives
before the app runs, in the terms of the protocol served at ``path``."""


def plain_refusal_body(_path: str, status: int, message: str) -> tuple[str, bytes]:
    """The management API's error object (`{"error": {"code", "message"}}`), its code
    the status's phrase in the API's spelling ("badRequest", "requestTimeout")."""
    code = _API_CODES.get(status) or "".join(
        word.capitalize() if i else word.lower()
        for i, word in enumerate(re.findall(r"[A-Za-z]+", http.HTTPStatus(status).phrase))
    )
    return "application/json", json.dumps({"error": {"code": code, "message": message}}).encode()


# Where the API's own handlers (app.py) name a status otherwise than by its phrase.
_API_CODES = {413: "payloadTooLarge", 500: "internalError"}


def _refusal(status: int, content_type: str, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


class ListenerApps:
    """The WSGI app a worker serves: the plain-HTTP or the HTTPS app, by the socket the
    request came in on. It tells the app the listener's scheme and, on TLS, the client
    certificate (``pkigate.client_certificate``: DER, or absent) and the RFC 5929
    tls-server-end-point channel binding of our certificate
    (``pkigate.tls_server_end_point``: the hash, for Kerberos channel bindings)."""

    def __init__(
        self,
        http: WSGIApp,
        https: WSGIApp,
        tls_certificate: str | None = None,
        refusal_body: RefusalBody = plain_refusal_body,
    ) -> None:
        self.http = http
        self.https = https
        self.tls_server_end_point = (
            None if tls_certificate is None else tls_server_end_point(Path(tls_certificate))
        )
        #: What a request refused before the app runs is answered with.
        self.refusal_body = refusal_body

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        sock = environ.get("gunicorn.socket")
        if isinstance(sock, CoalescingSocket):
            sock = sock.wrapped
        if isinstance(sock, ssl.SSLSocket):
            environ["wsgi.url_scheme"] = "https"
            if self.tls_server_end_point is not None:
                environ["pkigate.tls_server_end_point"] = self.tls_server_end_point
            with contextlib.suppress(ValueError, ssl.SSLError):
                der = sock.getpeercert(binary_form=True)
                if der:
                    environ["pkigate.client_certificate"] = der
            return self.https(environ, start_response)
        environ["wsgi.url_scheme"] = "http"
        return self.http(environ, start_response)


def tls_server_end_point(certificate_file: Path) -> bytes:
    """RFC 5929 section 4.1: the hash of our (leaf) certificate, by its signature's hash
    algorithm, SHA-256 in place of MD5 and SHA-1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    certificate = x509.load_pem_x509_certificates(certificate_file.read_bytes())[0]
    algorithm = certificate.signature_hash_algorithm
    if algorithm is None or isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(certificate.public_bytes(serialization.Encoding.DER))
    return digest.finalize()


def _die_with_parent(expected_parent: int) -> None:
    """SIGTERM this process when its parent (the arbiter) dies, however it dies.

    A worker forked by a zygote first waits for the zygote to exit and the arbiter (the
    subreaper) to adopt it: the death signal follows whichever process is the parent
    when it is asked for."""
    zygote = os.getppid()
    if zygote != expected_parent:
        deadline = time.monotonic() + ZYGOTE_EXIT_SECONDS
        while os.getppid() == zygote and time.monotonic() < deadline:
            time.sleep(0.005)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("cannot ask to die with the arbiter: errno %d", ctypes.get_errno())
    if os.getppid() != expected_parent:  # it died before the request took effect
        os._exit(0)


class CoalescingSocket:
    """A client socket as a response sees it: what the response writes is held until it
    ends (or ``COALESCE_BYTES`` are waiting), then sent in one write. gunicorn writes a
    response's headers and its body with two sendall calls: over TLS, two records and two
    write(2)s, and on loopback the second write costs the server as much kernel time as
    the first (a third of the CPU of a small answer, measured with py-spy --native)."""

    __slots__ = ("_pending", "_sock")

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._pending = bytearray()

    @property
    def wrapped(self) -> Any:
        """The socket itself (an ssl.SSLSocket on the HTTPS listener)."""
        return self._sock

    def sendall(self, data: bytes) -> None:
        self._pending += data
        if len(self._pending) >= COALESCE_BYTES:
            self.flush()

    def sendfile(self, *args: Any, **kwargs: Any) -> Any:
        self.flush()  # the headers go first
        return self._sock.sendfile(*args, **kwargs)

    def flush(self) -> None:
        if self._pending:
            data, self._pending = self._pending, bytearray()
            self._sock.sendall(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def make_worker_class() -> type[Any]:
    """The gevent worker class (built on demand: importing gunicorn's gevent worker
    imports gevent, which only workers need)."""
    import gevent
    from gevent.local import local as greenlet_local
    from gevent.pool import Pool
    from gevent.server import StreamServer
    from gunicorn import util as gunicorn_util
    from gunicorn.http import errors as http_errors
    from gunicorn.workers.base_async import AsyncWorker
    from gunicorn.workers.ggevent import GeventWorker

    class PkigateWorker(GeventWorker):  # type: ignore[misc]
        """gunicorn's gevent worker with pkigate's deadlines, TLS on the HTTPS listener
        only, whole-body reads before the app, and a graceful stop that waits for
        requests in flight, not for idle keep-alive connections."""

        pkigate_settings: ServerSettings

        def init_process(self) -> None:
            _die_with_parent(self.ppid)
            settings = self.pkigate_settings
            self.header_timeout = float(settings.header_timeout_seconds)
            self.body_timeout = float(settings.body_timeout_seconds)
            self.keepalive_requests = settings.keepalive_requests
            self.max_body = settings.max_body_bytes
            # A socket operation may block this long: longer than either deadline, which
            # end a slow request quietly before the socket's own timeout would raise.
            self.io_timeout = max(self.header_timeout, self.body_timeout) + 5.0
            self.in_flight = 0
            # Imported here, after the fork: the package brings the whole core, which an
            # arbiter with one worker leaves to it.
            from pkigate.core import blocking

            # A wait for another worker's SQLite write lock, and a signature on a PKCS#11
            # token, run in a thread of gevent's pool, not on this worker's only thread:
            # the worker serves on meanwhile.
            blocking.set_blocking_runner(lambda call: gevent.get_hub().threadpool.apply(call))
            log_gevent_errors()  # the hub is the arbiter's, reinitialised; say it again
            # gunicorn writes its own answers (to a request it cannot parse) with this
            # function, as an HTML page; this worker process answers in protocol terms.
            gunicorn_util.write_error = self.write_error
            super().init_process()  # monkey-patches, then loads the app (and the core)

        def timeout_ctx(self) -> Any:
            return gevent.Timeout(self.header_timeout, False)

        def run(self) -> None:
            https_port = int(self.pkigate_settings.https.rsplit(":", 1)[1])
            tls = server_tls_context(self.pkigate_settings)
            self.connection_state = greenlet_local()
            servers = []
            for sock in self.sockets:
                sock.setblocking(1)
                secure = sock.getsockname()[1] == https_port  # the two listeners' ports differ
                ssl_args: dict[str, Any] = (
                    {"ssl_context": tls, "do_handshake_on_connect": False} if secure else {}
                )
                server = StreamServer(
                    sock,
                    handle=lambda client, addr, sock=sock: self.handle(sock, client, addr),
                    spawn=Pool(self.worker_connections),
                    **ssl_args,
                )
                if self.cfg.workers > 1:
                    server.max_accept = 1
                server.start()
                servers.append(server)
            while self.alive:
                self.notify()
                gevent.sleep(1.0)
            # Graceful stop: take no new connections, finish the requests in flight (idle
            # keep-alive connections are simply closed when the process ends).
            for server in servers:
                server.close()
            deadline = time.monotonic() + self.cfg.graceful_timeout
            while self.in_flight and time.monotonic() < deadline:
                self.notify()
                gevent.sleep(0.1)

        def handle(self, listener: Any, client: Any, addr: Any) -> None:
            client.settimeout(self.io_timeout)
            if isinstance(client, ssl.SSLSocket):
                try:
                    with gevent.Timeout(self.header_timeout):
                        client.do_handshake()
                except (OSError, gevent.Timeout) as exc:
                    # Scanners, wrong protocols, slow or silent clients: nothing to log
                    # above debug, and no traceback.
                    log.debug("TLS handshake with %s failed: %s", addr, exc)
                    client.close()
                    return
            self.connection_state.requests = 0
            AsyncWorker.handle(self, listener, client, addr)

        def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
            # The path, where gunicorn read as far (a header error carries its request).
            request = req if req is not None else getattr(exc, "req", None)
            self.connection_state.error_path = getattr(request, "path", None) or ""
            super().handle_error(req, client, addr, exc)

        def write_error(self, sock: Any, status: int, reason: str, message: str) -> None:
            """gunicorn's answer to a request it could not parse (400, 414, 431, 501...):
            its status and message in the terms of the protocol at the path, like the
            refusals of _read_body, instead of gunicorn's HTML page."""
            path = getattr(self.connection_state, "error_path", "")
            content_type, body = getattr(self.wsgi, "refusal_body", plain_refusal_body)(
                path, status, message or reason
            )
            sock.sendall(_refusal(status, content_type, body))

        def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> bool:
            state = self.connection_state
            state.requests = getattr(state, "requests", 0) + 1
            if state.requests >= self.keepalive_requests:
                req.must_close = True
            refusal = self._read_body(req, sock)
            if refusal is not None:
                status, message = refusal
                content_type, body = getattr(self.wsgi, "refusal_body", plain_refusal_body)(
                    req.path, status, message
                )
                with contextlib.suppress(OSError):
                    sock.sendall(_refusal(status, content_type, body))
                raise StopIteration  # closes the connection
            self.in_flight += 1
            out = CoalescingSocket(sock)
            try:
                return bool(super().handle_request(listener_name, req, out, addr))
            finally:
                self.in_flight -= 1
                # Before the next request is read. After a failure gunicorn may have closed
                # the socket already (and raised StopIteration): that must not become an
                # OSError here, as a client gone away is not one either.
                with contextlib.suppress(OSError):
                    out.flush()
                if getattr(req, "pkigate_unread_body", False):
                    self._linger(sock)

        def _linger(self, sock: Any) -> None:
            """After answering a request whose body was not read to its end (too large),
            read on for a moment before the close: a close with unread data sends a
            reset, which can destroy the answer before the client reads it."""
            with contextlib.suppress(OSError, ValueError):
                sock.shutdown(socket.SHUT_WR)
                drained = 0
                with gevent.Timeout(LINGER_SECONDS, False):
                    while drained < LINGER_BYTES and (chunk := sock.recv(65536)):
                        drained += len(chunk)

        def _read_body(self, req: Any, sock: Any) -> tuple[int, str] | None:
            """Replace the request's body by its bytes, read under the body deadline;
            the status and message to answer instead of running the app, if the body is
            unusable."""
            headers = dict(req.headers)
            chunked = "chunked" in headers.get("TRANSFER-ENCODING", "").lower()
            # gunicorn has checked that a Content-Length is a number already.
            declared = None if chunked else int(headers.get("CONTENT-LENGTH", "0") or 0)
            if declared == 0:
                return None
            if declared is not None and declared > self.max_body:
                # Answered from the headers (the app says 413 in its protocol's terms):
                # such a body is never read, and the connection closes after the answer.
                req.must_close = True
                req.pkigate_unread_body = True
                req.body = io.BytesIO(b"")
                # No "100 Continue" either (RFC 9110 10.1.1: a server that refuses from
                # the headers answers at once): the client would send the body it waits
                # to be invited to send, only for it to be refused unread.
                req._expected_100_continue = False
                return None
            if req._expected_100_continue:
                # The client waits for this before it sends the body (gunicorn would send
                # it when the app starts; here the body is read before the app).
                req._expected_100_continue = False
                sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            try:
                with gevent.Timeout(self.body_timeout):
                    data = req.body.read(self.max_body + 1)
            except gevent.Timeout:
                return 408, f"the body did not arrive in {self.body_timeout:g} s"
            except (http_errors.ParseException, OSError, ValueError) as exc:
                # Invalid chunk sizes, missing terminators, a body shorter than its
                # Content-Length (the client closed): answered, never a 500.
                log.info("unreadable request body: %s: %s", type(exc).__name__, exc)
                return 400, "the request body is malformed"
            if declared is not None and len(data) < min(declared, self.max_body + 1):
                # The client closed before its Content-Length was complete.
                return 400, "the request body is shorter than declared"
            if len(data) > self.max_body:
                req.must_close = True  # the rest of the body is never read
                req.pkigate_unread_body = True
            # The app sees a plain body of known length (the declared one when over the
            # limit, so that it answers 413 in its own protocol's terms).
            req.headers = [
                (name, value)
                for name, value in req.headers
                if name not in ("CONTENT-LENGTH", "TRANSFER-ENCODING")
            ] + [("CONTENT-LENGTH", str(declared if declared is not None else len(data)))]
            req.body = io.BytesIO(data)
            return None

    return PkigateWorker


def make_arbiter_class() -> type[Any]:
    """gunicorn's arbiter, starting several workers at once from a zygote."""
    from gevent import os as gevent_os
    from gunicorn import util
    from gunicorn.arbiter import Arbiter
    from gunicorn.errors import HaltServer

    # gevent's own call to watch a child it forked (gevent.os), used for those it did not:
    # without a watcher gunicorn hears of an adopted worker's exit only at its timeout.
    watch_child: Callable[[int], None] | None = getattr(gevent_os, "_watch_child", None)

    class ZygoteArbiter(Arbiter):  # type: ignore[misc]
        """An arbiter that imports none of what its workers run. When it needs several
        workers at once (at start, and at a SIGHUP restart) it forks a zygote, which
        imports the workers' modules (preload_worker_modules), forks the workers, tells
        the arbiter their PIDs and exits. The workers share the zygote's pages as they
        would share an arbiter's preload, but once they have copied a page nobody keeps
        the original; this process, their subreaper, adopts them and supervises them as
        gunicorn supervises the workers it forks itself. One worker alone (the only
        one, or a replacement for one that died) imports for itself: nothing would
        share a zygote's pages with it, its siblings' zygote being gone."""

        adopts_orphans = False  # whether this process is its descendants' subreaper
        watches_adopted = watch_child is not None
        zygote_pipe: int | None = None  # in the zygote: where it reports its workers
        zygote_batch: tuple[Any, ...] = ()  # in the zygote: the workers it forks
        reload_spawns = 0  # spawn_worker calls still expected from a reload under way

        def spawn_workers(self) -> None:
            count = self.num_workers - len(self.WORKERS)
            if count > 1 and self.adopts_orphans:
                self.spawn_from_zygote(count)
            else:
                super().spawn_workers()

        def reload(self) -> None:
            # gunicorn's reload asks for the new workers by one spawn_worker call each:
            # the first call forks them all from one zygote, the others find them forked.
            several = self.cfg.workers > 1 and self.adopts_orphans
            self.reload_spawns = self.cfg.workers if several else 0
            try:
                super().reload()
            finally:
                self.reload_spawns = 0

        def spawn_worker(self) -> Any:
            if not self.reload_spawns:
                return super().spawn_worker()
            if self.reload_spawns == self.cfg.workers:
                self.spawn_from_zygote(self.cfg.workers)
            self.reload_spawns -= 1
            return None

        def spawn_from_zygote(self, count: int) -> None:
            """Start ``count`` workers from one zygote; here only once it has said their
            PIDs (in the workers it goes on to gunicorn's worker loop, and exits)."""
            batch = []
            for _ in range(count):
                self.worker_age += 1
                worker = self.worker_class(
                    self.worker_age,
                    self.pid,
                    self.LISTENERS,
                    self.app,
                    self.timeout / 2.0,
                    self.cfg,
                    self.log,
                )
                batch.append(worker)  # pre_fork runs in the zygote, by spawn_worker
            read_end, write_end = os.pipe()
            zygote = os.fork()
            if zygote == 0:
                os.close(read_end)
                self.run_zygote(tuple(batch), write_end)  # returns only in a worker
                return
            os.close(write_end)
            try:
                report = _read_report(read_end, 4 * count, ZYGOTE_START_SECONDS)
            finally:
                os.close(read_end)
            if len(report) < 4 * count:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(zygote, signal.SIGKILL)  # stuck, or gone already
            # The zygote is reaped with the workers (reap_workers: an unknown child).
            pids = [int.from_bytes(report[i : i + 4], "big") for i in range(0, len(report) - 3, 4)]
            for worker, pid in zip(batch, pids, strict=False):
                worker.pid = pid
                self.WORKERS[pid] = worker
                # In this monkey-patched process gunicorn hears of a child's exit only
                # through a gevent child watcher, which gevent starts for the processes it
                # forks itself (os.fork is its fork_and_watch); this does for these what
                # fork_and_watch does. gevent has no public call for a child it did not
                # fork; without one a dead worker would be found only at its timeout.
                assert watch_child is not None  # adopts_orphans says so
                watch_child(pid)
            for worker in batch[len(pids) :]:
                worker.tmp.close()
            if not pids:
                raise HaltServer("the zygote started no worker", self.WORKER_BOOT_ERROR)
            if len(pids) < count:
                self.log.error("the zygote started %d of %d workers", len(pids), count)

        def run_zygote(self, batch: tuple[Any, ...], pipe: int) -> None:
            """In the zygote: import, fork the batch's workers (gunicorn's spawn_worker,
            handed each premade worker in turn), report their PIDs, exit."""
            zygote = os.getpid()
            try:
                for signum in self.SIGNALS:  # the arbiter's handlers are not the zygote's
                    signal.signal(signum, signal.SIG_DFL)
                _die_with_parent(self.pid)
                util._setproctitle(f"zygote [{self.proc_name}]")
                preload_worker_modules()
                self.zygote_pipe, self.zygote_batch = pipe, batch
                self.reload_spawns = 0
                premade = iter(batch)
                self.worker_class = lambda *_args: next(premade)
                for _ in batch:
                    pid = super().spawn_worker()
                    os.write(pipe, pid.to_bytes(4, "big"))
            except BaseException:
                if os.getpid() != zygote:
                    raise  # a worker ending (gunicorn ends each by SystemExit)
                self.log.exception("the zygote failed to start the workers")
                os._exit(1)
            os._exit(0)

        def leave_zygote(self, worker: Any) -> None:
            """In a worker just forked by a zygote (gunicorn's post_fork hook): close what
            the zygote holds for the arbiter and for the worker's siblings."""
            if self.zygote_pipe is None:
                return
            os.close(self.zygote_pipe)
            for sibling in self.zygote_batch:
                if sibling is not worker:
                    sibling.tmp.close()
            self.zygote_pipe, self.zygote_batch = None, ()

    return ZygoteArbiter


def _read_report(fd: int, size: int, seconds: float) -> bytes:
    """Up to ``size`` bytes from a pipe, until its writers close it or ``seconds`` pass."""
    deadline = time.monotonic() + seconds
    data = b""
    while len(data) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            break
        chunk = os.read(fd, size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def gunicorn_logger_class(log_format: str) -> type[Any]:
    from gunicorn.glogging import Logger

    class PkigateLogger(Logger):  # type: ignore[misc]
        """gunicorn's own lines (worker boots, deaths, timeouts) formatted as ours."""

        def setup(self, cfg: Any) -> None:
            super().setup(cfg)
            for handler in (*self.error_log.handlers, *self.access_log.handlers):
                handler.setFormatter(make_formatter(log_format))

    return PkigateLogger


def preload_worker_modules() -> None:
    """Import what every worker runs, once, in the zygote that forks them (ZygoteArbiter):
    the workers share these pages instead of each importing its own copy. Nothing is
    opened here: no store, no key, no connection; each worker does that after the fork.
    Frozen out of the garbage collector's reach, the imported objects are not written to
    (and so copied) by a worker's collections.

    A worker still copies most of them as it runs (CPython 3.11 writes to the code objects
    it executes, as it specialises them, and to the refcounts of what it touches; a new
    object lands in a hole of an inherited page). Both workers copy the same pages (they
    run the same code), 50-73% of the preloaded functions, code objects and classes of
    each large package (read from /proc/<pid>/pagemap). When the arbiter itself preloaded
    and stayed alive, it kept the originals of every page its workers had copied, 35-38
    MiB that nobody used: `bench/protocols.py --quick --skip-peers` (two workers) peaked
    at 154-170 MiB PSS that way, and at 168-176 MiB with no preload at all. The zygote
    exits once its workers are forked, and with it those originals: 136-147 MiB, run back
    to back with the arbiter's preload."""
    import pkigate.acme.connector
    import pkigate.adcs.connector
    import pkigate.gateways.api
    import pkigate.gateways.api_access
    import pkigate.gateways.app
    import pkigate.gateways.console  # with flask_wtf and wtforms
    import pkigate.gateways.crl_http
    import pkigate.gateways.ocsp_http
    import pkigate.gateways.runtime
    import pkigate.gateways.serve
    import pkigate.scep.connector  # noqa: F401

    gc.freeze()


def run_server(settings: ServerSettings) -> None:
    """The arbiter: both listeners, ``settings.workers`` gevent workers, until stopped."""
    configure_logging(settings.log_level, settings.log_format)
    log_gevent_errors()
    # prometheus_client's multiprocess mode: one file set per worker, fresh for each start.
    # The variable must be set before prometheus_client is first imported (it picks its
    # value store then), here and so in every worker.
    metrics_dir = Path(settings.data_dir) / METRICS_DIR
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(mode=0o700)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    from gunicorn.app.base import BaseApplication
    from prometheus_client import multiprocess

    # Workers forked by a zygote are adopted by this process when the zygote exits.
    arbiter_class = make_arbiter_class()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.warning(
            "cannot become the workers' subreaper (errno %d): each worker imports its own modules",
            ctypes.get_errno(),
        )
    elif not arbiter_class.watches_adopted:
        log.warning("this gevent cannot watch adopted workers: each imports its own modules")
    else:
        arbiter_class.adopts_orphans = True
    worker_class = make_worker_class()
    worker_class.pkigate_settings = settings  # inherited by every worker the arbiter forks
    options: dict[str, Any] = {
        "bind": [settings.http, settings.https],
        "workers": settings.workers,
        "worker_class": worker_class,
        "worker_connections": settings.max_connections,
        "timeout": 60,
        "graceful_timeout": 10,
        "keepalive": settings.header_timeout_seconds,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": "warning",
        "logger_class": gunicorn_logger_class(settings.log_format),
        "proc_name": "pkigate",
        "limit_request_line": 8190,
        "do_handshake_on_connect": True,  # our worker completes the handshake itself
        "child_exit": lambda _server, worker: multiprocess.mark_process_dead(worker.pid),
        "post_fork": lambda arbiter, worker: arbiter.leave_zygote(worker),
    }

    class PkigateApplication(BaseApplication):  # type: ignore[misc]
        def run(self) -> None:
            arbiter_class(self).run()  # gunicorn's BaseApplication.run, with our arbiter

        def load_config(self) -> None:
            for key, value in options.items():
                self.cfg.set(key, value)
            if "control_socket_disable" in self.cfg.settings:
                # gunicorn >= 25 opens a control socket at one path per user
                # ($XDG_RUNTIME_DIR or ~/.gunicorn/gunicorn.ctl), shared by every pkigate
                # on the host: signals to the arbiter are the control interface here.
                self.cfg.set("control_socket_disable", True)

        def load(self) -> WSGIApp:
            # Runs in each worker after the fork (and gevent's monkey-patching): every
            # worker parses the configuration, opens its own store connections and runs
            # its own background job greenlets.
            from pkigate.gateways.app import create_app
            from pkigate.gateways.runtime import Gateway
            from pkigate.gateways.serve import effective_config

            config = effective_config(
                Path(settings.config_path) if settings.config_path else None,
                Path(settings.data_dir),
                settings.database_url,
                settings.workers,
            )
            gateway = Gateway.open(config)
            gateway.start_background_work()
            return ListenerApps(
                create_app(gateway, "http"),
                create_app(gateway, "https"),
                settings.tls_certificate,
                gateway.refusal_body,
            )

    PkigateApplication().run()
    sys.exit(0)


def main() -> None:
    """The arbiter's entry (arbiter.py, which monkey-patches first)."""
    text = os.environ.pop(SETTINGS_ENV, None)
    if text is None:
        sys.exit("the server is started by `pkigate serve`, which hands it its settings")
    run_server(ServerSettings.from_json(text))
