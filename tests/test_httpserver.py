"""The metrics server under hostile clients: slow and silent connections hold neither the
workers nor the port; Prometheus-style scrapes keep succeeding meanwhile."""

import gzip
import socket
import threading
import time
import urllib.request

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

from exporters.httpserver import HealthState, start_server
from lab.wait import wait_for


def scrape(port: int) -> tuple[int, float, bytes]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics",
        headers={"Accept": "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
                 "Accept-Encoding": "gzip", "User-Agent": "Prometheus/2.45.0"})
    t0 = time.monotonic()
    with urllib.request.urlopen(req, timeout=5) as resp:
        body = resp.read()
        if resp.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        return resp.status, time.monotonic() - t0, body


def slowloris(port: int, stop: threading.Event, sockets: list) -> None:
    """Opens a connection and trickles a request header one byte at a time."""
    s = socket.create_connection(("127.0.0.1", port))
    sockets.append(s)
    try:
        for ch in b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000:
            if stop.is_set():
                return
            s.sendall(bytes([ch]))
            time.sleep(0.2)
    except OSError:
        return  # closed by the server: what we want


def test_slow_clients_do_not_block_scrapes() -> None:
    registry = CollectorRegistry()
    Counter("probe_total", "x", registry=registry).inc()
    health = HealthState()
    server = start_server("127.0.0.1:0", registry, health, max_connections=16,
                          request_timeout=3)
    port = server.server_address[1]
    stop = threading.Event()
    sockets: list[socket.socket] = []
    threads = [threading.Thread(target=slowloris, args=(port, stop, sockets), daemon=True)
               for _ in range(8)]
    silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        assert wait_for(lambda: len(sockets) == len(threads), timeout=10)
        worst = 0.0
        for _ in range(10):  # more scrapes than worker threads, while the slow ones hang on
            status, took, body = scrape(port)
            assert status == 200
            names = {f.name for f in text_string_to_metric_families(body.decode())}
            assert "probe" in names
            worst = max(worst, took)
            time.sleep(0.1)
        assert worst < 2.0
        # Past the request timeout the slow and the silent connections are closed: each
        # read waits for the server's hang-up, up to a deadline well past the timeout.
        deadline = time.monotonic() + 15
        for s in silent:
            s.settimeout(max(0.1, deadline - time.monotonic()))
            assert s.recv(100) == b""  # EOF: the server hung up
        assert scrape(port)[0] == 200
    finally:
        stop.set()
        for s in sockets + silent:
            s.close()
        server.shutdown()


def test_connection_cap_holds_the_excess_until_the_timeout_frees_a_slot() -> None:
    registry = CollectorRegistry()
    server = start_server("127.0.0.1:0", registry, HealthState(), max_connections=4,
                          request_timeout=2)
    port = server.server_address[1]
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    try:
        time.sleep(0.3)
        # All slots are taken: the scrape waits in the listen queue (the cap holds) until
        # the silent connections time out, then is answered.
        req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
        t0 = time.monotonic()
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
        assert 1.0 < time.monotonic() - t0 < 6.0
    finally:
        for s in held:
            s.close()
        server.shutdown()


def test_routes_and_methods() -> None:
    health = HealthState()
    server = start_server("127.0.0.1:0", CollectorRegistry(), health)
    port = server.server_address[1]
    try:
        def call(path: str, method: str = "GET") -> int:
            req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    return resp.status
            except urllib.error.HTTPError as exc:
                return exc.code

        assert call("/readyz") == 503
        health.set_ready(True, "ok")
        assert call("/readyz") == 200 and call("/healthz") == 200
        assert call("/metrics", "POST") == 405
        assert call("/metrics?name[]=x") == 200
        assert call("/nope") == 404
    finally:
        server.shutdown()
