# Metadata addresses in this file are data (event fields, expected matches): nothing here
# connects to them. Real connections happen only inside a test's own network namespace
# (netns, tests/netns_fixtures.py).
"""Memory of the model: memory per model entry, RSS with 100k entries, and a fleet
scorer's model and state at 1k, 10k and 100k hosts.

    python -m bench.memory [--entities 100000]

Each event is a caller never seen before (its own process name, executable, user,
parent and image on one of 40 hosts), the worst case: every detector gets a new key
for it. The target row feeds such callers until the scorer holds 100k model entries
(`Scorer.model_size()` summed over detectors, the entries `scoring.max_entities` caps);
an informative row feeds 100k distinct callers (about five entries each). Events are
built lazily, so only the scorer's state grows. Measured in a fresh child process: VmRSS
from /proc before and after feeding; "memory per model entry" is that growth divided by
the entries, the figure to size a process by (its entry cap times it, on top of its RSS
without a model).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from bench.rows import Row, Section, render
from scoring.settings import ScorerSettings

TARGET_MB = 100.0
START = 1_772_409_600.0  # 2026-03-02T00:00:00Z


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _feed(callers: int, until_entities: int | None = None) -> object:
    from scoring.events import Event
    from scoring.scorer import Scorer

    scorer = Scorer()
    span = 2 * 86400.0  # past the default learning period, so alert state grows too
    for i in range(callers):
        if until_entities is not None and i % 500 == 0 and \
                sum(scorer.model_size().values()) >= until_entities:
            break
        ev = Event(START + span * i / callers, "169.254.169.254", f"p{i:x}"[:15],
                   dst_port=80, exe=f"/opt/vendor{i % 97}/bin/p{i:x}", user=f"u{i % 5000}",
                   parent_name=f"q{i % 3000}", parent_exe=f"/usr/bin/q{i % 3000}",
                   host=f"node-{i % 40:02d}", image=f"registry.example/app{i % 2000}:1.0",
                   namespace=f"ns{i % 200}", container_id=f"{i:064x}", pid=1000 + i)
        scorer.process(ev)
    return scorer


def child(callers: int, until_entities: int | None = None) -> dict:
    """Runs in a fresh interpreter; prints its measurements as JSON."""
    import gc

    import scoring.scorer  # noqa: F401 - imports are not the model's memory

    gc.collect()
    rss0 = _rss_bytes()
    scorer = _feed(callers, until_entities)
    gc.collect()
    rss1 = _rss_bytes()
    return {"rss_before": rss0, "rss_after": rss1, "model": scorer.model_size()}  # type: ignore[attr-defined]


def measure(callers: int, until_entities: int | None = None) -> dict:
    code = ("import json,sys; from bench.memory import child; "
            f"print(json.dumps(child({callers}, {until_entities})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed: {proc.stderr[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


FLEET_TARGET_MB = 1024.0  # a fleet scorer's model for 100k hosts (1M entries) within 1 GiB
FLEET_AGENTS = ("kubelet", "amazon-ssm-agent", "aws-k8s-agent")


def fleet_child(hosts: int, entities: int) -> dict:
    """A fleet scorer's model at `hosts` hosts: three agents on every host (entries whose
    spread grows past the exact sets into sketches), then distinct callers spread over
    the hosts until the model holds `entities` entries. Runs in a fresh interpreter."""
    import gc
    import time

    from scoring.events import Event
    from scoring.scorer import Scorer
    from scoring.settings import ScorerSettings
    from scoring.state import model_to_bytes

    gc.collect()
    rss0 = _rss_bytes()
    scorer = Scorer(ScorerSettings(max_entities=int(entities * 1.2)))
    t = START
    for h in range(hosts):
        for name in FLEET_AGENTS:
            t += 0.01
            scorer.process(Event(t, "169.254.169.254", name, dst_port=80,
                                 exe=f"/usr/bin/{name}", user="root", parent_name="systemd",
                                 host=f"node-{h:06d}"))
    i = 0
    while scorer.entities < entities:
        for _ in range(1000):
            t += 0.01
            scorer.process(Event(t, "169.254.169.254", f"job{i:x}"[:15], dst_port=80,
                                 exe=f"/opt/job{i}/bin/run", user=f"u{i % 5000}",
                                 parent_name=f"p{i % 3000}", host=f"node-{i % hosts:06d}",
                                 image=f"registry.example/app{i % 2000}:1.0",
                                 namespace=f"ns{i % 200}"))
            i += 1
    gc.collect()
    rss1 = _rss_bytes()
    started = time.perf_counter()
    gz = model_to_bytes(scorer, gz=True)
    save_s = time.perf_counter() - started
    return {"rss_before": rss0, "rss_after": rss1, "entities": scorer.entities,
            "hosts": scorer.hosts_seen, "state_gz": len(gz), "save_s": save_s}


def measure_fleet(hosts: int, entities: int) -> dict:
    code = ("import json; from bench.memory import fleet_child; "
            f"print(json.dumps(fleet_child({hosts}, {entities})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"fleet memory child failed: {proc.stderr[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fleet_rows(quick: bool) -> list[Row]:
    """Model memory and state size at 1k, 10k and 100k hosts (10 entries per host)."""
    rows = []
    for hosts in (1_000, 10_000) if quick else (1_000, 10_000, 100_000):
        entities = 10 * hosts
        m = measure_fleet(hosts, entities)
        rss = m["rss_after"] / 2**20
        growth = (m["rss_after"] - m["rss_before"]) / max(1, m["entities"])
        last = hosts == 100_000
        rows += [
            Row(f"fleet model at {m['hosts']:,} hosts, {m['entities']:,} entries: RSS",
                round(rss, 1), "MiB", "RSS before feeding", round(m["rss_before"] / 2**20, 1),
                f"<= {FLEET_TARGET_MB:.0f} MiB at 100k hosts, 1M entries" if last else "",
                rss <= FLEET_TARGET_MB if last else None),
            Row(f"  fleet model at {hosts:,} hosts: RSS growth / entries (host sketches "
                "included)", round(growth), "B"),
            Row(f"  state size (gzip), {hosts:,} hosts", round(m["state_gz"] / 2**20, 2),
                "MiB"),
            Row(f"  state serialise time, {hosts:,} hosts", round(m["save_s"], 2), "s"),
        ]
    return rows


def run(quick: bool = False, entities: int | None = None) -> Section:
    entities = entities or (20_000 if quick else 100_000)
    callers_cap = 10 * entities  # enough callers to reach `entities` model entries
    plain = measure(callers_cap, until_entities=entities)
    held = sum(plain["model"].values())
    rss_mb = plain["rss_after"] / 2**20
    before_mb = plain["rss_before"] / 2**20
    per_entry = (plain["rss_after"] - plain["rss_before"]) / max(1, held)
    # The target is for 100k entries; a quick run scales its growth up to that size.
    projected = before_mb + per_entry * 100_000 / 2**20
    rows = [
        Row(f"memory per model entry (RSS growth / entries, {held:,} entries)",
            round(per_entry), "B"),
        Row(f"scorer RSS with {held:,} model entries", round(rss_mb, 1),
            "MiB", "RSS before feeding", round(before_mb, 1), f"< {TARGET_MB:.0f} MiB at 100k",
            projected < TARGET_MB),
    ]
    if not quick:
        worst = measure(entities)
        rows.append(Row(f"scorer RSS with {entities:,} distinct callers "
                        f"({sum(worst['model'].values()):,} entries, capped at "
                        f"{ScorerSettings().max_entities:,})",
                        round(worst["rss_after"] / 2**20, 1), "MiB", "RSS before feeding",
                        round(worst["rss_before"] / 2**20, 1)))
    notes = [
        "The model (`Scorer`) alone in a fresh process, fed callers never seen before (their "
        "own name, executable, user, parent and image: every detector gets new entries), "
        "the worst case per entry. Memory per model entry is the RSS growth divided by the "
        "entries `Scorer.model_size()` reports (the unit `scoring.max_entities` caps): a "
        "process's memory is about its RSS without a model plus its cap times this figure "
        "(agent 75,000, replay 200,000, serve 1,200,000 entries by default). The fleet model "
        "rows give three common callers on every host (their host spread past the exact sets "
        "into sketches) plus distinct callers up to ten entries per host, and the gzip state "
        "a fleet scorer saves.",
    ]
    return Section(rows + fleet_rows(quick), notes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="scorer memory per entity")
    ap.add_argument("--entities", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    print(render("memory", [r.as_dict() for r in run(args.quick, args.entities).rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
