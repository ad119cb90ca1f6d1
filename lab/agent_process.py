"""The real agent, `imdswatch run`, as a child process: started, watched through its
metrics address and alert file, stopped. Used by the demo, the tests and the benchmarks."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from lab import scrape

COMMAND = [sys.executable, "-m", "imdswatch.cli"]


class AgentStartError(RuntimeError):
    """The agent exited or was not ready in time; the message holds its log's tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AgentProcess:
    """`imdswatch run ARGS` in `workdir`, metrics on a free loopback port, alerts to
    `workdir/alerts.ndjson`, its standard error to `workdir/agent.log`. `env` adds to the
    environment; `own_session` keeps a terminal's Ctrl-C away from it."""

    def __init__(self, workdir: Path, *args: str, env: dict[str, str] | None = None,
                 own_session: bool = False) -> None:
        self.workdir = Path(workdir)
        self.port = free_port()
        self.alerts = self.workdir / "alerts.ndjson"
        self.log = self.workdir / "agent.log"
        self.argv = [*COMMAND, "run", "--metrics-address", f"127.0.0.1:{self.port}",
                     "--output", str(self.alerts), *args]
        self.env = {**os.environ, **(env or {})}
        self.own_session = own_session
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.ready_after: float | None = None

    def start(self, timeout: float = 180.0) -> AgentProcess:
        """Start it and wait until /readyz answers 200. Generous by default: `auto`
        compiles each probe it tries, tens of seconds on a loaded two-core machine."""
        self.started_at = time.monotonic()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=log,
                                         cwd=self.workdir, env=self.env,
                                         start_new_session=self.own_session)
        deadline = self.started_at + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AgentStartError(f"the agent exited with status {self.proc.returncode}:\n"
                                      + self.log_tail())
            if self.ready():
                self.ready_after = time.monotonic() - self.started_at
                return self
            time.sleep(0.05)
        raise AgentStartError(f"the agent was not ready after {timeout:.0f}s:\n"
                              + self.log_tail())

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def log_lines(self, containing: str) -> list[str]:
        return [x for x in self.log_tail(1 << 30).splitlines() if containing in x]

    def get(self, path: str) -> tuple[int, str]:
        return scrape.get(self.port, path)

    def ready(self) -> bool:
        return self.get("/readyz")[0] == 200

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        return scrape.metric(self.get("/metrics")[1], name, **labels)

    def alert_lines(self) -> list[dict]:
        """The alerts written so far (a line being written right now is left out)."""
        try:
            text = self.alerts.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def rss_kb(self) -> tuple[int, int]:
        """(current, peak) resident set size of the agent in KiB."""
        assert self.proc is not None
        fields = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            fields[k] = v.split()[0] if v.split() else "0"
        return int(fields.get("VmRSS", 0)), int(fields.get("VmHWM", 0))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> tuple[int, float]:
        """Send `sig` and wait; returns (exit status, seconds to exit). Killed if it has
        not exited within `timeout` (the status then says so)."""
        assert self.proc is not None
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(10)
        return rc, time.monotonic() - t0

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
