# Metadata addresses here are event data only; nothing connects to them, so no netns is needed.
"""`imdswatch serve --bus` benchmarks: real `imdswatch serve` replicas over a real
`nats-server` on loopback, each figure beside the local write-ahead log's in the same run.

    python -m bench.bus_bench [--quick]

* ingest: 60 concurrent senders post gzip NDJSON batches of 500 events as fast as they are
  acknowledged, for a fixed time, to one replica, then spread over three (one scores, all
  ingest); baseline: the same senders against a local-log `serve`. On two cores the
  replicas, the server and the senders share the same CPUs: the ratio says what the bus
  costs here, not what three machines would give.
* catch-up: a stream filled while nothing scored, worked through by a scoring replica;
  baseline: `imdswatch replay` of the same events.
* takeover: the scoring replica SIGKILLed (the lease must age out) and SIGTERMed (it gives
  the lease up): time until another replica reports `imdswatch_fleet_leader` 1; baseline:
  the lease's time to live.
* latency: 10 senders at 100 events/s each, each batch holding one caller never seen
  before; the time from the POST to the alert line in the scoring replica's output, over
  the bus (three replicas) and through the local log.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson

from bench.rows import Row, Section, render
from bench.serve_bench import CMD, Sender, Serve, _events, warm_state
from lab.nats_server import NatsServer

LEASE_TTL = 4.0


def _replicas(tmp: Path, url: str, n: int, *args: str) -> list[Serve]:
    out = []
    for i in range(n):
        d = tmp / f"r{i}"
        d.mkdir(parents=True)
        out.append(Serve(d, "--bus", url, "--replica-id", f"r{i}", *args))
    return out


def _leader(reps: list[Serve], timeout: float = 30.0) -> Serve:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for r in reps:
            if r.proc.poll() is None and r.metric("imdswatch_fleet_leader") == 1:
                return r
        time.sleep(0.02)
    raise RuntimeError("no replica scores")


def _stop(reps: list[Serve]) -> None:
    for r in reps:
        if r.proc.poll() is None:
            r.stop()


# -- ingest ---------------------------------------------------------------------------------------
def _ingest_rate(targets: list[Serve], bodies: dict[int, list[bytes]],
                 seconds: float) -> tuple[float, float]:
    """(events acknowledged per second, events scored per second) over `seconds`."""
    stop = threading.Event()

    def run_sender(s: int) -> None:
        port = targets[s % len(targets)].port
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for body in bodies[s]:
            while not stop.is_set():
                try:
                    c.request("POST", "/v1/events", body=body,
                              headers={"Content-Encoding": "gzip"})
                    r = c.getresponse()
                    r.read()
                except (OSError, http.client.HTTPException):
                    c.close()
                    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                    continue
                if r.status == 200:
                    break
                time.sleep(0.05)
            if stop.is_set():
                return

    def count(name: str, **labels: str) -> float:
        return sum(t.metric(name, **labels) for t in targets)

    threads = [threading.Thread(target=run_sender, args=(s,), daemon=True) for s in bodies]
    a0 = count("imdswatch_ingest_events_total", result="accepted")
    s0 = count("imdswatch_fleet_events_scored_total")
    start = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(seconds)
    a1 = count("imdswatch_ingest_events_total", result="accepted")
    s1 = count("imdswatch_fleet_events_scored_total")
    elapsed = time.monotonic() - start
    stop.set()
    for t in threads:
        t.join(30)
    return (a1 - a0) / elapsed, (s1 - s0) / elapsed


def ingest(quick: bool) -> Section:
    senders, batch, seconds = 60, 500, (6.0 if quick else 12.0)
    t0 = 1_780_000_000.0
    bodies = {}
    for s in range(senders):
        evs = _events(f"node-{s}", 40 * batch, t0, 0.05)
        bodies[s] = [gzip.compress(b"\n".join(evs[i:i + batch]), 1)
                     for i in range(0, len(evs), batch)]
    rates = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "local").mkdir()
        local = Serve(tmp / "local", "--save-interval", "10s", "--learning-period", "0s")
        try:
            rates["local"] = _ingest_rate([local], bodies, seconds)
        finally:
            local.stop()
        for n in (1, 3):
            srv = NatsServer(tmp / f"nats{n}", "n1").start()
            reps: list[Serve] = []
            try:
                reps = _replicas(tmp / f"bus{n}", srv.url, n, "--save-interval", "10s",
                                 "--learning-period", "0s")
                _leader(reps)
                rates[n] = _ingest_rate(reps, bodies, seconds)
            finally:
                _stop(reps)
                srv.stop()
    notes = [
        f"Bus ingest: {senders} concurrent senders post gzip NDJSON batches of {batch} "
        f"events as fast as they are acknowledged, for {seconds:.0f} s: first to a "
        "local-log `serve`, then to one `serve --bus` replica, then spread over three "
        "(one of which scores), each time on a fresh single `nats-server`. Acknowledged "
        "and scored events are read from the replicas' metrics. Replicas, server and "
        "senders share this machine's two cores: the ratio is what the bus costs here, not "
        "what three machines would give, and ingest outruns the scoring replica (the "
        "stream holds the backlog).",
    ]
    return Section([
        Row(f"bus ingest: events/s acknowledged, 1 replica ({senders} senders)",
            round(rates[1][0]), "ev/s", "local write-ahead log, same senders",
            round(rates["local"][0]), "", None),
        Row("bus ingest: events/s acknowledged, 3 replicas", round(rates[3][0]), "ev/s",
            "1 replica", round(rates[1][0]), "", None),
        Row("bus ingest: 3 replicas / 1 replica", round(rates[3][0] / rates[1][0], 2), "x",
            "2 cores shared by all", None, "", None),
        Row("bus ingest: events/s scored meanwhile, 1 replica", round(rates[1][1]), "ev/s",
            "local write-ahead log", round(rates["local"][1]), "", None),
        Row("bus ingest: events/s scored meanwhile, 3 replicas", round(rates[3][1]), "ev/s",
            "1 replica", round(rates[1][1]), "", None),
    ], notes)


# -- catching up -------------------------------------------------------------------------------
def catch_up(quick: bool) -> Section:
    """A stream filled while no replica scored (an outage, a takeover behind a backlog):
    how fast the scoring replica works through it, beside `imdswatch replay` of the same
    events (parse and score in one process, no bus)."""
    from prometheus_client import CollectorRegistry

    from fleet.bus import Bus, BusOptions
    from fleet.bus_log import JetStreamLog
    from fleet.dedup import IdWindow
    from fleet.ingest import parse
    from fleet.metrics import ServeMetrics
    from imdswatch.config import load_config

    n_hosts, per_host = (10, 10_000) if quick else (20, 10_000)
    t0 = 1_780_000_000.0
    lines = [line for h in range(n_hosts)
             for line in _events(f"node-{h}", per_host, t0 + h * 0.001, 0.05)]
    total = len(lines)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        src = tmp / "events.ndjson"
        src.write_bytes(b"\n".join(lines) + b"\n")
        t = time.perf_counter()
        subprocess.run([*CMD, "replay", str(src), "--output", os.devnull,
                        "--learning-period", "0s"], check=True, capture_output=True)
        replay_rate = total / (time.perf_counter() - t)
        srv = NatsServer(tmp / "nats", "n1").start()
        rep: list[Serve] = []
        try:
            bus = Bus(BusOptions(servers=srv.url, replica_id="filler"))
            bus.open()
            filler = JetStreamLog(bus, IdWindow(2), ServeMetrics(CollectorRegistry()),
                                  load_config(None).catalog)
            for i in range(0, total, 500):
                filler.append(parse(b"\n".join(lines[i:i + 500]), filler.catalog))
            bus.close()
            (tmp / "r0").mkdir()
            rep = [Serve(tmp / "r0", "--bus", srv.url, "--replica-id", "r0",
                         "--learning-period", "0s", "--save-interval", "60s")]
            _leader(rep)
            t = time.monotonic()
            deadline = t + 300
            while (rep[0].metric("imdswatch_fleet_events_scored_total") < total - 1000
                   and time.monotonic() < deadline):
                time.sleep(0.1)
            rate = rep[0].metric("imdswatch_fleet_events_scored_total") / (time.monotonic() - t)
        finally:
            _stop(rep)
            srv.stop()
    notes = [
        f"Bus catch-up: {total:,} events appended to the stream while no replica scored, "
        "then one `serve --bus` replica started; the time until it has scored them "
        "(its metrics). Baseline: `imdswatch replay` of the same events in one process. "
        "The scoring replica parses each event again from the stream in its scoring "
        "thread (replay parses in a process of its own).",
    ]
    return Section([Row(f"bus catch-up: events/s scored from a filled stream ({total:,} "
                        "events)", round(rate), "ev/s", "imdswatch replay of the same events",
                        round(replay_rate), "", None)], notes)


# -- takeover ---------------------------------------------------------------------------------
def takeover(quick: bool) -> Section:
    trials = 2 if quick else 3
    killed, termed = [], []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        srv = NatsServer(tmp / "nats", "n1").start()
        reps: list[Serve] = []
        try:
            reps = _replicas(tmp, srv.url, 2, "--save-interval", "2s",
                             "--bus-lease-ttl", f"{LEASE_TTL:g}s")
            for k in range(2 * trials):
                lead = _leader(reps)
                others = [r for r in reps if r is not lead]
                time.sleep(LEASE_TTL / 2)  # a renewal or two behind it
                hard = k % 2 == 0
                t = time.monotonic()
                lead.proc.send_signal(signal.SIGKILL if hard else signal.SIGTERM)
                _leader(others, 30)
                (killed if hard else termed).append(time.monotonic() - t)
                lead.proc.wait(60)
                again = Serve(lead.tmp, "--bus", srv.url, "--replica-id",
                              lead.tmp.name, "--save-interval", "2s")
                reps[reps.index(lead)] = again
        finally:
            _stop(reps)
            srv.stop()
    notes = [
        f"Bus takeover: two replicas on one `nats-server`, lease time to live "
        f"{LEASE_TTL:g} s; the scoring replica is SIGKILLed (the other waits for the lease "
        "to age out) or SIGTERMed (it checkpoints and gives the lease up), alternately, "
        f"{trials} times each; the time from the signal until the other reports "
        "`imdswatch_fleet_leader` 1 (polled every 20 ms), checkpoint loaded.",
    ]
    return Section([
        Row(f"bus takeover after SIGKILL of the scoring replica, worst of {trials}",
            round(max(killed), 2), "s", "lease time to live", LEASE_TTL, "< 10 s",
            max(killed) < 10.0),
        Row("bus takeover after SIGKILL, best", round(min(killed), 2), "s", "", None, "",
            None),
        Row(f"bus takeover after SIGTERM (lease given up), worst of {trials}",
            round(max(termed), 2), "s", "", None, "< 10 s", max(termed) < 10.0),
    ], notes)


# -- latency ----------------------------------------------------------------------------------
def _latency(targets: list[Serve], alerts: Path, seconds: float) -> list[float]:
    senders, per_second = 10, 100
    sent: dict[str, float] = {}
    seen: dict[str, float] = {}
    stop = threading.Event()

    def tail() -> None:
        pos = 0
        while not stop.is_set():
            if alerts.exists():
                with open(alerts, "rb") as f:
                    f.seek(pos)
                    data = f.read()
                now = time.monotonic()
                cut = data.rfind(b"\n") + 1
                for line in data[:cut].splitlines():
                    seen.setdefault(orjson.loads(line)["event"]["id"], now)
                pos += cut
            time.sleep(0.005)

    def run_sender(s: int) -> None:
        sender = Sender(targets[s % len(targets)].port)
        k = 0
        next_at = time.monotonic()
        while not stop.is_set():
            evs = _events(f"node-{s}", per_second, time.time() - 1.0, 1.0 / per_second,
                          rare_every=per_second, tag=f"b{k}-")
            sent[orjson.loads(evs[-1])["event"]["id"]] = time.monotonic()
            sender.post(b"\n".join(evs))
            k += 1
            next_at += 1.0
            time.sleep(max(0.0, next_at - time.monotonic()))

    tailer = threading.Thread(target=tail, daemon=True)
    tailer.start()
    threads = [threading.Thread(target=run_sender, args=(s,), daemon=True)
               for s in range(senders)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and len(seen) < len(sent) - senders:
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(10)
    tailer.join(5)
    return sorted(seen[i] - sent[i] for i in sent if i in seen)


def latency(quick: bool) -> Section:
    seconds = 8.0 if quick else 15.0
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "local").mkdir()
        warm_state(tmp / "local")
        shutil.copy(tmp / "local" / "fleet-state.json.gz", tmp / "warm.json.gz")
        local = Serve(tmp / "local", "--learning-period", "0s")
        try:
            base = _latency([local], local.alerts, seconds)
        finally:
            local.stop()
        srv = NatsServer(tmp / "nats", "n1").start()
        reps: list[Serve] = []
        try:
            # The bus starts from the same warm model (no checkpoint on the bus yet).
            for i in range(3):
                (tmp / f"r{i}").mkdir()
                shutil.copy(tmp / "warm.json.gz", tmp / f"r{i}" / "fleet-state.json.gz")
            reps = [Serve(tmp / f"r{i}", "--bus", srv.url, "--replica-id", f"r{i}",
                          "--learning-period", "0s") for i in range(3)]
            lead = _leader(reps)
            bus = _latency(reps, lead.alerts, seconds)
        finally:
            _stop(reps)
            srv.stop()

    def p(lat: list[float], q: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))], 3) if lat else None

    notes = [
        "Bus latency: 10 senders at 100 events/s each (batches once a second, as agents "
        "send), each batch holding one caller never seen before, against a warm model; the "
        "time from the POST to that caller's alert line in the scoring replica's output. "
        "Three replicas on one `nats-server` (senders spread over them), and the same "
        "senders against a local-log `serve` as the baseline. Both include the 0.5 s "
        "reorder hold.",
    ]
    return Section([
        Row("bus latency: POST -> alert line, p50 (3 replicas, 1,000 ev/s)", p(bus, 0.5), "s",
            "local write-ahead log", p(base, 0.5), "", None),
        Row("bus latency: POST -> alert line, p99", p(bus, 0.99), "s", "local write-ahead log",
            p(base, 0.99), "< 1 s", bool(bus) and (p(bus, 0.99) or 9) < 1.0),
        Row("bus latency: rare callers alerted", len(bus), "", "local", len(base), "", None),
    ], notes)


def run(quick: bool = False) -> Section:
    sec = Section()
    for part in (ingest, catch_up, takeover, latency):
        sec.extend(part(quick))
    return sec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bus_bench")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    sec = run(args.quick)
    print(render("fleet on a bus: serve --bus vs the local log", [r.as_dict() for r in sec.rows]))
    print("\n\n".join(sec.notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
