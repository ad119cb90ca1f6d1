"""The agent's HTTP endpoint: `/metrics` for Prometheus, `/healthz` and `/readyz` for the
kubelet's probes, all on one port so the DaemonSet exposes a single container port."""

from __future__ import annotations

import gzip
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder


class HealthState:
    """Liveness and readiness as the probes see them.

    Ready means the probe is attached and events flow; until then Kubernetes should not
    count the pod as available (a rolling update waits for it). Live means the process
    still answers, optionally refined by a check the agent provides (e.g. its event loop
    made progress recently), because a wedged agent that still serves HTTP should restart.
    """

    def __init__(self) -> None:
        self._ready = False
        self._reason = "probe not attached yet"
        self.live_check: Callable[[], bool] | None = None

    def set_ready(self, ready: bool, reason: str = "") -> None:
        self._ready = ready
        self._reason = reason or ("ok" if ready else "not ready")

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def reason(self) -> str:
        return self._reason

    def live(self) -> bool:
        check = self.live_check
        return True if check is None else bool(check())


def parse_address(address: str) -> tuple[str, int]:
    """`HOST:PORT`, `[v6]:PORT` or `:PORT` (all interfaces) to a (host, port) pair."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics address {address!r} is not HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], registry: CollectorRegistry,
                 health: HealthState) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.registry = registry
        self.health = health
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._metrics()
        elif path == "/healthz":
            ok = self.server.health.live()
            self._text(200 if ok else 503, "ok\n" if ok else "event loop stalled\n")
        elif path == "/readyz":
            health = self.server.health
            self._text(200 if health.ready else 503, health.reason + "\n")
        elif path == "/":
            self._text(200, "imdswatch: /metrics /healthz /readyz\n")
        else:
            self._text(404, "not found\n")

    def _metrics(self) -> None:
        encoder, content_type = choose_encoder(self.headers.get("Accept"))
        try:
            body = encoder(self.server.registry)
        except Exception as exc:  # a failing collector must not kill the server thread
            self._text(500, f"collecting metrics failed: {exc}\n")
            return
        headers = {"Content-Type": content_type}
        if "gzip" in (self.headers.get("Accept-Encoding") or ""):
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        self._send(200, body, headers)

    def _text(self, status: int, text: str) -> None:
        self._send(status, text.encode(), {"Content-Type": "text/plain; charset=utf-8"})

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        # Probes hit these endpoints every few seconds; access logs would drown the agent's.
        return


def start_server(address: str, registry: CollectorRegistry,
                 health: HealthState) -> ThreadingHTTPServer:
    """Serve on `address` from a daemon thread; stop with `.shutdown()` and `.server_close()`."""
    server = _Server(parse_address(address), registry, health)
    thread = threading.Thread(target=server.serve_forever, name="imdswatch-http", daemon=True)
    thread.start()
    return server
