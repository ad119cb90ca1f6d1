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


def started_tracer(probe: str):  # noqa: ANN201 - tracer.Tracer, imported lazily
    """A tracer of the built-in catalog attached in mode `probe`, or a skip saying why not."""
    from scoring.endpoints import EndpointCatalog
    from tracer import ProbeError, Tracer

    t = Tracer(EndpointCatalog.from_config(), probe=probe)
    try:
        t.start()
    except ProbeError as exc:
        pytest.skip(f"the {probe} probe cannot attach on this machine: {exc}")
    return t


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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AgentProcess:
    """`imdswatch run` as a real subprocess, with its metrics address and alert file."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.workdir = Path(workdir)
        self.port = free_port()
        self.alerts = self.workdir / "alerts.ndjson"
        self.log = self.workdir / "agent.log"
        exe = HERE.parent / ".venv" / "bin" / "imdswatch"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-c",
                                               "from imdswatch.cli import main; main()"]
        self.argv = [*cmd, "run", "--metrics-address", f"127.0.0.1:{self.port}",
                     "--output", str(self.alerts), *args]
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.ready_after: float | None = None

    def start(self, timeout: float = 180.0) -> AgentProcess:
        self.started_at = time.monotonic()
        # Generous: auto compiles each probe it tries, which takes tens of seconds on a
        # loaded 2-core machine; this waits for readiness, it does not time it.
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "wb"), cwd=self.workdir)
        if not wait_for(lambda: self.ready() or self.proc.poll() is not None, timeout, 0.02):
            raise RuntimeError(f"agent not ready after {timeout}s: {self.log.read_text()}")
        if self.proc.poll() is not None:
            raise RuntimeError(f"agent exited {self.proc.returncode}: {self.log.read_text()}")
        self.ready_after = time.monotonic() - self.started_at
        return self

    def get(self, path: str) -> tuple[int, str]:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=2) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""
        except OSError:
            return 0, ""

    def ready(self) -> bool:
        return self.get("/readyz")[0] == 200

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        total = 0.0
        for line in self.get("/metrics")[1].splitlines():
            if not line.startswith(name) or line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            metric, _, lab = head.partition("{")
            if metric != name:
                continue
            if all(f'{k}="{v}"' in lab for k, v in labels.items()):
                total += float(value)
        return total

    def alert_lines(self) -> list[dict]:
        import json

        if not self.alerts.exists():
            return []
        return [json.loads(x) for x in self.alerts.read_text().splitlines() if x.strip()]

    def rss_kb(self) -> tuple[int, int]:
        """(current, peak) resident set size of the agent in KiB."""
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            fields[k] = v.split()[0] if v.split() else "0"
        return int(fields.get("VmRSS", 0)), int(fields.get("VmHWM", 0))

    def stop(self, sig: int = 15, timeout: float = 10.0) -> tuple[int, float]:
        """Send `sig`; returns (exit status, seconds to exit)."""
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout)
        return rc, time.monotonic() - t0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def warm_state(path: Path, days: float = 3.0, hosts: int = 20, events: int = 3000) -> None:
    """A model that has seen only amazon-ssm-agent call IMDS on a fleet for `days`: curl, wget
    and friends are then rare, as in the contract's replay-warms-the-agent flow."""
    from scoring.events import event_from_ecs
    from scoring.scorer import Scorer
    from scoring.settings import ScorerSettings
    from scoring.state import save_state

    scorer = Scorer(ScorerSettings(learning_period=0))
    t0 = time.time() - days * 86400
    step = days * 86400 / events
    for i in range(events):
        scorer.process(event_from_ecs({
            "@timestamp": t0 + i * step,
            "destination": {"ip": "169.254.169.254", "port": 80},
            "process": {"name": "amazon-ssm-agent", "executable": "/usr/bin/amazon-ssm-agent",
                        "parent": {"name": "systemd", "executable": "/usr/lib/systemd/systemd"}},
            "user": {"name": "root", "id": "0"},
            "host": {"name": f"node-{i % hosts}"},
        }))
    save_state(path, scorer)
