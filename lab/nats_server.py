"""A real `nats-server` (Debian's, installed by `make setup`) as a child process, for the
bus tests and benchmarks: JetStream on, bound to loopback, its own config, store directory
and free ports, alone or in a cluster, stopped by its own pid.

Never port 4222: on a machine with systemd, Debian's package runs its own server there."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"


class NatsUnavailable(RuntimeError):
    """nats-server is missing or did not become healthy; the message says why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsServer:
    def __init__(self, root: Path, name: str, *, extra: str = "",
                 cluster: dict | None = None, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.dir = Path(root) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.http = free_port()
        self.cluster = cluster  # {"name", "port", "routes": [urls]}
        self.extra = extra  # more configuration (files it includes go in `dir`)
        self.env = env  # added to the server's environment (its config may use $VARS)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.dir / "server.log"

    def write_conf(self) -> Path:
        lines = [
            f'server_name: "{self.name}"', "host: 127.0.0.1", f"port: {self.port}",
            f"http: 127.0.0.1:{self.http}",
            f'jetstream {{ store_dir: "{self.dir / "js"}", max_memory_store: 128MB, '
            "max_file_store: 2GB }",
        ]
        if self.cluster:
            routes = ", ".join(f'"{r}"' for r in self.cluster["routes"])
            lines.append(f'cluster {{ name: "{self.cluster["name"]}", host: 127.0.0.1, '
                         f'port: {self.cluster["port"]}, routes: [{routes}] }}')
        lines.append(self.extra)
        path = self.dir / "server.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def launch(self) -> None:
        """Start the process (not waiting for it: see `wait_ready`)."""
        if not shutil.which(NATS_SERVER):
            raise NatsUnavailable(f"{NATS_SERVER} is missing: `make setup` installs Debian's "
                                  "nats-server")
        conf = self.write_conf()
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen([NATS_SERVER, "-c", str(conf)], stdout=logf,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, **(self.env or {})})

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until its monitoring /healthz answers 200 (JetStream up too)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.http}/healthz",
                                            timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() \
            else ""
        self.stop()
        raise NatsUnavailable(f"nats-server {self.name} did not become healthy: {tail}")

    def start(self, timeout: float = 20.0) -> NatsServer:
        self.launch()
        self.wait_ready(timeout)
        return self

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


def cluster(root: Path, n: int = 3, extra: str = "",
            cls: type[NatsServer] = NatsServer) -> list[NatsServer]:
    """`n` servers routed to each other (not started)."""
    ports = [free_port() for _ in range(n)]
    servers = []
    for i in range(n):
        routes = [f"nats://127.0.0.1:{p}" for j, p in enumerate(ports) if j != i]
        servers.append(cls(root, f"n{i + 1}", extra=extra, cluster={
            "name": "imdswatch-lab", "port": ports[i], "routes": routes}))
    return servers


def start_all(servers: list[NatsServer], timeout: float = 30.0) -> list[NatsServer]:
    try:
        for s in servers:
            s.launch()
        for s in servers:
            s.wait_ready(timeout)
    except NatsUnavailable:
        for s in servers:
            s.stop()
        raise
    return servers


def urls(servers: list[NatsServer]) -> str:
    return ",".join(s.url for s in servers)
