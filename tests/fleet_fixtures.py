"""`imdswatch serve` as a real process on loopback, and the events the fleet tests send.

Events here are data: nothing connects to the metadata addresses they name."""

from __future__ import annotations

import gzip
import http.client
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
from helpers_events import DAY, T0, ev, to_ecs, unique_times
from helpers_events import fleet_events as helper_fleet
from netns_fixtures import HERE, free_port, wait_for

from lab import scrape

EXE = HERE.parent / ".venv" / "bin" / "imdswatch"
CMD = [str(EXE)] if EXE.exists() else [sys.executable, "-c",
                                       "from imdswatch.cli import main; main()"]


RARE = (  # (day, name, user, host): callers the fleet has never seen
    (1.2, "xmrig", "root", "node-3"), (1.3, "curl", "www-data", "node-5"),
    (1.5, "nc", "nobody", "node-1"), (1.7, "python3", "postgres", "node-6"),
    (1.9, "wget", "root", "node-2"),
)


def fleet_events(hosts: int = 8, days: float = 2.0, prefix: str = "e",
                 start: float = T0) -> list[bytes]:
    """A small fleet's habits (tests/helpers_events.py) and five rare callers after the
    first day, as ECS NDJSON lines in event-time order, each with an event.id."""
    evs = helper_fleet(hosts=hosts, days=days, start=start)
    for day, name, user, host in RARE:
        if day < days and int(host.split("-")[1]) < hosts:
            evs.append(ev(start + day * DAY, name, user=user, host=host, parent="bash"))
    unique_times(evs)
    out = []
    for i, e in enumerate(evs):
        e.event_id = f"{prefix}{i}"
        e.pid = 1000 + i % 30000
        out.append(orjson.dumps(to_ecs(e)))
    return out


class ServeProcess:
    def __init__(self, workdir: Path, *args: str, port: int | None = None,
                 state: Path | None = None, scheme: str = "http", output: str = "file") -> None:
        self.workdir = Path(workdir)
        self.port = port or free_port()
        self.metrics_port = free_port()
        self.state = state or self.workdir / "fleet-state.json"
        self.alerts = self.workdir / "fleet-alerts.ndjson"
        self.log = self.workdir / "serve.log"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.args = args
        # "-": alerts to standard output, which the test collects in the same file.
        self.output = output
        self.proc: subprocess.Popen | None = None

    @property
    def argv(self) -> list[str]:
        return [*CMD, "serve", "--listen", f"127.0.0.1:{self.port}",
                "--metrics-address", f"127.0.0.1:{self.metrics_port}",
                "--state", str(self.state),
                "--output", "-" if self.output == "-" else str(self.alerts), *self.args]

    def start(self, timeout: float = 30.0, wait_ready: bool = True) -> ServeProcess:
        out = open(self.alerts, "ab") if self.output == "-" else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(self.argv, stdout=out,
                                     stderr=open(self.log, "ab"), cwd=self.workdir)
        if wait_ready:
            ok = wait_for(lambda: self.ready() or self.proc.poll() is not None, timeout, 0.02)
            if not ok or self.proc.poll() is not None:
                raise RuntimeError(f"serve not ready: {self.log.read_text()}")
        return self

    def metrics_get(self, path: str) -> tuple[int, str]:
        return scrape.get(self.metrics_port, path, timeout=2)

    def ready(self) -> bool:
        return self.metrics_get("/readyz")[0] == 200

    def metric(self, name: str, **labels: str) -> float:
        return scrape.metric(self.metrics_get("/metrics")[1], name, **labels)

    def alert_lines(self) -> list[dict]:
        if not self.alerts.exists():
            return []
        return [json.loads(x) for x in self.alerts.read_text().splitlines() if x.strip()]

    def stop(self, sig: int = 15, timeout: float = 30.0) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def post(url: str, body: bytes, token: str | None = None, gz: bool = False,
         headers: dict | None = None, context: object = None) -> tuple[int, dict, bytes]:
    """One POST /v1/events: (status, headers, body); status 0 when there was no answer."""
    h = {"Content-Type": "application/x-ndjson", **(headers or {})}
    if gz:
        body = gzip.compress(body)
        h["Content-Encoding"] = "gzip"
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"{url}/v1/events", data=body, headers=h, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30, context=context) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()
    except (OSError, http.client.HTTPException):
        # No answer, or one cut short (an IncompleteRead when serve is killed mid-reply).
        return 0, {}, b""


def replay_alerts(tmp: Path, events: list[bytes], *args: str) -> list[dict]:
    """`imdswatch replay` of `events` (in the order given): its alert documents."""
    src = tmp / "replay-in.ndjson"
    out = tmp / "replay-alerts.ndjson"
    src.write_bytes(b"\n".join(events) + b"\n")
    subprocess.run([*CMD, "replay", str(src), "--output", str(out), *args], check=True,
                   capture_output=True, timeout=120)
    return [json.loads(x) for x in out.read_text().splitlines() if x.strip()]


def comparable(alerts: list[dict]) -> list[dict]:
    """Alerts without the field that says who scored them."""
    out = []
    for a in alerts:
        a = json.loads(json.dumps(a))
        a.get("imdswatch", {}).pop("scored_by", None)
        out.append(a)
    return out


def wait_scored(serve: ServeProcess, n: int, timeout: float = 30.0) -> bool:
    return wait_for(lambda: serve.metric("imdswatch_fleet_events_scored_total") >= n, timeout)


def settle(seconds: float = 1.0) -> None:
    time.sleep(seconds)
