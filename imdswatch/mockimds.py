"""A mock metadata service for `imdswatch demo` and `imdswatch simulate`, run ONLY inside
their private network namespace (python3 -m imdswatch.mockimds PORT...).

It answers like AWS IMDS (IMDSv1 and the IMDSv2 token flow, a role's credentials) and the
ECS credentials endpoint, on every address of the namespace (one dual-stack socket: the
IPv4 169.254.169.254 and 169.254.170.2 and the IPv6 fd00:ec2::254). The credentials are
obviously fake. Each answer waits a moment, as a loaded service does, which also keeps the
caller alive long enough for the agent to read its /proc entry.
"""

from __future__ import annotations

import json
import secrets
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROLE = "demo-role"
INSTANCE_ID = "i-0demo0000000000a"
ANSWER_DELAY = 0.3


def credentials() -> bytes:
    return json.dumps({
        "Code": "Success", "Type": "AWS-HMAC",
        "AccessKeyId": "ASIADEMONOTAREALKEY0",
        "SecretAccessKey": "demo-" + secrets.token_hex(16),
        "Token": "demo-" + secrets.token_hex(32),
        "Expiration": "2099-01-01T00:00:00Z",
        "RoleArn": f"arn:aws:iam::000000000000:role/{ROLE}",
    }).encode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server_version = "mock-imds"

    def _send(self, code: int, body: bytes, content_type: str = "text/plain") -> None:
        time.sleep(ANSWER_DELAY)
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
        if self.path == "/latest/api/token":
            self._send(200, ("AQAEA" + secrets.token_urlsafe(24)).encode())
        else:
            self._send(404, b"not found")

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path == "/latest/meta-data/instance-id":
            self._send(200, INSTANCE_ID.encode())
        elif path == "/latest/meta-data/iam/security-credentials/":
            self._send(200, ROLE.encode())
        elif path == f"/latest/meta-data/iam/security-credentials/{ROLE}" or \
                path.startswith("/v2/credentials/"):
            self._send(200, credentials(), "application/json")
        elif path == "/latest/meta-data/":
            self._send(200, b"ami-id\ninstance-id\niam/\n")
        else:
            self._send(404, b"not found")

    def log_message(self, *args: object) -> None:
        pass


class DualStack(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True

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
