# Metadata addresses here are event data only; nothing connects to them, so no netns is needed.
"""Replay progress: lines, rate, share and ETA on a terminal (a real pty), and not one extra
byte on a standard error that is a file or a pipe."""

import gzip
import json
import os
import pty
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "imdswatch.cli", "replay"]


def write_events(path: Path, n: int = 60_000) -> None:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as fh:
        for i in range(n):
            fh.write(json.dumps({"@timestamp": 1_700_000_000 + i,
                                 "destination": {"ip": "169.254.169.254"},
                                 "process": {"name": f"agent{i % 3}"},
                                 "host": {"name": f"n{i % 5}"}}) + "\n")


def run_on_pty(argv: list[str], env: dict) -> tuple[int, str]:
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=slave, cwd=ROOT, env=env)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=120), b"".join(chunks).decode("utf-8", "replace")


def test_progress_on_a_terminal(tmp_path) -> None:
    for name in ("events.ndjson", "events.ndjson.gz"):
        events = tmp_path / name
        write_events(events)
        env = {**os.environ, "IMDSWATCH_PROGRESS_INTERVAL": "0"}
        rc, err = run_on_pty([*CLI, str(events), "--output", str(tmp_path / "a.ndjson")], env)
        assert rc == 0, err
        updates = [u for u in err.split("\r\x1b[K") if u.startswith("replay: ")
                   and "lines/s" in u]
        assert updates, err
        last = updates[-1]
        assert " lines, " in last and "% of " in last and "ETA " in last, last
        # The line is erased before the summary, which then reads as before.
        assert "\r\x1b[Kimdswatch replay: 60000 lines" in err


def test_no_progress_when_stderr_is_not_a_terminal(tmp_path) -> None:
    events = tmp_path / "events.ndjson"
    write_events(events, 20_000)
    env = {**os.environ, "IMDSWATCH_PROGRESS_INTERVAL": "0"}
    r = subprocess.run([*CLI, str(events), "--output", str(tmp_path / "a.ndjson")],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "\x1b" not in r.stderr and "ETA" not in r.stderr
    assert r.stderr.startswith("imdswatch replay: 20000 lines")
