# Metadata addresses in this file are data (event fields, expected matches): nothing here
# connects to them. Real connections happen only inside a test's own network namespace
# (netns, tests/netns_fixtures.py).
"""Memory of the model: bytes per tracked entity, and RSS with 100k distinct entities.

    python -m bench.memory [--entities 100000]

Each event is a caller never seen before (its own process name, executable, user,
parent and image on one of 40 hosts), the worst case: every detector gets a new key
for it. The target row feeds such callers until the scorer tracks 100k entities
(`Scorer.model_size()` summed over detectors, the unit of "bytes per tracked entity");
an informative row feeds 100k distinct callers (about five entities each). Events are
built lazily, so only the scorer's state grows.
Measured in fresh child processes, twice: once for RSS (VmRSS from /proc before and
after, no tracing) and once with tracemalloc (Python heap attributable to the scorer).
"bytes per entity" divides the tracemalloc growth by the entities the scorer reports
(`Scorer.model_size()`, summed over detectors).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from bench.rows import Row, render

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


def child(callers: int, traced: bool, until_entities: int | None = None) -> dict:
    """Runs in a fresh interpreter; prints its measurements as JSON."""
    import gc
    import tracemalloc

    import scoring.scorer  # noqa: F401 - imports are not the model's memory

    gc.collect()
    if traced:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
    rss0 = _rss_bytes()
    scorer = _feed(callers, until_entities)
    gc.collect()
    rss1 = _rss_bytes()
    out = {"rss_before": rss0, "rss_after": rss1, "model": scorer.model_size()}  # type: ignore[attr-defined]
    if traced:
        out["traced"] = tracemalloc.get_traced_memory()[0] - before
    return out


def measure(callers: int, traced: bool, until_entities: int | None = None) -> dict:
    code = ("import json,sys; from bench.memory import child; "
            f"print(json.dumps(child({callers}, {traced}, {until_entities})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed: {proc.stderr[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(quick: bool = False, entities: int | None = None) -> list[Row]:
    entities = entities or (20_000 if quick else 100_000)
    callers_cap = 10 * entities  # enough callers to reach `entities` tracked entities
    plain = measure(callers_cap, traced=False, until_entities=entities)
    traced = measure(callers_cap, traced=True, until_entities=entities)
    tracked = sum(traced["model"].values())
    per_entity = traced["traced"] / tracked if tracked else 0.0
    rss_mb = plain["rss_after"] / 2**20
    before_mb = plain["rss_before"] / 2**20
    # The target is for 100k entities; a quick run scales its growth up to that size.
    projected = before_mb + (rss_mb - before_mb) * 100_000 / max(1, sum(plain["model"].values()))
    rows = [
        Row(f"bytes per tracked entity (tracemalloc, {tracked:,} entities)", round(per_entity),
            "B"),
        Row(f"RSS with {sum(plain['model'].values()):,} tracked entities", round(rss_mb, 1),
            "MB", "RSS before feeding", round(before_mb, 1), f"< {TARGET_MB:.0f} MB at 100k",
            projected < TARGET_MB),
    ]
    if not quick:
        worst = measure(entities, traced=False)
        rows.append(Row(f"RSS with {entities:,} distinct callers "
                        f"({sum(worst['model'].values()):,} entities)",
                        round(worst["rss_after"] / 2**20, 1), "MB", "RSS before feeding",
                        round(worst["rss_before"] / 2**20, 1)))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="scorer memory per entity")
    ap.add_argument("--entities", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    print(render("memory", [r.as_dict() for r in run(args.quick, args.entities)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
