"""A tiny IMDS look-alike for tests, run INSIDE a test network namespace only.

Serves IMDSv2 token PUTs and a few metadata GETs on every address of the namespace (one
dual-stack socket), on the ports given: python3 mock_imds.py 80 8080
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PATHS = {
    "/latest/meta-data/": b"ami-id\ninstance-id\niam/\n",
    "/latest/meta-data/instance-id": b"i-0123456789abcdef0",
    "/latest/meta-data/iam/security-credentials/": b"test-role",
}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self) -> None:  # noqa: N802
        self._send(200, b"AQAEAtesttoken==" if self.path == "/latest/api/token" else b"")

    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith("/slow"):
            # Keeps the client alive for a while, so tests can check /proc enrichment
            # without racing the client's exit.
            time.sleep(0.5)
            self._send(200, b"slow")
            return
        body = PATHS.get(self.path)
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
