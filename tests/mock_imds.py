"""A tiny IMDS look-alike for tests, run INSIDE a test network namespace only.

Serves the paths the usual clients ask for (AWS IMDSv1/v2 with the token PUT, GCP's
computeMetadata with its Metadata-Flavor check, Azure's instance metadata and managed-identity
token with its Metadata check, the ECS credentials endpoint) on every address of the
namespace (one dual-stack socket), on the ports given, with HTTP/1.1 keep-alive so SDK-style
clients send several requests on one connection: python3 mock_imds.py 80 8080
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN = b"AQAEAtesttoken=="
CREDENTIALS = (b'{"Code":"Success","Type":"AWS-HMAC","AccessKeyId":"ASIATESTTESTTEST",'
               b'"SecretAccessKey":"test-secret","Token":"test-session-token",'
               b'"Expiration":"2030-01-01T00:00:00Z"}')
PATHS = {
    "/latest/meta-data/": b"ami-id\ninstance-id\niam/\n",
    "/latest/meta-data/instance-id": b"i-0123456789abcdef0",
    "/latest/meta-data/iam/security-credentials/": b"test-role",
    "/latest/meta-data/iam/security-credentials/test-role": CREDENTIALS,
    "/latest/dynamic/instance-identity/document": b'{"region":"us-east-1"}',
    "/latest/user-data": b"#!/bin/sh\ntrue\n",
    "/v2/credentials/test-id": CREDENTIALS,
}
GCP = {
    "/computeMetadata/v1/project/project-id": b"test-project",
    "/computeMetadata/v1/instance/service-accounts/default/token":
        b'{"access_token":"ya29.test","expires_in":3599,"token_type":"Bearer"}',
    "/computeMetadata/v1/instance/hostname": b"test.c.test-project.internal",
}
AZURE = {
    "/metadata/instance": b'{"compute":{"location":"westeurope"}}',
    "/metadata/identity/oauth2/token": b'{"access_token":"eyJ0test","token_type":"Bearer"}',
}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every answer has a Content-Length

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        if 0 < n <= 65536:
            self.rfile.read(n)

    def do_PUT(self) -> None:  # noqa: N802
        self._body()
        self._send(200, TOKEN if self.path == "/latest/api/token" else b"")

    def do_POST(self) -> None:  # noqa: N802
        self._body()
        self._send(200, b"{}")

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path.startswith("/slow"):
            # Keeps the client alive for a while, so tests can check /proc enrichment
            # without racing the client's exit.
            time.sleep(0.5)
            self._send(200, b"slow")
            return
        if path in GCP:
            ok = self.headers.get("Metadata-Flavor", "").lower() == "google"
            self._send(200 if ok else 403, GCP[path] if ok else b"Missing Metadata-Flavor")
            return
        if path in AZURE:
            ok = self.headers.get("Metadata", "").lower() == "true"
            self._send(200 if ok else 400, AZURE[path] if ok else b"Required metadata header")
            return
        body = PATHS.get(path)
        self._send(200 if body is not None else 404, body or b"not found")

    def log_message(self, *args: object) -> None:
        pass


class DualStack(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    request_queue_size = 1024

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        super().server_bind()


def main() -> None:
    servers = [DualStack(("::", int(p)), Handler) for p in sys.argv[1:] or ["80"]]
    for s in servers[1:]:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    print("ready", flush=True)
    servers[0].serve_forever()


if __name__ == "__main__":
    main()
