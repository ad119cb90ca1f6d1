# Metadata addresses in this file are data (event fields): nothing here connects anywhere.
"""`imdswatch replay` and `imdswatch serve` under a 200,000-name flood: three quiet days of
a fleet on which only the SSM agent calls the metadata service, then one host where a
process renames itself before each of 200,000 connects (the agent flood's shape, as an
export records it), then the attack that must still alert (a curl copy under a new name
and a uid of its own asks for the role's credentials without the anti-SSRF header).

Replay reads it from a gzip file as `imdswatch replay FILE` does; serve ingests it over
HTTP (`POST /v1/events`, gzip bodies of 5,000 events) as an agent's spool sends it, and its
peak is its VmHWM until it has exited (the final checkpoint included). Each runs as a
child process with its defaults; the figure is the peak RSS (VmHWM) of its largest process
(`ru_maxrss` of the children, the forked reader included), beside the same command on the
quiet days alone. Target: <= 256 MiB, and the attack alerts.

    python -m bench.replay_flood [--names 200000] [--only replay|serve]

`run(quick)` returns a bench.rows.Section.
"""

from __future__ import annotations

import argparse
import gzip
import os
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import orjson

from bench.rows import Row, Section

ROOT = Path(__file__).resolve().parent.parent
IMDSWATCH = ROOT / ".venv" / "bin" / "imdswatch"
RSS_TARGET_MIB = 256
START = 1_772_409_600.0  # 2026-03-02T00:00:00Z
DAY = 86400.0
HISTORY_DAYS = 3.0
HOSTS = 20
HISTORY_EVENTS = 6000
FLOOD_RATE = 1500.0  # names per second of event time, as the agent flood paces them
CREDENTIALS = "/latest/meta-data/iam/security-credentials/test-role"


def _ts(t: float) -> str:
    ms = round(t * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def _doc(t: float, host: str, name: str, exe: str, user: str, uid: str, parent: str,
         n: int, request: bool = False) -> dict:
    doc = {"@timestamp": _ts(t), "event": {"id": f"f-{n}"},
           "destination": {"ip": "169.254.169.254", "port": 80},
           "process": {"name": name, "executable": exe, "pid": 1000 + n % 60000,
                       "parent": {"name": parent}},
           "user": {"name": user, "id": uid}, "host": {"name": host}}
    if request:
        doc["event"]["action"] = "http_request"
        doc["http"] = {"request": {"method": "GET"}}
        doc["url"] = {"path": CREDENTIALS}
        doc["user_agent"] = {"original": "curl/7.88.1"}
        doc["imdswatch"] = {"request": {"guarded": False}}
    return doc


def history() -> Iterator[dict]:
    step = HISTORY_DAYS * DAY / HISTORY_EVENTS
    for i in range(HISTORY_EVENTS):
        yield _doc(START + i * step, f"node-{i % HOSTS}", "amazon-ssm-agent",
                   "/usr/bin/amazon-ssm-agent", "root", "0", "systemd", i)


def flood(names: int) -> Iterator[dict]:
    t = START + HISTORY_DAYS * DAY
    for i in range(names):
        yield _doc(t + i / FLOOD_RATE, "node-0", f"f{i:x}"[:15], "/tmp/flood/client", "root",
                   "0", "bash", HISTORY_EVENTS + i)
    uid = str(20000 + secrets.randbelow(40000))
    yield _doc(t + names / FLOOD_RATE + 5, "node-0", "atk" + secrets.token_hex(4),
               "/tmp/flood/atk", f"uid:{uid}", uid, "bash", HISTORY_EVENTS + names,
               request=True)


def write_trace(path: Path, names: int) -> None:
    with gzip.open(path, "wb", compresslevel=1) as f:
        for doc in history():
            f.write(orjson.dumps(doc) + b"\n")
        if names:
            for doc in flood(names):
                f.write(orjson.dumps(doc) + b"\n")


def _peak_child_mib(argv: list[str], timeout: float = 1800) -> tuple[float, subprocess.
                                                                         CompletedProcess]:
    """Runs argv in a fresh Python that reports the largest descendant's peak RSS."""
    code = ("import resource, subprocess, sys, json; "
            "r = subprocess.run(sys.argv[1:], capture_output=True); "
            "sys.stderr.buffer.write(r.stderr); "
            "print(json.dumps([resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
            "r.returncode]))")
    p = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                       timeout=timeout)
    last = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else "[0, -1]"
    kib, rc = orjson.loads(last)
    return kib / 1024, subprocess.CompletedProcess(argv, rc, p.stdout, p.stderr)


def replay_rows(names: int, tmp: Path) -> list[Row]:
    quiet, flooded = tmp / "quiet.ndjson.gz", tmp / "flood.ndjson.gz"
    write_trace(quiet, 0)
    write_trace(flooded, names)
    base, _ = _peak_child_mib([str(IMDSWATCH), "replay", str(quiet), "--output",
                               str(tmp / "quiet-alerts.ndjson")])
    out = tmp / "flood-alerts.ndjson"
    peak, r = _peak_child_mib([str(IMDSWATCH), "replay", str(flooded), "--output", str(out)])
    alerts = [orjson.loads(x) for x in out.read_bytes().splitlines()] if out.exists() else []
    caught = any(a.get("process", {}).get("name", "").startswith("atk") for a in alerts)
    return [
        Row(f"replay: peak RSS (largest process) over a {names:,}-name flood", round(peak, 1),
            "MiB", "the quiet days alone", round(base, 1), f"<= {RSS_TARGET_MIB} MiB",
            peak <= RSS_TARGET_MIB and r.returncode == 0),
        Row("replay: alert lines for the attack after the flood", sum(
            a.get("process", {}).get("name", "").startswith("atk") for a in alerts), "",
            "alert lines in all", len(alerts), ">= 1", caught),
    ]


def serve_rows(names: int, tmp: Path) -> list[Row]:
    """serve (no token: loopback) fed by one sender, as an agent's spool sends it."""
    from bench.serve_bench import Sender, Serve

    docs = [*history(), *flood(names)]
    quiet = Serve(tmp / "quiet")
    try:
        Sender(quiet.port).post(b"".join(orjson.dumps(d) + b"\n" for d in history()))
        quiet.wait_scored(HISTORY_EVENTS, 300)
    finally:
        base = quiet.stop_measured() / 2**20
    serve = Serve(tmp / "flood")
    try:
        sender = Sender(serve.port, serve)
        for i in range(0, len(docs), 5000):
            sender.post(b"".join(orjson.dumps(d) + b"\n" for d in docs[i:i + 5000]))
        scored = serve.wait_scored(len(docs), 900)
    finally:
        peak = serve.stop_measured() / 2**20
    out = serve.alerts
    alerts = [orjson.loads(x) for x in out.read_bytes().splitlines()] if out.exists() else []
    caught = sum(a.get("process", {}).get("name", "").startswith("atk") for a in alerts)
    return [
        Row(f"serve: peak RSS (VmHWM) over a {names:,}-name flood", round(peak, 1), "MiB",
            "the quiet days alone", round(base, 1), f"<= {RSS_TARGET_MIB} MiB",
            peak <= RSS_TARGET_MIB and scored),
        Row("serve: alert lines for the attack after the flood", caught, "",
            "alert lines in all", len(alerts), ">= 1", caught >= 1),
    ]


def run(quick: bool = False, names: int | None = None,
        only: tuple[str, ...] = ("replay",)) -> Section:
    n = names or (20_000 if quick else 200_000)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="imdswatch-replay-flood-") as d:
        if "replay" in only:
            rows += replay_rows(n, Path(d))
        if "serve" in only:
            (Path(d) / "quiet").mkdir()
            (Path(d) / "flood").mkdir()
            rows += serve_rows(n, Path(d))
    sec = Section(rows)
    sec.notes.append(
        f"{HISTORY_DAYS:.0f} quiet days ({HISTORY_EVENTS:,} calls of the SSM agent on {HOSTS} "
        f"hosts), then {n:,} connects under as many names on one host at {FLOOD_RATE:,.0f}/s "
        "of event time (one executable, user and parent: the shape of the agent flood), then "
        "a curl copy under a new name and uid asks for the role's credentials without the "
        "anti-SSRF header. Each command runs with its defaults in a child process; the peak "
        "is the largest descendant's ru_maxrss (the forked reader is one), beside the same "
        "command on the quiet days alone.")
    return sec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--names", type=int, default=200_000)
    ap.add_argument("--only", action="append", choices=["replay", "serve"])
    args = ap.parse_args()
    sec = run(names=args.names, only=tuple(args.only or ("replay", "serve")))
    for row in sec.rows:
        print(f"{row.name}: {row.value} {row.unit} ({row.baseline}: {row.baseline_value}; "
              f"target {row.target}: {'ok' if row.ok else 'MISSED'})")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
