"""A realistic, seeded, labelled scenario: ECS NDJSON of a ~40-node mixed-cloud Kubernetes
fleet over two weeks, with attack actors in the second week.

    python -m bench.scenario OUT.ndjson[.gz] [--seed 7] [--scale 1.0] [--no-labels]

Every event carries `labels.imdswatch_truth` ("benign" | "attack") and
`labels.imdswatch_actor`; the scorer ignores them as unknown fields, and the evaluation
strips them before scoring anyway. The ground truth of the actors is also written to
OUT.truth.json. The addresses in the file are data only: nothing connects anywhere.

`--scale` multiplies the number of nodes (at 1.0: 40 nodes, roughly 600k events);
the attack actors stay the same.
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson

from bench.attacks import Actor, Attacks
from bench.ecs import Trace
from bench.fleet import DAY, Fleet

# A Monday, so the weekly jobs fall on the weekdays they are written for.
START = datetime(2026, 3, 2, tzinfo=UTC).timestamp()
DAYS = 14


@dataclass
class Scenario:
    """A generated scenario: its trace, its ground truth and how it was made."""

    seed: int
    scale: float
    start: float
    end: float
    trace: Trace
    fleet: Fleet
    actors: list[Actor] = field(default_factory=list)

    def truth(self) -> dict:
        return {
            "seed": self.seed,
            "scale": self.scale,
            "start": self.start,
            "end": self.end,
            "events": len(self.trace),
            "hosts": [{"name": h.name, "cloud": h.cloud, "join_ts": h.join_ts,
                       "initial": h.initial} for h in self.fleet.hosts],
            "actors": [a.as_dict() for a in self.actors],
        }

    def write(self, path: Path, labels: bool = True) -> int:
        """Write the trace (plain or .gz by suffix) and the truth sidecar."""
        n = self.trace.write(path, f"s{self.seed}", labels)
        truth_path(path).write_bytes(orjson.dumps(self.truth(), option=orjson.OPT_INDENT_2))
        return n


def truth_path(path: Path) -> Path:
    name = path.name
    for suffix in (".gz", ".ndjson", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return path.with_name(name + ".truth.json")


def generate(seed: int = 7, scale: float = 1.0, days: int = DAYS) -> Scenario:
    """Build the scenario in memory; a pure function of (seed, scale, days)."""
    rng = random.Random(seed)
    trace = Trace()
    start, end = START, START + days * DAY
    fleet = Fleet(rng, trace, start, end, scale)
    fleet.generate()
    actors = Attacks(rng, trace, fleet).generate() if days > 7 else []
    return Scenario(seed, scale, start, end, trace, fleet, actors)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="output NDJSON path (.gz for gzip)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--days", type=int, default=DAYS)
    ap.add_argument("--no-labels", action="store_true", help="omit the labels.* fields")
    args = ap.parse_args(argv)
    sc = generate(args.seed, args.scale, args.days)
    n = sc.write(args.out, labels=not args.no_labels)
    print(f"wrote {n} events, {len(sc.fleet.hosts)} hosts, {len(sc.actors)} attack actors "
          f"to {args.out} (truth: {truth_path(args.out)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
