"""Replay throughput: the real `imdswatch replay` command on a 500k-event gzip trace,
next to the baseline of merely reading and JSON-parsing the same lines with the JSON
libraries the replay uses (orjson, and msgspec for its fast path): the faster of the two
is the baseline, so the ratio is never flattered by a slow parser.

    python -m bench.throughput [--events 500000] [--repeat 2]

The replay runs as a subprocess (`imdswatch replay TRACE --output /dev/null`), timed
wall-clock from spawn to exit, so interpreter start-up, imports, gzip, parsing, endpoint
matching, scoring and alert writing are all included. The baseline runs in this process
(no start-up cost) on one thread, which makes the ratio conservative. Best of `repeat`
runs each, replay and baseline runs interleaved so both see the same machine.

The replay reads in a second process (its gzip in a thread there: zlib releases the
interpreter lock) and scores in its own, so its wall time depends on a second core being
free: the table gives its CPU time (user + system) as well, and the report the load average
around the run. Figures taken while other work runs on the machine are low for both sides;
the ratio moves less than the rates.
"""

from __future__ import annotations

import argparse
import gzip
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from bench.rows import Row, Section, render
from bench.scenario import generate

TARGET_EPS = 100_000.0
TARGET_RATIO = 0.7


def make_trace(path: Path, events: int, seed: int = 11) -> int:
    """An unlabelled gzip trace of exactly `events` lines (the scenario, cut short)."""
    scale = 1.0 if events > 300_000 else max(0.1, events / 550_000)
    sc = generate(seed, scale)
    while len(sc.trace) < events:  # never short of lines, whatever the volumes become
        scale *= 1.25
        sc = generate(seed, scale)
    return sc.trace.write(path, f"t{seed}", labels=False, limit=events)


def parsers() -> dict[str, Callable[[bytes], object]]:
    """Generic (schema-less) JSON decoders the replay depends on."""
    out: dict[str, Callable[[bytes], object]] = {"orjson": orjson.loads}
    try:
        import msgspec
    except ImportError:
        return out
    out["msgspec"] = msgspec.json.Decoder().decode
    return out


def parse_baseline(path: Path, loads: Callable[[bytes], object] = orjson.loads
                   ) -> tuple[int, float]:
    """Read and parse every line: the floor any replay must stand on."""
    n = 0
    t = time.perf_counter()
    with gzip.open(path, "rb") as f:
        for line in f:
            loads(line)
            n += 1
    return n, time.perf_counter() - t


def reading_alone(path: Path) -> tuple[int, float]:
    """The replay's own reading, without scoring: lines to Events through `read_events`
    (gzip thread, typed decode, `read_doc`), events discarded, at the reading process's
    switch interval: the half of the replay that runs in its reading process."""
    from collections import Counter

    from intake.forked_reader import SWITCH_INTERVAL
    from intake.join import ProcessJoin
    from intake.ndjson import numbered_lines
    from intake.reader import read_events
    from scoring.endpoints import EndpointCatalog

    match = EndpointCatalog.from_config().match
    switch = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL)
    try:
        n = 0
        t = time.perf_counter()
        for _ in read_events(numbered_lines(str(path)), match, lambda *_: None, Counter(),
                             ProcessJoin()):
            n += 1
        return n, time.perf_counter() - t
    finally:
        sys.setswitchinterval(switch)


def imdswatch_command() -> list[str]:
    exe = Path(sys.executable).with_name("imdswatch")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("imdswatch")
    if found:
        return [found]
    return [sys.executable, "-c", "from imdswatch.cli import main; main()"]


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def replay_subprocess(path: Path) -> tuple[float, str, float]:
    """Wall time of a full `imdswatch replay`, its summary (stderr) and its CPU time."""
    cmd = [*imdswatch_command(), "replay", str(path), "--output", os.devnull]
    cpu = _children_cpu()
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - t
    cpu = _children_cpu() - cpu
    if proc.returncode != 0:
        raise RuntimeError(f"imdswatch replay exited {proc.returncode}: {proc.stderr[-800:]}")
    return elapsed, proc.stderr, cpu


def run(quick: bool = False, events: int | None = None, repeat: int | None = None,
        workdir: Path | None = None) -> Section:
    events = events or (100_000 if quick else 500_000)
    repeat = repeat or (1 if quick else 2)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = Path(tmp) / f"trace-{events}.ndjson.gz"
        lines = make_trace(path, events)
        fns = parsers()
        timed: dict[str, float] = {name: float("inf") for name in fns}
        replays: list[tuple[float, float]] = []
        reading_s = float("inf")
        for _ in range(repeat):  # interleaved: both sides see the same machine
            for name, fn in fns.items():
                timed[name] = min(timed[name], parse_baseline(path, fn)[1])
            wall, _, cpu = replay_subprocess(path)
            replays.append((wall, cpu))
            reading_s = min(reading_s, reading_alone(path)[1])
    parser, parse_s = min(timed.items(), key=lambda kv: kv[1])
    replay_s, replay_cpu = min(replays)
    parse_eps, replay_eps = lines / parse_s, lines / replay_s
    ratio = replay_eps / parse_eps
    best = f"best of {repeat}" if repeat > 1 else "one run"
    rows = [
        Row(f"replay, end to end ({lines:,} gzip lines, {best})", round(replay_eps),
            "events/s", f"{parser} read+parse, {best}", round(parse_eps),
            f">= {TARGET_EPS:,.0f} events/s", replay_eps >= TARGET_EPS),
        Row("replay / parse throughput", round(ratio, 2), "x", "parse = 1.0", 1.0,
            f">= {TARGET_RATIO}", ratio >= TARGET_RATIO),
        Row("replay wall time (process start to exit)", round(replay_s, 2), "s",
            f"{parser} parse", round(parse_s, 2)),
        Row("replay CPU time (user + system, both processes and their threads)",
            round(replay_cpu, 2), "s",
            f"{parser} parse (one thread, wall)", round(parse_s, 2)),
        *(Row(f"{name} read+parse alone", round(lines / t), "events/s")
          for name, t in timed.items()),
        # The ceiling of the ratio: the replay's reading alone, before any scoring.
        Row("replay's reading alone (lines to Events, no scoring), in this process",
            round(lines / reading_s), "events/s", f"{parser} read+parse",
            round(parse_eps)),
        Row("reading alone / parse throughput", round(parse_s / reading_s, 2), "x",
            "parse = 1.0", 1.0),
    ]
    notes = [
        f"The real `imdswatch replay TRACE --output /dev/null` as a subprocess on a "
        f"{lines:,}-line gzip trace of the scenario, timed from spawn to exit (start-up, "
        "imports, gzip, parsing, endpoint matching, scoring and alert writing included), "
        "beside merely reading and JSON-parsing the same lines in this process with the "
        "libraries the replay uses (orjson, msgspec: the faster is the baseline, so the ratio "
        f"is never flattered by a slow parser). {best.capitalize()} each, replay and baseline "
        "runs interleaved so both see the same machine. The replay reads in a second process "
        "and scores in its own, so its wall time depends on a second core being free: its "
        "CPU time is given too, and other work on the machine lowers both sides.",
    ]
    return Section(rows, notes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="replay throughput vs orjson parse")
    ap.add_argument("--events", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    sec = run(args.quick, args.events, args.repeat)
    print(render("throughput", [r.as_dict() for r in sec.rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
