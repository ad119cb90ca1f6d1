"""Real `nats-server` processes (Debian's, installed by `make setup`) on loopback for the
bus tests: each with its own config, store directory and free ports, JetStream on, alone or
three in a cluster, always stopped. A test that needs one and cannot start it fails."""

from __future__ import annotations

import asyncio
import shutil
import socket
import time
from pathlib import Path

import pytest

import lab.nats_server as lab_nats

# The example config's users (deploy/kubernetes/nats/auth.conf), with test passwords.
AUTH_CONF = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes" / "nats" / "auth.conf"
SERVE_USER, SERVE_PASSWORD = "imdswatch-serve", "serve-pw-" + "x" * 24
READER_USER, READER_PASSWORD = "imdswatch-alerts", "alerts-pw-" + "y" * 24


def with_example_auth(server: lab_nats.NatsServer) -> lab_nats.NatsServer:
    """`server` with the example config's accounts, users and permissions."""
    shutil.copy(AUTH_CONF, server.dir / "auth.conf")
    server.extra += "\ninclude ./auth.conf\n"
    server.env = {**(server.env or {}), "SERVE_PASSWORD": SERVE_PASSWORD,
                  "ALERTS_PASSWORD": READER_PASSWORD}
    return server


class NatsServer(lab_nats.NatsServer):
    """lab.nats_server's server; one that cannot start fails the test (never a skip)."""

    def start(self, timeout: float = 20.0) -> NatsServer:
        try:
            super().start(timeout)
        except lab_nats.NatsUnavailable as exc:
            pytest.fail(str(exc))
        return self


def cluster(root: Path, n: int = 3, extra: str = "") -> list[NatsServer]:
    return lab_nats.cluster(root, n, extra, cls=NatsServer)  # type: ignore[return-value]


def start_all(servers: list[NatsServer], timeout: float = 30.0) -> list[NatsServer]:
    try:
        lab_nats.start_all(list(servers), timeout)
    except lab_nats.NatsUnavailable as exc:
        pytest.fail(str(exc))
    return servers


urls = lab_nats.urls


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
