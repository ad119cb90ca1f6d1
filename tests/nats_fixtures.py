"""Real `nats-server` processes (Debian's, installed by `make setup`) on loopback for the
bus tests: each with its own config, store directory and free ports, JetStream on, alone or
three in a cluster, always stopped. A test that needs one and cannot start it fails."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from netns_fixtures import free_port

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
# What the test user may do, and what serve's needs: the example config's permissions.
SERVE_USER, SERVE_PASSWORD = "imdswatch-serve", "serve-pw-" + "x" * 24
READER_USER, READER_PASSWORD = "alerts-reader", "reader-pw-" + "y" * 24


def auth_block() -> str:
    """Users and permissions as deploy/nats/nats.conf grants them (no anonymous user)."""
    return f"""
authorization {{
  users: [
    {{ user: "{SERVE_USER}", password: "{SERVE_PASSWORD}",
      permissions: {{
        publish: ["imdswatch.events", "imdswatch.ledger.>", "$JS.API.>",
                  "$KV.IMDSWATCH_LEASE.>", "$O.IMDSWATCH_CKPT.>", "$JS.FC.>"],
        subscribe: ["_INBOX.>", "imdswatch.alerts", "$O.IMDSWATCH_CKPT.>"] }} }},
    {{ user: "{READER_USER}", password: "{READER_PASSWORD}",
      permissions: {{ publish: {{ deny: [">"] }}, subscribe: ["imdswatch.alerts", "_INBOX.>"] }} }}
  ]
}}
"""


class NatsServer:
    def __init__(self, root: Path, name: str, *, extra: str = "",
                 cluster: dict | None = None) -> None:
        self.name = name
        self.dir = Path(root) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.http = free_port()
        self.cluster = cluster  # {"name", "port", "routes": [...]}
        self.extra = extra
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def conf(self) -> Path:
        lines = [
            f'server_name: "{self.name}"', "host: 127.0.0.1", f"port: {self.port}",
            f"http: 127.0.0.1:{self.http}",
            f'jetstream {{ store_dir: "{self.dir / "js"}", max_memory_store: 128MB, '
            "max_file_store: 1GB }",
        ]
        if self.cluster:
            routes = ", ".join(f'"{r}"' for r in self.cluster["routes"])
            lines.append(f'cluster {{ name: "{self.cluster["name"]}", host: 127.0.0.1, '
                         f'port: {self.cluster["port"]}, routes: [{routes}] }}')
        lines.append(self.extra)
        path = self.dir / "server.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, timeout: float = 20.0) -> NatsServer:
        if not os.access(NATS_SERVER, os.X_OK):
            pytest.fail(f"{NATS_SERVER} is missing: `make setup` installs Debian's nats-server")
        conf = self.conf()
        with open(self.dir / "server.log", "ab") as logf:
            self.proc = subprocess.Popen([NATS_SERVER, "-c", str(conf)], stdout=logf,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        if not self.wait_ready(timeout):
            self.stop()
            pytest.fail(f"nats-server {self.name} did not become healthy: "
                        f"{(self.dir / 'server.log').read_text()[-2000:]}")
        return self

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/healthz",
                                            timeout=1) as r:
                    if r.status == 200:
                        return True
            except OSError:
                pass
            time.sleep(0.05)
        return False

    def send(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def cluster(root: Path, n: int = 3, extra: str = "") -> list[NatsServer]:
    ports = [free_port() for _ in range(n)]
    servers = []
    for i in range(n):
        routes = [f"nats://127.0.0.1:{p}" for j, p in enumerate(ports) if j != i]
        servers.append(NatsServer(root, f"n{i + 1}", extra=extra,
                                  cluster={"name": "imdswatch-test", "port": ports[i],
                                           "routes": routes}))
    return servers


def urls(servers: list[NatsServer]) -> str:
    return ",".join(s.url for s in servers)


def start_all(servers: list[NatsServer], timeout: float = 30.0) -> list[NatsServer]:
    for s in servers:
        s.proc = None
    for s in servers:
        conf = s.conf()
        with open(s.dir / "server.log", "ab") as logf:
            s.proc = subprocess.Popen([NATS_SERVER, "-c", str(conf)], stdout=logf,
                                      stderr=subprocess.STDOUT, start_new_session=True)
    for s in servers:
        if not s.wait_ready(timeout):
            for t in servers:
                t.stop()
            pytest.fail(f"nats-server {s.name} did not become healthy: "
                        f"{(s.dir / 'server.log').read_text()[-2000:]}")
    return servers


def run_client(url: str, coro_fn, **connect) -> object:
    """Run `coro_fn(nc, js)` with a fresh nats-py client (the test's own view of the bus)."""
    import nats

    async def main() -> object:
        async def quiet(_e: Exception) -> None:
            pass

        options = {"error_cb": quiet, "connect_timeout": 2, "max_reconnect_attempts": 20,
                   "reconnect_time_wait": 0.5, **connect}
        nc = await nats.connect(url.split(","), **options)
        try:
            return await coro_fn(nc, nc.jetstream(timeout=10))
        finally:
            await nc.close()

    return asyncio.run(main())


def ledger_alerts(url: str, stream: str = "IMDSWATCH", **connect) -> list[bytes]:
    """Every alert record of the ledger, in order (a reader's exactly-once view)."""

    async def read(_nc, js) -> list[bytes]:
        from nats.js.errors import NotFoundError

        out: list[bytes] = []
        seq = 1
        while True:
            try:
                m = await js.get_msg(f"{stream}_LEDGER", seq=seq,
                                     subject="imdswatch.ledger.alert", next=True)
            except NotFoundError:
                return out
            out.append(m.data)
            seq = m.seq + 1

    return run_client(url, read, **connect)  # type: ignore[return-value]


class AlertSubscriber:
    """A plain (core NATS) subscriber of `imdswatch.alerts` in a thread of its own."""

    def __init__(self, url: str, **connect) -> None:
        import threading

        self.url = url
        self.connect = connect
        self.messages: list[bytes] = []
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "the alert subscriber did not connect"

    async def _main(self) -> None:
        import nats

        async def quiet(_e: Exception) -> None:
            pass

        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        nc = await nats.connect(self.url.split(","), error_cb=quiet,
                                max_reconnect_attempts=-1, reconnect_time_wait=0.2,
                                **self.connect)

        async def cb(msg) -> None:
            self.messages.append(msg.data)

        await nc.subscribe("imdswatch.alerts", cb=cb)
        await nc.flush()
        self._ready.set()
        await self._stop.wait()
        await nc.close()

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def ledger_records(url: str, stream: str = "IMDSWATCH", **connect) -> list[tuple]:
    """Every record of the ledger: (sequence, subject, data, headers)."""

    async def read(_nc, js) -> list[tuple]:
        from nats.js.errors import NotFoundError

        info = await js.stream_info(f"{stream}_LEDGER")
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                m = await js.get_msg(f"{stream}_LEDGER", seq=seq)
            except NotFoundError:
                continue
            out.append((m.seq, m.subject, m.data, m.headers or {}))
        return out

    return run_client(url, read, **connect)  # type: ignore[return-value]


class Proxy:
    """A TCP relay to a server that a test can cut as a network partition would: while cut,
    nothing is forwarded either way and new connections hang, but no connection is closed
    (the client must notice by itself, as behind a dead link)."""

    def __init__(self, target_port: int) -> None:
        import threading

        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut = threading.Event()
        self.closed = False
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        import threading

        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            while self.cut.is_set() and not self.closed:
                time.sleep(0.05)  # the link is down: the connection goes nowhere
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(0.1)
        while not self.closed:
            if self.cut.is_set():
                time.sleep(0.05)
                continue
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            if self.cut.is_set():
                continue  # lost on the way
            try:
                dst.sendall(data)
            except OSError:
                break
        for s in (src, dst):
            try:
                s.close()
            except OSError:
                pass

    def heal(self) -> None:
        """The link is back; connections from before the cut are dead."""
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.close()
            except OSError:
                pass
        self.cut.clear()

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        self.heal()
