"""Test network namespaces holding metadata addresses, with a mock IMDS served inside.

SAFETY: every connection a test makes to a metadata address goes through
`MetadataNamespace.run`/`popen`, which execute inside a fresh namespace whose only
interface is loopback carrying those addresses. Nothing can reach a real metadata service.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
DEFAULT_V4 = ("169.254.169.254", "169.254.170.2")
DEFAULT_V6 = ("fd00:ec2::254",)


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: BPF programs and network namespaces need CAP_SYS_ADMIN")


def require_bcc() -> None:
    require_root()
    try:
        import bcc  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"needs BCC (apt-get install python3-bpfcc; make setup): {exc}")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's `ip` for network namespaces")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


class MetadataNamespace:
    """`with MetadataNamespace() as ns: ns.run(["curl", ...])`"""

    def __init__(
        self,
        v4: tuple[str, ...] = DEFAULT_V4,
        v6: tuple[str, ...] = DEFAULT_V6,
        ports: tuple[int, ...] = (80,),
    ) -> None:
        self.name = f"imdsw-test-{secrets.token_hex(4)}"
        self.v4, self.v6, self.ports = v4, v6, ports
        self._server: subprocess.Popen | None = None

    def __enter__(self) -> MetadataNamespace:
        _ip("netns", "add", self.name)
        try:
            _ip("-n", self.name, "link", "set", "lo", "up")
            for a in self.v4:
                _ip("-n", self.name, "addr", "add", f"{a}/32", "dev", "lo")
            for a in self.v6:
                _ip("-n", self.name, "-6", "addr", "add", f"{a}/128", "dev", "lo", "nodad")
            self._server = subprocess.Popen(
                ["ip", "netns", "exec", self.name, sys.executable, str(HERE / "mock_imds.py"),
                 *map(str, self.ports)],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
            )
            line = self._server.stdout.readline() if self._server.stdout else ""
            if line.strip() != "ready":
                raise RuntimeError("mock IMDS did not start in the test namespace")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._server is not None:
            self._server.kill()
            self._server.wait(timeout=10)
            self._server = None
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)

    def argv(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *cmd]

    def run(self, cmd: list[str], timeout: float = 20, **kw: object) -> subprocess.CompletedProcess:
        """Run `cmd` inside the namespace."""
        return subprocess.run(self.argv(cmd), capture_output=True, text=True, timeout=timeout,
                              **kw)

    def popen(self, cmd: list[str], **kw: object) -> subprocess.Popen:
        return subprocess.Popen(self.argv(cmd), **kw)


def wait_for(predicate: object, timeout: float = 5.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@pytest.fixture
def metadata_ns():
    require_bcc()
    with MetadataNamespace() as ns:
        yield ns


class Collector:
    """Polls a started tracer from a background thread (the only thread touching it), so
    events are enriched while their processes still run, as in the agent."""

    def __init__(self, tracer: object) -> None:
        import threading

        self.tracer = tracer
        self.docs: list[dict] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            docs = self.tracer.poll(50)
            if docs:
                with self._lock:
                    self.docs.extend(docs)

    def __enter__(self) -> Collector:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def matching(self, **want: object) -> list[dict]:
        """Documents whose process.name / process.pid / destination.ip / destination.port
        equal `want` (keys: name, pid, ip, port)."""
        def ok(d: dict) -> bool:
            got = {"name": d["process"]["name"], "pid": d["process"]["pid"],
                   "ip": d["destination"]["ip"], "port": d["destination"]["port"]}
            return all(got[k] == v for k, v in want.items())

        with self._lock:
            return [d for d in self.docs if ok(d)]

    def wait(self, n: int = 1, timeout: float = 5.0, **want: object) -> list[dict]:
        wait_for(lambda: len(self.matching(**want)) >= n, timeout)
        return self.matching(**want)
