"""The agent's HTTP endpoint: `/metrics` for Prometheus, `/healthz` and `/readyz` for the
kubelet's probes, all on one port so the DaemonSet exposes a single container port.

`/metrics` is prometheus_client's own WSGI app (content negotiation, gzip, `name[]`
filters); the health routes sit in front of it. It is served by waitress, whose
asynchronous front end reads each request in full before a worker thread sees it: a client
that trickles its request, or opens a connection and says nothing, holds a socket but never
a thread, so scrapes keep being answered. On top of waitress' own limits (open connections,
header size, inactivity) a request must arrive whole within `request_timeout` seconds of
the connection opening, which a byte-a-second slowloris cannot stretch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import waitress
from prometheus_client import CollectorRegistry, make_wsgi_app
from waitress import wasyncore

log = logging.getLogger("imdswatch.http")

# A Prometheus server, a kubelet and an operator's curl are the expected clients; a few
# dozen open connections leave room for several Prometheus replicas.
MAX_CONNECTIONS = 32
# Seconds a connection may take to deliver its request (and may stay idle afterwards).
REQUEST_TIMEOUT = 10
WORKER_THREADS = 2


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
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"metrics address {address!r} is not HOST:PORT")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def make_app(registry: CollectorRegistry, health: HealthState) -> Callable:
    """The WSGI application: health routes in front of prometheus_client's metrics app."""
    metrics_app = make_wsgi_app(registry)

    def text(start_response: Callable, status: str, body: str) -> Iterable[bytes]:
        data = body.encode()
        start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                                ("Content-Length", str(len(data)))])
        return [data]

    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return text(start_response, "405 Method Not Allowed", "GET only\n")
        if path == "/metrics":
            try:
                return metrics_app(environ, start_response)
            except Exception as exc:  # a failing collector must not kill the worker
                log.error("collecting metrics failed: %s", exc)
                return text(start_response, "500 Internal Server Error",
                            f"collecting metrics failed: {exc}\n")
        if path == "/healthz":
            ok = health.live()
            return text(start_response, "200 OK" if ok else "503 Service Unavailable",
                        "ok\n" if ok else "event loop stalled\n")
        if path == "/readyz":
            return text(start_response,
                        "200 OK" if health.ready else "503 Service Unavailable",
                        health.reason + "\n")
        if path == "/":
            return text(start_response, "200 OK", "imdswatch: /metrics /healthz /readyz\n")
        return text(start_response, "404 Not Found", "not found\n")

    return app


class MetricsServer:
    """A running server; `.server_address` is the bound (host, port)."""

    def __init__(self, server: Any, request_timeout: float) -> None:
        self._server = server
        self._request_timeout = request_timeout
        # waitress only closes channels idle for `channel_timeout`; this also closes those
        # whose request is still incomplete `request_timeout` after they connected.
        server.maintenance = self._maintenance
        self.server_address = (server.effective_host, int(server.effective_port))
        self._thread = threading.Thread(target=server.run, name="imdswatch-http", daemon=True)
        self._thread.start()
        self._closed = False

    def _maintenance(self, now: float) -> None:
        idle_cutoff = now - self._server.adj.channel_timeout
        open_cutoff = now - self._request_timeout
        for channel in list(self._server.active_channels.values()):
            if channel.requests:  # a request is being answered: let it finish
                continue
            stalled = channel.request is not None and channel.creation_time < open_cutoff
            if stalled or channel.last_activity < idle_cutoff:
                channel.will_close = True
                self._server.pull_trigger()  # wake the loop so the close happens now

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        server = self._server
        # Sockets are closed by the loop's own thread (a trigger thunk), never under it;
        # with every dispatcher gone from its map the loop returns.
        server.trigger.pull_trigger(lambda: wasyncore.close_all(server._map))
        self._thread.join(timeout=5)
        server.task_dispatcher.shutdown(timeout=2)

    def server_close(self) -> None:
        self.shutdown()


def start_server(address: str, registry: CollectorRegistry, health: HealthState, *,
                 max_connections: int = MAX_CONNECTIONS,
                 request_timeout: float = REQUEST_TIMEOUT) -> MetricsServer:
    """Serve on `address` from a daemon thread; stop with `.shutdown()`."""
    host, port = parse_address(address)
    started = time.monotonic()
    server = waitress.create_server(
        make_app(registry, health),
        host=host, port=port, ipv4=":" not in host, ipv6=":" in host,
        threads=WORKER_THREADS,
        connection_limit=max_connections,
        channel_timeout=max(1, int(request_timeout)),
        cleanup_interval=1,
        max_request_header_size=16 * 1024,
        max_request_body_size=1024,
        clear_untrusted_proxy_headers=True,
        ident="imdswatch",
        asyncore_loop_timeout=0.5,
    )
    log.debug("metrics server bound to %s in %.3fs", address, time.monotonic() - started)
    return MetricsServer(server, request_timeout)
