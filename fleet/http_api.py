"""The fleet scorer's HTTP API on `--listen`: `POST /v1/events`, `GET /v1/model`,
`GET /v1/policy`.

The server answers for a `Backend`: the local scoring core, or on the bus any replica
(which appends to the stream and serves the newest checkpoint's documents). Documents
agents fetch are named in `DOCUMENTS` (path -> name the backend knows); `GET /v1/policy`
serves the operator's policy file (`serve --policy FILE`, fleet.policy_doc) on any
backend.

Bounded: at most `max_connections` connections are served at once (one thread each; past
that a connection gets 503 and is closed), every socket has a timeout, bodies are limited
before and after decompression. With a token, every request must carry it as a bearer
token (compared in constant time, never logged); with TLS, the handshake happens in the
connection's own thread so a slow client cannot stall the accept loop.
"""

from __future__ import annotations

import hmac
import logging
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Protocol

import orjson

from exporters.httpserver import parse_address
from fleet.eventlog import LogUnavailable, Overloaded
from fleet.ingest import BodyTooLarge, NotNdjson, Parsed, decompress, parse
from fleet.metrics import ServeMetrics
from fleet.policy_doc import PolicyDocument
from scoring.endpoints import EndpointCatalog

log = logging.getLogger("imdswatch.fleet.http")

DEFAULT_BODY_LIMIT = 16 << 20
DEFAULT_MAX_CONNECTIONS = 256
SOCKET_TIMEOUT = 30.0
RETRY_AFTER = "1"
# GET paths -> the document name a backend serves (ETag and gzip body).
DOCUMENTS = {"/v1/model": "model", "/v1/policy": "policy"}
CONTENT_TYPES = {"model": "application/json", "policy": "application/toml"}
OVER_LIMIT = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n"
              b"Connection: close\r\n\r\n")


class Backend(Protocol):
    ready: bool

    @property
    def catalog(self) -> EndpointCatalog: ...

    def ingest(self, parsed: Parsed) -> tuple[int, int]:
        """(accepted, duplicates) once durable; raises Overloaded or LogUnavailable."""
        ...

    def document(self, name: str) -> tuple[str, bytes] | None:
        """(ETag, gzip body) of a document, None while there is none yet."""
        ...


class IngestServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: str, core: Backend, metrics: ServeMetrics, *,
                 token: str | None = None, tls: ssl.SSLContext | None = None,
                 body_limit: int = DEFAULT_BODY_LIMIT,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 policy: PolicyDocument | None = None) -> None:
        host, port = parse_address(address)
        self.policy = policy
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.core = core
        self.metrics = metrics
        self.token = token.encode() if token is not None else None
        self.tls = tls
        self.body_limit = body_limit
        self._slots = threading.BoundedSemaphore(max_connections)
        self._quiet_until = 0.0
        super().__init__((host, port), _Handler)

    def log_unavailable(self, exc: LogUnavailable) -> None:
        # Once per ten seconds: every agent retries through an outage.
        now = time.monotonic()
        if now >= self._quiet_until:
            self._quiet_until = now + 10.0
            log.error("ingest refused (503): %s", exc)

    def get_request(self) -> tuple[socket.socket, object]:
        sock, addr = self.socket.accept()
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def process_request(self, request: socket.socket, client_address: object) -> None:
        if not self._slots.acquire(blocking=False):
            self.metrics.requests.labels(code="503").inc()
            if self.tls is None:  # a TLS peer would need a handshake first: just close
                try:
                    request.settimeout(1.0)
                    request.sendall(OVER_LIMIT)
                except OSError:
                    pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: object) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: object, client_address: object) -> None:
        # A client that resets, times out or fails the TLS handshake is its problem, not a
        # traceback in the fleet scorer's log.
        import sys

        exc = sys.exc_info()[1]
        log.debug("connection from %s ended: %s", client_address, exc)

    def serve_in_thread(self) -> threading.Thread:
        t = threading.Thread(target=self.serve_forever, name="imdswatch-ingest", daemon=True)
        t.start()
        return t


class _Handler(BaseHTTPRequestHandler):
    server: IngestServer
    protocol_version = "HTTP/1.1"
    timeout = SOCKET_TIMEOUT
    server_version = "imdswatch-serve"
    sys_version = ""

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()

    # -- helpers -------------------------------------------------------------------------
    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
               close: bool = False) -> None:
        self.server.metrics.requests.labels(code=str(status)).inc()
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if body and not (headers and "Content-Type" in headers):
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str, close: bool = False,
               headers: dict[str, str] | None = None) -> None:
        self._reply(status, orjson.dumps({"error": message}), headers, close)

    def _authorized(self) -> bool:
        token = self.server.token
        if token is None:
            return True
        given = self.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        # compare_digest: the time taken must not tell how much of a guess was right.
        ok = scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token)
        if not ok:
            # The body is not read: the connection cannot be reused.
            self._error(401, "missing or wrong bearer token", close=True,
                        headers={"WWW-Authenticate": 'Bearer realm="imdswatch"'})
        return ok

    def _body(self) -> bytes | None:
        limit = self.server.body_limit
        length = self.headers.get("Content-Length")
        if length is None:
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                return self._chunked(limit)
            self._error(411, "Content-Length required", close=True)
            return None
        try:
            n = int(length)
            if n < 0:
                raise ValueError
        except ValueError:
            self._error(400, "bad Content-Length", close=True)
            return None
        if n > limit:
            self._error(413, f"body over {limit} bytes", close=True)
            return None
        body = self.rfile.read(n)
        if len(body) != n:
            self.close_connection = True
            return None
        return body

    def _chunked(self, limit: int) -> bytes | None:
        parts, size = [], 0
        while True:
            line = self.rfile.readline(100)
            try:
                n = int(line.split(b";")[0].strip(), 16)
            except ValueError:
                self._error(400, "bad chunked encoding", close=True)
                return None
            if n == 0:
                while self.rfile.readline(1000) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            size += n
            if size > limit:
                self._error(413, f"body over {limit} bytes", close=True)
                return None
            parts.append(self.rfile.read(n))
            self.rfile.readline(3)

    # -- routes --------------------------------------------------------------------------
    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        if path != "/v1/events":
            self._error(404, "not found", close=True)
            return
        if not self._authorized():
            return
        body = self._body()
        if body is None:
            return
        srv = self.server
        m = srv.metrics
        try:
            encoding = self.headers.get("Content-Encoding", "identity").strip().lower()
            if encoding == "gzip":
                body = decompress(body, srv.body_limit)
            elif encoding not in ("identity", ""):
                self._error(415, f"Content-Encoding {encoding} is not supported (use gzip)")
                return
            parsed = parse(body, srv.core.catalog)
        except BodyTooLarge as exc:
            self._error(413, str(exc))
            return
        except NotNdjson as exc:
            m.events.labels(result="malformed").inc()
            self._error(400, f"not NDJSON: {exc}")
            return
        if not srv.core.ready:
            self._error(503, "starting", headers={"Retry-After": RETRY_AFTER})
            return
        try:
            accepted, duplicates = srv.core.ingest(parsed)
        except Overloaded:
            self._error(503, "queue full, retry later", headers={"Retry-After": RETRY_AFTER})
            return
        except LogUnavailable as exc:
            srv.log_unavailable(exc)
            self._error(503, "cannot make events durable now",
                        headers={"Retry-After": str(exc.retry_after)})
            return
        m.events.labels(result="accepted").inc(accepted)
        m.events.labels(result="duplicate").inc(duplicates)
        m.events.labels(result="malformed").inc(parsed.malformed)
        m.events.labels(result="skipped").inc(parsed.skipped)
        self._reply(200, orjson.dumps({"accepted": accepted, "duplicates": duplicates,
                                       "malformed": parsed.malformed,
                                       "skipped": parsed.skipped}))

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        name = DOCUMENTS.get(path)
        if name is None:
            self._error(404, "not found")
            return
        if not self._authorized():
            return
        if name == "policy":
            policy = self.server.policy
            doc = policy.current() if policy is not None else None
            if policy is None:
                self._error(404, "this fleet scorer publishes no policy (serve --policy FILE)")
                return
        else:
            doc = self.server.core.document(name)
        if doc is None:
            self._error(503, f"no {name} yet", headers={"Retry-After": RETRY_AFTER})
            return
        etag, body = doc
        quoted = f'"{etag}"'
        if self.headers.get("If-None-Match") == quoted:
            self._reply(304, headers={"ETag": quoted})
            return
        headers = {"ETag": quoted, "Content-Type": CONTENT_TYPES[name]}
        if "gzip" in (self.headers.get("Accept-Encoding") or ""):
            headers["Content-Encoding"] = "gzip"
        else:
            import gzip

            body = gzip.decompress(body)
        self._reply(200, body, headers)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        # Access lines would hold nothing useful (status counts are metrics) and, for a
        # malformed request line, whatever the client sent - possibly its token.
        return


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx
