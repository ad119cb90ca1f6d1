"""A mock metadata service for every cloud the catalog knows, run ONLY inside a private
network namespace (`lab.sandbox`): `python3 -m lab.mock_imds [--delay SECONDS] PORT...`.

It answers like AWS IMDS (IMDSv1 and the IMDSv2 token flow, a role's credentials, user
data), the AWS ECS/EKS container credentials endpoint, GCP's computeMetadata (refused
without `Metadata-Flavor: Google`) and Azure's instance metadata and managed-identity token
(refused without `Metadata: true`), on every address of the namespace (one dual-stack
socket: 169.254.169.254, 169.254.170.2, fd00:ec2::254 and whatever else the namespace
holds), with HTTP/1.1 keep-alive so SDK-style clients send several requests on one
connection. Every secret it hands out is obviously fake. `--delay` makes each answer wait,
as a loaded service does; `/slow` always waits half a second, which keeps a client alive
while a test looks at it.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROLE = "demo-role"
TOKEN = b"AQAEAtesttoken=="
INSTANCE_ID = b"i-0123456789abcdef0"
CREDENTIALS = (b'{"Code":"Success","Type":"AWS-HMAC","AccessKeyId":"ASIAMOCKNOTAREALKEY0",'
               b'"SecretAccessKey":"mock-secret-not-real","Token":"mock-session-token",'
               b'"Expiration":"2099-01-01T00:00:00Z"}')
AWS_CREDENTIALS = "/latest/meta-data/iam/security-credentials/"
AWS = {
    "/latest/meta-data/": b"ami-id\ninstance-id\niam/\n",
    "/latest/meta-data/instance-id": INSTANCE_ID,
    AWS_CREDENTIALS: ROLE.encode(),
    "/latest/dynamic/instance-identity/document": b'{"region":"us-east-1"}',
    "/latest/user-data": b"#!/bin/sh\ntrue\n",
    "/v2/metadata": b'{"Cluster":"mock","TaskARN":"arn:aws:ecs:us-east-1:0:task/mock"}',
}
GCP = {
    "/computeMetadata/v1/project/project-id": b"mock-project",
    "/computeMetadata/v1/instance/service-accounts/default/token":
        b'{"access_token":"ya29.mock","expires_in":3599,"token_type":"Bearer"}',
    "/computeMetadata/v1/instance/hostname": b"mock.c.mock-project.internal",
}
AZURE = {
    "/metadata/instance": b'{"compute":{"location":"westeurope"}}',
    "/metadata/identity/oauth2/token": b'{"access_token":"eyJ0mock","token_type":"Bearer"}',
}
SLOW = 0.5
MAX_BODY = 65536


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every answer has a Content-Length
    server_version = "mock-imds"
    delay = 0.0

    def _send(self, code: int, body: bytes) -> None:
        if self.delay:
            time.sleep(self.delay)
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        if 0 < n <= MAX_BODY:
            self.rfile.read(n)

    def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
        self._body()
        self._send(200, TOKEN if self.path == "/latest/api/token" else b"")

    def do_POST(self) -> None:  # noqa: N802
        self._body()
        self._send(200, b"{}")

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path.startswith("/slow"):
            time.sleep(SLOW)
            self._send(200, b"slow")
        elif path in GCP:
            ok = self.headers.get("Metadata-Flavor", "").lower() == "google"
            self._send(200 if ok else 403, GCP[path] if ok else b"Missing Metadata-Flavor")
        elif path in AZURE:
            ok = self.headers.get("Metadata", "").lower() == "true"
            self._send(200 if ok else 400, AZURE[path] if ok else b"Required metadata header")
        elif path.startswith(AWS_CREDENTIALS) and path != AWS_CREDENTIALS \
                or path.startswith("/v2/credentials/"):
            self._send(200, CREDENTIALS)  # any role name: the mock has every role
        else:
            body = AWS.get(path)
            self._send(200 if body is not None else 404, body or b"not found")

    def log_message(self, *args: object) -> None:
        pass


class DualStack(ThreadingHTTPServer):
    address_family = socket.AF_INET6
    daemon_threads = True
    request_queue_size = 1024  # the flood tests connect faster than a thread accepts

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        super().server_bind()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python3 -m lab.mock_imds")
    parser.add_argument("--delay", type=float, default=0.0,
                        help="seconds every answer waits")
    parser.add_argument("ports", nargs="*", type=int, default=[80])
    args = parser.parse_args()
    Handler.delay = args.delay
    servers = [DualStack(("::", p), Handler) for p in args.ports]
    for s in servers[1:]:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    print("ready", flush=True)
    servers[0].serve_forever()


if __name__ == "__main__":
    main()
