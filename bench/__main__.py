"""`make bench`: accuracy against the anchors over several seeds, replay throughput, memory,
the fleet scorer, the live tracer and the live agent under a name flood, each as a table of
figure / value / baseline from the same run / target / met, written as a Markdown report.

    python -m bench [--quick] [--strict] [--seed 7] [--report docs/benchmarks.md]

Exit status: 0 when everything ran (missed targets are printed, clearly, as NO);
1 with --strict when a target is missed; 2 when a benchmark crashed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench.evaluate import Result, SeedRun, fmt_latency
from bench.report import Ran, Run, load_average, take, update, write
from bench.rows import Row, Section, render

FP_ENTITY_TARGET = 10  # "single digits for a fleet of ~40 nodes over two weeks"
F1_MARGIN = 0.2  # "lead every anchor on F1 by a wide margin"
# The default seed first (its evaluation is shown in full), then others: the scenario's
# volumes, placements and attack times all move with the seed.
SEEDS = (7, 21, 99, 3, 11)
QUICK_SEEDS = (7, 21)

DEFINITIONS = (
    "Definitions (bench/evaluate.py; every system counted the same way): the trace is given "
    "to every system without its labels; an alert covers the events an analyst sees in it "
    "(imdswatch, Falco and the path rule: its event; an Elastic anomaly record: every event "
    "of its process name in its 15-minute bucket; a new_terms alert: its (host, executable) "
    "events in its run); alerts before the end of imdswatch's learning period (1 day from "
    "the first event) are dropped for every system. Recall = attack actors with a covered "
    "event / attack actors. An entity is (host.name, process.name, user.name): false-positive "
    "entities are the distinct entities of covered benign events; precision = true-positive "
    "entities / all entities covered; F1 = 2PR / (P + R) with R the actor recall."
)
LATENCY = (
    "Detection latency is in event time: the time of the event an actor's first alert is "
    "about (for the anchors, when their alert reaches an analyst: bucket close, query delay "
    "and rule schedule included) minus the time of the actor's first event. It says when "
    "the scorer decides, not how long the live path takes: a live agent adds the time from "
    "the connect to the alert line, measured in the tracer section (\"tracer: latency "
    "connect -> alert line\" rows), and the fleet scorer adds its reorder hold (\"latency: "
    "POST -> alert line\" in the fleet section)."
)


def _median(xs: list[float]) -> float:
    return statistics.median(xs)


def _spread(xs: list[float]) -> tuple[float, float]:
    return min(xs), max(xs)


def _short(r: Result) -> str:
    return r.system.split(" (")[0]


def seed_rows(runs: list[SeedRun]) -> list[Row]:
    """imdswatch's figures over the seeds (median, min-max) beside the best anchor's on each
    seed, every target judged on every seed."""
    seeds = ", ".join(str(r.seed) for r in runs)
    over = f"{len(runs)} seeds ({seeds})"

    def figure(name: str, mine: Callable[[Result], float], best_of: Callable, target: str,
               ok: Callable[[SeedRun], bool], baseline: str, digits: int | None = 2) -> Row:
        ours = [mine(r.mine) for r in runs]
        base = [best_of(mine(a) for a in r.anchors) for r in runs]

        def rnd(x: float) -> float:
            return round(x, digits) if digits is not None else x

        return Row(f"{name}, {over}", rnd(_median(ours)), "", baseline, rnd(_median(base)),
                   target, all(ok(r) for r in runs), tuple(map(rnd, _spread(ours))),
                   tuple(map(rnd, _spread(base))))

    def fp(r: Result) -> float:
        return len(r.fp_entities)

    rows = [
        figure("F1 (entity precision x actor recall)", lambda r: r.f1, max,
               f">= best anchor + {F1_MARGIN} on every seed",
               lambda s: all(s.mine.f1 >= a.f1 + F1_MARGIN for a in s.anchors),
               "best anchor on each seed"),
        figure("recall (attack actors detected)", lambda r: r.recall, max,
               ">= every anchor on every seed",
               lambda s: all(s.mine.recall >= a.recall for a in s.anchors),
               "best anchor on each seed"),
        figure("precision (entity level)", lambda r: r.precision, max,
               ">= every anchor on every seed",
               lambda s: all(s.mine.precision >= a.precision for a in s.anchors),
               "best anchor on each seed"),
        figure("false-positive entities (host, process, user)", fp, min,
               f"< {FP_ENTITY_TARGET} on every seed",
               lambda s: fp(s.mine) < FP_ENTITY_TARGET, "fewest of the anchors on each seed",
               None),
        figure("benign alerts", lambda r: r.benign_alerts, min, "", lambda s: True,
               "fewest of the anchors on each seed", None),
    ]
    rows[-1].ok = None
    ours = [x for r in runs for x in r.mine.detected.values()]
    ml = [x for r in runs for a in r.anchors if a.system.startswith("Elastic ML")
          for x in a.detected.values()]
    if ours:
        med, mx = round(_median(ours), 1), round(max(ours), 1)
        ml_med = fmt_latency(_median(ml)) if ml else "-"
        ml_max = fmt_latency(max(ml)) if ml else "-"
        rows += [
            Row(f"detection latency in event time, median over the detected actors of {over}",
                med, "s", f"Elastic ML rare process: {ml_med}", None, "0 s", med == 0.0),
            Row("detection latency in event time, max", mx, "s",
                f"Elastic ML rare process: {ml_max}", None, "< Elastic ML's max",
                not ml or mx < max(ml)),
        ]
    return rows


def seed_table(runs: list[SeedRun]) -> str:
    head = ("seed", "events", "hosts", "recall", "precision", "F1", "FP entities",
            "benign alerts", "best anchor F1", "fewest anchor FP entities")
    rows = [head]
    for r in runs:
        m = r.mine
        best = max(r.anchors, key=lambda a: a.f1)
        few = min(r.anchors, key=lambda a: len(a.fp_entities))
        rows.append((str(r.seed), f"{r.events:,}", str(r.hosts),
                     f"{len(m.detected)}/{m.actors_total}", f"{m.precision:.2f}",
                     f"{m.f1:.2f}", str(len(m.fp_entities)), str(m.benign_alerts),
                     f"{best.f1:.2f} ({_short(best)})",
                     f"{len(few.fp_entities)} ({_short(few)})"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def small_rows(title: str, results: list[Result]) -> list[Row]:
    """Recall and FP entities on a single-host scenario, next to the best anchor's."""
    mine, anchors = results[0], results[1:]
    best = max(anchors, key=lambda r: (r.recall, -len(r.fp_entities)))
    return [
        Row(f"{title}: recall", round(mine.recall, 2), "", f"best anchor, {_short(best)}",
            round(best.recall, 2), ">= every anchor", all(mine.recall >= r.recall
                                                          for r in anchors)),
        Row(f"{title}: false-positive entities", len(mine.fp_entities), "",
            f"best anchor, {_short(best)}", len(best.fp_entities), "0",
            len(mine.fp_entities) == 0),
    ]


def section_accuracy(quick: bool, seed: int) -> Section:
    from bench.anchors import ANCHORS
    from bench.evaluate import actor_matrix, evaluate_small, over_seeds, table
    from bench.small_scenarios import fresh_node, quiet_host
    from bench.variants import variant_rows

    seeds = (seed, *(s for s in (QUICK_SEEDS if quick else SEEDS) if s != seed))
    runs = over_seeds(seeds, 0.5 if quick else 1.0)
    print(runs[0].text, end="\n\n")
    sec = Section(seed_rows(runs))
    sec.details.append(("Per seed (imdswatch, and the best anchor on the same trace)",
                        seed_table(runs)))
    sec.details.append((f"Seed {seed} in full: every system, per-actor latency "
                        "(MISS = not detected), imdswatch's false positives", runs[0].text))
    for title, sc, count_learning in (
            ("quiet host (3 days, 2 agents), after learning", quiet_host(seed), False),
            ("fresh node (first hour, no history), learning period counted",
             fresh_node(seed), True)):
        small = evaluate_small(sc, count_learning)
        text = (f"{len(sc.trace)} events, {len(sc.actors)} attack actors\n"
                f"{table(small.results)}\n{actor_matrix(sc, small.results)}")
        print(f"{title}: {text}\n")
        sec.details.append((title, text))
        sec.rows += small_rows(title.split(" (")[0], small.results)
    # Issue 20's cases on the first seed: rollouts and upgrades, and identity lost.
    rows, texts = variant_rows(seed, 0.5 if quick else 1.0, runs[0].mine)
    sec.rows += rows
    sec.details += texts
    print("\n\n".join(f"{c}:\n{t}" for c, t in texts), end="\n\n")
    sec.notes += [
        f"The scenario (bench/scenario.py): a labelled two-week, ~40-node AWS/GCP/Azure "
        "Kubernetes fleet, every metadata call with its real agent's request (path, anti-SSRF "
        "header, user agent), and attack actors in the second week (web shells, masquerades, "
        "SSRF through legitimate callers on all three clouds, a name spray, attacks on nodes "
        f"minutes old), generated for each of the seeds {', '.join(map(str, seeds))} at scale "
        f"{0.5 if quick else 1.0}. Then two single-host scenarios on seed {seed} "
        "(bench/small_scenarios.py): a quiet host after learning, and a fresh node's first "
        "hour with alerts during the learning period counted for every system. Then two "
        f"variants of seed {seed}'s scenario (bench/variants.py): rollouts (a new DaemonSet "
        "reaching every node over a day, an agent upgraded on every node, a new node image "
        "bringing python3.12 under a host agent, each with an attacker's one-off under the "
        "same name from an unusual path in its middle), and identity lost (a quarter of the "
        "short-lived benign callers' events without executable, parent and command line).",
        DEFINITIONS,
        LATENCY,
        "imdswatch runs as `imdswatch replay` does (imdswatch.replay on the gzip trace) with "
        "the default ScorerSettings: threshold 50 (rare_user 75), learning period 1 day, "
        "half-life 14 days, suppression window 1 hour.",
        "The anchors (bench/anchors.py) are implemented from their published definitions, "
        "no code of theirs used, and read the same events. Their modelling choices:",
        *(f"- {cls.name}: {cls().choices()}." for cls in ANCHORS),
    ]
    return sec


def section_throughput(quick: bool, seed: int) -> Section:
    from bench.throughput import run

    return run(quick)


def section_memory(quick: bool, seed: int) -> Section:
    from bench.memory import run

    return run(quick)


def section_fleet(quick: bool, seed: int) -> Section:
    from bench.serve_bench import run

    return run(quick, seed)


def section_tracer(quick: bool, seed: int) -> Section:
    from bench.tracer_bench import run

    return run(quick)


def section_identity(quick: bool, seed: int) -> Section:
    from bench.identity_bench import run

    return run(quick)


def section_enforcement(quick: bool, seed: int) -> Section:
    from bench.enforce_bench import run

    return run(quick, seed)


def section_bus(quick: bool, seed: int) -> Section:
    from bench.bus_bench import run

    return run(quick)


def section_agent_flood(quick: bool, seed: int) -> Section:
    from bench.agent_flood import run

    return run(quick)


def section_flood(quick: bool, seed: int) -> Section:
    from bench.replay_flood import run

    return run(quick, only=("replay", "serve"))


SECTIONS: tuple[tuple[str, Callable[[bool, int], Section]], ...] = (
    ("accuracy: imdswatch vs the anchors", section_accuracy),
    ("throughput: imdswatch replay vs JSON parse", section_throughput),
    ("memory: the model", section_memory),
    ("fleet: imdswatch serve vs replay and per-node agents", section_fleet),
    ("fleet on a bus: serve --bus replicas vs the local log", section_bus),
    ("tracer: the live probe and agent", section_tracer),
    ("identity: the kernel's record of each process", section_identity),
    ("enforcement: a learned policy against static controls", section_enforcement),
    ("agent flood: the live agent under a name flood", section_agent_flood),
    ("flood: replay and serve under a name flood", section_flood),
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller, faster runs")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    ap.add_argument("--seed", type=int, default=SEEDS[0],
                    help="the seed shown in full (others follow it)")
    ap.add_argument("--report", type=Path, default=None,
                    help="write the Markdown report here (make bench: docs/benchmarks.md)")
    ap.add_argument("--only", action="append", choices=[t.split(":")[0] for t, _ in SECTIONS],
                    help="run only this section (repeatable)")
    ap.add_argument("--update", action="store_true",
                    help="with --only and --report: rewrite only these sections of the "
                         "report, keeping the others as written")
    ap.add_argument("--take", type=Path, default=None, metavar="REPORT",
                    help="with --report: copy the sections of REPORT (another run's report) "
                         "into it, as written, and run nothing")
    args = ap.parse_args(argv)
    if args.take is not None:
        if args.report is None:
            ap.error("--take needs --report")
        try:
            take(args.take, args.report, [t for t, _ in SECTIONS])
        except (OSError, ValueError) as e:
            ap.error(str(e))
        print(f"sections of {args.take} written into {args.report}")
        return 0
    if args.update and not (args.only and args.report):
        ap.error("--update needs --only and --report")
    if args.update and args.quick:
        ap.error("--update writes the report users read: not with --quick")
    command = "make bench-quick" if args.quick else "make bench"
    run = Run(command, args.quick)
    for title, fn in SECTIONS:
        if args.only and title.split(":")[0] not in args.only:
            continue
        before, t, started = load_average(), time.perf_counter(), time.time()
        section, problem = None, ""
        try:
            section = fn(args.quick, args.seed)
        except Exception:  # noqa: BLE001 - one broken benchmark must not hide the others
            traceback.print_exc()
            problem = "CRASHED: " + traceback.format_exc().strip().splitlines()[-1]
        ran = Ran(title, section, time.perf_counter() - t, before, load_average(), problem,
                  started)
        run.sections.append(ran)
        if section is None:
            print(f"== {title} == {problem}\n", flush=True)
            continue
        print(render(f"{title} ({ran.seconds:.0f} s)", [r.as_dict() for r in section.rows]))
        print(flush=True)
    missed = [f"{s.title}: {r.name}" for s in run.sections if s.section
              for r in s.section.rows if r.ok is False]
    print("MISSED TARGETS:\n  " + "\n  ".join(missed) if missed else "all targets met")
    if args.report is not None:
        if args.update:
            update(run, args.report, [t for t, _ in SECTIONS])
        else:
            write(run, args.report)
        print(f"report written to {args.report}")
    crashed = [s.title for s in run.sections if s.problem]
    if crashed:
        print("CRASHED: " + ", ".join(crashed))
        return 2
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
